//! The VM host's side: run exactly the VM instances assigned to this host.
//!
//! A journal, `vms.json` in the VM state folder, records what runs. A
//! restarted agent reads it and re-adopts the VMs still running instead of
//! starting them twice; an instance no longer assigned is stopped and its
//! state folder (sockets, pid file, console log) removed. A VM whose closure
//! did not change is left running. A new closure that does not come up (the
//! VMM exits, the guest names another closure, or it stays silent) is
//! replaced by the closure that ran before.
//!
//! QEMU opens each VM's tap itself without making it persistent, so the
//! tap goes when the VM's process does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use procurator_core::MachineName;
use procurator_core::artifact::Demand;
use procurator_core::store_path::StorePath;
use serde::{Deserialize, Serialize};

use super::{Resets, VmError, VmSpec, Vmm, wait_ready};

/// How long a guest may take from start to its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may take to power off on the power button.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the VMM is checked while waiting for readiness.
const READY_POLL: Duration = Duration::from_millis(500);

/// One VM instance the control plane wants on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub instance: MachineName,
    pub closure: StorePath,
    pub demand: Demand,
    /// The deployment the closure comes from, for the result; empty when
    /// the host only keeps what runs.
    pub deployment_id: String,
    /// The instance's own agent is connected: a change it can switch to in
    /// place (same kernel, initrd, command line and size) needs no restart.
    pub guest_agent_connected: bool,
    /// A new closure that does not come up goes back to the one before;
    /// without it, the VM is left on the new closure.
    pub auto_rollback: bool,
}

