//! What operators and agents ask of a deployment beyond submitting it:
//! cancel it, roll back to an earlier one, confirm it over a new connection.

use procurator_core::{DeploymentArtifact, DeploymentId, MachineName};
use procurator_proto::v1::{DeploymentState, MachineState, MachineUpdate, event};
use rusqlite::{OptionalExtension as _, params};

use super::deployments::{Submitted, finish_if_done, insert, machine_state, row, set_state};
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
    Done(Submitted),
}

/// The answer to an agent's confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// This machine has no row with that closure in that deployment.
    NotFound,
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
                .query_row("SELECT state FROM deployments WHERE id = ?1", [id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(state) = state else {
                return Ok(Cancelled::NotFound);
            };
            let state = DeploymentState::try_from(state).unwrap_or(DeploymentState::Unspecified);
            if state.is_final() {
                return Ok(Cancelled::AlreadyFinished(state));
            }
            tx.sql.prepare_cached("UPDATE deployments SET stopped = ?2, halted_reason = ?3 WHERE id = ?1")?.execute(
                params![id.as_str(), Stop::to_sql(Some(Stop::Cancelled)), reason],
            )?;
            let rows: Vec<(String, String, i32)> = {
                let mut stmt = tx.sql.prepare_cached(
                    "SELECT machine, closure, state FROM machines WHERE deployment_id = ?1 ORDER BY machine",
                )?;
                stmt.query_map([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?
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
                    tx.sql.prepare_cached("UPDATE machines SET reason = ?3 WHERE deployment_id = ?1 AND machine = ?2")?.execute(
                        params![id.as_str(), machine.as_str(), reason],
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
            finish_if_done(tx, id.as_str())?;
            Ok(Cancelled::Done { in_flight })
        })
        .await
    }

    /// Deploy `to`'s artifact again as a new deployment (default: the newest
    /// succeeded deployment before the one in force). Neither deduped nor
    /// checked for staleness: going back is the point.
    pub async fn rollback(
        &self,
        to: Option<DeploymentId>,
        submitted_by: String,
    ) -> Result<RolledBack, StoreError> {
        self.write(move |tx| {
            let target: Option<(String, String)> = match &to {
                Some(id) => tx
                    .sql
                    .query_row(
                        "SELECT id, artifact FROM deployments WHERE id = ?1",
                        [id.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?,
                None => tx
                    .sql
                    .query_row(
                        "SELECT id, artifact FROM deployments
                         WHERE state = ?1 AND seq < (
                             SELECT seq FROM deployments WHERE state != ?2 AND stopped != ?3
                             ORDER BY seq DESC LIMIT 1)
                         ORDER BY seq DESC LIMIT 1",
                        params![
                            DeploymentState::Succeeded as i32,
                            DeploymentState::Cancelled as i32,
                            Stop::to_sql(Some(Stop::Cancelled))
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?,
            };
            let Some((target, json)) = target else {
                return Ok(RolledBack::NotFound(match to {
                    Some(id) => format!(
                        "there is no deployment {id}; list them with `procurator-ctl deployments`"
                    ),
                    None => {
                        "there is no succeeded deployment before the one in force to roll back to; \
                             name one with --to"
                            .to_owned()
                    }
                }));
            };
            let artifact = DeploymentArtifact::from_json(json.as_bytes()).map_err(|e| {
                StoreError::Corrupt(format!("the stored artifact of {target} is invalid: {e}"))
            })?;
            let submitted = insert(tx, &artifact, &json, &submitted_by, &target)?;
            Ok(RolledBack::Done(submitted))
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
            let Some((stored, state)) = row(tx, &id, &machine)? else {
                return Ok(Confirmation::NotFound);
            };
            if stored != closure {
                return Ok(Confirmation::NotFound);
            }
            let (stopped, reason): (i64, String) = tx
                .sql
                .prepare_cached("SELECT stopped, halted_reason FROM deployments WHERE id = ?1")?
                .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
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
