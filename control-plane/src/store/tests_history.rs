//! One machine across deployments (`machine_history`, `machine_log`),
//! against both engines.

use procurator_core::DeploymentId;
use procurator_proto::v1::{ActivationResult, DeploymentState, MachineState, Progress};
use tokio_util::sync::CancellationToken;

use super::tests::{m, open, submit};
use super::{LogLookup, Retention, Store};

async fn report(
    store: &Store,
    machine: &str,
    id: &DeploymentId,
    state: MachineState,
    output: &str,
) {
    let progress = Progress {
        deployment_id: id.to_string(),
        state: MachineState::Copying as i32,
        ..Default::default()
    };
    store
        .record_progress(m(machine), id.clone(), MachineState::Copying, progress)
        .await
        .unwrap();
    let result = ActivationResult {
        deployment_id: id.to_string(),
        state: state as i32,
        output: output.into(),
        ..Default::default()
    };
    store
        .record_result(m(machine), id.clone(), state, result)
        .await
        .unwrap();
}

/// Deployment `i` (from 0) of web-1 and web-2, superseding what is unfinished.
async fn deploy(store: &Store, i: usize) -> DeploymentId {
    let commit = format!("{:040x}", i + 1);
    let system = format!("sys-{i}");
    let machines = [("web-1", system.as_str()), ("web-2", system.as_str())];
    submit(store, &commit, &machines).await.id
}

/// Three deployments: web-1 succeeded in the first, rolled back in the
/// second, and has not begun the third.
async fn three_deployments(store: &Store) -> Vec<DeploymentId> {
    let first = deploy(store, 0).await;
    report(
        store,
        "web-1",
        &first,
        MachineState::Succeeded,
        "log of the first",
    )
    .await;
    let second = deploy(store, 1).await;
    report(
        store,
        "web-1",
        &second,
        MachineState::RolledBack,
        "log of the second",
    )
    .await;
    vec![first, second, deploy(store, 2).await]
}

async fn found(store: &Store, machine: &str, id: Option<&DeploymentId>) -> LogLookup {
    store.machine_log(m(machine), id.cloned()).await.unwrap()
}

#[tokio::test]
async fn a_machines_deployments_page_newest_first_with_how_each_ended() {
    let (_dir, store) = open();
    let ids = three_deployments(&store).await;

    let first = store.machine_history(m("web-1"), None, 2).await.unwrap();
    let listed: Vec<&str> = first
        .items
        .iter()
        .map(|e| e.deployment_id.as_str())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let token = first.next_after.clone().expect("a second page");
    let newest = &first.items[0];
    assert_eq!(newest.git_commit, format!("{:040x}", 3));
    assert_eq!(newest.submitted_by, "ci-bot");
    assert_eq!(newest.deployment_state(), DeploymentState::Running);
    assert_eq!(
        newest.status.as_ref().unwrap().state(),
        MachineState::Pending
    );
    assert_eq!((newest.started_at_ms, newest.has_log), (0, false));
    let rolled_back = &first.items[1];
    assert_eq!(
        rolled_back.status.as_ref().unwrap().state(),
        MachineState::RolledBack
    );
    assert!(rolled_back.has_log);
    assert!(rolled_back.started_at_ms > 0);
    assert!(rolled_back.started_at_ms <= rolled_back.status.as_ref().unwrap().updated_at_ms);

    let before = token.parse().unwrap();
    let second = store
        .machine_history(m("web-1"), Some(before), 2)
        .await
        .unwrap();
    let listed: Vec<&str> = second
        .items
        .iter()
        .map(|e| e.deployment_id.as_str())
        .collect();
    assert_eq!(listed, [ids[0].as_str()]);
    assert_eq!(second.next_after, None);
    let oldest = second.items[0].status.as_ref().unwrap();
    assert!(oldest.closure.ends_with("-sys-0"), "{}", oldest.closure);
    assert_eq!(oldest.state(), MachineState::Succeeded);

    let unknown = store.machine_history(m("db-1"), None, 10).await.unwrap();
    assert!(unknown.items.is_empty() && unknown.next_after.is_none());
}

#[tokio::test]
async fn a_machines_output_is_found_by_deployment_or_newest_and_says_when_missing() {
    let (_dir, store) = open();
    let ids = three_deployments(&store).await;

    let LogLookup::Found(newest) = found(&store, "web-1", None).await else {
        panic!("no newest log");
    };
    assert_eq!(newest.deployment_id, ids[1].as_str());
    assert_eq!(newest.state(), MachineState::RolledBack);
    assert_eq!(newest.output, "log of the second");
    let LogLookup::Found(first) = found(&store, "web-1", Some(&ids[0])).await else {
        panic!("no first log");
    };
    assert_eq!(first.output, "log of the first");
    // The newest deployment has a row for web-1, but no result yet.
    let LogLookup::NoOutput(pending) = found(&store, "web-1", Some(&ids[2])).await else {
        panic!("a pending row has output");
    };
    assert_eq!(pending.state(), MachineState::Pending);
    // web-2 never reported: its newest row, without output.
    let LogLookup::NoOutput(web2) = found(&store, "web-2", None).await else {
        panic!("web-2 has output");
    };
    assert_eq!(web2.deployment_id, ids[2].as_str());
    assert_eq!(found(&store, "db-1", None).await, LogLookup::NoRow);
    assert_eq!(found(&store, "db-1", Some(&ids[0])).await, LogLookup::NoRow);
}

#[tokio::test]
async fn output_sent_after_the_row_ended_is_kept_and_pruned_with_its_deployment() {
    let (_dir, store) = open();
    let ids = [deploy(&store, 0).await, deploy(&store, 1).await];
    // The first deployment was superseded by the second: web-2's late
    // result changes no row, but it ran there and its output is kept.
    report(
        &store,
        "web-2",
        &ids[0],
        MachineState::Succeeded,
        "late but real",
    )
    .await;
    let LogLookup::Found(late) = found(&store, "web-2", Some(&ids[0])).await else {
        panic!("the late output was dropped");
    };
    assert_eq!(late.output, "late but real");
    assert_eq!(late.state(), MachineState::Superseded);

    let retention = Retention {
        deployments: 1,
        ..Retention::default()
    };
    for _ in 0..100 {
        let pruned = store
            .prune(retention, &CancellationToken::new())
            .await
            .unwrap();
        if pruned == super::Pruned::default() {
            break;
        }
    }
    assert_eq!(
        found(&store, "web-2", Some(&ids[0])).await,
        LogLookup::NoRow
    );
    assert_eq!(store.kept_logs().await.unwrap(), 0);
}
