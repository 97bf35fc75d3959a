//! The runner fed like the connection feeds it, with real QEMU.

use std::time::Duration;

use procurator_proto::v1::VmAssignment;

use super::*;
use crate::vm::host::tests::Fixture;

fn vm(instance: &str, closure: &StorePath) -> VmAssignment {
    VmAssignment {
        instance: instance.into(),
        machine: instance.into(),
        closure: closure.to_string(),
        milli_cpus: 1000,
        memory_bytes: 256 << 20,
        ..Default::default()
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
    let runner = Runner {
        host: Fixture::host(f.dir.path()),
        nix: Nix::new(),
        substituters: Vec::new(),
        trusted_public_keys: Vec::new(),
        outcomes: Some(reports),
    };
    let (sets, rx) = watch::channel(None);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(runner.run(rx, cancel.clone()));

    sets.send_replace(Some(VmAssignments {
        vms: vec![vm("web-0", &a)],
    }));
    assert_eq!(next(&mut outcomes).await, Outcome::Started);
    let pid = f.pid("web-0").await.expect("web-0 runs");

    // Not in the store and no substituter: web-0 keeps running a.
    let missing = StorePath::parse(&format!(
        "/nix/store/{}-nixos-system-missing",
        "b".repeat(32)
    ))
    .unwrap();
    sets.send_replace(Some(VmAssignments {
        vms: vec![vm("web-0", &missing)],
    }));
    assert_eq!(next(&mut outcomes).await, Outcome::Unchanged);
    assert_eq!(f.pid("web-0").await, Some(pid));

    // The empty set removes it.
    sets.send_replace(Some(VmAssignments { vms: Vec::new() }));
    assert_eq!(next(&mut outcomes).await, Outcome::Removed);
    assert_eq!(f.pid("web-0").await, None);

    cancel.cancel();
    running.await.unwrap();
}
