//! Retention: what the store prunes, what it keeps, and what a watcher of
//! pruned history is told.

use std::time::Duration;

use procurator_core::DeploymentId;
use procurator_proto::v1::{DeploymentState, Hello, MachineState, event};
use tokio_util::sync::CancellationToken;

use super::tests::{all_events, m, open, result, submit};
use super::{Compacted, Retention, Store};

fn keep(deployments: u32) -> Retention {
    Retention {
        deployments,
        ..Retention::default()
    }
}

async fn prune(store: &Store, retention: Retention) -> super::Pruned {
    store
        .prune(retention, &CancellationToken::new())
        .await
        .unwrap()
}

/// The ids of the deployments the store holds, newest first.
async fn listed(store: &Store) -> Vec<String> {
    let all = store.list_deployments(100).await.unwrap();
    all.into_iter().map(|d| d.id).collect()
}

/// What a watcher from `after` would get first.
async fn page(
    store: &Store,
    after: u64,
    deployment: Option<DeploymentId>,
) -> Result<Vec<procurator_proto::v1::Event>, Compacted> {
    store.watch_page(after, deployment, 1000).await.unwrap()
}

/// `n` deployments of web-1, each superseding the one before.
async fn deployments(store: &Store, n: usize) -> Vec<DeploymentId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let commit = format!("{:040x}", i + 1);
        ids.push(
            submit(store, &commit, &[("web-1", &format!("sys-{i}"))])
                .await
                .id,
        );
    }
    ids
}

#[tokio::test]
async fn only_the_newest_deployments_are_kept_with_their_events() {
    let (_dir, store) = open();
    let ids = deployments(&store, 13).await;
    result(&store, "web-1", &ids[12], MachineState::Succeeded).await;
    let before = all_events(&store).await;

    let pruned = prune(&store, keep(3)).await;
    assert_eq!(pruned.deployments, 10);

    let listed = listed(&store).await;
    let kept: Vec<String> = ids[10..].iter().rev().map(ToString::to_string).collect();
    assert_eq!(listed, kept);
    for id in &ids[..10] {
        assert!(store.get_deployment(id.clone()).await.unwrap().is_none());
    }
    // Exactly the kept deployments' events remain, unchanged.
    let after = all_events(&store).await;
    let expected: Vec<_> = before
        .iter()
        .filter(|e| kept.contains(&e.deployment_id))
        .cloned()
        .collect();
    assert_eq!(after, expected);
    assert!(!after.is_empty());

    // The whole log cannot be resumed from before what was pruned…
    let bounds = store.log_bounds().await.unwrap();
    assert!(bounds.pruned > 1);
    assert_eq!(bounds.compacted, 0, "nothing went by age");
    assert_eq!(
        page(&store, 1, None).await,
        Err(Compacted {
            asked: 1,
            resume_from: bounds.pruned
        })
    );
    // …but from 0 (what is kept) or from the resume point it can.
    assert_eq!(page(&store, 0, None).await, Ok(after));
    assert!(page(&store, bounds.pruned, None).await.is_ok());
    // A kept deployment lost nothing: it replays from any revision.
    let newest = page(&store, 1, Some(ids[12].clone())).await.unwrap();
    assert!(matches!(
        newest.first().and_then(|e| e.kind.as_ref()),
        Some(event::Kind::Submitted(_))
    ));

    // Nothing more to prune.
    assert_eq!(prune(&store, keep(3)).await, super::Pruned::default());
}

#[tokio::test]
async fn unfinished_deployments_are_kept_however_old() {
    let (db, store) = open();
    let ids = deployments(&store, 5).await;
    // A newer deployment supersedes every older one's unfinished rows, so
    // an old one still running is a store's corner; it is kept all the same.
    db.exec(&format!(
        "UPDATE deployments SET state = {} WHERE id = '{}'",
        DeploymentState::Running as i32,
        ids[0]
    ));
    assert_eq!(prune(&store, keep(1)).await.deployments, 3);
    let listed = listed(&store).await;
    assert_eq!(listed, [ids[4].to_string(), ids[0].to_string()]);
}

#[tokio::test]
async fn events_past_the_window_are_pruned_oldest_first() {
    let (db, store) = open();
    let ids = deployments(&store, 2).await;
    let events = all_events(&store).await;
    let second_submitted = events
        .iter()
        .find(|e| {
            e.deployment_id == ids[1].as_str() && matches!(e.kind, Some(event::Kind::Submitted(_)))
        })
        .unwrap()
        .revision;
    // The first deployment's events happened 40 days ago.
    let forty_days_ago = procurator_core::now_ms() - 40 * 24 * 3600 * 1000;
    db.exec(&format!(
        "UPDATE events SET at_ms = {forty_days_ago} WHERE revision < {second_submitted}"
    ));

    let window = Retention {
        deployments: 100,
        events_for: Duration::from_secs(30 * 24 * 3600),
    };
    let pruned = prune(&store, window).await;
    assert_eq!(pruned.deployments, 0);
    assert_eq!(pruned.events, second_submitted - 1);
    let bounds = store.log_bounds().await.unwrap();
    assert_eq!(bounds.compacted, second_submitted - 1);
    let left = all_events(&store).await;
    assert_eq!(left.first().unwrap().revision, second_submitted);
    assert_eq!(left.len(), events.len() - (second_submitted as usize - 1));

    // The first deployment lost its history: replaying it, from 0 or from
    // a pruned revision, is refused with the point to resume from.
    let lost = Compacted {
        asked: 0,
        resume_from: bounds.compacted,
    };
    assert_eq!(page(&store, 0, Some(ids[0].clone())).await, Err(lost));
    assert!(
        page(&store, bounds.compacted, Some(ids[0].clone()))
            .await
            .is_ok()
    );
    // The second lost nothing.
    let second = page(&store, 0, Some(ids[1].clone())).await.unwrap();
    assert_eq!(second.first().unwrap().revision, second_submitted);
}

#[tokio::test]
async fn a_reconnecting_agent_writes_an_event_only_when_its_report_changes() {
    let (_dir, store) = open();
    let hello = Hello {
        current_system: format!("/nix/store/{}-sys", "a".repeat(32)),
        agent_version: "1".into(),
        ..Default::default()
    };
    for _ in 1..=50 {
        let generation = store
            .agent_connected(m("web-1"), hello.clone(), None)
            .await
            .unwrap();
        assert!(
            store
                .agent_disconnected(m("web-1"), generation)
                .await
                .unwrap()
        );
    }
    assert_eq!(all_events(&store).await.len(), 1, "the first contact only");
    let upgraded = Hello {
        agent_version: "2".into(),
        ..hello
    };
    store
        .agent_connected(m("web-1"), upgraded, None)
        .await
        .unwrap();
    let events = all_events(&store).await;
    assert_eq!(events.len(), 2);
    let agents = store.all_agents().await.unwrap();
    assert!(agents[0].connected);
    assert_eq!(agents[0].agent_version, "2");
}
