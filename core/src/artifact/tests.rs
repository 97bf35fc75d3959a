//! `deployment.json` as CI writes it: the user's example parses, defaults are
//! filled in, and every malformed input is refused with the field it is about.

// A test that cannot set up its input should fail loudly.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::*;

const WORKER_CLOSURE: &str =
    "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";

/// The example from the user's workflow notes (`gitops-workflow.md`), with a
/// real-looking store path in place of `abc123`.
fn seed_example() -> Value {
    json!({
        "gitCommit": "3f2c1a9b8e7d6c5b4a39281706f5e4d3c2b1a098",
        "blueprint": {
            "worker-1": {
                "role": "worker",
                "cpu": 2.0,
                "memory": { "amount": 2.0, "unit": "GB" },
                "labels": ["worker", "compute"],
                "replicas": 1,
                "deployment": {
                    "addr": "192.168.1.11",
                    "backend": "cloud-hypervisor",
                    "sshUser": "root",
                    "sshPort": 22,
                    "healthChecks": [
                        { "enabled": true, "command": "systemctl is-active sshd", "timeout": 60, "interval": 10 }
                    ],
                    "autoRollback": true
                }
            }
        },
        "closures": { "worker-1": WORKER_CLOSURE }
    })
}

/// The smallest artifact: only the fields without a default.
fn minimal() -> Value {
    json!({
        "gitCommit": "3f2c1a9",
        "blueprint": {
            "worker-1": {
                "role": "worker",
                "cpu": 1,
                "memory": { "amount": 512, "unit": "MiB" },
                "deployment": { "addr": "10.0.0.1", "backend": "nixos" }
            }
        },
        "closures": { "worker-1": WORKER_CLOSURE }
    })
}

fn parse(v: &Value) -> Result<DeploymentArtifact, ArtifactError> {
    DeploymentArtifact::from_json(v.to_string().as_bytes())
}

/// Parse `v`, expect it refused, and return the message.
fn refused(v: &Value) -> String {
    match parse(v) {
        Ok(a) => panic!("accepted a malformed artifact: {a:?}"),
        Err(e) => e.to_string(),
    }
}

fn worker(v: &mut Value) -> &mut Value {
    &mut v["blueprint"]["worker-1"]
}

fn name(s: &str) -> MachineName {
    MachineName::parse(s).unwrap()
}

#[test]
fn the_seed_example_parses() {
    let a = parse(&seed_example()).unwrap();
    assert_eq!(
        a.git_commit.as_str(),
        "3f2c1a9b8e7d6c5b4a39281706f5e4d3c2b1a098"
    );
    let w = &a.blueprint[&name("worker-1")];
    assert_eq!(w.role, "worker");
    assert_eq!(f64::from(w.cpu), 2.0);
    assert_eq!(w.memory.bytes(), 2_000_000_000);
    assert_eq!(w.labels, ["worker", "compute"]);
    assert_eq!(w.deployment.addr, "192.168.1.11");
    assert_eq!(w.deployment.backend, "cloud-hypervisor");
    assert_eq!(w.deployment.health_checks.len(), 1);
    let check = &w.deployment.health_checks[0];
    assert_eq!(check.command.as_str(), "systemctl is-active sshd");
    assert_eq!((check.timeout.get(), check.interval.get()), (60, 10));
    assert_eq!(a.closures[&name("worker-1")].as_str(), WORKER_CLOSURE);
    assert_eq!(a.enabled_health_checks(&name("worker-1")).len(), 1);
}

#[test]
fn defaults_are_filled_in() {
    let mut v = minimal();
    worker(&mut v)["deployment"]["healthChecks"] = json!([{ "command": "true", "timeout": 5 }]);
    let a = parse(&v).unwrap();
    let w = &a.blueprint[&name("worker-1")];
    assert!(w.labels.is_empty());
    assert_eq!(w.replicas, 1);
    assert!(w.deployment.auto_rollback);
    assert_eq!(w.deployment.ssh_user, "root");
    assert_eq!(w.deployment.ssh_port, 22);
    let check = &w.deployment.health_checks[0];
    assert!(check.enabled);
    assert_eq!(check.interval.get(), 1);
    assert_eq!(w.memory.bytes(), 512 << 20);
}

