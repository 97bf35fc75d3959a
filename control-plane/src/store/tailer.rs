//! Publishing a shared log: on an engine several replicas write, each one
//! reads back what any of them committed, in revision order, and publishes
//! that. Woken by the engine's word that the log grew, and at least once a
//! second, since word is lost while its connection is down. One query per
//! wake-up, whatever the number of watchers (the shape of Kubernetes' watch
//! cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use procurator_proto::v1::Event;
use tokio::sync::broadcast;

use super::engine::LogFollower;
use super::events;

/// How long one wait for word lasts: how soon a closed store is noticed.
const WAIT: Duration = Duration::from_millis(200);
/// The log is read at least this often without word.
const POLL: Duration = Duration::from_secs(1);
/// Events read per query.
const PAGE: usize = 1000;

/// Follow the log from revision `tail` until `closed`.
pub(super) fn follow(
    mut follower: Box<dyn LogFollower>,
    publish: broadcast::Sender<Event>,
    mut tail: u64,
    closed: Arc<AtomicBool>,
) {
    let mut last_read = Instant::now();
    let mut failing = false;
    while !closed.load(Ordering::Relaxed) {
        let woke = match follower.wait(WAIT) {
            Ok(woke) => woke,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot follow the event log; retrying");
                    failing = true;
                }
                std::thread::sleep(WAIT);
                continue;
            }
        };
        if !woke && last_read.elapsed() < POLL {
            continue;
        }
        last_read = Instant::now();
        match read_from(follower.as_ref(), &publish, &mut tail) {
            Ok(()) if failing => {
                tracing::info!(revision = tail, "following the event log again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the event log; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// Publish every event after `tail`, moving it.
fn read_from(
    follower: &dyn LogFollower,
    publish: &broadcast::Sender<Event>,
    tail: &mut u64,
) -> Result<(), super::StoreError> {
    let head = events::head(follower.sql())?;
    if head < *tail {
        // Only a restore, or a failover to a standby that lacked commits,
        // moves it back; revisions after it will be reused.
        tracing::error!(
            was = *tail,
            now = head,
            "the event log's head went back: the database lost commits (restored, or failed over to an asynchronous standby); watchers should resync"
        );
        *tail = head;
        return Ok(());
    }
    while *tail < head {
        let page = events::page(follower.sql(), *tail, None, PAGE)?;
        let Some(last) = page.last() else { break };
        *tail = last.revision;
        let full = page.len() == PAGE;
        for event in page {
            // No subscriber is not an error: the event is in the log.
            let _ = publish.send(event);
        }
        if !full {
            break;
        }
    }
    Ok(())
}
