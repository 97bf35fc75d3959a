//! The agent's own certificate. The machine makes its key where it runs,
//! enrolls with a one-time join token for a certificate of that key
//! ([`enroll`]), keeps both in its state directory, and renews them two
//! thirds into their life ([`renewal`]). Nothing the control plane sends
//! is installed unless it is a certificate of the fleet CA, for this
//! machine and for the key the machine made.

pub mod renewal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use procurator_core::backoff::{BASE, Backoff};
use procurator_core::certificate::{CertificateInfo, format_utc};
use procurator_core::control_planes::ControlPlanes;
use procurator_core::tls::{TlsFiles, enrollment_endpoint, verify_client_chain};
use procurator_core::{Identity, MachineName, Role, atomic_file, pki};
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use procurator_proto::v1::{EnrollRequest, IssuedCertificate};
use tokio_util::sync::CancellationToken;

/// A join token file holds one token (`pjt_` and 43 base64url characters)
/// and perhaps a newline; anything longer is not one.
pub const JOIN_TOKEN_MAX_BYTES: u64 = 256;
/// How long one enrollment or renewal call may take, connection included
/// (a control plane waits up to 2 s before answering).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest certificate chain accepted from the control plane.
const MAX_CHAIN_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("the join token file {path}: {why}")]
    TokenFile { path: PathBuf, why: String },
    #[error(
        "the control plane at {url} refused to enroll {machine}: {message}. Ask an operator for a new token (`procurator-ctl enroll-token --name {machine}`), put it in {token_file} and start the agent again"
    )]
    Refused {
        url: String,
        machine: MachineName,
        message: String,
        token_file: PathBuf,
    },
    #[error(
        "the control plane at {url} does not enroll machines ({why}): start it with --issuing-ca-cert and --issuing-ca-key, or give this agent --tls-cert and --tls-key"
    )]
    EnrollmentOff { url: String, why: String },
    #[error("the control plane at {url} sent a certificate this agent will not use: {why}")]
    BadCertificate { url: String, why: String },
    #[error("cannot make a key and certificate request: {0}")]
    Request(#[from] pki::PkiError),
    #[error("cannot read the fleet CA {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the certificate in {path}: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stopped before the machine was enrolled")]
    Cancelled,
}

/// A join token, read from its file. Its text is never logged.
pub struct JoinToken {
    pub path: PathBuf,
    token: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinToken({})", self.path.display())
    }
}

impl JoinToken {
    pub fn read(path: &Path) -> Result<Self, CredentialError> {
        let refuse = |why: String| CredentialError::TokenFile {
            path: path.to_owned(),
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| refuse(format!("cannot open it: {e}")))?;
        let mut text = String::new();
        use std::io::Read as _;
        file.take(JOIN_TOKEN_MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| refuse(format!("cannot read it: {e}")))?;
        if text.len() as u64 > JOIN_TOKEN_MAX_BYTES {
            return Err(refuse(format!(
                "it is longer than {JOIN_TOKEN_MAX_BYTES} bytes; it should hold only the token `procurator-ctl enroll-token` printed"
            )));
        }
        let token = text.trim();
        let well_formed = token.strip_prefix("pjt_").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !well_formed {
            return Err(refuse(
                "it does not hold a join token (pjt_…, as `procurator-ctl enroll-token` prints)"
                    .into(),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            token: token.to_owned(),
        })
    }
}

/// Get a certificate for `machine` with `token`, from the first control
/// plane that answers, and install it and its key in `files`. Unreachable
/// control planes are tried again with backoff until `cancel`; a refusal
/// ends it, since the same token will not be accepted later.
pub async fn enroll(
    files: &TlsFiles,
    control_planes: &ControlPlanes,
    machine: &MachineName,
    token: &JoinToken,
    max_backoff: Duration,
    cancel: &CancellationToken,
) -> Result<CertificateInfo, CredentialError> {
    let ca_pem = std::fs::read(&files.ca).map_err(|source| CredentialError::Ca {
        path: files.ca.clone(),
        source,
    })?;
    let (key_pem, csr_pem) = pki::certificate_request(machine.as_str())?;
    let request = EnrollRequest {
        machine: machine.to_string(),
        token: token.token.clone(),
        csr_pem,
    };
    let mut backoff = Backoff::new(BASE, max_backoff);
    loop {
        let url = control_planes.current().to_owned();
        let answer = tokio::select! {
            answer = call_enroll(&ca_pem, &url, request.clone()) => answer,
            _ = cancel.cancelled() => return Err(CredentialError::Cancelled),
        };
        match answer {
            Ok(issued) => {
                control_planes.answered(&url);
                let expected = pki::identity(Role::Agent, machine.as_str(), false)?;
                let info = check_issued(&ca_pem, &issued, &key_pem, |got| {
                    got.role == expected.role && got.name == expected.name
                })
                .map_err(|why| CredentialError::BadCertificate {
                    url: url.clone(),
                    why,
                })?;
                install(files, &key_pem, issued.certificate_pem.as_bytes())?;
                tracing::info!(
                    identity = %info.identity,
                    serial = info.serial,
                    not_after = format_utc(info.not_after),
                    cert = %files.cert.display(),
                    "enrolled"
                );
                return Ok(info);
            }
            Err(Refusal::Final(status)) => {
                return Err(match status.code() {
                    tonic::Code::FailedPrecondition | tonic::Code::Unimplemented => {
                        CredentialError::EnrollmentOff {
                            url,
                            why: status.message().to_owned(),
                        }
                    }
                    _ => CredentialError::Refused {
                        url,
                        machine: machine.clone(),
                        message: status.message().to_owned(),
                        token_file: token.path.clone(),
                    },
                });
            }
            Err(Refusal::NoClientCertificateAccepted(why)) => {
                return Err(CredentialError::EnrollmentOff { url, why });
            }
            Err(Refusal::Transient(why)) => {
                control_planes.failed(&url);
                let delay = backoff.next_delay(&mut rand::rng());
                tracing::warn!(control_plane = url, error = why, retry_in = ?delay, "cannot enroll yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(CredentialError::Cancelled),
                }
            }
        }
    }
}

enum Refusal {
    /// An answer that asking again, anywhere, will not change.
    Final(tonic::Status),
    /// The control plane wants a client certificate: enrollment is off there.
    NoClientCertificateAccepted(String),
    Transient(String),
}

async fn call_enroll(
    ca_pem: &[u8],
    url: &str,
    request: EnrollRequest,
) -> Result<IssuedCertificate, Refusal> {
    let endpoint =
        enrollment_endpoint(ca_pem, url).map_err(|e| Refusal::Transient(e.to_string()))?;
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| {
            let chain = procurator_core::error_chain(&e);
            if chain.contains("CertificateRequired") {
                Refusal::NoClientCertificateAccepted(
                    "it accepts only connections with a client certificate".into(),
                )
            } else {
                Refusal::Transient(format!("cannot connect: {chain}"))
            }
        })?;
        AgentServiceClient::new(channel)
            .max_decoding_message_size(MAX_CHAIN_BYTES + 4096)
            .enroll(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(classify)
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::Transient(format!(
                "no answer within {}s",
                CALL_TIMEOUT.as_secs()
            )))
        })
}

