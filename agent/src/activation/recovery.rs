//! After a restart in the middle of a deployment: end in exactly one of
//! "new closure committed" or "old closure restored" (docs/rollouts.md,
//! "Crash safety").

use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use procurator_core::{DeploymentId, StorePath};
use procurator_proto::v1::MachineState;

use super::{Activator, Deployment, ProgressSink, Stop};
use crate::desired::Desired;
use crate::journal::{Entry, Phase};
use crate::outcome::{Failure, Outcome};
use crate::system::Profile;

impl Activator {
    /// Finishes or undoes the deployment the journal says was in progress.
    /// `None` when there was none. A step that fails after the restart rolls
    /// back whatever `auto_rollback` said: a closure whose checks never
    /// finished must not stay active.
    pub async fn recover(&self, sink: &ProgressSink) -> Option<Outcome> {
        let mut entry = match self.journal.read() {
            Ok(Some(entry)) if entry.phase != Phase::Done => entry,
            Ok(_) => return None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal; not recovering");
                return None;
            }
        };
        let Some(desired) = desired_of(&entry) else {
            tracing::error!(closure = %entry.closure, "the journal names no deployment or closure; not recovering");
            return None;
        };
        let previous = entry
            .previous
            .as_deref()
            .and_then(|p| StorePath::parse(p).ok());
        let phase = entry.phase;
        tracing::warn!(
            deployment = %entry.deployment_id,
            phase = ?phase,
            "the agent stopped in the middle of a deployment; finishing it"
        );
        // An activation the last run started ends first: two
        // `switch-to-configuration` at once would fight over the system.
        let recorded = entry.activation.take();
        let ended = match &recorded {
            Some(launched) => {
                tracing::info!(command = %launched.command, status_file = %launched.status_file.display(), "waiting for the activation the last run started");
                Some(self.await_launched(launched, |_| {}).await)
            }
            None => None,
        };
        let mut deployment = Deployment {
            activator: self,
            sink,
            closure: desired.closure.clone(),
            previous,
            entry,
            launches: AtomicU32::new(recorded.as_ref().map_or(0, |l| l.n)),
            gc_root: None,
            log: Mutex::new(self.logbook().open(&desired.deployment_id.to_string())),
        };
        deployment.log(
            &format!(
                "the agent restarted during {}; finishing the deployment",
                phase.machine_state().label()
            ),
            "",
        );
        let stopped = |phase: Phase| {
            Failure::new(
                phase.machine_state(),
                format!("the agent stopped during {}", phase.machine_state().label()),
                "",
            )
        };
        let changed = |failure| Stop {
            failure,
            changed: true,
        };
        let result = match phase {
            Phase::Done => return None,
            // Nothing changed yet: copy again.
            Phase::Copying => deployment.forward(&desired, Phase::Copying).await,
            Phase::Activating => {
                // The recorded `test` activation's result is this phase's.
                let activated = match (ended, &recorded) {
                    (Some(ended), Some(launched)) => {
                        deployment.judge(ended, &launched.command, MachineState::Activating)
                    }
                    _ => Err(stopped(phase)),
                };
                match activated.and_then(|()| {
                    deployment.expect_running(&deployment.closure, MachineState::Activating)
                }) {
                    Ok(()) => deployment.forward(&desired, Phase::Checking).await,
                    Err(failure) => Err(changed(failure)),
                }
            }
            Phase::Checking | Phase::Confirming => {
                // Only if the new closure still runs (not after a reboot into the old one).
                match deployment.expect_running(&deployment.closure, phase.machine_state()) {
                    Ok(()) => deployment.forward(&desired, Phase::Checking).await,
                    Err(_) => Err(changed(stopped(phase))),
                }
            }
            Phase::Committing => {
                // Confirmed: commit again if the closure still runs.
                let runs = deployment.current_system() == deployment.closure.as_str();
                match Profile::new(deployment.closure.clone()) {
                    Ok(profile) if runs => deployment.commit(&profile).await.map_err(changed),
                    _ => Err(changed(stopped(phase))),
                }
            }
            Phase::RollingBack => {
                let failure = deployment
                    .entry
                    .failure
                    .clone()
                    .unwrap_or_else(|| stopped(phase));
                return Some(deployment.roll_back(failure).await);
            }
        };
        Some(deployment.finish(result, true).await)
    }
}

/// The desired state a journal entry was written for.
fn desired_of(entry: &Entry) -> Option<Desired> {
    Some(Desired {
        deployment_id: DeploymentId::parse(&entry.deployment_id).ok()?,
        closure: StorePath::parse(&entry.closure).ok()?,
        health_checks: entry.plan.health_checks.clone(),
        auto_rollback: entry.auto_rollback,
        confirm_timeout: Duration::from_secs(entry.plan.confirm_timeout_secs),
        allow_reboot: entry.plan.allow_reboot,
    })
}
