//! The CI commands against real Nix: `plan` detects exactly what changed,
//! `publish` signs and copies only what a cache lacks, `artifact` writes
//! what `validate` accepts, `ci` deploys end to end and stops when nothing
//! changed; evaluation and build errors get their own exit codes, Nix's
//! message, and leave no artifact behind.

use std::path::Path;

use procurator_integration_tests::ci::{self, Breakage, arg, changes, stdout_json};
use procurator_integration_tests::ci::{all_machines as all, plan_json, write_artifact};
use procurator_integration_tests::{
    ControlPlane, Fixture, Fleet, MACHINES, NixEnv, Pki, SigningKey,
};
use serde_json::{Value, json};

#[test]
fn plan_reports_exactly_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let fixture = Fixture::copy_to(&dir.path().join("flake")).expect("fixture");
    fixture
        .write_settings(&json!({ "generation": 1 }))
        .expect("settings");

    let first = plan_json(&nix, fixture.dir(), None).expect("plan");
    assert_eq!(first["changed"], true, "{first}");
    assert_eq!(changes(&first).expect("changes"), all("added"), "{first}");
    for m in first["machines"].as_array().expect("machines") {
        assert_eq!(m["previous"], Value::Null, "{m}");
        assert!(m["closureSize"].as_u64().unwrap_or(0) > 0, "{m}");
    }

    let deployment = dir.path().join("deployment.json");
    write_artifact(&nix, fixture.dir(), &deployment).expect("artifact");
    let again = plan_json(&nix, fixture.dir(), Some(&deployment)).expect("plan");
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(changes(&again).expect("changes"), all("none"));

    // One machine's new generation: only that machine has a new closure.
    fixture
        .write_settings(
            &json!({ "generation": 1, "machines": { "worker-2": { "generation": 2 } } }),
        )
        .expect("settings");
    let touched = plan_json(&nix, fixture.dir(), Some(&deployment)).expect("plan");
    let mut want = all("none");
    want.insert("worker-2".into(), "closure".into());
    assert_eq!(changes(&touched).expect("changes"), want, "{touched}");
    let row = &touched["machines"][2];
    assert_eq!(row["name"], "worker-2");
    assert_ne!(row["previous"], row["closure"], "{row}");

    // A blueprint-only change (health-check timeout): same closures, yet a
    // change the control plane must hear about.
    fixture
        .write_settings(&json!({ "generation": 1, "healthCheckTimeout": 9 }))
        .expect("settings");
    let blueprint = plan_json(&nix, fixture.dir(), Some(&deployment)).expect("plan");
    assert_eq!(changes(&blueprint).expect("changes"), all("blueprint"));

    // The text table names the change, and --diff shows diff-closures.
    fixture
        .write_settings(
            &json!({ "generation": 1, "machines": { "worker-2": { "generation": 2 } } }),
        )
        .expect("settings");
    let out = ci::ctl(
        &nix,
        &[
            "plan",
            "--flake",
            arg(fixture.dir()).expect("utf-8"),
            "--previous",
            arg(&deployment).expect("utf-8"),
            "--diff",
        ],
    )
    .expect("plan --diff");
    out.expect_code(0).expect("plan --diff");
    assert!(out.stdout.starts_with("MACHINE"), "{out}");
    assert!(out.stdout.contains("1 of 3 machines changed"), "{out}");
    assert!(out.stdout.contains("gen1 → 2-gen2"), "diff-closures: {out}");

    let missing = dir.path().join("no-such.json");
    let out = ci::ctl(
        &nix,
        &[
            "plan",
            "--flake",
            arg(fixture.dir()).expect("utf-8"),
            "--previous",
            arg(&missing).expect("utf-8"),
        ],
    )
    .expect("plan");
    out.expect_code(1)
        .expect("a missing --previous is an error");
    assert!(out.stderr.contains("--previous"), "{out}");
}

