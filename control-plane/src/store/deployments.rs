//! Deployments and their per-machine rows: submit (with dedupe, the
//! stale-commit check and supersede), finish a deployment once every
//! machine is final.

use std::collections::BTreeSet;

use procurator_core::artifact::Selector;
use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{
    DeploymentFinished, DeploymentState, DeploymentSubmitted, MachineState, MachineUpdate, event,
};

use super::engine::{Sql, SqlExt as _, ToParam, insert_rows};
use super::rows::{
    StoredWave, UNFINISHED_STATES, from_sql, machine_state, parse_id, set_state, to_sql,
};
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

/// Why `submit` refused an artifact.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "{0}; a stale artifact is refused so CI cannot roll the fleet back by accident; pass --force to deploy it anyway"
    )]
    Stale(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Store a validated artifact, or return the newest deployment when it
    /// holds the same one. Refuses a stale commit unless `force`. Older
    /// deployments' unfinished rows for the same machines become SUPERSEDED.
    pub async fn submit(
        &self,
        artifact: DeploymentArtifact,
        artifact_json: String,
        submitted_by: String,
        force: bool,
        on: Vec<Selector>,
    ) -> Result<Submitted, SubmitError> {
        let outcome = self
            .write(move |tx| {
                if let Some(existing) = same_as_newest(tx, &artifact, &on)? {
                    return Ok(Ok(existing));
                }
                if !force && let Some(why) = stale(tx, &artifact)? {
                    return Ok(Err(why));
                }
                let new = NewDeployment {
                    artifact: &artifact,
                    artifact_json: &artifact_json,
                    submitted_by: &submitted_by,
                    forced_by: if force { &submitted_by } else { "" },
                    rollback_of: "",
                    on: &on,
                };
                insert(tx, &new).map(Ok)
            })
            .await?;
        outcome.map_err(SubmitError::Stale)
    }
}

/// The newest deployment, when it holds this very artifact.
fn same_as_newest(
    tx: &Tx<'_>,
    artifact: &DeploymentArtifact,
    on: &[Selector],
) -> Result<Option<Submitted>, StoreError> {
    let newest: Option<(String, String, i64)> = tx.sql.fetch_opt(
        "SELECT id, digest, revision FROM deployments ORDER BY seq DESC LIMIT 1",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    match newest {
        Some((id, digest, revision)) if digest == artifact.digest_on(on) => Ok(Some(Submitted {
            id: parse_id(&id)?,
            created: false,
            revision: from_sql(revision),
            machines: selected(artifact, on)?
                .into_iter()
                .map(|t| t.name)
                .collect(),
        })),
        _ => Ok(None),
    }
}

/// Why the artifact is older than the deployment in force (the newest one
/// not cancelled), if it is.
fn stale(tx: &Tx<'_>, artifact: &DeploymentArtifact) -> Result<Option<String>, StoreError> {
    let Some(InForce {
        seq,
        id,
        git_commit: commit,
        git_commit_time: time,
    }) = in_force(&*tx.sql)?
    else {
        return Ok(None);
    };
    let commit_new = artifact.git_commit.as_str();
    let older: Option<String> = tx.sql.fetch_opt(
        "SELECT id FROM deployments WHERE git_commit = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT 1",
        &[&commit_new, &seq],
        |r| r.get(0),
    )?;
    if let Some(older) = older
        && commit_new != commit
    {
        return Ok(Some(format!(
            "commit {commit_new} was deployed by {older}, before {id} (commit {commit}) which is in force"
        )));
    }
    match (artifact.git_commit_time, time) {
        (Some(new), Some(current)) if new < current => Ok(Some(format!(
            "commit {commit_new} (committed at {new}) is older than commit {commit} of {id} in force (committed at {current})"
        ))),
        // Without a time nothing says it is newer: it could be any old build.
        (None, Some(current)) if commit_new != commit => Ok(Some(format!(
            "commit {commit_new} has no gitCommitTime, so nothing shows it is newer than commit {commit} of {id} in force (committed at {current}); write the artifact with `procurator-ctl artifact`, which records the time"
        ))),
        _ => Ok(None),
    }
}

/// The deployment in force: the newest one not cancelled.
pub(super) struct InForce {
    pub seq: i64,
    pub id: String,
    pub git_commit: String,
    pub git_commit_time: Option<i64>,
}

pub(super) fn in_force(sql: &dyn Sql) -> Result<Option<InForce>, StoreError> {
    sql.fetch_opt(
        "SELECT seq, id, git_commit, git_commit_time FROM deployments
             WHERE state != ?1 AND stopped != ?2 ORDER BY seq DESC LIMIT 1",
        &[
            &(DeploymentState::Cancelled as i32),
            &rollout::Stop::to_sql(Some(rollout::Stop::Cancelled)),
        ],
        |r| {
            Ok(InForce {
                seq: r.get(0)?,
                id: r.get(1)?,
                git_commit: r.get(2)?,
                git_commit_time: r.get(3)?,
            })
        },
    )
}

/// A deployment about to be stored, and who is behind it.
pub(super) struct NewDeployment<'a> {
    pub artifact: &'a DeploymentArtifact,
    /// The artifact's text, as stored and as `PlanRollback` returns it.
    pub artifact_json: &'a str,
    pub submitted_by: &'a str,
    /// Who passed `force`; empty when nobody did.
    pub forced_by: &'a str,
    /// The deployment this one rolls back to; empty when it is no rollback.
    pub rollback_of: &'a str,
    /// Only the rows these select; none: every row.
    pub on: &'a [Selector],
}

