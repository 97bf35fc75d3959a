//! Signed deployment intent end to end (DESIGN.md invariant 9): real agents
//! that trust CI's intent key, real Nix, real mTLS, a real control plane
//! whose store an attacker edits, and a rogue one holding its certificate. Every refusal is checked
//! on the host itself: the marker file a forbidden health check would
//! write, `/run/current-system`, the system profile and the host's store.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use procurator_integration_tests::fixture::Closures;
use procurator_integration_tests::rogue::RogueControlPlane;
use procurator_integration_tests::scenario::{self, state};
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES, SigningKey, wait_for};
use procurator_proto::v1::{DesiredState, HealthCheck, MachineState};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(180);
/// What an attacker's "health check" does, as root, if it ever runs.
const EVIL_CHECK: &str = "id > /run/PWNED; grep Cap /proc/self/status >> /run/PWNED; true";

/// A fleet whose agents act only on artifacts signed with CI's key or with
/// the keys named `trusted` (made here, returned); `untrusted` keys are
/// made too, for an attacker.
fn signed_fleet(trusted: &[&str], untrusted: &[&str]) -> (Fleet, Vec<SigningKey>) {
    let mut fleet = Fleet::start_with(FleetOptions {
        agents: Vec::new(),
        signed: true,
        ..FleetOptions::default()
    })
    .expect("fleet");
    let dir = fleet.dir().join("more-keys");
    let keys: Vec<SigningKey> = trusted
        .iter()
        .chain(untrusted)
        .map(|name| SigningKey::generate(&fleet.nix, &dir, name).expect("key"))
        .collect();
    let mut args = Vec::new();
    for key in &keys[..trusted.len()] {
        args.extend(["--intent-public-key", key.public.as_str()]);
    }
    for m in MACHINES {
        fleet.start_agent_with(m, &args).expect("agent");
    }
    let all: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet.wait_connected(&all).expect("connected");
    (fleet, keys)
}

fn edit(path: &Path, change: impl FnOnce(&mut Value)) {
    let mut value: Value =
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    change(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).expect("json")).expect("write");
}

fn add_evil_checks(value: &mut Value) {
    for m in MACHINES {
        value["blueprint"][m]["deployment"]["healthChecks"] =
            json!([{ "command": EVIL_CHECK, "timeout": 10 }]);
    }
}

/// Submits as CI (`submit --output json`, plus `args`), returns the id.
fn submit_as_ci(fleet: &Fleet, artifact: &Path, args: &[&str]) -> String {
    let ci = fleet
        .ctl()
        .expect("ctl")
        .with_identity(&fleet.pki.identity("ci", "github"));
    scenario::submit(&ci, artifact, args).expect("submit").0
}

/// Waits for the deployment to end FAILED with every row refused for a
/// reason containing `why`; then checks nothing ran on any host.
fn assert_refused_everywhere(fleet: &Fleet, id: &str, why: &str, running: &Closures) {
    let done = scenario::wait_final(fleet, id, TIMEOUT).expect("finishes");
    assert_eq!(state(&done), "DEPLOYMENT_STATE_FAILED", "{done:#}");
    for (m, row) in Fleet::machine_states(&done) {
        let reason = row["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("intent refused: ") && reason.contains(why),
            "{m}: {why:?} not in {reason:?}"
        );
    }
    assert_nothing_ran(fleet, running);
}

/// No marker on any host, and each still runs (and boots) what it ran.
fn assert_nothing_ran(fleet: &Fleet, running: &Closures) {
    for m in MACHINES {
        let host = fleet.host(m);
        assert!(
            !host.host_path("/run/PWNED").exists(),
            "{m}: the forbidden health check ran"
        );
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(running[m].as_str()),
            "{m}: /run/current-system"
        );
        assert_eq!(
            host.system_profile().expect("profile").as_deref(),
            Some(running[m].as_str()),
            "{m}: system profile"
        );
    }
}

