//! The control plane on PostgreSQL (`--database postgres://…`): three agents
//! converge on a deployment exactly as on the embedded SQLite store, and what
//! was stored is there after a restart. The cluster is the test's own.

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