/// The rows a deployment of `artifact` on `on` has. Checked at the API, so
/// an error here is the store's own.
fn selected<'a>(
    artifact: &'a DeploymentArtifact,
    on: &[Selector],
) -> Result<Vec<procurator_core::artifact::Target<'a>>, StoreError> {
    artifact
        .selected_targets(on)
        .map_err(|e| StoreError::Corrupt(format!("a deployment's selectors: {e}")))
}

/// Selectors as stored: space separated (none holds a space).
pub(super) fn selectors_text(on: &[Selector]) -> String {
    on.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Selectors as stored, read back; unreadable ones are the store's fault.
pub(super) fn parse_selectors(text: &str) -> Result<Vec<Selector>, StoreError> {
    text.split_whitespace()
        .map(|s| {
            Selector::parse(s).map_err(|e| StoreError::Corrupt(format!("stored selectors: {e}")))
        })
        .collect()
}

/// Store a new deployment of `artifact` with its rows, waves and
/// `DeploymentSubmitted` event, and supersede older rows of its machines.
pub(super) fn insert(tx: &mut Tx<'_>, new: &NewDeployment<'_>) -> Result<Submitted, StoreError> {
    let NewDeployment {
        artifact,
        artifact_json,
        submitted_by,
        forced_by,
        rollback_of,
        on,
    } = *new;
    let digest = artifact.digest_on(on);
    let intent_keys: Vec<&str> = artifact.intent_key_names().into_iter().collect();
    // A row per machine, each VM machine a row per instance; only those
    // selected.
    let targets = selected(artifact, on)?;
    let machines: Vec<MachineName> = targets.iter().map(|t| t.name.clone()).collect();
    let chosen: BTreeSet<&MachineName> = machines.iter().collect();
    let mut waves = artifact.waves();
    if !on.is_empty() {
        // Waves of the rows deployed; a wave left empty keeps its place.
        for wave in &mut waves {
            wave.machines.retain(|m| chosen.contains(m));
        }
    }
    let stored: Vec<StoredWave> = waves
        .iter()
        .map(|w| StoredWave {
            name: w.name.clone(),
            machines: w.machines.iter().map(ToString::to_string).collect(),
        })
        .collect();
    let waves_json = serde_json::to_string(&stored)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode the waves: {e}")))?;

    let id = fresh_id(tx, &digest)?;
    tx.sql.exec(
        "INSERT INTO deployments (id, git_commit, artifact, digest, state, created_ms, submitted_by,
                                  git_commit_time, waves, rollback_of, forced_by, intent_keys,
                                  selectors)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        &[
            &id.as_str(),
            &artifact.git_commit.as_str(),
            &artifact_json,
            &digest,
            &(DeploymentState::Running as i32),
            &tx.now,
            &submitted_by,
            &artifact.git_commit_time,
            &waves_json,
            &rollback_of,
            &forced_by,
            &intent_keys.join(" "),
            &selectors_text(on),
        ],
    )?;
    let wave_of: std::collections::HashMap<&MachineName, usize> = waves
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.machines.iter().map(move |m| (m, i)))
        .collect();
    // Every row is in a wave.
    let rows: Vec<(&str, &str, i64)> = targets
        .iter()
        .map(|target| {
            let wave = wave_of.get(&target.name).copied().unwrap_or(waves.len());
            (
                target.name.as_str(),
                target.closure.as_str(),
                i64::try_from(wave).unwrap_or(i64::MAX),
            )
        })
        .collect();
    let (pending, deployment) = (MachineState::Pending as i32, id.as_str());
    let mut values: Vec<&dyn ToParam> = Vec::with_capacity(rows.len() * 6);
    for (machine, closure, wave) in &rows {
        values.extend([
            &deployment as &dyn ToParam,
            machine,
            closure,
            &pending,
            &tx.now,
            wave,
        ]);
    }
    insert_rows(
        &*tx.sql,
        "machines (deployment_id, machine, closure, state, updated_ms, wave)",
        6,
        &values,
    )?;
    let submitted = DeploymentSubmitted {
        git_commit: artifact.git_commit.to_string(),
        machines: machines.iter().map(ToString::to_string).collect(),
        submitted_by: submitted_by.to_owned(),
        forced_by: forced_by.to_owned(),
        intent_keys: intent_keys.iter().map(|k| (*k).to_owned()).collect(),
        rollback_of: rollback_of.to_owned(),
        on: on.iter().map(ToString::to_string).collect(),
    };
    let revision = tx.emit(id.as_str(), event::Kind::Submitted(submitted))?;
    tx.sql.exec(
        "UPDATE deployments SET revision = ?2 WHERE id = ?1",
        &[&id.as_str(), &to_sql(revision)],
    )?;
    supersede_older(tx, &id, &machines, !on.is_empty())?;
    super::placements::place_vms(tx, &id, artifact, false)?;
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
        let taken: bool = tx.sql.fetch_one(
            "SELECT EXISTS (SELECT 1 FROM deployments WHERE id = ?1)",
            &[&id.as_str()],
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

/// Unfinished rows of other deployments become SUPERSEDED: those of
/// `machines`, which the newer one deploys again, and (unless the newer one
/// is a `subset` of the blueprint, which leaves the others alone) those of
/// machines it no longer has (removed from the blueprint, their change is
/// moot). Deployments left with only final rows are finished.
fn supersede_older(
    tx: &mut Tx<'_>,
    newer: &DeploymentId,
    machines: &[MachineName],
    subset: bool,
) -> Result<(), StoreError> {
    // Usually the deployment before has finished: nothing to look up.
    let others_running: bool = tx.sql.fetch_one(
        "SELECT EXISTS (SELECT 1 FROM deployments WHERE state = ?1 AND id != ?2)",
        &[&(DeploymentState::Running as i32), &newer.as_str()],
        |r| r.get(0),
    )?;
    if !others_running {
        return Ok(());
    }
    let rows: Vec<(String, String, String, i32)> = {
        tx.sql.fetch_all(
            "SELECT m.deployment_id, m.machine, m.closure, m.state FROM machines m
             JOIN deployments d ON d.id = m.deployment_id
             WHERE m.deployment_id != ?1 AND d.state = ?2",
            &[&newer.as_str(), &(DeploymentState::Running as i32)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?
    };
    let kept: BTreeSet<&str> = machines.iter().map(MachineName::as_str).collect();
    let mut touched = BTreeSet::new();
    for (older, machine, closure, state) in rows {
        if machine_state(state).is_final() || (subset && !kept.contains(machine.as_str())) {
            continue;
        }
        let older = parse_id(&older)?;
        let machine =
            MachineName::parse(&machine).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        set_state(tx, &older, &machine, MachineState::Superseded)?;
        let message = if kept.contains(machine.as_str()) {
            format!("superseded by {newer}")
        } else {
            format!("superseded by {newer}, which no longer has {machine}")
        };
        let update = MachineUpdate {
            machine: machine.to_string(),
            state: MachineState::Superseded as i32,
            closure,
            message,
            ..Default::default()
        };
        tx.emit(older.as_str(), event::Kind::Machine(update))?;
        touched.insert(older);
    }
    for older in touched {
        finish_if_done(tx, older.as_str())?;
    }
    Ok(())
}

/// Finish a running deployment whose machines are all final.
pub(super) fn finish_if_done(
    tx: &mut Tx<'_>,
    id: &str,
) -> Result<Option<DeploymentState>, StoreError> {
    // Called after every result: one statement, an index probe per
    // in-flight state, answers "not yet" without reading every row, which
    // made a large rollout quadratic.
    let (state, stop, in_flight): (i32, i64, bool) =
        tx.sql.fetch_one(&FINISH_QUERY, &[&id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    if DeploymentState::try_from(state) != Ok(DeploymentState::Running) || in_flight {
        return Ok(None);
    }
    let states: Vec<MachineState> = {
        tx.sql
            .fetch_all(
                "SELECT state FROM machines WHERE deployment_id = ?1",
                &[&id],
                |r| r.get::<i32>(0),
            )?
            .into_iter()
            .map(machine_state)
            .collect()
    };
    let Some(outcome) = rollout::outcome(&states, rollout::Stop::from_sql(stop)) else {
        return Ok(None);
    };
    tx.sql.exec(
        "UPDATE deployments SET state = ?2, finished_ms = ?3 WHERE id = ?1",
        &[&id, &(outcome as i32), &tx.now],
    )?;
    let finished = DeploymentFinished {
        state: outcome as i32,
        summary: rollout::summary(&states),
    };
    tx.emit(id, event::Kind::Finished(finished))?;
    Ok(Some(outcome))
}

/// A deployment's state, how it stopped, and whether it has a machine
/// row in a state that is not final.
static FINISH_QUERY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT state, stopped, EXISTS (SELECT 1 FROM machines
                 WHERE deployment_id = ?1 AND state IN ({}))
             FROM deployments WHERE id = ?1",
        *UNFINISHED_STATES
    )
});
