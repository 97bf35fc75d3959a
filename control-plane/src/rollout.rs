//! Who gets what: the desired state an agent receives, which reports may move
//! a machine, and how a deployment's outcome follows from its machines.
//! Pure functions; the store applies them inside its transactions.

use std::collections::HashMap;

mod schedule;
pub use schedule::{Limits, Progress, Row, Step, is_confirmable, is_in_flight, schedule};

use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{DeploymentState, DesiredState, HealthCheck, MachineState};

/// What `machine` should run for `deployment_id`: its closure, the
/// blueprint's enabled health checks and its auto-rollback setting, and the
/// row's signed statement, verbatim, which an agent with intent keys obeys
/// instead of the rest.
pub fn desired_state(
    artifact: &DeploymentArtifact,
    deployment_id: &str,
    machine: &MachineName,
    closure: &str,
) -> DesiredState {
    let health_checks = artifact
        .enabled_health_checks(machine)
        .into_iter()
        .map(|c| HealthCheck {
            command: c.command.as_str().to_owned(),
            timeout_secs: c.timeout.get(),
            interval_secs: c.interval.get(),
        })
        .collect();
    // A VM instance's settings are its machine's.
    let spec = artifact.machine_of(machine).map(|(_, spec)| spec);
    let auto_rollback = spec.is_none_or(|spec| spec.deployment.auto_rollback);
    let allow_reboot = spec.is_some_and(|spec| spec.deployment.allow_reboot);
    DesiredState {
        deployment_id: deployment_id.to_owned(),
        closure: closure.to_owned(),
        health_checks,
        auto_rollback,
        confirm_timeout_secs: artifact.rollout().confirm_timeout_secs(),
        allow_reboot,
        intent: artifact
            .statement(machine)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
    }
}

/// States a `Progress` report may move a machine into: those of a machine
/// in flight.
pub fn is_progress_state(state: MachineState) -> bool {
    is_in_flight(state)
}

/// States an `ActivationResult` may carry.
pub fn is_result_state(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Succeeded
            | MachineState::Skipped
            | MachineState::Failed
            | MachineState::RolledBack
            | MachineState::RollbackFailed
            // An agent dropped a cancelled deployment it had not started.
            | MachineState::Cancelled
    )
}

/// Why a deployment stopped before every machine ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Halted,
    Cancelled,
}

impl Stop {
    pub fn to_sql(stop: Option<Stop>) -> i64 {
        match stop {
            None => 0,
            Some(Stop::Halted) => 1,
            Some(Stop::Cancelled) => 2,
        }
    }

    pub fn from_sql(value: i64) -> Option<Stop> {
        match value {
            1 => Some(Stop::Halted),
            2 => Some(Stop::Cancelled),
            _ => None,
        }
    }
}

/// How a deployment ended, or `None` while a machine is not final.
/// An operator's cancel wins, then a halt (both say why the rollout
/// stopped), then superseded (a newer deployment took over), then any
/// failure, then cancellation; otherwise every machine succeeded or was skipped.
pub fn outcome(states: &[MachineState], stop: Option<Stop>) -> Option<DeploymentState> {
    if !states.iter().all(|s| s.is_final()) {
        return None;
    }
    let any = |f: fn(MachineState) -> bool| states.iter().any(|s| f(*s));
    Some(if stop == Some(Stop::Cancelled) {
        DeploymentState::Cancelled
    } else if stop == Some(Stop::Halted) {
        DeploymentState::Halted
    } else if any(|s| s == MachineState::Superseded) {
        DeploymentState::Superseded
    } else if any(MachineState::is_failure) {
        DeploymentState::Failed
    } else if any(|s| s == MachineState::Cancelled) {
        DeploymentState::Cancelled
    } else {
        DeploymentState::Succeeded
    })
}

/// Machines per final state, keyed by the state's label (`rolled-back`).
pub fn summary(states: &[MachineState]) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for state in states {
        *counts.entry(state.label().to_owned()).or_insert(0) += 1;
    }
    counts
}