#[test]
fn disabled_health_checks_are_not_run() {
    let mut v = seed_example();
    worker(&mut v)["deployment"]["healthChecks"][0]["enabled"] = json!(false);
    let a = parse(&v).unwrap();
    assert!(a.enabled_health_checks(&name("worker-1")).is_empty());
}

#[test]
fn a_closure_that_is_not_a_store_path_names_its_machine() {
    let mut v = seed_example();
    v["closures"]["worker-1"] = json!("/nix/store/abc123-nixos-system-25.11");
    let err = refused(&v);
    assert!(err.starts_with("closures.worker-1: "), "{err}");
    assert!(err.contains("abc123"), "{err}");
    assert!(err.contains("32 characters"), "{err}");
}

#[test]
fn a_closure_outside_the_store_is_refused() {
    let mut v = seed_example();
    v["closures"]["worker-1"] = json!("/tmp/nixos-system");
    let err = refused(&v);
    assert!(err.starts_with("closures.worker-1: "), "{err}");
}

#[test]
fn a_closure_for_a_machine_missing_from_the_blueprint() {
    let mut v = seed_example();
    v["closures"]["worker-2"] = json!(WORKER_CLOSURE);
    let err = refused(&v);
    assert!(err.starts_with("closures.worker-2: "), "{err}");
    assert!(err.contains("not in the blueprint"), "{err}");
}

#[test]
fn a_blueprint_machine_without_closure() {
    let mut v = seed_example();
    v["blueprint"]["worker-2"] = v["blueprint"]["worker-1"].clone();
    let err = refused(&v);
    assert!(err.starts_with("blueprint.worker-2: "), "{err}");
    assert!(err.contains("no closure"), "{err}");
}

#[test]
fn an_empty_blueprint_has_nothing_to_deploy() {
    let v = json!({ "gitCommit": "3f2c1a9", "blueprint": {}, "closures": {} });
    assert!(matches!(parse(&v), Err(ArtifactError::NoMachines)));
}

#[test]
fn an_invalid_machine_name_is_refused() {
    let mut v = seed_example();
    v["blueprint"]["../etc"] = v["blueprint"]["worker-1"].clone();
    let err = refused(&v);
    assert!(err.contains("../etc"), "{err}");
    assert!(err.contains("machine name"), "{err}");
}

#[test]
fn an_unknown_field_at_the_top_level() {
    let mut v = seed_example();
    v["closure"] = json!({});
    let err = refused(&v);
    assert!(err.starts_with("closure: unknown field `closure`"), "{err}");
}

#[test]
fn an_unknown_field_deep_inside_names_its_path() {
    let mut v = seed_example();
    let check = &mut worker(&mut v)["deployment"]["healthChecks"][0];
    check["cmd"] = check["command"].take();
    check.as_object_mut().unwrap().remove("command");
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.deployment.healthChecks[0].cmd: unknown field `cmd`"),
        "{err}"
    );
}

#[test]
fn a_missing_required_field_names_its_parent() {
    let mut v = seed_example();
    worker(&mut v).as_object_mut().unwrap().remove("role");
    let err = refused(&v);
    assert!(err.starts_with("blueprint.worker-1"), "{err}");
    assert!(err.contains("missing field `role`"), "{err}");
}

