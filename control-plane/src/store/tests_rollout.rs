//! Waves, budget, offline agents, cancel, rollback, stale commits and a
//! restart mid-rollout, against real SQLite (docs/rollouts.md).

use procurator_core::DeploymentId;
use procurator_proto::v1::{DeploymentState, Event, MachineState, Progress, event};

use super::tests::{
    COMMIT_A, COMMIT_B, all_events, connect_and_schedule, desired, m, machine_state, open, result,
    schedule,
};
use super::{Cancelled, Confirmation, Outbound, RolledBack, Store, SubmitError, Submitted};
use crate::test_support::artifact_with;

const COMMIT_C: &str = "ccccccc0000000000000000000000000000000cc";
const THREE: &[(&str, &str)] = &[("web-1", "sys"), ("web-2", "sys"), ("web-3", "sys")];

async fn submit_with(
    store: &Store,
    commit: &str,
    machines: &[(&str, &str)],
    extra: &str,
    force: bool,
) -> Result<Submitted, SubmitError> {
    let (parsed, json) = artifact_with(commit, machines, extra);
    store
        .submit(parsed, json, "ci".into(), force, Vec::new())
        .await
}

fn waves_started(events: &[Event]) -> Vec<(u32, u32, String, Vec<String>)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::WaveStarted(w)) => {
                Some((w.index, w.total, w.name.clone(), w.machines.clone()))
            }
            _ => None,
        })
        .collect()
}

async fn reason(store: &Store, id: &DeploymentId, machine: &str) -> String {
    let d = store.get_deployment(id.clone()).await.unwrap().unwrap();
    d.machines
        .into_iter()
        .find(|r| r.machine == machine)
        .unwrap()
        .reason
}

#[tokio::test]
async fn waves_run_in_order_within_max_in_flight_and_halt_over_the_budget() {
    let (_dir, store) = open();
    let rollout = r#""rollout": {"maxInFlight": 1,
        "waves": [{"name": "canary", "machines": ["web-1"]}, {"name": "rest"}]}"#;
    let s = submit_with(&store, COMMIT_A, THREE, rollout, false)
        .await
        .unwrap();
    let d = store.get_deployment(s.id.clone()).await.unwrap().unwrap();
    assert_eq!(d.waves.len(), 2);
    assert_eq!(d.waves[1].machines, ["web-2", "web-3"]);
    assert_eq!(d.machines[2].wave, 1);

    connect_and_schedule(&store, "web-2").await;
    connect_and_schedule(&store, "web-3").await;
    assert_eq!(connect_and_schedule(&store, "web-1").await, [m("web-1")]);
    assert_eq!(
        waves_started(&all_events(&store).await),
        [(0, 2, "canary".to_owned(), vec!["web-1".to_owned()])]
    );

    result(&store, "web-1", &s.id, MachineState::Succeeded).await;
    // One at a time: only web-2 of the second wave.
    assert_eq!(schedule(&store).await, [m("web-2")]);
    assert_eq!(waves_started(&all_events(&store).await).len(), 2);
    assert!(schedule(&store).await.is_empty());

    // web-2 fails: over a budget of 0, so web-3 is never sent.
    result(&store, "web-2", &s.id, MachineState::RolledBack).await;
    assert!(schedule(&store).await.is_empty());
    assert_eq!(
        machine_state(&store, &s.id, "web-3").await,
        MachineState::Cancelled
    );
    assert!(
        reason(&store, &s.id, "web-3")
            .await
            .starts_with("rollout halted")
    );
    let d = store.get_deployment(s.id.clone()).await.unwrap().unwrap();
    assert_eq!(d.state(), DeploymentState::Halted);
    assert!(d.halted_reason.contains("web-2"), "{}", d.halted_reason);
    let halted: Vec<Vec<String>> = all_events(&store)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(event::Kind::Halted(h)) => Some(h.failed_machines),
            _ => None,
        })
        .collect();
    assert_eq!(halted, [vec!["web-2".to_owned()]]);
}

