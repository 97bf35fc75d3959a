//! `Store::running`: what each machine runs, against both engines.

use procurator_core::artifact::MachineSpec;
use procurator_proto::v1::{Hello, MachineState, RunningMachine};

use super::tests::{COMMIT_A, COMMIT_B, m, open, result, submit};
use super::{RunningPage, Store};

fn closure(name: &str) -> String {
    format!("/nix/store/{}-{name}", "a".repeat(32))
}

async fn all(store: &Store) -> RunningPage {
    store.running(String::new(), 1000).await.unwrap()
}

fn row<'a>(page: &'a RunningPage, name: &str) -> Option<&'a RunningMachine> {
    page.machines.iter().find(|r| r.machine == name)
}

#[tokio::test]
async fn what_runs_is_what_the_agent_reports_else_what_last_succeeded() {
    let (_dir, store) = open();
    let machines = [("web-1", "sys-a"), ("web-2", "sys-a"), ("web-3", "sys-a")];
    let a = submit(&store, COMMIT_A, &machines).await;
    // web-1's agent runs something nobody deployed (a local rebuild).
    let manual = format!("/nix/store/{}-manual", "b".repeat(32));
    let hello = Hello {
        current_system: manual.clone(),
        ..Hello::default()
    };
    store
        .agent_connected(m("web-1"), hello, None)
        .await
        .unwrap();
    let mut agents = store.all_agents().await.unwrap();
    assert_eq!(agents.pop().map(|a| a.current_system), Some(manual.clone()));
    // Results from machines without agent rows report nothing themselves.
    result(&store, "web-2", &a.id, MachineState::Succeeded).await;
    result(&store, "web-3", &a.id, MachineState::RolledBack).await;

    // B is cancelled before anything ran: A stays in force.
    let b = submit(
        &store,
        COMMIT_B,
        &[("web-1", "sys-b"), ("web-2", "sys-b"), ("web-4", "sys-b")],
    )
    .await;
    store.cancel(b.id.clone(), "test".into()).await.unwrap();

    let page = all(&store).await;
    assert_eq!(page.in_force, Some((a.id.to_string(), COMMIT_A.to_owned())));
    assert_eq!(page.next_after, None);
    let names: Vec<&str> = page.machines.iter().map(|r| r.machine.as_str()).collect();
    // web-4 was only ever in the cancelled deployment: nothing runs there.
    assert_eq!(names, ["web-1", "web-2", "web-3"]);

    let web1 = row(&page, "web-1").unwrap();
    assert_eq!(web1.closure, manual);
    assert!(web1.reported_by_agent);
    // Nothing succeeded on web-1 (its result was never reported).
    assert_eq!(web1.deployment_id, "");
    assert!(web1.in_force);

    let web2 = row(&page, "web-2").unwrap();
    assert_eq!(web2.closure, closure("sys-a"));
    assert!(!web2.reported_by_agent);
    assert_eq!(web2.deployment_id, a.id.to_string());
    assert_eq!(web2.blueprint_machine, "web-2");
    let spec: MachineSpec = serde_json::from_str(&web2.spec_json).unwrap();
    assert_eq!(spec.role, "worker");

    // Rolled back, no agent seen: unknown, but the deployment in force has it.
    let web3 = row(&page, "web-3").unwrap();
    assert_eq!((web3.closure.as_str(), web3.spec_json.as_str()), ("", ""));
    assert_eq!(web3.blueprint_machine, "web-3");
    assert!(web3.in_force);
}

#[tokio::test]
async fn the_newest_success_wins_and_pages_follow_names() {
    let (_dir, store) = open();
    let a = submit(
        &store,
        COMMIT_A,
        &[("m-1", "one"), ("m-2", "one"), ("m-3", "one")],
    )
    .await;
    for name in ["m-1", "m-2", "m-3"] {
        result(&store, name, &a.id, MachineState::Succeeded).await;
    }
    let b = submit(&store, COMMIT_B, &[("m-1", "two"), ("m-2", "two")]).await;
    result(&store, "m-1", &b.id, MachineState::Succeeded).await;
    result(&store, "m-2", &b.id, MachineState::RolledBack).await;

    let first = store.running(String::new(), 2).await.unwrap();
    let names: Vec<&str> = first.machines.iter().map(|r| r.machine.as_str()).collect();
    assert_eq!(names, ["m-1", "m-2"]);
    assert_eq!(first.next_after.as_deref(), Some("m-2"));
    assert_eq!(row(&first, "m-1").unwrap().closure, closure("two"));
    assert_eq!(row(&first, "m-1").unwrap().deployment_id, b.id.to_string());
    // m-2 rolled back to what A put there.
    assert_eq!(row(&first, "m-2").unwrap().closure, closure("one"));
    assert_eq!(row(&first, "m-2").unwrap().deployment_id, a.id.to_string());

    let second = store.running("m-2".into(), 2).await.unwrap();
    let m3 = row(&second, "m-3").unwrap();
    assert_eq!(second.machines.len(), 1);
    assert_eq!(second.next_after, None);
    // Left out of B, which is in force: still runs A's closure.
    assert_eq!(
        (m3.closure.as_str(), m3.in_force),
        (closure("one").as_str(), false)
    );
    assert_eq!(
        second.in_force,
        Some((b.id.to_string(), COMMIT_B.to_owned()))
    );

    let empty = store.running("m-3".into(), 2).await.unwrap();
    assert!(empty.machines.is_empty() && empty.next_after.is_none());
}
