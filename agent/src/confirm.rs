//! CONFIRMING: after activation, prove that this machine can still reach the
//! control plane — a new TLS connection with the agent's certificate and a
//! `grpc.health.v1.Health/Check` that answers SERVING.

use std::time::Duration;

use futures::future::BoxFuture;
use procurator_core::tls::TlsFiles;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::activation::Confirm;

const RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub struct HealthConfirmer {
    pub url: String,
    pub tls: TlsFiles,
    pub keepalive: Duration,
}

impl HealthConfirmer {
    async fn attempt(&self) -> Result<(), String> {
        let material = self.tls.load().map_err(|e| e.to_string())?;
        let endpoint = material
            .endpoint(&self.url, self.keepalive)
            .map_err(|e| e.to_string())?;
        // `connect`, not the stream's channel: a fresh connection is the proof.
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("health check answered {:?}: {}", s.code(), s.message()))?;
        match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("the control plane reports {}", other.as_str_name())),
        }
    }
}

impl Confirm for HealthConfirmer {
    fn confirm(&self, timeout: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let mut last = "no attempt finished".to_owned();
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(last);
                }
                match tokio::time::timeout(remaining, self.attempt()).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "confirmation attempt failed");
                        last = e;
                    }
                    Err(_) => return Err(last),
                }
                tokio::time::sleep(
                    RETRY_INTERVAL.min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
            }
        })
    }
}