#[tokio::test]
async fn an_offline_machine_becomes_unreachable_and_reopens_when_it_is_back() {
    let (_dir, store) = open();
    let rollout = r#""rollout": {"unreachableAfter": 0}"#;
    let s = submit_with(&store, COMMIT_A, &[("web-1", "sys")], rollout, false)
        .await
        .unwrap();
    assert!(schedule(&store).await.is_empty());
    assert_eq!(
        machine_state(&store, &s.id, "web-1").await,
        MachineState::Unreachable
    );
    assert!(
        reason(&store, &s.id, "web-1")
            .await
            .starts_with("no agent connected for")
    );
    assert_eq!(
        store.deployment_state(s.id.clone()).await.unwrap(),
        Some(DeploymentState::Failed)
    );

    connect_and_schedule(&store, "web-1").await;
    assert!(store.reopen_unreachable(m("web-1")).await.unwrap());
    assert!(!store.reopen_unreachable(m("web-1")).await.unwrap());
    assert_eq!(
        machine_state(&store, &s.id, "web-1").await,
        MachineState::Sent
    );
    assert!(desired(&store, "web-1").await.is_some());
    assert_eq!(
        store.deployment_state(s.id.clone()).await.unwrap(),
        Some(DeploymentState::Running)
    );
    result(&store, "web-1", &s.id, MachineState::Succeeded).await;
    let finished: Vec<i32> = store
        .events_after(0, Some(s.id.clone()), 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(event::Kind::Finished(f)) => Some(f.state),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        [
            DeploymentState::Failed as i32,
            DeploymentState::Succeeded as i32
        ]
    );
}

#[tokio::test]
async fn a_restarted_store_carries_on_where_its_rows_say() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = r#""rollout": {"waves": [{"name": "canary", "machines": ["web-1"]}]}"#;
    let machines = &[("web-1", "sys"), ("web-2", "sys")];
    let id = {
        let store = Store::open(dir.path()).unwrap();
        let s = submit_with(&store, COMMIT_A, machines, rollout, false)
            .await
            .unwrap();
        connect_and_schedule(&store, "web-2").await;
        assert_eq!(connect_and_schedule(&store, "web-1").await, [m("web-1")]);
        s.id
    };

    let store = Store::open(dir.path()).unwrap();
    // Nobody is connected after the restart; the machine in flight gets its
    // desired state again when it reconnects, and nothing is re-decided.
    assert!(schedule(&store).await.is_empty());
    assert_eq!(
        machine_state(&store, &id, "web-1").await,
        MachineState::Sent
    );
    assert!(connect_and_schedule(&store, "web-1").await.is_empty());
    assert_eq!(
        desired(&store, "web-1").await.unwrap().deployment_id,
        id.as_str()
    );
    assert!(
        connect_and_schedule(&store, "web-2").await.is_empty(),
        "not its wave yet"
    );

    result(&store, "web-1", &id, MachineState::Succeeded).await;
    assert_eq!(schedule(&store).await, [m("web-2")]);
    let started = waves_started(&all_events(&store).await);
    assert_eq!(started.iter().map(|w| w.0).collect::<Vec<_>>(), [0, 1]);
}

#[tokio::test]
async fn stale_commits_are_refused_unless_forced_and_only_the_newest_dedupes() {
    let (_dir, store) = open();
    let a = submit_with(
        &store,
        COMMIT_A,
        &[("web-1", "a")],
        r#""gitCommitTime": 100"#,
        false,
    )
    .await
    .unwrap();
    submit_with(
        &store,
        COMMIT_B,
        &[("web-1", "b")],
        r#""gitCommitTime": 200"#,
        false,
    )
    .await
    .unwrap();

    let again = submit_with(
        &store,
        COMMIT_A,
        &[("web-1", "a")],
        r#""gitCommitTime": 100"#,
        false,
    )
    .await;
    let Err(SubmitError::Stale(why)) = again else {
        panic!("{again:?}")
    };
    assert!(why.contains(a.id.as_str()), "{why}");
    let older = submit_with(
        &store,
        COMMIT_C,
        &[("web-1", "c")],
        r#""gitCommitTime": 150"#,
        false,
    )
    .await;
    assert!(matches!(older, Err(SubmitError::Stale(_))), "{older:?}");
    assert!(
        SubmitError::Stale(String::new())
            .to_string()
            .contains("--force")
    );

    let forced = submit_with(
        &store,
        COMMIT_A,
        &[("web-1", "a")],
        r#""gitCommitTime": 100"#,
        true,
    )
    .await
    .unwrap();
    assert!(forced.created);
    assert_ne!(forced.id, a.id);
    // The same artifact as the newest one: that deployment, not a new one.
    let same = submit_with(
        &store,
        COMMIT_A,
        &[("web-1", "a")],
        r#""gitCommitTime": 100"#,
        false,
    )
    .await
    .unwrap();
    assert_eq!((same.created, same.id), (false, forced.id));
}

