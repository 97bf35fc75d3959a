//! Drives a VM host from the control plane's `VmAssignments`: each set's
//! closures are copied into the store and the set is reconciled. Sets are
//! taken one at a time, newest first: one that arrives during a reconcile
//! is done next, and any older one it replaced is skipped.

use std::collections::BTreeMap;

use procurator_core::MachineName;
use procurator_core::artifact::Demand;
use procurator_core::nix::Nix;
use procurator_core::store_path::StorePath;
use procurator_proto::v1::VmAssignments;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Vmm;
use super::host::{Assignment, Outcome, VmHost};

pub struct Runner<V> {
    pub host: VmHost<V>,
    pub nix: Nix,
    /// Tried in order for a closure the store lacks.
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Each reconcile's outcomes, for whoever reports them.
    pub outcomes: Option<mpsc::Sender<BTreeMap<MachineName, Outcome>>>,
}

impl<V: Vmm> Runner<V> {
    /// Reconciles every new set until `cancel`.
    pub async fn run(
        self,
        mut sets: watch::Receiver<Option<VmAssignments>>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = sets.changed() => if changed.is_err() { return },
            }
            let Some(set) = sets.borrow_and_update().clone() else {
                continue;
            };
            let wanted = self.prepare(&set).await;
            match self.host.reconcile(&wanted).await {
                Ok(outcomes) => {
                    log(&outcomes);
                    if let Some(tx) = &self.outcomes {
                        let _ = tx.send(outcomes).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot reconcile the VMs"),
            }
        }
    }

    /// The set as assignments whose closures are in the store. An instance
    /// whose new closure cannot be had keeps what it runs (or is left out
    /// if nothing runs), so a cache outage never stops a running VM.
    async fn prepare(&self, set: &VmAssignments) -> Vec<Assignment> {
        let mut wanted = Vec::new();
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
            };
            match self.fetch(&assignment.closure).await {
                Ok(()) => wanted.push(assignment),
                Err(reason) => {
                    tracing::warn!(instance = %assignment.instance, closure = %assignment.closure, %reason, "cannot copy the VM's closure; it keeps what it runs");
                    if let Ok(Some(current)) = self.host.current(&assignment.instance).await {
                        wanted.push(current);
                    }
                }
            }
        }
        wanted
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

fn log(outcomes: &BTreeMap<MachineName, Outcome>) {
    for (instance, outcome) in outcomes {
        match outcome {
            Outcome::Unchanged => tracing::debug!(%instance, "VM unchanged"),
            Outcome::Started | Outcome::Restarted | Outcome::Removed => {
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
