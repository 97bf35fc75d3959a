//! `procurator-ctl deployments [ID]`: the history, newest first, as
//! summaries; or one deployment with its machines (paged from the control
//! plane, filtered as asked).

use procurator_proto::v1::{Deployment, ListDeploymentsRequest, MachineState, MachineStatus};
use serde_json::{Value, json};

use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::pages::{RowFilter, deployment_with_rows};
use crate::render::{copy_json, phase_json};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show this deployment and its machines instead of the history.
    #[arg(value_name = "DEPLOYMENT")]
    pub id: Option<String>,

    /// How many deployments to list.
    #[arg(long, default_value_t = 20, value_name = "N", conflicts_with = "id")]
    pub limit: u32,

    /// With DEPLOYMENT: only machines in this state (repeatable), e.g.
    /// `failed`, `rolled-back`, `pending`.
    #[arg(long = "state", value_name = "STATE", requires = "id", value_parser = parse_state)]
    pub states: Vec<MachineState>,

    /// With DEPLOYMENT: only machines of this wave (0-based; repeatable).
    #[arg(long = "wave", value_name = "N", requires = "id")]
    pub waves: Vec<u32>,

    /// With DEPLOYMENT: only machines whose name matches (`web-*`).
    #[arg(long, value_name = "PATTERN", requires = "id")]
    pub name: Option<String>,

    /// Show whole store paths, not their short form.
    #[arg(long)]
    pub wide: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

fn parse_state(text: &str) -> Result<MachineState, String> {
    MachineState::from_label(text).ok_or_else(|| {
        let all: Vec<&str> = MachineState::ALL[1..].iter().map(|s| s.label()).collect();
        format!(
            "{text:?} is not a machine state; one of: {}",
            all.join(", ")
        )
    })
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    if let Some(id) = &args.id {
        let filter = RowFilter {
            states: args.states.clone(),
            waves: args.waves.clone(),
            name: args.name.clone().unwrap_or_default(),
        };
        let d = deployment_with_rows(&mut conn, id, &filter).await?;
        match args.output.output {
            OutputFormat::Text => output::print(&deployment_text(&d, args.wide))?,
            OutputFormat::Json => output::print_json(&deployment_json(&d))?,
        }
        return Ok(Outcome::Success);
    }
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
            deployments.iter().map(summary_json).collect(),
        ))?,
    }
    Ok(Outcome::Success)
}

/// Machines that ended well, ended badly, and all of them, from the
/// control plane's counts.
fn counts(d: &Deployment) -> (u32, u32, u32) {
    let (mut ok, mut failed) = (0, 0);
    for (label, n) in &d.machine_counts {
        match MachineState::from_label(label) {
            Some(s) if s.is_success() => ok += n,
            Some(s) if s.is_failure() => failed += n,
            _ => {}
        }
    }
    (ok, failed, d.machine_total)
}

pub fn deployments_table(deployments: &[Deployment]) -> String {
    if deployments.is_empty() {
        return "no deployment yet; submit one with `procurator-ctl submit deployment.json`\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = deployments
        .iter()
        .map(|d| {
            let (ok, failed, total) = counts(d);
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
    if !d.on.is_empty() {
        parts.push(format!("on {}", d.on.join(" ")));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

/// An empty string as null: the field does not apply.
pub fn non_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { s.into() }
}

/// One deployment as text: what the list says of it, then its machines.
fn deployment_text(d: &Deployment, wide: bool) -> String {
    let mut out = deployments_table(std::slice::from_ref(d));
    let counts: Vec<String> = d
        .machine_counts
        .iter()
        .map(|(label, n)| format!("{n} {label}"))
        .collect();
    out.push_str(&format!(
        "\n{} machines: {}\n\n",
        d.machine_total,
        counts.join(", ")
    ));
    if d.machines.is_empty() {
        out.push_str("no machine matches\n");
        return out;
    }
    let mut machines: Vec<&MachineStatus> = d.machines.iter().collect();
    machines.sort_by(|a, b| format::natural_order(&a.machine, &b.machine));
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            vec![
                m.machine.clone(),
                m.state().label().to_owned(),
                m.wave.to_string(),
                if wide {
                    m.closure.clone()
                } else {
                    format::short_store_path(&m.closure)
                },
                if m.reason.is_empty() {
                    "-".to_owned()
                } else {
                    m.reason.clone()
                },
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["MACHINE", "STATE", "WAVE", "CLOSURE", "REASON"],
        &rows,
    ));
    out
}

/// A deployment as the list shows it: counted, no machines.
pub fn summary_json(d: &Deployment) -> Value {
    let (ok, failed, total) = counts(d);
    json!({
        "id": d.id,
        "gitCommit": d.git_commit,
        "state": d.state().label(),
        "createdAt": format::rfc3339_or_null(d.created_at_ms),
        "finishedAt": format::rfc3339_or_null(d.finished_at_ms),
        "submittedBy": d.submitted_by,
        "counts": { "ok": ok, "failed": failed, "total": total },
        "machineCounts": d.machine_counts,
        "haltedReason": non_empty(&d.halted_reason),
        "rollbackOf": non_empty(&d.rollback_of),
        "forcedBy": non_empty(&d.forced_by),
        "on": d.on,
        "intentKeys": d.intent_keys,
        "waves": d.waves.iter().map(|w| json!({
            "index": w.index,
            "name": w.name,
            "machines": w.machines,
        })).collect::<Vec<_>>(),
    })
}

/// A deployment with the machines that were read.
pub fn deployment_json(d: &Deployment) -> Value {
    let machines: Vec<Value> = d.machines.iter().map(machine_json).collect();
    let mut v = summary_json(d);
    v["machines"] = machines.into();
    v
}

/// One machine's row in a deployment.
pub fn machine_json(m: &MachineStatus) -> Value {
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
            machine_counts: [("succeeded", 1), ("skipped", 1), ("unreachable", 1)]
                .map(|(l, n)| (l.to_owned(), n))
                .into(),
            machine_total: 3,
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
