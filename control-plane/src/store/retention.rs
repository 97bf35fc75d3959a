//! Retention: the store keeps the newest deployments and a window of the
//! event log, and prunes the rest, so that it stays bounded however long
//! the control plane runs.
//!
//! Pruning happens in small writes, each its own group commit, so agents'
//! reports never wait long behind it. Two bounds record what is gone, for
//! `Watch` to refuse a resume it can no longer serve (etcd's "compacted"):
//! every event up to `compacted` was pruned by age, oldest first; `pruned`
//! is the highest revision pruned for any reason, also with its deployment.

use std::time::Duration;

use procurator_proto::v1::{DeploymentState, event};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::engine::{Sql, SqlExt as _};
use super::{Store, StoreError, Tx};

/// Rows deleted per write.
const BATCH: i64 = 2_000;
/// How often the window is applied when no deployment finishes.
const EVERY: Duration = Duration::from_secs(600);

/// What the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// The newest deployments kept, with their machine rows and events. A
    /// deployment that has not finished is kept whatever its age.
    pub deployments: u32,
    /// Events older than this are pruned, whatever they belong to.
    pub events_for: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            deployments: 500,
            events_for: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// How far the event log has been pruned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Every event with a revision up to this one is gone.
    pub compacted: u64,
    /// The highest revision pruned.
    pub pruned: u64,
}

/// What one pass pruned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deployments: u64,
    pub events: u64,
}

enum Step {
    Events(u64),
    Deployment(String),
    Done,
}

impl Store {
    /// Prune now, after each deployment that finishes and every ten
    /// minutes, until `stop`.
    pub async fn keep_pruned(self, retention: Retention, stop: CancellationToken) {
        let mut events = self.subscribe();
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                received = events.recv() => match received {
                    Ok(event) if matches!(event.kind, Some(event::Kind::Finished(_))) => {}
                    Ok(_) => continue,
                    // It may have missed a finish: prune to be sure.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
            match self.prune(retention, &stop).await {
                Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                    deployments = pruned.deployments,
                    events = pruned.events,
                    "pruned the store (see --retain-deployments, --retain-events-days)"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune the store; trying again later")
                }
            }
        }
    }

    /// Prune what `retention` does not keep, until done or `stop`; returns
    /// what went.
    pub async fn prune(
        &self,
        retention: Retention,
        stop: &CancellationToken,
    ) -> Result<Pruned, StoreError> {
        let keep = i64::from(retention.deployments.max(1));
        let window = i64::try_from(retention.events_for.as_millis()).unwrap_or(i64::MAX);
        let mut pruned = Pruned::default();
        while !stop.is_cancelled() {
            match self.write(move |tx| step(tx, keep, window)).await? {
                Step::Events(n) => pruned.events += n,
                Step::Deployment(id) => {
                    tracing::debug!(deployment = %id, "pruned");
                    pruned.deployments += 1;
                }
                Step::Done => break,
            }
        }
        Ok(pruned)
    }

    #[cfg(test)]
    pub async fn log_bounds(&self) -> Result<LogBounds, StoreError> {
        self.read(|conn| log_bounds(conn)).await
    }
}

pub(super) fn log_bounds(conn: &dyn Sql) -> Result<LogBounds, StoreError> {
    let (compacted, pruned): (i64, i64) = conn
        .fetch_opt(
            "SELECT compacted, pruned FROM log_bounds WHERE id = 1",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .unwrap_or((0, 0));
    Ok(LogBounds {
        compacted: u64::try_from(compacted).unwrap_or(0),
        pruned: u64::try_from(pruned).unwrap_or(0),
    })
}

/// One write's worth of pruning: a batch of an old deployment's events, or
/// that deployment itself once its events are gone, or else a batch of the
/// oldest events past the window.
fn step(tx: &mut Tx<'_>, keep: i64, window_ms: i64) -> Result<Step, StoreError> {
    let old: Option<String> = tx
        .sql
        .fetch_opt(&PRUNABLE_QUERY, &[&(keep - 1)], |r| r.get(0))?;
    if let Some(id) = old {
        // Events first and the row last: a pass cut short by a crash finds
        // the same deployment again and carries on.
        let (last, n): (Option<i64>, i64) = tx.sql.fetch_one(
            "SELECT max(revision), count(*) FROM (SELECT revision FROM events
             WHERE deployment_id = ?1 ORDER BY revision LIMIT ?2) AS batch",
            &[&id, &BATCH],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if let Some(last) = last {
            tx.sql.exec(
                "DELETE FROM events WHERE deployment_id = ?1 AND revision <= ?2",
                &[&id, &last],
            )?;
            raise_bounds(tx, 0, last)?;
            return Ok(Step::Events(u64::try_from(n).unwrap_or(0)));
        }
        tx.sql
            .exec("DELETE FROM machine_logs WHERE deployment_id = ?1", &[&id])?;
        tx.sql
            .exec("DELETE FROM machines WHERE deployment_id = ?1", &[&id])?;
        tx.sql
            .exec("DELETE FROM deployments WHERE id = ?1", &[&id])?;
        return Ok(Step::Deployment(id));
    }

    // By age: the longest run of the oldest events that are all past the
    // window, so that what is gone is always a prefix of the log.
    let cutoff = tx.now.saturating_sub(window_ms);
    let oldest: Vec<(i64, i64)> = tx.sql.fetch_all(
        "SELECT revision, at_ms FROM events ORDER BY revision LIMIT ?1",
        &[&BATCH],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some(last) = oldest
        .iter()
        .take_while(|(_, at_ms)| *at_ms < cutoff)
        .map(|(revision, _)| *revision)
        .last()
    else {
        // Last, once the log is done: join tokens of long ago.
        Store::forget_old_tokens(tx)?;
        return Ok(Step::Done);
    };
    let n = tx
        .sql
        .exec("DELETE FROM events WHERE revision <= ?1", &[&last])?;
    raise_bounds(tx, last, last)?;
    Ok(Step::Events(u64::try_from(n).unwrap_or(0)))
}

/// Raise the bounds to at least `compacted` and `pruned`.
fn raise_bounds(tx: &Tx<'_>, compacted: i64, pruned: i64) -> Result<(), StoreError> {
    tx.sql.exec(
        // CASE, not a two-argument max: the same SQL in every engine.
        "UPDATE log_bounds
         SET compacted = CASE WHEN ?1 > compacted THEN ?1 ELSE compacted END,
             pruned = CASE WHEN ?2 > pruned THEN ?2 ELSE pruned END
         WHERE id = 1",
        &[&compacted, &pruned],
    )?;
    Ok(())
}

/// The oldest finished deployment older than the newest `?1 + 1`.
static PRUNABLE_QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let finished: Vec<String> = (0..=i32::from(u8::MAX))
        .filter_map(|n| DeploymentState::try_from(n).ok())
        .filter(|s| s.is_final())
        .map(|s| (s as i32).to_string())
        .collect();
    format!(
        "SELECT id FROM deployments
         WHERE seq < (SELECT seq FROM deployments ORDER BY seq DESC LIMIT 1 OFFSET ?1)
           AND state IN ({})
         ORDER BY seq LIMIT 1",
        finished.join(", ")
    )
});
