//! What the control plane asks of a client certificate beyond the fleet
//! CA's signature: that it is not revoked ([`CertificateCheck`]); and
//! whether a client may come without one, to enroll with a join token.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// A check of a client's leaf certificate, after its chain verified.
pub trait CertificateCheck: Send + Sync + fmt::Debug {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), CertificateError>;
}

/// How the server treats clients' certificates.
#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    /// A client may connect without a certificate. Only `Enroll`, whose
    /// join token is its credential, answers such a connection; every
    /// other RPC refuses it (the control plane's `RequireCertificate` layer).
    pub anonymous: bool,
    /// Refuses certificates the CA signed that must no longer be accepted.
    pub check: Option<Arc<dyn CertificateCheck>>,
}

/// The fleet CA's verifier, then the policy's check.
#[derive(Debug)]
pub(super) struct PolicyVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub check: Option<Arc<dyn CertificateCheck>>,
}

impl ClientCertVerifier for PolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(check) = &self.check {
            check
                .check(end_entity)
                .map_err(rustls::Error::InvalidCertificate)?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
