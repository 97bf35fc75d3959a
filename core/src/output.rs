//! A command's output kept within a byte budget: its first lines and its
//! last, whole, with a marker saying what was left out between them. The
//! start says what the command set out to do, the end how it failed; a
//! runaway loop in the middle costs nothing.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};

/// Longer lines are cut: output is for humans.
pub const MAX_LINE_CHARS: usize = 2000;
/// Room kept for the marker line, whatever its numbers.
const MARKER_ROOM: usize = 80;

#[derive(Debug, Clone)]
pub struct BoundedOutput {
    head: Vec<String>,
    head_bytes: usize,
    head_budget: usize,
    tail: VecDeque<String>,
    tail_bytes: usize,
    tail_budget: usize,
    left_out_lines: u64,
    left_out_bytes: u64,
}

impl BoundedOutput {
    /// Keeps at most `max_bytes` once rendered: about a quarter for the
    /// start, the rest for the end.
    pub fn new(max_bytes: usize) -> Self {
        let room = max_bytes.saturating_sub(MARKER_ROOM);
        let head_budget = room / 4;
        Self {
            head: Vec::new(),
            head_bytes: 0,
            head_budget,
            tail: VecDeque::new(),
            tail_bytes: 0,
            tail_budget: room - head_budget,
            left_out_lines: 0,
            left_out_bytes: 0,
        }
    }

    /// `text`'s lines, kept within `max_bytes`.
    pub fn of(text: &str, max_bytes: usize) -> Self {
        let mut output = Self::new(max_bytes);
        output.push_text(text);
        output
    }

    /// The lines `reader` gives until its end, kept within `max_bytes`,
    /// colour removed. Memory stays within the budget whatever the input
    /// (a file of one endless line included).
    pub fn read(reader: impl BufRead, max_bytes: usize) -> io::Result<Self> {
        // A line is cut long before this; the rest of it is skipped.
        const LINE_BYTES: u64 = MAX_LINE_CHARS as u64 * 4;
        let mut output = Self::new(max_bytes);
        let mut reader = reader;
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = reader
                .by_ref()
                .take(LINE_BYTES)
                .read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(output);
            }
            if line.last() != Some(&b'\n') && read as u64 == LINE_BYTES {
                skip_line(&mut reader)?;
            }
            let text = String::from_utf8_lossy(&line);
            output.push(&crate::nix::strip_ansi(text.trim_end_matches(['\n', '\r'])));
        }
    }

    pub fn push_text(&mut self, text: &str) {
        for line in text.lines() {
            self.push(line);
        }
    }

    /// Adds one line (without its newline).
    pub fn push(&mut self, line: &str) {
        let line = cut(line, self.tail_budget.saturating_sub(1));
        // Each line costs its bytes and a newline.
        let cost = line.len() + 1;
        let nothing_dropped = self.tail.is_empty() && self.left_out_lines == 0;
        if nothing_dropped && self.head_bytes + cost <= self.head_budget {
            self.head_bytes += cost;
            self.head.push(line);
            return;
        }
        self.tail_bytes += cost;
        self.tail.push_back(line);
        while self.tail_bytes > self.tail_budget {
            let Some(dropped) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= dropped.len() + 1;
            self.left_out_lines += 1;
            self.left_out_bytes += dropped.len() as u64 + 1;
        }
    }

    /// Whether any line was left out.
    pub fn is_cut(&self) -> bool {
        self.left_out_lines > 0
    }

    /// The last `n` lines kept.
    pub fn last_lines(&self, n: usize) -> String {
        let from_tail = self.tail.len().min(n);
        let from_head = if self.is_cut() {
            0
        } else {
            (n - from_tail).min(self.head.len())
        };
        let head = &self.head[self.head.len() - from_head..];
        let tail = self.tail.iter().skip(self.tail.len() - from_tail);
        head.iter()
            .chain(tail)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything kept, lines joined by newlines, the marker where lines
    /// were left out.
    pub fn render(&self) -> String {
        let marker = self.is_cut().then(|| {
            format!(
                "[… {} lines ({} bytes) left out …]",
                self.left_out_lines, self.left_out_bytes
            )
        });
        self.head
            .iter()
            .map(String::as_str)
            .chain(marker.as_deref())
            .chain(self.tail.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Reads up to and including the next newline, keeping none of it.
fn skip_line(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// `line` cut to [`MAX_LINE_CHARS`] characters and `max_bytes` bytes, with
/// an ellipsis when cut.
fn cut(line: &str, max_bytes: usize) -> String {
    let limit = line
        .char_indices()
        .nth(MAX_LINE_CHARS)
        .map_or(line.len(), |(at, _)| at)
        .min(max_bytes.saturating_sub('…'.len_utf8()));
    if limit >= line.len() {
        return line.to_owned();
    }
    let mut end = limit;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> String {
        (1..=n)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn output_that_fits_is_kept_whole() {
        let text = numbered(40);
        let output = BoundedOutput::of(&text, 64 * 1024);
        assert!(!output.is_cut());
        assert_eq!(output.render(), text);
        assert_eq!(output.last_lines(2), "line 39\nline 40");
        assert_eq!(output.last_lines(100), text);
    }

    #[test]
    fn the_start_and_the_end_are_kept_within_the_budget() {
        let max = 4096;
        let output = BoundedOutput::of(&numbered(100_000), max);
        let rendered = output.render();
        assert!(rendered.len() <= max, "{}", rendered.len());
        assert!(rendered.starts_with("line 1\nline 2\n"), "{rendered}");
        assert!(rendered.ends_with("line 99999\nline 100000"), "{rendered}");
        let marker = rendered
            .lines()
            .find(|l| l.starts_with("[… "))
            .expect("a marker");
        assert!(marker.ends_with(" bytes) left out …]"), "{marker}");
        // What is kept plus what is left out is all of it.
        let left_out: usize = marker["[… ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(rendered.lines().count() - 1 + left_out, 100_000);
        assert_eq!(output.last_lines(1), "line 100000");
    }

    #[test]
    fn long_lines_are_cut_on_character_boundaries() {
        let output = BoundedOutput::of(&"é".repeat(MAX_LINE_CHARS + 10), 1 << 20);
        let rendered = output.render();
        assert_eq!(rendered.chars().count(), MAX_LINE_CHARS + 1);
        assert!(rendered.ends_with('…'));
        // A line longer than the whole budget is cut to fit it.
        let small = BoundedOutput::of(&"x".repeat(1000), 200);
        assert!(small.render().len() <= 200, "{}", small.render().len());
    }

    #[test]
    fn reading_keeps_memory_bounded_and_lines_whole() {
        // One endless line, then a normal one.
        let mut input = "x".repeat(10 * 1024 * 1024).into_bytes();
        input.extend_from_slice(b"\n\x1b[31mred\x1b[0m\r\nlast");
        let output = BoundedOutput::read(io::Cursor::new(input), 64 * 1024).unwrap();
        let rendered = output.render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3, "{}", rendered.len());
        assert_eq!(lines[0].chars().count(), MAX_LINE_CHARS + 1);
        assert_eq!(&lines[1..], ["red", "last"]);
    }

    #[test]
    fn a_budget_too_small_for_anything_keeps_nothing_and_never_panics() {
        for max in [0, 1, 10, 80, 81] {
            let output = BoundedOutput::of(&numbered(50), max);
            assert!(output.render().len() <= max.max(MARKER_ROOM), "{max}");
        }
        assert!(BoundedOutput::new(100).render().is_empty());
    }
}
