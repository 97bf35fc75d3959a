//! What the live view shows, as lines that fit a terminal of a given size:
//! a header (deployment, wave, elapsed), an overall bar with totals, the
//! count per state, then one row per machine that failed or is in flight —
//! failed first, each group in natural order — as many as fit, and a line
//! saying how many did not.

use std::fmt::Write as _;

use procurator_proto::v1::{CopyProgress, MachineState};

use super::view::{DeploymentView, MachineView};
use crate::format;

const SPINNER: [char; 4] = ['|', '/', '-', '\\'];

/// The lines to draw, each at most `cols - 1` wide (the last column would
/// wrap on some terminals), at most `rows - 1` of them (so nothing scrolls).
pub fn frame(
    view: &DeploymentView,
    now_ms: i64,
    rows: usize,
    cols: usize,
    tick: usize,
) -> Vec<String> {
    let width = cols.saturating_sub(1).max(1);
    let height = rows.saturating_sub(1).max(1);
    let mut lines = vec![header(view, now_ms), totals(view, width), breakdown(view)];

    let mut failed: Vec<(&String, &MachineView)> = Vec::new();
    let mut in_flight: Vec<(&String, &MachineView)> = Vec::new();
    for (name, m) in &view.machines {
        if m.state.is_failure() {
            failed.push((name, m));
        } else if !m.state.is_final() && m.state != MachineState::Pending {
            in_flight.push((name, m));
        }
    }
    failed.sort_by(|a, b| format::natural_order(a.0, b.0));
    in_flight.sort_by(|a, b| format::natural_order(a.0, b.0));

    let shown = failed.len() + in_flight.len();
    // Room for the rows below the header lines and the column titles; one
    // more line says what did not fit.
    let room = height.saturating_sub(lines.len() + 1);
    if shown > 0 && room > 0 {
        let fits = if shown <= room { shown } else { room - 1 };
        let listed: Vec<&(&String, &MachineView)> =
            failed.iter().chain(&in_flight).take(fits).collect();
        let widest = |width: &dyn Fn(&(&String, &MachineView)) -> usize| {
            listed.iter().map(|r| width(r)).max().unwrap_or(0)
        };
        let name_width = widest(&|(n, _)| n.chars().count()).max("MACHINE".len());
        let phase_width = widest(&|(_, m)| phase(m).chars().count());
        let widths = (name_width, phase_width);
        lines.push(format!(
            "{:<name_width$}  {:<phase_width$}  {:>7}  DETAIL",
            "MACHINE", "PHASE", "ELAPSED"
        ));
        for (name, m) in listed {
            lines.push(row(name, m, widths, now_ms, tick, width));
        }
        if fits < shown {
            let hidden_failed = failed.len().saturating_sub(fits);
            let hidden_flying = shown - fits - hidden_failed;
            let mut parts = Vec::new();
            if hidden_failed > 0 {
                parts.push(format!("{hidden_failed} more failed"));
            }
            if hidden_flying > 0 {
                parts.push(format!("{hidden_flying} more in flight"));
            }
            lines.push(format!(
                "… {} (`procurator-ctl deployments {}` lists every machine)",
                parts.join(", "),
                view.id
            ));
        }
    }
    lines.truncate(height);
    lines.iter().map(|l| fit(l, width)).collect()
}

/// `deployment d-… · commit 3f2c1a9b8e7d · wave 2/3 canary · 1m12s`.
fn header(view: &DeploymentView, now_ms: i64) -> String {
    let mut out = format!("deployment {}", view.id);
    if !view.git_commit.is_empty() {
        let _ = write!(out, " · commit {}", format::short_commit(&view.git_commit));
    }
    if !view.rollback_of.is_empty() {
        let _ = write!(out, " · rollback of {}", view.rollback_of);
    }
    if let Some(w) = &view.wave {
        let _ = write!(out, " · wave {}/{}", w.index + 1, w.total);
        if !w.name.is_empty() {
            let _ = write!(out, " {}", w.name);
        }
    }
    if view.created_ms != 0 {
        let _ = write!(out, " · {}", format::span(now_ms - view.created_ms));
    }
    if view.finished {
        let _ = write!(out, " · {}", view.state.label());
    }
    out
}

