//! Procurator's side: `DeploymentService.Submit` as CI, then `Watch` of that
//! deployment as the operator until the event that finishes it, over
//! channels dialled before the clock starts. `GetDeployment` afterwards
//! gives the control plane's own `finished_at_ms - created_at_ms`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use procurator_core::tls::TlsFiles;
use procurator_integration_tests::{Fleet, Identity};
use procurator_proto::v1::deployment_service_client::DeploymentServiceClient;
use procurator_proto::v1::{
    DeploymentState, GetDeploymentRequest, ListAgentsRequest, ListMachinesRequest, MachineState,
    SubmitRequest, WatchRequest, event,
};
use serde::Serialize;
use tonic::transport::Channel;

/// A deployment of a few test closures takes well under a second; this only
/// catches a hang.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Client {
    runtime: tokio::runtime::Runtime,
    ci: DeploymentServiceClient<Channel>,
    operator: DeploymentServiceClient<Channel>,
}

/// One machine's state change as the watcher saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub machine: String,
    pub state: String,
    /// The event's `at_ms` minus the deployment's `created_at_ms`.
    pub server_ms: i64,
    /// When the watcher received it, from just before Submit.
    pub seen_ms: f64,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcuratorRun {
    pub deployment_id: String,
    /// Just before Submit to the finishing event on the Watch stream.
    pub ms: f64,
    /// Just before Submit to its reply.
    pub submit_ms: f64,
    /// `finished_at_ms - created_at_ms` from GetDeployment.
    pub server_ms: f64,
    /// For each machine state: when the last machine first reached it, in
    /// ms after `created_at_ms` (server clock, millisecond resolution).
    pub milestones: BTreeMap<String, i64>,
    pub steps: Vec<Step>,
}

impl Client {
    /// Dials the fleet's control plane as `ci-github` and as the operator,
    /// and makes one call on each so that both connections are up.
    pub fn connect(fleet: &Fleet) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let url = fleet.control_plane.url()?;
        let ca = fleet.pki.ca();
        let dial = |identity: Identity| {
            let url = url.clone();
            let ca = ca.clone();
            async move {
                let material = TlsFiles {
                    ca,
                    cert: identity.cert,
                    key: identity.key,
                }
                .load()?;
                let channel = material
                    .endpoint(&url, Duration::from_secs(20))?
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                let mut client = DeploymentServiceClient::new(channel);
                client
                    .list_agents(ListAgentsRequest::default())
                    .await
                    .context("ListAgents")?;
                anyhow::Ok(client)
            }
        };
        let (ci, operator) = runtime.block_on(async {
            let ci = dial(fleet.pki.identity("ci", "github")).await?;
            let operator = dial(fleet.pki.operator()).await?;
            anyhow::Ok((ci, operator))
        })?;
        Ok(Self {
            runtime,
            ci,
            operator,
        })
    }

    /// Submits `artifact_json` and follows it until it finishes; fails
    /// unless it Succeeded.
    pub fn deploy(&mut self, artifact_json: String) -> Result<ProcuratorRun> {
        let (ci, operator) = (&mut self.ci, &mut self.operator);
        self.runtime.block_on(async {
            tokio::time::timeout(DEPLOY_TIMEOUT, deploy(ci, operator, artifact_json))
                .await
                .with_context(|| format!("the deployment did not finish in {DEPLOY_TIMEOUT:?}"))?
        })
    }
}

struct Seen {
    at_ms: i64,
    seen_ms: f64,
    machine: String,
    state: String,
    message: String,
}

async fn deploy(
    ci: &mut DeploymentServiceClient<Channel>,
    operator: &mut DeploymentServiceClient<Channel>,
    artifact_json: String,
) -> Result<ProcuratorRun> {
    let t0 = Instant::now();
    let reply = ci
        .submit(SubmitRequest {
            artifact_json,
            force: false,
            on: Vec::new(),
        })
        .await
        .context("Submit")?
        .into_inner();
    let submit_ms = ms_since(t0);
    if !reply.created {
        bail!(
            "Submit returned the existing deployment {}: the artifact was not fresh",
            reply.deployment_id
        );
    }
    let mut stream = operator
        .watch(WatchRequest {
            deployment_id: reply.deployment_id.clone(),
            from_revision: reply.revision.saturating_sub(1),
        })
        .await
        .context("Watch")?
        .into_inner();
    let mut seen = Vec::new();
    let mut finished = None;
    while let Some(event) = stream.message().await.context("the Watch stream")? {
        let seen_ms = ms_since(t0);
        match event.kind {
            Some(event::Kind::Machine(m)) => seen.push(Seen {
                at_ms: event.at_ms,
                seen_ms,
                machine: m.machine,
                state: state_name(m.state),
                message: m.message,
            }),
            Some(event::Kind::Finished(f)) => {
                finished = Some((f.state, f.summary, seen_ms));
                break;
            }
            _ => {}
        }
    }
    let Some((state, summary, ms)) = finished else {
        bail!(
            "the Watch stream of {} ended before the deployment finished",
            reply.deployment_id
        );
    };
    let deployment = operator
        .get_deployment(GetDeploymentRequest {
            deployment_id: reply.deployment_id.clone(),
        })
        .await
        .context("GetDeployment")?
        .into_inner();
    if state != DeploymentState::Succeeded as i32 {
        // The first page of rows is enough to say what went wrong.
        let rows = operator
            .list_machines(ListMachinesRequest {
                deployment_id: reply.deployment_id.clone(),
                ..ListMachinesRequest::default()
            })
            .await
            .context("ListMachines")?
            .into_inner()
            .machines;
        let machines: Vec<String> = rows
            .iter()
            .map(|m| {
                format!(
                    "{}: {} {} {}",
                    m.machine,
                    state_name(m.state),
                    m.reason,
                    m.output_tail
                )
            })
            .collect();
        bail!(
            "deployment {} ended {} ({summary:?}), not Succeeded:\n{}",
            reply.deployment_id,
            DeploymentState::try_from(state)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_else(|_| state.to_string()),
            machines.join("\n")
        );
    }
    let created = deployment.created_at_ms;
    let mut milestones: BTreeMap<String, i64> = BTreeMap::new();
    let mut first: BTreeMap<(String, String), i64> = BTreeMap::new();
    for s in &seen {
        first
            .entry((s.machine.clone(), s.state.clone()))
            .or_insert(s.at_ms - created);
    }
    for ((_, state), at) in first {
        let slot = milestones.entry(state).or_insert(at);
        *slot = (*slot).max(at);
    }
    Ok(ProcuratorRun {
        deployment_id: reply.deployment_id,
        ms,
        submit_ms,
        server_ms: (deployment.finished_at_ms - created) as f64,
        milestones,
        steps: seen
            .into_iter()
            .map(|s| Step {
                machine: s.machine,
                state: s.state,
                server_ms: s.at_ms - created,
                seen_ms: s.seen_ms,
                message: s.message,
            })
            .collect(),
    })
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// `COPYING` for `MACHINE_STATE_COPYING`.
pub fn state_name(state: i32) -> String {
    MachineState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("MACHINE_STATE_")
                .to_owned()
        })
        .unwrap_or_else(|_| state.to_string())
}
