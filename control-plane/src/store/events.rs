//! The append-only event log.

use procurator_core::DeploymentId;
use procurator_proto::v1::{Event, event};
use prost::Message as _;
use rusqlite::{Connection, params};

use super::{Store, StoreError};

/// Append one event and return its revision.
pub(super) fn append(
    conn: &Connection,
    deployment_id: &str,
    at_ms: i64,
    kind: &event::Kind,
) -> Result<u64, StoreError> {
    // The revision is the row id, unknown until the insert; it is filled in
    // when the event is read back.
    let body = Event {
        revision: 0,
        at_ms,
        deployment_id: deployment_id.to_owned(),
        kind: Some(kind.clone()),
    }
    .encode_to_vec();
    conn.prepare_cached("INSERT INTO events (deployment_id, at_ms, body) VALUES (?1, ?2, ?3)")?
        .execute(params![deployment_id, at_ms, body])?;
    revision_from_sql(conn.last_insert_rowid())
}

fn revision_from_sql(rowid: i64) -> Result<u64, StoreError> {
    u64::try_from(rowid)
        .map_err(|_| StoreError::Corrupt(format!("negative event revision {rowid}")))
}

fn revision_to_sql(revision: u64) -> i64 {
    // Revisions past i64::MAX cannot exist; clamping keeps "after" correct.
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn decode(revision: i64, body: &[u8]) -> Result<Event, StoreError> {
    let mut event = Event::decode(body)
        .map_err(|e| StoreError::Corrupt(format!("event {revision} cannot be decoded: {e}")))?;
    event.revision = revision_from_sql(revision)?;
    Ok(event)
}

impl Store {
    /// Up to `limit` events with a revision greater than `after`, oldest
    /// first; only `deployment`'s when given.
    pub async fn events_after(
        &self,
        after: u64,
        deployment: Option<DeploymentId>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let after = revision_to_sql(after);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let rows: Vec<(i64, Vec<u8>)> = match &deployment {
                Some(id) => {
                    let mut stmt = conn.prepare_cached(
                        "SELECT revision, body FROM events
                         WHERE deployment_id = ?1 AND revision > ?2 ORDER BY revision LIMIT ?3",
                    )?;
                    stmt.query_map(params![id.as_str(), after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?
                }
                None => {
                    let mut stmt = conn.prepare_cached(
                        "SELECT revision, body FROM events WHERE revision > ?1 ORDER BY revision LIMIT ?2",
                    )?;
                    stmt.query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?
                }
            };
            rows.iter().map(|(rev, body)| decode(*rev, body)).collect()
        })
        .await
    }
}
