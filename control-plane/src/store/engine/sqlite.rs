//! The embedded engine: SQLite through rusqlite, one file in `--data-dir`.
//! Every statement is prepared once per connection and kept
//! (`prepare_cached`).

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{
    Cell, Opened, Param, Params, ReaderConn, Row, Sql, StoreError, WriteTx, WriterConn, bind,
};

mod schema;

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Int(n) => ValueRef::Integer(n),
            Param::Text(text) => ValueRef::Text(text.as_bytes()),
            Param::Bytes(bytes) => ValueRef::Blob(bytes),
            Param::Null => ValueRef::Null,
            Param::Texts(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no arrays: a list of keys is bound one by one".into(),
                ));
            }
        }))
    }
}

/// The writer connection (its schema made current) and `readers` read-only
/// ones, on the database file at `path`.
pub fn open(path: &Path, readers: usize) -> Result<Opened, StoreError> {
    let open = || {
        rusqlite::Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })
    };
    let writer = open()?;
    schema::prepare(&writer)?;
    let mut all: Vec<Box<dyn ReaderConn>> = Vec::with_capacity(readers);
    for _ in 0..readers {
        let reader = open()?;
        reader.pragma_update(None, "query_only", "ON")?;
        reader.set_prepared_statement_cache_capacity(64);
        all.push(Box::new(reader));
    }
    Ok(Opened {
        writer: Box::new(writer),
        readers: all,
        follower: None,
    })
}

impl Row for rusqlite::Row<'_> {
    fn cell(&self, index: usize) -> Result<Cell<'_>, StoreError> {
        Ok(match self.get_ref(index)? {
            ValueRef::Integer(n) => Cell::Int(n),
            ValueRef::Text(text) => Cell::Text(std::str::from_utf8(text).map_err(|_| {
                StoreError::Corrupt(format!("column {index} holds text that is not UTF-8"))
            })?),
            ValueRef::Blob(bytes) => Cell::Bytes(bytes),
            ValueRef::Null => Cell::Null,
            ValueRef::Real(x) => {
                return Err(StoreError::Corrupt(format!(
                    "column {index} holds the real number {x}, which the store never writes"
                )));
            }
        })
    }
}

impl Sql for rusqlite::Connection {
    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<usize, StoreError> {
        let bound = bind(params);
        Ok(self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(bound.iter()))?)
    }

    fn exec_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.execute_batch(sql)?)
    }

    fn for_each_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let bound = bind(params);
        let mut stmt = self.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(bound.iter()))?;
        while let Some(row) = rows.next()? {
            if !each(row)? {
                break;
            }
        }
        Ok(())
    }
}

impl Sql for rusqlite::Transaction<'_> {
    fn exec(&self, sql: &str, params: &Params<'_>) -> Result<usize, StoreError> {
        (**self).exec(sql, params)
    }

    fn exec_batch(&self, sql: &str) -> Result<(), StoreError> {
        (**self).exec_batch(sql)
    }

    fn for_each_row(
        &self,
        sql: &str,
        params: &Params<'_>,
        each: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        (**self).for_each_row(sql, params, each)
    }
}

impl WriteTx for rusqlite::Transaction<'_> {
    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok((*self).commit()?)
    }
}

impl WriterConn for rusqlite::Connection {
    fn begin(&mut self) -> Result<Box<dyn WriteTx + '_>, StoreError> {
        // IMMEDIATE: the write lock is taken now, not at the first write,
        // so what the batch reads first (the log's head) stays true.
        let tx = self.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Ok(Box::new(tx))
    }

    fn total_changes(&self) -> u64 {
        rusqlite::Connection::total_changes(self)
    }
}

impl ReaderConn for rusqlite::Connection {
    fn snapshot(
        &self,
        f: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // A read transaction: its first read fixes what it sees.
        let read = self.unchecked_transaction()?;
        f(&*read)
    }
}
