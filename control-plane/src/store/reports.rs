//! What agents report about a deployment on their machine: progress and
//! the final result.

use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{
    ActivationResult, DeploymentState, MachineState, MachineUpdate, Progress, event,
};

use super::deployments::finish_if_done;
use super::engine::{SqlExt as _, ToParam};
use super::rows::{FINAL_STATES, to_sql};
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

/// A progress report's row update (see [`Store::record_progress`]): copy
/// counts only when the report has them (`?5`‥`?8` NULL otherwise), never
/// on a final row.
static PROGRESS_UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE machines SET state = ?3, updated_ms = ?4,
             started_ms = CASE WHEN started_ms = 0 THEN ?4 ELSE started_ms END,
             bytes_done = COALESCE(?5, bytes_done), bytes_expected = COALESCE(?6, bytes_expected),
             paths_done = COALESCE(?7, paths_done), paths_expected = COALESCE(?8, paths_expected)
         WHERE deployment_id = ?1 AND machine = ?2 AND state NOT IN ({})
         RETURNING closure",
        *FINAL_STATES
    )
});

/// A result's row update (see [`Store::record_result`]), never on a final
/// row: one statement that also says the row's closure for the event.
static RESULT_UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE machines SET state = ?3, failed_phase = ?4, reason = ?5, output_tail = ?6,
             updated_ms = ?7, reboot_required = ?8,
             started_ms = CASE WHEN started_ms = 0 THEN ?7 ELSE started_ms END
         WHERE deployment_id = ?1 AND machine = ?2 AND state NOT IN ({})
         RETURNING closure",
        *FINAL_STATES
    )
});

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
            let copy = progress.copy;
            let counts = |f: fn(&procurator_proto::v1::CopyProgress) -> u64| {
                copy.as_ref().map(|c| to_sql(f(c)))
            };
            // One statement: the row moves unless it is final already, and
            // says its closure for the event.
            let state_code = state as i32;
            let closure: Option<String> = tx.sql.fetch_opt(
                &PROGRESS_UPDATE,
                &[
                    &deployment_id.as_str() as &dyn ToParam,
                    &machine.as_str(),
                    &state_code,
                    &tx.now,
                    &counts(|c| c.bytes_done),
                    &counts(|c| c.bytes_expected),
                    &counts(|c| c.paths_done),
                    &counts(|c| c.paths_expected),
                ],
                |r| r.get(0),
            )?;
            let Some(closure) = closure else {
                return Ok(false);
            };
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
            // Kept even when the row is final already: a superseded
            // deployment still ran on the machine, and its output says how.
            if !result.output.is_empty() {
                tx.sql.exec(
                    "INSERT INTO machine_logs (deployment_id, machine, output)
                         SELECT ?1, ?2, ?3 WHERE EXISTS
                             (SELECT 1 FROM machines WHERE deployment_id = ?1 AND machine = ?2)
                     ON CONFLICT (deployment_id, machine) DO UPDATE SET output = excluded.output",
                    &[&id as &dyn ToParam, &machine.as_str(), &result.output],
                )?;
            }
            let failed_phase =
                MachineState::try_from(result.failed_phase).unwrap_or(MachineState::Unspecified);
            let closure: Option<String> = tx.sql.fetch_opt(
                &RESULT_UPDATE,
                &[
                    &id as &dyn ToParam,
                    &machine.as_str(),
                    &(state as i32),
                    &(failed_phase as i32),
                    &result.reason,
                    &result.output_tail,
                    &tx.now,
                    &result.reboot_required,
                ],
                |r| r.get(0),
            )?;
            // No such row, or final already (superseded, say).
            let Some(closure) = closure else {
                return Ok(ResultOutcome::Stale);
            };
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
