//! What the store asks of a database, and nothing more: run a statement,
//! read rows ([`Sql`]); begin and commit a write transaction on the one
//! writer connection ([`WriterConn`], [`WriteTx`]); read a consistent
//! snapshot on a reader connection ([`ReaderConn`]). The logic (deployments,
//! schedule, placements, …) and the writer thread's group commit are
//! written once against these; each engine implements them (SQLite in
//! `engine/sqlite.rs`). Statements use SQLite's `?N` parameters, which an
//! engine that numbers them otherwise rewrites.

use super::StoreError;

pub(super) mod postgres;
pub(super) mod sqlite;

/// A value bound to a statement's parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
    /// An array of text: only for an engine that has arrays, through
    /// [`Sql::update_where_in`].
    Texts(&'a [&'a str]),
    Null,
}

pub trait ToParam {
    fn to_param(&self) -> Param<'_>;
}

impl ToParam for i64 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(*self)
    }
}

impl ToParam for i32 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

impl ToParam for u32 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

/// Booleans are stored as 0 and 1 in every engine.
impl ToParam for bool {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

impl ToParam for str {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for &str {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for String {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for &[&str] {
    fn to_param(&self) -> Param<'_> {
        Param::Texts(self)
    }
}

impl ToParam for [u8] {
    fn to_param(&self) -> Param<'_> {
        Param::Bytes(self)
    }
}

impl ToParam for Vec<u8> {
    fn to_param(&self) -> Param<'_> {
        Param::Bytes(self)
    }
}

impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param<'_> {
        self.as_ref().map_or(Param::Null, ToParam::to_param)
    }
}

/// A column's value in a row as read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
    Null,
}

/// One row of a result.
pub trait Row {
    fn cell(&self, index: usize) -> Result<Cell<'_>, StoreError>;
}

impl dyn Row + '_ {
    /// Column `index` as a `T`.
    pub fn get<T: FromCell>(&self, index: usize) -> Result<T, StoreError> {
        let cell = self.cell(index)?;
        T::from_cell(cell).map_err(|why| {
            StoreError::Corrupt(format!("column {index} holds {cell:?}, which is {why}"))
        })
    }
}

pub trait FromCell: Sized {
    /// `Err` says what the cell is not.
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str>;
}

impl FromCell for i64 {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        match cell {
            Cell::Int(n) => Ok(n),
            _ => Err("not an integer"),
        }
    }
}

impl FromCell for i32 {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        i32::try_from(i64::from_cell(cell)?).map_err(|_| "not a 32-bit integer")
    }
}

impl FromCell for u32 {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        u32::try_from(i64::from_cell(cell)?).map_err(|_| "not an unsigned 32-bit integer")
    }
}

impl FromCell for bool {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        Ok(i64::from_cell(cell)? != 0)
    }
}

impl FromCell for String {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        match cell {
            Cell::Text(text) => Ok(text.to_owned()),
            _ => Err("not text"),
        }
    }
}

impl FromCell for Vec<u8> {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        match cell {
            Cell::Bytes(bytes) => Ok(bytes.to_vec()),
            _ => Err("not bytes"),
        }
    }
}

impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(cell: Cell<'_>) -> Result<Self, &'static str> {
        match cell {
            Cell::Null => Ok(None),
            cell => T::from_cell(cell).map(Some),
        }
    }
}

pub type Params<'a> = [&'a dyn ToParam];

/// The values of `params`, as an engine binds them.
fn bind<'a>(params: &'a Params<'_>) -> Vec<Param<'a>> {
    params.iter().map(|p| p.to_param()).collect()
}

/// A connection or a transaction of some engine.
pub trait Sql {
    /// Run one statement; returns how many rows it changed.
    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<usize, StoreError>;
    /// Run statements that take no parameters, one after another.
    fn exec_batch(&self, sql: &str) -> Result<(), StoreError>;
    /// Call `each` with the rows of a query, in order, until it returns
    /// false or the rows end.
    fn for_each_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;

    /// `{update} AND {column} IN (…)` for every one of `keys`: `update` is
    /// an `UPDATE … WHERE …` whose own parameters, `fixed`, come first.
    /// Here: lists of up to 256 keys, a statement each. An engine with
    /// arrays binds them all as one.
    fn update_where_in(
        &self,
        update: &str,
        fixed: &Params<'_>,
        column: &str,
        keys: &[&str],
    ) -> Result<(), StoreError> {
        let mut rest = keys;
        for rows in chunk_sizes(keys.len()) {
            let (chunk, after) = rest.split_at(rows);
            let numbers: Vec<String> = (1..=rows)
                .map(|i| format!("?{}", fixed.len() + i))
                .collect();
            let params: Vec<&dyn ToParam> = fixed
                .iter()
                .copied()
                .chain(chunk.iter().map(|k| k as &dyn ToParam))
                .collect();
            self.exec(
                &format!("{update} AND {column} IN ({})", numbers.join(", ")),
                &params,
            )?;
            rest = after;
        }
        Ok(())
    }
}

