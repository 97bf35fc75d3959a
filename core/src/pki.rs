//! The fleet's PKI: one CA, a server certificate for the control plane, and
//! client certificates whose SAN URI carries a role and a name.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, Role};
use crate::names::MachineName;

mod signing;

pub use signing::{
    CertificateRequest, IntermediateFiles, IssuingCa, MAX_REQUEST_BYTES, Signed, SigningError,
    certificate_is_for_key, certificate_request, intermediate,
};

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "{0} already holds a fleet CA (ca.key); issue more certificates with `procurator-ctl pki issue`, or pick an empty directory"
    )]
    AlreadyInitialised(PathBuf),
    #[error(
        "{0} holds no fleet CA (ca.crt and ca.key); create one with `procurator-ctl pki init --dir {0}`"
    )]
    NoCa(PathBuf),
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("{0:?} is not a valid name for a certificate: {1}")]
    BadName(String, String),
    #[error("{0:?} is not a usable subject alternative name: {1}")]
    BadSan(String, rcgen::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("the CA in {0} cannot be loaded: {1}")]
    BadCa(PathBuf, rcgen::Error),
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("--vm-host marks agent certificates only, not role {0}")]
    VmHostNotAgent(Role),
    #[error("{0} cannot issue certificates: {1}; give the issuing CA's certificate and key")]
    NotACa(PathBuf, String),
    #[error(
        "the fleet CA in {0} allows no CA below it (it was made before issuing CAs were supported); give the control plane its ca.crt and ca.key as --issuing-ca-cert and --issuing-ca-key instead"
    )]
    NoRoomBelow(PathBuf),
}

/// Where a certificate and its key were written.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub identity: Identity,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Files `pki init` writes.
#[derive(Debug, Clone)]
pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub control_plane: IssuedFiles,
    pub operator: IssuedFiles,
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

/// Where `issue` writes the certificate and key for an identity:
/// `<role>-<name>.crt`/`.key`, or `control-plane.crt`/`.key` for the server.
pub fn leaf_paths(dir: &Path, role: Role, name: &MachineName) -> (PathBuf, PathBuf) {
    let stem = match role {
        Role::ControlPlane => "control-plane".to_owned(),
        _ => format!("{role}-{name}"),
    };
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

/// Create a fleet CA in `dir`, a server certificate for the control plane
/// (valid for `localhost`, `127.0.0.1`, `::1` and every `sans` entry) and an
/// operator certificate named `operator_name`.
pub fn init(dir: &Path, sans: &[String], operator_name: &str) -> Result<InitFiles, PkiError> {
    let ca_key_path = dir.join("ca.key");
    if ca_key_path.exists() {
        return Err(PkiError::AlreadyInitialised(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(|e| PkiError::Write(dir.to_owned(), e))?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Procurator fleet CA");
    params.distinguished_name = dn;
    // One level below it: an issuing CA (`pki intermediate`) for the
    // control plane, so that the root's key can stay offline.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;

    let ca_cert_path = ca_cert_path(dir);
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644, false)?;
    write_file(
        &ca_key_path,
        ca_key.serialize_pem().as_bytes(),
        0o600,
        false,
    )?;

    let issuer = Issuer::new(params, ca_key);
    let control_plane = issue_with(
        dir,
        &issuer,
        &identity(Role::ControlPlane, CONTROL_PLANE_NAME, false)?,
        &server_sans(sans),
        false,
    )?;
    let operator_name = parse_name(operator_name)?;
    let operator = issue_with(
        dir,
        &issuer,
        &Identity::new(Role::Operator, operator_name),
        &[],
        false,
    )?;
    Ok(InitFiles {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        control_plane,
        operator,
    })
}

/// The name in the control plane's certificate unless told otherwise.
pub const CONTROL_PLANE_NAME: &str = "control-plane";

/// The names a control plane's certificate is valid for: the loopback
/// ones, then `sans`.
pub fn server_sans(sans: &[String]) -> Vec<String> {
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for san in sans {
        if !all.contains(san) {
            all.push(san.clone());
        }
    }
    all
}

/// Issue a certificate for `role`/`name`, signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
    force: bool,
) -> Result<IssuedFiles, PkiError> {
    issue_for(dir, &identity(role, name, false)?, sans, force)
}

/// Issue a certificate for `identity` (a VM host's, say), signed by the CA in `dir`.
pub fn issue_for(
    dir: &Path,
    identity: &Identity,
    sans: &[String],
    force: bool,
) -> Result<IssuedFiles, PkiError> {
    let issuer = load_issuer(dir)?;
    issue_with(dir, &issuer, identity, sans, force)
}

/// The identity `issue` makes a certificate for, from the command line's words.
pub fn identity(role: Role, name: &str, vm_host: bool) -> Result<Identity, PkiError> {
    let name = parse_name(name)?;
    if vm_host && role != Role::Agent {
        return Err(PkiError::VmHostNotAgent(role));
    }
    Ok(Identity {
        vm_host,
        ..Identity::new(role, name)
    })
}

fn parse_name(name: &str) -> Result<MachineName, PkiError> {
    MachineName::parse(name).map_err(|e| PkiError::BadName(name.to_owned(), e.to_string()))
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let (cert_path, key_path) = (ca_cert_path(dir), dir.join("ca.key"));
    if !cert_path.exists() || !key_path.exists() {
        return Err(PkiError::NoCa(dir.to_owned()));
    }
    let cert_pem =
        fs::read_to_string(&cert_path).map_err(|e| PkiError::Read(cert_path.clone(), e))?;
    let key_pem = fs::read_to_string(&key_path).map_err(|e| PkiError::Read(key_path.clone(), e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadCa(key_path.clone(), e))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::BadCa(cert_path, e))
}

fn issue_with(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    sans: &[String],
    force: bool,
) -> Result<IssuedFiles, PkiError> {
    let (cert_path, key_path) = leaf_paths(dir, identity.role, &identity.name);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
    }
    let leaf = issue_pem(issuer, identity, sans)?;
    // The key first: a certificate without its key is useless, the reverse is harmless.
    write_file(&key_path, leaf.key_pem.as_bytes(), 0o600, force)?;
    write_file(&cert_path, leaf.cert_pem.as_bytes(), 0o644, force)?;
    Ok(IssuedFiles {
        identity: leaf.identity,
        cert: cert_path,
        key: key_path,
    })
}

/// A certificate and its key, in PEM, never written to disk.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A fleet CA loaded once to issue many certificates in memory: the agent
/// swarm benchmark gives each of its thousands of agents its own.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority { .. }")
    }
}

