//! [`Sql`] over rusqlite: every statement is prepared once per connection
//! and kept (`prepare_cached`).

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Cell, Param, Params, Row, Sql, StoreError};

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Int(n) => ValueRef::Integer(n),
            Param::Text(text) => ValueRef::Text(text.as_bytes()),
            Param::Bytes(bytes) => ValueRef::Blob(bytes),
            Param::Null => ValueRef::Null,
        }))
    }
}

fn bind<'a>(params: &'a Params<'_>) -> Vec<Param<'a>> {
    params.iter().map(|p| p.to_param()).collect()
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
