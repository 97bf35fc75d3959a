//! Certificates made without their keys: a machine generates its key and a
//! certificate request ([`certificate_request`]); the control plane signs
//! the request's public key with its issuing CA ([`IssuingCa`]) for the
//! identity a join token or the machine's current certificate names, and
//! never sees the private key.
//!
//! Nothing in a request but its public key is used: its subject and any
//! extensions it asks for are ignored, so a machine cannot ask for a name,
//! a role or a CA flag.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use super::{CLOCK_SKEW, PkiError, write_file};
use crate::certificate::CertificateInfo;
use crate::identity::Identity;

/// The most bytes a certificate request may have: an RSA-4096 request is
/// under 2 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// A fresh key and a request for a certificate for it, both PEM. The
/// request's subject names `machine`, for the reader of a log; the
/// certificate's identity comes from elsewhere.
pub fn certificate_request(machine: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, machine);
    params.distinguished_name = dn;
    let request = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), request.pem()?))
}

/// Whether the first certificate of `cert_pem` is for the public half of
/// `key_pem`: a machine installs a certificate it was sent only if it is
/// for the key it made.
pub fn certificate_is_for_key(cert_pem: &[u8], key_pem: &str) -> bool {
    use rcgen::PublicKeyData as _;
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (Some(der), Ok(key)) = (
        crate::tls::first_certificate_der(cert_pem),
        KeyPair::from_pem(key_pem),
    ) else {
        return false;
    };
    X509Certificate::from_der(&der)
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.subject_public_key_info().as_slice())
}

/// A certificate request whose signature was checked: its sender holds
/// the key.
pub struct CertificateRequest(CertificateSigningRequestParams);

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateRequest { .. }")
    }
}

impl CertificateRequest {
    pub fn parse(pem: &str) -> Result<Self, SigningError> {
        if pem.len() > MAX_REQUEST_BYTES {
            return Err(SigningError::TooLarge);
        }
        CertificateSigningRequestParams::from_pem(pem)
            .map(Self)
            .map_err(SigningError::BadRequest)
    }
}

/// A signed certificate: PEM of the leaf followed by the issuing CA's
/// chain, as a client presents it.
#[derive(Debug, Clone)]
pub struct Signed {
    pub chain_pem: String,
    pub info: CertificateInfo,
}

/// The CA a control plane signs agents' certificates with: the fleet CA
/// itself, or an intermediate CA below it (`pki intermediate`).
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate and whatever its file holds after it.
    chain_pem: String,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuingCa { .. }")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("the certificate request is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error(
        "the certificate request cannot be used ({0}); send a PEM PKCS#10 request signed with its key"
    )]
    BadRequest(rcgen::Error),
    #[error("signing the certificate failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("signing the certificate failed: {0}")]
    Params(#[from] PkiError),
    #[error("the signed certificate cannot be read back: {0}")]
    ReadBack(#[from] crate::identity::IdentityError),
}

impl IssuingCa {
    /// The CA certificate (PEM, possibly followed by its own chain) and its key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem =
            std::fs::read_to_string(cert).map_err(|e| PkiError::Read(cert.to_owned(), e))?;
        let key_pem =
            std::fs::read_to_string(key).map_err(|e| PkiError::Read(key.to_owned(), e))?;
        Self::from_pem(&cert_pem, &key_pem, cert)
    }

    fn from_pem(cert_pem: &str, key_pem: &str, cert: &Path) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadCa(cert.to_owned(), e))?;
        let first = super::first_pem_certificate(cert_pem)
            .ok_or_else(|| PkiError::NotACa(cert.to_owned(), "it holds no certificate".into()))?;
        if !super::is_ca(&first) {
            return Err(PkiError::NotACa(
                cert.to_owned(),
                "its first certificate is not a CA's".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| PkiError::BadCa(cert.to_owned(), e))?;
        Ok(Self {
            issuer,
            chain_pem: cert_pem.to_owned(),
        })
    }

    /// Sign `request`'s key for `identity`, valid for `validity` from now
    /// and from `not_before` at the earliest. Its start is set back by a
    /// tenth of `validity`, [`CLOCK_SKEW`] at most, so that a machine whose
    /// clock is a little behind accepts it, and a short-lived one is still
    /// renewed two thirds into its life, not at once.
    pub fn sign(
        &self,
        request: &CertificateRequest,
        identity: &Identity,
        not_before: OffsetDateTime,
        validity: std::time::Duration,
    ) -> Result<Signed, SigningError> {
        let now = OffsetDateTime::now_utc();
        let skew = CLOCK_SKEW.min(time::Duration::try_from(validity / 10).unwrap_or(CLOCK_SKEW));
        let not_before = not_before.max(now - skew);
        let not_after = not_before.max(now) + validity;
        let params = super::leaf_params(identity, &[], not_before, not_after)?;
        let cert = params.signed_by(&request.0.public_key, &self.issuer)?;
        let info = CertificateInfo::from_der(cert.der())?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.chain_pem);
        Ok(Signed { chain_pem, info })
    }
}

/// Files `intermediate` writes.
#[derive(Debug, Clone)]
pub struct IntermediateFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// How long an issuing CA made by [`intermediate`] is valid.
const INTERMEDIATE_VALIDITY_DAYS: i64 = 5 * 365;

/// Make an issuing CA below the fleet CA in `dir`: `issuing-ca.crt` and
/// `issuing-ca.key`, for the control plane's `--issuing-ca-cert` and
/// `--issuing-ca-key`, so that `ca.key` can go offline.
pub fn intermediate(dir: &Path, force: bool) -> Result<IntermediateFiles, PkiError> {
    let root = super::load_issuer(dir)?;
    let root_pem = std::fs::read_to_string(super::ca_cert_path(dir))
        .map_err(|e| PkiError::Read(super::ca_cert_path(dir), e))?;
    if super::first_pem_certificate(&root_pem).is_some_and(|der| super::path_len(&der) == Some(0)) {
        return Err(PkiError::NoRoomBelow(dir.to_owned()));
    }
    let files = IntermediateFiles {
        cert: dir.join("issuing-ca.crt"),
        key: dir.join("issuing-ca.key"),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Procurator issuing CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + time::Duration::days(INTERMEDIATE_VALIDITY_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &root)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644, force)?;
    Ok(files)
}

#[cfg(test)]
mod tests;
