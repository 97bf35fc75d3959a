//! One line per event, for logs and CI (stdout is not a terminal):
//! `07:15:02 worker-1 copying 1.2 MiB/3.4 MiB (3/7 paths)`.

use std::fmt::Write as _;

use procurator_proto::v1::{
    CopyProgress, Event, MachineState, MachineUpdate, RolloutHalted, VmsPlaced, WaveStarted, event,
};

use super::view::{DeploymentView, summary_label};
use crate::format;

/// `; signed by key ci-1; forced by ci/github`: what a submission's
/// provenance adds to its line (nothing for an unsigned, unforced one).
pub fn provenance(intent_keys: &[String], forced_by: &str) -> String {
    let mut out = String::new();
    if !intent_keys.is_empty() {
        let _ = write!(
            out,
            "; signed by key{} {}",
            if intent_keys.len() > 1 { "s" } else { "" },
            intent_keys.join(", ")
        );
    }
    if !forced_by.is_empty() {
        let _ = write!(out, "; forced by {forced_by}");
    }
    out
}

/// The text for one event, ending in a newline; a failure's output tail
/// follows on indented lines. `view` (with the event applied) says how many
/// machines a halt left alone.
pub fn event_text(ev: &Event, view: &DeploymentView) -> String {
    let mut out = format!("{} ", format::clock(ev.at_ms));
    match &ev.kind {
        Some(event::Kind::Submitted(s)) => {
            let _ = write!(
                out,
                "{} submitted by {}: commit {}, machines {}",
                ev.deployment_id,
                if s.submitted_by.is_empty() {
                    "?"
                } else {
                    &s.submitted_by
                },
                format::short_commit(&s.git_commit),
                s.machines.join(", ")
            );
            if !s.on.is_empty() {
                let _ = write!(out, " (on {})", s.on.join(" "));
            }
            out.push_str(&provenance(&s.intent_keys, &s.forced_by));
        }
        Some(event::Kind::Machine(u)) => out.push_str(&machine_text(u)),
        Some(event::Kind::Finished(f)) => {
            let _ = write!(out, "{} {}", ev.deployment_id, f.state().label());
            let counts = summary_counts(&f.summary);
            if !counts.is_empty() {
                let _ = write!(out, ": {counts}");
            }
        }
        Some(event::Kind::Agent(a)) => {
            if a.connected {
                let _ = write!(out, "{} connected", format::safe(&a.machine));
                if !a.current_system.is_empty() {
                    let _ = write!(out, ", running {}", format::safe(&a.current_system));
                }
            } else {
                let _ = write!(out, "{} disconnected", format::safe(&a.machine));
            }
        }
        Some(event::Kind::Certificate(c)) => out.push_str(&certificate_text(c)),
        Some(event::Kind::WaveStarted(w)) => out.push_str(&wave_text(w)),
        Some(event::Kind::VmsPlaced(p)) => out.push_str(&placed_text(p)),
        Some(event::Kind::Cancelled(c)) => out.push_str(&cancelled_text(c)),
        Some(event::Kind::Halted(h)) => {
            out.push_str(&halted_text(h));
            let left = view.left_alone();
            if left > 0 {
                let _ = write!(out, "; {}", left_text(left));
            }
        }
        None => {
            let _ = write!(
                out,
                "{} (an event this version does not know)",
                ev.deployment_id
            );
        }
    }
    out.push('\n');
    if let Some(event::Kind::Machine(u)) = &ev.kind {
        out.push_str(&indented_tail(&u.output_tail));
    }
    out
}

fn cancelled_text(c: &procurator_proto::v1::DeploymentCancelled) -> String {
    let mut text = format!("cancelled: {}", format::safe(&c.reason));
    if !c.in_flight.is_empty() {
        let names: Vec<_> = c.in_flight.iter().map(|m| format::safe(m)).collect();
        let _ = write!(text, "; told to stop: {}", names.join(", "));
    }
    text
}

