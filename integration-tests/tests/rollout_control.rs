//! Controlling a rollout end to end (docs/rollouts.md): waves and the
//! failure budget, supersede, cancel, stale commits, idempotent resubmits,
//! rollback and offline agents, each against a fleet of its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use procurator_integration_tests::scenario::{
    self, activation_count, activations, normalized, state, submit, wait_final, wait_machine,
};
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES};
use serde_json::{Value, json};

/// Long enough for any of these rollouts (they take seconds); only catches
/// hangs.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The host still runs what it started with, its profile and boot entry
/// never moved, nothing was activated and the new closure was never copied.
fn assert_untouched(fleet: &Fleet, machine: &str, new_closure: &str) {
    let host = fleet.host(machine);
    host.assert_on(&fleet.initial[machine], "system-1-link");
    assert!(
        activations(host).is_empty(),
        "{machine} activated something: {:?}",
        activations(host)
    );
    assert!(
        !host.has_path(new_closure),
        "{machine}: {new_closure} was copied"
    );
}

fn assert_runs(fleet: &Fleet, machine: &str, closure: &str) {
    let host = fleet.host(machine);
    let want = Some(closure);
    assert_eq!(
        host.current_system().expect("current").as_deref(),
        want,
        "{machine}: current system"
    );
    assert_eq!(
        host.system_profile().expect("profile").as_deref(),
        want,
        "{machine}: profile"
    );
    assert_eq!(
        host.boot_entry().expect("boot").as_deref(),
        want,
        "{machine}: boot entry"
    );
}

