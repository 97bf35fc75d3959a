//! The reconciler with real QEMU (TCG) and Debian's cloud kernel: closures
//! are folders under a store root of the test's own.

use std::path::{Path, PathBuf};

use super::*;
use crate::vm::qemu::tests::{KillOnDrop, guest_initrd};
use crate::vm::qemu::{Accel, Qemu, pid_file};

const KERNEL: &str = "/var/cache/procurator/test-kernel/vmlinuz";

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) host: VmHost<Qemu>,
    initrd: PathBuf,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        assert!(
            Path::new(KERNEL).exists(),
            "{KERNEL} is missing: run scripts/setup.sh, which unpacks Debian's cloud kernel there"
        );
        let dir = tempfile::tempdir().unwrap();
        let initrd = guest_initrd(dir.path());
        let host = Self::host(dir.path());
        Self { dir, host, initrd }
    }

    /// A VM host on the fixture's folders, as a (re)started agent makes one.
    pub(crate) fn host(dir: &Path) -> VmHost<Qemu> {
        // Each QEMU in a network namespace of its own: its tap is made
        // there and goes with it, and never meets another test's.
        let qemu = Qemu {
            prefix: vec!["unshare".into(), "--net".into(), "--".into()],
            ..Qemu::new(Accel::detect())
        };
        let mut host = VmHost::new(qemu, dir.join("vms"), dir.join("root"));
        host.shutdown_grace = Duration::from_millis(500);
        host.ready_timeout = Duration::from_secs(120);
        host
    }

    /// A system closure under the test's store root; `bootable: false`
    /// leaves /init out of its initrd, so the kernel panics and QEMU exits.
    pub(crate) fn closure(&self, name: &str, bootable: bool) -> StorePath {
        self.closure_with(name, bootable, "panic=-1")
    }

    /// [`Fixture::closure`] with its own kernel parameters.
    pub(crate) fn closure_with(&self, name: &str, bootable: bool, params: &str) -> StorePath {
        let path = format!("/nix/store/{}-nixos-system-{name}", "a".repeat(32));
        let closure = StorePath::parse(&path).unwrap();
        let root = self
            .dir
            .path()
            .join("root")
            .join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(KERNEL, root.join("kernel")).unwrap();
        if bootable {
            // Shared, as closures of one kernel and initrd share them.
            std::os::unix::fs::symlink(&self.initrd, root.join("initrd")).unwrap();
        } else {
            std::fs::write(root.join("initrd"), b"").unwrap();
        }
        std::fs::write(root.join("init"), b"").unwrap();
        std::fs::write(root.join("kernel-params"), params).unwrap();
        closure
    }

    fn assign(&self, instance: &str, closure: &StorePath) -> Assignment {
        Assignment {
            instance: MachineName::parse(instance).unwrap(),
            closure: closure.clone(),
            demand: Demand {
                milli_cpus: 1000,
                memory_bytes: 256 << 20,
            },
            deployment_id: String::new(),
            guest_agent_connected: false,
            auto_rollback: true,
        }
    }

    pub(crate) fn state(&self, instance: &str) -> PathBuf {
        self.dir.path().join("vms").join(instance)
    }

    pub(crate) fn guard(&self, instance: &str) -> KillOnDrop {
        KillOnDrop(pid_file(&self.state(instance)))
    }

    pub(crate) async fn pid(&self, instance: &str) -> Option<nix::unistd::Pid> {
        self.host.vmm.pid(&self.state(instance)).await
    }

    pub(crate) fn console(&self, instance: &str) -> String {
        std::fs::read_to_string(self.state(instance).join("console.log")).unwrap_or_default()
    }
}

fn outcome(outcomes: &BTreeMap<MachineName, Outcome>, instance: &str) -> Outcome {
    outcomes[&MachineName::parse(instance).unwrap()].clone()
}

#[tokio::test]
async fn vms_start_stay_change_roll_back_and_go_and_a_new_host_adopts_them() {
    let f = Fixture::new();
    let _guard = f.guard("web-0");
    let a = f.closure("a", true);
    let b = f.closure("b", true);
    let broken = f.closure("broken", false);

    let done = f.host.reconcile(&[f.assign("web-0", &a)]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Started);
    let first = f.pid("web-0").await.expect("web-0 runs");
    assert!(
        f.console("web-0")
            .contains(&format!("procurator-ready {a}"))
    );

    // The same closure again: left running, the same process.
    let done = f.host.reconcile(&[f.assign("web-0", &a)]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Unchanged);
    assert_eq!(f.pid("web-0").await, Some(first));

    // A restarted agent (a new VmHost on the same folders) adopts it.
    let again = Fixture::host(f.dir.path());
    let done = again.reconcile(&[f.assign("web-0", &a)]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Unchanged);
    assert_eq!(f.pid("web-0").await, Some(first));

    // A new closure: restarted on it.
    let done = f.host.reconcile(&[f.assign("web-0", &b)]).await.unwrap();
    assert!(
        matches!(outcome(&done, "web-0"), Outcome::Restarted { .. }),
        "{done:?}"
    );
    assert_ne!(f.pid("web-0").await, Some(first));
    assert!(
        f.console("web-0")
            .contains(&format!("procurator-ready {b}"))
    );

    // A closure whose guest panics: b runs again, and the reason says why.
    let done = f
        .host
        .reconcile(&[f.assign("web-0", &broken)])
        .await
        .unwrap();
    let Outcome::RolledBack { reason } = outcome(&done, "web-0") else {
        panic!("expected a rollback, got {done:?}");
    };
    assert!(
        reason.contains("stopped before it reported ready"),
        "{reason}"
    );
    assert!(
        f.console("web-0")
            .contains(&format!("procurator-ready {b}"))
    );
    assert!(f.pid("web-0").await.is_some());

    // No longer assigned: stopped, and its folder gone.
    let done = f.host.reconcile(&[]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Removed);
    assert_eq!(f.pid("web-0").await, None);
    assert!(!f.state("web-0").exists());
}

