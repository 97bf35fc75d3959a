//! Reading deployments back as the protocol shows them.

use procurator_core::DeploymentId;
use procurator_proto::v1::{CopyProgress, Deployment, DeploymentState, MachineStatus, Wave};

use super::engine::{Row, Sql, SqlExt as _};
use super::rows::{StoredWave, from_sql, machine_state};
use super::{Store, StoreError};

const DEPLOYMENT_COLUMNS: &str = "id, git_commit, state, created_ms, finished_ms, submitted_by,
     halted_reason, rollback_of, waves, forced_by, intent_keys FROM deployments";

impl Store {
    pub async fn get_deployment(&self, id: DeploymentId) -> Result<Option<Deployment>, StoreError> {
        self.read(move |conn| {
            let deployment = conn.fetch_opt(
                &format!("SELECT {DEPLOYMENT_COLUMNS} WHERE id = ?1"),
                &[&id.as_str()],
                deployment_row,
            )?;
            deployment.map(|d| with_machines(conn, d)).transpose()
        })
        .await
    }

    /// The newest `limit` deployments, newest first.
    pub async fn list_deployments(&self, limit: u32) -> Result<Vec<Deployment>, StoreError> {
        self.read(move |conn| {
            let deployments: Vec<Deployment> = conn.fetch_all(
                &format!("SELECT {DEPLOYMENT_COLUMNS} ORDER BY seq DESC LIMIT ?1"),
                &[&limit],
                deployment_row,
            )?;
            deployments
                .into_iter()
                .map(|d| with_machines(conn, d))
                .collect()
        })
        .await
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

fn with_machines(conn: &dyn Sql, mut deployment: Deployment) -> Result<Deployment, StoreError> {
    deployment.machines = conn.fetch_all(
        "SELECT machine, closure, state, failed_phase, reason, output_tail, bytes_done,
                bytes_expected, paths_done, paths_expected, updated_ms, wave, reboot_required
         FROM machines WHERE deployment_id = ?1 ORDER BY machine",
        &[&deployment.id],
        |r| {
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
        },
    )?;
    Ok(deployment)
}
