//! Opening a database written by an earlier version of the control plane.

use procurator_core::DeploymentId;
use procurator_proto::v1::MachineState;

use super::tests::COMMIT_A;
use super::{RolledBack, Store};

/// The version-1 tables that differ in version 2.
const SCHEMA_V1: &str = "
CREATE TABLE deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, git_commit TEXT NOT NULL,
    artifact TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, state INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, finished_ms INTEGER NOT NULL DEFAULT 0,
    submitted_by TEXT NOT NULL, revision INTEGER NOT NULL DEFAULT 0);
CREATE TABLE machines (
    deployment_id TEXT NOT NULL REFERENCES deployments(id), machine TEXT NOT NULL,
    closure TEXT NOT NULL, state INTEGER NOT NULL, failed_phase INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', output_tail TEXT NOT NULL DEFAULT '',
    bytes_done INTEGER NOT NULL DEFAULT 0, bytes_expected INTEGER NOT NULL DEFAULT 0,
    paths_done INTEGER NOT NULL DEFAULT 0, paths_expected INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL, PRIMARY KEY (deployment_id, machine));
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_version_1_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let (parsed, json) = crate::test_support::artifact(COMMIT_A, &[("web-1", "sys")]);
    {
        let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute(
            "INSERT INTO deployments (id, git_commit, artifact, digest, state, created_ms, submitted_by)
             VALUES ('d-20260101-000000-abcd', ?1, ?2, ?3, 1, 0, 'ci')",
            rusqlite::params![COMMIT_A, json, parsed.digest()],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO machines (deployment_id, machine, closure, state, updated_ms)
             VALUES ('d-20260101-000000-abcd', 'web-1', '/nix/store/x', 2, 0)",
            [],
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let id = DeploymentId::parse("d-20260101-000000-abcd").unwrap();
    let d = store.get_deployment(id.clone()).await.unwrap().unwrap();
    assert_eq!(d.machines[0].state(), MachineState::Sent);
    assert_eq!(d.machines[0].wave, 0);
    // The same artifact is the newest: deduped; a rollback stores it again.
    let (parsed, json) = crate::test_support::artifact(COMMIT_A, &[("web-1", "sys")]);
    let same = store
        .submit(parsed, json, "ci".into(), false, Vec::new())
        .await
        .unwrap();
    assert_eq!((same.created, same.id), (false, id.clone()));
    assert!(matches!(
        store
            .rollback(Some(id), "ops".into(), Default::default())
            .await
            .unwrap(),
        RolledBack::Done(_)
    ));
    drop(store);
    // Opening it again leaves it as it is; the machines still refer to the
    // rebuilt table, not the one renamed away.
    Store::open(dir.path()).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'machines'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!sql.contains("deployments_v1"), "{sql}");
    assert_is_current(&conn);
}

#[tokio::test]
async fn a_version_2_database_gains_the_vm_host_column() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TABLE agents (
                machine TEXT PRIMARY KEY, connected INTEGER NOT NULL DEFAULT 0,
                generation INTEGER NOT NULL DEFAULT 0, current_system TEXT NOT NULL DEFAULT '',
                booted_system TEXT NOT NULL DEFAULT '', agent_version TEXT NOT NULL DEFAULT '',
                nix_version TEXT NOT NULL DEFAULT '', last_seen_ms INTEGER NOT NULL DEFAULT 0,
                last_deployment_id TEXT NOT NULL DEFAULT '', last_state INTEGER NOT NULL DEFAULT 0,
                last_reason TEXT NOT NULL DEFAULT '');
             INSERT INTO agents (machine, generation, agent_version) VALUES ('web-1', 7, '0.1.0');
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let agents = store.all_agents().await.unwrap();
    assert_eq!(agents[0].machine, "web-1");
    assert_eq!(agents[0].vm_host, None);
    // Connections number on from the highest generation the file held.
    let generation = store
        .agent_connected(
            procurator_core::MachineName::parse(&agents[0].machine).unwrap(),
            Default::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(generation, 8);
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
    assert_is_current(&conn);
}

/// The database is at version 10: the columns of versions 4, 9 and 10 are there
/// and empty for what was stored before, nothing was pruned yet, the log's
/// head is where its rows left off, and this process is the one replica.
fn assert_is_current(conn: &rusqlite::Connection) {
    use rusqlite::OptionalExtension as _;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 10);
    let started_ms: i64 = conn
        .query_row("SELECT started_ms FROM machines LIMIT 1", [], |r| r.get(0))
        .unwrap_or_default();
    assert_eq!(started_ms, 0);
    let logs: i64 = conn
        .query_row("SELECT count(*) FROM machine_logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(logs, 0);
    let selectors: String = conn
        .query_row("SELECT selectors FROM deployments LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap_or_default();
    assert_eq!(selectors, "");
    let replicas: i64 = conn
        .query_row("SELECT count(*) FROM replicas", [], |r| r.get(0))
        .unwrap();
    assert_eq!(replicas, 1);
    let (forced_by, intent_keys): (String, String) = conn
        .query_row(
            "SELECT forced_by, intent_keys FROM deployments LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .expect("the columns exist")
        .unwrap_or_default();
    assert_eq!((forced_by.as_str(), intent_keys.as_str()), ("", ""));
    let bounds: (i64, i64) = conn
        .query_row("SELECT compacted, pruned FROM log_bounds", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(bounds, (0, 0));
    let (head, last): (i64, i64) = conn
        .query_row(
            "SELECT head, (SELECT coalesce(max(revision), 0) FROM events) FROM log_bounds",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(head, last);
}

#[tokio::test]
async fn a_version_5_database_numbers_new_events_after_its_last_even_when_pruned() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.emit_test_events(3).await.unwrap();
    }
    // As version 5 left it: revisions were row ids, and the last event is
    // gone (pruned), so only SQLite's sequence remembers 3.
    {
        let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
        conn.execute_batch(
            "ALTER TABLE log_bounds DROP COLUMN head;
             DELETE FROM events WHERE revision = 3;
             PRAGMA user_version = 5;",
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    store.emit_test_events(1).await.unwrap();
    let revisions: Vec<u64> = store
        .events_after(0, None, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(revisions, [1, 2, 4], "a revision was reused");
}
