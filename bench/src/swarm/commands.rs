//! What an operator runs against the swarm's control plane once every
//! agent is connected: `procurator-ctl deployments`, `deployments ID`,
//! `status`, `watch ID`, `logs ID MACHINE` and `machine MACHINE` at the
//! swarm's size, each timed, beside the floor of the same pages read with
//! a bare gRPC client.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use procurator_proto::v1::{
    GetMachineHistoryRequest, GetMachineLogRequest, ListAgentsRequest, ListMachinesRequest,
};
use serde_json::Value;

use super::operator::Client;

/// Seconds each took.
#[derive(Debug, Clone, Copy)]
pub struct CommandTimes {
    pub deployments_s: f64,
    pub deployment_rows_s: f64,
    pub status_s: f64,
    pub watch_s: f64,
    pub logs_s: f64,
    pub machine_s: f64,
    /// The one RPC of `logs` and of `machine`.
    pub floor_log_s: f64,
    pub floor_history_s: f64,
    /// Every row of the deployment, every agent: the pages alone.
    pub floor_rows_s: f64,
    pub floor_agents_s: f64,
}

/// Times the commands on deployment `id` of `n` machines (and `n` agents).
pub async fn measure(
    pki: &Path,
    url: &str,
    operator: &Client,
    id: &str,
    n: usize,
) -> Result<CommandTimes> {
    let ctl = super::sibling("procurator-ctl")?;
    // `watch` exits 3 for a rollout that failed (the swarm may make agents
    // fail on purpose): it still followed it to the end.
    let run = |args: &[&str]| -> Result<(f64, Value)> {
        let started = Instant::now();
        let out = std::process::Command::new(&ctl)
            .args(args)
            .args(["--output", "json"])
            .env("PROCURATOR_CONTROL_PLANE", url)
            .env("PROCURATOR_TLS_CA", pki.join("ca.crt"))
            .env("PROCURATOR_TLS_CERT", pki.join("operator-bench.crt"))
            .env("PROCURATOR_TLS_KEY", pki.join("operator-bench.key"))
            .output()
            .with_context(|| format!("running {}", ctl.display()))?;
        let took = started.elapsed().as_secs_f64();
        let followed_a_failure = args[0] == "watch" && out.status.code() == Some(3);
        if !out.status.success() && !followed_a_failure {
            bail!(
                "procurator-ctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // `watch` prints a line per event, then the summary; the others one value.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let value = serde_json::from_str(stdout.trim())
            .or_else(|_| serde_json::from_str(last))
            .with_context(|| format!("procurator-ctl {} printed no JSON", args.join(" ")))?;
        Ok((took, value))
    };
    let count = |v: &Value| v.as_array().map_or(0, Vec::len);

    let (deployments_s, listed) = run(&["deployments"])?;
    ensure!(count(&listed) >= 1, "deployments listed none: {listed}");
    let (deployment_rows_s, one) = run(&["deployments", id])?;
    ensure!(
        count(&one["machines"]) == n,
        "deployments {id} did not list {n} machines"
    );
    let (status_s, agents) = run(&["status"])?;
    ensure!(
        count(&agents) == n,
        "status listed {} agents, not {n}",
        count(&agents)
    );
    let (watch_s, _) = run(&["watch", id])?;
    // The first machine of the swarm (`agents::PREFIX`-0).
    let machine = format!("{}-0", super::PREFIX);
    let (logs_s, log) = run(&["logs", id, &machine])?;
    ensure!(
        log["output"]
            .as_str()
            .is_some_and(|o| o.contains("activation step 40 of 40")),
        "logs {id} {machine} printed no activation output: {log}"
    );
    let (machine_s, history) = run(&["machine", &machine])?;
    ensure!(
        count(&history) >= 5,
        "machine {machine} listed {} deployments, not 5 or more",
        count(&history)
    );

    let started = Instant::now();
    let floor_log = operator
        .clone()
        .get_machine_log(GetMachineLogRequest {
            machine: machine.clone(),
            deployment_id: id.to_owned(),
        })
        .await
        .context("GetMachineLog")?
        .into_inner();
    let floor_log_s = started.elapsed().as_secs_f64();
    ensure!(!floor_log.output.is_empty(), "GetMachineLog: no output");
    let started = Instant::now();
    let floor_history = operator
        .clone()
        .get_machine_history(GetMachineHistoryRequest {
            machine: machine.clone(),
            page_size: 20,
            page_token: String::new(),
        })
        .await
        .context("GetMachineHistory")?
        .into_inner();
    let floor_history_s = started.elapsed().as_secs_f64();
    ensure!(
        floor_history.entries.len() >= 5,
        "GetMachineHistory: {} entries",
        floor_history.entries.len()
    );

    let started = Instant::now();
    let mut rows = 0;
    let mut page_token = String::new();
    loop {
        let page = operator
            .clone()
            .list_machines(ListMachinesRequest {
                deployment_id: id.to_owned(),
                page_size: 1000,
                page_token,
                ..ListMachinesRequest::default()
            })
            .await
            .context("ListMachines")?
            .into_inner();
        rows += page.machines.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let floor_rows_s = started.elapsed().as_secs_f64();
    ensure!(rows == n, "ListMachines paged {rows} rows, not {n}");
    let started = Instant::now();
    let mut agents = 0;
    let mut page_token = String::new();
    loop {
        let page = operator
            .clone()
            .list_agents(ListAgentsRequest {
                page_size: 1000,
                page_token,
                ..ListAgentsRequest::default()
            })
            .await
            .context("ListAgents")?
            .into_inner();
        agents += page.agents.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let floor_agents_s = started.elapsed().as_secs_f64();
    ensure!(agents == n, "ListAgents paged {agents} agents, not {n}");
    Ok(CommandTimes {
        deployments_s,
        deployment_rows_s,
        status_s,
        watch_s,
        logs_s,
        machine_s,
        floor_log_s,
        floor_history_s,
        floor_rows_s,
        floor_agents_s,
    })
}