fn classify(status: tonic::Status) -> Refusal {
    use tonic::Code;
    match status.code() {
        Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::Unauthenticated => Refusal::Final(status),
        _ => Refusal::Transient(format!(
            "the control plane answered {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// The certificate in `issued`, if it is one this agent may install: the
/// fleet CA's, for `key_pem`, valid now and for an identity `wanted` takes.
pub fn check_issued(
    ca_pem: &[u8],
    issued: &IssuedCertificate,
    key_pem: &str,
    wanted: impl Fn(&Identity) -> bool,
) -> Result<CertificateInfo, String> {
    let chain = issued.certificate_pem.as_bytes();
    if chain.len() > MAX_CHAIN_BYTES {
        return Err(format!("it is larger than {MAX_CHAIN_BYTES} bytes"));
    }
    let info = CertificateInfo::from_pem(chain).map_err(|e| e.to_string())?;
    if info.identity.role != Role::Agent || !wanted(&info.identity) {
        return Err(format!("it is {}'s", info.identity));
    }
    if !pki::certificate_is_for_key(chain, key_pem) {
        return Err("it is not for the key this machine made".into());
    }
    verify_client_chain(ca_pem, chain)
        .map_err(|e| format!("the fleet CA does not accept it: {e}"))?;
    Ok(info)
}

/// `NAME.next`, beside `path`.
fn next_of(path: &Path) -> PathBuf {
    let mut next = path.as_os_str().to_owned();
    next.push(".next");
    PathBuf::from(next)
}

/// Put a new key and certificate in place so that a crash leaves the old
/// pair or the new one: both are written beside their files as `.next`
/// (the key first), then renamed over them (the key first).
/// [`finish_interrupted_install`] completes a pair a crash interrupted.
pub fn install(files: &TlsFiles, key_pem: &str, cert_pem: &[u8]) -> Result<(), CredentialError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| CredentialError::Install { path, source }
    };
    for path in [&files.key, &files.cert] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(failed(dir))?;
        }
    }
    let (key_next, cert_next) = (next_of(&files.key), next_of(&files.cert));
    atomic_file::write_atomically(&key_next, key_pem.as_bytes(), atomic_file::PRIVATE)
        .map_err(failed(&key_next))?;
    atomic_file::write_atomically(&cert_next, cert_pem, atomic_file::PUBLIC)
        .map_err(failed(&cert_next))?;
    finish_interrupted_install(files).map_err(failed(&files.cert))
}

/// A `.next` certificate is written only after its `.next` key, so with
/// one in place the pair is whole: rename both over the old files. A
/// `.next` key alone is half a pair, and is removed.
pub fn finish_interrupted_install(files: &TlsFiles) -> std::io::Result<()> {
    let (key_next, cert_next) = (next_of(&files.key), next_of(&files.cert));
    if cert_next.exists() {
        if key_next.exists() {
            std::fs::rename(&key_next, &files.key)?;
        }
        std::fs::rename(&cert_next, &files.cert)?;
        for dir in [files.key.parent(), files.cert.parent()]
            .into_iter()
            .flatten()
        {
            if !dir.as_os_str().is_empty() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
    } else if key_next.exists() {
        std::fs::remove_file(&key_next)?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// What to say of an expired certificate, and how to get a new one.
pub fn expired_advice(info: &CertificateInfo, cert: &Path) -> String {
    format!(
        "this agent's certificate ({}, {}) expired on {}; it cannot renew itself. Enroll it again: `procurator-ctl enroll-token --name {}` on an operator's machine, the token in --join-token FILE, then restart the agent (or put a new certificate in place)",
        info.identity,
        cert.display(),
        format_utc(info.not_after),
        info.identity.name
    )
}

#[cfg(test)]
mod tests;