/// `[#########-----------]  41/60 ok · 2 failed · 5 in flight · 12 pending`.
fn totals(view: &DeploymentView, width: usize) -> String {
    let total = view.machines.len();
    let count = |pick: fn(&MachineView) -> bool| view.machines.values().filter(|m| pick(m)).count();
    let ok = count(|m| m.state.is_success());
    let failed = count(|m| m.state.is_failure());
    let pending = count(|m| m.state == MachineState::Pending);
    let finished = count(|m| m.state.is_final());
    let in_flight = total - finished - pending;
    let mut text = format!(
        "{}/{} ok · {} failed",
        format::thousands(ok),
        format::thousands(total),
        format::thousands(failed)
    );
    if in_flight > 0 {
        let _ = write!(text, " · {} in flight", format::thousands(in_flight));
    }
    if pending > 0 {
        let _ = write!(text, " · {} pending", format::thousands(pending));
    }
    let others = finished - ok - failed;
    if others > 0 {
        let _ = write!(text, " · {} other", format::thousands(others));
    }
    let bar_width = (width / 3).clamp(10, 40);
    format!("{}  {text}", bar(finished as u64, total as u64, bar_width))
}

/// `2 copying · 3 activating · 41 succeeded · 2 rolled-back`, in the order
/// states come in a deployment.
fn breakdown(view: &DeploymentView) -> String {
    let parts: Vec<String> = MachineState::ALL
        .iter()
        .filter_map(|state| {
            let n = view.machines.values().filter(|m| m.state == *state).count();
            (n > 0).then(|| format!("{} {}", format::thousands(n), state.label()))
        })
        .collect();
    if parts.is_empty() {
        "no machine yet".to_owned()
    } else {
        parts.join(" · ")
    }
}

/// `rolled-back (checking)`: the state, and for a failure the phase that failed.
fn phase(m: &MachineView) -> String {
    if m.state.is_failure() && m.failed_phase != MachineState::Unspecified {
        format!("{} ({})", m.state.label(), m.failed_phase.label())
    } else {
        m.state.label().to_owned()
    }
}

fn row(
    name: &str,
    m: &MachineView,
    (name_width, phase_width): (usize, usize),
    now_ms: i64,
    tick: usize,
    width: usize,
) -> String {
    let phase = phase(m);
    let elapsed = m
        .elapsed_ms(now_ms)
        .map_or_else(|| "-".to_owned(), format::span);
    let mark = if m.state.is_failure() {
        '✘'
    } else {
        SPINNER[tick % SPINNER.len()]
    };
    let lead = format!("{name:<name_width$}  {phase:<phase_width$}  {elapsed:>7}  {mark} ");
    let room = width.saturating_sub(lead.chars().count());
    let detail = match (&m.copy, m.state) {
        (Some(copy), MachineState::Copying) => copy_detail(copy, room),
        _ if m.state.is_failure() => failure_detail(m),
        _ => format::safe(&m.message).into_owned(),
    };
    format!("{lead}{detail}")
}

/// `[=====>    ] 45% 12.3 MiB/27.0 MiB (3/7 paths)`.
fn copy_detail(copy: &CopyProgress, room: usize) -> String {
    let text = super::plain::copy_text(copy);
    if copy.bytes_expected == 0 {
        return format!("copying {text}");
    }
    let percent = copy.bytes_done.saturating_mul(100) / copy.bytes_expected.max(1);
    // `[` `]`, a space, `100%`, a space, then the figures.
    let bar_width = room.saturating_sub(text.chars().count() + 8).min(24);
    if bar_width < 5 {
        return format!("{percent:>3}% {text}");
    }
    format!(
        "{} {percent:>3}% {text}",
        bar(copy.bytes_done, copy.bytes_expected, bar_width)
    )
}

/// The reason, and the last line of the output when there is one.
fn failure_detail(m: &MachineView) -> String {
    let mut out = format::safe(&m.message).into_owned();
    if let Some(last) = m.output_tail.lines().rev().find(|l| !l.trim().is_empty()) {
        let _ = write!(out, " | {}", format::safe(last.trim()));
    }
    out
}

