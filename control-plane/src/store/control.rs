//! What operators and agents ask of a deployment beyond submitting it:
//! cancel it, roll back to an earlier one, confirm it over a new connection.

use std::collections::BTreeMap;

use procurator_core::intent::Statement;
use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{DeploymentState, MachineState, MachineUpdate, event};

use super::deployments::{NewDeployment, Submitted, finish_if_done, insert};
use super::engine::{Row, Sql, SqlExt as _};
use super::rows::{machine_state, set_state};
use super::{Store, StoreError};
use crate::rollout::{self, Stop};

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    NotFound,
    AlreadyFinished(DeploymentState),
    /// Rows not started are CANCELLED; these machines were in flight and
    /// must be told to drop it (or are refused their confirmation).
    Done {
        in_flight: Vec<MachineName>,
    },
}

/// What `rollback` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolledBack {
    /// No such deployment (the id given), or no succeeded one to go back to.
    NotFound(String),
    /// The statements given do not fit the target's artifact.
    Invalid(String),
    Done(Submitted),
}

/// The deployment a rollback goes back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackTarget {
    pub id: String,
    pub git_commit: String,
    pub artifact_json: String,
}

/// `to`, or the newest succeeded deployment before the one in force.
fn rollback_target(
    conn: &dyn Sql,
    to: Option<&DeploymentId>,
) -> Result<Option<RollbackTarget>, StoreError> {
    let read = |r: &dyn Row| {
        Ok(RollbackTarget {
            id: r.get(0)?,
            git_commit: r.get(1)?,
            artifact_json: r.get(2)?,
        })
    };
    Ok(match to {
        Some(id) => conn.fetch_opt(
            "SELECT id, git_commit, artifact FROM deployments WHERE id = ?1",
            &[&id.as_str()],
            read,
        )?,
        None => conn.fetch_opt(
            "SELECT id, git_commit, artifact FROM deployments
                 WHERE state = ?1 AND seq < (
                     SELECT seq FROM deployments WHERE state != ?2 AND stopped != ?3
                     ORDER BY seq DESC LIMIT 1)
                 ORDER BY seq DESC LIMIT 1",
            &[
                &(DeploymentState::Succeeded as i32),
                &(DeploymentState::Cancelled as i32),
                &Stop::to_sql(Some(Stop::Cancelled)),
            ],
            read,
        )?,
    })
}

fn not_found(to: Option<&DeploymentId>) -> String {
    match to {
        Some(id) => {
            format!("there is no deployment {id}; list them with `procurator-ctl deployments`")
        }
        None => "there is no succeeded deployment before the one in force to roll back to; \
                 name one with --to"
            .to_owned(),
    }
}

/// `artifact` with `intents` as its statements, checked like any submitted
/// artifact: each must say exactly what the artifact says.
fn resigned(
    mut artifact: DeploymentArtifact,
    intents: BTreeMap<String, String>,
) -> Result<(DeploymentArtifact, String), String> {
    let mut statements = BTreeMap::new();
    for (row, text) in intents {
        let name = MachineName::parse(&row).map_err(|e| format!("intents: {e}"))?;
        let statement = Statement::parse(&text).map_err(|e| format!("intents.{name}: {e}"))?;
        statements.insert(name, statement);
    }
    artifact.intents = statements;
    let json = artifact.canonical_json();
    let checked = DeploymentArtifact::from_json(json.as_bytes()).map_err(|e| e.to_string())?;
    Ok((checked, json))
}

/// The answer to an agent's confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// This machine has no row with that closure in that deployment.
    NotFound,
    /// The row is not between SENT and CONFIRMING (it waits for its wave,
    /// or is committing already): nothing to confirm.
    NotSent(MachineState),
    Refused(String),
    Confirmed,
}

