//! The text printed when a followed deployment ends: its state, then each
//! machine's final state, and for failures the reason and the output tail.

use std::fmt::Write as _;

use procurator_proto::v1::DeploymentState;

use super::plain::{indented_tail, state_text};
use super::view::DeploymentView;
use crate::format;

pub fn summary_text(view: &DeploymentView) -> String {
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
        ": {} of {} machines ok, {failed} failed",
        view.machines
            .values()
            .filter(|m| m.state.is_success())
            .count(),
        view.machines.len()
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
    let width = view.name_width();
    for (name, m) in &view.machines {
        // A failure's reason is what the operator came for; a success's last
        // message ("committed") is noise.
        let message = if m.state.is_failure() || !m.state.is_final() {
            m.message.as_str()
        } else {
            ""
        };
        let _ = write!(
            out,
            "  {name:<width$}  {}",
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
            summary_text(&view),
            "deployment d-abc failed (commit 3f2c1a9b8e7d): 1 of 2 machines ok, 1 failed\n\
             \x20 w2        rolled-back (checking): health check `true` failed\n\
             \x20     line 1\n\
             \x20     line 2\n\
             \x20 worker-1  succeeded\n"
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
            summary_text(&view),
            "deployment d-abc halted: 2 of 3 machines ok, 1 failed\n\
             \x20 rollback of d-old\n\
             \x20 halted: 1 machine failed, the failure budget is 0 (w2)\n\
             \x20 w2        failed (copying): no such path\n\
             \x20 w3        succeeded, reboot required\n\
             \x20 worker-1  succeeded, reboot required: kernel, initrd\n"
        );
    }
}