/// The ways the logic reads, over any [`Sql`].
pub trait SqlExt: Sql {
    /// Every row, each made a `T`.
    fn fetch_all<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        mut f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut all = Vec::new();
        self.for_each_row(sql, params, &mut |row| {
            all.push(f(row)?);
            Ok(true)
        })?;
        Ok(all)
    }

    /// The first row, if there is one.
    fn fetch_opt<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        mut f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut first = None;
        self.for_each_row(sql, params, &mut |row| {
            first = Some(f(row)?);
            Ok(false)
        })?;
        Ok(first)
    }

    /// The first row, which must be there (an aggregate, a row just read).
    fn fetch_one<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.fetch_opt(sql, params, f)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row where one must be: {sql}")))
    }
}

impl<S: Sql + ?Sized> SqlExt for S {}

/// Rows per statement of [`insert_rows`] and [`Sql::update_where_in`]: thousands
/// of rows in a few statements (a round trip each to a database server),
/// and only these few statement texts ever prepared.
const ROWS_PER_STATEMENT: [usize; 3] = [256, 16, 1];

/// Splits `n` items into chunks of the sizes above, largest first.
fn chunk_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let size = ROWS_PER_STATEMENT.into_iter().find(|&s| s <= n)?;
        n -= size;
        Some(size)
    })
}

/// `INSERT INTO {into} VALUES (…), (…), …`: `values` holds the rows one
/// after another, `width` values each.
pub fn insert_rows(
    conn: &dyn Sql,
    into: &str,
    width: usize,
    values: &[&dyn ToParam],
) -> Result<(), StoreError> {
    let mut rest = values;
    for rows in chunk_sizes(values.len() / width.max(1)) {
        let (chunk, after) = rest.split_at(rows * width);
        let tuples: Vec<String> = (0..rows)
            .map(|row| {
                let numbers: Vec<String> = (1..=width)
                    .map(|col| format!("?{}", row * width + col))
                    .collect();
                format!("({})", numbers.join(", "))
            })
            .collect();
        conn.exec(
            &format!("INSERT INTO {into} VALUES {}", tuples.join(", ")),
            chunk,
        )?;
        rest = after;
    }
    Ok(())
}

/// A write transaction of the writer connection.
pub trait WriteTx: Sql {
    /// Tell the other processes on the database, once this commits, that
    /// the log grew. Nothing to do for an engine only one process opens.
    fn log_grew(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The one connection that writes, owned by the writer thread.
pub trait WriterConn: Send {
    /// Begin a transaction that holds the engine's write lock until it
    /// commits (or is dropped, which rolls it back).
    fn begin(&mut self) -> Result<Box<dyn WriteTx + '_>, StoreError>;
    /// Rows changed through this connection so far: whether a batch
    /// changed anything.
    fn total_changes(&self) -> u64;
}

/// A connection that only reads, owned by a reader thread.
pub trait ReaderConn: Sql + Send {
    /// If the connection broke, make it again and say true: what failed on
    /// it may be tried once more. An engine whose connections cannot break
    /// (a file) says false.
    fn reopen_if_broken(&self) -> bool {
        false
    }
    /// Run `f` on one snapshot: every statement in it sees the same commits.
    fn snapshot(
        &self,
        f: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

/// A shared engine's connection for following the log that every
/// process on the database appends to.
pub trait LogFollower: Send {
    /// Wait at most `timeout` for word that the log grew. True when it did,
    /// or may have: word is lost while the connection is down, so one that
    /// was made again says true.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<bool, StoreError>;
    /// Where to read the log.
    fn sql(&self) -> &dyn Sql;
}

/// An engine's connections, as the store's threads take them.
pub struct Opened {
    pub writer: Box<dyn WriterConn>,
    pub readers: Vec<Box<dyn ReaderConn>>,
    /// `Some` for an engine several control planes share: events are then
    /// published as read back from the log, not as this process commits
    /// them, so every replica publishes every replica's.
    pub follower: Option<Box<dyn LogFollower>>,
}
