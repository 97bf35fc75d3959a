//! Events and results as JSON objects for scripts: camelCase keys, times in
//! RFC 3339 UTC, states as their labels (`rolled-back`).

use procurator_proto::v1::{CopyProgress, Event, MachineState, event};
use serde_json::{Map, Value, json};

use super::view::summary_label;
use crate::format;

/// One NDJSON line of `watch --output json`.
pub fn event_json(ev: &Event) -> Value {
    let mut obj = Map::new();
    obj.insert("revision".into(), ev.revision.into());
    obj.insert("at".into(), format::rfc3339(ev.at_ms).into());
    obj.insert("deploymentId".into(), ev.deployment_id.clone().into());
    let (kind, fields) = match &ev.kind {
        Some(event::Kind::Submitted(s)) => (
            "submitted",
            json!({
                "gitCommit": s.git_commit,
                "machines": s.machines,
                "submittedBy": s.submitted_by,
                "on": s.on,
                "intentKeys": s.intent_keys,
                "forcedBy": if s.forced_by.is_empty() { Value::Null } else { s.forced_by.clone().into() },
                "rollbackOf": if s.rollback_of.is_empty() { Value::Null } else { s.rollback_of.clone().into() },
            }),
        ),
        Some(event::Kind::Machine(u)) => (
            "machine",
            json!({
                "machine": u.machine,
                "state": u.state().label(),
                "failedPhase": phase_json(u.failed_phase()),
                "closure": u.closure,
                "message": u.message,
                "outputTail": u.output_tail,
                "copy": u.copy.as_ref().map(copy_json),
                "rebootRequired": u.reboot_required,
                "inPlace": u.in_place,
            }),
        ),
        Some(event::Kind::Finished(f)) => {
            let summary: Map<String, Value> = f
                .summary
                .iter()
                .map(|(k, n)| (summary_label(k), Value::from(*n)))
                .collect();
            (
                "finished",
                json!({ "state": f.state().label(), "summary": summary }),
            )
        }
        Some(event::Kind::Certificate(c)) => (
            "certificate",
            json!({
                "action": c.action().as_str_name().to_ascii_lowercase(),
                "identity": c.identity,
                "serial": c.serial,
                "reason": c.reason,
                "peer": c.peer,
            }),
        ),
        Some(event::Kind::Agent(a)) => (
            "agent",
            json!({
                "machine": a.machine,
                "connected": a.connected,
                "currentSystem": a.current_system,
            }),
        ),
        Some(event::Kind::WaveStarted(w)) => (
            "wave-started",
            // 0-based like `MachineStatus.wave`; the text output counts from 1.
            json!({
                "index": w.index,
                "total": w.total,
                "name": w.name,
                "machines": w.machines,
            }),
        ),
        Some(event::Kind::Halted(h)) => (
            "halted",
            json!({ "reason": h.reason, "failedMachines": h.failed_machines }),
        ),
        Some(event::Kind::VmsPlaced(p)) => (
            "vms-placed",
            json!({
                "placements": p.placements.iter().map(|v| json!({
                    "instance": v.instance, "machine": v.machine, "host": v.host,
                })).collect::<Vec<_>>(),
                "unplaced": p.unplaced.iter().map(|v| json!({
                    "instance": v.instance, "machine": v.machine, "reason": v.reason,
                })).collect::<Vec<_>>(),
            }),
        ),
        Some(event::Kind::Cancelled(c)) => (
            "cancelled",
            json!({ "reason": c.reason, "inFlight": c.in_flight }),
        ),
        None => ("unknown", json!({})),
    };
    obj.insert("type".into(), kind.into());
    if let Value::Object(fields) = fields {
        obj.extend(fields);
    }
    Value::Object(obj)
}

/// A failed phase, or null when nothing failed.
pub fn phase_json(phase: MachineState) -> Value {
    if phase == MachineState::Unspecified {
        Value::Null
    } else {
        phase.label().into()
    }
}

