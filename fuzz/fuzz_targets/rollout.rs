//! The control plane's scheduler over any rows, limits and progress: no
//! input panics, and what it decides keeps the rollout's rules.

#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use procurator_control_plane::rollout::{Limits, Progress, Row, Step, is_in_flight, schedule};
use procurator_proto::v1::MachineState;

#[derive(Debug, Arbitrary)]
struct Input {
    rows: Vec<(u8, u8, i32, Option<i64>)>,
    max_in_flight: u8,
    failure_budget: u8,
    unreachable_after_ms: i64,
    started_wave: Option<u8>,
    wave_started_ms: i64,
    stopped: bool,
    opened_ms: i64,
    now: i64,
}

fuzz_target!(|input: Input| {
    // Rows in machine-name order, one per name, as the store reads them.
    let mut seen = BTreeSet::new();
    let mut rows: Vec<Row> = input
        .rows
        .iter()
        .filter(|(name, ..)| seen.insert(*name))
        .map(|(name, wave, state, offline)| Row {
            machine: format!("m-{name:03}"),
            wave: u32::from(*wave % 8),
            state: MachineState::try_from(*state).unwrap_or(MachineState::Pending),
            disconnected_since: *offline,
        })
        .collect();
    rows.sort_by(|a, b| a.machine.cmp(&b.machine));
    let limits = Limits {
        max_in_flight: u32::from(input.max_in_flight % 16),
        failure_budget: u32::from(input.failure_budget % 8),
        unreachable_after_ms: input.unreachable_after_ms,
    };
    let progress = Progress {
        started_wave: input.started_wave.map(|w| u32::from(w % 8)),
        wave_started_ms: input.wave_started_ms,
        stopped: input.stopped,
        opened_ms: input.opened_ms,
    };
    let steps = schedule(&rows, limits, progress, input.now);

    let row = |name: &str| rows.iter().find(|r| r.machine == name);
    let sent: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Send(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    let distinct: BTreeSet<&str> = sent.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        sent.len(),
        "a machine sent twice: {steps:?}"
    );
    for m in &sent {
        let r = row(m).expect("sent a machine that has no row");
        assert_eq!(
            r.state,
            MachineState::Pending,
            "sent a row that is not pending: {r:?}"
        );
        assert!(
            r.disconnected_since.is_none(),
            "sent to a machine with no agent: {r:?}"
        );
    }
    if progress.stopped {
        assert!(
            steps.iter().all(|s| matches!(s, Step::Unreachable { .. })),
            "a stopped rollout may only give up on machines: {steps:?}"
        );
    }
    if steps.iter().any(|s| matches!(s, Step::Halted { .. })) {
        assert!(sent.is_empty(), "sent while halting: {steps:?}");
    }
    // One wave at a time: everything sent is of the same wave.
    let waves: BTreeSet<u32> = sent.iter().filter_map(|m| row(m)).map(|r| r.wave).collect();
    assert!(waves.len() <= 1, "sent from several waves: {steps:?}");
    if limits.max_in_flight > 0 {
        // In flight after the steps: less those it gave up on.
        let given_up: BTreeSet<&str> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Unreachable { machine, .. } => Some(machine.as_str()),
                _ => None,
            })
            .collect();
        let in_flight = rows
            .iter()
            .filter(|r| is_in_flight(r.state) && !given_up.contains(r.machine.as_str()))
            .count();
        let limit = limits.max_in_flight as usize;
        assert!(
            sent.is_empty() || in_flight + sent.len() <= limit,
            "{in_flight} in flight and {} sent over a limit of {limit}",
            sent.len()
        );
    }
    for s in &steps {
        match s {
            Step::Unreachable { machine, .. } | Step::Cancel(machine) => {
                assert!(
                    row(machine).is_some(),
                    "a step for a machine with no row: {s:?}"
                );
            }
            _ => {}
        }
    }
});