#[test]
fn publish_signs_and_copies_only_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let fixture = Fixture::copy_to(&dir.path().join("flake")).expect("fixture");
    // A generation no other test builds, so that nothing is cached yet.
    fixture
        .write_settings(&json!({ "generation": format!("publish-{}", std::process::id()) }))
        .expect("settings");
    let key = SigningKey::generate(&nix, &dir.path().join("keys"), "ci-test-1").expect("key");
    let deployment = dir.path().join("deployment.json");
    write_artifact(&nix, fixture.dir(), &deployment).expect("artifact");
    let cache = dir.path().join("cache");
    let to = format!("file://{}", cache.display());
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "publish",
            "--to",
            &to,
            "--signing-key",
            arg(&key.secret).expect("utf-8"),
            "--artifact",
            arg(&deployment).expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        ci::ctl(&nix, &args).expect("publish")
    };

    let first = publish(&[]);
    first.expect_code(0).expect("publish succeeds");
    // 3 toplevels, 3 etc, 1 shared base.
    assert!(first.stdout.starts_with("published 7 paths ("), "{first}");
    assert!(
        first.stdout.contains(&format!("to {to}; 0 already there")),
        "{first}"
    );
    let narinfos: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "narinfo"))
        .collect();
    assert_eq!(narinfos.len(), 7);
    for e in &narinfos {
        let text = std::fs::read_to_string(e.path()).expect("narinfo");
        assert!(text.contains("\nSig: ci-test-1:"), "unsigned: {text}");
    }

    let second = publish(&["--output", "json"]);
    second.expect_code(0).expect("second publish");
    let summary = stdout_json(&second).expect("json");
    assert_eq!(summary["paths"], 0, "{summary}");
    assert_eq!(summary["bytes"], 0, "{summary}");
    assert_eq!(summary["alreadyThere"], 7, "{summary}");

    // attic without the attic client: a publish failure that says why.
    let out = ci::ctl(
        &nix,
        &[
            "publish",
            "--to",
            "attic:srv:fleet",
            "--artifact",
            arg(&deployment).expect("utf-8"),
        ],
    )
    .expect("publish attic");
    out.expect_code(6)
        .expect("attic without attic fails to publish");
    assert!(out.stderr.contains("attic"), "{out}");

    // Unsigned: published, with a warning that the agents will refuse it,
    // unless --no-sign says something else signs.
    let unsigned = format!("file://{}", dir.path().join("unsigned").display());
    let publish_unsigned = |extra: &[&str]| {
        let mut args = vec![
            "publish",
            "--to",
            &unsigned,
            "--artifact",
            arg(&deployment).expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let out = ci::ctl(&nix, &args).expect("publish unsigned");
        out.expect_code(0).expect("published unsigned");
        out
    };
    let out = publish_unsigned(&[]);
    assert!(
        out.stderr.contains("without --signing-key")
            && out
                .stderr
                .contains("every machine will refuse these closures"),
        "{out}"
    );
    let out = publish_unsigned(&["--no-sign"]);
    assert!(!out.stderr.contains("warning"), "{out}");
}

