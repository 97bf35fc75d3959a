//! Malformed deployment artifacts: refused by `procurator-ctl` before
//! anything is sent, refused by the control plane when sent anyway, and
//! nothing is stored either way.

use procurator_integration_tests::{Fleet, ctl::grpc_code, fixture};
use serde_json::{Value, json};

const SUBMIT: &str = "procurator.v1.DeploymentService/Submit";

/// (what is wrong, the artifact's text, a word the error must name)
fn malformed(valid: &Value) -> Vec<(&'static str, String, &'static str)> {
    let mut not_store_path = valid.clone();
    not_store_path["closures"]["worker-1"] = json!("/tmp/not-a-store-path");

    let mut unknown_machine = valid.clone();
    unknown_machine["closures"]["worker-9"] = valid["closures"]["worker-1"].clone();

    let mut unknown_field = valid.clone();
    unknown_field["deployTarget"] = json!("everywhere");

    let text = serde_json::to_string_pretty(valid).expect("json");
    let truncated = text[..text.len() / 2].to_owned();

    // The 400-byte Submit that once took the control plane down.
    let mut replicas = valid.clone();
    replicas["blueprint"]["worker-1"]["replicas"] = json!(1_000_000_000u64);
    replicas["blueprint"]["worker-1"]["deployment"]["backend"] = json!("cloud-hypervisor");

    let mut many_checks = valid.clone();
    many_checks["blueprint"]["worker-1"]["deployment"]["healthChecks"] =
        Value::Array(vec![json!({ "command": "true", "timeout": 5 }); 65]);
    let mut long_check = valid.clone();
    long_check["blueprint"]["worker-1"]["deployment"]["healthChecks"] =
        json!([{ "command": "x".repeat(20 * 1024), "timeout": 5 }]);

    // serde_json writes each key once; the duplicate goes in by hand.
    let closure = valid["closures"]["worker-1"].as_str().expect("closure");
    let compact = valid.to_string();
    let duplicate = compact.replacen(
        "\"closures\":{",
        &format!("\"closures\":{{\"worker-1\":\"{closure}\","),
        1,
    );
    assert_ne!(duplicate, compact, "the duplicate was written");

    vec![
        (
            "a closure that is not a store path",
            not_store_path.to_string(),
            "worker-1",
        ),
        (
            "a machine in closures missing from the blueprint",
            unknown_machine.to_string(),
            "worker-9",
        ),
        (
            "an unknown field",
            unknown_field.to_string(),
            "deployTarget",
        ),
        ("a truncated file", truncated, "truncated"),
        (
            "a billion replicas",
            replicas.to_string(),
            "replicas; at most 1024 are allowed",
        ),
        (
            "65 health checks",
            many_checks.to_string(),
            "65 checks; at most 64",
        ),
        (
            "a 20 KiB health-check command",
            long_check.to_string(),
            "longer than 16384 bytes",
        ),
        (
            "a key given twice",
            duplicate,
            "closures.worker-1: the key \"worker-1\" appears twice",
        ),
    ]
}

#[test]
fn malformed_artifacts_are_refused_and_change_nothing() {
    let fleet = Fleet::start().expect("fleet");
    let ctl = fleet.ctl().expect("ctl");
    let grpcurl = fleet.grpcurl().expect("grpcurl");

    // One finished deployment in the history first: the hosts already run
    // these closures, so every machine is skipped.
    let (valid_path, _) = fleet.write_deployment(&fleet.initial).expect("artifact");
    ctl.run(&["submit", valid_path.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("the valid deployment succeeds");
    let before = ctl
        .run(&["deployments", "--output", "json"])
        .expect("deployments");
    before.expect_code(0).expect("deployments");
    let valid: Value =
        serde_json::from_str(&std::fs::read_to_string(&valid_path).expect("read")).expect("json");

    for (what, text, named) in malformed(&valid) {
        let path = fleet.dir().join("malformed.json");
        std::fs::write(&path, &text).expect("write artifact");
        let path = path.to_str().expect("utf-8");

        let out = ctl.run(&["validate", path]).expect("validate");
        assert_eq!(out.code, Some(1), "validate refuses {what}: {out}");
        assert!(
            out.all().contains(named),
            "validate names {named:?} for {what}: {out}"
        );

        let out = ctl.run(&["submit", path]).expect("submit");
        assert_eq!(out.code, Some(1), "submit refuses {what}: {out}");
        assert!(
            out.all().contains(named),
            "submit names {named:?} for {what}: {out}"
        );

        // Straight to the server, past the CLI's own checks.
        let request = serde_json::to_string(&json!({ "artifactJson": text })).expect("json");
        let out = grpcurl
            .call(Some(&fleet.pki.operator()), SUBMIT, &request)
            .expect("grpcurl");
        assert_eq!(
            grpc_code(&out).as_deref(),
            Some("InvalidArgument"),
            "the server refuses {what}: {out}"
        );
        assert!(
            out.stderr.contains(named),
            "the server names {named:?} for {what}: {out}"
        );
    }

    let after = ctl
        .run(&["deployments", "--output", "json"])
        .expect("deployments");
    assert_eq!(
        before.stdout, after.stdout,
        "no malformed artifact was stored"
    );
    // The control plane is still up and says so.
    let out = grpcurl
        .run(
            Some(&fleet.pki.operator()),
            &["-d", "{}"],
            &["grpc.health.v1.Health/Check"],
        )
        .expect("health");
    out.expect_code(0).expect("health answers");
    let health: Value = serde_json::from_str(&out.stdout).expect("health JSON");
    assert_eq!(health["status"], "SERVING", "{health}");
}

#[test]
fn validate_refuses_a_billion_replicas_without_allocating_for_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let artifact = json!({
        "gitCommit": "a".repeat(40),
        "blueprint": {"m1": {"role": "w", "cpu": 1, "memory": {"amount": 1, "unit": "GB"},
            "replicas": 1_000_000_000u64, "deployment": {"addr": "x", "backend": "cloud-hypervisor"}}},
        "closures": {"m1": format!("/nix/store/{}-x", "0".repeat(32))},
    });
    let path = dir.path().join("deployment.json");
    std::fs::write(&path, artifact.to_string()).expect("write");
    let ctl = procurator_integration_tests::bin("procurator-ctl").expect("ctl");
    // 512 MiB of address space: a billion instance names would need ~40 GB.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 524288 && exec \"$0\" validate \"$1\"")
        .arg(&ctl)
        .arg(&path)
        .output()
        .expect("run validate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("blueprint.m1.replicas: 1000000000 replicas; at most 1024 are allowed"),
        "{stderr}"
    );
}

#[test]
fn the_fixture_artifact_is_valid() {
    // The harness's own artifact passes `procurator-ctl validate`, so the
    // refusals above are about what each case breaks.
    let nix = procurator_integration_tests::NixEnv::temp().expect("nix");
    let dir = tempfile::tempdir().expect("tempdir");
    let fx =
        procurator_integration_tests::Fixture::copy_to(&dir.path().join("flake")).expect("fixture");
    let closures = fx.build(&nix).expect("build");
    let artifact = fixture::deployment(
        &procurator_integration_tests::commit_id(),
        &fx.blueprint(&nix).expect("eval"),
        &closures,
    );
    let path = dir.path().join("deployment.json");
    std::fs::write(&path, artifact.to_string()).expect("write");
    let ctl = procurator_integration_tests::bin("procurator-ctl").expect("ctl");
    let out = std::process::Command::new(ctl)
        .arg("validate")
        .arg(&path)
        .output()
        .expect("run validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
