//! Turns desired states from the control plane into activations, one at a
//! time: repeats are answered rather than re-run, and of the desired states
//! that arrive during an activation only the newest runs after it.

use std::sync::{Arc, Mutex};

use futures::future::OptionFuture;
use procurator_core::MachineName;
use procurator_proto::v1::{Cancel, DesiredState, MachineState};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::activation::{Activator, ProgressSink};
use crate::desired::{Desired, Inbound, clip};
use crate::intent::IntentPolicy;
use crate::outbox::Outbox;
use crate::outcome::{Failure, Outcome};
use crate::reboot::reboot_after_report;

/// What the agent is working on, for `Hello` and for logs.
#[derive(Debug, Default)]
pub struct Activity {
    active: Mutex<Option<String>>,
    queued: Mutex<Option<String>>,
}

impl Activity {
    /// The deployment being activated now, if any.
    pub fn active_deployment(&self) -> Option<String> {
        read(&self.active)
    }

    /// The deployment that runs once the active one is over, if any.
    #[cfg(test)]
    pub fn queued_deployment(&self) -> Option<String> {
        read(&self.queued)
    }
}

fn read(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write(slot: &Mutex<Option<String>>, value: Option<String>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

type Key = (String, String);

fn key_of(desired: &Desired) -> Key {
    (
        desired.deployment_id.to_string(),
        desired.closure.to_string(),
    )
}

struct Running {
    key: Key,
    /// Reboot after committing if the new closure needs it.
    allow_reboot: bool,
    task: JoinHandle<Outcome>,
}

pub struct Deployer {
    pub activator: Arc<Activator>,
    pub outbox: Arc<Outbox>,
    pub activity: Arc<Activity>,
    /// Which statements this agent acts on.
    pub intents: Arc<IntentPolicy>,
    /// This machine, as its certificate names it: the name a statement must be for.
    pub machine: MachineName,
}

impl Deployer {
    /// Serves `inbox` until it closes or `cancel` fires; a running activation
    /// is always awaited (its journal would make a restart finish it anyway,
    /// but finishing is quicker than undoing).
    pub async fn run(self, mut inbox: mpsc::Receiver<Inbound>, cancel: CancellationToken) {
        let mut running: Option<Running> = None;
        let mut pending: Option<Desired> = None;
        let mut open = true;
        loop {
            let stopping = cancel.is_cancelled() || !open;
            if stopping && running.is_none() {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled(), if !stopping => {}
                message = inbox.recv(), if !stopping => match message {
                    Some(Inbound::Desired(state)) => self.accept(state, &mut running, &mut pending),
                    Some(Inbound::Cancel(cancelled)) => self.cancel(&cancelled, running.as_ref(), &mut pending),
                    None => open = false,
                },
                Some(joined) = OptionFuture::from(running.as_mut().map(|r| &mut r.task)) => {
                    let Some(done) = running.take() else { continue };
                    let outcome = joined.unwrap_or_else(|e| {
                        let (deployment_id, closure) = done.key.clone();
                        Outcome::failed(
                            &deployment_id,
                            &closure,
                            MachineState::Failed,
                            Failure::new(MachineState::Unspecified, format!("the activation task failed: {e}"), ""),
                            String::new(),
                        )
                    });
                    let reboot = outcome.state == MachineState::Succeeded
                        && outcome.reboot_required
                        && done.allow_reboot;
                    if reboot && self.activator.settings.can_reboot {
                        tokio::spawn(reboot_after_report(self.outbox.clone(), outcome.clone()));
                    } else if reboot {
                        tracing::warn!("the new closure needs a reboot, but systemd is not PID 1 here; not rebooting");
                    }
                    self.outbox.record(outcome);
                    write(&self.activity.active, None);
                    write(&self.activity.queued, None);
                    if let Some(next) = pending.take().filter(|_| !cancel.is_cancelled()) {
                        running = Some(self.start(next));
                    }
                }
            }
        }
    }

    fn accept(
        &self,
        state: DesiredState,
        running: &mut Option<Running>,
        pending: &mut Option<Desired>,
    ) {
        // Before anything else: nothing is copied for a statement refused.
        let intent = match self
            .intents
            .admit(&self.machine, &state.closure, &state.intent)
        {
            Ok(intent) => intent,
            Err(reason) => return self.refuse(&state, reason),
        };
        let desired = match Desired::from_proto(&state, intent.as_ref()) {
            Ok(desired) => desired,
            Err(e) => return self.refuse(&state, format!("refused the desired state: {e}")),
        };
        let key = key_of(&desired);
        if running.as_ref().is_some_and(|r| r.key == key)
            || pending.as_ref().is_some_and(|p| key_of(p) == key)
        {
            tracing::debug!(deployment = %key.0, "already on it; ignoring the repeat");
            return;
        }
        if self.outbox.resend(&key.0, &key.1) {
            tracing::info!(deployment = %key.0, "already done; sending the result again");
            return;
        }
        if running.is_some() {
            write(&self.activity.queued, Some(key.0));
            if let Some(dropped) = pending.replace(desired) {
                tracing::info!(deployment = %dropped.deployment_id, "superseded before it started");
            }
            return;
        }
        *running = Some(self.start(desired));
    }

    /// Reports `state` as refused, with `reason`; nothing ran.
    fn refuse(&self, state: &DesiredState, reason: String) {
        tracing::warn!(deployment = %clip(&state.deployment_id, 64), %reason, "refusing a desired state");
        self.outbox.record(Outcome::failed(
            &clip(&state.deployment_id, 64),
            &clip(&state.closure, 300),
            MachineState::Failed,
            Failure::new(MachineState::Unspecified, reason, ""),
            self.activator.paths.current_system().unwrap_or_default(),
        ));
    }

    /// Drops the queued desired state of a cancelled deployment. One that
    /// already started runs on: the control plane refuses its confirmation,
    /// which rolls it back.
    fn cancel(&self, cancelled: &Cancel, running: Option<&Running>, pending: &mut Option<Desired>) {
        let id = cancelled.deployment_id.as_str();
        if let Some(dropped) = pending.take_if(|p| p.deployment_id.as_str() == id) {
            tracing::info!(deployment = %dropped.deployment_id, "cancelled before it started");
            write(&self.activity.queued, None);
            let reason = if cancelled.reason.trim().is_empty() {
                "cancelled before it started".to_owned()
            } else {
                clip(&cancelled.reason, 1024)
            };
            self.outbox.record(Outcome::cancelled(
                dropped.deployment_id.as_str(),
                dropped.closure.as_str(),
                reason,
                self.activator.paths.current_system().unwrap_or_default(),
            ));
        } else if running.is_some_and(|r| r.key.0 == id) {
            tracing::info!(deployment = %clip(id, 64), "cancelled while running; it finishes or rolls back");
        } else {
            tracing::debug!(deployment = %clip(id, 64), "cancellation of a deployment not held here");
        }
    }

    fn start(&self, desired: Desired) -> Running {
        let key = key_of(&desired);
        let allow_reboot = desired.allow_reboot;
        write(&self.activity.active, Some(key.0.clone()));
        let activator = self.activator.clone();
        let outbox = self.outbox.clone();
        let sink: ProgressSink = Arc::new(move |progress| outbox.progress(progress));
        let span = tracing::info_span!("deployment", id = %desired.deployment_id, closure = %desired.closure);
        let task = tokio::spawn(
            async move {
                tracing::info!("activating");
                let outcome = activator.run(&desired, &sink).await;
                tracing::info!(state = %outcome.state, reason = %outcome.reason, "finished");
                outcome
            }
            .instrument(span),
        );
        Running {
            key,
            allow_reboot,
            task,
        }
    }
}

#[cfg(test)]
mod tests;
