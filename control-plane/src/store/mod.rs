//! The control plane's state: deployments, per-machine rollout rows, agents
//! and the append-only event log, in SQLite.
//!
//! Callers see domain operations (`submit`, `record_progress`, …), never SQL,
//! so a Postgres backend can offer the same surface later. Every write commits
//! its state change together with its events in one transaction and only then
//! publishes the events; publishing happens under the same lock as the
//! commit, so subscribers see revisions in order.

mod agents;
mod control;
mod deployments;
mod events;
mod queries;
mod reports;
mod schedule;
mod schema;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use procurator_proto::v1::{Event, event};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::broadcast;

pub use control::{Cancelled, Confirmation, RolledBack};
pub use deployments::{SubmitError, Submitted};
pub use reports::ResultOutcome;
pub use schedule::Outbound;

/// How many committed events a slow subscriber may fall behind before it
/// must re-read from the database.
const BROADCAST_CAPACITY: usize = 1024;
#[cfg(test)]
pub const BROADCAST_CAPACITY_FOR_TESTS: usize = BROADCAST_CAPACITY;

/// The database file inside `--data-dir`.
pub const DB_FILE: &str = "procurator.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create the data directory {path}: {source}; check --data-dir and its permissions"
    )]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the state database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the state database holds data this version cannot use: {0}")]
    Corrupt(String),
    #[error("a state store task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        // The full error is logged here; clients get what they can act on.
        tracing::error!(error = %e, "state store error");
        match e {
            StoreError::CreateDir { .. } | StoreError::Open { .. } | StoreError::Sqlite(_) => {
                tonic::Status::unavailable("the control plane's state store failed; retry later")
            }
            StoreError::Corrupt(_) => tonic::Status::internal(
                "the control plane's state store holds unreadable data; see its logs",
            ),
            StoreError::Task(_) => {
                tonic::Status::unavailable("the control plane is shutting down; retry")
            }
        }
    }
}

/// The state store. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    events: broadcast::Sender<Event>,
    /// When this process opened the store (Unix ms).
    opened_ms: i64,
}

/// One write transaction and the events it appends.
pub(crate) struct Tx<'c> {
    sql: rusqlite::Transaction<'c>,
    now: i64,
    opened_ms: i64,
    events: Vec<Event>,
}

impl Tx<'_> {
    /// Append an event to the log; it is published once the transaction commits.
    fn emit(&mut self, deployment_id: &str, kind: event::Kind) -> Result<u64, StoreError> {
        let revision = events::append(&self.sql, deployment_id, self.now, &kind)?;
        self.events.push(Event {
            revision,
            at_ms: self.now,
            deployment_id: deployment_id.to_owned(),
            kind: Some(kind),
        });
        Ok(revision)
    }
}

impl Store {
    /// Open (or create) `DATA_DIR/procurator.db`. Blocking: call it before
    /// serving or from a blocking task. Every agent is marked disconnected,
    /// since no stream survives a restart.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        schema::prepare(&conn)?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let store = Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                events,
                opened_ms: procurator_core::now_ms(),
            }),
        };
        store.write_blocking(agents::disconnect_all)?;
        Ok(store)
    }

    /// Committed events from now on. Subscribe before reading the backlog so
    /// that nothing committed in between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn write_blocking<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A panic inside a transaction rolled it back when it unwound, so
        // the connection behind a poisoned lock is still consistent.
        let mut conn = self.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut tx = Tx {
            sql,
            now: procurator_core::now_ms(),
            opened_ms: self.inner.opened_ms,
            events: Vec::new(),
        };
        let value = f(&mut tx)?;
        let Tx { sql, events, .. } = tx;
        sql.commit()?;
        for event in events {
            // No subscriber is not an error: the event is in the log.
            let _ = self.inner.events.send(event);
        }
        Ok(value)
    }

    /// Run a write transaction off the async runtime.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_blocking(f)).await?
    }

    /// Run a read off the async runtime.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await?
    }
}

#[cfg(test)]
impl Store {
    /// Append `n` agent events in one transaction (for tests that need many).
    pub async fn emit_test_events(&self, n: usize) -> Result<(), StoreError> {
        self.write(move |tx| {
            for i in 0..n {
                let agent = procurator_proto::v1::AgentConnection {
                    machine: format!("m-{i}"),
                    ..Default::default()
                };
                tx.emit("", event::Kind::Agent(agent))?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_migration;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_rollout;
