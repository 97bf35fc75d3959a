//! The rollout scheduler: which machines of a deployment get their desired
//! state now, which waves start, when a machine counts as unreachable and
//! when the rollout halts. A pure function of the deployment's rows, who is
//! connected and the time, so a restarted control plane derives the same
//! schedule from its store (docs/rollouts.md, "Waves, budget, halting").

use procurator_proto::v1::MachineState;

/// One machine's row as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub machine: String,
    pub wave: u32,
    pub state: MachineState,
    /// `None` while an agent is connected; otherwise since when (Unix ms)
    /// none has been, 0 when none ever was.
    pub disconnected_since: Option<i64>,
}

/// The rollout settings that shape the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// 0: no limit.
    pub max_in_flight: u32,
    pub failure_budget: u32,
    pub unreachable_after_ms: i64,
}

/// What the store remembers about the rollout's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The highest wave that has started, if any.
    pub started_wave: Option<u32>,
    pub wave_started_ms: i64,
    /// Halted or cancelled: nothing more is sent.
    pub stopped: bool,
    /// When this control plane opened its store: it cannot know whether an
    /// agent was connected before that, so no offline time counts from earlier.
    pub opened_ms: i64,
}

/// One decision, applied by the store in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The wave becomes current (its start time is `now`).
    WaveStarted(u32),
    /// No agent for `secs` seconds: the row ends UNREACHABLE.
    Unreachable { machine: String, secs: i64 },
    /// More failures than the budget: the machines that used it up.
    Halted { failed: Vec<String> },
    /// A row never sent, left as it is because the rollout halted.
    Cancel(String),
    /// PENDING -> SENT: send the machine its desired state.
    Send(String),
}

/// Whether the machine holds a desired state it has not finished. Every
/// state is exactly one of: not yet sent (PENDING), in flight, or final
/// (`MachineState::is_final`).
pub fn is_in_flight(state: MachineState) -> bool {
    is_confirmable(state) || matches!(state, MachineState::Committing | MachineState::RollingBack)
}

/// Whether the machine was sent its desired state and has not yet been
/// confirmed past CONFIRMING: the rows `Confirm` may answer.
pub fn is_confirmable(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Sent
            | MachineState::Copying
            | MachineState::Activating
            | MachineState::Checking
            | MachineState::Confirming
    )
}

