//! The state machine against real NixOS-shaped closures built with Nix.

use std::time::Duration;

use procurator_core::{DeploymentId, StorePath};
use procurator_proto::v1::MachineState;

use super::*;
use crate::health::Check;
use crate::testing::{Behaviour, Host, recorder, states};

fn desired(closure: &StorePath, checks: &[&str], auto_rollback: bool) -> Desired {
    Desired {
        deployment_id: DeploymentId::parse("d-1").unwrap(),
        closure: closure.clone(),
        health_checks: checks
            .iter()
            .map(|c| Check {
                command: (*c).into(),
                timeout: Duration::from_millis(400),
                interval: Duration::from_millis(50),
            })
            .collect(),
        auto_rollback,
        confirm_timeout: Duration::ZERO,
        allow_reboot: false,
    }
}

/// A host running `old`, with the system profile on `old` too.
async fn host_running_old() -> (Host, StorePath) {
    let host = Host::new().await;
    let old = host.system("old", Behaviour::default()).await;
    host.run(&old);
    host.nix
        .set_profile(&host.paths.profile, &old)
        .await
        .unwrap();
    (host, old)
}

#[tokio::test]
async fn success_activates_checks_and_commits() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let (sink, progress) = recorder();
    let outcome = host
        .activator()
        .run(
            &desired(&new, &["true", "test -L current-system || true"], true),
            &sink,
        )
        .await;

    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert_eq!(outcome.current_system, new.as_str());
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(new.as_str())
    );
    assert_eq!(host.paths.profile_target().as_deref(), Some(new.as_str()));
    assert_eq!(host.resolve("boot-entry").as_deref(), Some(new.as_str()));
    assert_eq!(host.calls(), ["new test", "new boot"]);
    assert_eq!(
        states(&progress),
        [
            MachineState::Copying,
            MachineState::Activating,
            MachineState::Checking,
            MachineState::Committing
        ]
    );
    // A final copy progress closes the copy.
    assert!(
        progress
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.copy.is_some() && p.message.starts_with("copied "))
    );
    let entry = host.activator().journal.read().unwrap().unwrap();
    assert_eq!(
        (entry.phase, entry.previous.as_deref()),
        (Phase::Done, Some(old.as_str()))
    );
}

#[tokio::test]
async fn the_running_closure_is_skipped_without_copying() {
    let (host, old) = host_running_old().await;
    let mut activator = host.activator();
    // A copy would fail: nothing may be copied at all.
    activator.substituters = vec!["file:///nonexistent".into()];
    let (sink, progress) = recorder();
    let outcome = activator.run(&desired(&old, &["false"], true), &sink).await;
    assert_eq!(outcome.state, MachineState::Skipped);
    assert_eq!(outcome.current_system, old.as_str());
    assert!(progress.lock().unwrap().is_empty());
    assert!(host.calls().is_empty());
    assert_eq!(activator.journal.read().unwrap(), None);
}

#[tokio::test]
async fn a_failing_health_check_rolls_back_to_the_exact_previous_closure() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let (sink, progress) = recorder();
    let outcome = host
        .activator()
        .run(
            &desired(&new, &["true", "echo unhealthy; exit 1"], true),
            &sink,
        )
        .await;

    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Checking);
    assert!(
        outcome
            .reason
            .contains("health check `echo unhealthy; exit 1` did not pass"),
        "{}",
        outcome.reason
    );
    assert_eq!(outcome.output_tail, "unhealthy");
    assert_eq!(outcome.current_system, old.as_str());
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    // The profile never moved, so it is not touched and no boot entry is written.
    assert_eq!(host.paths.profile_target().as_deref(), Some(old.as_str()));
    assert_eq!(
        std::fs::read_dir(host.path("profiles")).unwrap().count(),
        2,
        "system + system-1-link"
    );
    assert_eq!(host.resolve("boot-entry"), None);
    assert_eq!(host.calls(), ["new test", "old test"]);
    assert_eq!(states(&progress).last(), Some(&MachineState::RollingBack));

    // The log holds every command in order, with what each printed.
    let log = host.activator().logbook().read("d-1");
    let order = [
        "== health check 1/2 `true`, attempt 1: passed",
        "== health check 2/2 `echo unhealthy; exit 1`, attempt 1: failed",
        "unhealthy",
        "== rolling back to ",
        "== rolled-back: checking failed",
        "did not pass within",
    ];
    let mut at = 0;
    for wanted in order {
        let found = log[at..].find(wanted);
        assert!(found.is_some(), "{wanted:?} after byte {at} in:\n{log}");
        at += found.unwrap() + wanted.len();
    }
}

