//! What agents report about a deployment on their machine: progress and
//! the final result.

use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{
    ActivationResult, DeploymentState, MachineState, MachineUpdate, Progress, event,
};

use super::deployments::finish_if_done;
use super::rows::{row, set_state, to_sql};
use super::{Store, StoreError, agents};

/// What became of an `ActivationResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultOutcome {
    /// The machine's row took the result; `finished` when that ended the deployment.
    Recorded { finished: Option<DeploymentState> },
    /// No such row, or it was already final (e.g. superseded): only the
    /// agent's own record changed.
    Stale,
}

impl Store {
    /// Apply a progress report. False (nothing changed) when the row does not
    /// exist or is already final.
    pub async fn record_progress(
        &self,
        machine: MachineName,
        deployment_id: DeploymentId,
        state: MachineState,
        progress: Progress,
    ) -> Result<bool, StoreError> {
        self.write(move |tx| {
            let Some((closure, current)) = row(tx, &deployment_id, &machine)? else {
                return Ok(false);
            };
            if current.is_final() {
                return Ok(false);
            }
            let copy = progress.copy;
            if let Some(c) = copy {
                tx.sql.exec(
                    "UPDATE machines SET bytes_done = ?3, bytes_expected = ?4, paths_done = ?5,
                         paths_expected = ?6 WHERE deployment_id = ?1 AND machine = ?2",
                    &[
                        &deployment_id.as_str(),
                        &machine.as_str(),
                        &to_sql(c.bytes_done),
                        &to_sql(c.bytes_expected),
                        &to_sql(c.paths_done),
                        &to_sql(c.paths_expected),
                    ],
                )?;
            }
            set_state(tx, &deployment_id, &machine, state)?;
            let update = MachineUpdate {
                machine: machine.to_string(),
                state: state as i32,
                closure,
                message: progress.message,
                copy,
                ..Default::default()
            };
            tx.emit(deployment_id.as_str(), event::Kind::Machine(update))?;
            Ok(true)
        })
        .await
    }

    /// Apply how a deployment ended on `machine` (`state` is a result state),
    /// and finish the deployment when it was its last unfinished machine.
    pub async fn record_result(
        &self,
        machine: MachineName,
        deployment_id: DeploymentId,
        state: MachineState,
        result: ActivationResult,
    ) -> Result<ResultOutcome, StoreError> {
        self.write(move |tx| {
            let id = deployment_id.as_str();
            agents::record_last_result(
                tx,
                &machine,
                id,
                state,
                &result.reason,
                &result.current_system,
            )?;
            let Some((closure, current)) = row(tx, &deployment_id, &machine)? else {
                return Ok(ResultOutcome::Stale);
            };
            if current.is_final() {
                return Ok(ResultOutcome::Stale);
            }
            let failed_phase =
                MachineState::try_from(result.failed_phase).unwrap_or(MachineState::Unspecified);
            tx.sql.exec(
                "UPDATE machines SET state = ?3, failed_phase = ?4, reason = ?5, output_tail = ?6,
                     updated_ms = ?7, reboot_required = ?8
                 WHERE deployment_id = ?1 AND machine = ?2",
                &[
                    &id,
                    &machine.as_str(),
                    &(state as i32),
                    &(failed_phase as i32),
                    &result.reason,
                    &result.output_tail,
                    &tx.now,
                    &result.reboot_required,
                ],
            )?;
            let message = match (result.reboot_required, result.reason.is_empty()) {
                (true, true) => format!("reboot required: {}", result.reboot_reason),
                (true, false) => format!(
                    "{} (reboot required: {})",
                    result.reason, result.reboot_reason
                ),
                (false, _) => result.reason,
            };
            let update = MachineUpdate {
                machine: machine.to_string(),
                state: state as i32,
                failed_phase: failed_phase as i32,
                closure,
                message,
                output_tail: result.output_tail,
                copy: None,
                reboot_required: result.reboot_required,
                in_place: false,
            };
            tx.emit(id, event::Kind::Machine(update))?;
            let finished = finish_if_done(tx, id)?;
            Ok(ResultOutcome::Recorded { finished })
        })
        .await
    }
}
