//! `procurator-ctl machine NAME`: one machine's deployments, newest first,
//! and how each ended there.

use procurator_proto::v1::MachineHistoryEntry;
use serde_json::{Value, json};

use crate::command::deployments::{machine_json, non_empty};
use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The machine (or VM instance) name, as `status` lists it.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// How many deployments to show, newest first.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,

    /// Show whole store paths, not their short form.
    #[arg(long)]
    pub wide: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let entries = crate::pages::history(&mut conn, &args.name, limit).await?;
    match args.output.output {
        OutputFormat::Text => output::print(&history_table(&args.name, &entries, args.wide))?,
        OutputFormat::Json => {
            output::print_json(&Value::Array(entries.iter().map(entry_json).collect()))?
        }
    }
    Ok(Outcome::Success)
}

/// How long the machine took: from its first report to its result.
fn took(e: &MachineHistoryEntry) -> String {
    let Some(status) = &e.status else {
        return "-".to_owned();
    };
    if e.started_at_ms == 0 || !status.state().is_final() {
        return "-".to_owned();
    }
    format::span(status.updated_at_ms - e.started_at_ms)
}

pub fn history_table(machine: &str, entries: &[MachineHistoryEntry], wide: bool) -> String {
    if entries.is_empty() {
        return format!(
            "no kept deployment has a row for {}; check the name with `procurator-ctl status`\n",
            format::safe(machine)
        );
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let status = e.status.clone().unwrap_or_default();
            let state = match status.failed_phase() {
                procurator_proto::v1::MachineState::Unspecified => {
                    status.state().label().to_owned()
                }
                phase => format!("{} ({})", status.state().label(), phase.label()),
            };
            vec![
                e.deployment_id.clone(),
                format::short_commit(&e.git_commit).to_owned(),
                state,
                match status.closure.as_str() {
                    "" => "-".to_owned(),
                    path if wide => path.to_owned(),
                    path => format::short_store_path(path),
                },
                format::datetime(e.started_at_ms.max(0)),
                took(e),
                if e.has_log { "yes" } else { "-" }.to_owned(),
                if status.reason.is_empty() {
                    "-".to_owned()
                } else {
                    status.reason.clone()
                },
            ]
        })
        .collect();
    let mut out = output::table(
        &[
            "DEPLOYMENT",
            "COMMIT",
            "STATE",
            "CLOSURE",
            "STARTED",
            "TOOK",
            "LOG",
            "REASON",
        ],
        &rows,
    );
    if entries.iter().any(|e| e.has_log) {
        out.push_str(&format!(
            "\n`procurator-ctl logs DEPLOYMENT {}` shows what a deployment ran there.\n",
            format::safe(machine)
        ));
    }
    out
}

pub fn entry_json(e: &MachineHistoryEntry) -> Value {
    let status = e.status.clone().unwrap_or_default();
    let mut v = machine_json(&status);
    let extra = json!({
        "deploymentId": e.deployment_id,
        "gitCommit": e.git_commit,
        "submittedBy": e.submitted_by,
        "createdAt": format::rfc3339_or_null(e.created_at_ms),
        "deploymentState": e.deployment_state().label(),
        "startedAt": format::rfc3339_or_null(e.started_at_ms),
        "finishedAt": if status.state().is_final() {
            format::rfc3339_or_null(status.updated_at_ms)
        } else {
            Value::Null
        },
        "hasLog": e.has_log,
        "reason": non_empty(&status.reason),
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{DeploymentState, MachineState, MachineStatus};

    use super::*;

    fn entry(id: &str, state: MachineState, has_log: bool) -> MachineHistoryEntry {
        MachineHistoryEntry {
            deployment_id: id.into(),
            git_commit: "3f2c1a9b8e7d6c5b4a39".into(),
            submitted_by: "ci-bot".into(),
            created_at_ms: 1_748_762_100_000,
            deployment_state: DeploymentState::Succeeded as i32,
            status: Some(MachineStatus {
                machine: "web-1".into(),
                closure: format!("/nix/store/{}-nixos-system-web-1", "a".repeat(32)),
                state: state as i32,
                updated_at_ms: 1_748_762_104_200,
                ..Default::default()
            }),
            started_at_ms: 1_748_762_102_000,
            has_log,
        }
    }

    #[test]
    fn the_table_says_how_each_deployment_ended_and_how_long_it_took() {
        let mut failed = entry("d-2", MachineState::RolledBack, true);
        if let Some(status) = failed.status.as_mut() {
            status.failed_phase = MachineState::Checking as i32;
            status.reason = "health check `curl` did not pass".into();
        }
        let table = history_table(
            "web-1",
            &[failed, entry("d-1", MachineState::Succeeded, false)],
            false,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEPLOYMENT  COMMIT"), "{table}");
        assert!(
            lines[1].contains("rolled-back (checking)") && lines[1].contains("2.2s"),
            "{table}"
        );
        assert!(
            lines[1].contains("yes") && lines[1].ends_with("did not pass"),
            "{table}"
        );
        assert!(
            lines[2].contains("succeeded") && lines[2].ends_with("-"),
            "{table}"
        );
        assert!(
            table.contains("`procurator-ctl logs DEPLOYMENT web-1`"),
            "{table}"
        );
        let empty = history_table("web-9", &[], false);
        assert!(
            empty.contains("no kept deployment has a row for web-9"),
            "{empty}"
        );
    }

    #[test]
    fn json_has_the_deployment_and_the_machines_row() {
        let v = entry_json(&entry("d-1", MachineState::Succeeded, true));
        assert_eq!(v["deploymentId"], "d-1");
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["deploymentState"], "succeeded");
        assert_eq!(v["startedAt"], "2025-06-01T07:15:02.000Z");
        assert_eq!(v["finishedAt"], "2025-06-01T07:15:04.200Z");
        assert_eq!(v["hasLog"], true);
        assert_eq!(v["reason"], Value::Null);
        let pending = entry_json(&entry("d-3", MachineState::Pending, false));
        assert_eq!(pending["finishedAt"], Value::Null);
    }
}
