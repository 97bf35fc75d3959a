//! Loading the fleet's TLS material and reading the peer's identity.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};

use crate::identity::{Identity, IdentityError, Rpc};

mod client_policy;

pub use client_policy::{CertificateCheck, ClientPolicy};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the certificate {path} is not usable: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("{0:?} is not a control-plane address: {1} (expected e.g. https://cp.example:7700)")]
    BadUrl(String, String),
    #[error(
        "the certificate {path} cannot serve the control plane: {why}. Give --tls-cert the control plane's own certificate (control-plane.crt, from `procurator-ctl pki init`), or issue a new one with `procurator-ctl pki issue --dir DIR --role control-plane --san NAME --force`"
    )]
    NotServer { path: PathBuf, why: String },
    #[error("TLS configuration failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the TLS material cannot be used: {0}")]
    Rustls(String),
}

/// The three files every party needs: the fleet CA, its own certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// PEM contents of [`TlsFiles`], plus the identity in the certificate.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub identity: Identity,
}

/// Never the key: a configuration printed for debugging must not leak it.
impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read(&self.ca, "CA certificate", "CERTIFICATE")?;
        let cert_pem = read(&self.cert, "certificate", "CERTIFICATE")?;
        let key_pem = read(&self.key, "private key", "PRIVATE KEY")?;
        warn_if_readable_by_others(&self.key);
        let der = first_certificate_der(&cert_pem).ok_or_else(|| TlsError::NotPem {
            what: "certificate",
            path: self.cert.clone(),
            expected: "CERTIFICATE",
        })?;
        let identity =
            Identity::from_certificate_der(&der).map_err(|source| TlsError::Identity {
                path: self.cert.clone(),
                source,
            })?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }

    /// [`Self::load`] for the control plane's own side: the certificate
    /// must be a control plane's and valid for server authentication, or
    /// every client would refuse it at its handshake (an operator's client
    /// certificate given by mistake, say).
    pub fn load_server(&self) -> Result<TlsMaterial, TlsError> {
        let material = self.load()?;
        let refuse = |why: String| TlsError::NotServer {
            path: self.cert.clone(),
            why,
        };
        if material.identity.role != crate::identity::Role::ControlPlane {
            return Err(refuse(format!(
                "it is {}'s certificate, of role {}",
                material.identity, material.identity.role
            )));
        }
        let der = first_certificate_der(&material.cert_pem).unwrap_or_default();
        if !allows_server_auth(&der) {
            return Err(refuse(
                "its extended key usage does not include server authentication".into(),
            ));
        }
        Ok(material)
    }
}

impl TlsMaterial {
    /// Its certificate's identity, serial and validity.
    pub fn certificate_info(&self) -> Option<crate::certificate::CertificateInfo> {
        crate::certificate::CertificateInfo::from_pem(&self.cert_pem).ok()
    }
}

/// Whether a DER certificate may authenticate a TLS server: no extended
/// key usage at all, or one that names serverAuth (or any purpose).
fn allows_server_auth(der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    match cert.extended_key_usage() {
        Ok(None) => true,
        Ok(Some(eku)) => eku.value.any || eku.value.server_auth,
        Err(_) => false,
    }
}

impl TlsMaterial {
    /// Server side: present our certificate, require a client certificate
    /// signed by the fleet CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Server side, as rustls configuration for an acceptor of our own:
    /// require a client certificate signed by the fleet CA, speak HTTP/2,
    /// and hand out TLS 1.3 session tickets so that a client's next
    /// connection (an agent's confirmation) resumes the session instead of
    /// repeating the certificate exchange. The ticket keys live in memory
    /// only: a restart forgets them and the next handshakes are full ones.
    /// `clients` says what else a client certificate must pass, and
    /// whether one is needed at all.
    pub fn rustls_server_config(
        &self,
        clients: &ClientPolicy,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        use std::sync::Arc;
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Rustls(format!("{what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_slice()) {
            let cert = cert.map_err(|e| bad("the CA certificate", &e))?;
            roots.add(cert).map_err(|e| bad("the CA certificate", &e))?;
        }
        let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        );
        if clients.anonymous {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = Arc::new(client_policy::PolicyVerifier {
            inner: verifier
                .build()
                .map_err(|e| bad("the client verifier", &e))?,
            check: clients.check.clone(),
        });
        let chain = rustls_pemfile::certs(&mut self.cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("the certificate", &e))?;
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_slice())
            .map_err(|e| bad("the private key", &e))?
            .ok_or_else(|| TlsError::Rustls("the key file holds no private key".into()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("the protocol versions", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad("the certificate and key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| bad("the session ticketer", &e))?;
        Ok(Arc::new(config))
    }

    /// Whether a client presenting `chain_pem` (its leaf, then its chain)
    /// passes this material's CA bundle; why not, if not.
    pub fn verify_client_chain(&self, chain_pem: &[u8]) -> Result<(), String> {
        verify_client_chain(&self.ca_pem, chain_pem)
    }

    /// Client side: trust only the fleet CA and present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }

    /// An endpoint for `url` (`https://host:port`) over mutual TLS, with
    /// HTTP/2 keepalive so a dead peer behind NAT is noticed.
    pub fn endpoint(&self, url: &str, keepalive: Duration) -> Result<Endpoint, TlsError> {
        https_endpoint(url, self.client_config(), keepalive)
    }

    /// Connect lazily: the first RPC dials.
    pub fn channel(&self, url: &str) -> Result<Channel, TlsError> {
        Ok(self.endpoint(url, Duration::from_secs(20))?.connect_lazy())
    }
}

/// An endpoint for a machine that has no certificate yet: it checks the
/// control plane by the fleet CA and presents none, which the control
/// plane accepts for `AgentService/Enroll` only.
pub fn enrollment_endpoint(ca_pem: &[u8], url: &str) -> Result<Endpoint, TlsError> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    https_endpoint(url, tls, Duration::from_secs(20))
}

fn https_endpoint(
    url: &str,
    mut tls: ClientTlsConfig,
    keepalive: Duration,
) -> Result<Endpoint, TlsError> {
    let uri: tonic::codegen::http::Uri =
        url.parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| {
                TlsError::BadUrl(url.to_owned(), e.to_string())
            })?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(TlsError::BadUrl(
            url.to_owned(),
            "it must be https://HOST:PORT".into(),
        ));
    }
    // rustls wants the bare address for IP literals (`[::1]` -> `::1`).
    if let Some(host) = uri.host() {
        tls = tls.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
    }
    Ok(Endpoint::from(uri)
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive.max(Duration::from_secs(5)))
        .keep_alive_while_idle(true))
}

