//! The operator's side of a swarm run: deployment.json for N machines,
//! Submit, and `watch` streams that time what they receive.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use procurator_proto::v1::deployment_service_client::DeploymentServiceClient;
use procurator_proto::v1::{
    Deployment, DeploymentState, Event, GetDeploymentRequest, SubmitRequest, WatchRequest, event,
};
use serde_json::Value;
use tonic::Streaming;
use tonic::transport::Channel;

use super::agents::unix_micros;

pub type Client = DeploymentServiceClient<Channel>;

/// deployment.json for machines `<prefix>-0..n` (shared with the tests).
pub use procurator_integration_tests::simulated::artifact;

/// Submits; the deployment id, the Unix microseconds just before the call
/// and when it returned (the control plane answers once the deployment is
/// stored and its first machines are scheduled).
pub async fn submit(client: &mut Client, artifact: &Value) -> Result<(String, u64, u64)> {
    let request = SubmitRequest {
        artifact_json: artifact.to_string(),
        force: false,
        on: Vec::new(),
    };
    let at = unix_micros();
    let response = client.submit(request).await.context("Submit")?.into_inner();
    if !response.created {
        bail!(
            "the control plane already had this deployment ({})",
            response.deployment_id
        );
    }
    Ok((response.deployment_id, at, unix_micros()))
}

pub async fn get(client: &mut Client, id: &str) -> Result<Deployment> {
    Ok(client
        .get_deployment(GetDeploymentRequest {
            deployment_id: id.to_owned(),
        })
        .await
        .context("GetDeployment")?
        .into_inner())
}

/// What one watcher saw of one deployment.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    pub events: u64,
    /// Receipt of the first and the last event, Unix microseconds.
    pub first_us: u64,
    pub last_us: u64,
    /// The largest receipt time minus the event's own time, milliseconds.
    pub max_lag_ms: i64,
    pub finished: Option<DeploymentState>,
    /// Times a revision did not follow the one before (one missed, or one
    /// seen again): the log is gapless, so this must stay 0.
    pub gaps: u64,
}

impl Watched {
    pub fn events_per_second(&self) -> f64 {
        let span = self.last_us.saturating_sub(self.first_us) as f64 / 1e6;
        if span > 0.0 {
            self.events as f64 / span
        } else {
            f64::NAN
        }
    }
}

/// Opens a `watch` of every event after `from_revision`: the deployment is
/// not submitted yet, so there is no id to follow. Returns once the control
/// plane is following.
pub async fn open_watch(mut client: Client, from_revision: u64) -> Result<Streaming<Event>> {
    Ok(client
        .watch(WatchRequest {
            deployment_id: String::new(),
            from_revision,
        })
        .await
        .context("Watch")?
        .into_inner())
}

/// Counts the events of the deployment `id` names (once known) until it
/// finishes or `timeout` passes. Before the id is known, any deployment's
/// events count: the swarm submits one at a time.
pub async fn follow(
    mut stream: Streaming<Event>,
    id: tokio::sync::watch::Receiver<Option<String>>,
    timeout: Duration,
) -> Result<Watched> {
    let mut seen = Watched::default();
    let mut last_revision = None;
    let following = async {
        while let Some(event) = stream.message().await.context("the watch stream")? {
            let now = unix_micros();
            if last_revision.is_some_and(|last: u64| event.revision != last + 1) {
                seen.gaps += 1;
            }
            last_revision = Some(event.revision);
            let other = id
                .borrow()
                .as_deref()
                .is_some_and(|wanted| wanted != event.deployment_id);
            // Agents' connection events belong to no deployment.
            if other || event.deployment_id.is_empty() {
                continue;
            }
            if seen.events == 0 {
                seen.first_us = now;
            }
            seen.events += 1;
            seen.last_us = now;
            let lag = (now / 1000) as i64 - event.at_ms;
            seen.max_lag_ms = seen.max_lag_ms.max(lag);
            if let Some(event::Kind::Finished(done)) = event.kind {
                seen.finished = Some(done.state());
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("the watch stream ended before the deployment finished")
    };
    tokio::time::timeout(timeout, following)
        .await
        .with_context(|| format!("the deployment did not finish within {timeout:?}"))??;
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_artifact_is_a_valid_deployment() {
        let value = artifact("m", 3, 7, 30);
        let parsed = procurator_core::DeploymentArtifact::from_json(value.to_string().as_bytes());
        let parsed = parsed.expect("a valid deployment.json");
        assert_eq!(parsed.closures.len(), 3);
        let paths: std::collections::BTreeSet<_> =
            parsed.closures.values().map(|p| p.to_string()).collect();
        assert_eq!(paths.len(), 3, "every machine has its own closure");
    }
}
