//! CONFIRMING ("magic rollback"): after the health checks, prove that this
//! machine can still reach the control plane by dialling a NEW mTLS
//! connection and calling `AgentService.Confirm`. The stream's channel is
//! never used: it was opened before the new system ran and may survive a
//! firewall or routing change that blocks every new connection.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use procurator_core::control_planes::ControlPlanes;
use procurator_core::tls::{EndpointCache, TlsFiles};
use procurator_proto::v1::ConfirmRequest;
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use tokio::time::Instant;

use crate::activation::Confirm;

/// One attempt (dial, TLS, RPC) may take this long at most.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between failed attempts.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How the confirmation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Confirmed,
    /// The control plane answered no (cancelled or superseded deployment).
    Refused(String),
    /// No answer before the deadline; the last attempt's error.
    NoAnswer(String),
}

/// What one attempt came to.
#[derive(Debug)]
enum Attempt {
    /// The control plane decided: confirmed or refused.
    Answer(Verdict),
    /// Worth trying again (no connection, a transient status).
    Retry(String),
}

pub struct GrpcConfirmer {
    /// Tried in turn, the one the stream last reached first: any replica
    /// can confirm.
    pub control_planes: Arc<ControlPlanes>,
    pub tls: TlsFiles,
    pub keepalive: Duration,
    /// Shared with the stream's dialer, so a confirmation resumes its TLS session.
    pub endpoints: Arc<EndpointCache>,
}

impl GrpcConfirmer {
    async fn attempt(&self, deployment_id: &str, closure: &str) -> Attempt {
        // Reloaded each time: an operator may have replaced the certificate.
        let material = match self.tls.load() {
            Ok(material) => material,
            Err(e) => return Attempt::Retry(e.to_string()),
        };
        // `connect`: a new TCP and TLS connection is the proof.
        let mut unreachable = Vec::new();
        let mut reached = None;
        for url in self.control_planes.in_turn() {
            let endpoint = match self.endpoints.endpoint(&material, url, self.keepalive) {
                Ok(endpoint) => endpoint,
                Err(e) => return Attempt::Retry(e.to_string()),
            };
            match endpoint.connect().await {
                Ok(channel) => {
                    reached = Some(channel);
                    break;
                }
                Err(e) => unreachable.push(format!("cannot connect to {url}: {e}")),
            }
        }
        let Some(channel) = reached else {
            return Attempt::Retry(unreachable.join("; "));
        };
        let request = ConfirmRequest {
            deployment_id: deployment_id.to_owned(),
            closure: closure.to_owned(),
        };
        match AgentServiceClient::new(channel).confirm(request).await {
            Ok(response) => decide(Ok(response.into_inner())),
            Err(status) => decide(Err(status)),
        }
    }
}

/// The control plane's answer as a verdict. NOT_FOUND is an answer too:
/// the control plane was reached and will never confirm this deployment.
fn decide(answer: Result<procurator_proto::v1::ConfirmResponse, tonic::Status>) -> Attempt {
    match answer {
        Ok(response) if response.confirmed => Attempt::Answer(Verdict::Confirmed),
        Ok(response) => {
            let reason = if response.reason.trim().is_empty() {
                "the control plane refused the confirmation".to_owned()
            } else {
                crate::desired::clip(&response.reason, 1024)
            };
            Attempt::Answer(Verdict::Refused(reason))
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            Attempt::Answer(Verdict::Refused(format!(
                "the control plane does not know this deployment here: {}",
                crate::desired::clip(status.message(), 512)
            )))
        }
        Err(status) => Attempt::Retry(format!(
            "the control plane answered {:?}: {}",
            status.code(),
            crate::desired::clip(status.message(), 512)
        )),
    }
}

impl Confirm for GrpcConfirmer {
    fn confirm<'a>(
        &'a self,
        deployment_id: &'a str,
        closure: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let mut last = "no attempt finished".to_owned();
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Verdict::NoAnswer(last);
                }
                let per_attempt = ATTEMPT_TIMEOUT.min(remaining);
                match tokio::time::timeout(per_attempt, self.attempt(deployment_id, closure)).await
                {
                    Ok(Attempt::Answer(verdict)) => return verdict,
                    Ok(Attempt::Retry(e)) => {
                        tracing::debug!(error = %e, "confirmation attempt failed");
                        last = e;
                    }
                    Err(_) => {
                        last = format!("an attempt took more than {}s", per_attempt.as_secs_f32())
                    }
                }
                tokio::time::sleep(
                    RETRY_INTERVAL.min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
            }
        })
    }
}

#[cfg(test)]
mod tests;