/// What reconciling did to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It already ran its closure: left alone.
    Unchanged,
    /// Its own agent switches it to the new closure; the VM keeps running
    /// what it booted.
    InPlace,
    /// It was not running: booted, and it reported ready.
    Started,
    /// Its closure changed: restarted with the new one, which reported
    /// ready. `why` it had to be restarted rather than switched in place.
    Restarted { why: String },
    /// The new closure did not come up; the previous one runs again.
    RolledBack { reason: String },
    /// It did not come up and nothing runs now.
    Failed { reason: String },
    /// No longer assigned: stopped, its state removed.
    Removed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Journal {
    vms: BTreeMap<String, Running>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Running {
    closure: String,
    milli_cpus: u64,
    memory_bytes: u64,
}

pub struct VmHost<V> {
    vmm: V,
    /// A folder per VM, and the journal.
    state_root: PathBuf,
    /// Where closures' files are read: `/`, unless the host's store lives
    /// under another root.
    store_root: PathBuf,
    pub ready_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl<V: Vmm> VmHost<V> {
    pub fn new(vmm: V, state_root: PathBuf, store_root: PathBuf) -> Self {
        Self {
            vmm,
            state_root,
            store_root,
            ready_timeout: READY_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }

    /// Make this host run exactly `wanted`. Every instance, wanted or
    /// removed, gets an outcome; a journal that cannot be written is an
    /// error, since a restart would then lose track of running VMs.
    pub async fn reconcile(
        &self,
        wanted: &[Assignment],
    ) -> Result<BTreeMap<MachineName, Outcome>, VmError> {
        let mut journal = self.load().await?;
        let mut outcomes = BTreeMap::new();

        // What the journal runs, and state folders it does not know: an
        // agent killed between starting a VM and writing the journal leaves
        // one (perhaps with its VMM still running).
        let mut known: std::collections::BTreeSet<String> = journal.vms.keys().cloned().collect();
        known.extend(self.state_folders().await?);
        let unwanted: Vec<String> = known
            .into_iter()
            .filter(|name| !wanted.iter().any(|a| a.instance.as_str() == name.as_str()))
            .collect();
        for name in unwanted {
            let state_dir = self.state_root.join(&name);
            self.vmm.stop(&state_dir, self.shutdown_grace).await?;
            match tokio::fs::remove_dir_all(&state_dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmError::State {
                        path: state_dir,
                        source,
                    });
                }
            }
            journal.vms.remove(&name);
            self.save(&journal).await?;
            if let Ok(name) = MachineName::parse(&name) {
                tracing::info!(instance = %name, "VM removed");
                outcomes.insert(name, Outcome::Removed);
            }
        }

        // All at once: a host that boots twenty VMs after its own reboot
        // should not wait for each guest's readiness in turn.
        let journal = tokio::sync::Mutex::new(journal);
        let applied =
            futures::future::join_all(wanted.iter().map(|a| self.apply(&journal, a))).await;
        for (assignment, outcome) in wanted.iter().zip(applied) {
            outcomes.insert(assignment.instance.clone(), outcome?);
        }
        Ok(outcomes)
    }

    /// What runs for `instance` now, as the journal has it.
    pub async fn current(&self, instance: &MachineName) -> Result<Option<Assignment>, VmError> {
        let journal = self.load().await?;
        let Some(running) = journal.vms.get(instance.as_str()) else {
            return Ok(None);
        };
        let Ok(closure) = StorePath::parse(&running.closure) else {
            return Ok(None);
        };
        Ok(Some(Assignment {
            instance: instance.clone(),
            closure,
            demand: Demand {
                milli_cpus: running.milli_cpus,
                memory_bytes: running.memory_bytes,
            },
            deployment_id: String::new(),
            guest_agent_connected: false,
            auto_rollback: true,
        }))
    }

    /// Every instance that runs, with the closure it booted.
    pub async fn running(&self) -> Result<Vec<(MachineName, StorePath)>, VmError> {
        let journal = self.load().await?;
        Ok(journal
            .vms
            .iter()
            .filter_map(|(name, r)| {
                Some((
                    MachineName::parse(name).ok()?,
                    StorePath::parse(&r.closure).ok()?,
                ))
            })
            .collect())
    }

    /// The folder of `instance`'s state; it goes when the VM is removed.
    pub fn state_dir(&self, instance: &MachineName) -> PathBuf {
        self.state_root.join(instance.as_str())
    }

    /// Where `closure`'s files are on this host.
    pub fn closure_root(&self, closure: &StorePath) -> PathBuf {
        self.store_root
            .join(closure.as_str().trim_start_matches('/'))
    }

    /// Makes one instance run what it is assigned; `journal` is shared with
    /// the other instances' applications running at the same time.
    async fn apply(
        &self,
        journal: &tokio::sync::Mutex<Journal>,
        wanted: &Assignment,
    ) -> Result<Outcome, VmError> {
        let name = wanted.instance.as_str().to_owned();
        let state_dir = self.state_root.join(&name);
        let running = self.vmm.pid(&state_dir).await.is_some();
        let before = journal.lock().await.vms.get(&name).cloned();
        let target = Running {
            closure: wanted.closure.to_string(),
            milli_cpus: wanted.demand.milli_cpus,
            memory_bytes: wanted.demand.memory_bytes,
        };
        if running && before.as_ref() == Some(&target) {
            return Ok(Outcome::Unchanged);
        }
        // Why it is (re)started rather than left to its own agent.
        let why = match &before {
            _ if !running => "it was not running",
            _ if !wanted.guest_agent_connected => {
                "it has no agent of its own connected, which could switch it in place"
            }
            None => "the host's journal did not say what it ran",
            Some(before) => match self.restart_reason(&wanted.instance, before, &target) {
                Some(why) => why,
                None => return Ok(Outcome::InPlace),
            },
        };
        if running {
            self.vmm.stop(&state_dir, self.shutdown_grace).await?;
        }
        match self.boot(&wanted.instance, &target).await {
            Ok(()) => {
                self.record(journal, name, Some(target)).await?;
                tracing::info!(instance = %wanted.instance, closure = %wanted.closure, "VM running");
                Ok(if running {
                    Outcome::Restarted { why: why.into() }
                } else {
                    Outcome::Started
                })
            }
            Err(failure) => {
                let reason = failure.to_string();
                tracing::warn!(instance = %wanted.instance, %reason, "VM did not come up");
                if !wanted.auto_rollback {
                    // As a machine without autoRollback stays on its new
                    // system: whatever runs is left for inspection.
                    self.record(journal, name, Some(target)).await?;
                    return Ok(Outcome::Failed {
                        reason: format!(
                            "{reason}; autoRollback is off, so it is left on the new closure"
                        ),
                    });
                }
                self.vmm.stop(&state_dir, self.shutdown_grace).await?;
                let previous = before.filter(|b| b.closure != target.closure);
                if let Some(previous) = previous
                    && self.boot(&wanted.instance, &previous).await.is_ok()
                {
                    self.record(journal, name, Some(previous)).await?;
                    return Ok(Outcome::RolledBack { reason });
                }
                self.vmm.stop(&state_dir, self.shutdown_grace).await?;
                self.record(journal, name, None).await?;
                Ok(Outcome::Failed { reason })
            }
        }
    }

    /// Why going from `before` to `after` needs the VM restarted, if it
    /// does: a new kernel, initrd, command line or size. When a closure's
    /// files cannot be read, a restart is the safe answer.
    fn restart_reason(
        &self,
        instance: &MachineName,
        before: &Running,
        after: &Running,
    ) -> Option<&'static str> {
        let spec = |r: &Running| {
            let closure = StorePath::parse(&r.closure).ok()?;
            let demand = Demand {
                milli_cpus: r.milli_cpus,
                memory_bytes: r.memory_bytes,
            };
            let root = self.closure_root(&closure);
            VmSpec::new(instance.clone(), closure, &root, demand, &self.state_root).ok()
        };
        match (spec(before), spec(after)) {
            (Some(old), Some(new)) => old.restart_reason(&new),
            _ => Some("the files of its closures could not be compared"),
        }
    }

    /// Start `instance` on `closure` and wait for its readiness line.
    async fn boot(&self, instance: &MachineName, closure: &Running) -> Result<(), VmError> {
        let store_path = StorePath::parse(&closure.closure).map_err(|e| VmError::NotASystem {
            closure: format!("{} ({e})", closure.closure),
            file: "valid store path",
        })?;
        let root = self.closure_root(&store_path);
        let demand = Demand {
            milli_cpus: closure.milli_cpus,
            memory_bytes: closure.memory_bytes,
        };
        let spec = VmSpec::new(
            instance.clone(),
            store_path,
            &root,
            demand,
            &self.state_root,
        )?;
        self.vmm.start(&spec).await?;
        self.await_ready(&spec).await
    }

    /// Readiness, failing early when the guest resets or its VMM exits. A
    /// guest that panics or reboots ends QEMU (`-no-reboot`); cloud-hypervisor
    /// boots it again under the same process, and says so in its events.
    async fn await_ready(&self, spec: &VmSpec) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            match wait_ready(spec, READY_POLL).await {
                Ok(()) => return Ok(()),
                Err(VmError::Timeout { .. }) => {}
                Err(other) => return Err(other),
            }
            if self.vmm.pid(&spec.state_dir).await.is_none() {
                return Err(VmError::Exited {
                    name: spec.name.to_string(),
                    log: spec.serial_log(),
                });
            }
            let resets = self.vmm.resets(&spec.state_dir).await;
            if resets.count > 0 {
                return Err(VmError::Reset {
                    name: spec.name.to_string(),
                    why: resets.last.unwrap_or_else(|| "its VMM says so".into()),
                    log: spec.serial_log(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    vmm: "the guest",
                    what: "report that it is ready",
                    secs: self.ready_timeout.as_secs(),
                    log: spec.serial_log(),
                });
            }
        }
    }

    /// Each VM the journal says runs, with its guest's resets since its VM
    /// started.
    pub async fn resets(&self) -> Result<Vec<(String, Resets)>, VmError> {
        let journal = self.load().await?;
        let mut all = Vec::with_capacity(journal.vms.len());
        for name in journal.vms.keys() {
            let resets = self.vmm.resets(&self.state_root.join(name)).await;
            all.push((name.clone(), resets));
        }
        Ok(all)
    }

    /// Writes what `name` runs now (`None`: nothing) to the journal.
    async fn record(
        &self,
        journal: &tokio::sync::Mutex<Journal>,
        name: String,
        running: Option<Running>,
    ) -> Result<(), VmError> {
        let mut journal = journal.lock().await;
        match running {
            Some(running) => journal.vms.insert(name, running),
            None => journal.vms.remove(&name),
        };
        self.save(&journal).await
    }

    /// The names of the folders under the state root that are instances'.
    async fn state_folders(&self) -> Result<Vec<String>, VmError> {
        let state = |source| VmError::State {
            path: self.state_root.clone(),
            source,
        };
        let mut entries = match tokio::fs::read_dir(&self.state_root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(state(e)),
        };
        let mut names = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(state)? {
            let is_dir = entry.file_type().await.is_ok_and(|t| t.is_dir());
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_dir && MachineName::parse(&name).is_ok() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn journal_path(&self) -> PathBuf {
        self.state_root.join("vms.json")
    }

    async fn load(&self) -> Result<Journal, VmError> {
        let path = self.journal_path();
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| VmError::State {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(source) => Err(VmError::State { path, source }),
        }
    }

    async fn save(&self, journal: &Journal) -> Result<(), VmError> {
        let path = self.journal_path();
        let bytes = serde_json::to_vec_pretty(journal).unwrap_or_default();
        let (dir, file) = (self.state_root.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            crate::journal::write_atomically(&file, &bytes)
        })
        .await
        .map_err(|e| VmError::State {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| VmError::State { path, source })
    }
}

#[cfg(test)]
pub(crate) mod tests;
