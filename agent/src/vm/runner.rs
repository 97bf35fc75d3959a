//! Drives a VM host from the control plane's `VmAssignments`: each set's
//! closures are copied into the store and the set is reconciled. Sets are
//! taken one at a time, newest first: one that arrives during a reconcile
//! is done next, and any older one it replaced is skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use procurator_core::MachineName;
use procurator_core::artifact::Demand;
use procurator_core::nix::Nix;
use procurator_core::store_path::StorePath;
use procurator_proto::v1::{
    ActivationResult, MachineState, VmAssignment, VmAssignments, VmInPlace, agent_message,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Vmm;
use super::host::{Assignment, Outcome, VmHost};
use crate::intent::IntentPolicy;

pub struct Runner<V> {
    pub host: VmHost<V>,
    pub nix: Nix,
    /// Tried in order for a closure the store lacks.
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Which statements this host acts on, per instance.
    pub intents: Arc<IntentPolicy>,
    /// What the control plane hears: a result per instance whose
    /// deployment's closure was applied or failed, or that its guest's
    /// agent switches it in place.
    pub results: Option<mpsc::Sender<agent_message::Kind>>,
    /// Each reconcile's outcomes, removals included.
    pub outcomes: Option<mpsc::Sender<BTreeMap<MachineName, Outcome>>>,
    /// Keep what each VM booted from the store's garbage collector: an
    /// indirect root in the VM's state folder, gone with the folder.
    pub gc_roots: bool,
}

/// How often running VMs are checked for guests that reset after they were
/// ready.
const RESET_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// The link in a VM's state folder that roots the closure it booted.
pub const GC_ROOT: &str = "gcroot";

impl<V: Vmm> Runner<V> {
    /// Reconciles every new set until `cancel`.
    pub async fn run(
        self,
        mut sets: watch::Receiver<Option<VmAssignments>>,
        cancel: CancellationToken,
    ) {
        let mut check = tokio::time::interval(RESET_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_resets = BTreeMap::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = check.tick() => {
                    self.note_resets(&mut seen_resets).await;
                    continue;
                }
                changed = sets.changed() => if changed.is_err() { return },
            }
            let Some(set) = sets.borrow_and_update().clone() else {
                continue;
            };
            let (wanted, uncopied) = self.prepare(&set).await;
            let mut results: Vec<agent_message::Kind> = uncopied
                .into_iter()
                .map(agent_message::Kind::Result)
                .collect();
            let reconciled = self.host.reconcile(&wanted).await;
            // Rooted before anyone hears of it: a collection right after a
            // VM is reported running must not take its store.
            if self.gc_roots {
                self.root_running().await;
            }
            match reconciled {
                Ok(outcomes) => {
                    log(&outcomes);
                    results.extend(
                        wanted
                            .iter()
                            .filter_map(|a| report(a, outcomes.get(&a.instance)?)),
                    );
                    if let Some(tx) = &self.outcomes {
                        let _ = tx.send(outcomes).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot reconcile the VMs"),
            }
            if let Some(tx) = &self.results {
                for r in results {
                    let _ = tx.send(r).await;
                }
            }
        }
    }

    /// Says so when a guest that was ready has reset since (a reboot, or a
    /// panic with `panic=N`): its VMM booted it again and it runs, but
    /// something made it restart. `seen` is how many each VM had.
    async fn note_resets(&self, seen: &mut BTreeMap<String, u32>) {
        let all = match self.host.resets().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the VMs for guest resets");
                return;
            }
        };
        let mut now = BTreeMap::new();
        for (instance, resets) in all {
            if resets.count > seen.get(&instance).copied().unwrap_or(0) {
                tracing::warn!(
                    %instance,
                    resets = resets.count,
                    last = resets.last.as_deref().unwrap_or_default(),
                    "a VM's guest reset after it was ready; its VMM booted it again (see its console log)"
                );
            }
            now.insert(instance, resets.count);
        }
        *seen = now;
    }

    /// The set as assignments whose closures are in the store. An instance
    /// whose statement is refused, or whose new closure cannot be had, keeps
    /// what it runs (or is left out if nothing runs), so neither a cache
    /// outage nor a forged assignment stops a running VM; the refusal or
    /// failed copy is a result of its own.
    async fn prepare(&self, set: &VmAssignments) -> (Vec<Assignment>, Vec<ActivationResult>) {
        let mut wanted = Vec::new();
        let mut failed = Vec::new();
        for vm in &set.vms {
            let (Ok(instance), Ok(closure)) = (
                MachineName::parse(&vm.instance),
                StorePath::parse(&vm.closure),
            ) else {
                tracing::warn!(instance = %vm.instance, closure = %vm.closure, "ignoring a malformed VM assignment");
                continue;
            };
            let assignment = Assignment {
                instance,
                closure,
                demand: Demand {
                    milli_cpus: vm.milli_cpus,
                    memory_bytes: vm.memory_bytes,
                },
                deployment_id: vm.deployment_id.clone(),
                guest_agent_connected: vm.guest_agent_connected,
                auto_rollback: !vm.no_auto_rollback,
            };
            let ready = match self.admit(assignment, vm) {
                Ok(assignment) => match self.fetch(&assignment.closure).await {
                    Ok(()) => Ok(assignment),
                    Err(reason) => {
                        let reason = format!("cannot copy {}: {reason}", assignment.closure);
                        Err((assignment, MachineState::Copying, reason))
                    }
                },
                Err((assignment, reason)) => Err((assignment, MachineState::Unspecified, reason)),
            };
            let (assignment, failed_phase, reason) = match ready {
                Ok(assignment) => {
                    wanted.push(assignment);
                    continue;
                }
                Err(refused) => refused,
            };
            tracing::warn!(instance = %assignment.instance, %reason, "not applying a VM assignment; the VM keeps what it runs");
            if !assignment.deployment_id.is_empty() {
                failed.push(ActivationResult {
                    instance: assignment.instance.to_string(),
                    deployment_id: assignment.deployment_id.clone(),
                    state: MachineState::Failed.into(),
                    failed_phase: failed_phase.into(),
                    reason,
                    ..Default::default()
                });
            }
            if let Ok(Some(current)) = self.host.current(&assignment.instance).await {
                wanted.push(current);
            }
        }
        (wanted, failed)
    }

    /// The assignment as its statement says (size, rollback), when this host
    /// requires statements; or why it is refused.
    fn admit(
        &self,
        mut assignment: Assignment,
        vm: &VmAssignment,
    ) -> Result<Assignment, (Assignment, String)> {
        match self
            .intents
            .admit(&assignment.instance, &vm.closure, &vm.intent)
        {
            Ok(None) => Ok(assignment),
            Ok(Some(intent)) => match intent.vm {
                Some(size) => {
                    assignment.demand = Demand {
                        milli_cpus: size.milli_cpus,
                        memory_bytes: size.memory_bytes,
                    };
                    assignment.auto_rollback = intent.auto_rollback;
                    Ok(assignment)
                }
                None => {
                    let reason = format!(
                        "{}: the statement for {} is not for a VM instance",
                        crate::intent::REFUSED,
                        assignment.instance
                    );
                    Err((assignment, reason))
                }
            },
            Err(reason) => Err((assignment, reason)),
        }
    }

    /// Point each running VM's root at the closure it booted.
    async fn root_running(&self) {
        let running = match self.host.running().await {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read which VMs run; their closures are not rooted");
                return;
            }
        };
        for (instance, closure) in running {
            let link = self.host.state_dir(&instance).join(GC_ROOT);
            if let Err(e) = self.nix.add_root(&link, &closure).await {
                tracing::warn!(%instance, %closure, error = %e, "cannot root the VM's closure; a garbage collection could remove it");
            }
        }
    }

    /// Copy `closure` in unless the store has it.
    async fn fetch(&self, closure: &StorePath) -> Result<(), String> {
        if self.host.closure_root(closure).exists() {
            return Ok(());
        }
        if self.substituters.is_empty() {
            return Err("it is not in the store and no --substituter is set".into());
        }
        let mut errors = Vec::new();
        for substituter in &self.substituters {
            match self
                .nix
                .copy_from(substituter, closure, &self.trusted_public_keys, |_| {})
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => errors.push(format!("{substituter}: {e}")),
            }
        }
        Err(errors.join("; "))
    }
}

