//! The agent's admission of statements: only trusted, own, matching and
//! newer ones; the newest accepted survives a restart.

use procurator_core::intent::{IntentCheck, SigningKey};
use procurator_core::{MachineName, StorePath};

use super::*;

const CLOSURE: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";
const OTHER: &str = "/nix/store/1c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";

fn name(n: &str) -> MachineName {
    MachineName::parse(n).unwrap()
}

fn intent(for_name: &str, closure: &str, issued_at_ms: u64) -> Intent {
    Intent {
        name: name(for_name),
        closure: StorePath::parse(closure).unwrap(),
        git_commit: "0123456789abcdef".to_owned().try_into().unwrap(),
        issued_at_ms,
        health_checks: vec![IntentCheck {
            command: "true".into(),
            timeout_secs: 5,
            interval_secs: 1,
        }],
        auto_rollback: true,
        allow_reboot: false,
        confirm_timeout_secs: 30,
        vm: None,
    }
}

fn signed(key: &SigningKey, for_name: &str, closure: &str, at: u64) -> String {
    key.sign(&intent(for_name, closure, at))
        .unwrap()
        .as_str()
        .to_owned()
}

#[test]
fn without_keys_the_control_plane_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let policy = IntentPolicy::load(Vec::new(), dir.path()).unwrap();
    assert!(!policy.enforced());
    assert_eq!(policy.admit(&name("worker-1"), CLOSURE, ""), Ok(None));
}

#[test]
fn only_a_trusted_statement_for_this_machine_and_closure_is_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let ci = SigningKey::generate("ci-1").unwrap();
    let policy = IntentPolicy::load(vec![ci.public_key()], dir.path()).unwrap();
    let me = name("worker-1");

    let refusals = [
        (String::new(), "the control plane sent no signed statement"),
        ("garbage".into(), "the statement is malformed"),
        (
            signed(
                &SigningKey::generate("ci-2").unwrap(),
                "worker-1",
                CLOSURE,
                5,
            ),
            "signed by unknown key ci-2",
        ),
        (
            signed(
                &SigningKey::generate("ci-1").unwrap(),
                "worker-1",
                CLOSURE,
                5,
            ),
            "the signature by key ci-1 does not verify",
        ),
        (
            signed(&ci, "worker-2", CLOSURE, 5),
            "the statement is for worker-2, not for worker-1",
        ),
        (
            signed(&ci, "worker-1", OTHER, 5),
            "the statement is for closure /nix/store/1c5",
        ),
    ];
    for (statement, expected) in refusals {
        let reason = policy.admit(&me, CLOSURE, &statement).unwrap_err();
        assert!(reason.starts_with("intent refused: "), "{reason}");
        assert!(reason.contains(expected), "{expected:?} not in {reason:?}");
    }
    assert!(
        !dir.path().join("intents.json").exists(),
        "nothing refused is recorded"
    );

    let good = signed(&ci, "worker-1", CLOSURE, 5);
    let admitted = policy.admit(&me, CLOSURE, &good).unwrap().unwrap();
    assert_eq!(admitted, intent("worker-1", CLOSURE, 5));
}

#[test]
fn an_older_statement_is_a_replay_and_stays_one_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ci = SigningKey::generate("ci-1").unwrap();
    let me = name("worker-1");
    let old = signed(&ci, "worker-1", OTHER, 1_000);
    let new = signed(&ci, "worker-1", CLOSURE, 2_000);
    {
        let policy = IntentPolicy::load(vec![ci.public_key()], dir.path()).unwrap();
        policy.admit(&me, OTHER, &old).unwrap();
        policy.admit(&me, CLOSURE, &new).unwrap();
        // The same statement again is a repeat, not a replay.
        policy.admit(&me, CLOSURE, &new).unwrap();
        let reason = policy.admit(&me, OTHER, &old).unwrap_err();
        assert!(
            reason.contains("an older deployment cannot be replayed"),
            "{reason}"
        );
        // Another statement with the same time is no newer either.
        let twin = signed(&ci, "worker-1", OTHER, 2_000);
        assert!(policy.admit(&me, OTHER, &twin).is_err());
    }
    let restarted = IntentPolicy::load(vec![ci.public_key()], dir.path()).unwrap();
    let reason = restarted.admit(&me, OTHER, &old).unwrap_err();
    assert!(reason.contains("1970-01-01T00:00:01Z"), "{reason}");
    restarted.admit(&me, CLOSURE, &new).unwrap();
    // Each name has its own newest: a VM instance is not held back by its host.
    restarted
        .admit(&name("web-0"), OTHER, &signed(&ci, "web-0", OTHER, 1_500))
        .unwrap();
    let newer = signed(&ci, "worker-1", OTHER, 3_000);
    restarted.admit(&me, OTHER, &newer).unwrap();
}

#[test]
fn a_corrupt_ledger_stops_the_agent_rather_than_forget() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("intents.json"), b"{not json").unwrap();
    let ci = SigningKey::generate("ci-1").unwrap();
    let err = IntentPolicy::load(vec![ci.public_key()], dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is corrupt"), "{err}");
}
