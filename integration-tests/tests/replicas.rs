//! Control-plane replicas on one PostgreSQL database behave as one control
//! plane: agents held by different replicas converge on a deployment
//! submitted to another, a watcher on yet another sees every event once and
//! in order, a failing canary halts the rollout for every replica's agents,
//! a Cancel reaches a machine in flight on another replica, and a replica
//! SIGKILLed in the middle of a rollout loses nothing. Real processes: a
//! PostgreSQL cluster of the test's own, 3–4 control planes, agents on
//! test hosts.

use std::collections::BTreeMap;
use std::time::Duration;

use procurator_integration_tests::control_plane::ControlPlane;
use procurator_integration_tests::postgres::Postgres;
use procurator_integration_tests::scenario::{self, activation_count, state, submit, wait_final};
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES, wait_for};
use serde_json::{Value, json};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// A fleet whose control plane is `n` replicas on one database; no agent
/// runs yet.
struct Replicas {
    fleet: Fleet,
    /// Replica 0 is the fleet's own control plane.
    others: Vec<ControlPlane>,
    pg: Postgres,
}

impl Replicas {
    fn start(n: usize) -> Self {
        let pg = Postgres::start().expect("postgres");
        pg.psql("postgres", "CREATE DATABASE procurator")
            .expect("create database");
        let url = pg.url("procurator");
        let mut fleet = Fleet::start_with(FleetOptions {
            agents: Vec::new(),
            ..FleetOptions::default()
        })
        .expect("fleet");
        fleet
            .control_plane
            .restart_with(&fleet.nix, &["--database", &url])
            .expect("replica 0 on postgres");
        let others = (1..n)
            .map(|i| {
                let dir = fleet.dir().join(format!("replica-{i}"));
                ControlPlane::start_with(&fleet.nix, &dir, &fleet.pki, &["--database", &url])
                    .expect("replica")
            })
            .collect();
        Self { fleet, others, pg }
    }

    fn replica(&self, i: usize) -> &ControlPlane {
        match i {
            0 => &self.fleet.control_plane,
            i => &self.others[i - 1],
        }
    }

    fn url(&self, i: usize) -> String {
        self.replica(i).url().expect("url")
    }

    /// Start each machine's agent dialled to the replicas listed, in turn.
    fn start_agents(&mut self, dial: &[(&str, &[usize])]) {
        for (machine, replicas) in dial {
            let urls: Vec<String> = replicas.iter().map(|&i| self.url(i)).collect();
            let mut opts = self.fleet.agent_options(machine).expect("options");
            opts.control_plane = urls.join(" ");
            let host = self.fleet.hosts.get_mut(*machine).expect("host");
            host.start_agent(&self.fleet.nix, &opts).expect("agent");
        }
        let all: Vec<String> = dial.iter().map(|(m, _)| m.to_string()).collect();
        self.fleet.wait_connected(&all).expect("connected");
    }

    fn sql(&self, query: &str) -> String {
        self.pg.psql("procurator", query).expect("psql")
    }

    /// Every revision of `id` in the log, in order.
    fn revisions_of(&self, id: &str) -> Vec<u64> {
        self.sql(&format!(
            "SELECT revision FROM events WHERE deployment_id = '{id}' ORDER BY revision"
        ))
        .lines()
        .map(|l| l.trim().parse().expect("a revision"))
        .collect()
    }

    /// Deployment `id` succeeded, and every machine runs its closure of
    /// `closures`, activated exactly once.
    fn assert_succeeded_once_each(&self, id: &str, closures: &BTreeMap<String, String>) {
        let deployment = wait_final(&self.fleet, id, ROLLOUT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()));
        assert_eq!(
            state(&deployment),
            "DEPLOYMENT_STATE_SUCCEEDED",
            "{deployment}\n{}",
            self.logs()
        );
        for m in MACHINES {
            let host = self.fleet.host(m);
            host.assert_on(&closures[m], "system-2-link");
            assert_eq!(
                activation_count(host, &closures[m]),
                1,
                "{m} activated exactly once: {:?}",
                scenario::activations(host)
            );
        }
    }

    fn logs(&self) -> String {
        let mut all = self.fleet.logs();
        for (i, cp) in self.others.iter().enumerate() {
            all.push_str(&format!(
                "\n--- replica {}:\n{}",
                i + 1,
                procurator_integration_tests::log_tail(&cp.log_path(), 60)
            ));
        }
        all
    }
}

/// `watch --output json` lines as JSON values.
fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn revisions(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| e["revision"].as_u64())
        .collect()
}

fn rollout_prepared(
    r: &Replicas,
    settings: &Value,
    rollout: &Value,
) -> (BTreeMap<String, String>, std::path::PathBuf) {
    let (closures, artifact, _) = scenario::prepare(&r.fleet, settings, rollout).expect("prepare");
    (closures.into_iter().collect(), artifact)
}