#[test]
fn agents_run_only_what_ci_signed_and_never_an_older_statement() {
    let (mut fleet, keys) = signed_fleet(&["ops-1"], &["ci-2"]);
    let (ops, rogue) = (&keys[0], &keys[1]);
    let dir = fleet.dir().join("tampered");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let operator = fleet.ctl().expect("ctl");

    // Two signed deployments converge; watch names the key.
    let (gen1, a1, c1) = fleet.prepare(&json!({ "generation": 1 })).expect("gen1");
    fleet.sign(&a1, None).expect("sign");
    let out = operator
        .run(&["submit", a1.to_str().expect("utf-8"), "--wait"])
        .expect("submit");
    out.expect_code(0).expect("gen1 deploys");
    assert!(out.stdout.contains("signed by key ci-intent-1"), "{out}");
    let d1 = fleet.deployment_id(&c1).expect("d1");
    let (gen2, a2, _) = fleet.prepare(&json!({ "generation": 2 })).expect("gen2");
    fleet.sign(&a2, None).expect("sign");
    operator
        .run(&["submit", a2.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("gen2 deploys");
    for m in MACHINES {
        fleet.host(m).assert_on(&gen2[m], "system-3-link");
    }

    // `validate` checks signatures as the agents will.
    let out = operator
        .run(&[
            "validate",
            a2.to_str().expect("utf-8"),
            "--intent-public-key",
            &fleet.intent.public,
        ])
        .expect("validate");
    out.expect_code(0).expect("a2 is signed by CI");
    assert!(
        out.stdout.contains("3 statements signed by trusted keys"),
        "{out}"
    );
    let out = operator
        .run(&[
            "validate",
            a2.to_str().expect("utf-8"),
            "--intent-public-key",
            &ops.public,
        ])
        .expect("validate");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("signed by unknown key ci-intent-1"),
        "{out}"
    );

    // CI built and published gen3; the attacker has a ci certificate only.
    let gen3 = fleet.build(&json!({ "generation": 3 })).expect("gen3");
    fleet.publish(&gen3).expect("publish gen3");
    let never_copied = |fleet: &Fleet| {
        for m in MACHINES {
            assert!(!fleet.host(m).has_path(&gen3[m]), "{m}: gen3 was copied");
        }
    };

    // Unsigned, with a root "health check": refused, nothing copied or run.
    let (evil, _) = fleet.write_deployment(&gen3).expect("artifact");
    edit(&evil, add_evil_checks);
    let id = submit_as_ci(&fleet, &evil, &[]);
    assert_refused_everywhere(
        &fleet,
        &id,
        "the control plane sent no signed statement",
        &gen2,
    );
    never_copied(&fleet);

    // Signed, but by a key the agents do not trust.
    fleet.sign(&evil, Some(rogue)).expect("sign");
    let id = submit_as_ci(&fleet, &evil, &[]);
    assert_refused_everywhere(&fleet, &id, "signed by unknown key ci-2", &gen2);
    never_copied(&fleet);

    // Signed properly, then changed: the control plane refuses it at the
    // door (so does `validate`), and nothing is stored.
    let before = scenario::deployments(&fleet).expect("list").len();
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let ci_id = fleet.pki.identity("ci", "github");
    let (a3, _) = fleet.write_deployment(&gen3).expect("artifact");
    fleet.sign(&a3, None).expect("sign");
    for (field, change) in [
        ("healthChecks", add_evil_checks as fn(&mut Value)),
        ("closure", |v: &mut Value| {
            v["closures"]["worker-1"] = v["closures"]["worker-2"].clone();
        }),
    ] {
        let tampered = dir.join(format!("{field}.json"));
        std::fs::copy(&a3, &tampered).expect("copy");
        edit(&tampered, change);
        let text = std::fs::read_to_string(&tampered).expect("read");
        let body = json!({ "artifactJson": text }).to_string();
        let out = grpcurl
            .call(
                Some(&ci_id),
                "procurator.v1.DeploymentService/Submit",
                &body,
            )
            .expect("grpcurl");
        assert_eq!(
            procurator_integration_tests::ctl::grpc_code(&out).as_deref(),
            Some("InvalidArgument"),
            "{out}"
        );
        assert!(
            out.stderr
                .contains(&format!("disagrees with the artifact on {field}")),
            "{out}"
        );
        let local = operator
            .run(&["validate", tampered.to_str().expect("utf-8")])
            .expect("validate");
        assert_eq!(local.code, Some(1), "{local}");
    }
    assert_eq!(scenario::deployments(&fleet).expect("list").len(), before);

    // The downgrade: gen1's own signed artifact again, after worker-1's
    // agent restarted. Without --force the control plane calls it stale;
    // with --force every agent refuses it as a replay.
    fleet
        .hosts
        .get_mut("worker-1")
        .expect("host")
        .stop_agent()
        .expect("stop");
    fleet
        .start_agent_with("worker-1", &["--intent-public-key", ops.public.as_str()])
        .expect("start");
    fleet
        .wait_connected(&["worker-1".to_owned()])
        .expect("reconnected");
    let ci = operator.with_identity(&ci_id);
    let stale = ci
        .run(&["submit", a1.to_str().expect("utf-8")])
        .expect("submit");
    assert_eq!(stale.code, Some(1), "{stale}");
    assert!(stale.stderr.contains("--force"), "{stale}");
    let id = submit_as_ci(&fleet, &a1, &["--force"]);
    assert_refused_everywhere(&fleet, &id, "an older deployment cannot be replayed", &gen2);
    let forced = scenario::deployment(&fleet, &id).expect("deployment");
    assert_eq!(forced["forcedBy"], "github", "{forced}");
    for m in MACHINES {
        assert_eq!(
            fleet.host(m).system_generation().expect("gen"),
            "system-3-link"
        );
    }

    // A rollback replays the old statements unless an operator signs anew.
    let out = operator
        .run(&["rollback", "--to", &d1, "--wait"])
        .expect("rollback");
    assert_eq!(out.code, Some(3), "the agents refuse it: {out}");
    assert_nothing_ran(&fleet, &gen2);
    let secret = ops.secret.to_str().expect("utf-8");
    // The operator checks first that the control plane's copy of d1 is what
    // CI signed: with the wrong key to check against, nothing is signed.
    let signed_rollback = |check_with: &str, wait: &[&str]| {
        let mut args = vec!["rollback", "--to", &d1, "--intent-key", secret];
        args.extend(["--intent-public-key", check_with]);
        args.extend_from_slice(wait);
        operator.run(&args).expect("rollback")
    };
    let out = signed_rollback(&ops.public, &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("refusing to sign"), "{out}");
    let out = signed_rollback(&fleet.intent.public, &["--wait"]);
    out.expect_code(0).expect("the signed rollback converges");
    assert!(out.stdout.contains("signed by key ops-1"), "{out}");
    for m in MACHINES {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(gen1[m].as_str())
        );
        assert_eq!(
            host.system_profile().expect("profile").as_deref(),
            Some(gen1[m].as_str())
        );
        assert!(!host.host_path("/run/PWNED").exists(), "{m}");
    }
}

