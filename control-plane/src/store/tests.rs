//! The store against real SQLite in a temporary directory.

use procurator_core::{DeploymentId, MachineName};
use procurator_proto::v1::{
    ActivationResult, CopyProgress, DeploymentState, Event, Hello, MachineState, Progress, event,
};

use procurator_proto::v1::DesiredState;

use super::deployments::Submitted;
use super::{Outbound, ResultOutcome, Store};
use crate::test_support::artifact;

pub(super) const COMMIT_A: &str = "aaaaaaa0000000000000000000000000000000aa";
pub(super) const COMMIT_B: &str = "bbbbbbb0000000000000000000000000000000bb";

/// A store on a new database of the engine under test (see `test_db.rs`).
pub(super) fn open() -> (super::test_db::TestDb, Store) {
    super::test_db::TestDb::open()
}

pub(super) fn m(name: &str) -> MachineName {
    MachineName::parse(name).unwrap()
}

pub(super) async fn submit(store: &Store, commit: &str, machines: &[(&str, &str)]) -> Submitted {
    let (parsed, json) = artifact(commit, machines);
    store
        .submit(parsed, json, "ci-bot".into(), false, Vec::new())
        .await
        .unwrap()
}

/// Connect `machine`'s agent (a new generation each time) and run the
/// scheduler; returns who is to be sent a desired state.
pub(super) async fn connect_and_schedule(store: &Store, machine: &str) -> Vec<MachineName> {
    store
        .agent_connected(m(machine), Hello::default(), None)
        .await
        .unwrap();
    schedule(store).await
}

/// Run the scheduler; returns who is to be sent a desired state. Each
/// message is checked to be exactly what the machine's agent would be sent
/// on reconnecting, the read path.
pub(super) async fn schedule(store: &Store) -> Vec<MachineName> {
    let mut names = Vec::new();
    for scheduled in store.schedule(super::Scope::Full).await.unwrap() {
        let reread = store.desired(scheduled.machine.clone()).await.unwrap();
        assert_eq!(
            reread,
            Some((scheduled.outbound, scheduled.order)),
            "{}",
            scheduled.machine
        );
        names.push(scheduled.machine);
    }
    names
}

pub(super) async fn desired(store: &Store, machine: &str) -> Option<DesiredState> {
    match store.take_desired(m(machine)).await.unwrap() {
        Some(Outbound::Desired(d)) => Some(d),
        Some(other) => panic!("not a desired state: {other:?}"),
        None => None,
    }
}

pub(super) async fn result(
    store: &Store,
    machine: &str,
    id: &DeploymentId,
    state: MachineState,
) -> ResultOutcome {
    let report = ActivationResult {
        deployment_id: id.to_string(),
        state: state as i32,
        reason: format!("{state}"),
        current_system: "/nix/store/current".into(),
        ..Default::default()
    };
    store
        .record_result(m(machine), id.clone(), state, report)
        .await
        .unwrap()
}

pub(super) async fn all_events(store: &Store) -> Vec<Event> {
    store.events_after(0, None, usize::MAX).await.unwrap()
}

pub(super) async fn machine_state(store: &Store, id: &DeploymentId, machine: &str) -> MachineState {
    let d = store.get_deployment(id.clone()).await.unwrap().unwrap();
    let row = d.machines.iter().find(|r| r.machine == machine).unwrap();
    row.state()
}

#[tokio::test]
async fn submit_stores_pending_rows_and_an_event() {
    let (_dir, store) = open();
    let s = submit(&store, COMMIT_A, &[("web-1", "sys-a"), ("web-2", "sys-a")]).await;
    assert!(s.created);
    assert!(s.id.as_str().starts_with("d-"));

    let d = store.get_deployment(s.id.clone()).await.unwrap().unwrap();
    assert_eq!(d.git_commit, COMMIT_A);
    assert_eq!(d.state(), DeploymentState::Running);
    assert_eq!(d.submitted_by, "ci-bot");
    assert_eq!(d.machines.len(), 2);
    assert!(
        d.machines
            .iter()
            .all(|r| r.state() == MachineState::Pending)
    );

    let events = all_events(&store).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].revision, s.revision);
    assert_eq!(events[0].deployment_id, s.id.as_str());
    let Some(event::Kind::Submitted(sub)) = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(sub.machines, vec!["web-1", "web-2"]);
}