impl Authority {
    /// The CA `init` wrote in `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        Ok(Self {
            issuer: load_issuer(dir)?,
        })
    }

    pub fn issue(
        &self,
        role: Role,
        name: &MachineName,
        sans: &[String],
    ) -> Result<IssuedPem, PkiError> {
        issue_pem(&self.issuer, &Identity::new(role, name.clone()), sans)
    }
}

fn issue_pem(
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    sans: &[String],
) -> Result<IssuedPem, PkiError> {
    let now = OffsetDateTime::now_utc();
    let params = leaf_params(
        identity,
        sans,
        now - CLOCK_SKEW,
        now + Duration::days(LEAF_VALIDITY_DAYS),
    )?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(IssuedPem {
        identity: identity.clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// How far before its issuing a certificate is valid from: room for a
/// verifier whose clock is behind the issuer's.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// What every leaf certificate says: the identity as a SAN URI (and the
/// VM-host mark), `sans` as DNS names or IP addresses, server or client
/// authentication by role, a random serial.
fn leaf_params(
    identity: &Identity,
    sans: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for san in sans {
        params
            .subject_alt_names
            .push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    san.clone()
                        .try_into()
                        .map_err(|e| PkiError::BadSan(san.clone(), e))?,
                ),
            });
    }
    let mut uris = vec![identity.uri()];
    if identity.vm_host {
        uris.push(crate::identity::VM_HOST_URI.to_owned());
    }
    for uri in uris {
        params.subject_alt_names.push(SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|e| PkiError::BadSan(uri, e))?,
        ));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match identity.role {
        Role::ControlPlane => vec![ExtendedKeyUsagePurpose::ServerAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// 16 random bytes, positive: a renewal with the same key still gets a
/// serial of its own, and revoking one serial revokes one certificate.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The DER of the first certificate in `pem`.
fn first_pem_certificate(pem: &str) -> Option<Vec<u8>> {
    crate::tls::first_certificate_der(pem.as_bytes())
}

fn basic_constraints(der: &[u8]) -> Option<(bool, Option<u32>)> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let constraints = cert.basic_constraints().ok()??.value;
    Some((constraints.ca, constraints.path_len_constraint))
}

/// Whether a DER certificate is a CA's.
fn is_ca(der: &[u8]) -> bool {
    basic_constraints(der).is_some_and(|(ca, _)| ca)
}

/// A CA certificate's path length constraint, if it has one.
fn path_len(der: &[u8]) -> Option<u32> {
    basic_constraints(der).and_then(|(_, len)| len)
}

/// Write atomically, with the final mode from the start (a key is never
/// readable by others, not even for a moment).
fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> Result<(), PkiError> {
    if !replace && path.exists() {
        return Err(PkiError::Exists(path.to_owned()));
    }
    crate::atomic_file::write_atomically(path, contents, mode)
        .map_err(|e| PkiError::Write(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn init_then_issue_writes_identities_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let init = init(dir.path(), &["cp.example".into()], "alice").unwrap();
        assert_eq!(init.operator.identity.to_string(), "operator/alice");
        let agent = issue_as(dir.path(), Role::Agent, "worker-1", false).unwrap();
        let der = pem_to_der(&fs::read_to_string(&agent.cert).unwrap());
        let id = Identity::from_certificate_der(&der).unwrap();
        assert_eq!(id.to_string(), "agent/worker-1");
        assert!(!id.vm_host);
        for key in [
            &init.ca_key,
            &init.control_plane.key,
            &init.operator.key,
            &agent.key,
        ] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(
            init_again(dir.path()),
            Err(PkiError::AlreadyInitialised(_))
        ));
        assert!(matches!(
            issue_as(dir.path(), Role::Agent, "worker-1", false),
            Err(PkiError::Exists(_))
        ));
        issue_as(dir.path(), Role::Agent, "worker-1", true).unwrap();
        assert!(matches!(
            issue_as(dir.path(), Role::Agent, "../x", false),
            Err(PkiError::BadName(..))
        ));
    }

    #[test]
    fn a_vm_host_agent_is_marked_and_only_agents_can_be() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], "alice").unwrap();
        let host = identity(Role::Agent, "host-a", true).unwrap();
        let issued = issue_for(dir.path(), &host, &[], false).unwrap();
        let der = pem_to_der(&fs::read_to_string(&issued.cert).unwrap());
        let id = Identity::from_certificate_der(&der).unwrap();
        assert_eq!(id, host);
        assert!(id.vm_host);
        assert!(matches!(
            identity(Role::Ci, "ci", true),
            Err(PkiError::VmHostNotAgent(Role::Ci))
        ));
    }

    /// `pki issue --role control-plane`: a new server certificate from the
    /// same CA, with a name `init` was not given, replacing the old only
    /// when told to; it serves, a client certificate does not.
    #[test]
    fn the_control_planes_certificate_is_renewed_with_more_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = init(dir.path(), &["cp.example".into()], "alice").unwrap();
        let old_pem = fs::read(&first.control_plane.cert).unwrap();
        let server = identity(Role::ControlPlane, CONTROL_PLANE_NAME, false).unwrap();
        let sans = server_sans(&["cp.example".into(), "cp-2.example".into()]);
        assert!(matches!(
            issue_for(dir.path(), &server, &sans, false),
            Err(PkiError::Exists(_))
        ));
        let renewed = issue_for(dir.path(), &server, &sans, true).unwrap();
        assert_eq!(renewed.cert, first.control_plane.cert, "the same file");
        let pem = fs::read_to_string(&renewed.cert).unwrap();
        assert_ne!(pem.as_bytes(), old_pem, "a new certificate");
        let der = pem_to_der(&pem);
        let (_, cert) = <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<
            _,
        >>::from_der(&der)
        .unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        for want in [
            "localhost",
            "IPAddress(7f:00:00:01)",
            "cp.example",
            "cp-2.example",
        ] {
            assert!(
                names.iter().any(|n| n.contains(want)),
                "{want} in {names:?}"
            );
        }
        let files = |cert: &Path, key: &Path| crate::tls::TlsFiles {
            ca: ca_cert_path(dir.path()),
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        files(&renewed.cert, &renewed.key).load_server().unwrap();
        let err = files(&first.operator.cert, &first.operator.key)
            .load_server()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("it is operator/alice's certificate, of role operator")
                && err.contains("pki issue --dir DIR --role control-plane"),
            "{err}"
        );
    }

    fn issue_as(dir: &Path, role: Role, name: &str, force: bool) -> Result<IssuedFiles, PkiError> {
        issue(dir, role, name, &[], force)
    }

    #[test]
    fn issue_without_a_ca_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_as(dir.path(), Role::Ci, "ci", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pki init"), "{err}");
    }

    #[test]
    fn an_authority_issues_distinct_identities_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], "alice").unwrap();
        let ca = Authority::load(dir.path()).unwrap();
        let names = ["m-0", "m-1"].map(|n| MachineName::parse(n).unwrap());
        let issued: Vec<IssuedPem> = names
            .iter()
            .map(|n| ca.issue(Role::Agent, n, &[]).unwrap())
            .collect();
        assert_ne!(issued[0].key_pem, issued[1].key_pem);
        for (leaf, name) in issued.iter().zip(&names) {
            let id = Identity::from_certificate_der(&pem_to_der(&leaf.cert_pem)).unwrap();
            assert_eq!(id.to_string(), format!("agent/{name}"));
        }
        // Nothing was written beside the CA.
        assert!(!dir.path().join("agent-m-0.crt").exists());
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Authority::load(empty.path()),
            Err(PkiError::NoCa(_))
        ));
    }

    fn init_again(dir: &Path) -> Result<InitFiles, PkiError> {
        init(dir, &[], "bob")
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let mut reader = std::io::BufReader::new(pem.as_bytes());
        rustls_pemfile::certs(&mut reader)
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }
}