/// `VMs placed: web-0 on host-a, web-1 on host-b; not placed: big (needs …)`.
pub fn placed_text(p: &VmsPlaced) -> String {
    let mut out = String::from("VMs placed: ");
    if p.placements.is_empty() {
        out.push_str("none");
    } else {
        let placed: Vec<String> = p
            .placements
            .iter()
            .map(|v| format!("{} on {}", v.instance, v.host))
            .collect();
        out.push_str(&placed.join(", "));
    }
    if !p.unplaced.is_empty() {
        let unplaced: Vec<String> = p
            .unplaced
            .iter()
            .map(|v| format!("{} ({})", v.instance, v.reason))
            .collect();
        let _ = write!(out, "; not placed: {}", unplaced.join(", "));
    }
    out
}

/// `wave 2/3 canary started: worker-1`; the index is 0-based on the wire.
pub fn wave_text(w: &WaveStarted) -> String {
    let mut out = format!("wave {}/{}", w.index + 1, w.total);
    if !w.name.is_empty() {
        let _ = write!(out, " {}", w.name);
    }
    let _ = write!(out, " started: {}", w.machines.join(", "));
    out
}

/// `rollout halted: <the server's reason> (worker-1)`.
pub fn halted_text(h: &RolloutHalted) -> String {
    let mut out = String::from("rollout halted");
    // The control plane's reason may already start with these words.
    let reason = h
        .reason
        .strip_prefix("rollout halted: ")
        .unwrap_or(&h.reason);
    if !reason.is_empty() {
        let _ = write!(out, ": {reason}");
    }
    // The reason may already name the machines; say them once.
    let unnamed: Vec<&str> = h
        .failed_machines
        .iter()
        .map(String::as_str)
        .filter(|m| !h.reason.contains(m))
        .collect();
    if !unnamed.is_empty() {
        let _ = write!(out, " ({})", unnamed.join(", "));
    }
    out
}

/// `1 machine left as it was`, `2 machines left as they were`.
pub fn left_text(n: usize) -> String {
    if n == 1 {
        "1 machine left as it was".to_owned()
    } else {
        format!("{n} machines left as they were")
    }
}

/// `worker-1 copying 1.2 MiB/3.4 MiB (3/7 paths)`,
/// `worker-1 rolled-back (checking): health check … failed: exit 1`.
pub fn machine_text(u: &MachineUpdate) -> String {
    format!(
        "{} {}",
        format::safe(&u.machine),
        state_text(u.state(), u.failed_phase(), &u.message, u.copy.as_ref())
    )
}

/// The state part of a machine's line, also used by the progress view.
pub fn state_text(
    state: MachineState,
    failed_phase: MachineState,
    message: &str,
    copy: Option<&CopyProgress>,
) -> String {
    let mut out = state.label().to_owned();
    if state == MachineState::Copying
        && let Some(c) = copy
    {
        let _ = write!(out, " {}", copy_text(c));
    }
    if failed_phase != MachineState::Unspecified {
        let _ = write!(out, " ({})", failed_phase.label());
    }
    if !message.is_empty() {
        let _ = write!(out, ": {}", format::safe(message));
    }
    out
}

/// `1.2 MiB/3.4 MiB (3/7 paths)`; parts the agent could not know are left out.
pub fn copy_text(c: &CopyProgress) -> String {
    let mut out = if c.bytes_expected > 0 {
        format!(
            "{}/{}",
            format::bytes(c.bytes_done),
            format::bytes(c.bytes_expected)
        )
    } else {
        format::bytes(c.bytes_done)
    };
    if c.paths_expected > 0 {
        let _ = write!(out, " ({}/{} paths)", c.paths_done, c.paths_expected);
    } else if c.paths_done > 0 {
        let _ = write!(out, " ({} paths)", c.paths_done);
    }
    out
}