#[test]
fn artifact_writes_what_validate_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let fixture = Fixture::copy_to(&dir.path().join("flake")).expect("fixture");
    let deployment = dir.path().join("out/deployment.json");
    std::fs::create_dir_all(dir.path().join("out")).expect("mkdir");
    write_artifact(&nix, fixture.dir(), &deployment).expect("artifact");

    let out = ci::ctl(&nix, &["validate", arg(&deployment).expect("utf-8")]).expect("validate");
    out.expect_code(0).expect("validate accepts it");
    let written: Value =
        serde_json::from_slice(&std::fs::read(&deployment).expect("read")).expect("json");
    let blueprint = fixture.blueprint(&nix).expect("blueprint");
    assert_eq!(
        written["blueprint"], blueprint,
        "the blueprint as evaluated"
    );
    let built = fixture.build(&nix).expect("build");
    for m in MACHINES {
        assert_eq!(written["closures"][m], built[m].as_str(), "{m}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["deployment.json"], "no temporary file left");

    // Not a git checkout and no --git-commit: a clear error, no file.
    let none = dir.path().join("out/none.json");
    let out = ci::ctl(
        &nix,
        &[
            "artifact",
            "--flake",
            arg(fixture.dir()).expect("utf-8"),
            "--out",
            arg(&none).expect("utf-8"),
        ],
    )
    .expect("artifact");
    out.expect_code(1).expect("no commit is an error");
    assert!(out.stderr.contains("--git-commit"), "{out}");
    assert!(!none.exists());
}

#[test]
fn evaluation_and_build_errors_have_their_own_codes_and_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nix = NixEnv::in_dir(&dir.path().join("nix")).expect("nix");
    let pki = Pki::init(&nix, &dir.path().join("pki")).expect("pki");
    pki.issue(&nix, "ci", "github").expect("ci cert");
    let control_plane = ControlPlane::start(&nix, &dir.path().join("cp"), &pki).expect("cp");
    let url = control_plane.url().expect("url");

    // A syntax error written into a copy of the fixture.
    let fixture = Fixture::copy_to(&dir.path().join("syntax")).expect("fixture");
    let flake_nix = fixture.dir().join("flake.nix");
    let text = std::fs::read_to_string(&flake_nix).expect("flake.nix");
    std::fs::write(&flake_nix, text.replacen("outputs =", "outputs = =", 1))
        .expect("break flake.nix");
    ci::fails_without_artifact(&nix, &pki, &url, fixture.dir(), 4, "syntax error")
        .expect("syntax error");

    let eval = dir.path().join("eval");
    ci::write_broken_flake(&eval, Breakage::Evaluation).expect("flake");
    ci::fails_without_artifact(
        &nix,
        &pki,
        &url,
        &eval,
        4,
        "machine broken does not evaluate on purpose",
    )
    .expect("evaluation error");

    let build = dir.path().join("build");
    ci::write_broken_flake(&build, Breakage::Build).expect("flake");
    ci::fails_without_artifact(
        &nix,
        &pki,
        &url,
        &build,
        5,
        "the builder of broken fails on purpose",
    )
    .expect("build error");
}

/// `ci` of the fleet's flake to its cache, signed, with a new commit id and
/// JSON output, then `extra`.
fn ci_args<'a>(fleet: &'a Fleet, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "ci",
        "--flake",
        arg(fleet.fixture.dir()).expect("utf-8"),
        "--publish-to",
        &format!("file://{}", fleet.cache.display()),
        "--signing-key",
        arg(&fleet.key.secret).expect("utf-8"),
        "--git-commit",
        &procurator_integration_tests::commit_id(),
        "--output",
        "json",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

