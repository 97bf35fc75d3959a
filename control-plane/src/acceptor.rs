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
    let budget = Arc::new(LogBudget::default());
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
            let (ready_tx, metrics, budget) = (ready_tx.clone(), metrics.clone(), budget.clone());
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
                        log_refusal(&budget, peer, &e);
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

/// Refused certificates logged per window; past that they are counted and
/// the count logged with the next one, so a peer that retries in a loop
/// cannot fill the log.
const REFUSALS_PER_WINDOW: u32 = 20;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
struct LogBudget {
    /// When the window began, lines logged in it, lines left out since the last logged.
    state: std::sync::Mutex<Option<(std::time::Instant, u32, u64)>>,
}

impl LogBudget {
    /// `Some(left out before this one)` if this line may be logged.
    fn take(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, logged, left_out) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= REFUSAL_WINDOW {
            (*start, *logged) = (now, 0);
        }
        if *logged < REFUSALS_PER_WINDOW {
            *logged += 1;
            Some(std::mem::take(left_out))
        } else {
            *left_out += 1;
            None
        }
    }
}

/// A handshake that failed on the client's certificate is the operator's
/// business (an expired, revoked or foreign certificate): a warning with
/// the peer and the reason. Anything else (a port scan, a client that went
/// away) stays at debug.
fn log_refusal(budget: &LogBudget, peer: Option<std::net::SocketAddr>, error: &std::io::Error) {
    let certificate = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<tokio_rustls::rustls::Error>())
        .and_then(|e| match e {
            tokio_rustls::rustls::Error::InvalidCertificate(reason) => Some(reason),
            _ => None,
        });
    let Some(reason) = certificate else {
        tracing::debug!(?peer, error = %error, "TLS handshake failed");
        return;
    };
    let Some(left_out) = budget.take() else {
        return;
    };
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    let reason = describe(reason);
    if left_out > 0 {
        tracing::warn!(
            peer,
            reason,
            left_out,
            "refused a client certificate (and {left_out} more since the last logged)"
        );
    } else {
        tracing::warn!(peer, reason, "refused a client certificate");
    }
}

/// rustls' reason in the words the operator looks for.
fn describe(reason: &tokio_rustls::rustls::CertificateError) -> String {
    use procurator_core::certificate::format_utc;
    use tokio_rustls::rustls::CertificateError;
    match reason {
        CertificateError::ExpiredContext { not_after, .. } => {
            let secs = i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX);
            format!("expired on {}", format_utc(secs))
        }
        CertificateError::Expired => "expired".into(),
        CertificateError::Revoked => "revoked".into(),
        CertificateError::UnknownIssuer => "unknown CA: not signed by the fleet CA".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not valid yet (is a clock wrong?)".into()
        }
        other => other.to_string(),
    }
}
