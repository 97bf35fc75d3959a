//! Reading `nix --log-format internal-json` output: copy progress and the
//! error lines worth showing a human.
//!
//! What Nix reports differs between versions. Measured with Nix 2.8:
//! - `copyPaths` (103) starts twice; the second start says "copying N paths"
//!   and it never reports progress;
//! - `copyPath` (100) starts and stops once per path, without progress;
//! - only file transfers (101) report bytes: `[done, expected, 0, 0]` per URL,
//!   so bytes come from the transfers of NARs (`.../nar/...`), and a `file://`
//!   cache reports no bytes at all.
//!
//! Newer Nix reports `[done, expected, running, failed]` paths on the 103
//! activity and bytes on each 100 activity (in ~8 KiB steps, none for small
//! paths); both are understood too.
//!
//! So that the bytes add up on every cache and Nix, the caller may give
//! each missing path's NAR size (from its narinfo, [`CopyTracker::expecting`]):
//! a path then counts whole when its copy ends.

use std::collections::{HashMap, VecDeque};

use serde::Deserialize;
use serde_json::Value;

/// The prefix of every structured line on stderr.
const PREFIX: &str = "@nix ";

const ACT_COPY_PATH: u64 = 100;
const ACT_FILE_TRANSFER: u64 = 101;
const ACT_COPY_PATHS: u64 = 103;
const RES_PROGRESS: u64 = 105;
const RES_SET_EXPECTED: u64 = 106;

/// Error and warning levels of `msg` lines (lvlError = 0, lvlWarn = 1).
const MAX_KEPT_LEVEL: u64 = 1;

/// How far a `nix copy` got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyProgress {
    pub bytes_done: u64,
    pub bytes_expected: u64,
    pub paths_done: u64,
    pub paths_expected: u64,
}

#[derive(Debug, Deserialize)]
struct RawLine {
    action: String,
    #[serde(default)]
    id: u64,
    #[serde(default, rename = "type")]
    kind: u64,
    #[serde(default)]
    level: u64,
    #[serde(default)]
    text: String,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    fields: Vec<Value>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    kind: u64,
    /// A file transfer that fetches a NAR (not a `.narinfo` or `nix-cache-info`).
    nar: bool,
    done: u64,
    expected: u64,
}

/// Follows the stderr of one `nix copy`, line by line.
#[derive(Debug)]
pub struct CopyTracker {
    activities: HashMap<u64, Activity>,
    paths_stopped: u64,
    paths_announced: u64,
    paths_reported: (u64, u64),
    bytes_expected_hint: u64,
    /// NAR sizes of the paths to copy, by path, when the caller knew them.
    sizes: HashMap<String, u64>,
    /// The path each running copy-path activity copies.
    copying: HashMap<u64, String>,
    /// The NAR sizes of the paths whose copy ended.
    bytes_of_copied: u64,
    messages: VecDeque<String>,
    max_messages: usize,
}

impl CopyTracker {
    /// Keeps at most `max_messages` lines of error text.
    pub fn new(max_messages: usize) -> Self {
        Self {
            activities: HashMap::new(),
            paths_stopped: 0,
            paths_announced: 0,
            paths_reported: (0, 0),
            bytes_expected_hint: 0,
            sizes: HashMap::new(),
            copying: HashMap::new(),
            bytes_of_copied: 0,
            messages: VecDeque::new(),
            max_messages,
        }
    }

    /// The NAR size of each path the copy is expected to fetch.
    pub fn expecting(mut self, sizes: HashMap<String, u64>) -> Self {
        self.sizes = sizes;
        self
    }

    /// Takes one line of stderr; returns whether the progress may have changed.
    pub fn feed(&mut self, line: &str) -> bool {
        let Some(json) = line.strip_prefix(PREFIX) else {
            let text = strip_ansi(line);
            if !text.trim().is_empty() {
                self.keep_message(text);
            }
            return false;
        };
        let Ok(raw) = serde_json::from_str::<RawLine>(json) else {
            self.keep_message(strip_ansi(line));
            return false;
        };
        match raw.action.as_str() {
            "start" => self.start(&raw),
            "stop" => self.stop(raw.id),
            "result" => self.result(&raw),
            "msg" => {
                if raw.level <= MAX_KEPT_LEVEL {
                    for l in strip_ansi(&raw.msg)
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                    {
                        self.keep_message(l.to_owned());
                    }
                }
                false
            }
            _ => false,
        }
    }