#[tokio::test]
async fn a_failing_test_activation_rolls_back() {
    let (host, old) = host_running_old().await;
    let new = host
        .system(
            "broken",
            Behaviour {
                fail_test: true,
                ..Behaviour::default()
            },
        )
        .await;
    let (sink, _) = recorder();
    let outcome = host.activator().run(&desired(&new, &[], true), &sink).await;

    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Activating);
    assert_eq!(
        outcome.reason,
        format!("{new}/bin/switch-to-configuration test failed (exit status: 4)")
    );
    assert_eq!(outcome.output_tail, "activation of broken failed");
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    assert_eq!(host.calls(), ["broken test", "old test"]);
}

#[tokio::test]
async fn a_failing_boot_entry_moves_the_profile_back() {
    let (host, old) = host_running_old().await;
    let new = host
        .system(
            "noboot",
            Behaviour {
                fail_boot: true,
                ..Behaviour::default()
            },
        )
        .await;
    let (sink, _) = recorder();
    let outcome = host
        .activator()
        .run(&desired(&new, &["true"], true), &sink)
        .await;

    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Committing);
    assert_eq!(host.paths.profile_target().as_deref(), Some(old.as_str()));
    assert_eq!(host.resolve("boot-entry").as_deref(), Some(old.as_str()));
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    assert_eq!(
        host.calls(),
        ["noboot test", "noboot boot", "old test", "old boot"]
    );
}

