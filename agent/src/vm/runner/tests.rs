//! The runner fed like the connection feeds it, with real QEMU.

use std::path::PathBuf;
use std::time::Duration;

use procurator_proto::v1::{MachineState, VmAssignment};

use super::*;
use crate::vm::host::tests::Fixture;

fn vm(instance: &str, closure: &StorePath, deployment: &str) -> VmAssignment {
    VmAssignment {
        instance: instance.into(),
        machine: instance.into(),
        closure: closure.to_string(),
        deployment_id: deployment.into(),
        milli_cpus: 1000,
        memory_bytes: 256 << 20,
        ..Default::default()
    }
}

fn result(kind: agent_message::Kind) -> ActivationResult {
    match kind {
        agent_message::Kind::Result(r) => r,
        other => panic!("expected a result, got {other:?}"),
    }
}

async fn next(rx: &mut mpsc::Receiver<BTreeMap<MachineName, Outcome>>) -> Outcome {
    let outcomes = tokio::time::timeout(Duration::from_secs(180), rx.recv())
        .await
        .expect("no reconcile within 180 s")
        .expect("the runner stopped");
    outcomes
        .into_values()
        .next()
        .expect("an outcome for the one instance")
}

#[tokio::test]
async fn sets_are_reconciled_and_an_uncopyable_closure_keeps_what_runs() {
    let f = Fixture::new();
    let _guard = f.guard("web-0");
    let a = f.closure("a", true);
    let (reports, mut outcomes) = mpsc::channel(4);
    let (results_tx, mut results) = mpsc::channel(8);
    let runner = Runner {
        host: Fixture::host(f.dir.path()),
        nix: Nix::new(),
        substituters: Vec::new(),
        trusted_public_keys: Vec::new(),
        intents: no_intent_keys(f.dir.path()),
        results: Some(results_tx),
        outcomes: Some(reports),
        // Its closures are not in a real store.
        gc_roots: false,
    };
    let (sets, rx) = watch::channel(None);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runner.run(rx, cancel.clone()));

    sets.send_replace(Some(VmAssignments {
        vms: vec![vm("web-0", &a, "d-1")],
    }));
    assert_eq!(next(&mut outcomes).await, Outcome::Started);
    let pid = f.pid("web-0").await.expect("web-0 runs");
    let r = result(results.recv().await.unwrap());
    assert_eq!(
        (r.instance.as_str(), r.deployment_id.as_str(), r.state()),
        ("web-0", "d-1", MachineState::Succeeded)
    );
    assert_eq!(r.current_system, a.to_string());

    // Not in the store and no substituter: web-0 keeps running a.
    let missing = StorePath::parse(&format!(
        "/nix/store/{}-nixos-system-missing",
        "b".repeat(32)
    ))
    .unwrap();
    sets.send_replace(Some(VmAssignments {
        vms: vec![vm("web-0", &missing, "d-2")],
    }));
    assert_eq!(next(&mut outcomes).await, Outcome::Unchanged);
    assert_eq!(f.pid("web-0").await, Some(pid));
    // The new deployment failed at copying; what keeps running is not news.
    let r = result(results.recv().await.unwrap());
    assert_eq!(
        (r.deployment_id.as_str(), r.state(), r.failed_phase()),
        ("d-2", MachineState::Failed, MachineState::Copying)
    );
    assert!(r.reason.contains("no --substituter"), "{}", r.reason);
    assert!(results.try_recv().is_err(), "one result only");

    // The empty set removes it.
    sets.send_replace(Some(VmAssignments { vms: Vec::new() }));
    assert_eq!(next(&mut outcomes).await, Outcome::Removed);
    assert_eq!(f.pid("web-0").await, None);

    cancel.cancel();
    running.await.unwrap();
}

#[test]
fn outcomes_are_reported_for_the_rows_sent_only() {
    let closure =
        StorePath::parse(&format!("/nix/store/{}-nixos-system-a", "c".repeat(32))).unwrap();
    let sent = Assignment {
        instance: MachineName::parse("app").unwrap(),
        closure,
        demand: Demand::default(),
        deployment_id: "d-3".into(),
        guest_agent_connected: true,
        auto_rollback: true,
    };
    match report(&sent, &Outcome::InPlace) {
        Some(agent_message::Kind::VmInPlace(v)) => {
            assert_eq!(
                (v.instance.as_str(), v.deployment_id.as_str()),
                ("app", "d-3")
            );
        }
        other => panic!("expected VmInPlace, got {other:?}"),
    }
    let state = |outcome| report(&sent, &outcome).map(result).map(|r| r.state());
    assert_eq!(state(Outcome::Unchanged), Some(MachineState::Skipped));
    let restarted = Outcome::Restarted {
        why: "its kernel changed".into(),
    };
    let said = report(&sent, &restarted).map(result).unwrap();
    assert_eq!(said.state(), MachineState::Succeeded);
    assert_eq!(said.reason, "restarted: its kernel changed");
    let rolled = report(
        &sent,
        &Outcome::RolledBack {
            reason: "no".into(),
        },
    )
    .map(result)
    .unwrap();
    assert_eq!(
        (
            rolled.state(),
            rolled.failed_phase(),
            rolled.reason.as_str()
        ),
        (MachineState::RolledBack, MachineState::Activating, "no")
    );
    assert!(report(&sent, &Outcome::Removed).is_none());
    // What only keeps running has no deployment to report to.
    let kept = Assignment {
        deployment_id: String::new(),
        ..sent
    };
    assert!(report(&kept, &Outcome::Started).is_none());
}

