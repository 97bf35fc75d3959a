//! Deployments and their per-machine rows: submit (with dedupe and
//! supersede), hand a machine its desired state, finish a deployment once
//! every machine is final.

use std::collections::BTreeSet;

use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{
    DeploymentFinished, DeploymentState, DeploymentSubmitted, DesiredState, MachineState,
    MachineUpdate, event,
};
use rusqlite::{OptionalExtension as _, params};

use super::{Store, StoreError, Tx};
use crate::rollout;

/// What `submit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: DeploymentId,
    /// False when the same artifact had been submitted before.
    pub created: bool,
    /// The revision of the deployment's `DeploymentSubmitted` event.
    pub revision: u64,
    pub machines: Vec<MachineName>,
}

impl Store {
    /// Store a validated artifact, or return the deployment that already
    /// holds the same one. Older deployments' unfinished rows for the same
    /// machines become SUPERSEDED.
    pub async fn submit(
        &self,
        artifact: DeploymentArtifact,
        artifact_json: String,
        submitted_by: String,
    ) -> Result<Submitted, StoreError> {
        self.write(move |tx| submit(tx, &artifact, &artifact_json, &submitted_by))
            .await
    }

    /// The desired state of `machine`: its row in the newest deployment that
    /// names it, unless that row is final. A PENDING row becomes SENT
    /// (committed before the caller sends it).
    pub async fn take_desired(
        &self,
        machine: MachineName,
    ) -> Result<Option<DesiredState>, StoreError> {
        self.write(move |tx| take_desired(tx, &machine)).await
    }
}

fn submit(
    tx: &mut Tx<'_>,
    artifact: &DeploymentArtifact,
    artifact_json: &str,
    submitted_by: &str,
) -> Result<Submitted, StoreError> {
    let digest = artifact.digest();
    let machines: Vec<MachineName> = artifact.closures.keys().cloned().collect();
    let existing: Option<(String, i64)> = tx
        .sql
        .query_row(
            "SELECT id, revision FROM deployments WHERE digest = ?1",
            [&digest],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((id, revision)) = existing {
        return Ok(Submitted {
            id: parse_id(&id)?,
            created: false,
            revision: from_sql(revision),
            machines,
        });
    }

    let id = fresh_id(tx, &digest)?;
    tx.sql.execute(
        "INSERT INTO deployments (id, git_commit, artifact, digest, state, created_ms, submitted_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id.as_str(),
            artifact.git_commit.as_str(),
            artifact_json,
            digest,
            DeploymentState::Running as i32,
            tx.now,
            submitted_by
        ],
    )?;
    for (machine, closure) in &artifact.closures {
        tx.sql.execute(
            "INSERT INTO machines (deployment_id, machine, closure, state, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id.as_str(),
                machine.as_str(),
                closure.as_str(),
                MachineState::Pending as i32,
                tx.now
            ],
        )?;
    }
    let submitted = DeploymentSubmitted {
        git_commit: artifact.git_commit.to_string(),
        machines: machines.iter().map(ToString::to_string).collect(),
        submitted_by: submitted_by.to_owned(),
    };
    let revision = tx.emit(id.as_str(), event::Kind::Submitted(submitted))?;
    tx.sql.execute(
        "UPDATE deployments SET revision = ?2 WHERE id = ?1",
        params![id.as_str(), to_sql(revision)],
    )?;
    supersede_older(tx, &id, &machines)?;
    Ok(Submitted {
        id,
        created: true,
        revision,
        machines,
    })
}

/// The short id, widened while it is taken (two artifacts whose digests
/// share a prefix, submitted in the same second).
fn fresh_id(tx: &Tx<'_>, digest: &str) -> Result<DeploymentId, StoreError> {
    for widen in 0..=40 {
        let Some(id) = rollout::new_deployment_id(tx.now, digest, widen) else {
            break;
        };
        let taken: bool = tx.sql.query_row(
            "SELECT EXISTS (SELECT 1 FROM deployments WHERE id = ?1)",
            [id.as_str()],
            |r| r.get(0),
        )?;
        if !taken {
            return Ok(id);
        }
    }
    Err(StoreError::Corrupt(format!(
        "no free deployment id for digest {digest}"
    )))
}