#[test]
fn a_truncated_file_says_so() {
    let text = serde_json::to_string_pretty(&seed_example()).unwrap();
    let cut = &text.as_bytes()[..text.len() / 2];
    let err = DeploymentArtifact::from_json(cut).unwrap_err();
    assert!(matches!(err, ArtifactError::Truncated { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn empty_input_is_refused() {
    for input in ["", "  \n\t"] {
        let err = DeploymentArtifact::from_json(input.as_bytes()).unwrap_err();
        assert!(matches!(err, ArtifactError::Empty), "{input:?}: {err:?}");
        assert!(err.to_string().contains("gitCommit"), "{err}");
    }
}

#[test]
fn not_json_at_all_is_a_syntax_error_with_a_position() {
    let err = DeploymentArtifact::from_json(b"{ gitCommit: 1 }").unwrap_err();
    assert!(
        matches!(err, ArtifactError::Syntax { line: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn trailing_garbage_is_refused() {
    let text = format!("{} x", seed_example());
    let err = DeploymentArtifact::from_json(text.as_bytes()).unwrap_err();
    assert!(matches!(err, ArtifactError::Syntax { .. }), "{err:?}");
}

#[test]
fn a_bad_git_commit() {
    for bad in ["main", "abc", "3f2c1a9g", ""] {
        let mut v = seed_example();
        v["gitCommit"] = json!(bad);
        let err = refused(&v);
        assert!(err.starts_with("gitCommit: "), "{bad}: {err}");
        assert!(err.contains("git commit id"), "{bad}: {err}");
    }
}

#[test]
fn git_commits_are_lower_cased() {
    let mut v = seed_example();
    v["gitCommit"] = json!("3F2C1A9");
    assert_eq!(parse(&v).unwrap().git_commit.as_str(), "3f2c1a9");
}

#[test]
fn a_negative_or_zero_cpu() {
    for bad in [json!(-1), json!(0), json!(-0.5)] {
        let mut v = seed_example();
        worker(&mut v)["cpu"] = bad.clone();
        let err = refused(&v);
        assert!(err.starts_with("blueprint.worker-1.cpu: "), "{bad}: {err}");
        assert!(err.contains("positive"), "{bad}: {err}");
    }
}

#[test]
fn a_bad_memory_unit_or_amount() {
    let mut v = seed_example();
    worker(&mut v)["memory"]["unit"] = json!("gigabytes");
    let err = refused(&v);
    assert!(err.starts_with("blueprint.worker-1.memory.unit: "), "{err}");
    assert!(err.contains("gigabytes"), "{err}");

    let mut v = seed_example();
    worker(&mut v)["memory"]["amount"] = json!(0);
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.memory.amount: "),
        "{err}"
    );
}

#[test]
fn a_health_check_with_timeout_zero() {
    let mut v = seed_example();
    worker(&mut v)["deployment"]["healthChecks"][0]["timeout"] = json!(0);
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.deployment.healthChecks[0].timeout: "),
        "{err}"
    );
    assert!(err.contains("between 1 and 86400"), "{err}");
}

#[test]
fn a_health_check_with_fractional_interval_or_empty_command() {
    let mut v = seed_example();
    worker(&mut v)["deployment"]["healthChecks"][0]["interval"] = json!(1.5);
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.deployment.healthChecks[0].interval: "),
        "{err}"
    );

    let mut v = seed_example();
    worker(&mut v)["deployment"]["healthChecks"][0]["command"] = json!("  ");
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.deployment.healthChecks[0].command: "),
        "{err}"
    );
}

#[test]
fn a_bad_ssh_port() {
    let mut v = seed_example();
    worker(&mut v)["deployment"]["sshPort"] = json!(70000);
    let err = refused(&v);
    assert!(
        err.starts_with("blueprint.worker-1.deployment.sshPort: "),
        "{err}"
    );
}

#[test]
fn an_oversized_artifact_is_refused_before_parsing() {
    let big = vec![b' '; MAX_ARTIFACT_BYTES + 1];
    assert!(matches!(
        DeploymentArtifact::from_json(&big),
        Err(ArtifactError::TooLarge(_))
    ));
}

#[test]
fn the_digest_ignores_whitespace_and_key_order() {
    let compact = seed_example().to_string();
    let pretty = serde_json::to_string_pretty(&seed_example()).unwrap();
    // The same content, written by hand with the keys in another order.
    let reordered = format!(
        r#"{{ "closures": {{ "worker-1": "{WORKER_CLOSURE}" }},
             "blueprint": {{ "worker-1": {{
                "deployment": {{ "autoRollback": true, "sshPort": 22, "sshUser": "root",
                    "healthChecks": [ {{ "interval": 10, "timeout": 60, "command": "systemctl is-active sshd", "enabled": true }} ],
                    "backend": "cloud-hypervisor", "addr": "192.168.1.11" }},
                "replicas": 1, "labels": ["worker", "compute"],
                "memory": {{ "unit": "GB", "amount": 2 }}, "cpu": 2, "role": "worker" }} }},
             "gitCommit": "3F2C1A9B8E7D6C5B4A39281706F5E4D3C2B1A098" }}"#
    );
    let digests: Vec<String> = [compact, pretty, reordered]
        .iter()
        .map(|t| {
            DeploymentArtifact::from_json(t.as_bytes())
                .unwrap()
                .digest()
        })
        .collect();
    assert_eq!(digests[0].len(), 64);
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);

    let mut other = seed_example();
    worker(&mut other)["replicas"] = json!(2);
    assert_ne!(parse(&other).unwrap().digest(), digests[0]);
}

#[test]
fn the_canonical_form_parses_back_to_the_same_artifact() {
    let a = parse(&seed_example()).unwrap();
    let again = DeploymentArtifact::from_json(a.canonical_json().as_bytes()).unwrap();
    assert_eq!(a, again);
}

/// Three machines: a control plane and two workers, for wave plans.
fn fleet_with_rollout(rollout: Value) -> Value {
    let mut v = minimal();
    let spec = |role: &str, labels: Value| {
        json!({
            "role": role, "cpu": 1, "labels": labels,
            "memory": { "amount": 1, "unit": "GiB" },
            "deployment": { "addr": "10.0.0.1", "backend": "nixos" }
        })
    };
    v["blueprint"] = json!({
        "control-plane-1": spec("control-plane", json!(["control-plane"])),
        "worker-1": spec("worker", json!(["worker"])),
        "worker-2": spec("worker", json!(["worker"])),
    });
    v["closures"] = json!({
        "control-plane-1": WORKER_CLOSURE, "worker-1": WORKER_CLOSURE, "worker-2": WORKER_CLOSURE,
    });
    v["rollout"] = rollout;
    v
}

fn wave_names(a: &DeploymentArtifact) -> Vec<(String, Vec<String>)> {
    a.waves()
        .into_iter()
        .map(|w| (w.name, w.machines.iter().map(|m| m.to_string()).collect()))
        .collect()
}

#[test]
fn without_a_rollout_every_machine_is_in_one_wave_with_defaults() {
    let a = parse(&minimal()).unwrap();
    assert_eq!(
        wave_names(&a),
        vec![("all".to_owned(), vec!["worker-1".to_owned()])]
    );
    let r = a.rollout();
    assert_eq!((r.max_in_flight, r.failure_budget), (0, 0));
    assert_eq!(
        r.confirm_timeout_secs(),
        rollout::DEFAULT_CONFIRM_TIMEOUT_SECS
    );
    assert_eq!(
        r.unreachable_after_secs(),
        rollout::DEFAULT_UNREACHABLE_AFTER_SECS
    );
    // Absent optional keys stay absent, so old artifacts keep their digest.
    assert!(!a.canonical_json().contains("rollout"));
    assert!(!a.canonical_json().contains("allowReboot"));
}

#[test]
fn waves_take_machines_in_order_by_role_label_and_count() {
    let a = parse(&fleet_with_rollout(json!({
        "maxInFlight": 1,
        "failureBudget": 1,
        "waves": [
            { "name": "control-plane", "roles": ["control-plane"] },
            { "name": "canary", "labels": ["worker"], "count": 1 },
            { "name": "nobody", "machines": ["control-plane-1"] }
        ]
    })))
    .unwrap();
    assert_eq!(
        wave_names(&a),
        vec![
            (
                "control-plane".to_owned(),
                vec!["control-plane-1".to_owned()]
            ),
            ("canary".to_owned(), vec!["worker-1".to_owned()]),
            ("rest".to_owned(), vec!["worker-2".to_owned()]),
        ]
    );
    assert_eq!(a.rollout().max_in_flight, 1);
}

#[test]
fn a_wave_naming_an_unknown_machine_is_refused() {
    let msg = refused(&fleet_with_rollout(
        json!({ "waves": [ { "name": "a", "machines": ["worker-9"] } ] }),
    ));
    assert!(
        msg.contains("rollout.waves[0].machines") && msg.contains("worker-9"),
        "{msg}"
    );
    let msg = refused(&fleet_with_rollout(
        json!({ "waves": [ { "name": "a", "count": 0 } ] }),
    ));
    assert!(msg.contains("rollout.waves[0].count"), "{msg}");
    let msg = refused(&fleet_with_rollout(json!({ "wave": [] })));
    assert!(
        msg.contains("unknown field") && msg.contains("rollout"),
        "{msg}"
    );
}

#[test]
fn every_limit_is_checked_and_named() {
    type Edit = fn(&mut Value);
    let cases: Vec<(Edit, &str)> = vec![
        (
            |v| {
                v["blueprint"]["worker-1"]["replicas"] = json!(1_000_000_000u64);
                v["blueprint"]["worker-1"]["deployment"]["backend"] = json!("cloud-hypervisor");
            },
            "blueprint.worker-1.replicas: 1000000000 replicas; at most 1024 are allowed",
        ),
        (
            |v| {
                let check = json!({"command": "true", "timeout": 5});
                v["blueprint"]["worker-1"]["deployment"]["healthChecks"] =
                    Value::Array(vec![check; 65]);
            },
            "blueprint.worker-1.deployment.healthChecks: 65 checks; at most 64 are allowed",
        ),
        (
            |v| {
                v["blueprint"]["worker-1"]["deployment"]["healthChecks"] =
                    json!([{"command": "x".repeat(20 * 1024), "timeout": 5}]);
            },
            "blueprint.worker-1.deployment.healthChecks[0].command: longer than 16384 bytes",
        ),
        (
            |v| v["blueprint"]["worker-1"]["role"] = json!("r".repeat(257)),
            "blueprint.worker-1.role: 257 bytes; at most 256",
        ),
        (
            |v| v["blueprint"]["worker-1"]["labels"] = Value::Array(vec![json!("l"); 65]),
            "blueprint.worker-1.labels: 65 labels; at most 64",
        ),
        (
            |v| {
                let wave = json!({"name": "w"});
                v["rollout"] = json!({"waves": Value::Array(vec![wave; 1001])});
            },
            "rollout.waves: 1001 waves; at most 1000",
        ),
        (
            |v| {
                let vm = v["blueprint"]["worker-1"].clone();
                let closures = v["closures"].clone();
                let blueprint = v["blueprint"].as_object_mut().unwrap();
                let mut all = serde_json::Map::new();
                for i in 0..50 {
                    let mut spec = vm.clone();
                    spec["replicas"] = json!(1024);
                    spec["deployment"]["backend"] = json!("qemu");
                    blueprint.insert(format!("vm{i}"), spec);
                    all.insert(format!("vm{i}"), closures["worker-1"].clone());
                }
                all.insert("worker-1".into(), closures["worker-1"].clone());
                v["closures"] = Value::Object(all);
            },
            "blueprint: 51201 machines and VM instances; at most 50000",
        ),
    ];
    for (edit, expected) in cases {
        let mut v = minimal();
        edit(&mut v);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

#[test]
fn a_repeated_key_is_refused_with_its_path() {
    let text = format!(
        r#"{{"gitCommit": "3f2c1a9", "blueprint": {{"worker-1": {{"role": "worker", "cpu": 1,
            "memory": {{"amount": 1, "unit": "GB"}}, "deployment": {{"addr": "x", "backend": "nixos"}}}}}},
            "closures": {{"worker-1": "{WORKER_CLOSURE}", "worker-1": "{WORKER_CLOSURE}"}}}}"#
    );
    let err = DeploymentArtifact::from_json(text.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("closures.worker-1: the key \"worker-1\" appears twice"),
        "{err}"
    );
    let nested = r#"{"blueprint": {"m": {"deployment": {"healthChecks": [{"command": "a", "command": "b"}]}}}}"#;
    let err = DeploymentArtifact::from_json(nested.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("blueprint.m.deployment.healthChecks[0].command: the key"),
        "{err}"
    );
}