/// A chroot store of the test's own: closures are real store paths there,
/// and collecting its garbage touches nothing else.
struct ChrootStore {
    root: PathBuf,
    conf: PathBuf,
}

impl ChrootStore {
    fn new(dir: &std::path::Path) -> Self {
        let conf = dir.join("nix-conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("nix.conf"),
            "experimental-features = nix-command\nbuild-users-group =\nsubstituters =\n",
        )
        .unwrap();
        Self {
            root: dir.join("store-root"),
            conf,
        }
    }

    fn uri(&self) -> String {
        format!("local?root={}", self.root.display())
    }

    fn nix_store(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("nix-store")
            .env("NIX_CONF_DIR", &self.conf)
            .args(["--store", &self.uri()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nix-store {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn has(&self, path: &StorePath) -> bool {
        self.root
            .join(path.as_str().trim_start_matches('/'))
            .exists()
    }
}

#[tokio::test]
async fn a_running_vms_closure_survives_garbage_collection_until_it_is_removed() {
    let f = Fixture::new();
    let _guard = f.guard("web-0");
    let store = ChrootStore::new(f.dir.path());
    // The fixture's closure folder, added to the chroot store for real.
    let folder = f.closure("a", true);
    let added = store.nix_store(&[
        "--add",
        f.dir
            .path()
            .join("root")
            .join(folder.as_str().trim_start_matches('/'))
            .to_str()
            .unwrap(),
    ]);
    let closure = StorePath::parse(added.trim()).unwrap();

    let mut host = VmHost::new(
        crate::vm::qemu::Qemu {
            prefix: vec!["unshare".into(), "--net".into(), "--".into()],
            ..crate::vm::qemu::Qemu::new(crate::vm::qemu::Accel::detect())
        },
        f.dir.path().join("vms"),
        store.root.clone(),
    );
    // The test guest ignores the power button.
    host.shutdown_grace = Duration::from_millis(500);
    let (reports, mut outcomes) = mpsc::channel(4);
    let runner = Runner {
        host,
        nix: Nix::new()
            .with_env("NIX_CONF_DIR", &store.conf)
            .with_option("store", store.uri()),
        substituters: Vec::new(),
        trusted_public_keys: Vec::new(),
        intents: no_intent_keys(f.dir.path()),
        results: None,
        outcomes: Some(reports),
        gc_roots: true,
    };
    let (sets, rx) = watch::channel(None);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runner.run(rx, cancel.clone()));

    sets.send_replace(Some(VmAssignments {
        vms: vec![vm("web-0", &closure, "d-1")],
    }));
    assert_eq!(next(&mut outcomes).await, Outcome::Started);
    store.nix_store(&["--gc"]);
    assert!(
        store.has(&closure),
        "the running VM's closure was collected"
    );

    sets.send_replace(Some(VmAssignments { vms: Vec::new() }));
    assert_eq!(next(&mut outcomes).await, Outcome::Removed);
    store.nix_store(&["--gc"]);
    assert!(!store.has(&closure), "a removed VM's closure stays rooted");

    cancel.cancel();
    running.await.unwrap();
}

/// A host that trusts its control plane, as one without intent keys does.
fn no_intent_keys(dir: &std::path::Path) -> Arc<IntentPolicy> {
    Arc::new(IntentPolicy::load(Vec::new(), dir).unwrap())
}

#[tokio::test]
async fn with_intent_keys_an_instance_runs_only_as_its_statement_says() {
    use procurator_core::intent::{Intent, SigningKey, VmIntent};
    let f = Fixture::new();
    let a = f.closure("a", true);
    let ci = SigningKey::generate("ci-1").unwrap();
    let runner = Runner {
        host: Fixture::host(f.dir.path()),
        nix: Nix::new(),
        substituters: Vec::new(),
        trusted_public_keys: Vec::new(),
        intents: Arc::new(IntentPolicy::load(vec![ci.public_key()], f.dir.path()).unwrap()),
        results: None,
        outcomes: None,
        gc_roots: false,
    };
    let statement = ci
        .sign(&Intent {
            name: MachineName::parse("web-0").unwrap(),
            closure: a.clone(),
            git_commit: "0123456789abcdef".to_owned().try_into().unwrap(),
            issued_at_ms: 1_000,
            health_checks: Vec::new(),
            auto_rollback: false,
            allow_reboot: false,
            confirm_timeout_secs: 0,
            vm: Some(VmIntent {
                machine: MachineName::parse("web").unwrap(),
                milli_cpus: 500,
                memory_bytes: 128 << 20,
            }),
        })
        .unwrap();
    // The control plane says web-0 is twice as big and rolls back; the
    // statement says otherwise. web-1 comes with no statement at all.
    let mut signed = vm("web-0", &a, "d-1");
    signed.intent = statement.as_str().to_owned();
    let unsigned = vm("web-1", &a, "d-1");
    let set = VmAssignments {
        vms: vec![signed, unsigned],
    };
    let (wanted, refused) = runner.prepare(&set).await;
    assert_eq!(wanted.len(), 1, "{wanted:?}");
    assert_eq!(wanted[0].instance.as_str(), "web-0");
    assert_eq!(
        wanted[0].demand,
        Demand {
            milli_cpus: 500,
            memory_bytes: 128 << 20
        }
    );
    assert!(!wanted[0].auto_rollback);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].instance.as_str(), refused[0].state()),
        ("web-1", MachineState::Failed)
    );
    assert!(
        refused[0]
            .reason
            .starts_with("intent refused: the control plane sent no signed statement"),
        "{}",
        refused[0].reason
    );
}