/// `[=====>    ]`, `width` characters inside the brackets.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = done
        .min(total)
        .saturating_mul(width as u64)
        .checked_div(total)
        .map_or(0, |n| usize::try_from(n).unwrap_or(width));
    let mut out = String::with_capacity(width + 2);
    out.push('[');
    out.push_str(&"=".repeat(filled));
    if filled < width {
        out.push(if filled > 0 { '>' } else { ' ' });
        out.push_str(&" ".repeat(width - filled - 1));
    }
    out.push(']');
    out
}

/// At most `width` columns, with `…` when cut.
fn fit(line: &str, width: usize) -> String {
    if console::measure_text_width(line) <= width {
        line.to_owned()
    } else {
        console::truncate_str(line, width, "…").into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> DeploymentView {
        let mut view = DeploymentView::new("d-1");
        view.git_commit = "3f2c1a9b8e7d6c5b4a39".into();
        view.created_ms = 1_000;
        for i in 0..n {
            let state = match i % 10 {
                0 => MachineState::Copying,
                1 => MachineState::Activating,
                2 if i < 20 => MachineState::RolledBack,
                3 | 4 => MachineState::Pending,
                _ => MachineState::Succeeded,
            };
            view.machines.insert(
                format!("m-{i}"),
                MachineView {
                    state,
                    since_ms: 1_000,
                    message: format!("message of m-{i}"),
                    copy: (state == MachineState::Copying).then_some(CopyProgress {
                        bytes_done: 512,
                        bytes_expected: 1024,
                        paths_done: 1,
                        paths_expected: 2,
                    }),
                    ..Default::default()
                },
            );
        }
        view
    }

    #[test]
    fn it_never_has_more_lines_than_the_terminal_nor_wider_ones() {
        let view = fleet(60);
        for (rows, cols) in [(24, 80), (50, 200), (5, 20), (1, 1), (3, 200)] {
            let lines = frame(&view, 73_000, rows, cols, 0);
            assert!(
                lines.len() <= rows.saturating_sub(1).max(1),
                "{rows}x{cols}: {lines:#?}"
            );
            for l in &lines {
                assert!(
                    console::measure_text_width(l) < cols.max(2),
                    "{rows}x{cols}: {l:?}"
                );
            }
        }
    }

    #[test]
    fn totals_count_every_machine_and_failures_come_first_in_natural_order() {
        let view = fleet(60);
        let lines = frame(&view, 73_000, 24, 80, 0);
        assert_eq!(lines[0], "deployment d-1 · commit 3f2c1a9b8e7d · 1m12s");
        // 60: 6 copying, 6 activating, 2 rolled back, 12 pending, 34 succeeded.
        assert!(
            lines[1].ends_with("34/60 ok · 2 failed · 12 in flight · 12 pending"),
            "{}",
            lines[1]
        );
        assert_eq!(
            lines[2],
            "12 pending · 6 copying · 6 activating · 34 succeeded · 2 rolled-back"
        );
        let names: Vec<&str> = lines[4..]
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(&names[..4], ["m-2", "m-12", "m-0", "m-1"], "{lines:#?}");
        assert!(
            lines[4].contains("rolled-back") && lines[4].contains("1m12s"),
            "{}",
            lines[4]
        );
        assert!(
            lines[6].contains("[") && lines[6].contains("50% 512 B/1.0 KiB (1/2 paths)"),
            "{}",
            lines[6]
        );
        // 14 rows, 19 room: all shown.
        assert_eq!(lines.len(), 4 + 14);

        let short = frame(&view, 73_000, 10, 80, 0);
        assert_eq!(short.len(), 9);
        assert!(
            short[4].starts_with("m-2 ") && short[5].starts_with("m-12 "),
            "{short:#?}"
        );
        assert_eq!(
            short[8],
            "… 10 more in flight (`procurator-ctl deployments d-1` lists every machine)"
        );
    }

    #[test]
    fn numbers_and_bars_read_at_a_glance() {
        assert_eq!(bar(0, 0, 4), "[    ]");
        assert_eq!(bar(1, 2, 4), "[==> ]");
        assert_eq!(bar(2, 2, 4), "[====]");
        assert_eq!(fit("abcdef", 4), "abc…");
    }
}