#[tokio::test]
async fn the_same_artifact_twice_is_one_deployment() {
    let (_dir, store) = open();
    let first = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
    let again = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
    assert!(!again.created);
    assert_eq!((again.id, again.revision), (first.id, first.revision));
    assert_eq!(store.list_deployments(50).await.unwrap().len(), 1);
    assert_eq!(all_events(&store).await.len(), 1);
}

#[tokio::test]
async fn desired_state_moves_pending_to_sent_once() {
    let (_dir, store) = open();
    let s = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
    // Not connected: it waits in PENDING.
    assert!(schedule(&store).await.is_empty());
    assert!(desired(&store, "web-1").await.is_none());
    assert_eq!(connect_and_schedule(&store, "web-1").await, [m("web-1")]);
    let desired = desired(&store, "web-1").await.unwrap();
    assert_eq!(desired.deployment_id, s.id.as_str());
    assert!(desired.closure.ends_with("-sys-a"));
    assert_eq!(desired.health_checks.len(), 1);
    assert_eq!(
        machine_state(&store, &s.id, "web-1").await,
        MachineState::Sent
    );

    // Sent again on reconnect, without another state change.
    assert!(connect_and_schedule(&store, "web-1").await.is_empty());
    assert!(store.take_desired(m("web-1")).await.unwrap().is_some());
    let events = all_events(&store).await;
    let sent = events
        .iter()
        .filter(
            |e| matches!(&e.kind, Some(event::Kind::Machine(u)) if u.state() == MachineState::Sent),
        )
        .count();
    assert_eq!(sent, 1, "{events:?}");
    assert!(store.take_desired(m("nobody")).await.unwrap().is_none());
}

#[tokio::test]
async fn results_finish_the_deployment() {
    let (_dir, store) = open();
    let s = submit(&store, COMMIT_A, &[("web-1", "sys-a"), ("web-2", "sys-a")]).await;
    let progress = Progress {
        deployment_id: s.id.to_string(),
        state: MachineState::Copying as i32,
        copy: Some(CopyProgress {
            bytes_done: 10,
            bytes_expected: 20,
            paths_done: 1,
            paths_expected: 2,
        }),
        message: "copying".into(),
    };
    assert!(
        store
            .record_progress(
                m("web-1"),
                s.id.clone(),
                MachineState::Copying,
                progress.clone()
            )
            .await
            .unwrap()
    );

    let first = result(&store, "web-1", &s.id, MachineState::Succeeded).await;
    assert_eq!(first, ResultOutcome::Recorded { finished: None });
    let last = result(&store, "web-2", &s.id, MachineState::RolledBack).await;
    assert_eq!(
        last,
        ResultOutcome::Recorded {
            finished: Some(DeploymentState::Failed)
        }
    );

    let d = store.get_deployment(s.id.clone()).await.unwrap().unwrap();
    assert_eq!(d.state(), DeploymentState::Failed);
    assert!(d.finished_at_ms > 0);
    let web1 = d.machines.iter().find(|r| r.machine == "web-1").unwrap();
    assert_eq!(web1.copy.map(|c| c.bytes_done), Some(10));

    // A final row no longer moves.
    assert!(
        !store
            .record_progress(m("web-1"), s.id.clone(), MachineState::Copying, progress)
            .await
            .unwrap()
    );
    assert_eq!(
        result(&store, "web-1", &s.id, MachineState::Failed).await,
        ResultOutcome::Stale
    );

    let events = all_events(&store).await;
    let Some(event::Kind::Finished(fin)) = &events.last().unwrap().kind else {
        panic!("{events:?}")
    };
    assert_eq!(fin.state(), DeploymentState::Failed);
    assert_eq!(fin.summary.get("succeeded"), Some(&1));
    assert_eq!(fin.summary.get("rolled-back"), Some(&1));

    let agents = store.all_agents().await.unwrap();
    assert!(
        agents.is_empty(),
        "results from unknown agents create no agent rows"
    );
}

