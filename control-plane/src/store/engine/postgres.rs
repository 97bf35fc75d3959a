//! PostgreSQL, for control planes that share one database: the `postgres`
//! crate, synchronous, on the store's writer and reader threads. Writes are
//! serialized cluster-wide by an advisory lock each batch takes, which is
//! what makes the log's head, and so every revision, gapless and in commit
//! order whichever replica writes (docs: SCALE-OUT §4). Statements are the
//! store's own with `?N` rewritten to `$N`.

use std::cell::{Cell as Counter, RefCell};
use std::collections::HashMap;

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Statement};

use super::super::PostgresTarget;
use super::{
    Cell, LogFollower, Opened, Param, Params, ReaderConn, Row, Sql, StoreError, ToParam, WriteTx,
    WriterConn, bind,
};

mod schema;

/// How long the writer waits for the server to answer before a batch.
const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// A writer idle longer than this checks its connection first.
const IDLE_BEFORE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The channel a commit that grew the log notifies.
const LOG_CHANNEL: &str = "procurator_log";

/// `pg_advisory_xact_lock` keys: the store's writes, and its migrations.
const WRITE_LOCK: i64 = 0x7072_6f63_7772_6974; // "procwrit"
const MIGRATE_LOCK: i64 = 0x7072_6f63_6d69_6772; // "procmigr"

/// The writer connection (the schema made current) and `readers` more, to
/// the database `config` names.
pub fn open(target: &PostgresTarget, readers: usize) -> Result<Opened, StoreError> {
    // The synchronous client runs a runtime of its own, which must not be
    // made inside another's context (the caller may be a tokio task): make
    // the connections on a thread of their own. The store's threads, which
    // use them, are plain threads too.
    std::thread::scope(|s| {
        s.spawn(|| connect_all(target, readers))
            .join()
            .unwrap_or_else(|_| {
                Err(StoreError::Corrupt(
                    "connecting to PostgreSQL panicked".into(),
                ))
            })
    })
}

fn connect_all(config: &PostgresTarget, readers: usize) -> Result<Opened, StoreError> {
    let writer = Pg::connect(config)?;
    schema::prepare(&mut writer.client.borrow_mut())?;
    let mut all: Vec<Box<dyn ReaderConn>> = Vec::with_capacity(readers);
    for _ in 0..readers {
        all.push(Box::new(Pg::connect(config)?));
    }
    let follower = Follower {
        pg: Pg::connect(config)?,
        listening: false,
    };
    Ok(Opened {
        writer: Box::new(PgWriter {
            pg: writer,
            changes: Counter::new(0),
            last_batch: std::time::Instant::now(),
        }),
        readers: all,
        follower: Some(Box::new(follower)),
    })
}

/// A connection to `target`, over TLS if it says so.
fn connect(target: &PostgresTarget) -> Result<Client, StoreError> {
    let client = match &target.tls {
        None => target.config.connect(NoTls),
        Some(tls) => target
            .config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                (**tls).clone(),
            )),
    };
    Ok(client?)
}

/// A connection and the statements prepared on it, made again when it
/// breaks.
struct Pg {
    config: PostgresTarget,
    client: RefCell<Client>,
    prepared: RefCell<HashMap<String, Statement>>,
}

impl Pg {
    fn connect(config: &PostgresTarget) -> Result<Self, StoreError> {
        Ok(Self {
            config: config.clone(),
            client: RefCell::new(connect(config)?),
            prepared: RefCell::new(HashMap::new()),
        })
    }

    /// A connection the server closed (it restarted, or failed over to a
    /// standby, which `target_session_attrs` then finds) is made again
    /// before its next use; the statements prepared on it went with it.
    /// The use that found it broken has failed already, and was reported.
    fn reopen_if_closed(&self) -> Result<(), StoreError> {
        if !self.client.borrow().is_closed() {
            return Ok(());
        }
        let fresh = connect(&self.config)?;
        tracing::info!("reconnected to PostgreSQL");
        *self.client.borrow_mut() = fresh;
        self.prepared.borrow_mut().clear();
        Ok(())
    }
}

/// The statement for `sql`, prepared once per connection.
fn statement(
    prepared: &RefCell<HashMap<String, Statement>>,
    sql: &str,
    prepare: impl FnOnce(&str) -> Result<Statement, postgres::Error>,
) -> Result<Statement, StoreError> {
    if let Some(found) = prepared.borrow().get(sql) {
        return Ok(found.clone());
    }
    let made = prepare(&dollar_params(sql))?;
    prepared.borrow_mut().insert(sql.to_owned(), made.clone());
    Ok(made)
}