/// The control plane's view of one instance's outcome: a row it sent
/// succeeded, was already running, failed (rolled back or not), or is left
/// to the guest's agent.
fn report(assignment: &Assignment, outcome: &Outcome) -> Option<agent_message::Kind> {
    if assignment.deployment_id.is_empty() {
        return None;
    }
    if *outcome == Outcome::InPlace {
        return Some(agent_message::Kind::VmInPlace(VmInPlace {
            instance: assignment.instance.to_string(),
            deployment_id: assignment.deployment_id.clone(),
        }));
    }
    let closure = assignment.closure.to_string();
    let (state, failed_phase, reason, current_system) = match outcome {
        Outcome::Started => (
            MachineState::Succeeded,
            MachineState::Unspecified,
            "started: the VM was not running".to_owned(),
            closure,
        ),
        Outcome::Restarted { why } => (
            MachineState::Succeeded,
            MachineState::Unspecified,
            format!("restarted: {why}"),
            closure,
        ),
        Outcome::Unchanged => (
            MachineState::Skipped,
            MachineState::Unspecified,
            String::new(),
            closure,
        ),
        Outcome::RolledBack { reason } => (
            MachineState::RolledBack,
            MachineState::Activating,
            reason.clone(),
            String::new(),
        ),
        Outcome::Failed { reason } => (
            MachineState::Failed,
            MachineState::Activating,
            reason.clone(),
            String::new(),
        ),
        Outcome::Removed | Outcome::InPlace => return None,
    };
    Some(agent_message::Kind::Result(ActivationResult {
        instance: assignment.instance.to_string(),
        deployment_id: assignment.deployment_id.clone(),
        state: state.into(),
        failed_phase: failed_phase.into(),
        reason,
        current_system,
        ..Default::default()
    }))
}

fn log(outcomes: &BTreeMap<MachineName, Outcome>) {
    for (instance, outcome) in outcomes {
        match outcome {
            Outcome::Unchanged => tracing::debug!(%instance, "VM unchanged"),
            Outcome::InPlace => {
                tracing::info!(%instance, "VM left running: its own agent switches it in place")
            }
            Outcome::Started | Outcome::Restarted { .. } | Outcome::Removed => {
                tracing::info!(%instance, ?outcome, "VM reconciled")
            }
            Outcome::RolledBack { reason } | Outcome::Failed { reason } => {
                tracing::warn!(%instance, ?outcome, %reason, "VM did not come up")
            }
        }
    }
}

#[cfg(test)]
mod tests;