#[tokio::test]
async fn a_vm_that_never_came_up_is_reported_failed_and_nothing_runs() {
    let f = Fixture::new();
    let _guard = f.guard("db");
    let broken = f.closure("broken", false);
    let done = f.host.reconcile(&[f.assign("db", &broken)]).await.unwrap();
    let Outcome::Failed { reason } = outcome(&done, "db") else {
        panic!("expected a failure, got {done:?}");
    };
    assert!(reason.contains("see "), "{reason}");
    assert_eq!(f.pid("db").await, None);
    // Nothing in the journal: the next reconcile tries again.
    let journal = std::fs::read_to_string(f.dir.path().join("vms/vms.json")).unwrap();
    assert!(!journal.contains("\"db\""), "{journal}");
}

#[tokio::test]
async fn a_guest_with_its_own_agent_is_switched_in_place_unless_its_kernel_line_changes() {
    let f = Fixture::new();
    let _guard = f.guard("app");
    let a = f.closure("a", true);
    let b = f.closure("b", true);
    let new_params = f.closure_with("c", true, "panic=-1 quiet");
    let with_agent = |closure: &StorePath| Assignment {
        guest_agent_connected: true,
        ..f.assign("app", closure)
    };

    let done = f.host.reconcile(&[with_agent(&a)]).await.unwrap();
    assert_eq!(outcome(&done, "app"), Outcome::Started);
    let pid = f.pid("app").await.unwrap();

    // Same kernel, initrd and command line: the guest's agent does it.
    let done = f.host.reconcile(&[with_agent(&b)]).await.unwrap();
    assert_eq!(outcome(&done, "app"), Outcome::InPlace);
    assert_eq!(f.pid("app").await, Some(pid));

    // Without its agent the same change is a restart.
    let done = f.host.reconcile(&[f.assign("app", &b)]).await.unwrap();
    assert_eq!(
        outcome(&done, "app"),
        Outcome::Restarted {
            why: "it has no agent of its own connected, which could switch it in place".into()
        }
    );
    let pid = f.pid("app").await.unwrap();

    // A new kernel command line needs a restart, agent or not.
    let done = f.host.reconcile(&[with_agent(&new_params)]).await.unwrap();
    assert_eq!(
        outcome(&done, "app"),
        Outcome::Restarted {
            why: "its kernel command line changed".into()
        }
    );
    assert_ne!(f.pid("app").await, Some(pid));
    assert!(
        f.console("app")
            .contains(&format!("procurator-ready {new_params}"))
    );
}

/// A network namespace with a bridge, removed on drop.
struct Netns(String);

impl Netns {
    fn with_bridge() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pvm-test-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns.0, "link", "set", "br0", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn a_vms_tap_joins_the_hosts_bridge_and_is_up() {
    let f = Fixture::new();
    let ns = Netns::with_bridge();
    let _guard = f.guard("web-0");
    let qemu = Qemu {
        prefix: ["ip", "netns", "exec", &ns.0].map(str::to_owned).to_vec(),
        bridge: Some("br0".into()),
        ..Qemu::new(Accel::detect())
    };
    let mut host = VmHost::new(qemu, f.dir.path().join("vms"), f.dir.path().join("root"));
    host.shutdown_grace = Duration::from_millis(500);
    let a = f.closure("a", true);
    let done = host.reconcile(&[f.assign("web-0", &a)]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Started);

    let tap = crate::vm::tap_name(&MachineName::parse("web-0").unwrap());
    let shown = std::process::Command::new("ip")
        .args(["-n", &ns.0, "-o", "link", "show", "dev", &tap])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("master br0"), "{shown}");
    assert!(shown.contains(",UP"), "{shown}");

    let done = host.reconcile(&[]).await.unwrap();
    assert_eq!(outcome(&done, "web-0"), Outcome::Removed);
}