#[test]
fn replicas_on_one_database_act_as_one_control_plane() {
    let mut r = Replicas::start(4);
    // Each agent held by a replica of its own; the fourth holds none.
    r.start_agents(&[
        ("control-plane-1", &[0]),
        ("worker-1", &[1]),
        ("worker-2", &[2]),
    ]);
    let holders = r.sql("SELECT count(DISTINCT replica) FROM agents WHERE connected = 1");
    assert_eq!(holders.trim(), "3", "three replicas hold the agents");
    let ctl = r.fleet.ctl().expect("ctl");
    let submitter = ctl.with_url(&r.url(3));

    // Submitted on the fourth, watched on the second.
    let (closures, artifact) = rollout_prepared(&r, &json!({ "generation": 2 }), &json!({}));
    let (id, _) = submit(&submitter, &artifact, &[]).expect("submit");
    let watcher = ctl.with_url(&r.url(1));
    let watched = std::thread::spawn({
        let id = id.clone();
        move || {
            watcher
                .run(&["watch", &id, "--output", "json"])
                .expect("watch")
        }
    });
    r.assert_succeeded_once_each(&id, &closures);
    let watched = watched.join().expect("watch thread");
    watched.expect_code(0).expect("watch ends with success");
    assert_eq!(
        revisions(&events(&watched.stdout)),
        r.revisions_of(&id),
        "the watcher saw every event of the log once, in order: {watched}"
    );

    // A failing canary on one replica's agent halts the rollout for all.
    let settings = json!({
        "generation": 3,
        "healthCheckTimeout": 3,
        "machines": { "worker-1": { "health": "broken" } }
    });
    let rollout = json!({ "rollout": {
        "waves": [
            { "name": "control-plane", "roles": ["control-plane"] },
            { "name": "canary", "machines": ["worker-1"] },
            { "name": "rest" }
        ],
        "failureBudget": 0
    }});
    let (halting, artifact) = rollout_prepared(&r, &settings, &rollout);
    let (halted_id, _) = submit(&submitter, &artifact, &[]).expect("submit");
    let deployment = wait_final(&r.fleet, &halted_id, ROLLOUT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", r.logs()));
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_HALTED",
        "{deployment}"
    );
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        state(&machines["worker-2"]),
        "MACHINE_STATE_CANCELLED",
        "{deployment}"
    );
    assert_eq!(
        activation_count(r.fleet.host("worker-2"), &halting["worker-2"]),
        0
    );
    let replayed = ctl
        .with_url(&r.url(2))
        .run(&["watch", &halted_id, "--output", "json"])
        .expect("watch");
    let halts = events(&replayed.stdout)
        .iter()
        .filter(|e| e["type"] == "halted")
        .count();
    assert_eq!(halts, 1, "one halt, whichever replicas acted: {replayed}");

    // Cancel on one replica reaches the machine in flight on another.
    let settings = json!({
        "generation": 4,
        "machines": { "worker-1": { "activationDelay": 6 } }
    });
    let rollout = json!({ "rollout": { "waves": [
        { "name": "slow", "machines": ["worker-1"] },
        { "name": "rest" }
    ]}});
    let (cancelled, artifact) = rollout_prepared(&r, &settings, &rollout);
    let (cancelled_id, _) = submit(&submitter, &artifact, &[]).expect("submit");
    let worker1 = r.fleet.host("worker-1");
    wait_for("worker-1 to start activating", ROLLOUT_TIMEOUT, || {
        Ok((activation_count(worker1, &cancelled["worker-1"]) > 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", r.logs()));
    ctl.with_url(&r.url(2))
        .run(&["cancel", &cancelled_id, "--reason", "stop it", "--wait"])
        .expect("cancel")
        .expect_code(0)
        .expect("the deployment ends cancelled");
    let log = worker1.agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("cancellation received") && l.contains(&cancelled_id)),
        "worker-1, held by replica 1, was told of the cancel made on replica 2:\n{log}"
    );
    for m in ["control-plane-1", "worker-2"] {
        assert_eq!(activation_count(r.fleet.host(m), &cancelled[m]), 0, "{m}");
    }
}

/// Replays a deployment's machine events: the most machines in flight at
/// once, and the order in which machines were first sent.
fn in_flight_and_order(events: &[Value]) -> (usize, Vec<String>) {
    let mut flying = std::collections::BTreeSet::new();
    let mut most = 0;
    let mut sent = Vec::new();
    for e in events.iter().filter(|e| e["type"] == "machine") {
        let machine = e["machine"].as_str().unwrap_or_default().to_owned();
        match e["state"].as_str().unwrap_or_default() {
            "sent" => {
                if !sent.contains(&machine) {
                    sent.push(machine.clone());
                }
                flying.insert(machine);
            }
            "succeeded" | "failed" | "rolled-back" | "cancelled" | "unreachable" => {
                flying.remove(&machine);
            }
            _ => {}
        }
        most = most.max(flying.len());
    }
    (most, sent)
}

#[test]
fn a_replica_killed_mid_rollout_loses_nothing() {
    let mut r = Replicas::start(3);
    // Each agent starts on its own replica and knows the others.
    r.start_agents(&[
        ("control-plane-1", &[0, 1, 2]),
        ("worker-1", &[1, 2, 0]),
        ("worker-2", &[2, 0, 1]),
    ]);
    let settings = json!({ "generation": 2, "activationDelay": 3 });
    let rollout = json!({ "rollout": {
        "waves": [
            { "name": "first", "machines": ["control-plane-1", "worker-1"] },
            { "name": "second" }
        ],
        "maxInFlight": 1
    }});
    let (closures, artifact) = rollout_prepared(&r, &settings, &rollout);
    let ctl = r.fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl.with_url(&r.url(0)), &artifact, &[]).expect("submit");
    // A watcher on the replica that dies, which moves on to the next.
    let watcher = ctl.with_url(&format!("{} {}", r.url(1), r.url(2)));
    let watched = std::thread::spawn({
        let id = id.clone();
        move || {
            watcher
                .run(&["watch", &id, "--output", "json"])
                .expect("watch")
        }
    });
    // worker-1, held by replica 1, is in the middle of its activation.
    let worker1 = r.fleet.host("worker-1");
    wait_for("worker-1 to start activating", ROLLOUT_TIMEOUT, || {
        Ok((activation_count(worker1, &closures["worker-1"]) > 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", r.logs()));
    r.others[0].kill().expect("SIGKILL replica 1");

    r.assert_succeeded_once_each(&id, &closures);
    // Nothing of the dead replica holds an agent.
    let on_dead = r.sql(
        "SELECT count(*) FROM agents WHERE connected = 1 AND replica NOT IN (SELECT id FROM replicas)",
    );
    assert_eq!(on_dead.trim(), "0");

    let log = events(
        &ctl.with_url(&r.url(2))
            .run(&["watch", &id, "--output", "json"])
            .expect("watch")
            .stdout,
    );
    let (most, order) = in_flight_and_order(&log);
    assert_eq!(most, 1, "maxInFlight held: {log:?}");
    assert_eq!(
        order.last().map(String::as_str),
        Some("worker-2"),
        "the second wave went last: {order:?}"
    );
    let watched = watched.join().expect("watch thread");
    watched.expect_code(0).expect("the watcher saw it finish");
    let seen = revisions(&events(&watched.stdout));
    assert_eq!(
        seen,
        r.revisions_of(&id),
        "the watcher that moved replicas saw every revision once: {watched}"
    );
}

#[test]
fn a_replica_cut_off_from_the_database_lets_its_agents_go_to_one_that_is_not() {
    let mut r = Replicas::start(1);
    // Replica 1 logs in as a role of its own, which can be cut off alone.
    r.sql(&format!(
        "CREATE ROLE cut_off LOGIN IN ROLE {}",
        procurator_integration_tests::postgres::USER
    ));
    let cut_url = r.pg.url("procurator").replace(
        &format!("user={}", procurator_integration_tests::postgres::USER),
        "user=cut_off",
    );
    let replica = ControlPlane::start_with(
        &r.fleet.nix,
        &r.fleet.dir().join("replica-1"),
        &r.fleet.pki,
        &["--database", &cut_url],
    )
    .expect("replica 1");
    r.others.push(replica);
    r.start_agents(&[("worker-1", &[1, 0])]);
    let held_by = |r: &Replicas| {
        r.sql("SELECT replica FROM agents WHERE machine = 'worker-1' AND connected = 1")
    };
    let first = held_by(&r);

    r.sql(
        "ALTER ROLE cut_off NOLOGIN;
         SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'cut_off'",
    );
    // Within its 10 s of grace, then the agent's backoff: it moves.
    wait_for(
        "worker-1 to move to replica 0",
        Duration::from_secs(60),
        || {
            let now = held_by(&r);
            Ok((!now.is_empty() && now != first).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", r.logs()));
    let log = r.others[0].log();
    assert!(
        log.contains("cannot write the store for 10s: ending every stream held here"),
        "{log}"
    );
    // And it is served there: a deployment reaches it.
    let (closures, artifact) = rollout_prepared(&r, &json!({ "generation": 2 }), &json!({}));
    let ctl = r.fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl.with_url(&r.url(0)), &artifact, &[]).expect("submit");
    wait_for("worker-1 to run the new closure", ROLLOUT_TIMEOUT, || {
        Ok((activation_count(r.fleet.host("worker-1"), &closures["worker-1"]) > 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{id}: {e:#}\n{}", r.logs()));
}
