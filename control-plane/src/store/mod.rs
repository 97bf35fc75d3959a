//! The control plane's state: deployments, per-machine rollout rows, agents
//! and the append-only event log, in SQLite.
//!
//! Callers see domain operations (`submit`, `record_progress`, …), never SQL,
//! so a Postgres backend can offer the same surface later. Every write commits
//! its state change together with its events and only then publishes the
//! events; publishing happens under the same lock as the commit, so
//! subscribers see revisions in order.
//!
//! Writes are group-committed by one writer thread: the database syncs
//! every commit to disk (`synchronous = FULL`), and one sync per write would
//! cap a 10,000-agent rollout at a few hundred state changes a second.
//! Writes that queue up while one transaction commits run together in the
//! next, each inside its own savepoint, so a write that fails still changes
//! nothing. Reads use a connection of their own and never wait for a
//! write (WAL): they see what was committed.

mod agents;
mod artifacts;
mod control;
mod database;
mod deployments;
mod engine;
mod events;
mod history;
mod paging;
mod placements;
mod queries;
mod replicas;
mod reports;
mod retention;
mod rows;
mod running;
mod schedule;
mod stats;
mod tailer;
mod trust;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use procurator_proto::v1::{Event, event};
use tokio::sync::{broadcast, oneshot, watch};

use self::artifacts::ArtifactCache;
use self::engine::{ReaderConn, WriteTx, WriterConn};

pub use control::{Cancelled, Confirmation, RolledBack};
pub use database::{Database, DatabaseError, PostgresTarget};
pub use deployments::{SubmitError, Submitted};
pub use events::Compacted;
pub use history::LogLookup;
pub use paging::{Page, PageQuery};
pub use queries::MachineQuery;
pub(crate) use replicas::log_reaped;
pub use replicas::{Heartbeat, REPLICA_HEARTBEAT, REPLICA_TIMEOUT};
pub use reports::ResultOutcome;
#[cfg(test)]
pub use retention::Pruned;
pub use retention::Retention;
pub use running::RunningPage;
pub use schedule::{Outbound, Scheduled, Scope, SendOrder};
pub use trust::{
    JoinToken, MAX_LIVE_TOKENS, MAX_REVOCATIONS, Redeemed, RevokeError, Revoked, TOKEN_PREFIX,
    TokenRefusal,
};

/// How many committed events a slow subscriber may fall behind before it
/// must re-read from the database.
const BROADCAST_CAPACITY: usize = 1024;
/// The same on a shared store, whose follower publishes a wave's events
/// (10,000 and more) at once, and whose fan-out must resend every stream
/// it holds when it falls behind.
const SHARED_BROADCAST_CAPACITY: usize = 16 * 1024;
/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;
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
    #[error("the state database failed: {}", procurator_core::error_chain(.0))]
    Postgres(#[from] postgres::Error),
    #[error("cannot start a state store thread: {0}")]
    Thread(std::io::Error),
    #[error("the state database holds data this version cannot use: {0}")]
    Corrupt(String),
    #[error("a state store task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The transaction carrying this write (with others) did not commit.
    #[error("the state database could not commit: {0}")]
    Commit(String),
}