#[test]
fn ci_deploys_end_to_end_and_then_finds_nothing_to_do() {
    let fleet = Fleet::start().expect("fleet");
    let ctl = fleet
        .ctl()
        .expect("ctl")
        .with_identity(&fleet.pki.identity("ci", "github"));
    fleet
        .fixture
        .write_settings(&json!({ "generation": 1 }))
        .expect("settings");
    let flake = arg(fleet.fixture.dir()).expect("utf-8").to_owned();
    let cache = format!("file://{}", fleet.cache.display());
    let secret = arg(&fleet.key.secret).expect("utf-8").to_owned();
    let deployment = fleet.dir().join("deployment.json");
    let out = arg(&deployment).expect("utf-8").to_owned();
    let ci = |extra: &[&str]| {
        let mut args = vec!["--wait"];
        args.extend_from_slice(extra);
        ctl.run(&ci_args(&fleet, &args)).expect("ci")
    };

    let first = ci(&["--out", &out]);
    first.expect_code(0).expect("ci deploys");
    let summary = stdout_json(&first).expect("summary");
    assert_eq!(summary["result"], "deployed", "{summary}");
    assert_eq!(summary["exitCode"], 0);
    assert_eq!(changes(&summary).expect("changes"), all("added"));
    assert!(
        summary["published"]["paths"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    let id = summary["deploymentId"]
        .as_str()
        .expect("deployment id")
        .to_owned();

    let written: Value =
        serde_json::from_slice(&std::fs::read(&deployment).expect("artifact")).expect("json");
    for m in MACHINES {
        let closure = written["closures"][m].as_str().expect("closure");
        assert_ne!(closure, fleet.initial[m], "{m}: a new closure");
        assert_eq!(
            fleet.host(m).current_system().expect("current").as_deref(),
            Some(closure),
            "{m} runs what ci built"
        );
    }
    let deployments = || {
        let out = ctl
            .run(&["deployments", "--output", "json"])
            .expect("deployments");
        out.expect_code(0).expect("deployments");
        let list: Value = serde_json::from_str(&out.stdout).expect("deployments json");
        list.as_array().map_or(0, Vec::len)
    };
    let before = deployments();
    assert!(before >= 1);

    let second = ci(&["--previous", &out, "--out", &format!("{out}.next")]);
    second.expect_code(8).expect("nothing changed");
    let summary = stdout_json(&second).expect("summary");
    assert_eq!(summary["result"], "nothing-changed", "{summary}");
    assert_eq!(summary["deploymentId"], Value::Null);
    assert_eq!(summary["published"], Value::Null);
    assert_eq!(changes(&summary).expect("changes"), all("none"));
    assert!(
        !Path::new(&format!("{out}.next")).exists(),
        "nothing written"
    );
    assert_eq!(deployments(), before, "nothing submitted after {id}");

    // A change with a certificate the control plane refuses (an agent's):
    // ci asks the control plane first, so it stops before building (exit 1),
    // and there is still nothing new in the history.
    fleet
        .fixture
        .write_settings(&json!({ "generation": 2 }))
        .expect("settings");
    let agent = ctl.with_identity(&fleet.pki.agent("worker-1"));
    let commit = procurator_integration_tests::commit_id();
    let refused = agent
        .run(&[
            "ci",
            "--flake",
            &flake,
            "--publish-to",
            &cache,
            "--signing-key",
            &secret,
            "--previous",
            &out,
            "--git-commit",
            &commit,
            "--output",
            "json",
        ])
        .expect("ci");
    refused.expect_code(1).expect("refused before building");
    let summary = stdout_json(&refused).expect("summary");
    assert_eq!(summary["result"], "error", "{summary}");
    assert_eq!(summary["machines"], json!([]), "nothing built: {summary}");
    assert!(
        refused.stderr.contains("refused")
            && refused.stderr.contains("nothing was built or published"),
        "{refused}"
    );
    assert_eq!(
        deployments(),
        before,
        "the refused deployment is not stored"
    );
}

/// `ci` without `--previous` compares with what each machine runs, as the
/// control plane knows it: after a rollback every machine differs from the
/// artifact CI last wrote; after a cancel, only the machine it never reached.
#[test]
fn ci_compares_with_what_the_fleet_runs_after_a_rollback_and_a_cancel() {
    let mut fleet = Fleet::start().expect("fleet");
    let operator = fleet.ctl().expect("ctl");
    let ci_ctl = operator.with_identity(&fleet.pki.identity("ci", "github"));
    let flake = arg(fleet.fixture.dir()).expect("utf-8").to_owned();
    let gen2_file = fleet.dir().join("gen2.json");
    let gen2_out = arg(&gen2_file).expect("utf-8").to_owned();
    // Given the fleet, which the test changes between the runs.
    let ci = |fleet: &Fleet, generation: u32, extra: &[&str]| {
        fleet
            .fixture
            .write_settings(&json!({ "generation": generation }))
            .expect("settings");
        let out = ci_ctl.run(&ci_args(fleet, extra)).expect("ci");
        let summary = stdout_json(&out).expect("summary");
        (out, summary)
    };
    let previous_of = |summary: &Value| -> std::collections::BTreeMap<String, String> {
        summary["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .map(|m| {
                let name = m["name"].as_str().expect("name").to_owned();
                (name, m["previous"].as_str().unwrap_or("-").to_owned())
            })
            .collect()
    };

    let (out, first) = ci(&fleet, 1, &["--wait"]);
    out.expect_code(0).expect("gen 1 deployed");
    assert_eq!(first["comparedWith"]["source"], "fleet", "{first}");
    assert_eq!(changes(&first).expect("changes"), all("added"));
    let gen1: std::collections::BTreeMap<String, String> = MACHINES
        .iter()
        .map(|m| {
            let closure = fleet.host(m).current_system().expect("current");
            (m.to_string(), closure.expect("a system"))
        })
        .collect();
    let (out, second) = ci(&fleet, 2, &["--wait", "--out", &gen2_out]);
    out.expect_code(0).expect("gen 2 deployed");
    assert_eq!(changes(&second).expect("changes"), all("closure"));
    assert_eq!(previous_of(&second), gen1, "{second}");

    let rollback = operator.run(&["rollback", "--wait"]).expect("rollback");
    rollback.expect_code(0).expect("rolled back to gen 1");

    // The file CI kept says nothing changed; the fleet says otherwise.
    let (out, stale) = ci(&fleet, 2, &["--previous", &gen2_out]);
    out.expect_code(8)
        .expect("against --previous: nothing changed");
    assert_eq!(changes(&stale).expect("changes"), all("none"));
    let (out, redeploy) = ci(&fleet, 2, &["--wait"]);
    out.expect_code(0).expect("gen 2 deployed again");
    assert_eq!(changes(&redeploy).expect("changes"), all("closure"));
    assert_eq!(previous_of(&redeploy), gen1, "{redeploy}");
    let deployed = redeploy["deploymentId"].as_str().expect("id").to_owned();
    let in_force = &redeploy["comparedWith"]["deploymentId"];
    assert_ne!(in_force.as_str(), Some(deployed.as_str()), "{redeploy}");

    // Gen 3 reaches two machines: worker-1's agent is down, and the
    // rollout is cancelled while its row waits.
    fleet
        .hosts
        .get_mut("worker-1")
        .expect("host")
        .stop_agent()
        .expect("stop");
    let (out, third) = ci(&fleet, 3, &[]);
    out.expect_code(0).expect("gen 3 submitted");
    let id = third["deploymentId"].as_str().expect("id").to_owned();
    for m in MACHINES.iter().filter(|m| **m != "worker-1") {
        procurator_integration_tests::scenario::wait_machine(
            &fleet,
            &id,
            m,
            std::time::Duration::from_secs(120),
            "succeeded",
            |row| row["state"] == "MACHINE_STATE_SUCCEEDED",
        )
        .expect("gen 3 on the others");
    }
    operator
        .run(&["cancel", &id, "--reason", "worker-1 is down", "--wait"])
        .expect("cancel")
        .expect_code(0)
        .expect("cancelled");

    // `plan` with connection settings compares with the fleet too.
    let planned = ci_ctl
        .run(&["plan", "--flake", &flake, "--output", "json"])
        .expect("plan");
    planned.expect_code(0).expect("plan");
    let planned = stdout_json(&planned).expect("plan json");
    assert_eq!(planned["comparedWith"]["source"], "fleet", "{planned}");
    assert_eq!(planned["changed"], true, "{planned}");

    let (out, again) = ci(&fleet, 3, &[]);
    out.expect_code(0).expect("gen 3 submitted again");
    assert_eq!(
        changes(&again).expect("changes"),
        changes(&planned).expect("changes")
    );
    let changed = changes(&again).expect("changes");
    for m in MACHINES {
        let expected = if m == "worker-1" { "closure" } else { "none" };
        assert_eq!(changed[m], expected, "{m}: {again}");
    }
    // The same answer, paged, through grpcurl.
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let ci_identity = fleet.pki.identity("ci", "github");
    let method = "procurator.v1.DeploymentService/ListRunning";
    let page = grpcurl
        .call_json(&ci_identity, method, r#"{"pageSize": 2}"#)
        .expect("ListRunning");
    assert_eq!(page["machines"].as_array().map(Vec::len), Some(2), "{page}");
    let token = page["nextPageToken"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = grpcurl
        .call_json(
            &ci_identity,
            method,
            &json!({ "pageToken": token }).to_string(),
        )
        .expect("ListRunning");
    assert_eq!(rest["machines"][0]["machine"], "worker-2", "{rest}");
    assert_eq!(rest.get("nextPageToken"), None, "the last page: {rest}");
    let bad = grpcurl
        .call(Some(&ci_identity), method, r#"{"pageToken": "../x"}"#)
        .expect("grpcurl");
    assert_eq!(
        procurator_integration_tests::ctl::grpc_code(&bad).as_deref(),
        Some("InvalidArgument"),
        "{bad}"
    );

    let worker1 = &previous_of(&again)["worker-1"];
    assert_eq!(
        Some(worker1.as_str()),
        redeploy["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == "worker-1"))
            .and_then(|m| m["closure"].as_str()),
        "worker-1 still runs gen 2: {again}"
    );
}
