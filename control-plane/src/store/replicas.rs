//! The control-plane processes that share the store. Each has a row with a
//! heartbeat; an agent's row names the replica holding its stream. A replica
//! whose heartbeat is older than [`REPLICA_TIMEOUT`] is dead: another one
//! marks its agents disconnected (which starts their `unreachableAfter`
//! clocks) and deletes its row. With SQLite there is one replica, and every
//! earlier one is dead when it opens the store.

use std::time::Duration;

use super::engine::SqlExt as _;
use super::{Store, StoreError, Tx};

/// How often a replica says it is alive.
pub const REPLICA_HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica silent this long is dead, and its agents are disconnected.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(10);

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heartbeat {
    /// Recorded; `reaped` dead replicas were cleared, each with the number
    /// of its agents marked disconnected. `ticks`: this replica is the
    /// oldest live one, which runs the periodic scheduler tick.
    Alive {
        reaped: Vec<(i64, usize)>,
        ticks: bool,
    },
    /// This replica's row was gone: the others judged it dead while it
    /// could not write, and marked its agents disconnected. It has a new
    /// row now; its streams must end so that their agents connect again.
    Revived { replica: i64 },
}

impl Store {
    /// This process's id among the replicas.
    pub fn replica(&self) -> i64 {
        self.inner
            .replica
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Say this replica is alive; with `reap`, clear the replicas that are
    /// not. Pass `reap` only when this replica's own last heartbeat was
    /// recent: after an outage of the database every replica's heartbeat
    /// is old, and none may judge the others by it.
    pub async fn replica_heartbeat(&self, reap: bool) -> Result<Heartbeat, StoreError> {
        let replica = self.replica();
        let inner = self.inner.clone();
        let beat = self
            .write(move |tx| {
                let found = tx.sql.exec(
                    "UPDATE replicas SET heartbeat_ms = ?2 WHERE id = ?1",
                    &[&replica, &tx.now],
                )?;
                if found == 0 {
                    let replica = register(tx)?;
                    return Ok(Heartbeat::Revived { replica });
                }
                let timeout = i64::try_from(REPLICA_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
                let before = tx.now.saturating_sub(timeout);
                let reaped = if reap {
                    reap_where(tx, "heartbeat_ms < ?1 AND id != ?2", before, replica)?
                } else {
                    Vec::new()
                };
                // The oldest live replica runs the periodic scheduler tick.
                let oldest: Option<i64> = tx.sql.fetch_one(
                    "SELECT MIN(id) FROM replicas WHERE heartbeat_ms >= ?1",
                    &[&before],
                    |r| r.get(0),
                )?;
                Ok(Heartbeat::Alive {
                    reaped,
                    ticks: oldest == Some(replica),
                })
            })
            .await?;
        if let Heartbeat::Revived { replica } = beat {
            inner
                .replica
                .store(replica, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(beat)
    }
}

/// A row for the process opening the store; its id.
pub(super) fn register(tx: &mut Tx<'_>) -> Result<i64, StoreError> {
    tx.sql.fetch_one(
        "INSERT INTO replicas (address, version, started_ms, heartbeat_ms)
         VALUES (?1, ?2, ?3, ?3) RETURNING id",
        &[&who_am_i().as_str(), &env!("CARGO_PKG_VERSION"), &tx.now],
        |r| r.get(0),
    )
}

/// For operators reading the table: which host and process a replica is.
fn who_am_i() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{} pid {}", host.trim(), std::process::id())
}

/// On opening an unshared store: every replica before this one is dead,
/// since no stream survives a restart.
pub(super) fn reap_all_but(tx: &mut Tx<'_>, replica: i64) -> Result<(), StoreError> {
    // Rows from before replicas were recorded (version 6) name none.
    tx.sql.exec(
        "UPDATE agents SET connected = 0 WHERE connected = 1 AND replica != ?1",
        &[&replica],
    )?;
    tx.sql
        .exec("DELETE FROM replicas WHERE id != ?1", &[&replica])?;
    Ok(())
}

/// On opening a shared store: the replicas that stopped without a word.
pub(super) fn reap_stale(tx: &mut Tx<'_>, replica: i64) -> Result<(), StoreError> {
    let timeout = i64::try_from(REPLICA_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
    let before = tx.now.saturating_sub(timeout);
    let reaped = reap_where(tx, "heartbeat_ms < ?1 AND id != ?2", before, replica)?;
    log_reaped(&reaped);
    Ok(())
}

pub(crate) fn log_reaped(reaped: &[(i64, usize)]) {
    for (replica, agents) in reaped {
        tracing::warn!(
            replica,
            agents,
            "a replica stopped heartbeating; its agents are marked disconnected"
        );
    }
}

/// Disconnect the agents of, and delete, the replicas `condition` (over
/// `?1`, a time, and `?2`, this replica) picks.
fn reap_where(
    tx: &mut Tx<'_>,
    condition: &str,
    before_ms: i64,
    replica: i64,
) -> Result<Vec<(i64, usize)>, StoreError> {
    let dead: Vec<i64> = tx.sql.fetch_all(
        &format!("SELECT id FROM replicas WHERE {condition} ORDER BY id"),
        &[&before_ms, &replica],
        |r| r.get(0),
    )?;
    let mut reaped = Vec::with_capacity(dead.len());
    for id in dead {
        let agents = tx.sql.exec(
            "UPDATE agents SET connected = 0 WHERE replica = ?1 AND connected = 1",
            &[&id],
        )?;
        tx.sql.exec("DELETE FROM replicas WHERE id = ?1", &[&id])?;
        reaped.push((id, agents));
    }
    Ok(reaped)
}