#[tokio::test]
async fn a_missing_bridge_fails_the_start_and_says_so() {
    let f = Fixture::new();
    let _guard = f.guard("web-0");
    let qemu = Qemu {
        prefix: vec!["unshare".into(), "--net".into(), "--".into()],
        bridge: Some("no-such-br".into()),
        ..Qemu::new(Accel::detect())
    };
    let host = VmHost::new(qemu, f.dir.path().join("vms"), f.dir.path().join("root"));
    let a = f.closure("a", true);
    let done = host.reconcile(&[f.assign("web-0", &a)]).await.unwrap();
    let Outcome::Failed { reason } = outcome(&done, "web-0") else {
        panic!("expected a failure, got {done:?}");
    };
    assert!(
        reason.contains("does the bridge no-such-br exist?"),
        "{reason}"
    );
    assert_eq!(f.pid("web-0").await, None, "the half-started VM is stopped");
}

#[tokio::test]
async fn without_auto_rollback_a_vm_that_does_not_come_up_stays_on_its_new_closure() {
    let f = Fixture::new();
    let _guard = f.guard("db");
    let a = f.closure("a", true);
    let broken = f.closure("broken", false);
    let done = f.host.reconcile(&[f.assign("db", &a)]).await.unwrap();
    assert_eq!(outcome(&done, "db"), Outcome::Started);

    let no_rollback = Assignment {
        auto_rollback: false,
        ..f.assign("db", &broken)
    };
    let done = f.host.reconcile(&[no_rollback]).await.unwrap();
    let Outcome::Failed { reason } = outcome(&done, "db") else {
        panic!("expected a failure, got {done:?}");
    };
    assert!(reason.contains("autoRollback is off"), "{reason}");
    // a was not booted again: the journal keeps the new closure (whose
    // guest panicked, so nothing runs), and the next set retries it.
    assert_eq!(f.pid("db").await, None);
    let journal = std::fs::read_to_string(f.dir.path().join("vms/vms.json")).unwrap();
    assert!(journal.contains(broken.as_str()), "{journal}");
    assert!(!journal.contains(a.as_str()), "{journal}");
}

#[tokio::test]
async fn a_state_folder_the_journal_does_not_know_is_cleared_away() {
    // As an agent killed between starting a VM and writing its journal
    // leaves it: a folder with a stale socket and pid file.
    let dir = tempfile::tempdir().unwrap();
    let host = Fixture::host(dir.path());
    let orphan = dir.path().join("vms/lost-0");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("qemu.pid"), "999999999\n").unwrap();
    std::fs::write(orphan.join("qmp.sock"), "").unwrap();
    let done = host.reconcile(&[]).await.unwrap();
    assert_eq!(outcome(&done, "lost-0"), Outcome::Removed);
    assert!(!orphan.exists());
    // Not an instance's folder: left alone.
    std::fs::create_dir_all(dir.path().join("vms/.cache")).unwrap();
    assert!(host.reconcile(&[]).await.unwrap().is_empty());
    assert!(dir.path().join("vms/.cache").exists());
}

/// A VMM whose starts only succeed once `n` of them are in flight at the
/// same time: it tells a reconcile that boots in turn from one that boots
/// at once. Its "guests" are ready as soon as they start.
struct Rendezvous {
    barrier: tokio::sync::Barrier,
    running: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
}

impl Vmm for Rendezvous {
    async fn start(&self, spec: &VmSpec) -> Result<nix::unistd::Pid, VmError> {
        let together = tokio::time::timeout(Duration::from_secs(20), self.barrier.wait());
        if together.await.is_err() {
            return Err(VmError::Timeout {
                vmm: "rendezvous",
                what: "see the other VMs start alongside this one",
                secs: 20,
                log: spec.serial_log(),
            });
        }
        std::fs::create_dir_all(&spec.state_dir).unwrap();
        std::fs::write(
            spec.serial_log(),
            format!("{}{}\n", crate::vm::READY_PREFIX, spec.closure),
        )
        .unwrap();
        self.running.lock().unwrap().insert(spec.state_dir.clone());
        Ok(nix::unistd::Pid::this())
    }

    async fn pid(&self, state_dir: &Path) -> Option<nix::unistd::Pid> {
        self.running
            .lock()
            .unwrap()
            .contains(state_dir)
            .then(nix::unistd::Pid::this)
    }

    async fn stop(&self, state_dir: &Path, _grace: Duration) -> Result<(), VmError> {
        self.running.lock().unwrap().remove(state_dir);
        Ok(())
    }
}

#[tokio::test]
async fn the_vms_of_one_set_boot_at_the_same_time() {
    let f = Fixture::new();
    let a = f.closure("a", true);
    let vmm = Rendezvous {
        barrier: tokio::sync::Barrier::new(3),
        running: Default::default(),
    };
    let host = VmHost::new(vmm, f.dir.path().join("vms"), f.dir.path().join("root"));
    let set = [
        f.assign("web-0", &a),
        f.assign("web-1", &a),
        f.assign("db", &a),
    ];
    let done = host.reconcile(&set).await.unwrap();
    assert!(
        done.values().all(|o| *o == Outcome::Started),
        "one at a time would have timed out waiting for the others: {done:?}"
    );
    let journal = std::fs::read_to_string(f.dir.path().join("vms/vms.json")).unwrap();
    for instance in ["web-0", "web-1", "db"] {
        assert!(journal.contains(&format!("\"{instance}\"")), "{journal}");
    }
}
