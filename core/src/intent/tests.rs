//! Statements: signed, verified, and refused when anything about them is off.
//! Keys in Nix's format are checked against real Nix in core/tests/intent_keys.rs.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::*;
use crate::DeploymentArtifact;

const CLOSURE: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";
const OTHER: &str = "/nix/store/1c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";

fn key(name: &str) -> SigningKey {
    SigningKey::generate(name).unwrap()
}

fn intent() -> Intent {
    Intent {
        name: MachineName::parse("worker-1").unwrap(),
        closure: StorePath::parse(CLOSURE).unwrap(),
        git_commit: GitCommit::try_from("0123456789abcdef".to_owned()).unwrap(),
        issued_at_ms: 1_795_677_300_000,
        health_checks: vec![IntentCheck {
            command: "systemctl is-active sshd".into(),
            timeout_secs: 60,
            interval_secs: 10,
        }],
        auto_rollback: true,
        allow_reboot: false,
        confirm_timeout_secs: 30,
        vm: None,
    }
}

fn parts(text: &str) -> Vec<Vec<u8>> {
    text.split('.')
        .map(|p| URL_SAFE_NO_PAD.decode(p).unwrap())
        .collect()
}

#[test]
fn a_signed_statement_verifies_and_says_what_was_signed() {
    let key = key("ci-1");
    let statement = key.sign(&intent()).unwrap();
    let parsed = Statement::parse(statement.as_str()).unwrap();
    assert_eq!(parsed.key_name(), "ci-1");
    assert_eq!(parsed.verify(&[key.public_key()]).unwrap(), &intent());

    // The exact encoding docs/interfaces.md gives.
    let decoded = parts(statement.as_str());
    assert_eq!(decoded.len(), 3);
    let header: Value = serde_json::from_slice(&decoded[0]).unwrap();
    assert_eq!(
        header,
        json!({"alg": "EdDSA", "kid": "ci-1", "typ": "procurator-intent+json"})
    );
    let payload: Value = serde_json::from_slice(&decoded[1]).unwrap();
    assert_eq!(payload["name"], "worker-1");
    assert_eq!(payload["issuedAtMs"], 1_795_677_300_000u64);
    assert_eq!(payload["healthChecks"][0]["timeoutSecs"], 60);
    assert!(payload.get("vm").is_none());
    assert_eq!(decoded[2].len(), 64);
}

#[test]
fn a_statement_changed_after_signing_does_not_verify() {
    let key = key("ci-1");
    let text = key.sign(&intent()).unwrap().as_str().to_owned();
    let (header, rest) = text.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let mut evil = intent();
    evil.health_checks[0].command = "id > /run/PWNED".into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
    let forged = Statement::parse(&format!("{header}.{payload}.{signature}")).unwrap();
    assert_eq!(
        forged.verify(&[key.public_key()]).unwrap_err(),
        IntentError::BadSignature("ci-1".into())
    );
}

#[test]
fn only_a_trusted_key_of_that_name_verifies() {
    let signer = key("ci-2");
    let statement = signer.sign(&intent()).unwrap();
    let trusted = key("ci-1").public_key();
    let err = statement.verify(&[trusted]).unwrap_err();
    assert_eq!(err, IntentError::UnknownKey("ci-2".into()));
    assert!(
        err.to_string().starts_with("signed by unknown key ci-2"),
        "{err}"
    );
    // Another key under the trusted name is not the trusted key.
    let impostor = key("ci-1").sign(&intent()).unwrap();
    let trusted = key("ci-1").public_key();
    assert_eq!(
        impostor.verify(&[trusted]).unwrap_err(),
        IntentError::BadSignature("ci-1".into())
    );
}

