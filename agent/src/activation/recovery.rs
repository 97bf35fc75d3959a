//! After a restart in the middle of a deployment: end in exactly one of
//! "new closure committed" or "old closure restored".

use procurator_core::StorePath;
use procurator_proto::v1::MachineState;

use super::{Activator, Deployment, ProgressSink};
use crate::journal::Phase;
use crate::outcome::{Failure, Outcome};
use crate::system::Profile;

impl Activator {
    /// Finishes or undoes the deployment the journal says was in progress.
    /// `None` when there was none. Rolls back whatever `auto_rollback` said:
    /// a closure whose checks never finished must not stay active.
    pub async fn recover(&self, sink: &ProgressSink) -> Option<Outcome> {
        let entry = match self.journal.read() {
            Ok(Some(entry)) if entry.phase != Phase::Done => entry,
            Ok(_) => return None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal; not recovering");
                return None;
            }
        };
        let closure = match StorePath::parse(&entry.closure) {
            Ok(closure) => closure,
            Err(e) => {
                tracing::error!(error = %e, "the journal names no closure; not recovering");
                return None;
            }
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
        let mut deployment = Deployment {
            activator: self,
            sink,
            closure,
            previous,
            entry,
        };
        let stopped = |phase: Phase| {
            Failure::new(
                phase.machine_state(),
                format!("the agent stopped during {}", phase.machine_state().label()),
                "",
            )
        };
        let outcome = match phase {
            Phase::Done => return None,
            Phase::Copying => deployment.fail(
                MachineState::Failed,
                Failure::new(
                    MachineState::Copying,
                    "the agent stopped while copying; nothing was changed",
                    "",
                ),
            ),
            Phase::Activating | Phase::Checking | Phase::Confirming => {
                deployment.roll_back(stopped(phase)).await
            }
            Phase::Committing => {
                // Health checks passed: commit again if the closure still runs.
                let runs = deployment.current_system() == deployment.closure.as_str();
                match Profile::new(deployment.closure.clone()) {
                    Ok(profile) if runs => match deployment.commit(&profile).await {
                        Ok(()) => deployment.succeed(),
                        Err(failure) => deployment.roll_back(failure).await,
                    },
                    _ => deployment.roll_back(stopped(phase)).await,
                }
            }
            Phase::RollingBack => {
                let failure = deployment
                    .entry
                    .failure
                    .clone()
                    .unwrap_or_else(|| stopped(phase));
                deployment.roll_back(failure).await
            }
        };
        Some(outcome)
    }
}
