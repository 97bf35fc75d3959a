//! A tower layer in front of every service: a request on a connection
//! without a client certificate reaches only `AgentService.Enroll`, and a
//! request under a revoked certificate reaches nothing, even on a
//! connection that was open before the revocation. The handlers then check
//! roles (`procurator_core::tls::require_role`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use procurator_core::certificate::CertificateInfo;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::revocations::Revocations;

/// The one path a connection without a certificate may call.
pub const ENROLL_PATH: &str = "/procurator.v1.AgentService/Enroll";

#[derive(Clone)]
pub struct RequireCertificateLayer {
    pub revocations: Arc<Revocations>,
}

impl<S> tower_layer::Layer<S> for RequireCertificateLayer {
    type Service = RequireCertificate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireCertificate {
            inner,
            revocations: self.revocations.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireCertificate<S> {
    inner: S,
    revocations: Arc<Revocations>,
}

/// Why a request may not go on, if it may not.
fn refusal<B>(req: &http::Request<B>, revocations: &Revocations) -> Option<tonic::Status> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs);
    let Some(leaf) = certs.as_ref().and_then(|c| c.first().cloned()) else {
        if req.uri().path() == ENROLL_PATH {
            return None;
        }
        return Some(tonic::Status::unauthenticated(
            "a client certificate is required; a machine without one enrolls first (procurator-agent --join-token FILE)",
        ));
    };
    let info = CertificateInfo::from_der(leaf.as_ref()).ok()?;
    revocations
        .refusal(&info)
        .map(tonic::Status::permission_denied)
}

impl<S, ReqBody> tower_service::Service<http::Request<ReqBody>> for RequireCertificate<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if let Some(status) = refusal(&req, &self.revocations) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(req))
    }
}
