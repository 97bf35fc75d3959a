//! The append-only event log.

use procurator_core::DeploymentId;
use procurator_proto::v1::Event;
use prost::Message as _;

use super::engine::{Row, Sql, SqlExt as _, ToParam, insert_rows};
use super::{Store, StoreError};

/// Append `events` (numbered already, in order) to the log.
pub(super) fn append_all(conn: &dyn Sql, events: &[Event]) -> Result<(), StoreError> {
    // The body's revision is left out: it is the row's, filled in when the
    // event is read back.
    let rows: Vec<(i64, &str, i64, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let body = Event {
                revision: 0,
                ..e.clone()
            }
            .encode_to_vec();
            (
                revision_to_sql(e.revision),
                e.deployment_id.as_str(),
                e.at_ms,
                body,
            )
        })
        .collect();
    let mut values: Vec<&dyn ToParam> = Vec::with_capacity(rows.len() * 4);
    for (revision, deployment_id, at_ms, body) in &rows {
        values.extend([revision as &dyn ToParam, deployment_id, at_ms, body]);
    }
    insert_rows(
        conn,
        "events (revision, deployment_id, at_ms, body)",
        4,
        &values,
    )
}

/// The revision of the last event ever appended (0: none yet), kept even
/// when pruning removed it.
pub(super) fn head(conn: &dyn Sql) -> Result<u64, StoreError> {
    let head: i64 = conn.fetch_one("SELECT head FROM log_bounds WHERE id = 1", &[], |r| {
        r.get(0)
    })?;
    revision_from_sql(head)
}

pub(super) fn set_head(conn: &dyn Sql, head: u64) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE log_bounds SET head = ?1 WHERE id = 1",
        &[&revision_to_sql(head)],
    )?;
    Ok(())
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

/// A `Watch` asked to resume from a revision whose events, or some it
/// should get after it, were pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub asked: u64,
    /// The oldest revision it can resume from.
    pub resume_from: u64,
}

impl Store {
    /// Up to `limit` events with a revision greater than `after`, oldest
    /// first; only `deployment`'s when given.
    #[cfg(test)]
    pub async fn events_after(
        &self,
        after: u64,
        deployment: Option<DeploymentId>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.read(move |conn| page(conn, after, deployment.as_ref(), limit))
            .await
    }

    /// [`Store::events_after`] for a watcher, or `Compacted` when the log no
    /// longer holds every event it should get after `after`. Of one
    /// deployment: when some of its events were pruned by age (from 0, the
    /// whole deployment, too). Of the whole log: when anything after `after`
    /// was pruned (from 0: whatever is kept).
    pub async fn watch_page(
        &self,
        after: u64,
        deployment: Option<DeploymentId>,
        limit: usize,
    ) -> Result<Result<Vec<Event>, Compacted>, StoreError> {
        self.read(move |conn| {
            // One snapshot: the bounds and the page agree.
            let mut answer = None;
            conn.snapshot(&mut |read| {
                answer = Some(watch_page_in(read, after, deployment.as_ref(), limit)?);
                Ok(())
            })?;
            answer.ok_or_else(|| StoreError::Corrupt("the snapshot read nothing".into()))
        })
        .await
    }
}

/// A watcher's page from one snapshot (see [`Store::watch_page`]).
fn watch_page_in(
    read: &dyn Sql,
    after: u64,
    deployment: Option<&DeploymentId>,
    limit: usize,
) -> Result<Result<Vec<Event>, Compacted>, StoreError> {
    let bounds = super::retention::log_bounds(read)?;
    let resume_from = match deployment {
        Some(id) => {
            let submitted: Option<i64> = read.fetch_opt(
                "SELECT revision FROM deployments WHERE id = ?1",
                &[&id.as_str()],
                |r| r.get(0),
            )?;
            let lost_some =
                submitted.is_some_and(|revision| revision_to_sql(bounds.compacted) >= revision);
            (lost_some && after < bounds.compacted).then_some(bounds.compacted)
        }
        None => (after > 0 && after < bounds.pruned).then_some(bounds.pruned),
    };
    if let Some(resume_from) = resume_from {
        return Ok(Err(Compacted {
            asked: after,
            resume_from,
        }));
    }
    page(read, after, deployment, limit).map(Ok)
}

pub(super) fn page(
    conn: &dyn Sql,
    after: u64,
    deployment: Option<&DeploymentId>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let after = revision_to_sql(after);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row = |r: &dyn Row| -> Result<Event, StoreError> {
        let revision: i64 = r.get(0)?;
        let body: Vec<u8> = r.get(1)?;
        decode(revision, &body)
    };
    match deployment {
        Some(id) => conn.fetch_all(
            "SELECT revision, body FROM events
             WHERE deployment_id = ?1 AND revision > ?2 ORDER BY revision LIMIT ?3",
            &[&id.as_str(), &after, &limit],
            row,
        ),
        None => conn.fetch_all(
            "SELECT revision, body FROM events WHERE revision > ?1 ORDER BY revision LIMIT ?2",
            &[&after, &limit],
            row,
        ),
    }
}