/// Waits until the (slow) machine's activation has started on its host.
fn wait_activation_started(fleet: &Fleet, machine: &str, closure: &str) {
    let host = fleet.host(machine);
    procurator_integration_tests::wait_for(
        &format!("{machine} to start activating {closure}"),
        ROLLOUT_TIMEOUT,
        || Ok((activation_count(host, closure) > 0).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
}

#[test]
fn a_failing_canary_halts_the_rollout_and_the_rest_is_never_touched() {
    let fleet = Fleet::start().expect("fleet");
    let settings = json!({
        "generation": 1,
        "healthCheckTimeout": 3,
        "machines": { "worker-1": { "health": "broken" } }
    });
    let rollout = json!({ "rollout": {
        "waves": [
            { "name": "control-plane", "roles": ["control-plane"] },
            { "name": "canary", "labels": ["worker"], "count": 1 },
            { "name": "rest" }
        ],
        "failureBudget": 0
    }});
    let (closures, artifact, commit) =
        scenario::prepare(&fleet, &settings, &rollout).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");

    let out = ctl
        .run(&["submit", path(&artifact), "--wait"])
        .expect("submit");
    out.expect_code(3)
        .expect("a halted rollout is not a success");

    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_HALTED",
        "{deployment}"
    );
    let reason = deployment["haltedReason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "the halt has a reason: {deployment}");
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        state(&machines["control-plane-1"]),
        "MACHINE_STATE_SUCCEEDED",
        "{deployment}"
    );
    assert_eq!(
        state(&machines["worker-1"]),
        "MACHINE_STATE_ROLLED_BACK",
        "{deployment}"
    );
    // It failed where the settings broke it: its health check.
    assert_eq!(
        machines["worker-1"]["failedPhase"], "MACHINE_STATE_CHECKING",
        "{deployment}"
    );
    assert_eq!(
        state(&machines["worker-2"]),
        "MACHINE_STATE_CANCELLED",
        "{deployment}"
    );
    assert!(
        normalized(machines["worker-2"]["reason"].as_str().unwrap_or_default()).contains("halted"),
        "worker-2 was cancelled because the rollout halted: {deployment}"
    );
    // The waves as planned: one machine each.
    let waves = deployment["waves"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = waves.iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(names, ["control-plane", "canary", "rest"], "{deployment}");

    assert_runs(&fleet, "control-plane-1", &closures["control-plane-1"]);
    // The canary rolled back to exactly what ran before.
    let worker1 = fleet.host("worker-1");
    let old1 = Some(fleet.initial["worker-1"].as_str());
    assert_eq!(worker1.current_system().expect("current").as_deref(), old1);
    assert_eq!(worker1.system_profile().expect("profile").as_deref(), old1);
    assert_untouched(&fleet, "worker-2", &closures["worker-2"]);

    // `watch` says the rollout halted and which machine used up the budget.
    let id = deployment["id"].as_str().expect("id");
    let watched = ctl.run(&["watch", id]).expect("watch");
    watched
        .expect_code(3)
        .expect("watch of a halted deployment");
    let text = normalized(&watched.stdout);
    assert!(text.contains("halted"), "watch shows the halt: {watched}");
    assert!(text.contains("wave"), "watch shows the waves: {watched}");
    let halt_line = watched
        .stdout
        .lines()
        .find(|l| normalized(l).contains("rollout-halted"))
        .unwrap_or_default();
    assert!(
        halt_line.contains("worker-1"),
        "watch names the machine that used up the budget: {watched}"
    );
}

#[test]
fn a_newer_deployment_supersedes_the_machines_not_started() {
    let fleet = Fleet::start().expect("fleet");
    // worker-2 goes first, alone, and takes its time: the others are still
    // pending when the second deployment arrives.
    let first_settings = json!({
        "generation": 1,
        "machines": { "worker-2": { "activationDelay": 6 } }
    });
    let rollout = json!({ "rollout": { "waves": [
        { "name": "slow", "machines": ["worker-2"] },
        { "name": "rest" }
    ]}});
    let (first, first_artifact, first_commit) =
        scenario::prepare(&fleet, &first_settings, &rollout).expect("prepare the first");
    let ctl = fleet.ctl().expect("ctl");
    let (first_id, created) = submit(&ctl, &first_artifact, &[]).expect("submit the first");
    assert!(created);
    wait_activation_started(&fleet, "worker-2", &first["worker-2"]);

    let (second, second_artifact, _) =
        scenario::prepare(&fleet, &json!({ "generation": 2 }), &json!({}))
            .expect("prepare the second");
    let (second_id, _) = submit(&ctl, &second_artifact, &[]).expect("submit the second");
    assert_ne!(first_id, second_id);

    let second_deployment =
        wait_final(&fleet, &second_id, ROLLOUT_TIMEOUT).expect("second finishes");
    assert_eq!(
        state(&second_deployment),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{second_deployment}"
    );
    let first_deployment = wait_final(&fleet, &first_id, ROLLOUT_TIMEOUT).expect("first finishes");
    assert_eq!(
        first_deployment["gitCommit"],
        first_commit.as_str(),
        "{first_deployment}"
    );
    assert_eq!(
        state(&first_deployment),
        "DEPLOYMENT_STATE_SUPERSEDED",
        "{first_deployment}"
    );
    let machines = Fleet::machine_states(&first_deployment);
    for m in ["control-plane-1", "worker-1"] {
        assert_eq!(
            state(&machines[m]),
            "MACHINE_STATE_SUPERSEDED",
            "{m}: {first_deployment}"
        );
        assert_eq!(
            activation_count(fleet.host(m), &first[m]),
            0,
            "{m} never activated the first deployment's closure"
        );
    }
    // worker-2 finished (or rolled back) the first one before running the
    // second: its row is final and not superseded mid-activation.
    let worker2 = state(&machines["worker-2"]);
    assert!(
        [
            "MACHINE_STATE_SUCCEEDED",
            "MACHINE_STATE_ROLLED_BACK",
            "MACHINE_STATE_SUPERSEDED"
        ]
        .contains(&worker2),
        "{first_deployment}"
    );
    for m in MACHINES {
        assert_runs(&fleet, m, &second[m]);
    }
}

#[test]
fn cancel_stops_the_rollout_and_leaves_pending_machines_alone() {
    let fleet = Fleet::start().expect("fleet");
    let settings = json!({
        "generation": 1,
        "machines": { "worker-2": { "activationDelay": 6 } }
    });
    let rollout = json!({ "rollout": { "waves": [
        { "name": "slow", "machines": ["worker-2"] },
        { "name": "rest" }
    ]}});
    let (closures, artifact, _) = scenario::prepare(&fleet, &settings, &rollout).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");
    wait_activation_started(&fleet, "worker-2", &closures["worker-2"]);

    let out = ctl
        .run(&["cancel", &id, "--reason", "stop it", "--wait"])
        .expect("cancel");
    out.expect_code(0).expect("the deployment ends cancelled");

    let deployment = scenario::deployment(&fleet, &id).expect("deployment");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_CANCELLED",
        "{deployment}"
    );
    let machines = Fleet::machine_states(&deployment);
    for m in ["control-plane-1", "worker-1"] {
        assert_eq!(
            state(&machines[m]),
            "MACHINE_STATE_CANCELLED",
            "{m}: {deployment}"
        );
        assert_untouched(&fleet, m, &closures[m]);
    }
    // The machine mid-activation either rolled back or finished: the host
    // and its row agree, and it is on exactly one of the two closures.
    let worker2 = fleet.host("worker-2");
    let on = scenario::consistent_on(worker2, &fleet.initial["worker-2"], &closures["worker-2"])
        .expect("worker-2 consistent");
    let row = state(&machines["worker-2"]);
    match on {
        "old" => assert!(
            ["MACHINE_STATE_ROLLED_BACK", "MACHINE_STATE_CANCELLED"].contains(&row),
            "worker-2 runs the old closure: {deployment}"
        ),
        _ => assert_eq!(
            row, "MACHINE_STATE_SUCCEEDED",
            "worker-2 runs the new closure: {deployment}"
        ),
    }
}

#[test]
fn an_older_commit_is_refused_unless_forced() {
    let fleet = Fleet::start().expect("fleet");
    let now = now_secs();
    let (_, newer, _) = scenario::prepare(
        &fleet,
        &json!({ "generation": 1 }),
        &json!({ "gitCommitTime": now }),
    )
    .expect("prepare the newer commit");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", path(&newer), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("the newer commit deploys");

    let (older_closures, older, older_commit) = scenario::prepare(
        &fleet,
        &json!({ "generation": 2 }),
        &json!({ "gitCommitTime": now - 3600 }),
    )
    .expect("prepare the older commit");
    let refused = ctl
        .run(&["submit", path(&older)])
        .expect("submit the older");
    refused.expect_code(1).expect("an older commit is refused");
    assert!(
        refused.all().contains("--force"),
        "the refusal points at --force: {refused}"
    );
    assert!(
        fleet.deployment_by_commit(&older_commit).is_err(),
        "nothing was stored for the refused artifact"
    );
    for m in MACHINES {
        assert_eq!(
            activation_count(fleet.host(m), &older_closures[m]),
            0,
            "{m}"
        );
    }

    // The downgrade without a time: a fresh commit id and the hosts' first
    // closures. Nothing shows it is newer, so it is refused too.
    let (downgrade, downgrade_commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
    let refused = ctl
        .run(&["submit", path(&downgrade)])
        .expect("submit the downgrade");
    refused
        .expect_code(1)
        .expect("an artifact without a time is refused");
    assert!(refused.all().contains("has no gitCommitTime"), "{refused}");
    assert!(fleet.deployment_by_commit(&downgrade_commit).is_err());

    let forced = ctl
        .run(&["submit", path(&older), "--force", "--wait"])
        .expect("submit --force");
    forced
        .expect_code(0)
        .expect("--force deploys the older commit");
    assert!(forced.stdout.contains("forced by admin"), "{forced}");
    for m in MACHINES {
        assert_runs(&fleet, m, &older_closures[m]);
    }
    let recorded = fleet.deployment_by_commit(&older_commit).expect("stored");
    assert_eq!(recorded["forcedBy"], "admin", "{recorded}");
    let listed = ctl
        .run(&["deployments", "--output", "json"])
        .expect("deployments");
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json");
    assert_eq!(listed[0]["forcedBy"], "admin", "{listed}");
}

#[test]
fn submitting_the_same_artifact_twice_is_one_deployment() {
    let fleet = Fleet::start().expect("fleet");
    let (_, artifact, commit) =
        scenario::prepare(&fleet, &json!({ "generation": 1 }), &json!({})).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (first, created) = submit(&ctl, &artifact, &[]).expect("first submit");
    assert!(created, "the first submission creates the deployment");
    let (again, created_again) = submit(&ctl, &artifact, &[]).expect("second submit");
    assert_eq!(
        first, again,
        "the same artifact returns the same deployment"
    );
    assert!(!created_again, "the second submission creates nothing");

    let all = scenario::deployments(&fleet).expect("deployments");
    let of_commit = all
        .iter()
        .filter(|d| d["gitCommit"] == commit.as_str())
        .count();
    assert_eq!(of_commit, 1, "{all:?}");
    let done = wait_final(&fleet, &first, ROLLOUT_TIMEOUT).expect("finishes");
    assert_eq!(state(&done), "DEPLOYMENT_STATE_SUCCEEDED", "{done}");
    for m in MACHINES {
        assert_eq!(
            activations(fleet.host(m))
                .iter()
                .filter(|l| l.starts_with("test "))
                .count(),
            1,
            "{m} activated once: {:?}",
            activations(fleet.host(m))
        );
    }
}

#[test]
fn rollback_deploys_the_previous_closures_as_a_new_deployment() {
    let fleet = Fleet::start().expect("fleet");
    let ctl = fleet.ctl().expect("ctl");
    let (first, first_artifact, _) =
        scenario::prepare(&fleet, &json!({ "generation": 1 }), &json!({}))
            .expect("prepare the first");
    let (first_id, _) = submit(&ctl, &first_artifact, &["--wait"]).expect("first");
    let (second, second_artifact, _) =
        scenario::prepare(&fleet, &json!({ "generation": 2 }), &json!({}))
            .expect("prepare the second");
    let (second_id, _) = submit(&ctl, &second_artifact, &["--wait"]).expect("second");
    for m in MACHINES {
        assert_runs(&fleet, m, &second[m]);
    }

    let out = ctl.run(&["rollback", "--wait"]).expect("rollback");
    out.expect_code(0).expect("the rollback succeeds");
    let rollback_id = out
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(
        !rollback_id.is_empty(),
        "rollback prints the new deployment's id: {out}"
    );
    assert_ne!(rollback_id, first_id);
    assert_ne!(rollback_id, second_id);

    let deployment = scenario::deployment(&fleet, &rollback_id).expect("the rollback deployment");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );
    assert_eq!(deployment["rollbackOf"], first_id.as_str(), "{deployment}");
    let machines = Fleet::machine_states(&deployment);
    for m in MACHINES {
        assert_eq!(
            machines[m]["closure"],
            first[m].as_str(),
            "{m}: {deployment}"
        );
        assert_runs(&fleet, m, &first[m]);
    }
    assert_eq!(scenario::deployments(&fleet).expect("list").len(), 3);
}

#[test]
fn an_offline_agent_is_unreachable_then_converges_when_it_connects() {
    let mut fleet = Fleet::start_with(FleetOptions {
        agents: vec!["control-plane-1".into(), "worker-1".into()],
        ..FleetOptions::default()
    })
    .expect("fleet");
    let rollout = json!({ "rollout": { "failureBudget": 1, "unreachableAfter": 3 } });
    let (closures, artifact, _) =
        scenario::prepare(&fleet, &json!({ "generation": 1 }), &rollout).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");

    let deployment = wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("finishes");
    // One unreachable machine is within the budget: the rest deployed, and
    // the deployment says a machine was unreachable.
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_FAILED",
        "{deployment}"
    );
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        state(&machines["worker-2"]),
        "MACHINE_STATE_UNREACHABLE",
        "{deployment}"
    );
    for m in ["control-plane-1", "worker-1"] {
        assert_eq!(
            state(&machines[m]),
            "MACHINE_STATE_SUCCEEDED",
            "{m}: {deployment}"
        );
        assert_runs(&fleet, m, &closures[m]);
    }
    assert_untouched(&fleet, "worker-2", &closures["worker-2"]);

    // The agent comes back: the deployment is sent again and it converges.
    fleet
        .start_agent("worker-2")
        .expect("start worker-2's agent");
    let row = wait_machine(
        &fleet,
        &id,
        "worker-2",
        ROLLOUT_TIMEOUT,
        "succeeded",
        |m: &Value| state(m) == "MACHINE_STATE_SUCCEEDED",
    )
    .expect("worker-2 converges");
    assert_eq!(row["closure"], closures["worker-2"].as_str(), "{row}");
    assert_runs(&fleet, "worker-2", &closures["worker-2"]);
    let again = wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("final again");
    assert_eq!(
        state(&again),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "the state is computed again: {again}"
    );
}

