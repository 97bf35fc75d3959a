//! The runner fed like the connection feeds it, with real QEMU.

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
        results: Some(results_tx),
        outcomes: Some(reports),
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
    assert_eq!(state(Outcome::Restarted), Some(MachineState::Succeeded));
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
