//! The control plane on PostgreSQL (`--database postgres://…`): three agents
//! converge on a deployment exactly as on the embedded SQLite store, and what
//! was stored is there after a restart. The cluster is the test's own.

use procurator_integration_tests::control_plane::ControlPlane;
use procurator_integration_tests::fixture::Closures;
use procurator_integration_tests::postgres::Postgres;
use procurator_integration_tests::{Fleet, MACHINES, wait_for};
use serde_json::json;
use std::time::Duration;

#[test]
fn a_fleet_deploys_through_a_control_plane_on_postgresql() {
    let pg = Postgres::start().expect("postgres");
    pg.psql("postgres", "CREATE DATABASE procurator")
        .expect("create database");
    let mut fleet = Fleet::start().expect("fleet");
    let url = pg.url("procurator");
    fleet
        .control_plane
        .restart_with(&fleet.nix, &["--database", &url])
        .expect("restart on postgres");
    let log = fleet.control_plane.log();
    let socket = format!("postgresql {}:5432", pg.socket_dir().display());
    assert!(log.contains(&socket), "{log}");
    assert!(!log.contains("procurator.db"), "{log}");

    // The agents come back to it.
    wait_for("every agent connected", Duration::from_secs(60), || {
        let agents = fleet.agents()?;
        let connected = agents.iter().filter(|a| a["connected"] == true).count();
        Ok((connected == MACHINES.len()).then_some(()))
    })
    .expect("agents");

    let (closures, artifact, commit) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("the deployment succeeds");
    for m in MACHINES {
        fleet.host(m).assert_on(&closures[m], "system-2-link");
    }
    // It is in PostgreSQL, with its events.
    let rows = pg
        .psql(
            "procurator",
            &format!("SELECT state FROM deployments WHERE git_commit = '{commit}'"),
        )
        .expect("psql");
    assert_eq!(rows, "2", "DEPLOYMENT_STATE_SUCCEEDED: {rows}");
    let events: u64 = pg
        .psql("procurator", "SELECT count(*) FROM events")
        .expect("psql")
        .parse()
        .expect("a count");
    assert!(events > 3, "{events} events");

    // And there after a restart.
    fleet.control_plane.restart(&fleet.nix).expect("restart");
    let deployment = fleet.deployment_by_commit(&commit).expect("kept");
    assert_eq!(
        deployment["state"], "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );
}

/// A fleet whose agents are not started, for control planes of its own.
fn fleet_without_agents() -> Fleet {
    Fleet::start_with(procurator_integration_tests::FleetOptions {
        agents: Vec::new(),
        ..Default::default()
    })
    .expect("fleet")
}

/// [`fleet_without_agents`] and a database `procurator` of its own.
fn fleet_and_database() -> (Fleet, Postgres) {
    let pg = Postgres::start().expect("postgres");
    pg.psql("postgres", "CREATE DATABASE procurator")
        .expect("create database");
    (fleet_without_agents(), pg)
}

#[test]
fn a_replica_refuses_a_schema_newer_than_it_knows() {
    let (fleet, pg) = fleet_and_database();
    pg.psql(
        "procurator",
        "CREATE TABLE schema_version (id BIGINT PRIMARY KEY, version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES (1, 99)",
    )
    .expect("a newer schema");
    let url = pg.url("procurator");
    let refused = ControlPlane::start_with(
        &fleet.nix,
        &fleet.dir().join("refused"),
        &fleet.pki,
        &["--database", &url],
    );
    assert!(refused.is_err(), "it refuses to start");
    let error =
        std::fs::read_to_string(fleet.dir().join("refused/control-plane-1.log")).expect("its log");
    assert!(
        error.contains("schema version 99, newer than this control plane's")
            && error.contains("run a newer procurator-control-plane"),
        "{error}"
    );
    let version = pg
        .psql("procurator", "SELECT version FROM schema_version")
        .expect("psql");
    assert_eq!(version.trim(), "99", "left as it was");
}

#[test]
fn replicas_started_together_make_the_schema_once() {
    let (fleet, pg) = fleet_and_database();
    let url = pg.url("procurator");
    let replicas: Vec<ControlPlane> = std::thread::scope(|s| {
        let starts: Vec<_> = (0..2)
            .map(|i| {
                let (fleet, url) = (&fleet, &url);
                s.spawn(move || {
                    ControlPlane::start_with(
                        &fleet.nix,
                        &fleet.dir().join(format!("replica-{i}")),
                        &fleet.pki,
                        &["--database", url],
                    )
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|s| s.join().expect("thread").expect("replica starts"))
            .collect()
    });
    let made = replicas
        .iter()
        .filter(|r| r.log().contains("creating the PostgreSQL schema"))
        .count();
    assert_eq!(made, 1, "one replica made the schema, the other found it");
    let versions = pg
        .psql(
            "procurator",
            "SELECT count(*), max(version) FROM schema_version",
        )
        .expect("psql");
    // One row: neither replica wrote the version twice. Which version it is
    // belongs to the store's own migration test, not to this one.
    let (rows, version) = versions.trim().split_once('|').expect("count|version");
    assert_eq!(rows, "1", "{versions}");
    assert!(version.parse::<u32>().is_ok_and(|v| v > 0), "{versions}");
    let rows = pg
        .psql("procurator", "SELECT count(*) FROM replicas")
        .expect("psql");
    assert_eq!(rows.trim(), "2", "both replicas registered");
}

#[test]
fn a_rollout_survives_postgresql_killed_and_restarted() {
    let (mut fleet, mut pg) = fleet_and_database();
    let (id, closures) = rollout_in_flight(&mut fleet, &pg.url("procurator"));
    let before = committed_events(&pg, &id);
    pg.kill().expect("kill -9 the postmaster");
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again().expect("postgres again");

    assert_rollout_finished(&fleet, &id, &closures);
    let after = committed_events(&pg, &id);
    assert!(
        after.starts_with(&before),
        "every event committed before the crash is kept: {before:?} then {after:?}"
    );
}

/// The primary dies and its synchronous standby is promoted: the control
/// plane, given both hosts with `target_session_attrs=read-write`, finds
/// the new primary by itself and the rollout finishes there.
#[test]
fn a_rollout_survives_failover_to_a_promoted_standby() {
    let (mut fleet, mut primary) = fleet_and_database();
    let standby = Postgres::standby_of(&primary).expect("standby");
    primary.make_synchronous().expect("synchronous replication");
    let url = format!(
        "host={},{} port={},{} user={} dbname=procurator target_session_attrs=read-write",
        primary.socket_dir().display(),
        standby.socket_dir().display(),
        primary.port(),
        standby.port(),
        procurator_integration_tests::postgres::USER,
    );
    let (id, closures) = rollout_in_flight(&mut fleet, &url);
    let before = committed_events(&primary, &id);
    primary.kill().expect("kill -9 the primary");
    standby.promote().expect("promote the standby");
    assert!(!standby.is_standby().expect("psql"), "promoted");

    assert_rollout_finished(&fleet, &id, &closures);
    let after = committed_events(&standby, &id);
    assert!(
        after.starts_with(&before),
        "every event acknowledged by the old primary is on the new one: {before:?} then {after:?}"
    );
}

/// The control plane on `url`, every agent connected, and a rollout of one
/// machine at a time whose first machine is activating. Returns the
/// deployment's id and each machine's new closure.
fn rollout_in_flight(fleet: &mut Fleet, url: &str) -> (String, Closures) {
    fleet
        .control_plane
        .restart_with(&fleet.nix, &["--database", url])
        .expect("on postgres");
    for m in MACHINES {
        fleet.start_agent(m).expect("agent");
    }
    let all: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet.wait_connected(&all).expect("connected");
    let settings = json!({ "generation": 2, "activationDelay": 3 });
    let rollout = json!({ "rollout": { "maxInFlight": 1 } });
    let (closures, artifact, _) =
        procurator_integration_tests::scenario::prepare(fleet, &settings, &rollout)
            .expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) =
        procurator_integration_tests::scenario::submit(&ctl, &artifact, &[]).expect("submit");
    wait_for("an activation to start", Duration::from_secs(60), || {
        Ok(MACHINES
            .iter()
            .any(|m| {
                procurator_integration_tests::scenario::activation_count(
                    fleet.host(m),
                    &closures[*m],
                ) > 0
            })
            .then_some(()))
    })
    .expect("activating");
    (id, closures)
}

/// Deployment `id` succeeded with one activation per machine, after the
/// control plane reconnected to PostgreSQL.
fn assert_rollout_finished(fleet: &Fleet, id: &str, closures: &Closures) {
    let deployment =
        procurator_integration_tests::scenario::wait_final(fleet, id, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    assert_eq!(
        deployment["state"],
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}\n{}",
        fleet.logs()
    );
    for m in MACHINES {
        let host = fleet.host(m);
        host.assert_on(&closures[m], "system-2-link");
        assert_eq!(
            procurator_integration_tests::scenario::activation_count(host, &closures[m]),
            1,
            "{m} activated once"
        );
    }
    let log = fleet.control_plane.log();
    assert!(log.contains("reconnected to PostgreSQL"), "{log}");
}

/// The revisions of deployment `id`'s events stored in `pg`.
fn committed_events(pg: &Postgres, id: &str) -> Vec<String> {
    pg.psql(
        "procurator",
        &format!("SELECT revision FROM events WHERE deployment_id = '{id}' ORDER BY revision"),
    )
    .expect("psql")
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn the_store_is_reached_over_tls_with_the_server_certificate_checked() {
    let fleet = fleet_without_agents();
    // The fleet CA's server certificate (it names 127.0.0.1) serves as the
    // database server's too.
    let server = fleet.pki.control_plane();
    let pg = Postgres::start_with_tls(&server.cert, &server.key).expect("postgres with TLS");
    pg.psql("postgres", "CREATE DATABASE procurator")
        .expect("create database");
    let over_tcp = |options: &str| {
        format!(
            "postgres://{}@127.0.0.1:{}/procurator?{options}",
            procurator_integration_tests::postgres::USER,
            pg.port()
        )
    };
    let start = |name: &str, url: &str| {
        let dir = fleet.dir().join(name);
        let started = ControlPlane::start_with(&fleet.nix, &dir, &fleet.pki, &["--database", url]);
        let log = std::fs::read_to_string(dir.join("control-plane-1.log")).unwrap_or_default();
        (started, log)
    };

    let ca = fleet.pki.ca();
    let (verified, log) = start(
        "verified",
        &over_tcp(&format!("sslmode=verify-full&sslrootcert={}", ca.display())),
    );
    let _verified = verified.unwrap_or_else(|e| panic!("{e:#}\n{log}"));
    assert!(log.contains("over TLS"), "{log}");
    let encrypted: u32 = pg
        .psql(
            "procurator",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE s.ssl AND a.datname = 'procurator'",
        )
        .expect("psql")
        .parse()
        .expect("a count");
    // The writer, two readers and the log's follower.
    assert!(encrypted >= 4, "{encrypted} connections over TLS");

    // A server certificate another CA signed is refused.
    let other =
        procurator_integration_tests::pki::Pki::init(&fleet.nix, &fleet.dir().join("other-ca"))
            .expect("another CA");
    let (refused, log) = start(
        "other-ca",
        &over_tcp(&format!(
            "sslmode=verify-full&sslrootcert={}",
            other.ca().display()
        )),
    );
    assert!(refused.is_err(), "started against an unknown CA:\n{log}");
    assert!(log.contains("certificate"), "{log}");

    // And the server refuses a connection without TLS.
    let (plain, log) = start("plain", &over_tcp("sslmode=disable"));
    assert!(plain.is_err(), "started without TLS:\n{log}");
    assert!(log.contains("no encryption"), "{log}");
}
