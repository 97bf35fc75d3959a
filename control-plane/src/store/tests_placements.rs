//! VM instances placed when a deployment is submitted.

use procurator_proto::v1::{Event, Hello, VmHostCapacity, VmsPlaced, event};

use super::Store;
use super::tests::{COMMIT_A, COMMIT_B, all_events, m, open, schedule};
use crate::test_support::artifact_with;

const GIB: u64 = 1 << 30;

async fn connect_host(store: &Store, name: &str, cpus: u64, gib: u64) {
    let hello = Hello {
        vm_host: Some(VmHostCapacity {
            milli_cpus: cpus * 1000,
            memory_bytes: gib * GIB,
            labels: Vec::new(),
            vmm: "cloud-hypervisor".into(),
        }),
        ..Default::default()
    };
    store.agent_connected(m(name), hello, None).await.unwrap();
}

/// `web` with `replicas`, 1 CPU and 1 GB each (the test artifact's size).
async fn submit(store: &Store, commit: &str, replicas: &[(&str, u32)]) {
    let machines: Vec<(&str, &str)> = replicas.iter().map(|(m, _)| (*m, "sys")).collect();
    let (mut parsed, _) = artifact_with(commit, &machines, "");
    for (name, n) in replicas {
        parsed.blueprint.get_mut(&m(name)).unwrap().replicas = *n;
    }
    let json = parsed.canonical_json();
    store
        .submit(parsed, json, "ci".into(), false, Vec::new())
        .await
        .unwrap();
}

fn placed(events: &[Event]) -> Vec<VmsPlaced> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::VmsPlaced(p)) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Instance → the reason on its row in the newest deployment.
/// The newest deployment, with its rows.
async fn newest(store: &Store) -> procurator_proto::v1::Deployment {
    let id = store.list_deployments(1).await.unwrap().remove(0).id;
    let id = procurator_core::DeploymentId::parse(&id).unwrap();
    store.get_deployment(id).await.unwrap().unwrap()
}

async fn row_reasons(store: &Store) -> std::collections::BTreeMap<String, String> {
    newest(store)
        .await
        .machines
        .into_iter()
        .map(|row| (row.machine, row.reason))
        .collect()
}

fn host_of(p: &VmsPlaced, instance: &str) -> String {
    p.placements
        .iter()
        .find(|v| v.instance == instance)
        .map(|v| v.host.clone())
        .unwrap_or_else(|| panic!("{instance} not placed: {p:?}"))
}

#[tokio::test]
async fn without_a_vm_host_nothing_is_placed() {
    let (_dir, store) = open();
    submit(&store, COMMIT_A, &[("web", 2)]).await;
    assert!(placed(&all_events(&store).await).is_empty());
}

#[tokio::test]
async fn replicas_are_spread_kept_in_place_and_removed_with_their_machine() {
    let (_dir, store) = open();
    connect_host(&store, "host-a", 4, 8).await;
    connect_host(&store, "host-b", 4, 8).await;
    submit(&store, COMMIT_A, &[("web", 2), ("db", 1)]).await;
    let first = placed(&all_events(&store).await).remove(0);
    assert!(first.unplaced.is_empty(), "{first:?}");
    assert_ne!(host_of(&first, "web-0"), host_of(&first, "web-1"));
    assert_eq!(first.placements.len(), 3);

    let agents = store.all_agents().await.unwrap();
    let vms: usize = agents.iter().map(|a| a.vms.len()).sum();
    assert_eq!(vms, 3);
    // Nothing runs before its row is sent; once sent (the hosts make the
    // instances reachable), each host is told its instances, with the
    // closure of the instance's row.
    assert!(store.vm_assignments(m("host-a")).await.unwrap().is_empty());
    assert_eq!(schedule(&store).await.len(), 3);
    let told: Vec<String> = [m("host-a"), m("host-b")]
        .into_iter()
        .map(|host| store.vm_assignments(host))
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .flat_map(|set| set.unwrap())
        .inspect(|vm| assert!(vm.closure.ends_with("-sys"), "{vm:?}"))
        .inspect(|vm| assert!(!vm.no_auto_rollback, "the blueprint's default: {vm:?}"))
        .map(|vm| vm.instance)
        .collect();
    assert_eq!(told.len(), 3, "{told:?}");
    // The deployment tracks the instances, not the machine.
    let d = newest(&store).await;
    let rows: Vec<&str> = d.machines.iter().map(|r| r.machine.as_str()).collect();
    assert_eq!(rows, ["db", "web-0", "web-1"]);
    let free_memory: u64 = agents
        .iter()
        .map(|a| a.vm_free.as_ref().unwrap().memory_bytes)
        .sum();
    // 1 GB each, in whole 2 MiB pages.
    let vm = procurator_core::artifact::vm_memory_bytes(1_000_000_000);
    assert_eq!(free_memory, 16 * GIB - 3 * vm);

    // A later deployment of the same machines keeps every instance where it was.
    submit(&store, COMMIT_B, &[("web", 2), ("db", 1)]).await;
    let second = placed(&all_events(&store).await).remove(1);
    for instance in ["web-0", "web-1", "db"] {
        assert_eq!(host_of(&second, instance), host_of(&first, instance));
    }

    // db leaves the blueprint: its placement goes with it.
    submit(
        &store,
        "cccccccccccccccccccccccccccccccccccccccc",
        &[("web", 2)],
    )
    .await;
    let third = placed(&all_events(&store).await).remove(2);
    assert_eq!(third.placements.len(), 2, "{third:?}");
    let agents = store.all_agents().await.unwrap();
    assert!(
        agents
            .iter()
            .flat_map(|a| &a.vms)
            .all(|v| v.machine == "web")
    );
}

