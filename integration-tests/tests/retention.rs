//! The control plane's store stays bounded: old deployments and old events
//! are pruned, a `Watch` of pruned history is told where to resume (and
//! `procurator-ctl watch` says so), and an agent that reconnects over and
//! over, with a Hello too big or a good one, does not grow the store.

use std::collections::BTreeSet;
use std::time::Duration;

use procurator_integration_tests::ctl::{CmdOutput, Grpcurl, grpc_code};
use procurator_integration_tests::{Fleet, FleetOptions, scenario, wait_for};
use serde_json::{Value, json};

const WATCH: &str = "procurator.v1.DeploymentService/Watch";
const KEEP: usize = 3;

fn no_agents() -> FleetOptions {
    FleetOptions {
        agents: Vec::new(),
        ..FleetOptions::default()
    }
}

/// `Watch` of the whole log from `from`, for a few seconds (it never ends
/// by itself), with grpcurl's `-v`: headers and trailers are printed.
fn watch_log(fleet: &Fleet, grpcurl: &Grpcurl, from: u64) -> CmdOutput {
    let root = procurator_integration_tests::proto_root();
    let root = root.to_string_lossy();
    let data = json!({ "fromRevision": from.to_string() }).to_string();
    grpcurl
        .run(
            Some(&fleet.pki.operator()),
            &[
                "-v",
                "-max-time",
                "3",
                "-import-path",
                root.as_ref(),
                "-proto",
                "procurator/v1/deployment.proto",
                "-d",
                &data,
            ],
            &[WATCH],
        )
        .expect("grpcurl")
}

/// The events grpcurl printed, in order.
fn events(out: &CmdOutput) -> Vec<Value> {
    // With -v, each message follows a "Response contents:" line.
    out.stdout
        .split("Response contents:")
        .skip(1)
        .filter_map(|chunk| {
            serde_json::Deserializer::from_str(chunk)
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
        })
        .collect()
}