pub fn copy_json(c: &CopyProgress) -> Value {
    json!({
        "bytesDone": c.bytes_done,
        "bytesExpected": c.bytes_expected,
        "pathsDone": c.paths_done,
        "pathsExpected": c.paths_expected,
    })
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{
        AgentConnection, DeploymentFinished, DeploymentState, DeploymentSubmitted, MachineUpdate,
        RolloutHalted, WaveStarted,
    };

    use super::*;

    fn ev(kind: event::Kind) -> Event {
        Event {
            revision: 42,
            at_ms: 1_748_762_102_123,
            deployment_id: "d-abc".into(),
            kind: Some(kind),
        }
    }

    #[test]
    fn vm_placements_carry_instances_hosts_and_reasons() {
        let v = event_json(&ev(event::Kind::VmsPlaced(
            procurator_proto::v1::VmsPlaced {
                placements: vec![procurator_proto::v1::VmPlacement {
                    instance: "web-0".into(),
                    machine: "web".into(),
                    host: "host-a".into(),
                }],
                unplaced: vec![procurator_proto::v1::VmUnplaced {
                    instance: "web-1".into(),
                    machine: "web".into(),
                    reason: "needs 1 vCPU and 953 MiB; no VM host has that much free".into(),
                }],
            },
        )));
        assert_eq!(v["type"], "vms-placed");
        assert_eq!(v["placements"][0]["host"], "host-a");
        assert_eq!(v["unplaced"][0]["instance"], "web-1");
    }

    #[test]
    fn a_machine_event() {
        let v = event_json(&ev(event::Kind::Machine(MachineUpdate {
            machine: "worker-1".into(),
            state: MachineState::RolledBack as i32,
            failed_phase: MachineState::Checking as i32,
            closure: "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system".into(),
            message: "health check failed".into(),
            output_tail: "boom\n".into(),
            copy: Some(CopyProgress {
                bytes_done: 1,
                bytes_expected: 2,
                paths_done: 3,
                paths_expected: 4,
            }),
            reboot_required: false,
            in_place: false,
        })));
        assert_eq!(
            v,
            json!({
                "revision": 42,
                "at": "2025-06-01T07:15:02.123Z",
                "deploymentId": "d-abc",
                "type": "machine",
                "machine": "worker-1",
                "state": "rolled-back",
                "failedPhase": "checking",
                "closure": "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system",
                "message": "health check failed",
                "outputTail": "boom\n",
                "copy": { "bytesDone": 1, "bytesExpected": 2, "pathsDone": 3, "pathsExpected": 4 },
                "rebootRequired": false,
                "inPlace": false,
            })
        );
    }

    #[test]
    fn nothing_failed_and_no_copy_are_null() {
        let v = event_json(&ev(event::Kind::Machine(MachineUpdate {
            machine: "worker-1".into(),
            state: MachineState::Activating as i32,
            ..Default::default()
        })));
        assert_eq!(v["failedPhase"], Value::Null);
        assert_eq!(v["copy"], Value::Null);
        assert_eq!(v["state"], "activating");
    }

    #[test]
    fn submitted_finished_and_agent_events() {
        let v = event_json(&ev(event::Kind::Submitted(DeploymentSubmitted {
            git_commit: "3f2c1a9".into(),
            machines: vec!["a".into()],
            submitted_by: "ci/ci".into(),
            ..Default::default()
        })));
        assert_eq!(v["type"], "submitted");
        assert_eq!(v["gitCommit"], "3f2c1a9");
        assert_eq!(v["machines"], json!(["a"]));
        assert_eq!(v["submittedBy"], "ci/ci");

        let v = event_json(&ev(event::Kind::Finished(DeploymentFinished {
            state: DeploymentState::Failed as i32,
            summary: [("ROLLED_BACK".to_owned(), 1)].into(),
        })));
        assert_eq!(v["type"], "finished");
        assert_eq!(v["state"], "failed");
        assert_eq!(v["summary"], json!({ "rolled-back": 1 }));

        let v = event_json(&ev(event::Kind::Agent(AgentConnection {
            machine: "a".into(),
            connected: true,
            current_system: "/nix/store/x".into(),
        })));
        assert_eq!(v["type"], "agent");
        assert_eq!(v["connected"], true);
        assert_eq!(v["currentSystem"], "/nix/store/x");
        assert_eq!(v["revision"], 42);
    }

    #[test]
    fn wave_and_halted_events() {
        let v = event_json(&ev(event::Kind::WaveStarted(WaveStarted {
            index: 1,
            total: 3,
            name: "canary".into(),
            machines: vec!["worker-1".into()],
        })));
        assert_eq!(v["type"], "wave-started");
        assert_eq!(
            (v["index"].as_u64(), v["total"].as_u64()),
            (Some(1), Some(3))
        );
        assert_eq!(v["name"], "canary");
        assert_eq!(v["machines"], json!(["worker-1"]));

        let v = event_json(&ev(event::Kind::Halted(RolloutHalted {
            reason: "1 machine failed, the failure budget is 0".into(),
            failed_machines: vec!["worker-1".into()],
        })));
        assert_eq!(v["type"], "halted");
        assert_eq!(v["reason"], "1 machine failed, the failure budget is 0");
        assert_eq!(v["failedMachines"], json!(["worker-1"]));
    }
}