/// Whether a client presenting `chain_pem` (its leaf, then its chain)
/// passes the CA bundle `ca_pem`; why not, if not.
pub fn verify_client_chain(ca_pem: &[u8], chain_pem: &[u8]) -> Result<(), String> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
    let chain = rustls_pemfile::certs(&mut &chain_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One client endpoint per loaded certificate, shared by an agent's stream
/// and its confirmations: they then share rustls' session cache, and a
/// confirmation resumes the stream's TLS session (no certificate signatures
/// to make or check) while still being a new TCP and TLS connection, which
/// is what it must prove. A replaced certificate gets a new endpoint.
#[derive(Debug, Default)]
pub struct EndpointCache {
    current: std::sync::Mutex<Option<CachedEndpoint>>,
}

#[derive(Debug)]
struct CachedEndpoint {
    url: String,
    keepalive: Duration,
    material: TlsMaterial,
    endpoint: Endpoint,
}

impl EndpointCache {
    pub fn endpoint(
        &self,
        material: &TlsMaterial,
        url: &str,
        keepalive: Duration,
    ) -> Result<Endpoint, TlsError> {
        // A plain cache: a panicking holder leaves nothing half-done.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = current.as_ref()
            && cached.url == url
            && cached.keepalive == keepalive
            && cached.material.same_files_as(material)
        {
            return Ok(cached.endpoint.clone());
        }
        let endpoint = material.endpoint(url, keepalive)?;
        *current = Some(CachedEndpoint {
            url: url.to_owned(),
            keepalive,
            material: material.clone(),
            endpoint: endpoint.clone(),
        });
        Ok(endpoint)
    }
}

impl TlsMaterial {
    fn same_files_as(&self, other: &TlsMaterial) -> bool {
        self.ca_pem == other.ca_pem
            && self.cert_pem == other.cert_pem
            && self.key_pem == other.key_pem
    }
}

/// The identity in the peer's client certificate, or the status to refuse with.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    Identity::from_certificate_der(leaf.as_ref())
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate refused: {e}")))
}

/// Refuse unless the peer holds a role that may call `rpc`.
pub fn require_role<T>(request: &tonic::Request<T>, rpc: Rpc) -> Result<Identity, tonic::Status> {
    let allowed = rpc.roles();
    let identity = peer_identity(request)?;
    if allowed.contains(&identity.role) {
        Ok(identity)
    } else {
        let allowed: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        Err(tonic::Status::permission_denied(format!(
            "{identity} may not do this; it needs a certificate with role {}",
            allowed.join(" or ")
        )))
    }
}

fn read(path: &Path, what: &'static str, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let marker = format!("-----BEGIN {expected}");
    let has_marker = String::from_utf8_lossy(&bytes).lines().any(|l| {
        l.starts_with(&marker) || (expected == "PRIVATE KEY" && l.contains("PRIVATE KEY-----"))
    });
    if has_marker {
        Ok(bytes)
    } else {
        Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        })
    }
}

pub(crate) fn first_certificate_der(pem: &[u8]) -> Option<Vec<u8>> {
    let mut reader = std::io::BufReader::new(pem);
    rustls_pemfile::certs(&mut reader)
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "private key is readable by group or others; chmod 600 it"
            );
        }
    }
}