#[tokio::test]
async fn cancel_refuses_confirmation_and_drops_what_was_not_started() {
    let (_dir, store) = open();
    let s = submit_with(
        &store,
        COMMIT_A,
        &[("web-1", "sys"), ("web-2", "sys")],
        "",
        false,
    )
    .await
    .unwrap();
    connect_and_schedule(&store, "web-1").await;
    let closure = desired(&store, "web-1").await.unwrap().closure;
    let checking = Progress {
        deployment_id: s.id.to_string(),
        state: MachineState::Checking as i32,
        ..Default::default()
    };
    store
        .record_progress(m("web-1"), s.id.clone(), MachineState::Checking, checking)
        .await
        .unwrap();
    let confirm = |closure: String| store.confirm(m("web-1"), s.id.clone(), closure);
    assert_eq!(
        confirm(closure.clone()).await.unwrap(),
        Confirmation::Confirmed
    );
    assert_eq!(
        machine_state(&store, &s.id, "web-1").await,
        MachineState::Confirming
    );
    assert_eq!(
        confirm("/nix/store/other".into()).await.unwrap(),
        Confirmation::NotFound
    );

    let cancelled = store.cancel(s.id.clone(), "by test".into()).await.unwrap();
    assert_eq!(
        cancelled,
        Cancelled::Done {
            in_flight: vec![m("web-1")]
        }
    );
    assert_eq!(
        machine_state(&store, &s.id, "web-2").await,
        MachineState::Cancelled
    );
    assert!(
        matches!(confirm(closure).await.unwrap(), Confirmation::Refused(r) if r.contains("cancelled"))
    );
    assert!(matches!(
        store.take_desired(m("web-1")).await.unwrap(),
        Some(Outbound::Cancel { .. })
    ));
    result(&store, "web-1", &s.id, MachineState::RolledBack).await;
    let d = store.get_deployment(s.id.clone()).await.unwrap().unwrap();
    assert_eq!(d.state(), DeploymentState::Cancelled);
    assert_eq!(d.halted_reason, "by test");
    assert_eq!(
        store.cancel(s.id.clone(), String::new()).await.unwrap(),
        Cancelled::AlreadyFinished(DeploymentState::Cancelled)
    );
}

#[tokio::test]
async fn rollback_deploys_the_last_succeeded_artifact_again() {
    let (_dir, store) = open();
    assert!(matches!(
        store
            .rollback(None, "ops".into(), Default::default())
            .await
            .unwrap(),
        RolledBack::NotFound(_)
    ));
    let a = submit_with(&store, COMMIT_A, &[("web-1", "a")], "", false)
        .await
        .unwrap();
    result(&store, "web-1", &a.id, MachineState::Succeeded).await;
    let b = submit_with(&store, COMMIT_B, &[("web-1", "b")], "", false)
        .await
        .unwrap();

    let RolledBack::Done(back) = store
        .rollback(None, "ops".into(), Default::default())
        .await
        .unwrap()
    else {
        panic!("no rollback")
    };
    assert!(back.created);
    assert_ne!(back.id, a.id);
    let d = store
        .get_deployment(back.id.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.rollback_of, a.id.as_str());
    assert_eq!(d.git_commit, COMMIT_A);
    assert_eq!(
        machine_state(&store, &b.id, "web-1").await,
        MachineState::Superseded
    );
}

/// `--on`: rows only for the selected machines; the others' rows of the
/// deployment before are left as they are.
#[tokio::test]
async fn a_subset_deployment_touches_only_the_selected_machines() {
    let (_dir, store) = open();
    let first = submit_with(&store, COMMIT_A, THREE, "", false)
        .await
        .unwrap();
    let on = |texts: &[&str]| {
        let texts: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        procurator_core::artifact::parse_selectors(&texts).unwrap()
    };
    let machines = &[("web-1", "new"), ("web-2", "new"), ("web-3", "new")];
    let (parsed, json) = artifact_with(COMMIT_B, machines, "");
    let subset = store
        .submit(
            parsed.clone(),
            json.clone(),
            "ci".into(),
            false,
            on(&["web-1", "web-3"]),
        )
        .await
        .unwrap();
    assert_eq!(subset.machines, [m("web-1"), m("web-3")]);
    let d = store
        .get_deployment(subset.id.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.on, ["web-1", "web-3"]);
    assert_eq!(d.machine_total, 2);
    let rows: Vec<&str> = d.machines.iter().map(|r| r.machine.as_str()).collect();
    assert_eq!(rows, ["web-1", "web-3"]);
    // web-2's row of the first deployment waits on, not superseded.
    assert_eq!(
        machine_state(&store, &first.id, "web-2").await,
        MachineState::Pending
    );
    assert_eq!(
        machine_state(&store, &first.id, "web-1").await,
        MachineState::Superseded
    );

    // The same artifact on the same machines is the same deployment; on
    // others, another one.
    let again = store
        .submit(
            parsed.clone(),
            json.clone(),
            "ci".into(),
            false,
            on(&["web-1", "web-3"]),
        )
        .await
        .unwrap();
    assert_eq!(
        (again.id.clone(), again.created),
        (subset.id.clone(), false)
    );
    let other = store
        .submit(parsed, json, "ci".into(), false, on(&["web-2"]))
        .await
        .unwrap();
    assert!(other.created && other.id != subset.id);
    assert_eq!(other.machines, [m("web-2")]);
}
