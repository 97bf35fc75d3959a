//! The text printed when a followed deployment ends: its state, then the
//! machines that failed, each with its reason and output tail, then the
//! rest counted per state ("9,998 succeeded"), named only when they are few
//! or `--all` asks.

use std::fmt::Write as _;

use procurator_proto::v1::DeploymentState;

use super::SummaryStyle;
use super::plain::{indented_tail, state_text};
use super::view::{DeploymentView, MachineView};
use crate::format;

/// A state with this many machines or fewer is listed by name.
const NAMED_AT_MOST: usize = 10;

pub fn summary_text(view: &DeploymentView, style: SummaryStyle) -> String {
    let mut out = String::new();
    let _ = write!(out, "deployment {} {}", view.id, view.state.label());
    if !view.git_commit.is_empty() {
        let _ = write!(out, " (commit {})", format::short_commit(&view.git_commit));
    }
    let failed = view
        .machines
        .values()
        .filter(|m| m.state.is_failure())
        .count();
    let _ = writeln!(
        out,
        ": {} of {} machines ok, {} failed",
        format::thousands(
            view.machines
                .values()
                .filter(|m| m.state.is_success())
                .count()
        ),
        format::thousands(view.machines.len()),
        format::thousands(failed)
    );
    if !view.rollback_of.is_empty() {
        let _ = writeln!(out, "  rollback of {}", view.rollback_of);
    }
    let provenance = super::plain::provenance(&view.intent_keys, &view.forced_by);
    if let Some(rest) = provenance.strip_prefix("; ") {
        let _ = writeln!(out, "  {}", rest.replace("; ", "\n  "));
    }
    if !view.halted_reason.is_empty() {
        let what = if view.state == DeploymentState::Cancelled {
            "cancelled"
        } else {
            "halted"
        };
        let _ = write!(out, "  {what}: {}", view.halted_reason);
        if !view.halted_machines.is_empty() {
            let _ = write!(out, " ({})", view.halted_machines.join(", "));
        }
        out.push('\n');
    }
    let mut machines: Vec<(&String, &MachineView)> = view.machines.iter().collect();
    machines.sort_by(|a, b| format::natural_order(a.0, b.0));
    // Failures first, whole: what the operator came for.
    let (failed, rest): (Vec<_>, Vec<_>) = machines
        .into_iter()
        .partition(|(_, m)| m.state.is_failure());
    let listed: Vec<(&String, &MachineView)> = if style.all {
        failed.iter().chain(&rest).copied().collect()
    } else {
        // Also listed by name: a machine still in flight (the deployment
        // ended without it) and a reboot someone has to do.
        failed
            .iter()
            .chain(
                rest.iter()
                    .filter(|(_, m)| !m.state.is_final() || m.reboot_required),
            )
            .copied()
            .collect()
    };
    let width = listed
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0);
    for (name, m) in &listed {
        // A failure's reason is what the operator came for; a success's last
        // message ("committed") is noise.
        let message = if m.state.is_failure() || !m.state.is_final() {
            m.message.as_str()
        } else {
            ""
        };
        let _ = write!(
            out,
            "  {:<width$}  {}",
            format::safe(name),
            state_text(m.state, m.failed_phase, message, None)
        );
        if m.reboot_required {
            out.push_str(&reboot_text(&m.message));
        }
        out.push('\n');
        if m.state.is_failure() {
            for line in indented_tail(&m.output_tail).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    if !style.all {
        let unlisted: Vec<(&String, &MachineView)> = rest
            .iter()
            .filter(|(name, _)| !listed.iter().any(|(l, _)| l == name))
            .copied()
            .collect();
        out.push_str(&counted(&unlisted));
    }
    out
}

/// `  9,998 succeeded (--all lists them)` or `  2 succeeded: a, b`, per
/// state, for the machines that did not fail.
fn counted(rest: &[(&String, &MachineView)]) -> String {
    let mut out = String::new();
    for state in procurator_proto::v1::MachineState::ALL {
        let names: Vec<&str> = rest
            .iter()
            .filter(|(_, m)| m.state == state && m.state.is_final())
            .map(|(n, _)| n.as_str())
            .collect();
        match names.len() {
            0 => {}
            n if n <= NAMED_AT_MOST => {
                let named: Vec<String> =
                    names.iter().map(|n| format::safe(n).into_owned()).collect();
                let _ = writeln!(out, "  {n} {}: {}", state.label(), named.join(", "));
            }
            n => {
                let _ = writeln!(
                    out,
                    "  {} {} (--all lists them)",
                    format::thousands(n),
                    state.label()
                );
            }
        }
    }
    out
}

/// `, reboot required: kernel, initrd`. What differs comes in the machine's
/// last message when the control plane passes it on; it is left out when not.
fn reboot_text(message: &str) -> String {
    let what = message
        .strip_prefix("reboot required")
        .map(|rest| rest.trim_start_matches(':').trim())
        .unwrap_or_default();
    if what.is_empty() {
        ", reboot required".to_owned()
    } else {
        format!(", reboot required: {what}")
    }
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::MachineState;

    use super::*;
    use crate::render::view::MachineView;

    #[test]
    fn failures_carry_reason_and_output_tail() {
        let mut view = DeploymentView::new("d-abc");
        view.git_commit = "3f2c1a9b8e7d6c5b".into();
        view.state = DeploymentState::Failed;
        view.machines.insert(
            "worker-1".into(),
            MachineView {
                state: MachineState::Succeeded,
                message: "committed".into(),
                ..Default::default()
            },
        );
        view.machines.insert(
            "w2".into(),
            MachineView {
                state: MachineState::RolledBack,
                failed_phase: MachineState::Checking,
                message: "health check `true` failed".into(),
                output_tail: "line 1\nline 2".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            summary_text(&view, SummaryStyle::default()),
            "deployment d-abc failed (commit 3f2c1a9b8e7d): 1 of 2 machines ok, 1 failed\n\
             \x20 w2  rolled-back (checking): health check `true` failed\n\
             \x20     line 1\n\
             \x20     line 2\n\
             \x20 1 succeeded: worker-1\n"
        );
    }

    #[test]
    fn a_halt_says_why_and_reboots_are_named() {
        let mut view = DeploymentView::new("d-abc");
        view.state = DeploymentState::Halted;
        view.halted_reason = "1 machine failed, the failure budget is 0".into();
        view.halted_machines = vec!["w2".into()];
        view.rollback_of = "d-old".into();
        view.machines.insert(
            "worker-1".into(),
            MachineView {
                state: MachineState::Succeeded,
                message: "reboot required: kernel, initrd".into(),
                reboot_required: true,
                ..Default::default()
            },
        );
        view.machines.insert(
            "w2".into(),
            MachineView {
                state: MachineState::Failed,
                failed_phase: MachineState::Copying,
                message: "no such path".into(),
                ..Default::default()
            },
        );
        view.machines.insert(
            "w3".into(),
            MachineView {
                state: MachineState::Succeeded,
                reboot_required: true,
                ..Default::default()
            },
        );
        assert_eq!(
            summary_text(&view, SummaryStyle::default()),
            "deployment d-abc halted: 2 of 3 machines ok, 1 failed\n\
             \x20 rollback of d-old\n\
             \x20 halted: 1 machine failed, the failure budget is 0 (w2)\n\
             \x20 w2        failed (copying): no such path\n\
             \x20 w3        succeeded, reboot required\n\
             \x20 worker-1  succeeded, reboot required: kernel, initrd\n"
        );
    }

    #[test]
    fn a_large_fleet_shows_its_failures_and_counts_the_rest_unless_all_is_asked() {
        let mut view = DeploymentView::new("d-1");
        view.state = DeploymentState::Failed;
        for i in 0..12_000 {
            view.machines.insert(
                format!("m-{i}"),
                MachineView {
                    state: MachineState::Succeeded,
                    ..Default::default()
                },
            );
        }
        for name in ["m-10", "m-2"] {
            view.machines.insert(
                name.into(),
                MachineView {
                    state: MachineState::RolledBack,
                    failed_phase: MachineState::Checking,
                    message: "unhealthy".into(),
                    ..Default::default()
                },
            );
        }
        assert_eq!(
            summary_text(&view, SummaryStyle::default()),
            "deployment d-1 failed: 11,998 of 12,000 machines ok, 2 failed\n\
             \x20 m-2   rolled-back (checking): unhealthy\n\
             \x20 m-10  rolled-back (checking): unhealthy\n\
             \x20 11,998 succeeded (--all lists them)\n"
        );
        let all = summary_text(&view, SummaryStyle { all: true });
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 1 + 12_000, "one line per machine");
        assert!(lines[1].starts_with("  m-2 ") && lines[2].starts_with("  m-10 "));
        assert!(lines[3].starts_with("  m-0 ") && lines[4].starts_with("  m-1 "));
        assert!(
            lines[5].starts_with("  m-3 "),
            "natural order: {}",
            lines[5]
        );
    }
}
