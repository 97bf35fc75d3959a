//! Renewing the agent's certificate before it ends: two thirds into its
//! life the agent makes a new key and asks the control plane to sign it
//! (`Renew`, authenticated by the current certificate), installs the pair,
//! and its next connections use it. Warns from 14 days before the end (or
//! once a short-lived certificate's renewal is overdue) and says clearly
//! when it has expired.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::backoff::Backoff;
use procurator_core::certificate::{CertificateInfo, format_utc};
use procurator_core::control_planes::ControlPlanes;
use procurator_core::pki;
use procurator_core::tls::{TlsFiles, TlsMaterial};
use procurator_proto::v1::RenewRequest;
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CALL_TIMEOUT, MAX_CHAIN_BYTES, check_issued, expired_advice, install};

/// How often an expired certificate, or a refused renewal, is reported
/// and looked at again (an operator may have put a new one in place).
const RECHECK: Duration = Duration::from_secs(3600);
/// The longest sleep before the files are read again.
const LONGEST_SLEEP: Duration = Duration::from_secs(24 * 3600);
/// How often an expiry warning is repeated.
const WARNING_INTERVAL: Duration = Duration::from_secs(6 * 3600);

pub struct Renewer {
    pub files: TlsFiles,
    pub control_planes: Arc<ControlPlanes>,
    pub keepalive: Duration,
}

/// What one look at the certificate led to.
enum Next {
    /// Look again after this long.
    After(Duration),
    /// A renewal failed in a way that may pass: back off.
    Retry,
}

impl Renewer {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
        let mut warned: Option<Instant> = None;
        loop {
            let wait = match self.step(&mut warned).await {
                Next::After(wait) => {
                    backoff.reset();
                    wait
                }
                Next::Retry => backoff.next_delay(&mut rand::rng()),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn step(&self, warned: &mut Option<Instant>) -> Next {
        let material = match self.files.load() {
            Ok(material) => material,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this agent's certificate to renew it");
                return Next::After(RECHECK);
            }
        };
        let Some(info) = material.certificate_info() else {
            return Next::After(RECHECK);
        };
        let now = now_secs();
        if info.expired_at(now) {
            tracing::error!("{}", expired_advice(&info, &self.files.cert));
            return Next::After(RECHECK);
        }
        if now < info.renew_at() {
            let wait = Duration::from_secs((info.renew_at() - now).unsigned_abs());
            return Next::After(wait.min(LONGEST_SLEEP));
        }
        if let Some(warning) = info.expiry_warning(now)
            && warned.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL)
        {
            tracing::warn!("{warning}; it is not renewed yet");
            *warned = Some(Instant::now());
        }
        self.renew(&material, &info).await
    }

    /// Ask each control plane in turn, the one that answered last first.
    async fn renew(&self, material: &TlsMaterial, current: &CertificateInfo) -> Next {
        let (key_pem, csr_pem) = match pki::certificate_request(current.identity.name.as_str()) {
            Ok(request) => request,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a key to renew the certificate with");
                return Next::Retry;
            }
        };
        let mut last_error = String::new();
        for url in self.control_planes.in_turn() {
            let url = url.to_owned();
            match self.call(material, &url, csr_pem.clone()).await {
                Ok(issued) => {
                    self.control_planes.answered(&url);
                    let renewed = match check_issued(&material.ca_pem, &issued, &key_pem, |got| {
                        *got == current.identity
                    }) {
                        Ok(info) => info,
                        Err(why) => {
                            tracing::error!(
                                control_plane = url,
                                "the control plane sent a renewed certificate this agent will not use: {why}"
                            );
                            return Next::After(RECHECK);
                        }
                    };
                    if let Err(e) =
                        install(&self.files, &key_pem, issued.certificate_pem.as_bytes())
                    {
                        tracing::error!(error = %e, "cannot install the renewed certificate");
                        return Next::Retry;
                    }
                    tracing::info!(
                        identity = %renewed.identity,
                        serial = renewed.serial,
                        previous_serial = current.serial,
                        not_after = format_utc(renewed.not_after),
                        "renewed this agent's certificate"
                    );
                    let wait = (renewed.renew_at() - now_secs()).max(1).unsigned_abs();
                    return Next::After(Duration::from_secs(wait).min(LONGEST_SLEEP));
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(
                        control_plane = url,
                        retry_in = ?RECHECK,
                        "the control plane does not renew certificates ({}); start it with --issuing-ca-cert and --issuing-ca-key, or replace {} before {}",
                        status.message(),
                        self.files.cert.display(),
                        format_utc(current.not_after)
                    );
                    return Next::After(RECHECK);
                }
                Err(status) if status.code() == tonic::Code::PermissionDenied => {
                    tracing::error!(
                        control_plane = url,
                        retry_in = ?RECHECK,
                        "the control plane refuses to renew this agent's certificate: {}",
                        status.message()
                    );
                    return Next::After(RECHECK);
                }
                Err(status) => {
                    self.control_planes.failed(&url);
                    last_error = format!("{url}: {:?}: {}", status.code(), status.message());
                }
            }
        }
        tracing::warn!(
            error = last_error,
            "cannot renew this agent's certificate yet"
        );
        Next::Retry
    }

    async fn call(
        &self,
        material: &TlsMaterial,
        url: &str,
        csr_pem: String,
    ) -> Result<procurator_proto::v1::IssuedCertificate, tonic::Status> {
        let endpoint = material
            .endpoint(url, self.keepalive)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let call = async {
            let channel = endpoint.connect().await.map_err(|e| {
                tonic::Status::unavailable(format!(
                    "cannot connect: {}",
                    procurator_core::error_chain(&e)
                ))
            })?;
            AgentServiceClient::new(channel)
                .max_decoding_message_size(MAX_CHAIN_BYTES + 4096)
                .renew(RenewRequest { csr_pem })
                .await
                .map(tonic::Response::into_inner)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
    }
}

fn now_secs() -> i64 {
    procurator_core::now_ms().div_euclid(1000)
}
