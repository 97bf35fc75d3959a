//! How results reach stdout: text for people, JSON for scripts, tables.

use std::io::Write as _;

use anyhow::Context as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: tables, live progress on a terminal.
    #[default]
    Text,
    /// For scripts: JSON (one object per line when following a deployment).
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, value_name = "FORMAT")]
    pub output: OutputFormat,
}

/// Write `text` to stdout. Rust's `print!` panics when stdout is a closed
/// pipe (`procurator-ctl status | head -1`); this returns the error instead.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// One JSON value on a line of its own.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    print(&format!("{value}\n"))
}

/// Left-aligned columns two spaces apart; the last column is not padded.
/// Cells are shown with control characters escaped (`format::safe`).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| crate::format::safe(cell).into_owned())
                .collect()
        })
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["worker-1".to_owned(), "yes".to_owned(), "x".to_owned()],
            vec!["w2".to_owned(), "no".to_owned(), "longer".to_owned()],
        ];
        assert_eq!(
            table(&["MACHINE", "CONNECTED", "LAST"], &rows),
            "MACHINE   CONNECTED  LAST\n\
             worker-1  yes        x\n\
             w2        no         longer\n"
        );
    }

    #[test]
    fn an_empty_table_is_just_its_header() {
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }
}
