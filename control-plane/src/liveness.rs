//! A replica's heartbeat among those sharing the store, the reaping of the
//! ones that stopped, and the streams this one must let go: those another
//! replica has taken over, and all of them when this one cannot write the
//! store (so that their agents move to a replica that can).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;
use crate::store::{Heartbeat, REPLICA_HEARTBEAT, REPLICA_TIMEOUT};

/// A heartbeat older than this means this replica itself was cut off, and
/// may not judge the others dead by theirs.
const OWN_BEAT_FRESH: Duration = Duration::from_secs(5);

/// Heartbeat every [`REPLICA_HEARTBEAT`] until `stop`.
pub async fn run(dispatcher: Dispatcher, stop: CancellationToken) {
    let (store, connections) = (&dispatcher.store, &dispatcher.connections);
    let mut interval = tokio::time::interval(REPLICA_HEARTBEAT);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = Instant::now();
    let mut let_go = false;
    let mut watermark = store.last_generation().await.unwrap_or(0);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let reap = last_beat.elapsed() < OWN_BEAT_FRESH;
        match store.replica_heartbeat(reap).await {
            Ok(Heartbeat::Alive { reaped, ticks }) => {
                last_beat = Instant::now();
                let_go = false;
                if dispatcher.set_ticking(ticks) {
                    tracing::info!(ticks, "the periodic scheduler tick moved");
                }
                crate::store::log_reaped(&reaped);
                if !reaped.is_empty() {
                    // Their agents' rows may now be unreachable, or sendable here.
                    let _ = dispatcher.kick_full().await;
                }
            }
            Ok(Heartbeat::Revived { replica }) => {
                last_beat = Instant::now();
                let streams = connections.close_all();
                tracing::warn!(
                    replica,
                    streams,
                    "the other replicas judged this one dead while it could not write the store; its streams end so that their agents connect again"
                );
            }
            Err(e) if !let_go && last_beat.elapsed() >= REPLICA_TIMEOUT => {
                let_go = true;
                let streams = connections.close_all();
                tracing::error!(
                    error = %e,
                    streams,
                    "cannot write the store for {}s: ending every stream held here so that its agents move to a replica that can",
                    REPLICA_TIMEOUT.as_secs()
                );
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
        // Streams a newer connection on another replica has replaced, when
        // the old one did not notice its agent leave (a half-open TCP
        // connection, a partition).
        match store.connected_elsewhere(watermark).await {
            Ok(newer) => {
                for (machine, generation) in newer {
                    watermark = watermark.max(generation);
                    if connections.close_if_older(&machine, generation) {
                        tracing::info!(%machine, generation, "the agent connected to another replica; ending its stream here");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read which agents moved"),
        }
    }
}