fn deployment_ids(fleet: &Fleet) -> Vec<String> {
    let reply = fleet
        .grpcurl()
        .expect("grpcurl")
        .call_json(
            &fleet.pki.operator(),
            "procurator.v1.DeploymentService/ListDeployments",
            r#"{"limit": 100}"#,
        )
        .expect("list");
    reply["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn only_the_newest_deployments_are_kept_and_a_watch_of_pruned_history_is_told_where_to_resume() {
    let mut fleet = Fleet::start_with(no_agents()).expect("fleet");
    let keep = KEEP.to_string();
    fleet
        .control_plane
        .restart_with(&fleet.nix, &["--retain-deployments", &keep])
        .expect("restart");
    let ctl = fleet.ctl().expect("ctl");
    // Each supersedes the one before, which so finishes and is prunable.
    let mut commits = Vec::new();
    for _ in 0..KEEP + 10 {
        let (artifact, commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
        scenario::submit(&ctl, &artifact, &[]).expect("submitted");
        commits.push(commit);
    }
    let kept = wait_for("pruning", Duration::from_secs(30), || {
        let ids = deployment_ids(&fleet);
        Ok((ids.len() == KEEP).then_some(ids))
    })
    .expect("only the newest are left");
    for commit in &commits[..10] {
        assert!(fleet.deployment_by_commit(commit).is_err(), "{commit} kept");
    }
    for commit in &commits[10..] {
        fleet.deployment_by_commit(commit).expect("kept");
    }
    assert!(
        fleet.control_plane.log().contains("pruned the store"),
        "{}",
        fleet.control_plane.log()
    );

    // From 0: every event kept, all of them of kept deployments, each of
    // which still has its whole history.
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let all = events(&watch_log(&fleet, &grpcurl, 0));
    assert!(!all.is_empty());
    let kept_ids: BTreeSet<&str> = kept.iter().map(String::as_str).collect();
    for event in &all {
        let id = event["deploymentId"].as_str().unwrap_or_default();
        assert!(
            id.is_empty() || kept_ids.contains(id),
            "an event of a pruned deployment: {event}"
        );
    }
    for id in &kept {
        assert!(
            all.iter()
                .any(|e| e["deploymentId"] == id.as_str() && e.get("submitted").is_some()),
            "{id} lost its history"
        );
    }

    // From 1: refused, with the revision to resume from.
    let refused = watch_log(&fleet, &grpcurl, 1);
    assert_eq!(
        grpc_code(&refused).as_deref(),
        Some("OutOfRange"),
        "{refused}"
    );
    let resume: u64 = refused
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("procurator-resume-revision: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resume trailer: {refused}"));
    assert!(
        refused
            .stderr
            .contains(&format!("the oldest revision to resume from is {resume}")),
        "{refused}"
    );
    // From there, it follows: what is kept after it, then live.
    let resumed = watch_log(&fleet, &grpcurl, resume);
    assert_eq!(
        grpc_code(&resumed).as_deref(),
        Some("DeadlineExceeded"),
        "{resumed}"
    );
    let after: Vec<u64> = events(&resumed)
        .iter()
        .filter_map(|e| e["revision"].as_str()?.parse().ok())
        .collect();
    assert!(!after.is_empty(), "{resumed}");
    assert!(after.iter().all(|r| *r > resume), "{after:?}");
}

#[test]
fn ctl_watch_says_when_a_deployments_events_were_pruned_by_age() {
    let mut fleet = Fleet::start_with(no_agents()).expect("fleet");
    let ctl = fleet.ctl().expect("ctl");
    let mut commits = Vec::new();
    for _ in 0..2 {
        let (artifact, commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
        scenario::submit(&ctl, &artifact, &[]).expect("submitted");
        commits.push(commit);
    }
    let first = fleet.deployment_id(&commits[0]).expect("first");

    // Forty days pass for every event so far: the next start prunes them.
    fleet.control_plane.stop().expect("stop");
    let db = fleet.control_plane.data_dir().join("procurator.db");
    let conn = rusqlite::Connection::open(&db).expect("open the store");
    let forty_days_ago = procurator_core::now_ms() - 40 * 24 * 3600 * 1000;
    conn.execute("UPDATE events SET at_ms = ?1", [forty_days_ago])
        .expect("age the events");
    drop(conn);
    fleet.control_plane.start_again(&fleet.nix).expect("start");
    wait_for("pruning", Duration::from_secs(30), || {
        Ok(fleet
            .control_plane
            .log()
            .contains("pruned the store")
            .then_some(()))
    })
    .expect("pruned at start");

    // The first deployment (superseded by the second) is kept, its events
    // are not: watch says so and shows it as it is.
    let out = ctl.run(&["watch", &first]).expect("watch");
    assert!(
        out.stderr.contains(
            "the control plane no longer holds this deployment's events after revision 0"
        ),
        "{out}"
    );
    assert!(out.stderr.contains("following from revision"), "{out}");
    assert!(out.stdout.contains("superseded"), "{out}");
}

/// The store's size as SQLite counts it (its WAL included), in bytes.
fn store_bytes(fleet: &Fleet) -> i64 {
    let db = fleet.control_plane.data_dir().join("procurator.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the store");
    conn.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )
    .expect("size")
}

fn agent_events(fleet: &Fleet, machine: &str) -> usize {
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    events(&watch_log(fleet, &grpcurl, 0))
        .iter()
        .filter(|e| e["agent"]["machine"] == machine)
        .count()
}

/// What 100 reconnects may add to the store: a few pages, nothing that
/// grows with the number of attempts.
const RECONNECTS_MAY_ADD: i64 = 64 * 1024;

#[test]
fn an_agent_reconnecting_in_a_loop_does_not_grow_the_store() {
    // worker-1's agent is not running: grpcurl speaks for it.
    let fleet = Fleet::start_with(FleetOptions {
        agents: vec!["control-plane-1".to_owned()],
        ..FleetOptions::default()
    })
    .expect("fleet");
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let worker = fleet.pki.agent("worker-1");
    let hello = |current_system: &str| json!({ "hello": { "protocolVersion": 1, "agentVersion": "grpcurl", "currentSystem": current_system } });
    let system = format!("/nix/store/{}-nixos-system-worker-1", "a".repeat(32));
    // Connects with a good Hello and hangs up once welcomed.
    let welcomed = || {
        let out = grpcurl
            .agent_stream(
                Some(&worker),
                &[hello(&system)],
                true,
                Duration::from_secs(10),
                |s| s.contains("welcome"),
            )
            .expect("grpcurl");
        assert!(out.stdout.contains("welcome"), "{out}");
    };
    // The first contact is recorded.
    welcomed();
    assert_eq!(agent_events(&fleet, "worker-1"), 1);
    let before = store_bytes(&fleet);

    // 50 Hellos with a 3.9 MB "system": refused, nothing stored.
    let huge = format!("/nix/store/{}-{}", "b".repeat(32), "x".repeat(3_900_000));
    for _ in 0..50 {
        let out = grpcurl
            .agent_stream(
                Some(&worker),
                &[hello(&huge)],
                false,
                Duration::from_secs(10),
                |s| !s.is_empty(),
            )
            .expect("grpcurl");
        assert_eq!(grpc_code(&out).as_deref(), Some("InvalidArgument"), "{out}");
    }
    // 50 reconnects that report what it reported before.
    for _ in 0..50 {
        welcomed();
    }
    let grown = store_bytes(&fleet) - before;
    eprintln!(
        "100 reconnects: the store went from {before} to {} bytes",
        before + grown
    );
    assert!(
        grown < RECONNECTS_MAY_ADD,
        "100 reconnects grew the store by {grown} bytes"
    );
    assert_eq!(
        agent_events(&fleet, "worker-1"),
        1,
        "no event per reconnect"
    );
    let agents = fleet.agents().expect("agents");
    let worker1 = agents
        .iter()
        .find(|a| a["machine"] == "worker-1")
        .expect("worker-1 is known");
    assert_eq!(worker1["currentSystem"], system.as_str());
}