/// `?N` → `$N`, outside quoted strings and identifiers.
fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '?') => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

fn refs<'a>(bound: &'a [Param<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(n)?.to_sql(ty, out),
                Type::BOOL => (n != 0).to_sql(ty, out),
                _ => Err(format!("an integer given for a parameter of type {ty}").into()),
            },
            Param::Text(text) => text.to_sql(ty, out),
            Param::Bytes(bytes) => bytes.to_sql(ty, out),
            Param::Texts(texts) => texts.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Which Rust value fits is decided per parameter, in `to_sql`.
        true
    }

    to_sql_checked!();
}

impl Row for postgres::Row {
    fn cell(&self, index: usize) -> Result<Cell<'_>, StoreError> {
        let Some(column) = self.columns().get(index) else {
            return Err(StoreError::Corrupt(format!("no column {index} in the row")));
        };
        let cell = match *column.type_() {
            Type::INT8 => self.try_get::<_, Option<i64>>(index)?.map(Cell::Int),
            Type::INT4 => self
                .try_get::<_, Option<i32>>(index)?
                .map(|n| Cell::Int(i64::from(n))),
            Type::INT2 => self
                .try_get::<_, Option<i16>>(index)?
                .map(|n| Cell::Int(i64::from(n))),
            // `EXISTS (…)` and comparisons: as SQLite's 0 and 1.
            Type::BOOL => self
                .try_get::<_, Option<bool>>(index)?
                .map(|b| Cell::Int(i64::from(b))),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                self.try_get::<_, Option<&str>>(index)?.map(Cell::Text)
            }
            Type::BYTEA => self.try_get::<_, Option<&[u8]>>(index)?.map(Cell::Bytes),
            ref other => {
                return Err(StoreError::Corrupt(format!(
                    "column {index} is of type {other}, which the store never reads"
                )));
            }
        };
        Ok(cell.unwrap_or(Cell::Null))
    }
}

/// [`Sql::exec`] on a client or a transaction: rows changed.
fn exec(
    client: &mut impl GenericClient,
    prepared: &RefCell<HashMap<String, Statement>>,
    sql: &str,
    params: &Params<'_>,
) -> Result<u64, StoreError> {
    let stmt = statement(prepared, sql, |s| client.prepare(s))?;
    let bound = bind(params);
    Ok(client.execute(&stmt, &refs(&bound))?)
}

/// [`Sql::for_each_row`] on a client or a transaction. The rows are read
/// whole before `each` sees them, so `each` may query again.
fn for_each_row(
    client: &RefCell<impl GenericClient>,
    prepared: &RefCell<HashMap<String, Statement>>,
    sql: &str,
    params: &Params<'_>,
    each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let rows = {
        let mut client = client.borrow_mut();
        let stmt = statement(prepared, sql, |s| client.prepare(s))?;
        let bound = bind(params);
        client.query(&stmt, &refs(&bound))?
    };
    for row in &rows {
        if !each(row)? {
            break;
        }
    }
    Ok(())
}

impl Sql for Pg {
    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<usize, StoreError> {
        self.reopen_if_closed()?;
        let n = exec(&mut *self.client.borrow_mut(), &self.prepared, sql, params)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn exec_batch(&self, sql: &str) -> Result<(), StoreError> {
        self.reopen_if_closed()?;
        Ok(self.client.borrow_mut().batch_execute(sql)?)
    }

    fn for_each_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        self.reopen_if_closed()?;
        for_each_row(&self.client, &self.prepared, sql, params, each)
    }
}

/// A transaction of a [`Pg`] connection: the writer's, or a reader's snapshot.
struct PgTx<'c> {
    tx: RefCell<postgres::Transaction<'c>>,
    prepared: &'c RefCell<HashMap<String, Statement>>,
    /// Rows changed, for the writer's [`WriterConn::total_changes`].
    changes: Option<&'c Counter<u64>>,
}

