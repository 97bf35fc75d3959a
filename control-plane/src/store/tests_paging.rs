//! Summaries and pages: what ListDeployments, GetDeployment, ListMachines
//! and ListAgents read, against both engines.

use procurator_core::pattern::NamePattern;
use procurator_proto::v1::{Hello, MachineState};

use super::tests::{COMMIT_A, m, open, result, submit};
use super::{MachineQuery, PageQuery, Store};

fn query(after: &str, size: u32, name: Option<&str>) -> PageQuery {
    PageQuery {
        after: after.to_owned(),
        size,
        name: name.map(|n| NamePattern::parse(n).unwrap()),
    }
}

async fn names(
    store: &Store,
    id: &procurator_core::DeploymentId,
    q: MachineQuery,
) -> (Vec<String>, Option<String>) {
    let page = store.list_machines(id.clone(), q).await.unwrap().unwrap();
    (
        page.items.into_iter().map(|r| r.machine).collect(),
        page.next_after,
    )
}

#[tokio::test]
async fn a_deployment_is_counted_and_its_rows_paged_and_filtered() {
    let (_dir, store) = open();
    let machines = [
        ("db-1", "s"),
        ("web-1", "s"),
        ("web-2", "s"),
        ("web-3", "s"),
        ("worker-1", "s"),
    ];
    let d = submit(&store, COMMIT_A, &machines).await;
    result(&store, "web-2", &d.id, MachineState::Succeeded).await;
    result(&store, "web-3", &d.id, MachineState::RolledBack).await;

    let summary = store
        .deployment_summary(d.id.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(summary.machines.is_empty(), "a summary lists no rows");
    assert_eq!(summary.machine_total, 5);
    assert_eq!(summary.machine_counts.get("pending"), Some(&3));
    assert_eq!(summary.machine_counts.get("succeeded"), Some(&1));
    assert_eq!(summary.machine_counts.get("rolled-back"), Some(&1));
    let listed = store.list_deployments(10).await.unwrap();
    assert_eq!((listed[0].machine_total, listed[0].machines.len()), (5, 0));

    let all = |page| MachineQuery {
        page,
        states: Vec::new(),
        waves: Vec::new(),
    };
    let (first, next) = names(&store, &d.id, all(query("", 2, None))).await;
    assert_eq!(
        (first, next.as_deref()),
        (vec!["db-1".to_owned(), "web-1".into()], Some("web-1"))
    );
    let (second, next) = names(&store, &d.id, all(query("web-1", 2, None))).await;
    assert_eq!(
        (second, next.as_deref()),
        (vec!["web-2".to_owned(), "web-3".into()], Some("web-3"))
    );
    let (last, next) = names(&store, &d.id, all(query("web-3", 2, None))).await;
    assert_eq!((last, next), (vec!["worker-1".to_owned()], None));

    let (webs, next) = names(&store, &d.id, all(query("", 10, Some("web-*")))).await;
    assert_eq!(
        (webs, next),
        (
            vec!["web-1".to_owned(), "web-2".into(), "web-3".into()],
            None
        )
    );
    let (webs, next) = names(&store, &d.id, all(query("", 1, Some("w*-?")))).await;
    assert_eq!(
        (webs, next.as_deref()),
        (vec!["web-1".to_owned()], Some("web-1"))
    );

    let failed = MachineQuery {
        page: query("", 10, None),
        states: vec![MachineState::RolledBack, MachineState::Failed],
        waves: Vec::new(),
    };
    assert_eq!(names(&store, &d.id, failed).await.0, ["web-3"]);
    let wave = MachineQuery {
        page: query("", 10, None),
        states: Vec::new(),
        waves: vec![1],
    };
    assert!(names(&store, &d.id, wave).await.0.is_empty(), "one wave: 0");

    let unknown = procurator_core::DeploymentId::parse("d-unknown").unwrap();
    assert!(
        store
            .list_machines(unknown, all(query("", 1, None)))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn agents_are_paged_and_filtered_by_connection() {
    let (_dir, store) = open();
    for name in ["a-1", "a-2", "b-1"] {
        store
            .agent_connected(m(name), Hello::default(), None)
            .await
            .unwrap();
    }
    let page = store.list_agents(query("", 2, None), None).await.unwrap();
    let got: Vec<&str> = page.items.iter().map(|a| a.machine.as_str()).collect();
    assert_eq!(
        (got, page.next_after.as_deref()),
        (vec!["a-1", "a-2"], Some("a-2"))
    );
    let page = store
        .list_agents(query("", 10, Some("b-*")), Some(true))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].machine, "b-1");
    let none = store
        .list_agents(query("", 10, None), Some(false))
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next_after.is_none());
}