impl StoreError {
    /// The database could not be written or read back from disk: out of
    /// space, an I/O error, a read-only file system. Not the caller's fault,
    /// and not fixed by retrying at once.
    pub fn is_io(&self) -> bool {
        use rusqlite::ErrorCode;
        match self {
            StoreError::Commit(_) => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::ReadOnly
                    | ErrorCode::CannotOpen
                    | ErrorCode::DatabaseCorrupt
            ),
            // No SQLSTATE: the connection, not the statement, failed.
            // Class 53: the server is out of disk, memory or connections;
            // 58: a system error (I/O) on the server.
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|code| {
                        let code = code.code();
                        code.starts_with("53") || code.starts_with("58")
                    })
            }
            _ => false,
        }
    }
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        // The full error is logged here; clients get what they can act on.
        tracing::error!(error = %e, "state store error");
        if e.is_io() {
            return tonic::Status::unavailable(format!(
                "the control plane cannot write its store: {e}; it serves again by itself once that is fixed (free space and a reachable database: its --data-dir, or its PostgreSQL server)"
            ));
        }
        match e {
            StoreError::CreateDir { .. }
            | StoreError::Open { .. }
            | StoreError::Sqlite(_)
            | StoreError::Postgres(_)
            | StoreError::Thread(_)
            | StoreError::Commit(_) => {
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

/// The state store. Cheap to clone; all clones share its writer and readers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// To the writer thread; `None` once closing.
    writes: Option<mpsc::Sender<Job>>,
    /// To the reader threads, each with a `query_only` connection of its own.
    reads: Option<mpsc::Sender<ReadJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    events: broadcast::Sender<Event>,
    artifacts: Arc<ArtifactCache>,
    /// `None` while the last write that changed anything committed; the
    /// error of the last write that could not be made otherwise.
    writable: watch::Receiver<Option<String>>,
    /// This process's row among the replicas.
    replica: AtomicI64,
    /// Whether other control planes share the database.
    shared: bool,
    /// Tells the log's follower, if any, to stop.
    closed: Arc<AtomicBool>,
    /// Heartbeats not written yet: machine → (when, what it runs).
    heartbeats: Mutex<std::collections::HashMap<String, (i64, String)>>,
}

/// Reads run on this many threads, each with its own connection: a burst of
/// 10,000 desired states to send is 10,000 reads.
const READERS: usize = 2;

type ReadJob = Box<dyn FnOnce(&dyn ReaderConn) + Send>;

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queues ends the threads once they have run what is
        // queued; wait for them, so the database is closed when the store is.
        self.writes = None;
        self.reads = None;
        self.closed.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// The writer thread's side: the one connection that writes.
struct Writer {
    conn: Box<dyn WriterConn>,
    /// Where committed events are published; `None` when the log's
    /// follower publishes them (a shared engine).
    events: Option<broadcast::Sender<Event>>,
    /// When this process opened the store (Unix ms).
    opened_ms: i64,
    artifacts: Arc<ArtifactCache>,
    /// Whether the last write could be made (see [`Store::writable`]).
    writable: watch::Sender<Option<String>>,
}

/// One write transaction and the events it appends.
pub(crate) struct Tx<'c> {
    sql: Box<dyn WriteTx + 'c>,
    now: i64,
    opened_ms: i64,
    events: Vec<Event>,
    artifacts: Arc<ArtifactCache>,
    /// Set by a write that failed because the database could not be written
    /// (a full disk, an I/O error): the store is then not writable.
    io_error: Option<String>,
    /// The revision of the last event in the log, this transaction's
    /// included: events are numbered here, in commit order, not by the
    /// engine (whose sequences, in PostgreSQL, commit out of order).
    head: u64,
}