#[tokio::test]
async fn a_newer_deployment_supersedes_unfinished_rows() {
    let (_dir, store) = open();
    let old = submit(&store, COMMIT_A, &[("web-1", "sys-a"), ("db-1", "sys-a")]).await;
    connect_and_schedule(&store, "web-1").await;
    let new = submit(&store, COMMIT_B, &[("web-1", "sys-b"), ("db-1", "sys-a")]).await;
    assert!(new.created);
    assert_ne!(old.id, new.id);

    for machine in ["web-1", "db-1"] {
        assert_eq!(
            machine_state(&store, &old.id, machine).await,
            MachineState::Superseded,
            "{machine}"
        );
    }
    assert_eq!(schedule(&store).await, [m("web-1")]);
    let desired = desired(&store, "web-1").await.unwrap();
    assert_eq!(desired.deployment_id, new.id.as_str());
    assert!(desired.closure.ends_with("-sys-b"));
    assert_eq!(
        store.deployment_state(old.id.clone()).await.unwrap(),
        Some(DeploymentState::Superseded)
    );
    // A late result for a superseded row changes nothing.
    assert_eq!(
        result(&store, "web-1", &old.id, MachineState::Succeeded).await,
        ResultOutcome::Stale
    );

    let listed = store.list_deployments(50).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, vec![new.id.as_str(), old.id.as_str()], "newest first");
    assert_eq!(store.list_deployments(1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_machine_left_out_of_the_newer_blueprint_is_superseded_too() {
    let (_dir, store) = open();
    let old = submit(&store, COMMIT_A, &[("web-1", "sys-a"), ("db-1", "sys-a")]).await;
    // db-1 is gone from the blueprint: its pending change is moot, and the
    // old deployment must not wait for it forever.
    let new = submit(&store, COMMIT_B, &[("web-1", "sys-b")]).await;
    assert_eq!(
        machine_state(&store, &old.id, "db-1").await,
        MachineState::Superseded
    );
    assert_eq!(
        store.deployment_state(old.id.clone()).await.unwrap(),
        Some(DeploymentState::Superseded)
    );
    let events = store
        .events_after(0, Some(old.id.clone()), 100)
        .await
        .unwrap();
    let said = events.iter().any(|e| match &e.kind {
        Some(event::Kind::Machine(u)) => {
            u.machine == "db-1"
                && u.message == format!("superseded by {}, which no longer has db-1", new.id)
        }
        _ => false,
    });
    assert!(said, "{events:?}");
}

#[tokio::test]
async fn superseding_every_row_finishes_the_older_deployment() {
    let (_dir, store) = open();
    let old = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
    submit(&store, COMMIT_B, &[("web-1", "sys-b")]).await;
    assert_eq!(
        store.deployment_state(old.id.clone()).await.unwrap(),
        Some(DeploymentState::Superseded)
    );
    let finished: Vec<Event> = store
        .events_after(0, Some(old.id.clone()), 100)
        .await
        .unwrap();
    let Some(event::Kind::Finished(fin)) = &finished.last().unwrap().kind else {
        panic!("{finished:?}")
    };
    assert_eq!(fin.state(), DeploymentState::Superseded);
    assert_eq!(fin.summary.get("superseded"), Some(&1));
}

#[tokio::test]
async fn events_are_monotonic_replayable_and_published_in_order() {
    let (_dir, store) = open();
    let mut live = store.subscribe();
    let a = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
    store.take_desired(m("web-1")).await.unwrap();
    let b = submit(&store, COMMIT_B, &[("web-1", "sys-b"), ("web-2", "sys-b")]).await;
    result(&store, "web-1", &b.id, MachineState::Succeeded).await;

    let events = all_events(&store).await;
    assert!(events.windows(2).all(|w| w[0].revision < w[1].revision));
    for expected in &events {
        // A shared engine publishes what its follower reads back: soon,
        // not at once.
        let published = tokio::time::timeout(std::time::Duration::from_secs(10), live.recv())
            .await
            .expect("published within 10 s")
            .unwrap();
        assert_eq!(&published, expected, "published as committed, in order");
    }
    assert!(live.try_recv().is_err());

    let middle = events[2].revision;
    let tail = store.events_after(middle, None, 100).await.unwrap();
    assert_eq!(tail, events[3..].to_vec());
    let paged = store.events_after(0, None, 2).await.unwrap();
    assert_eq!(paged, events[..2].to_vec());

    let only_a = store
        .events_after(0, Some(a.id.clone()), 100)
        .await
        .unwrap();
    assert!(!only_a.is_empty());
    assert!(only_a.iter().all(|e| e.deployment_id == a.id.as_str()));
}

#[tokio::test]
async fn a_replaced_connection_cannot_mark_its_successor_disconnected() {
    let (_dir, store) = open();
    let hello = Hello {
        current_system: "/nix/store/x".into(),
        agent_version: "1".into(),
        ..Default::default()
    };
    let first = store
        .agent_connected(m("web-1"), hello.clone(), None)
        .await
        .unwrap();
    let second = store
        .agent_connected(m("web-1"), hello.clone(), None)
        .await
        .unwrap();
    // Each connection of any machine gets a higher generation than any before.
    let other = store
        .agent_connected(m("web-2"), hello, None)
        .await
        .unwrap();
    assert!(first < second && second < other, "{first} {second} {other}");
    assert!(!store.agent_disconnected(m("web-1"), first).await.unwrap());
    assert!(store.all_agents().await.unwrap()[0].connected);
    assert!(store.agent_disconnected(m("web-1"), second).await.unwrap());
    let agents = store.all_agents().await.unwrap();
    assert!(!agents[0].connected);
    assert_eq!(agents[0].current_system, "/nix/store/x");
}

#[tokio::test]
async fn a_restart_keeps_history_and_disconnects_agents() {
    let dir = tempfile::tempdir().unwrap();
    let (id, before) = {
        let store = Store::open(dir.path()).unwrap();
        store
            .agent_connected(m("web-1"), Hello::default(), None)
            .await
            .unwrap();
        let s = submit(&store, COMMIT_A, &[("web-1", "sys-a")]).await;
        result(&store, "web-1", &s.id, MachineState::Succeeded).await;
        (s.id, all_events(&store).await)
    };

    let store = Store::open(dir.path()).unwrap();
    let d = store.get_deployment(id.clone()).await.unwrap().unwrap();
    assert_eq!(d.state(), DeploymentState::Succeeded);
    // Disconnecting is not an event: who is connected is the agents table's.
    assert_eq!(all_events(&store).await, before);
    let agents = store.all_agents().await.unwrap();
    assert!(!agents[0].connected);
    assert_eq!(agents[0].last_deployment_id, id.as_str());
    assert_eq!(agents[0].last_state(), MachineState::Succeeded);
    assert_eq!(agents[0].current_system, "/nix/store/current");

    // Resubmitting after the restart still dedupes.
    assert!(
        !submit(&store, COMMIT_A, &[("web-1", "sys-a")])
            .await
            .created
    );
}

#[tokio::test]
async fn a_failed_write_leaves_no_gap_in_the_revisions() {
    let (_dir, store) = open();
    let agent = || {
        event::Kind::Agent(procurator_proto::v1::AgentConnection {
            machine: "web-1".into(),
            ..Default::default()
        })
    };
    // Queued together, so usually one batch: the failing one's event is
    // dropped with its savepoint, and its number is not used up.
    let failing = store.write(move |tx| {
        tx.emit("", agent())?;
        Err::<u64, _>(super::StoreError::Corrupt("deliberately".into()))
    });
    let passing = store.write(move |tx| tx.emit("", agent()));
    let (failed, passed) = tokio::join!(failing, passing);
    assert!(failed.is_err());
    assert_eq!(passed.unwrap(), 1);
    let next = store.write(move |tx| tx.emit("", agent())).await.unwrap();
    assert_eq!(next, 2);
    let revisions: Vec<u64> = all_events(&store)
        .await
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(revisions, [1, 2]);
}