impl Sql for PgTx<'_> {
    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<usize, StoreError> {
        let n = exec(&mut *self.tx.borrow_mut(), self.prepared, sql, params)?;
        if let Some(changes) = self.changes {
            changes.set(changes.get().saturating_add(n));
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn exec_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.tx.borrow_mut().batch_execute(sql)?)
    }

    fn for_each_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for_each_row(&self.tx, self.prepared, sql, params, each)
    }

    /// One statement, the keys bound as one array: `= ANY(…)` lets the
    /// planner probe the primary key even with no statistics yet (a table
    /// just filled), where a long `IN (…)` list of parameters in a generic
    /// plan was a filter over every row of the deployment: 10,000 rows
    /// times 256 comparisons per statement.
    fn update_where_in(
        &self,
        update: &str,
        fixed: &Params<'_>,
        column: &str,
        keys: &[&str],
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let params: Vec<&dyn ToParam> = fixed
            .iter()
            .copied()
            .chain([&keys as &dyn ToParam])
            .collect();
        self.exec(
            &format!("{update} AND {column} = ANY(?{})", fixed.len() + 1),
            &params,
        )?;
        Ok(())
    }
}

impl WriteTx for PgTx<'_> {
    fn log_grew(&self) -> Result<(), StoreError> {
        // Delivered at commit, once per transaction however many events
        // it carries: NOTIFY takes a cluster-wide lock then.
        Ok(self
            .tx
            .borrow_mut()
            .batch_execute(&format!("NOTIFY {LOG_CHANNEL}"))?)
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(self.tx.into_inner().commit()?)
    }
}

struct PgWriter {
    pg: Pg,
    changes: Counter<u64>,
    last_batch: std::time::Instant,
}

impl WriterConn for PgWriter {
    fn begin(&mut self) -> Result<Box<dyn WriteTx + '_>, StoreError> {
        // A connection a failed batch found broken is made again. One idle
        // for a while may have been dropped by the server (a restart, a
        // failover) without a word: one round trip finds out before a
        // batch's writes fail on it.
        self.pg.reopen_if_closed()?;
        if self.last_batch.elapsed() > IDLE_BEFORE_CHECK
            && self.pg.client.get_mut().is_valid(LIVENESS_TIMEOUT).is_err()
        {
            self.pg.reopen_if_closed()?;
        }
        self.last_batch = std::time::Instant::now();
        let client = self.pg.client.get_mut();
        let mut tx = client.transaction()?;
        // One writer at a time in the whole cluster, until this commits.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        Ok(Box::new(PgTx {
            tx: RefCell::new(tx),
            prepared: &self.pg.prepared,
            changes: Some(&self.changes),
        }))
    }

    fn total_changes(&self) -> u64 {
        self.changes.get()
    }
}

impl ReaderConn for Pg {
    fn reopen_if_broken(&self) -> bool {
        self.client.borrow().is_closed() && self.reopen_if_closed().is_ok()
    }

    fn snapshot(
        &self,
        f: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.reopen_if_closed()?;
        let mut client = self.client.borrow_mut();
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let snapshot = PgTx {
            tx: RefCell::new(tx),
            prepared: &self.prepared,
            changes: None,
        };
        f(&snapshot)?;
        Ok(snapshot.tx.into_inner().commit()?)
    }
}

/// The connection that LISTENs for commits that grew the log.
struct Follower {
    pg: Pg,
    /// Whether `pg`'s current connection has run LISTEN.
    listening: bool,
}

impl LogFollower for Follower {
    fn wait(&mut self, timeout: std::time::Duration) -> Result<bool, StoreError> {
        if self.pg.client.borrow().is_closed() {
            self.listening = false;
        }
        if !self.listening {
            self.pg.reopen_if_closed()?;
            self.pg
                .client
                .borrow_mut()
                .batch_execute(&format!("LISTEN {LOG_CHANNEL}"))?;
            self.listening = true;
            // Whatever was committed while nobody listened.
            return Ok(true);
        }
        let mut client = self.pg.client.borrow_mut();
        let mut notifications = client.notifications();
        use postgres::fallible_iterator::FallibleIterator as _;
        let woke = notifications.timeout_iter(timeout).next()?.is_some();
        // Many commits, one read: drop the word already queued.
        while notifications.iter().next()?.is_some() {}
        Ok(woke)
    }

    fn sql(&self) -> &dyn Sql {
        &self.pg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_as_postgresql_numbers_them() {
        assert_eq!(
            dollar_params("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND \"d?\" = ?2"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND \"d?\" = $2"
        );
    }
}