    fn start(&mut self, raw: &RawLine) -> bool {
        let nar = raw.kind == ACT_FILE_TRANSFER
            && raw
                .fields
                .first()
                .and_then(Value::as_str)
                .is_some_and(|url| url.contains("/nar/"));
        self.activities.insert(
            raw.id,
            Activity {
                kind: raw.kind,
                nar,
                ..Activity::default()
            },
        );
        if raw.kind == ACT_COPY_PATH
            && let Some(path) = raw.fields.first().and_then(Value::as_str)
        {
            self.copying.insert(raw.id, path.to_owned());
        }
        if raw.kind == ACT_COPY_PATHS
            && let Some(n) = parse_copying_n_paths(&raw.text)
        {
            self.paths_announced = self.paths_announced.max(n);
            return true;
        }
        false
    }

    fn stop(&mut self, id: u64) -> bool {
        match self.activities.get(&id) {
            Some(a) if a.kind == ACT_COPY_PATH => {
                self.paths_stopped += 1;
                if let Some(path) = self.copying.remove(&id) {
                    // Taken out: a path counts once, however often it is reported.
                    self.bytes_of_copied += self.sizes.remove(&path).unwrap_or(0);
                }
                true
            }
            _ => false,
        }
    }

    fn result(&mut self, raw: &RawLine) -> bool {
        let numbers: Vec<u64> = raw.fields.iter().map(|v| v.as_u64().unwrap_or(0)).collect();
        let Some(activity) = self.activities.get_mut(&raw.id) else {
            return false;
        };
        match (raw.kind, numbers.as_slice()) {
            (RES_PROGRESS, [done, expected, ..]) => {
                if activity.kind == ACT_COPY_PATHS {
                    self.paths_reported = (*done, *expected);
                } else {
                    activity.done = *done;
                    activity.expected = *expected;
                }
                true
            }
            (RES_SET_EXPECTED, [kind, expected, ..]) if *kind == ACT_COPY_PATH => {
                self.bytes_expected_hint = self.bytes_expected_hint.max(*expected);
                true
            }
            _ => false,
        }
    }

    fn keep_message(&mut self, line: String) {
        if self.max_messages == 0 {
            return;
        }
        if self.messages.len() == self.max_messages {
            self.messages.pop_front();
        }
        self.messages.push_back(line);
    }

    /// The progress so far.
    pub fn progress(&self) -> CopyProgress {
        let sum = |pick: fn(&Activity) -> bool| {
            self.activities
                .values()
                .filter(|a| pick(a))
                .fold((0u64, 0u64), |(d, e), a| {
                    (d.saturating_add(a.done), e.saturating_add(a.expected))
                })
        };
        let per_path = sum(|a| a.kind == ACT_COPY_PATH);
        let transfers = sum(|a| a.nar);
        // The two sources describe the same bytes: take the one that says more
        // rather than adding them up.
        let (bytes_done, bytes_expected) = if per_path.1 >= transfers.1 {
            per_path
        } else {
            transfers
        };
        let paths_expected = self.paths_announced.max(self.paths_reported.1);
        let paths_done = self.paths_stopped.max(self.paths_reported.0);
        // What the narinfos said: the paths copied whole, and all of them.
        let bytes_done = bytes_done.max(self.bytes_of_copied);
        let sized = self.bytes_of_copied + self.sizes.values().sum::<u64>();
        CopyProgress {
            bytes_done,
            bytes_expected: bytes_expected
                .max(self.bytes_expected_hint)
                .max(sized)
                .max(bytes_done),
            paths_done: if paths_expected > 0 {
                paths_done.min(paths_expected)
            } else {
                paths_done
            },
            paths_expected,
        }
    }

    /// The error lines seen so far, oldest first, colour removed.
    pub fn messages(&self) -> String {
        self.messages
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_copying_n_paths(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("copying ")?;
    let (n, what) = rest.split_once(' ')?;
    what.starts_with("path").then_some(())?;
    n.parse().ok()
}

/// Removes ANSI escape sequences (colours, cursor movement) from `s`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates, then one final byte in @..~.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // OSC: up to BEL or ESC \.
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // Any other escape is two characters long.
            _ => {}
        }
    }
    out
}

#[cfg(test)]
#[path = "progress_tests.rs"]
mod tests;
