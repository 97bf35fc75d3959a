//! Reading deployments back as the protocol shows them: summaries with
//! their rows counted, and the rows a page at a time.

use procurator_core::DeploymentId;
use procurator_proto::v1::{
    CopyProgress, Deployment, DeploymentState, MachineState, MachineStatus, Wave,
};

use super::engine::{Row, Sql, SqlExt as _};
use super::paging::{Page, PageQuery, collect};
use super::rows::{StoredWave, from_sql, machine_state};
use super::{Store, StoreError};

const DEPLOYMENT_COLUMNS: &str = "id, git_commit, state, created_ms, finished_ms, submitted_by,
     halted_reason, rollback_of, waves, forced_by, intent_keys, selectors FROM deployments";

/// The machine rows `ListMachines` asks for: a page, in some states and
/// waves (empty: any).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineQuery {
    pub page: PageQuery,
    pub states: Vec<MachineState>,
    pub waves: Vec<u32>,
}

impl Store {
    /// The deployment with its rows counted per state, not listed.
    pub async fn deployment_summary(
        &self,
        id: DeploymentId,
    ) -> Result<Option<Deployment>, StoreError> {
        self.read(move |conn| {
            let deployment = conn.fetch_opt(
                &format!("SELECT {DEPLOYMENT_COLUMNS} WHERE id = ?1"),
                &[&id.as_str()],
                deployment_row,
            )?;
            deployment.map(|d| with_counts(conn, d)).transpose()
        })
        .await
    }

    /// The newest `limit` deployments, newest first, as summaries.
    pub async fn list_deployments(&self, limit: u32) -> Result<Vec<Deployment>, StoreError> {
        self.read(move |conn| {
            let deployments: Vec<Deployment> = conn.fetch_all(
                &format!("SELECT {DEPLOYMENT_COLUMNS} ORDER BY seq DESC LIMIT ?1"),
                &[&limit],
                deployment_row,
            )?;
            deployments
                .into_iter()
                .map(|d| with_counts(conn, d))
                .collect()
        })
        .await
    }

    /// A page of deployment `id`'s rows; `None` when there is no such deployment.
    pub async fn list_machines(
        &self,
        id: DeploymentId,
        query: MachineQuery,
    ) -> Result<Option<Page<MachineStatus>>, StoreError> {
        self.read(move |conn| {
            let known: Option<i32> = conn.fetch_opt(
                "SELECT state FROM deployments WHERE id = ?1",
                &[&id.as_str()],
                |r| r.get(0),
            )?;
            if known.is_none() {
                return Ok(None);
            }
            // Numbers from the request's enums, not text: safe to write in.
            let mut filter = String::new();
            if !query.states.is_empty() {
                let codes: Vec<String> = query
                    .states
                    .iter()
                    .map(|s| (*s as i32).to_string())
                    .collect();
                filter.push_str(&format!(" AND state IN ({})", codes.join(", ")));
            }
            if !query.waves.is_empty() {
                let waves: Vec<String> = query.waves.iter().map(u32::to_string).collect();
                filter.push_str(&format!(" AND wave IN ({})", waves.join(", ")));
            }
            let sql = format!(
                "SELECT {MACHINE_COLUMNS} FROM machines
                 WHERE deployment_id = ?1 AND machine > ?2 AND machine >= ?3{filter}
                 ORDER BY machine LIMIT ?4"
            );
            collect(
                &query.page,
                |m: &MachineStatus| &m.machine,
                |after, from, limit| {
                    conn.fetch_all(&sql, &[&id.as_str(), &after, &from, &limit], machine_row)
                },
            )
            .map(Some)
        })
        .await
    }

    /// The deployment with every row: for tests, which look at rows
    /// directly (the RPCs page them).
    #[cfg(test)]
    pub async fn get_deployment(&self, id: DeploymentId) -> Result<Option<Deployment>, StoreError> {
        let Some(mut deployment) = self.deployment_summary(id.clone()).await? else {
            return Ok(None);
        };
        let query = MachineQuery {
            page: PageQuery::first(procurator_core::limits::MAX_PAGE_ROWS),
            states: Vec::new(),
            waves: Vec::new(),
        };
        let page = self
            .list_machines(id, query)
            .await?
            .unwrap_or_else(|| Page {
                items: Vec::new(),
                next_after: None,
            });
        assert!(page.next_after.is_none(), "more rows than one page holds");
        deployment.machines = page.items;
        Ok(Some(deployment))
    }

