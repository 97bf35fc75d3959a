//! Rollouts end to end: three agents on their own test hosts pull signed
//! closures from a file:// cache with real Nix and activate them; failures
//! roll back to exactly what ran before.

use procurator_integration_tests::{Fleet, MACHINES, fixture};
use serde_json::{Value, json};

fn state(machine: &Value) -> &str {
    machine
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or("MACHINE_STATE_UNSPECIFIED")
}

/// `ROLLED_BACK`, `rolled back` and `rolled-back` all read the same.
fn normalized(text: &str) -> String {
    text.to_lowercase().replace(['_', ' '], "-")
}

#[test]
fn three_agents_converge_on_a_deployment() {
    let fleet = Fleet::start().expect("fleet");
    let (closures, artifact, commit) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");

    let out = ctl
        .run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit");
    out.expect_code(0).expect("submit --wait succeeds");

    for m in MACHINES {
        let host = fleet.host(m);
        assert_ne!(closures[m], fleet.initial[m]);
        host.assert_on(&closures[m], "system-2-link");
        assert_eq!(
            host.booted_system().expect("booted").as_deref(),
            Some(fleet.initial[m].as_str()),
            "{m}: nothing rebooted"
        );
    }

    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    assert_eq!(
        deployment["state"], "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );
    for (m, status) in Fleet::machine_states(&deployment) {
        assert_eq!(state(&status), "MACHINE_STATE_SUCCEEDED", "{m}: {status}");
    }

    // The agents report what they run now.
    let agents = fleet.agents().expect("agents");
    for m in MACHINES {
        let agent = agents
            .iter()
            .find(|a| a["machine"] == m)
            .expect("agent listed");
        assert_eq!(agent["currentSystem"], closures[m].as_str(), "{agent}");
    }
}

#[test]
fn the_same_closures_again_are_skipped_without_copying() {
    let fleet = Fleet::start().expect("fleet");
    let (closures, artifact, _) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("first deployment succeeds");

    // Any copy attempt would now fail: the cache is gone.
    std::fs::rename(&fleet.cache, fleet.dir().join("cache-moved-away")).expect("move the cache");
    let (again, commit) = fleet.write_deployment(&closures).expect("second artifact");
    let out = ctl
        .run(&["submit", again.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit again");
    out.expect_code(0)
        .expect("a deployment with nothing to do succeeds");

    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(machines.len(), MACHINES.len(), "{deployment}");
    for (m, status) in machines {
        assert_eq!(state(&status), "MACHINE_STATE_SKIPPED", "{m}: {status}");
    }
    for m in MACHINES {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(closures[m].as_str())
        );
        assert_eq!(
            host.system_generation().expect("generation"),
            "system-2-link",
            "{m}: no new generation"
        );
    }
}

#[test]
fn a_failing_health_check_rolls_back_to_the_old_closure() {
    let fleet = Fleet::start().expect("fleet");
    // Every activation prints 40 lines: more than a tail, all in the log.
    let settings = json!({
        "generation": 1,
        "activationOutput": 40,
        "machines": { "worker-2": { "health": "broken" } }
    });
    let (closures, artifact, commit) = fleet.prepare(&settings).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");

    let out = ctl
        .run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit");
    out.expect_code(3)
        .expect("a rolled-back machine fails the deployment");
    let said = out.all();
    assert!(
        said.contains("/run/current-system/health"),
        "submit --wait says which check failed: {out}"
    );

    let worker2 = fleet.host("worker-2");
    // Runs the old closure again; neither profile nor boot entry moved.
    worker2.assert_on(&fleet.initial["worker-2"], "system-1-link");
    for m in ["control-plane-1", "worker-1"] {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
        assert_eq!(
            host.system_profile().expect("profile").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
    }

    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    assert_eq!(
        deployment["state"], "DEPLOYMENT_STATE_FAILED",
        "{deployment}"
    );
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        state(&machines["worker-2"]),
        "MACHINE_STATE_ROLLED_BACK",
        "{deployment}"
    );
    assert_eq!(
        machines["worker-2"]["failedPhase"], "MACHINE_STATE_CHECKING",
        "{deployment}"
    );
    for m in ["control-plane-1", "worker-1"] {
        assert_eq!(
            state(&machines[m]),
            "MACHINE_STATE_SUCCEEDED",
            "{m}: {deployment}"
        );
    }

    // `watch` replays it as plain text (stdout is a pipe, not a tty).
    let id = deployment["id"].as_str().expect("deployment id");
    let watched = ctl.run(&["watch", id]).expect("watch");
    watched
        .expect_code(3)
        .expect("watch of a failed deployment");
    let text = normalized(&watched.stdout);
    assert!(
        text.contains("rolled-back"),
        "watch shows the rollback: {watched}"
    );
    assert!(watched.stdout.contains("worker-2"), "{watched}");
    assert!(
        watched.stdout.contains("/run/current-system/health"),
        "watch shows why (the check's command): {watched}"
    );

    // Each copy from the file:// cache ended at 100 %, in bytes from the
    // narinfos (Nix reports none from such a cache).
    let events = ctl
        .run(&["watch", id, "--output", "json"])
        .expect("watch json");
    for m in MACHINES {
        let full = events.stdout.lines().any(|line| {
            let e: Value = serde_json::from_str(line).unwrap_or_default();
            let copy = &e["copy"];
            e["machine"] == *m
                && copy["bytesExpected"].as_u64().is_some_and(|n| n > 0)
                && copy["bytesDone"] == copy["bytesExpected"]
        });
        assert!(full, "{m}: no copy reached its expected bytes: {events}");
    }

    // The rolled-back machine's log: without a deployment, its newest.
    let logs = ctl.run(&["logs", "worker-2"]).expect("logs");
    logs.expect_code(0).expect("logs of worker-2");
    expect_in_order(
        &logs.stdout,
        &[
            &format!("# worker-2 in {id} (rolled-back)"),
            "== nix copy --from ",
            "switch-to-configuration test: exit status: 0",
            "activation step 1 of 40",
            "activation step 40 of 40",
            "== health check 1/1 `test \"$(cat /run/current-system/health)\" = ok`, attempt 1: failed",
            &format!("== rolling back to {}", fleet.initial["worker-2"]),
            "switch-to-configuration test: exit status: 0",
            "== rolled-back: checking failed",
        ],
    );
    // A machine that succeeded, by deployment; JSON for scripts.
    let logs = ctl
        .run(&["logs", id, "worker-1", "--output", "json"])
        .expect("logs json");
    logs.expect_code(0).expect("logs of worker-1");
    let log: Value = serde_json::from_str(&logs.stdout).expect("one JSON object");
    assert_eq!(
        (&log["machine"], &log["deploymentId"], &log["state"]),
        (&json!("worker-1"), &json!(id), &json!("succeeded")),
        "{log}"
    );
    let output = log["output"].as_str().expect("output");
    expect_in_order(
        output,
        &[
            "activation step 40 of 40",
            "health check 1/1",
            "attempt 1: passed",
            "confirmation over a new connection",
            "switch-to-configuration boot: exit status: 0",
            &format!("== succeeded: {} runs", closures["worker-1"]),
        ],
    );
    // History: the deployment, how it ended and why.
    let history = ctl.run(&["machine", "worker-2"]).expect("machine");
    history.expect_code(0).expect("machine worker-2");
    let row = history
        .stdout
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} in the history: {history}"));
    assert!(row.contains("rolled-back (checking)"), "{history}");
    assert!(row.contains("yes"), "a log is kept: {history}");
    // The same through grpcurl: CI may read it, an agent may not.
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let ci = fleet.pki.identity("ci", "github");
    let method = "procurator.v1.DeploymentService/GetMachineHistory";
    let page = grpcurl
        .call_json(&ci, method, r#"{"machine": "worker-2", "pageSize": 1}"#)
        .expect("GetMachineHistory");
    assert_eq!(page["entries"][0]["deploymentId"], json!(id), "{page}");
    assert_eq!(page["entries"][0]["hasLog"], true, "{page}");
    // Its only deployment (the first system was installed, not deployed).
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page.get("nextPageToken"), None, "{page}");
    let agent = fleet.pki.identity("agent", "worker-1");
    let refused = grpcurl
        .call(
            Some(&agent),
            "procurator.v1.DeploymentService/GetMachineLog",
            r#"{"machine": "worker-2"}"#,
        )
        .expect("grpcurl");
    assert_eq!(
        procurator_integration_tests::ctl::grpc_code(&refused).as_deref(),
        Some("PermissionDenied"),
        "{refused}"
    );
    // Asking for what is not there says so, and exits non-zero.
    let missing = ctl.run(&["logs", id, "db-9"]).expect("logs of nothing");
    assert_ne!(missing.code, Some(0), "{missing}");
    assert!(
        missing
            .all()
            .contains(&format!("deployment {id} has no row for db-9")),
        "{missing}"
    );
}

/// Each of `wanted` is found in `text` after the one before.
fn expect_in_order(text: &str, wanted: &[&str]) {
    let mut at = 0;
    for w in wanted {
        match text[at..].find(w) {
            Some(found) => at += found + w.len(),
            None => panic!("{w:?} (after byte {at}) is not in:\n{text}"),
        }
    }
}

#[test]
fn an_unsigned_closure_is_refused_and_the_host_stays() {
    let fleet = Fleet::start().expect("fleet");
    let closures = fleet.build(&json!({ "generation": 1 })).expect("build");
    fleet
        .publish_unsigned(&closures)
        .expect("publish without a key");
    let (artifact, commit) = fleet.write_deployment(&closures).expect("artifact");
    let ctl = fleet.ctl().expect("ctl");

    let out = ctl
        .run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit");
    out.expect_code(3).expect("nothing could be copied");

    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    for (m, status) in Fleet::machine_states(&deployment) {
        assert_eq!(state(&status), "MACHINE_STATE_FAILED", "{m}: {status}");
        assert_eq!(
            status["failedPhase"], "MACHINE_STATE_COPYING",
            "{m}: {status}"
        );
        let reason = status["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(
                "is not signed by a key this machine trusts (it trusts: procurator-test-1)"
            ),
            "{m}: the reason names the missing signature and the key trusted: {status}"
        );
    }
    for m in MACHINES {
        let host = fleet.host(m);
        let old = Some(fleet.initial[m].as_str());
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            old,
            "{m}"
        );
        assert_eq!(
            host.system_profile().expect("profile").as_deref(),
            old,
            "{m}"
        );
        assert!(
            !host.has_path(&closures[m]),
            "{m}: the unsigned closure is not in the host's store"
        );
    }
}