#[test]
fn a_compromised_control_plane_cannot_make_an_agent_run_what_ci_did_not_sign() {
    let (mut fleet, _) = signed_fleet(&[], &[]);
    let (gen1, a1, _) = fleet.prepare(&json!({ "generation": 1 })).expect("gen1");
    fleet.sign(&a1, None).expect("sign");
    let id = submit_as_ci(&fleet, &a1, &[]);
    let done = scenario::wait_final(&fleet, &id, TIMEOUT).expect("gen1");
    assert_eq!(state(&done), "DEPLOYMENT_STATE_SUCCEEDED", "{done:#}");

    // gen2 is signed and submitted while worker-1 and worker-2 are away, so
    // their rows wait in the store; gen66 is published, signed by the
    // cache key, but never signed as an intent.
    for m in ["worker-1", "worker-2"] {
        fleet
            .hosts
            .get_mut(m)
            .expect("host")
            .stop_agent()
            .expect("stop");
    }
    let (gen2, a2, _) = fleet.prepare(&json!({ "generation": 2 })).expect("gen2");
    let evil = fleet.build(&json!({ "generation": 66 })).expect("gen66");
    fleet.publish(&evil).expect("publish");
    // Each refusal is a failure; the rollout must not halt at the first.
    edit(&a2, |v| v["rollout"] = json!({ "failureBudget": 3 }));
    fleet.sign(&a2, None).expect("sign");
    let id = submit_as_ci(&fleet, &a2, &[]);
    scenario::wait_machine(
        &fleet,
        &id,
        "control-plane-1",
        TIMEOUT,
        "succeeded",
        |row| state(row) == "MACHINE_STATE_SUCCEEDED",
    )
    .expect("control-plane-1 converges");

    // The control plane is compromised: its rows are edited between submit
    // and send. worker-1's closure is swapped; worker-2 gets a root health
    // check, with its statement's payload edited to match (the signature
    // cannot be).
    fleet.control_plane.stop().expect("stop the control plane");
    let db = fleet.control_plane.data_dir().join("procurator.db");
    let conn = rusqlite::Connection::open(&db).expect("open the store");
    conn.execute(
        "UPDATE machines SET closure = ?1 WHERE deployment_id = ?2 AND machine = 'worker-1'",
        rusqlite::params![evil["worker-1"], id],
    )
    .expect("swap worker-1's closure");
    let stored: String = conn
        .query_row(
            "SELECT artifact FROM deployments WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .expect("artifact");
    let mut artifact: Value = serde_json::from_str(&stored).expect("json");
    artifact["blueprint"]["worker-2"]["deployment"]["healthChecks"] =
        json!([{ "command": EVIL_CHECK, "timeout": 10 }]);
    let statement = artifact["intents"]["worker-2"]
        .as_str()
        .expect("statement")
        .to_owned();
    let parts: Vec<&str> = statement.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64")).expect("json");
    payload["healthChecks"] =
        json!([{ "command": EVIL_CHECK, "timeoutSecs": 10, "intervalSecs": 1 }]);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).expect("json")),
        parts[2]
    );
    artifact["intents"]["worker-2"] = forged.into();
    conn.execute(
        "UPDATE deployments SET artifact = ?1 WHERE id = ?2",
        rusqlite::params![artifact.to_string(), id],
    )
    .expect("edit the artifact");
    drop(conn);
    fleet
        .control_plane
        .start_again(&fleet.nix)
        .expect("start again");
    for m in ["worker-1", "worker-2"] {
        fleet.start_agent(m).expect("start");
    }

    let refused = |m: &str, why: &str| {
        let row = scenario::wait_machine(&fleet, &id, m, TIMEOUT, "refused", |row| {
            state(row) == "MACHINE_STATE_FAILED"
        })
        .expect("refused");
        let reason = row["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("intent refused: ") && reason.contains(why),
            "{m}: {reason}"
        );
    };
    refused(
        "worker-1",
        &format!(
            "the statement is for closure {}, not {}",
            gen2["worker-1"], evil["worker-1"]
        ),
    );
    refused(
        "worker-2",
        "the signature by key ci-intent-1 does not verify",
    );
    for m in ["worker-1", "worker-2"] {
        let host = fleet.host(m);
        assert!(
            !host.host_path("/run/PWNED").exists(),
            "{m}: the forged check ran"
        );
        host.assert_on(&gen1[m], "system-2-link");
        for closure in [&evil[m], &gen2[m]] {
            assert!(!host.has_path(closure), "{m}: {closure} was copied");
        }
    }

    // Then the control plane is replaced outright, on its own address and
    // with its own certificate, by one that sends what it likes and
    // confirms anything: another machine's statement, an older one, none.
    let listen = fleet.control_plane.host_port().expect("address");
    fleet.control_plane.stop().expect("stop the control plane");
    let statement = |artifact: &Path, row: &str| {
        let value: Value =
            serde_json::from_slice(&std::fs::read(artifact).expect("read")).expect("json");
        value["intents"][row]
            .as_str()
            .expect("statement")
            .to_owned()
    };
    let evil_check = HealthCheck {
        command: EVIL_CHECK.into(),
        timeout_secs: 10,
        interval_secs: 1,
    };
    let desired = |id: &str, closure: &str, intent: String| DesiredState {
        deployment_id: id.into(),
        closure: closure.into(),
        health_checks: vec![evil_check.clone()],
        auto_rollback: false,
        intent,
        ..DesiredState::default()
    };
    let script = [
        (
            "worker-1",
            desired("d-rogue-1", &gen2["worker-2"], statement(&a2, "worker-2")),
        ),
        (
            "control-plane-1",
            desired(
                "d-rogue-2",
                &gen1["control-plane-1"],
                statement(&a1, "control-plane-1"),
            ),
        ),
        (
            "worker-2",
            desired("d-rogue-3", &evil["worker-2"], String::new()),
        ),
    ];
    let script = script.into_iter().map(|(m, d)| (m.to_owned(), d)).collect();
    let rogue = RogueControlPlane::start(&listen, &fleet.pki, script).expect("rogue");
    let answers = wait_for("every agent to answer the rogue", TIMEOUT, || {
        let answers = rogue.answers();
        Ok((answers.len() == MACHINES.len()).then_some(answers))
    })
    .expect("answers");
    for (m, why) in [
        (
            "worker-1",
            "the statement is for worker-2, not for worker-1",
        ),
        ("control-plane-1", "an older deployment cannot be replayed"),
        ("worker-2", "the control plane sent no signed statement"),
    ] {
        let reason = &answers[m][0].reason;
        assert!(
            reason.starts_with("intent refused: ") && reason.contains(why),
            "{m}: {reason}"
        );
        assert_eq!(answers[m][0].state(), MachineState::Failed, "{m}");
        assert!(
            !fleet.host(m).host_path("/run/PWNED").exists(),
            "{m}: the rogue's check ran"
        );
    }
    drop(rogue);
    for m in ["worker-1", "worker-2"] {
        fleet.host(m).assert_on(&gen1[m], "system-2-link");
    }
    fleet
        .host("control-plane-1")
        .assert_on(&gen2["control-plane-1"], "system-3-link");
    assert!(!fleet.host("worker-1").has_path(&gen2["worker-2"]));
}
