//! A tower layer around every gRPC service that counts finished calls by
//! method and status, so that no handler has to.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::BodyExt as _;
use tonic::Code;
use tonic::codegen::{Bytes, StdError};

use super::Metrics;

pub const SUBMIT_PATH: &str = "/procurator.v1.DeploymentService/Submit";

/// Label for paths no service answers: a peer must not be able to create
/// a time series per made-up method name.
const UNKNOWN_METHOD: &str = "unknown";

#[derive(Clone)]
pub struct RpcMetricsLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // An error before the first message is a trailers-only response:
            // the status is in the headers.
            if let Some(code) = status_of(response.headers()) {
                metrics.rpc_finished(label(&method, code), code);
                return Ok(response.map(tonic::body::Body::new));
            }
            // Otherwise the status arrives in the trailers at the end of
            // the body; a call whose body is dropped before that (the peer
            // went away) is not counted.
            Ok(response.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    if let Some(code) = frame.trailers_ref().and_then(status_of) {
                        metrics.rpc_finished(label(&method, code), code);
                    }
                    frame
                }))
            }))
        })
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

fn label(method: &str, code: Code) -> &str {
    if code == Code::Unimplemented {
        UNKNOWN_METHOD
    } else {
        method
    }
}