/// Decide what happens next, given the rows in machine-name order.
pub fn schedule(rows: &[Row], limits: Limits, progress: Progress, now: i64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rows = rows.to_vec();
    let mut started = progress.started_wave;
    let mut wave_start = progress.wave_started_ms;
    // Saturating: timestamps come from clocks that can step.
    let offline_for = |since: i64, wave_start: i64| {
        now.saturating_sub(since.max(wave_start).max(progress.opened_ms))
    };
    if progress.stopped {
        // Nothing more is sent, but a machine in flight whose agent is gone
        // must still end, or the deployment would never finish.
        for row in rows.iter().filter(|r| is_in_flight(r.state)) {
            if let Some(since) = row.disconnected_since
                && offline_for(since, wave_start) >= limits.unreachable_after_ms
            {
                steps.push(Step::Unreachable {
                    machine: row.machine.clone(),
                    secs: offline_for(since, wave_start) / 1000,
                });
            }
        }
        return steps;
    }
    loop {
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.state.is_failure())
            .map(|r| r.machine.clone())
            .collect();
        // With nothing left to hold back, a failure is just a failure: the
        // deployment ends FAILED, not HALTED.
        let holding = rows.iter().any(|r| r.state == MachineState::Pending);
        if failed.len() > limits.failure_budget as usize && holding {
            steps.push(Step::Halted { failed });
            // Machines in flight finish (or roll back) on their own.
            steps.extend(
                rows.iter()
                    .filter(|r| r.state == MachineState::Pending)
                    .map(|r| Step::Cancel(r.machine.clone())),
            );
            return steps;
        }
        let Some(current) = rows
            .iter()
            .filter(|r| !r.state.is_final())
            .map(|r| r.wave)
            .min()
        else {
            return steps;
        };
        if started.is_none_or(|s| current > s) {
            started = Some(current);
            wave_start = now;
            steps.push(Step::WaveStarted(current));
        }
        let mut changed = false;
        for row in rows
            .iter_mut()
            .filter(|r| r.wave == current && !r.state.is_final())
        {
            let Some(since) = row.disconnected_since else {
                continue;
            };
            let offline = offline_for(since, wave_start);
            if offline >= limits.unreachable_after_ms {
                row.state = MachineState::Unreachable;
                steps.push(Step::Unreachable {
                    machine: row.machine.clone(),
                    secs: offline / 1000,
                });
                changed = true;
            }
        }
        if changed {
            // The budget or the current wave may have changed.
            continue;
        }
        let in_flight = rows.iter().filter(|r| is_in_flight(r.state)).count();
        let room = match limits.max_in_flight {
            0 => usize::MAX,
            n => (n as usize).saturating_sub(in_flight),
        };
        steps.extend(
            rows.iter()
                .filter(|r| {
                    r.wave == current
                        && r.state == MachineState::Pending
                        && r.disconnected_since.is_none()
                })
                .take(room)
                .map(|r| Step::Send(r.machine.clone())),
        );
        return steps;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState::*;

    const LIMITS: Limits = Limits {
        max_in_flight: 0,
        failure_budget: 0,
        unreachable_after_ms: 300_000,
    };
    const FRESH: Progress = Progress {
        started_wave: None,
        wave_started_ms: 0,
        stopped: false,
        opened_ms: 0,
    };

    /// Found by the `rollout` fuzz target: an offline time past i64's range
    /// overflowed.
    #[test]
    fn any_timestamps_are_survived() {
        let mut rows = vec![row("a", 0, Pending, true), row("b", 0, Sent, false)];
        // Offline since the far future, seen from the far past: not offline.
        rows[1].disconnected_since = Some(i64::MAX);
        let steps = schedule(&rows, LIMITS, FRESH, i64::MIN);
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Unreachable { .. })),
            "{steps:?}"
        );
        // And the other way round: offline for as long as there is.
        rows[1].disconnected_since = Some(i64::MIN);
        let started = Progress {
            started_wave: Some(0),
            wave_started_ms: i64::MIN,
            ..FRESH
        };
        let steps = schedule(&rows, LIMITS, started, i64::MAX);
        assert!(
            steps.contains(&Step::Unreachable {
                machine: "b".into(),
                secs: i64::MAX / 1000
            }),
            "{steps:?}"
        );
    }

    #[test]
    fn every_state_is_exactly_one_of_unsent_in_flight_or_final() {
        for n in 0..=i32::from(u8::MAX) {
            let Ok(state) = MachineState::try_from(n) else {
                continue;
            };
            let unsent = matches!(state, Unspecified | Pending);
            let kinds = [unsent, is_in_flight(state), state.is_final()];
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{state:?}");
            // A failure is a way of being final.
            assert!(!state.is_failure() || state.is_final(), "{state:?}");
        }
    }

    fn row(machine: &str, wave: u32, state: MachineState, connected: bool) -> Row {
        Row {
            machine: machine.into(),
            wave,
            state,
            disconnected_since: (!connected).then_some(0),
        }
    }

    fn sends(steps: &[Step]) -> Vec<&str> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Send(m) => Some(m.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_wave_starts_and_only_its_connected_machines_are_sent() {
        let rows = [
            row("a", 0, Pending, true),
            row("b", 0, Pending, false),
            row("c", 1, Pending, true),
        ];
        let steps = schedule(&rows, LIMITS, FRESH, 1000);
        assert_eq!(steps, vec![Step::WaveStarted(0), Step::Send("a".into())]);
    }

    #[test]
    fn the_next_wave_starts_once_the_previous_is_final() {
        let rows = [row("a", 0, Succeeded, true), row("c", 1, Pending, true)];
        let progress = Progress {
            started_wave: Some(0),
            ..FRESH
        };
        let steps = schedule(&rows, LIMITS, progress, 1000);
        assert_eq!(steps, vec![Step::WaveStarted(1), Step::Send("c".into())]);
        // Already started: no second WaveStarted.
        let progress = Progress {
            started_wave: Some(1),
            ..FRESH
        };
        assert_eq!(sends(&schedule(&rows, LIMITS, progress, 1000)), ["c"]);
    }

    #[test]
    fn max_in_flight_counts_machines_holding_a_desired_state() {
        let rows = [
            row("a", 0, Copying, true),
            row("b", 0, Pending, true),
            row("c", 0, Pending, true),
            row("d", 0, Pending, true),
        ];
        let limits = Limits {
            max_in_flight: 2,
            ..LIMITS
        };
        let progress = Progress {
            started_wave: Some(0),
            ..FRESH
        };
        assert_eq!(sends(&schedule(&rows, limits, progress, 0)), ["b"]);
    }

    #[test]
    fn failures_over_the_budget_halt_and_cancel_what_was_never_sent() {
        let rows = [
            row("a", 0, Failed, true),
            row("b", 0, Activating, true),
            row("c", 1, Pending, true),
        ];
        let progress = Progress {
            started_wave: Some(0),
            ..FRESH
        };
        let steps = schedule(&rows, LIMITS, progress, 0);
        assert_eq!(
            steps,
            vec![
                Step::Halted {
                    failed: vec!["a".into()]
                },
                Step::Cancel("c".into())
            ]
        );
        // Within the budget the rollout carries on.
        let limits = Limits {
            failure_budget: 1,
            ..LIMITS
        };
        assert!(
            !schedule(&rows, limits, progress, 0)
                .iter()
                .any(|s| matches!(s, Step::Halted { .. }))
        );
        // Nothing left to hold back: no halt.
        let last = [row("a", 0, Failed, true), row("b", 0, Activating, true)];
        assert!(schedule(&last, LIMITS, progress, 0).is_empty());
        // Stopped: nothing more is sent; an offline machine in flight ends.
        let stopped = Progress {
            stopped: true,
            ..progress
        };
        assert!(schedule(&rows, LIMITS, stopped, 0).is_empty());
        let offline = [row("b", 0, Activating, false), row("c", 1, Pending, true)];
        assert_eq!(
            schedule(&offline, LIMITS, stopped, 300_000),
            vec![Step::Unreachable {
                machine: "b".into(),
                secs: 300
            }]
        );
    }

    #[test]
    fn offline_machines_of_the_current_wave_become_unreachable() {
        let rows = [
            Row {
                disconnected_since: Some(50_000),
                ..row("a", 0, Sent, false)
            },
            row("b", 0, Pending, false),
            row("c", 1, Pending, true),
        ];
        let progress = Progress {
            started_wave: Some(0),
            wave_started_ms: 10_000,
            ..FRESH
        };
        let limits = Limits {
            failure_budget: 2,
            ..LIMITS
        };
        // b counts from the wave start, a from its disconnect.
        let steps = schedule(&rows, limits, progress, 310_000);
        assert_eq!(
            steps,
            vec![Step::Unreachable {
                machine: "b".into(),
                secs: 300
            }]
        );
        let steps = schedule(&rows, limits, progress, 350_000);
        assert_eq!(
            steps,
            vec![
                Step::Unreachable {
                    machine: "a".into(),
                    secs: 300
                },
                Step::Unreachable {
                    machine: "b".into(),
                    secs: 340
                },
                Step::WaveStarted(1),
                Step::Send("c".into()),
            ]
        );
        // Nothing counts from before this control plane opened its store.
        let reopened = Progress {
            opened_ms: 200_000,
            ..progress
        };
        assert!(schedule(&rows, limits, reopened, 350_000).is_empty());
    }
}