/// A queued write: runs inside the batch's transaction, says whether it
/// succeeded (else its savepoint is rolled back), and hands back how to
/// deliver its result once the commit's fate is known.
type Job = Box<dyn FnOnce(&mut Tx<'_>) -> (bool, Deliver) + Send>;
type Deliver = Box<dyn FnOnce(Option<&StoreError>) + Send>;

impl Tx<'_> {
    /// Append an event to the log: written with the transaction's others
    /// when it commits, and published then.
    fn emit(&mut self, deployment_id: &str, kind: event::Kind) -> Result<u64, StoreError> {
        let revision = self.head + 1;
        self.head = revision;
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
        Self::start(engine::sqlite::open(&data_dir.join(DB_FILE), READERS)?)
    }

    /// Open the store in the PostgreSQL database `config` names, making its
    /// schema current, as one replica among those sharing it. Blocking, as
    /// [`Store::open`]. Agents held by replicas that stopped heartbeating
    /// are marked disconnected; those of live replicas are theirs.
    pub fn open_postgres(target: &PostgresTarget) -> Result<Self, StoreError> {
        if target.unencrypted_tcp() {
            tracing::warn!(
                "the connection to PostgreSQL is not encrypted; give --database sslmode=verify-full and sslrootcert=FILE"
            );
        }
        Self::start(engine::postgres::open(target, READERS)?)
    }

    /// Open the store where `database` says.
    pub fn open_database(database: &Database) -> Result<Self, StoreError> {
        match database {
            Database::Sqlite { data_dir } => Self::open(data_dir),
            Database::Postgres(target) => Self::open_postgres(target),
        }
    }

    /// The writer and reader threads over an engine's connections.
    fn start(opened: engine::Opened) -> Result<Self, StoreError> {
        let engine::Opened {
            writer: conn,
            readers,
            follower,
        } = opened;
        let shared = follower.is_some();
        let (events, _) = broadcast::channel(if shared {
            SHARED_BROADCAST_CAPACITY
        } else {
            BROADCAST_CAPACITY
        });
        let artifacts = Arc::<ArtifactCache>::default();
        let (writable_tx, writable) = watch::channel(None);
        let mut writer = Writer {
            conn,
            events: (!shared).then(|| events.clone()),
            opened_ms: procurator_core::now_ms(),
            artifacts: artifacts.clone(),
            writable: writable_tx,
        };
        let join = |tx: &mut Tx<'_>| {
            let replica = replicas::register(tx)?;
            if shared {
                replicas::reap_stale(tx, replica)?;
            } else {
                replicas::reap_all_but(tx, replica)?;
            }
            Ok((replica, tx.head))
        };
        // On a plain thread: an engine's synchronous client may not block
        // inside the caller's async runtime.
        let (replica, head) = std::thread::scope(|s| {
            s.spawn(|| writer.write(join))
                .join()
                .unwrap_or_else(|_| Err(StoreError::Corrupt("the first write panicked".into())))
        })?;
        let closed = Arc::new(AtomicBool::new(false));
        let thread_error = StoreError::Thread;
        let (writes, queue) = mpsc::channel();
        let mut threads = vec![
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || {
                    // A writer that died would leave a process that answers
                    // SERVING and can write nothing: end it instead, so its
                    // supervisor starts it again.
                    let run = std::panic::AssertUnwindSafe(|| writer.run(queue));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!(
                            "the state store's writer thread panicked; exiting so that the control plane is restarted"
                        );
                        std::process::exit(70);
                    }
                })
                .map_err(thread_error)?,
        ];
        if let Some(follower) = follower {
            let (publish, closed) = (events.clone(), closed.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("store-tailer".into())
                    .spawn(move || tailer::follow(follower, publish, head, closed))
                    .map_err(thread_error)?,
            );
        }
        let (reads, read_queue) = mpsc::channel::<ReadJob>();
        let read_queue = Arc::new(Mutex::new(read_queue));
        for (i, conn) in readers.into_iter().enumerate() {
            let queue = read_queue.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("store-reader-{i}"))
                    .spawn(move || run_reads(conn.as_ref(), &queue))
                    .map_err(thread_error)?,
            );
        }
        tracing::debug!(replica, shared, "state store threads started");
        Ok(Self {
            inner: Arc::new(Inner {
                writes: Some(writes),
                reads: Some(reads),
                threads,
                events,
                artifacts,
                writable,
                replica: AtomicI64::new(replica),
                shared,
                closed,
                heartbeats: Mutex::default(),
            }),
        })
    }

    /// Whether other control planes share this store: then another
    /// replica's decisions reach this one's agents through the log
    /// ([`Store::subscribe`]), which is published only as read back.
    pub fn is_shared(&self) -> bool {
        self.inner.shared
    }

    /// Whether the store can be written: `None`, or why not. Changes as
    /// writes fail and succeed again.
    pub fn writable(&self) -> watch::Receiver<Option<String>> {
        self.inner.writable.clone()
    }

    /// Committed events from now on. Subscribe before reading the backlog so
    /// that nothing committed in between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Run a write in the writer thread's next group commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (result_tx, result_rx) = oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let outcome = f(tx);
            if let Err(e) = &outcome
                && e.is_io()
            {
                tx.io_error = Some(e.to_string());
            }
            let succeeded = outcome.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                let result = match (outcome, commit_error) {
                    (Ok(_), Some(e)) => Err(StoreError::Commit(e.to_string())),
                    (outcome, _) => outcome,
                };
                let _ = result_tx.send(result);
            });
            (succeeded, deliver)
        });
        let queued = self.inner.writes.as_ref().map(|w| w.send(job));
        if !matches!(queued, Some(Ok(()))) {
            return Err(StoreError::Commit("the state store is closed".into()));
        }
        result_rx.await.unwrap_or_else(|_| {
            Err(StoreError::Commit(
                "the write was dropped with a failed transaction".into(),
            ))
        })
    }

    /// Run a read on a reader thread: it sees what was committed.
    ///
    /// A read that fails because its connection broke (the database
    /// restarted) runs once more on a connection made again: reads change
    /// nothing, so the caller sees no error for an outage that is over.
    async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&dyn ReaderConn) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (result_tx, result_rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let result = match f(conn) {
                Err(e) if conn.reopen_if_broken() => {
                    tracing::debug!(error = %e, "a read failed on a broken connection; reading again");
                    f(conn)
                }
                result => result,
            };
            let _ = result_tx.send(result);
        });
        let queued = self.inner.reads.as_ref().map(|r| r.send(job));
        if !matches!(queued, Some(Ok(()))) {
            return Err(StoreError::Commit("the state store is closed".into()));
        }
        result_rx.await.unwrap_or_else(|_| {
            Err(StoreError::Corrupt(
                "a read of the state store panicked".into(),
            ))
        })
    }
}