/// Unfinished rows of `machines` in other deployments become SUPERSEDED;
/// deployments left with only final rows are finished.
fn supersede_older(
    tx: &mut Tx<'_>,
    newer: &DeploymentId,
    machines: &[MachineName],
) -> Result<(), StoreError> {
    let mut touched = BTreeSet::new();
    for machine in machines {
        let rows: Vec<(String, String, i32)> = {
            let mut stmt = tx.sql.prepare_cached(
                "SELECT m.deployment_id, m.closure, m.state FROM machines m
                 JOIN deployments d ON d.id = m.deployment_id
                 WHERE m.machine = ?1 AND m.deployment_id != ?2 AND d.state = ?3",
            )?;
            stmt.query_map(
                params![
                    machine.as_str(),
                    newer.as_str(),
                    DeploymentState::Running as i32
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?
            .collect::<Result<_, _>>()?
        };
        for (older, closure, state) in rows {
            if machine_state(state).is_final() {
                continue;
            }
            let older = parse_id(&older)?;
            set_state(tx, &older, machine, MachineState::Superseded)?;
            let update = MachineUpdate {
                machine: machine.to_string(),
                state: MachineState::Superseded as i32,
                closure,
                message: format!("superseded by {newer}"),
                ..Default::default()
            };
            tx.emit(older.as_str(), event::Kind::Machine(update))?;
            touched.insert(older);
        }
    }
    for older in touched {
        finish_if_done(tx, older.as_str())?;
    }
    Ok(())
}

fn take_desired(
    tx: &mut Tx<'_>,
    machine: &MachineName,
) -> Result<Option<DesiredState>, StoreError> {
    let newest: Option<(String, String, i32, String)> = tx
        .sql
        .query_row(
            "SELECT m.deployment_id, m.closure, m.state, d.artifact FROM machines m
             JOIN deployments d ON d.id = m.deployment_id
             WHERE m.machine = ?1 ORDER BY d.seq DESC LIMIT 1",
            [machine.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((id, closure, state, artifact)) = newest else {
        return Ok(None);
    };
    let state = machine_state(state);
    if state.is_final() {
        return Ok(None);
    }
    let id = parse_id(&id)?;
    let artifact = DeploymentArtifact::from_json(artifact.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("the stored artifact of {id} is invalid: {e}")))?;
    if state == MachineState::Pending {
        set_state(tx, &id, machine, MachineState::Sent)?;
        let update = MachineUpdate {
            machine: machine.to_string(),
            state: MachineState::Sent as i32,
            closure: closure.clone(),
            message: "sent to the agent".to_owned(),
            ..Default::default()
        };
        tx.emit(id.as_str(), event::Kind::Machine(update))?;
    }
    Ok(Some(rollout::desired_state(
        &artifact,
        id.as_str(),
        machine,
        &closure,
    )))
}

/// Finish a running deployment whose machines are all final.
pub(super) fn finish_if_done(
    tx: &mut Tx<'_>,
    id: &str,
) -> Result<Option<DeploymentState>, StoreError> {
    let state: i32 =
        tx.sql
            .query_row("SELECT state FROM deployments WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
    if DeploymentState::try_from(state) != Ok(DeploymentState::Running) {
        return Ok(None);
    }
    let states: Vec<MachineState> = {
        let mut stmt = tx
            .sql
            .prepare_cached("SELECT state FROM machines WHERE deployment_id = ?1")?;
        stmt.query_map([id], |r| r.get::<_, i32>(0))?
            .map(|s| s.map(machine_state))
            .collect::<Result<_, _>>()?
    };
    let Some(outcome) = rollout::outcome(&states) else {
        return Ok(None);
    };
    tx.sql.execute(
        "UPDATE deployments SET state = ?2, finished_ms = ?3 WHERE id = ?1",
        params![id, outcome as i32, tx.now],
    )?;
    let finished = DeploymentFinished {
        state: outcome as i32,
        summary: rollout::summary(&states),
    };
    tx.emit(id, event::Kind::Finished(finished))?;
    Ok(Some(outcome))
}

/// The closure and state of one machine's row.
pub(super) fn row(
    tx: &Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
) -> Result<Option<(String, MachineState)>, StoreError> {
    Ok(tx
        .sql
        .query_row(
            "SELECT closure, state FROM machines WHERE deployment_id = ?1 AND machine = ?2",
            params![id.as_str(), machine.as_str()],
            |r| Ok((r.get(0)?, machine_state(r.get(1)?))),
        )
        .optional()?)
}

pub(super) fn set_state(
    tx: &Tx<'_>,
    id: &DeploymentId,
    machine: &MachineName,
    state: MachineState,
) -> Result<(), StoreError> {
    tx.sql.execute(
        "UPDATE machines SET state = ?3, updated_ms = ?4 WHERE deployment_id = ?1 AND machine = ?2",
        params![id.as_str(), machine.as_str(), state as i32, tx.now],
    )?;
    Ok(())
}

pub(super) fn machine_state(value: i32) -> MachineState {
    MachineState::try_from(value).unwrap_or(MachineState::Unspecified)
}

pub(super) fn parse_id(id: &str) -> Result<DeploymentId, StoreError> {
    DeploymentId::parse(id).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