    /// A deployment's state, or `None` when there is no such deployment.
    pub async fn deployment_state(
        &self,
        id: DeploymentId,
    ) -> Result<Option<DeploymentState>, StoreError> {
        self.read(move |conn| {
            let state: Option<i32> = conn.fetch_opt(
                "SELECT state FROM deployments WHERE id = ?1",
                &[&id.as_str()],
                |r| r.get(0),
            )?;
            Ok(state.map(|s| DeploymentState::try_from(s).unwrap_or(DeploymentState::Unspecified)))
        })
        .await
    }
}

fn deployment_row(r: &dyn Row) -> Result<Deployment, StoreError> {
    Ok(Deployment {
        id: r.get(0)?,
        git_commit: r.get(1)?,
        state: r.get(2)?,
        created_at_ms: r.get(3)?,
        finished_at_ms: r.get(4)?,
        machines: Vec::new(),
        submitted_by: r.get(5)?,
        halted_reason: r.get(6)?,
        rollback_of: r.get(7)?,
        waves: waves(&r.get::<String>(8)?),
        forced_by: r.get(9)?,
        intent_keys: r
            .get::<String>(10)?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        on: r
            .get::<String>(11)?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        ..Deployment::default()
    })
}

/// The stored wave list as the protocol shows it; unreadable: none.
fn waves(json: &str) -> Vec<Wave> {
    let stored: Vec<StoredWave> = serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a deployment's waves cannot be read");
        Vec::new()
    });
    stored
        .into_iter()
        .zip(0u32..)
        .map(|(w, index)| Wave {
            index,
            name: w.name,
            machines: w.machines,
        })
        .collect()
}

const MACHINE_COLUMNS: &str =
    "machine, closure, state, failed_phase, reason, output_tail, bytes_done,
     bytes_expected, paths_done, paths_expected, updated_ms, wave, reboot_required";

/// [`MACHINE_COLUMNS`] of a table named `prefix` (`"m."`) in a join.
pub(super) fn machine_columns(prefix: &str) -> String {
    MACHINE_COLUMNS
        .split(',')
        .map(|column| format!("{prefix}{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A row read with [`MACHINE_COLUMNS`] first.
pub(super) fn machine_row(r: &dyn Row) -> Result<MachineStatus, StoreError> {
    let copy = CopyProgress {
        bytes_done: from_sql(r.get(6)?),
        bytes_expected: from_sql(r.get(7)?),
        paths_done: from_sql(r.get(8)?),
        paths_expected: from_sql(r.get(9)?),
    };
    Ok(MachineStatus {
        machine: r.get(0)?,
        closure: r.get(1)?,
        state: machine_state(r.get(2)?) as i32,
        failed_phase: machine_state(r.get(3)?) as i32,
        reason: r.get(4)?,
        output_tail: r.get(5)?,
        // No copy report yet: leave it out rather than show zeros.
        copy: (copy != CopyProgress::default()).then_some(copy),
        updated_at_ms: r.get(10)?,
        wave: u32::try_from(r.get::<i64>(11)?).unwrap_or(u32::MAX),
        reboot_required: r.get(12)?,
    })
}

/// The deployment's rows counted per state label.
fn with_counts(conn: &dyn Sql, mut deployment: Deployment) -> Result<Deployment, StoreError> {
    let counts: Vec<(i32, i64)> = conn.fetch_all(
        "SELECT state, COUNT(*) FROM machines WHERE deployment_id = ?1 GROUP BY state",
        &[&deployment.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for (state, n) in counts {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        *deployment
            .machine_counts
            .entry(machine_state(state).label().to_owned())
            .or_default() += n;
        deployment.machine_total = deployment.machine_total.saturating_add(n);
    }
    Ok(deployment)
}