/// A reader thread: reads until the store is dropped.
fn run_reads(conn: &dyn ReaderConn, queue: &Mutex<mpsc::Receiver<ReadJob>>) {
    loop {
        let job = {
            // Only `recv` runs under this lock; nothing can poison it half-done.
            let queue = queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.recv()
        };
        let Ok(job) = job else { return };
        // A panicking read fails that read (its caller gets an error), not the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn)));
    }
}

impl Writer {
    /// Group commits until the store is dropped.
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH
                && let Ok(job) = queue.try_recv()
            {
                batch.push(job);
            }
            let mut delivers = Vec::with_capacity(batch.len());
            let changes_before = self.conn.total_changes();
            // Jobs the batch did not reach are dropped, which fails them.
            let mut io_error = None;
            let error = self.run_batch(batch, &mut delivers, &mut io_error).err();
            let changed = self.conn.total_changes() != changes_before;
            self.note_writable(error.as_ref(), io_error, changed);
            for deliver in delivers {
                deliver(error.as_ref());
            }
        }
    }

    /// The store is not writable after a batch that failed to commit or had
    /// a write fail for lack of space or I/O; it is again after a batch that
    /// changed something committed (one that changed nothing proves nothing).
    fn note_writable(&self, error: Option<&StoreError>, io_error: Option<String>, changed: bool) {
        let failed = match error {
            Some(e) if e.is_io() => Some(e.to_string()),
            Some(_) => None,
            None => io_error,
        };
        let was = self.writable.borrow().clone();
        match failed {
            Some(why) => {
                if was.is_none() {
                    tracing::error!(error = %why, "the state store cannot be written; health is NOT_SERVING until a write succeeds");
                }
                self.writable.send_replace(Some(why));
            }
            None if changed && error.is_none() && was.is_some() => {
                tracing::info!("the state store can be written again");
                self.writable.send_replace(None);
            }
            None => {}
        }
    }

    fn run_batch(
        &mut self,
        batch: Vec<Job>,
        delivers: &mut Vec<Deliver>,
        io_error: &mut Option<String>,
    ) -> Result<(), StoreError> {
        let mut tx = begin(self.conn.as_mut(), self.opened_ms, &self.artifacts)?;
        // Each job in a savepoint of its own; ending one and opening the
        // next is one round trip to a database server.
        tx.sql.exec_batch("SAVEPOINT write")?;
        for job in batch {
            tx.now = procurator_core::now_ms();
            let (published, head) = (tx.events.len(), tx.head);
            let (succeeded, deliver) = job(&mut tx);
            delivers.push(deliver);
            if succeeded {
                tx.sql.exec_batch("RELEASE write; SAVEPOINT write")?;
            } else {
                tx.sql
                    .exec_batch("ROLLBACK TO write; RELEASE write; SAVEPOINT write")?;
                tx.events.truncate(published);
                tx.head = head;
            }
        }
        tx.sql.exec_batch("RELEASE write")?;
        *io_error = tx.io_error.take();
        commit(self.events.as_ref(), tx)
    }

    /// One write in a transaction of its own (opening the store).
    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tx = begin(self.conn.as_mut(), self.opened_ms, &self.artifacts)?;
        let value = f(&mut tx)?;
        commit(self.events.as_ref(), tx)?;
        Ok(value)
    }
}

fn begin<'c>(
    conn: &'c mut dyn WriterConn,
    opened_ms: i64,
    artifacts: &Arc<ArtifactCache>,
) -> Result<Tx<'c>, StoreError> {
    let sql = conn.begin()?;
    // Read under the write lock: no other writer moves it until we commit.
    let head = events::head(&*sql)?;
    Ok(Tx {
        sql,
        now: procurator_core::now_ms(),
        opened_ms,
        events: Vec::new(),
        artifacts: artifacts.clone(),
        io_error: None,
        head,
    })
}

/// Commit, then publish the events (to `events`, unless the log's follower
/// publishes them); only the writer thread commits, so subscribers see
/// revisions in order.
fn commit(events: Option<&broadcast::Sender<Event>>, tx: Tx<'_>) -> Result<(), StoreError> {
    let Tx {
        sql,
        events: appended,
        head,
        ..
    } = tx;
    // Events kept are the ones numbered from the head: it moved iff any were.
    if !appended.is_empty() {
        events::append_all(&*sql, &appended)?;
        events::set_head(&*sql, head)?;
        sql.log_grew()?;
    }
    sql.commit()?;
    let Some(events) = events else {
        return Ok(());
    };
    for event in appended {
        // No subscriber is not an error: the event is in the log.
        let _ = events.send(event);
    }
    Ok(())
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
mod test_db;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_history;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_migration;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_paging;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_placements;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_retention;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_rollout;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_running;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests_trust;
