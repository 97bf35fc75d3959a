//! The plain-HTTP/1.1 listener that serves `GET /metrics`; kept apart from
//! the mTLS port so that a Prometheus server needs no fleet certificate.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::Bytes;

use super::Metrics;
use crate::store::Store;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Accept scrapes on `listener` until `stop`; each connection is dropped
/// when `stop` fires too.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    while let Some(stream) =
        crate::acceptor::accept_next(&listener, &stop, "a metrics connection").await
    {
        let (metrics, store, stop) = (metrics.clone(), store.clone(), stop.clone());
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, store) = (metrics.clone(), store.clone());
                async move { Ok::<_, Infallible>(respond(&req, &metrics, &store).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                served = conn => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                }
            }
        });
    }
}

async fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    store: &Store,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match metrics.render(store).await {
        Ok(text) => Response::builder()
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "")),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store for a scrape");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the store\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
