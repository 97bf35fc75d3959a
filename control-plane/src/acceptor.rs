//! Accepting TLS connections: every handshake in a task of its own. tonic's
//! built-in acceptor runs all pending handshakes in one task, so a fleet
//! reconnecting at once was handshaken by one core. The rustls configuration
//! ([`TlsMaterial::rustls_server_config`], the current one of
//! [`ServerTls`]) also hands out session tickets, so an agent's
//! confirmation over a new connection resumes its session.
//!
//! [`TlsMaterial::rustls_server_config`]: procurator_core::tls::TlsMaterial::rustls_server_config
//!
//! tonic reads the peer's certificates from the `TlsStream` it is given,
//! exactly as from its own acceptor.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::tls::HANDSHAKE_TIMEOUT;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::server_tls::ServerTls;

/// Handshaken connections waiting for tonic to pick them up.
const READY_QUEUE: usize = 1024;
/// After an accept error (e.g. out of file descriptors), wait before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Handshakes in flight at once. A connection past this is closed at once,
/// so peers that never finish a handshake cannot hold every descriptor.
pub const MAX_HANDSHAKES: usize = 8192;
/// How long a new connection may take to send its first byte (the start of
/// a ClientHello): an idle socket is dropped long before the handshake's
/// own timeout.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);

pub type Incoming = ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// The next connection on `listener`, or `None` once `stop` fires. An
/// accept error (e.g. out of file descriptors) passes: it is logged as a
/// failure to accept `what`, and accepting goes on after a pause.
pub async fn accept_next(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => return Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept {what}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Accepts on `listener` until `stop`, yielding connections whose TLS
/// handshake completed within [`HANDSHAKE_TIMEOUT`]. Each handshake is
/// counted in `metrics` by its kind (full or resumed) or as failed.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Incoming {
    let (ready_tx, ready_rx) = mpsc::channel(READY_QUEUE);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        while let Some(stream) = accept_next(&listener, &stop, "a connection").await {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                metrics.tls_handshake_failed();
                tracing::debug!("{MAX_HANDSHAKES} handshakes in flight; closing a new connection");
                continue;
            };
            // Without this a small reply (a confirmation) can wait 40 ms for
            // the peer's delayed ACK.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot turn Nagle's algorithm off");
            }
            // The material current now: a reload changes the next handshake.
            let acceptor = TlsAcceptor::from(tls.current());
            let (ready_tx, metrics) = (ready_tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let peer = stream.peer_addr().ok();
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await,
                    Ok(Ok(1))
                ) {
                    metrics.tls_handshake_failed();
                    tracing::debug!(?peer, "nothing sent within {FIRST_BYTE_TIMEOUT:?}; closed");
                    return;
                }
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        metrics.tls_handshake(tls.get_ref().1.handshake_kind());
                        let _ = ready_tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failed();
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failed();
                        tracing::debug!(?peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(ready_rx)
}