impl Store {
    /// Stop a running deployment: PENDING rows end CANCELLED now, the rest
    /// when their agents report; the deployment ends CANCELLED.
    pub async fn cancel(&self, id: DeploymentId, reason: String) -> Result<Cancelled, StoreError> {
        self.write(move |tx| {
            let state: Option<i32> = tx
                .sql
                .fetch_opt("SELECT state FROM deployments WHERE id = ?1", &[&id.as_str()], |r| {
                    r.get(0)
                })?;
            let Some(state) = state else {
                return Ok(Cancelled::NotFound);
            };
            let state = DeploymentState::try_from(state).unwrap_or(DeploymentState::Unspecified);
            if state.is_final() {
                return Ok(Cancelled::AlreadyFinished(state));
            }
            tx.sql.exec(
                "UPDATE deployments SET stopped = ?2, halted_reason = ?3 WHERE id = ?1",
                &[&id.as_str(), &Stop::to_sql(Some(Stop::Cancelled)), &reason],
            )?;
            let rows: Vec<(String, String, i32)> = {
                tx.sql.fetch_all(
                    "SELECT machine, closure, state FROM machines WHERE deployment_id = ?1 ORDER BY machine",
                    &[&id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
            };
            let mut in_flight = Vec::new();
            for (machine, closure, state) in rows {
                let machine =
                    MachineName::parse(&machine).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let state = machine_state(state);
                if rollout::is_in_flight(state) {
                    in_flight.push(machine);
                } else if state == MachineState::Pending {
                    set_state(tx, &id, &machine, MachineState::Cancelled)?;
                    tx.sql.exec(
                        "UPDATE machines SET reason = ?3 WHERE deployment_id = ?1 AND machine = ?2",
                        &[&id.as_str(), &machine.as_str(), &reason],
                    )?;
                    let update = MachineUpdate {
                        machine: machine.to_string(),
                        state: MachineState::Cancelled as i32,
                        closure,
                        message: reason.clone(),
                        ..Default::default()
                    };
                    tx.emit(id.as_str(), event::Kind::Machine(update))?;
                }
            }
            let cancelled = procurator_proto::v1::DeploymentCancelled {
                reason: reason.clone(),
                in_flight: in_flight.iter().map(ToString::to_string).collect(),
            };
            tx.emit(id.as_str(), event::Kind::Cancelled(cancelled))?;
            finish_if_done(tx, id.as_str())?;
            Ok(Cancelled::Done { in_flight })
        })
        .await
    }

    /// What `rollback` with `to` would deploy: the target's id, commit and
    /// artifact as submitted.
    pub async fn plan_rollback(
        &self,
        to: Option<DeploymentId>,
    ) -> Result<Result<RollbackTarget, String>, StoreError> {
        self.read(move |conn| {
            Ok(rollback_target(conn, to.as_ref())?.ok_or_else(|| not_found(to.as_ref())))
        })
        .await
    }

    /// Deploy `to`'s artifact again as a new deployment (default: the newest
    /// succeeded deployment before the one in force). Neither deduped nor
    /// checked for staleness: going back is the point. With `intents`, the
    /// new deployment carries those statements instead of the target's.
    pub async fn rollback(
        &self,
        to: Option<DeploymentId>,
        submitted_by: String,
        intents: BTreeMap<String, String>,
    ) -> Result<RolledBack, StoreError> {
        self.write(move |tx| {
            let Some(target) = rollback_target(&*tx.sql, to.as_ref())? else {
                return Ok(RolledBack::NotFound(not_found(to.as_ref())));
            };
            let stored =
                DeploymentArtifact::from_json(target.artifact_json.as_bytes()).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "the stored artifact of {} is invalid: {e}",
                        target.id
                    ))
                })?;
            let (artifact, json) = if intents.is_empty() {
                (stored, target.artifact_json.clone())
            } else {
                match resigned(stored, intents) {
                    Ok(resigned) => resigned,
                    Err(why) => return Ok(RolledBack::Invalid(why)),
                }
            };
            // A rollback to a subset deployment deploys that subset again.
            let on: String = tx.sql.fetch_one(
                "SELECT selectors FROM deployments WHERE id = ?1",
                &[&target.id.as_str()],
                |r| r.get(0),
            )?;
            let on = super::deployments::parse_selectors(&on)?;
            let new = NewDeployment {
                artifact: &artifact,
                artifact_json: &json,
                submitted_by: &submitted_by,
                forced_by: "",
                rollback_of: target.id.as_str(),
                on: &on,
            };
            Ok(RolledBack::Done(insert(tx, &new)?))
        })
        .await
    }

    /// An agent, over a new connection, asks whether it may commit `closure`
    /// of `id`. Records the confirmation when it may.
    pub async fn confirm(
        &self,
        machine: MachineName,
        id: DeploymentId,
        closure: String,
    ) -> Result<Confirmation, StoreError> {
        self.write(move |tx| {
            // The row and its deployment in one read: a confirmation per
            // machine, 10,000 in a rollout.
            let found: Option<(String, i32, i64, String)> = tx.sql.fetch_opt(
                "SELECT m.closure, m.state, d.stopped, d.halted_reason
                     FROM machines m JOIN deployments d ON d.id = m.deployment_id
                     WHERE m.deployment_id = ?1 AND m.machine = ?2",
                &[&id.as_str(), &machine.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            let Some((stored, state, stopped, reason)) = found else {
                return Ok(Confirmation::NotFound);
            };
            let state = machine_state(state);
            if stored != closure {
                return Ok(Confirmation::NotFound);
            }
            if Stop::from_sql(stopped) == Some(Stop::Cancelled) {
                return Ok(Confirmation::Refused(format!(
                    "deployment {id} was cancelled: {reason}"
                )));
            }
            if state == MachineState::Superseded {
                return Ok(Confirmation::Refused(format!(
                    "deployment {id} was superseded on this machine by a newer one"
                )));
            }
            if state.is_final() {
                return Ok(Confirmation::Refused(format!(
                    "this machine's part of deployment {id} already ended {state}"
                )));
            }
            // Only what was sent can be confirmed: a row still waiting for
            // its wave must not jump ahead of it.
            if !rollout::is_confirmable(state) {
                return Ok(Confirmation::NotSent(state));
            }
            set_state(tx, &id, &machine, MachineState::Confirming)?;
            let update = MachineUpdate {
                machine: machine.to_string(),
                state: MachineState::Confirming as i32,
                closure: stored,
                message: "confirmed over a new connection".to_owned(),
                ..Default::default()
            };
            tx.emit(id.as_str(), event::Kind::Machine(update))?;
            Ok(Confirmation::Confirmed)
        })
        .await
    }
}
