//! Certificates the control plane signs: an agent's first, for a join
//! token (`Enroll`), and each next one, for its current certificate
//! (`Renew`). Off unless the control plane has an issuing CA.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::certificate::format_utc;
use procurator_core::pki::{CertificateRequest, IssuingCa, Signed, SigningError};
use procurator_core::tls::TlsMaterial;
use procurator_core::{Identity, MachineName, Role};
use procurator_proto::v1::{EnrollRequest, IssuedCertificate, RenewRequest};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tonic::Status;

use crate::revocations::Revocations;
use crate::store::{Redeemed, Store, TokenRefusal};

/// Signings at once; a request past this is told to retry. Each is a
/// store write and a signature: this bounds what unauthenticated callers
/// of `Enroll` can make the control plane do.
const MAX_SIGNINGS: usize = 32;
/// The shortest and longest `--agent-cert-validity`.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);
pub const MAX_VALIDITY: Duration = Duration::from_secs(825 * 24 * 3600);
/// The default `--agent-cert-validity`: 30 days.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest a join token may be valid for, and its default.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The issuing CA and the validity of what it signs.
pub struct Enrollment {
    ca: IssuingCa,
    validity: Duration,
    signings: Semaphore,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("cannot load the issuing CA: {0}")]
    Load(#[from] procurator_core::pki::PkiError),
    #[error(
        "--agent-cert-validity must be between {} s and {} days",
        MIN_VALIDITY.as_secs(),
        MAX_VALIDITY.as_secs() / 86_400
    )]
    Validity,
    #[error(
        "certificates the issuing CA signs are not accepted under --tls-ca ({0}); give --issuing-ca-cert a CA that --tls-ca holds or one below it"
    )]
    Unchained(String),
    #[error("a test signing by the issuing CA failed: {0}")]
    Sign(#[from] SigningError),
}

impl Enrollment {
    /// Loads the issuing CA and checks that what it signs verifies under
    /// the fleet CA bundle the control plane serves with.
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        validity: Duration,
        served: &TlsMaterial,
    ) -> Result<Self, EnrollmentError> {
        if !(MIN_VALIDITY..=MAX_VALIDITY).contains(&validity) {
            return Err(EnrollmentError::Validity);
        }
        let ca = IssuingCa::load(cert, key)?;
        let (_, request) = procurator_core::pki::certificate_request("check")?;
        let probe = ca.sign(
            &CertificateRequest::parse(&request)?,
            &Identity::new(Role::Agent, served.identity.name.clone()),
            OffsetDateTime::UNIX_EPOCH,
            MIN_VALIDITY,
        )?;
        served
            .verify_client_chain(probe.chain_pem.as_bytes())
            .map_err(EnrollmentError::Unchained)?;
        Ok(Self {
            ca,
            validity,
            signings: Semaphore::new(MAX_SIGNINGS),
        })
    }

    pub fn validity(&self) -> Duration {
        self.validity
    }

    fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.signings.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_SIGNINGS} certificates are being signed already; retry in a second"
            ))
        })
    }

    /// Sign for `identity`, valid from after its newest revocation.
    fn sign(
        &self,
        request: &CertificateRequest,
        identity: &Identity,
        revocations: &Revocations,
    ) -> Result<Signed, SigningError> {
        let not_before = revocations
            .revoked_identity_at(identity.role, identity.name.as_str())
            .and_then(|ms| OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000) + 1).ok())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        self.ca.sign(request, identity, not_before, self.validity)
    }

    /// `Enroll`: the token checked and used, the certificate signed.
    pub async fn enroll(
        self: &Arc<Self>,
        store: &Store,
        revocations: &Arc<Revocations>,
        request: EnrollRequest,
        peer: String,
    ) -> Result<IssuedCertificate, Status> {
        let _permit = self.permit()?;
        let machine = MachineName::parse(&request.machine)
            .map_err(|e| Status::invalid_argument(format!("machine: {e}")))?;
        let csr = parse_request(&request.csr_pem)?;
        if request.token.len() > 256 {
            return Err(Status::permission_denied(TokenRefusal::Unknown.to_string()));
        }
        let (this, revocations) = (self.clone(), revocations.clone());
        let redeemed = store
            .redeem_join_token(
                machine.clone(),
                request.token,
                peer.clone(),
                move |identity| {
                    this.sign(&csr, identity, &revocations).map(|signed| {
                        let serial = signed.info.serial.clone();
                        (signed, serial)
                    })
                },
            )
            .await?;
        let signed = match redeemed {
            Redeemed::Issued(signed) => signed,
            Redeemed::Refused(refusal) => {
                tracing::warn!(machine = %machine, peer, reason = %refusal, "enrollment refused");
                return Err(Status::permission_denied(format!(
                    "{refusal}; ask an operator for a new one: procurator-ctl enroll-token --name {machine}"
                )));
            }
            Redeemed::NotSigned(e) => {
                tracing::error!(error = %e, "signing an enrolled machine's certificate failed");
                return Err(Status::internal(e.to_string()));
            }
        };
        tracing::info!(
            identity = %signed.info.identity,
            serial = signed.info.serial,
            not_after = format_utc(signed.info.not_after),
            peer,
            "enrolled"
        );
        Ok(issued(signed).await)
    }

    /// `Renew`: the same identity, the request's new key.
    pub async fn renew(
        &self,
        store: &Store,
        revocations: &Revocations,
        identity: &Identity,
        request: RenewRequest,
    ) -> Result<IssuedCertificate, Status> {
        let _permit = self.permit()?;
        let csr = parse_request(&request.csr_pem)?;
        let signed = self
            .sign(&csr, identity, revocations)
            .map_err(|e| Status::internal(e.to_string()))?;
        store.record_renewal(identity, &signed.info).await?;
        tracing::info!(
            identity = %identity,
            serial = signed.info.serial,
            not_after = format_utc(signed.info.not_after),
            "renewed"
        );
        Ok(issued(signed).await)
    }
}

fn parse_request(pem: &str) -> Result<CertificateRequest, Status> {
    CertificateRequest::parse(pem).map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))
}

/// The answer; given only once the certificate is valid, so that the
/// caller's next handshake is accepted (after a revocation of its name a
/// new certificate starts to be valid a second later).
async fn issued(signed: Signed) -> IssuedCertificate {
    let wait = signed.info.not_before - OffsetDateTime::now_utc().unix_timestamp();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait.unsigned_abs().min(2))).await;
    }
    IssuedCertificate {
        certificate_pem: signed.chain_pem,
        serial: signed.info.serial,
        not_after_ms: signed.info.not_after.saturating_mul(1000),
    }
}