#[test]
fn a_failing_activation_leaves_the_old_closure_running() {
    let fleet = Fleet::start().expect("fleet");
    let settings =
        json!({ "generation": 1, "machines": { "worker-1": { "failActivation": true } } });
    let (closures, artifact, commit) = fleet.prepare(&settings).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");

    let out = ctl
        .run(&["submit", artifact.to_str().expect("utf-8 path"), "--wait"])
        .expect("submit");
    out.expect_code(3).expect("worker-1 fails");

    let worker1 = fleet.host("worker-1");
    let old = Some(fleet.initial["worker-1"].as_str());
    assert_eq!(worker1.current_system().expect("current").as_deref(), old);
    assert_eq!(worker1.system_profile().expect("profile").as_deref(), old);
    assert_eq!(worker1.boot_entry().expect("boot").as_deref(), old);
    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
    let machines = Fleet::machine_states(&deployment);
    let worker1_state = state(&machines["worker-1"]);
    assert!(
        ["MACHINE_STATE_ROLLED_BACK", "MACHINE_STATE_FAILED"].contains(&worker1_state),
        "{deployment}"
    );
    assert_eq!(
        machines["worker-1"]["failedPhase"], "MACHINE_STATE_ACTIVATING",
        "{deployment}"
    );
    assert_eq!(
        fleet
            .host("worker-2")
            .current_system()
            .expect("current")
            .as_deref(),
        Some(closures["worker-2"].as_str())
    );
}

/// The harness's own publishing must not sign by accident: the unsigned
/// cache really carries no signature.
#[test]
fn unsigned_publishing_carries_no_signature() {
    let nix = procurator_integration_tests::NixEnv::temp().expect("nix");
    let dir = tempfile::tempdir().expect("tempdir");
    let fx =
        procurator_integration_tests::Fixture::copy_to(&dir.path().join("flake")).expect("fixture");
    let closures = fx.build(&nix).expect("build");
    let cache = dir.path().join("cache");
    fixture::publish(&nix, &cache, None, &closures).expect("publish");
    for entry in std::fs::read_dir(&cache).expect("cache dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let info = std::fs::read_to_string(&path).expect("narinfo");
            assert!(!info.contains("Sig:"), "{}: {info}", path.display());
        }
    }
}
