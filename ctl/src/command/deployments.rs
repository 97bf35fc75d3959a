//! `procurator-ctl deployments`: the history, newest first.

use procurator_proto::v1::{Deployment, ListDeploymentsRequest, MachineStatus};
use serde_json::{Value, json};

use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::render::{copy_json, phase_json};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many deployments to list.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub limit: u32,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    let deployments = conn
        .client
        .list_deployments(ListDeploymentsRequest { limit: args.limit })
        .await
        .map_err(|status| conn.error(&status, "listing deployments"))?
        .into_inner()
        .deployments;
    match args.output.output {
        OutputFormat::Text => output::print(&deployments_table(&deployments))?,
        OutputFormat::Json => output::print_json(&Value::Array(
            deployments.iter().map(deployment_json).collect(),
        ))?,
    }
    Ok(Outcome::Success)
}

/// Machines that ended well, ended badly, and all of them.
fn counts(machines: &[MachineStatus]) -> (usize, usize, usize) {
    let ok = machines.iter().filter(|m| m.state().is_success()).count();
    let failed = machines.iter().filter(|m| m.state().is_failure()).count();
    (ok, failed, machines.len())
}

pub fn deployments_table(deployments: &[Deployment]) -> String {
    if deployments.is_empty() {
        return "no deployment yet; submit one with `procurator-ctl submit deployment.json`\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = deployments
        .iter()
        .map(|d| {
            let (ok, failed, total) = counts(&d.machines);
            vec![
                d.id.clone(),
                format::short_commit(&d.git_commit).to_owned(),
                d.state().label().to_owned(),
                format!("{ok}/{failed}/{total}"),
                format::datetime(d.created_at_ms),
                note(d),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "COMMIT",
            "STATE",
            "MACHINES(ok/failed/total)",
            "CREATED",
            "NOTE",
        ],
        &rows,
    )
}

/// What else a row should say: a rollback's target, why it halted or was
/// cancelled.
fn note(d: &Deployment) -> String {
    let mut parts = Vec::new();
    if !d.rollback_of.is_empty() {
        parts.push(format!("rollback of {}", d.rollback_of));
    }
    if !d.halted_reason.is_empty() {
        parts.push(d.halted_reason.clone());
    }
    if !d.forced_by.is_empty() {
        parts.push(format!("forced by {}", d.forced_by));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

/// An empty string as null: the field does not apply.
fn non_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { s.into() }
}

pub fn deployment_json(d: &Deployment) -> Value {
    let (ok, failed, total) = counts(&d.machines);
    let machines: Vec<Value> = d
        .machines
        .iter()
        .map(|m| {
            json!({
                "machine": m.machine,
                "closure": m.closure,
                "state": m.state().label(),
                "failedPhase": phase_json(m.failed_phase()),
                "reason": m.reason,
                "outputTail": m.output_tail,
                "copy": m.copy.as_ref().map(copy_json),
                "updatedAt": format::rfc3339_or_null(m.updated_at_ms),
                "wave": m.wave,
                "rebootRequired": m.reboot_required,
            })
        })
        .collect();
    json!({
        "id": d.id,
        "gitCommit": d.git_commit,
        "state": d.state().label(),
        "createdAt": format::rfc3339_or_null(d.created_at_ms),
        "finishedAt": format::rfc3339_or_null(d.finished_at_ms),
        "submittedBy": d.submitted_by,
        "counts": { "ok": ok, "failed": failed, "total": total },
        "machines": machines,
        "haltedReason": non_empty(&d.halted_reason),
        "rollbackOf": non_empty(&d.rollback_of),
        "forcedBy": non_empty(&d.forced_by),
        "intentKeys": d.intent_keys,
        "waves": d.waves.iter().map(|w| json!({
            "index": w.index,
            "name": w.name,
            "machines": w.machines,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{DeploymentState, MachineState, Wave};

    use super::*;

    fn deployment() -> Deployment {
        let machine = |name: &str, state: MachineState| MachineStatus {
            machine: name.into(),
            state: state as i32,
            ..Default::default()
        };
        Deployment {
            id: "d-1".into(),
            git_commit: "3f2c1a9b8e7d6c5b4a39".into(),
            state: DeploymentState::Failed as i32,
            created_at_ms: 1_748_762_102_000,
            machines: vec![
                machine("a", MachineState::Succeeded),
                machine("b", MachineState::Skipped),
                machine("c", MachineState::Unreachable),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_table_counts_machines() {
        assert_eq!(
            deployments_table(&[deployment()]),
            "ID   COMMIT        STATE   MACHINES(ok/failed/total)  CREATED              NOTE\n\
             d-1  3f2c1a9b8e7d  failed  2/1/3                      2025-06-01 07:15:02  -\n"
        );
    }

    #[test]
    fn rollbacks_and_halts_are_noted() {
        let d = Deployment {
            state: DeploymentState::Halted as i32,
            rollback_of: "d-0".into(),
            halted_reason: "1 machine failed, the failure budget is 0".into(),
            waves: vec![Wave {
                index: 0,
                name: "canary".into(),
                machines: vec!["a".into()],
            }],
            ..deployment()
        };
        assert_eq!(
            note(&d),
            "rollback of d-0; 1 machine failed, the failure budget is 0"
        );
        let v = deployment_json(&d);
        assert_eq!(v["state"], "halted");
        assert_eq!(v["rollbackOf"], "d-0");
        assert_eq!(
            v["haltedReason"],
            "1 machine failed, the failure budget is 0"
        );
        assert_eq!(
            v["waves"],
            json!([{ "index": 0, "name": "canary", "machines": ["a"] }])
        );
        assert_eq!(v["machines"][0]["wave"], 0);
        assert_eq!(v["machines"][0]["rebootRequired"], false);
        let v = deployment_json(&deployment());
        assert_eq!(
            (v["rollbackOf"].clone(), v["haltedReason"].clone()),
            (Value::Null, Value::Null)
        );
    }

    #[test]
    fn json_has_counts_labels_and_times() {
        let v = deployment_json(&deployment());
        assert_eq!(v["state"], "failed");
        assert_eq!(v["counts"], json!({ "ok": 2, "failed": 1, "total": 3 }));
        assert_eq!(v["createdAt"], "2025-06-01T07:15:02.000Z");
        assert_eq!(v["finishedAt"], Value::Null);
        assert_eq!(v["machines"][2]["state"], "unreachable");
        assert_eq!(v["machines"][2]["failedPhase"], Value::Null);
    }
}