/// `2 succeeded, 1 rolled-back`, sorted by label so the line is stable.
pub fn summary_counts(summary: &std::collections::HashMap<String, u32>) -> String {
    let mut counts: Vec<(String, u32)> = summary
        .iter()
        .map(|(k, n)| (summary_label(k), *n))
        .collect();
    counts.sort();
    counts
        .iter()
        .map(|(label, n)| format!("{n} {label}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Command output, each line indented so it reads as belonging to the line above.
pub fn indented_tail(tail: &str) -> String {
    let mut out = String::new();
    for line in tail.trim_end().lines() {
        let _ = writeln!(out, "    {}", format::safe(line));
    }
    out
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    #[test]
    fn agent_strings_cannot_move_the_cursor() {
        let forged = "done\u{1b}[1A\u{1b}[2Kworker-2 succeeded\r\nx";
        let text = state_text(
            MachineState::Failed,
            MachineState::Unspecified,
            forged,
            None,
        );
        assert_eq!(
            text,
            "failed: done\\u{1b}[1A\\u{1b}[2Kworker-2 succeeded\\u{d}\\u{a}x"
        );
        assert!(!text.chars().any(char::is_control));
        let tail = indented_tail("ok\nbad\u{1b}]0;title\u{7}");
        assert_eq!(tail, "    ok\n    bad\\u{1b}]0;title\\u{7}\n");
    }
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{
        AgentConnection, DeploymentFinished, DeploymentState, DeploymentSubmitted,
    };

    use super::*;

    /// 2025-06-01T07:15:02Z
    const AT: i64 = 1_748_762_102_000;

    fn ev(kind: event::Kind) -> Event {
        Event {
            revision: 7,
            at_ms: AT,
            deployment_id: "d-abc".into(),
            kind: Some(kind),
        }
    }

    fn event_text(ev: &Event) -> String {
        super::event_text(ev, &DeploymentView::new("d-abc"))
    }

    #[test]
    fn vm_placements_read_as_one_line() {
        let p = VmsPlaced {
            placements: vec![
                procurator_proto::v1::VmPlacement {
                    instance: "web-0".into(),
                    machine: "web".into(),
                    host: "host-a".into(),
                },
                procurator_proto::v1::VmPlacement {
                    instance: "web-1".into(),
                    machine: "web".into(),
                    host: "host-b".into(),
                },
            ],
            unplaced: vec![procurator_proto::v1::VmUnplaced {
                instance: "big".into(),
                machine: "big".into(),
                reason: "needs 64 vCPU and 65536 MiB".into(),
            }],
        };
        assert_eq!(
            placed_text(&p),
            "VMs placed: web-0 on host-a, web-1 on host-b; not placed: big (needs 64 vCPU and 65536 MiB)"
        );
        assert_eq!(placed_text(&VmsPlaced::default()), "VMs placed: none");
    }

    #[test]
    fn copying_shows_bytes_and_paths() {
        let text = event_text(&ev(event::Kind::Machine(MachineUpdate {
            machine: "worker-1".into(),
            state: MachineState::Copying as i32,
            copy: Some(CopyProgress {
                bytes_done: 1_258_291,
                bytes_expected: 3_565_158,
                paths_done: 3,
                paths_expected: 7,
            }),
            ..Default::default()
        })));
        assert_eq!(
            text,
            "07:15:02 worker-1 copying 1.2 MiB/3.4 MiB (3/7 paths)\n"
        );
    }

    #[test]
    fn copying_without_totals_shows_what_is_known() {
        let c = CopyProgress {
            bytes_done: 2048,
            bytes_expected: 0,
            paths_done: 0,
            paths_expected: 0,
        };
        assert_eq!(copy_text(&c), "2.0 KiB");
    }

    #[test]
    fn a_rollback_shows_phase_reason_and_indented_output() {
        let text = event_text(&ev(event::Kind::Machine(MachineUpdate {
            machine: "worker-1".into(),
            state: MachineState::RolledBack as i32,
            failed_phase: MachineState::Checking as i32,
            message: "health check `curl -f localhost` failed: exit status 7".into(),
            output_tail: "curl: (7) Failed to connect\nretrying\n".into(),
            ..Default::default()
        })));
        assert_eq!(
            text,
            "07:15:02 worker-1 rolled-back (checking): health check `curl -f localhost` failed: exit status 7\n\
             \x20   curl: (7) Failed to connect\n\
             \x20   retrying\n"
        );
    }

    #[test]
    fn a_plain_phase_is_just_its_label() {
        let text = event_text(&ev(event::Kind::Machine(MachineUpdate {
            machine: "worker-2".into(),
            state: MachineState::Activating as i32,
            // Copy figures are stale once copying is over.
            copy: Some(CopyProgress {
                bytes_done: 1,
                bytes_expected: 1,
                paths_done: 1,
                paths_expected: 1,
            }),
            ..Default::default()
        })));
        assert_eq!(text, "07:15:02 worker-2 activating\n");
    }

    #[test]
    fn submitted_finished_and_agent_lines() {
        let submitted = event_text(&ev(event::Kind::Submitted(DeploymentSubmitted {
            git_commit: "3f2c1a9b8e7d6c5b4a39281706f5e4d3c2b1a098".into(),
            machines: vec!["worker-1".into(), "worker-2".into()],
            submitted_by: "ci/github".into(),
            ..Default::default()
        })));
        assert_eq!(
            submitted,
            "07:15:02 d-abc submitted by ci/github: commit 3f2c1a9b8e7d, machines worker-1, worker-2\n"
        );

        let finished = event_text(&ev(event::Kind::Finished(DeploymentFinished {
            state: DeploymentState::Failed as i32,
            summary: [("SUCCEEDED".to_owned(), 2), ("ROLLED_BACK".to_owned(), 1)].into(),
        })));
        assert_eq!(
            finished,
            "07:15:02 d-abc failed: 1 rolled-back, 2 succeeded\n"
        );

        let agent = event_text(&ev(event::Kind::Agent(AgentConnection {
            machine: "worker-1".into(),
            connected: false,
            current_system: String::new(),
        })));
        assert_eq!(agent, "07:15:02 worker-1 disconnected\n");
    }

    #[test]
    fn a_wave_counts_from_one() {
        let text = event_text(&ev(event::Kind::WaveStarted(WaveStarted {
            index: 1,
            total: 3,
            name: "canary".into(),
            machines: vec!["worker-1".into()],
        })));
        assert_eq!(text, "07:15:02 wave 2/3 canary started: worker-1\n");
    }

    #[test]
    fn a_halt_names_the_failed_machines_and_what_was_left_alone() {
        let mut view = DeploymentView::new("d-abc");
        for (name, state) in [
            ("worker-1", MachineState::Failed),
            ("worker-2", MachineState::Pending),
        ] {
            view.machines.entry(name.into()).or_default().state = state;
        }
        let text = super::event_text(
            &ev(event::Kind::Halted(RolloutHalted {
                reason: "1 machine failed, the failure budget is 0".into(),
                failed_machines: vec!["worker-1".into()],
            })),
            &view,
        );
        assert_eq!(
            text,
            "07:15:02 rollout halted: 1 machine failed, the failure budget is 0 (worker-1); 1 machine left as it was\n"
        );
        assert_eq!(left_text(2), "2 machines left as they were");
    }
}

/// An enrollment, renewal, refusal or revocation, in one line.
fn certificate_text(c: &procurator_proto::v1::CertificateEvent) -> String {
    use procurator_proto::v1::certificate_event::Action;
    let who = if c.identity.is_empty() {
        format!("serial {}", format::safe(&c.serial))
    } else {
        format::safe(&c.identity).into_owned()
    };
    let serial = if c.serial.is_empty() || c.identity.is_empty() {
        String::new()
    } else {
        format!(" (serial {})", format::safe(&c.serial))
    };
    let from = if c.peer.is_empty() {
        String::new()
    } else {
        format!(" from {}", format::safe(&c.peer))
    };
    let why = format::safe(&c.reason);
    match c.action() {
        Action::Enrolled => format!("{who} enrolled{serial}{from}"),
        Action::EnrollRefused => format!("enrollment of {who} refused{from}: {why}"),
        Action::Renewed => format!("{who} renewed its certificate{serial}"),
        Action::Revoked if why.is_empty() => format!("{who} revoked"),
        Action::Revoked => format!("{who} revoked: {why}"),
        Action::JoinTokenCreated => format!("join token created for {who}, {why}"),
        Action::Unspecified => format!("certificate event for {who}"),
    }
}