#[test]
fn malformed_statements_are_refused_with_the_reason() {
    let key = key("ci-1");
    let good = key.sign(&intent()).unwrap().as_str().to_owned();
    let [header, payload, signature]: [&str; 3] =
        good.split('.').collect::<Vec<_>>().try_into().unwrap();
    let none_header =
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"ci-1","typ":"procurator-intent+json"}"#);
    let cases = [
        (format!("{header}.{payload}"), "three base64url parts"),
        (
            format!("{header}.{payload}.{signature}.x"),
            "three base64url parts",
        ),
        (format!("{header}.{payload}.!!"), "not base64url"),
        (
            format!("{none_header}.{payload}.{signature}"),
            "alg \"none\"",
        ),
        (
            format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode("{}")),
            "its payload",
        ),
        (
            format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode([0u8; 10])),
            "64",
        ),
        ("x".repeat(MAX_STATEMENT_BYTES + 1), "the limit is"),
    ];
    for (text, expected) in cases {
        let err = Statement::parse(&text).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

#[test]
fn keys_in_nix_format_parse_and_refuse_garbage() {
    let key = key("cache-1");
    let public: PublicKey = key.public_key().to_string().parse().unwrap();
    assert_eq!(public, key.public_key());
    assert_eq!(public.name(), "cache-1");
    for (bad, expected) in [
        ("nocolon", "no ':'"),
        ("k:not base64", "not base64"),
        ("k:AAAA", "is 3 bytes"),
        (":AAAA", "key name"),
    ] {
        let err = bad.parse::<PublicKey>().unwrap_err();
        assert!(err.contains(expected), "{bad}: {err}");
    }
    // A secret key whose halves do not match.
    let mut secret = vec![1u8; 32];
    secret.extend_from_slice(&[2u8; 32]);
    let err = SigningKey::parse(&format!("k:{}", STANDARD.encode(secret))).unwrap_err();
    assert!(err.contains("do not belong together"), "{err}");
}

fn artifact() -> Value {
    json!({
        "gitCommit": "0123456789abcdef",
        "blueprint": {
            "worker-1": {
                "role": "worker", "cpu": 1, "memory": {"amount": 1, "unit": "GB"},
                "deployment": {"addr": "x", "backend": "nixos", "healthChecks": [
                    {"command": "true", "timeout": 5},
                    {"enabled": false, "command": "false", "timeout": 5}
                ]}
            },
            "web": {
                "role": "web", "cpu": 0.5, "memory": {"amount": 256, "unit": "MiB"}, "replicas": 2,
                "deployment": {"addr": "x", "backend": "qemu", "autoRollback": false}
            }
        },
        "closures": {"worker-1": CLOSURE, "web": OTHER}
    })
}

fn signed(key: &SigningKey) -> Value {
    let mut parsed = DeploymentArtifact::from_json(artifact().to_string().as_bytes()).unwrap();
    parsed.sign(key, 1_000).unwrap();
    serde_json::from_str(&parsed.canonical_json()).unwrap()
}

#[test]
fn an_artifact_is_signed_per_row_and_reparses() {
    let key = key("ci-1");
    let value = signed(&key);
    let parsed = DeploymentArtifact::from_json(value.to_string().as_bytes()).unwrap();
    let rows: Vec<&str> = parsed.intents.keys().map(MachineName::as_str).collect();
    assert_eq!(rows, ["web-0", "web-1", "worker-1"]);
    assert_eq!(
        parsed.intent_key_names().into_iter().collect::<Vec<_>>(),
        ["ci-1"]
    );

    let worker = parsed
        .statement(&MachineName::parse("worker-1").unwrap())
        .unwrap();
    let intent = worker.verify(&[key.public_key()]).unwrap();
    assert_eq!(intent.closure.as_str(), CLOSURE);
    assert_eq!(intent.health_checks.len(), 1, "only the enabled check");
    assert_eq!(intent.confirm_timeout_secs, 30);
    assert!(intent.vm.is_none());

    let web = parsed
        .statement(&MachineName::parse("web-1").unwrap())
        .unwrap();
    let intent = web.verify(&[key.public_key()]).unwrap();
    assert!(!intent.auto_rollback);
    let vm = intent.vm.as_ref().unwrap();
    assert_eq!(vm.machine.as_str(), "web");
    assert_eq!((vm.milli_cpus, vm.memory_bytes), (500, 256 << 20));
}

#[test]
fn an_artifact_edited_after_signing_is_refused() {
    let key = key("ci-1");
    type Edit = fn(&mut Value);
    let cases: Vec<(Edit, &str)> = vec![
        (
            |v| {
                v["blueprint"]["worker-1"]["deployment"]["healthChecks"][0]["command"] =
                    json!("id > /run/PWNED")
            },
            "intents.worker-1: the statement disagrees with the artifact on healthChecks",
        ),
        (|v| v["closures"]["worker-1"] = json!(OTHER), "on closure"),
        (|v| v["gitCommit"] = json!("deadbeef"), "on gitCommit"),
        (
            |v| v["blueprint"]["web"]["memory"]["amount"] = json!(512),
            "intents.web-0: the statement disagrees with the artifact on vm",
        ),
        (
            |v| v["rollout"] = json!({"confirmTimeout": 0}),
            "on confirmTimeoutSecs",
        ),
        (
            |v| {
                v["intents"].as_object_mut().unwrap().remove("web-1");
            },
            "intents.web-1: the artifact is signed, but \"web-1\" has no statement",
        ),
        (
            |v| v["intents"]["db"] = v["intents"]["web-0"].clone(),
            "intents.db: a statement for \"db\"",
        ),
        (
            |v| v["intents"]["web-0"] = json!("garbage"),
            "intents.web-0: the statement is malformed",
        ),
    ];
    for (edit, expected) in cases {
        let mut value = signed(&key);
        edit(&mut value);
        let err = DeploymentArtifact::from_json(value.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}