/// A new deployment id, e.g. `d-20261126-071500-3f2a`: sortable by the time
/// of submission, with a piece of the artifact's digest. `widen` lengthens
/// that piece when the short id is taken.
pub fn new_deployment_id(now_ms: i64, digest: &str, widen: usize) -> Option<DeploymentId> {
    let at = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let hex: String = digest
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .take(4 + widen)
        .collect();
    let id = format!(
        "d-{:04}{:02}{:02}-{:02}{:02}{:02}-{hex}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    DeploymentId::parse(&id).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests {
    use super::*;

    const ARTIFACT: &str = r#"{
        "gitCommit": "0123456789abcdef0123456789abcdef01234567",
        "blueprint": {
            "worker-1": {
                "role": "worker", "cpu": 2, "memory": {"amount": 2, "unit": "GB"},
                "deployment": {
                    "addr": "192.0.2.1", "backend": "cloud-hypervisor", "autoRollback": false,
                    "healthChecks": [
                        {"command": "true", "timeout": 30, "interval": 2},
                        {"enabled": false, "command": "false", "timeout": 5}
                    ]
                }
            }
        },
        "closures": {"worker-1": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a"}
    }"#;

    #[test]
    fn desired_state_carries_enabled_checks_and_rollback_setting() {
        let artifact = DeploymentArtifact::from_json(ARTIFACT.as_bytes()).unwrap();
        let machine = MachineName::parse("worker-1").unwrap();
        let closure = artifact.closures[&machine].to_string();
        let d = desired_state(&artifact, "d-1", &machine, &closure);
        assert_eq!(d.deployment_id, "d-1");
        assert_eq!(d.closure, closure);
        assert!(!d.auto_rollback);
        assert!(d.intent.is_empty(), "an unsigned artifact has no statement");
        assert_eq!(d.confirm_timeout_secs, 30);
        assert!(!d.allow_reboot);
        assert_eq!(
            d.health_checks,
            vec![HealthCheck {
                command: "true".into(),
                timeout_secs: 30,
                interval_secs: 2
            }]
        );
    }

    #[test]
    fn outcome_needs_every_machine_final() {
        use MachineState::*;
        assert_eq!(outcome(&[Succeeded, Copying], None), None);
        assert_eq!(
            outcome(&[Succeeded, Skipped], None),
            Some(DeploymentState::Succeeded)
        );
        assert_eq!(
            outcome(&[Succeeded, RolledBack], None),
            Some(DeploymentState::Failed)
        );
        assert_eq!(outcome(&[Unreachable], None), Some(DeploymentState::Failed));
        assert_eq!(
            outcome(&[RollbackFailed, Succeeded], None),
            Some(DeploymentState::Failed)
        );
        assert_eq!(
            outcome(&[Superseded, Failed], None),
            Some(DeploymentState::Superseded)
        );
        assert_eq!(
            outcome(&[Cancelled, Succeeded], None),
            Some(DeploymentState::Cancelled)
        );
        assert_eq!(
            outcome(&[Cancelled, Failed], Some(Stop::Halted)),
            Some(DeploymentState::Halted)
        );
        assert_eq!(
            outcome(&[Cancelled, Failed], Some(Stop::Cancelled)),
            Some(DeploymentState::Cancelled)
        );
    }

    #[test]
    fn summary_counts_labels() {
        use MachineState::*;
        let s = summary(&[Succeeded, Succeeded, RolledBack]);
        assert_eq!(s.get("succeeded"), Some(&2));
        assert_eq!(s.get("rolled-back"), Some(&1));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn report_states() {
        assert!(is_progress_state(MachineState::Copying));
        assert!(!is_progress_state(MachineState::Pending));
        assert!(!is_progress_state(MachineState::Succeeded));
        assert!(is_result_state(MachineState::RolledBack));
        assert!(!is_result_state(MachineState::Superseded));
        assert!(is_result_state(MachineState::Cancelled));
        assert!(!is_result_state(MachineState::Checking));
    }

    #[test]
    fn deployment_ids_are_valid_and_sort_by_time() {
        let digest = "3F2A9c".repeat(11);
        // 2026-11-26T07:15:00Z
        let a = new_deployment_id(1_795_677_300_000, &digest, 0).unwrap();
        assert_eq!(a.as_str(), "d-20261126-071500-3f2a");
        let b = new_deployment_id(1_795_677_301_000, "0000", 0).unwrap();
        assert!(a < b);
        let wide = new_deployment_id(1_795_677_300_000, &digest, 4).unwrap();
        assert_eq!(wide.as_str(), "d-20261126-071500-3f2a9c3f");
    }
}