#[tokio::test]
async fn without_auto_rollback_a_failure_is_reported_and_left_alone() {
    let (host, _old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let (sink, _) = recorder();
    let outcome = host
        .activator()
        .run(&desired(&new, &["exit 3"], false), &sink)
        .await;
    assert_eq!(outcome.state, MachineState::Failed, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Checking);
    assert_eq!(outcome.current_system, new.as_str());
    assert_eq!(host.calls(), ["new test"]);
}

#[tokio::test]
async fn a_failed_rollback_is_reported_as_such() {
    let host = Host::new().await;
    let old = host
        .system(
            "oldbroken",
            Behaviour {
                fail_test: true,
                ..Behaviour::default()
            },
        )
        .await;
    host.run(&old);
    let new = host.system("new", Behaviour::default()).await;
    let (sink, _) = recorder();
    let outcome = host
        .activator()
        .run(&desired(&new, &["false"], true), &sink)
        .await;
    assert_eq!(outcome.state, MachineState::RollbackFailed, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Checking);
    assert!(
        outcome
            .reason
            .contains(&format!("rolling back to {old} failed too")),
        "{}",
        outcome.reason
    );
    assert!(
        outcome
            .output_tail
            .ends_with("--- rollback ---\nactivation of oldbroken failed"),
        "{:?}",
        outcome.output_tail
    );
}

#[tokio::test]
async fn nothing_changes_when_the_closure_cannot_be_copied() {
    let (host, old) = host_running_old().await;
    let missing =
        StorePath::parse("/nix/store/00000000000000000000000000000000-nixos-system-gone").unwrap();
    let (sink, _) = recorder();
    let outcome = host
        .activator()
        .run(&desired(&missing, &[], true), &sink)
        .await;
    assert_eq!(outcome.state, MachineState::Failed, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Copying);
    assert!(
        outcome.reason.starts_with(&format!(
            "could not copy {missing} from any substituter: file://"
        )),
        "{}",
        outcome.reason
    );
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    assert!(host.calls().is_empty());

    let mut activator = host.activator();
    activator.substituters.clear();
    let outcome = activator.run(&desired(&missing, &[], true), &sink).await;
    assert!(
        outcome.reason.starts_with("no substituter to copy"),
        "{}",
        outcome.reason
    );
}

#[tokio::test]
async fn a_restart_during_checks_restores_the_previous_closure() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let activator = host.activator();
    // As if the agent died after `new test`, while checking.
    host.run(&new);
    activator
        .journal
        .write(&Entry {
            deployment_id: "d-1".into(),
            closure: new.to_string(),
            previous: Some(old.to_string()),
            previous_profile: Some(old.to_string()),
            phase: Phase::Checking,
            auto_rollback: false,
            failure: None,
            plan: Plan {
                health_checks: vec![Check {
                    command: "echo still unhealthy; exit 1".into(),
                    timeout: Duration::from_millis(300),
                    interval: Duration::from_millis(50),
                }],
                ..Plan::default()
            },
            activation: None,
        })
        .unwrap();
    let (sink, _) = recorder();
    let outcome = activator.recover(&sink).await.unwrap();
    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    // The checks ran again, from the start, and failed again.
    assert!(
        outcome
            .reason
            .contains("health check `echo still unhealthy; exit 1` did not pass"),
        "{}",
        outcome.reason
    );
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    assert_eq!(host.calls(), ["old test"]);
    // Recovered once: nothing left to do.
    assert_eq!(activator.recover(&sink).await, None);
}

#[tokio::test]
async fn a_restart_while_committing_finishes_the_commit() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let activator = host.activator();
    host.run(&new);
    let entry = Entry {
        deployment_id: "d-1".into(),
        closure: new.to_string(),
        previous: Some(old.to_string()),
        previous_profile: Some(old.to_string()),
        phase: Phase::Committing,
        auto_rollback: true,
        failure: None,
        plan: Plan::default(),
        activation: None,
    };
    activator.journal.write(&entry).unwrap();
    let (sink, _) = recorder();
    let outcome = activator.recover(&sink).await.unwrap();
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert_eq!(host.paths.profile_target().as_deref(), Some(new.as_str()));
    assert_eq!(host.calls(), ["new boot"]);
}

#[test]
fn an_unsigned_path_is_reported_with_the_keys_this_machine_trusts() {
    use super::steps::{lacks_signature, unsigned_reason};
    // What Nix 2.24 (copy-wrongkey.internal-json) and 2.8 print.
    assert!(lacks_signature(
        "error: cannot add path '/nix/store/hhy7dglh1bc05vf3ly9npd41qw9gc23j-x' because it lacks a signature by a trusted key"
    ));
    assert!(lacks_signature(
        "error: cannot add path '/nix/store/hhy7dglh1bc05vf3ly9npd41qw9gc23j-x' because it lacks a valid signature"
    ));
    assert!(!lacks_signature("error: path '/nix/store/x' is not valid"));
    let closure = StorePath::parse("/nix/store/hhy7dglh1bc05vf3ly9npd41qw9gc23j-x").unwrap();
    let reason = unsigned_reason(
        &closure,
        &[
            "cache-1:XGZX9+uqvrp5OMNySYCxgI+TKKLNMAa8KBB1/AOI9Fc=".into(),
            "cache-2:XGZX9+uqvrp5OMNySYCxgI+TKKLNMAa8KBB1/AOI9Fc=".into(),
        ],
    );
    assert!(
        reason.contains("is not signed by a key this machine trusts (it trusts: cache-1, cache-2)"),
        "{reason}"
    );
}