#[tokio::test]
async fn what_the_hosts_cannot_hold_is_reported_unplaced() {
    let (_dir, store) = open();
    // Room for two 1 GB instances, not three.
    connect_host(&store, "host-a", 2, 2).await;
    submit(&store, COMMIT_A, &[("web", 3)]).await;
    let p = placed(&all_events(&store).await).remove(0);
    assert_eq!(p.placements.len(), 2, "{p:?}");
    assert_eq!(p.unplaced.len(), 1, "{p:?}");
    assert_eq!(p.unplaced[0].machine, "web");
    assert!(
        p.unplaced[0]
            .reason
            .contains("no VM host has that much free"),
        "{p:?}"
    );
    // The instance's row waits, and says why.
    let reasons = row_reasons(&store).await;
    let unplaced = &p.unplaced[0].instance;
    assert_eq!(
        reasons[unplaced],
        format!("not placed: {}", p.unplaced[0].reason)
    );
    for placed in &p.placements {
        assert_eq!(reasons[&placed.instance], "", "{reasons:?}");
    }
}

#[tokio::test]
async fn a_host_that_comes_later_gets_the_vms_that_had_no_room() {
    let (_dir, store) = open();
    // Room for one of the two 1 GB replicas.
    connect_host(&store, "host-a", 2, 1).await;
    submit(&store, COMMIT_A, &[("web", 2)]).await;
    let first = placed(&all_events(&store).await).remove(0);
    assert_eq!(
        (first.placements.len(), first.unplaced.len()),
        (1, 1),
        "{first:?}"
    );
    // The same hosts again: nothing changes, nothing is written.
    assert!(!store.replace_vms().await.unwrap());
    assert_eq!(placed(&all_events(&store).await).len(), 1);

    connect_host(&store, "host-b", 2, 1).await;
    assert!(store.replace_vms().await.unwrap());
    let second = placed(&all_events(&store).await).remove(1);
    assert!(second.unplaced.is_empty(), "{second:?}");
    // Placed now: the row no longer says it has no host.
    let reasons = row_reasons(&store).await;
    assert!(reasons.values().all(String::is_empty), "{reasons:?}");
    assert_eq!(second.placements.len(), 2);
    // The one placed before stays where it was.
    let kept = &first.placements[0];
    assert_eq!(host_of(&second, &kept.instance), kept.host);
    assert!(!store.replace_vms().await.unwrap());
}

#[tokio::test]
async fn a_host_is_told_each_vms_auto_rollback() {
    let (_dir, store) = open();
    connect_host(&store, "host-a", 4, 8).await;
    let (mut parsed, _) = artifact_with(COMMIT_A, &[("web", "sys"), ("db", "sys")], "");
    parsed
        .blueprint
        .get_mut(&m("db"))
        .unwrap()
        .deployment
        .auto_rollback = false;
    let json = parsed.canonical_json();
    store
        .submit(parsed, json, "ci".into(), false, Vec::new())
        .await
        .unwrap();
    schedule(&store).await;
    let told: std::collections::BTreeMap<String, bool> = store
        .vm_assignments(m("host-a"))
        .await
        .unwrap()
        .into_iter()
        .map(|vm| (vm.instance, !vm.no_auto_rollback))
        .collect();
    assert_eq!(
        told,
        std::collections::BTreeMap::from([("db".to_owned(), false), ("web".to_owned(), true)])
    );
}