#[test]
fn a_new_kernel_is_reported_as_needing_a_reboot() {
    let fleet = Fleet::start().expect("fleet");
    // Only worker-1's kernel changes; nothing may reboot (no allowReboot).
    let settings = json!({
        "generation": 1,
        "machines": { "worker-1": { "kernelVersion": "-6.1-procurator-test" } }
    });
    let (closures, artifact, commit) = fleet.prepare(&settings).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", path(&artifact), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("the deployment succeeds");
    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        machines["worker-1"]["rebootRequired"], true,
        "worker-1's kernel differs from the booted one: {deployment}"
    );
    for m in ["control-plane-1", "worker-2"] {
        assert_ne!(
            machines[m]["rebootRequired"], true,
            "{m}'s kernel did not change: {deployment}"
        );
    }
    for m in MACHINES {
        assert_runs(&fleet, m, &closures[m]);
        assert_eq!(
            fleet.host(m).booted_system().expect("booted").as_deref(),
            Some(fleet.initial[m].as_str()),
            "{m}: nothing rebooted"
        );
    }
}

/// `submit --on @LABEL` deploys exactly the labelled machines; the others
/// are not touched, not counted, and the deployment says what it was on.
#[test]
fn on_a_label_deploys_exactly_the_labelled_machines() {
    let fleet = Fleet::start().expect("fleet");
    let (closures, artifact, _) =
        scenario::prepare(&fleet, &json!({ "generation": 1 }), &json!({})).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");

    let typo = ctl
        .run(&["submit", path(&artifact), "--on", "@no-such-label"])
        .expect("submit");
    assert_eq!(typo.code, Some(1), "{typo}");
    assert!(
        typo.stderr.contains("matches no machine") && typo.stderr.contains("nothing was sent"),
        "{typo}"
    );
    assert!(scenario::deployments(&fleet).expect("list").is_empty());

    let (id, _) = submit(&ctl, &artifact, &["--on", "@compute", "--wait"]).expect("submit");
    let deployment = wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("final");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );
    assert_eq!(deployment["on"], json!(["@compute"]), "{deployment}");
    assert_eq!(deployment["machineTotal"], 2, "{deployment}");
    let rows: Vec<&str> = deployment["machines"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["machine"].as_str())
        .collect();
    assert_eq!(rows, ["worker-1", "worker-2"]);
    for m in ["worker-1", "worker-2"] {
        assert_runs(&fleet, m, &closures[m]);
    }
    assert_untouched(&fleet, "control-plane-1", &closures["control-plane-1"]);

    let listed = ctl.run(&["deployments"]).expect("deployments");
    listed.expect_code(0).expect("deployments");
    assert!(listed.stdout.contains("on @compute"), "{listed}");
}
