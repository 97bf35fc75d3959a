//! The activation state machine, independent of gRPC: given what the machine
//! should run, copy it, activate it with `test`, health-check it, confirm the
//! control plane is still reachable, then move the profile and boot entry —
//! or re-activate the exact closure that ran before.

mod launch;
mod recovery;
mod steps;

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use procurator_core::StorePath;
use procurator_core::nix::{CopyProgress, Nix};
use procurator_proto::v1::{self as pb, MachineState, Progress};

pub use self::launch::{Detached, Launcher};
pub use crate::confirm::Verdict;
use crate::desired::Desired;
use crate::journal::{Entry, Journal, Phase, Plan};
use crate::logbook::{ActivationLog, Logbook};
use crate::outcome::{Failure, Outcome};
use crate::reboot::reboot_reason;
use crate::system::{Goal, Profile, SystemPaths};

/// Where progress goes (the outbox in production, a vector in tests).
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// Proves the control plane is reachable over a new connection after
/// activation (the CONFIRMING phase).
pub trait Confirm: Send + Sync {
    /// Asks the control plane to confirm (deployment, closure), retrying
    /// until `timeout`.
    fn confirm<'a>(
        &'a self,
        deployment_id: &'a str,
        closure: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Verdict>;
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one `switch-to-configuration` may run.
    pub switch_timeout: Duration,
    /// Output lines kept for results.
    pub tail_lines: usize,
    /// Copy progress is sent at most this often (plus a final one).
    pub progress_interval: Duration,
    /// A running switch's last line of output is sent at most this often
    /// (detached launches only).
    pub output_interval: Duration,
    /// How `switch-to-configuration` is started.
    pub launcher: Launcher,
    /// `systemctl reboot` works here (systemd is PID 1).
    pub can_reboot: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            switch_timeout: Duration::from_secs(15 * 60),
            tail_lines: procurator_core::nix::TAIL_LINES,
            progress_interval: Duration::from_millis(250),
            // A few events per machine and activation, even on a large fleet.
            output_interval: Duration::from_secs(5),
            launcher: Launcher::Child,
            can_reboot: false,
        }
    }
}

/// Everything an activation needs from the agent's configuration.
pub struct Activator {
    pub nix: Nix,
    pub paths: SystemPaths,
    /// The agent's own substituters, tried first.
    pub substituters: Vec<String>,
    /// The only keys copied closures may be signed with.
    pub trusted_keys: Vec<String>,
    pub journal: Journal,
    pub settings: Settings,
    pub confirmer: Option<Arc<dyn Confirm>>,
}

/// Why a run stopped before succeeding, and whether anything had changed.
struct Stop {
    failure: Failure,
    changed: bool,
}

impl Activator {
    /// The output of recent deployments, beside the journal.
    pub fn logbook(&self) -> Logbook {
        Logbook::new(self.journal.state_dir())
    }

    /// Runs one deployment to its end and says how it ended.
    pub async fn run(&self, desired: &Desired, sink: &ProgressSink) -> Outcome {
        let id = desired.deployment_id.as_str();
        let closure = desired.closure.as_str();
        let current = self.paths.current_system();
        if current.as_deref() == Some(closure) {
            tracing::info!(closure, "already running the desired closure");
            return Outcome::succeeded(
                id,
                closure,
                MachineState::Skipped,
                current.unwrap_or_default(),
            );
        }
        // Only a store path can be re-activated.
        let previous = current.as_deref().and_then(|c| StorePath::parse(c).ok());
        let entry = Entry {
            deployment_id: id.to_owned(),
            closure: closure.to_owned(),
            previous: previous.as_ref().map(ToString::to_string),
            previous_profile: self.paths.profile_target(),
            phase: Phase::Copying,
            auto_rollback: desired.auto_rollback,
            failure: None,
            plan: Plan {
                health_checks: desired.health_checks.clone(),
                confirm_timeout_secs: desired.confirm_timeout.as_secs(),
                allow_reboot: desired.allow_reboot,
                ..Plan::default()
            },
            activation: None,
        };
        let mut deployment = Deployment {
            activator: self,
            sink,
            closure: desired.closure.clone(),
            previous,
            entry,
            launches: AtomicU32::new(0),
            gc_root: None,
            log: Mutex::new(self.logbook().open(id)),
        };
        let result = deployment.forward(desired, Phase::Copying).await;
        deployment.finish(result, desired.auto_rollback).await
    }
}

