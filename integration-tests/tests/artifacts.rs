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