/// One deployment in progress: its journal entry and where it reports.
struct Deployment<'a> {
    activator: &'a Activator,
    sink: &'a ProgressSink,
    entry: Entry,
    closure: StorePath,
    /// The closure to re-activate on failure.
    previous: Option<StorePath>,
    /// `run-detached` launches so far (names their files).
    launches: AtomicU32,
    /// Registering the closure as a GC root (`nix-store --add-root`, a
    /// process of its own) runs beside the activation; `finish` waits for it
    /// before anything removes the root.
    gc_root: Option<tokio::task::JoinHandle<()>>,
    /// Every command's output, for `procurator-ctl logs`.
    log: Mutex<ActivationLog>,
}

impl Deployment<'_> {
    /// Runs the steps from `from` on (a restart resumes in the middle).
    async fn forward(&mut self, desired: &Desired, from: Phase) -> Result<(), Stop> {
        let unchanged = |failure| Stop {
            failure,
            changed: false,
        };
        let changed = |failure| Stop {
            failure,
            changed: true,
        };

        if from <= Phase::Copying {
            self.enter(Phase::Copying).map_err(unchanged)?;
            self.copy().await.map_err(unchanged)?;
            self.gc_root = Some(self.spawn_gc_root());
        }
        let profile = Profile::new(self.closure.clone())
            .map_err(|e| unchanged(Failure::new(MachineState::Activating, e.to_string(), "")))?;

        if from <= Phase::Activating {
            self.enter(Phase::Activating).map_err(unchanged)?;
            self.report(
                MachineState::Activating,
                format!("{} test", switch_name(&self.closure)),
            );
            self.switch(&profile, Goal::Test, MachineState::Activating)
                .await
                .map_err(changed)?;
            self.expect_running(&self.closure, MachineState::Activating)
                .map_err(changed)?;
        }

        if from <= Phase::Checking && !desired.health_checks.is_empty() {
            self.enter(Phase::Checking).map_err(changed)?;
            self.check(&desired.health_checks).await.map_err(changed)?;
        }

        if from <= Phase::Confirming && !desired.confirm_timeout.is_zero() {
            self.enter(Phase::Confirming).map_err(changed)?;
            self.confirm(desired.confirm_timeout)
                .await
                .map_err(changed)?;
        }

        self.enter(Phase::Committing).map_err(changed)?;
        self.report(
            MachineState::Committing,
            "moving the system profile and the boot entry".into(),
        );
        self.commit(&profile).await.map_err(changed)
    }

    /// How the forward steps' result ends the deployment.
    async fn finish(&mut self, result: Result<(), Stop>, auto_rollback: bool) -> Outcome {
        if let Some(registering) = self.gc_root.take() {
            let _ = registering.await;
        }
        match result {
            Ok(()) => self.succeed(),
            Err(Stop {
                failure,
                changed: false,
            }) => self.fail(MachineState::Failed, failure),
            // A confirmation that failed always rolls back: that is its point.
            Err(Stop {
                failure,
                changed: true,
            }) if auto_rollback || failure.phase == MachineState::Confirming => {
                self.roll_back(failure).await
            }
            Err(Stop {
                failure,
                changed: true,
            }) => self.fail(MachineState::Failed, failure),
        }
    }

    /// Re-activates the exact closure that ran before.
    async fn roll_back(&mut self, failure: Failure) -> Outcome {
        let Some(previous) = self.previous.clone() else {
            let reason = format!(
                "{}; no rollback: what ran before is unknown (/run/current-system did not point into the store)",
                failure.reason
            );
            return self.fail(MachineState::Failed, Failure { reason, ..failure });
        };
        self.entry.failure = Some(failure.clone());
        self.log(
            &format!(
                "rolling back to {previous}: {} failed",
                failure.phase.label()
            ),
            "",
        );
        if let Err(e) = self.enter(Phase::RollingBack) {
            tracing::error!(error = %e.reason, "rolling back without a journal entry");
        }
        self.report(
            MachineState::RollingBack,
            format!("{} failed; re-activating {previous}", failure.phase.label()),
        );
        match self.restore(&previous).await {
            Ok(()) => self.fail(MachineState::RolledBack, failure),
            Err(rollback) => {
                let reason = format!(
                    "{}; rolling back to {previous} failed too: {}",
                    failure.reason, rollback.reason
                );
                let tail = [
                    failure.tail.as_str(),
                    "--- rollback ---",
                    rollback.tail.as_str(),
                ]
                .join("\n");
                self.fail(
                    MachineState::RollbackFailed,
                    Failure::new(failure.phase, reason, tail),
                )
            }
        }
    }

    async fn restore(&self, previous: &StorePath) -> Result<(), Failure> {
        let profile = Profile::new(previous.clone())
            .map_err(|e| Failure::new(MachineState::RollingBack, e.to_string(), ""))?;
        self.switch(&profile, Goal::Test, MachineState::RollingBack)
            .await?;
        self.expect_running(previous, MachineState::RollingBack)?;
        if self.profile_moved() {
            self.set_profile(previous, MachineState::RollingBack)
                .await?;
            self.switch(&profile, Goal::Boot, MachineState::RollingBack)
                .await?;
        }
        Ok(())
    }

    /// Whether this deployment moved the system profile to its closure.
    fn profile_moved(&self) -> bool {
        let closure = Some(self.closure.as_str());
        self.activator.paths.profile_target().as_deref() == closure
            && self.entry.previous_profile.as_deref() != closure
    }

    async fn commit(&self, profile: &Profile) -> Result<(), Failure> {
        self.set_profile(profile.closure(), MachineState::Committing)
            .await?;
        self.switch(profile, Goal::Boot, MachineState::Committing)
            .await
    }

    fn succeed(&mut self) -> Outcome {
        self.log(&format!("succeeded: {} runs", self.closure), "");
        self.done();
        let mut outcome = Outcome::succeeded(
            &self.entry.deployment_id,
            &self.entry.closure,
            MachineState::Succeeded,
            self.current_system(),
        );
        let closure = std::path::Path::new(self.closure.as_str());
        if let Some(reason) = reboot_reason(closure, &self.activator.paths.booted_system) {
            outcome.reboot_required = true;
            outcome.reboot_reason = reason;
        }
        outcome
    }

    fn fail(&mut self, state: MachineState, failure: Failure) -> Outcome {
        tracing::warn!(state = %state, phase = %failure.phase, reason = %failure.reason, "deployment failed");
        self.log(
            &format!("{}: {} failed", state.label(), failure.phase.label()),
            &failure.reason,
        );
        self.done();
        Outcome::failed(
            &self.entry.deployment_id,
            &self.entry.closure,
            state,
            failure,
            self.current_system(),
        )
    }

    fn done(&mut self) {
        if let Err(e) = self.enter(Phase::Done) {
            tracing::error!(error = %e.reason, "cannot close the journal entry");
        }
        self.remove_gc_root();
        self.remove_launch_files();
    }

    fn current_system(&self) -> String {
        self.activator.paths.current_system().unwrap_or_default()
    }

    /// Writes the journal before entering `phase`.
    fn enter(&mut self, phase: Phase) -> Result<(), Failure> {
        self.entry.phase = phase;
        self.activator.journal.write(&self.entry).map_err(|e| {
            let state = match phase.machine_state() {
                MachineState::Unspecified => MachineState::Committing,
                state => state,
            };
            Failure::new(state, format!("cannot write the journal: {e}"), "")
        })
    }

    /// Adds a section to the deployment's log.
    fn log(&self, title: &str, output: &str) {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .section(title, output);
    }

    fn report(&self, state: MachineState, message: String) {
        self.report_copy(state, message, None);
    }

    fn report_copy(&self, state: MachineState, message: String, copy: Option<CopyProgress>) {
        (self.sink)(Progress {
            deployment_id: self.entry.deployment_id.clone(),
            state: state.into(),
            copy: copy.map(|c| pb::CopyProgress {
                bytes_done: c.bytes_done,
                bytes_expected: c.bytes_expected,
                paths_done: c.paths_done,
                paths_expected: c.paths_expected,
            }),
            message,
        });
    }
}

fn switch_name(closure: &StorePath) -> String {
    format!("{closure}/bin/switch-to-configuration")
}

#[cfg(test)]
mod confirm_tests;
#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod tests;
