//! Activations through `run-detached`, and an agent killed in the middle of
//! one: the restarted agent waits for the recorded activation and carries
//! on with its result.

use std::time::Duration;

use procurator_core::{DeploymentId, StorePath};
use procurator_proto::v1::MachineState;

use super::*;
use crate::journal::Launched;
use crate::testing::{Behaviour, Host, recorder};

/// Stands in for `procurator-agent run-detached` (a unit test has no agent
/// binary): same arguments, same files.
const RUNNER: &str = r#"#!/bin/sh
shift
status="$2"; output="$4"; shift 5
"$@" > "$output" 2>&1
printf '{"code": %s}\n' "$?" > "$status.tmp"
mv "$status.tmp" "$status"
"#;

fn detached(host: &Host) -> Launcher {
    let exe = host.path("runner");
    std::fs::write(&exe, RUNNER).unwrap();
    let mut perms = std::fs::metadata(&exe).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&exe, perms).unwrap();
    Launcher::Detached(Detached {
        exe,
        systemd: false,
        dir: host.path("state/activations"),
    })
}

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

fn desired(closure: &StorePath) -> Desired {
    Desired {
        deployment_id: DeploymentId::parse("d-1").unwrap(),
        closure: closure.clone(),
        health_checks: Vec::new(),
        auto_rollback: true,
        confirm_timeout: Duration::ZERO,
        allow_reboot: false,
    }
}

#[tokio::test]
async fn detached_activations_run_and_leave_their_status_and_output() {
    let (host, _old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let broken = host
        .system(
            "broken",
            Behaviour {
                fail_test: true,
                ..Behaviour::default()
            },
        )
        .await;
    let mut activator = host.activator();
    activator.settings.launcher = detached(&host);
    let (sink, _) = recorder();

    let outcome = activator.run(&desired(&new), &sink).await;
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert_eq!(host.calls(), ["new test", "new boot"]);
    let entry = activator.journal.read().unwrap().unwrap();
    assert_eq!((entry.phase, entry.activation), (Phase::Done, None));
    // The status and output files are removed once the deployment is over.
    let left = std::fs::read_dir(host.path("state/activations")).unwrap();
    assert_eq!(left.count(), 0);

    let outcome = activator.run(&desired(&broken), &sink).await;
    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert!(
        outcome.reason.ends_with("test failed (exit status: 4)"),
        "{}",
        outcome.reason
    );
    assert_eq!(outcome.output_tail, "activation of broken failed");
    assert_eq!(outcome.current_system, new.as_str());
}

#[tokio::test]
async fn a_running_switchs_last_line_of_output_is_reported() {
    let (host, _old) = host_running_old().await;
    let slow = host
        .system(
            "slow",
            Behaviour {
                slow_test: true,
                ..Behaviour::default()
            },
        )
        .await;
    let mut activator = host.activator();
    activator.settings.launcher = detached(&host);
    activator.settings.output_interval = Duration::from_millis(100);
    let (sink, progress) = recorder();
    let outcome = activator.run(&desired(&slow), &sink).await;
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    let messages: Vec<String> = progress
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.state() == MachineState::Activating)
        .map(|p| p.message.clone())
        .collect();
    for half in ["first half", "second half"] {
        let said = messages
            .iter()
            .filter(|m| m.as_str() == format!("switch-to-configuration test: {half}"))
            .count();
        // Once each: a line that did not change is not sent again.
        assert_eq!(said, 1, "{half}: {messages:#?}");
    }
}

/// A journal as the agent leaves it when killed while `launched` runs.
fn killed_while_activating(host: &Host, old: &StorePath, new: &StorePath, launched: Launched) {
    let entry = Entry {
        deployment_id: "d-1".into(),
        closure: new.to_string(),
        previous: Some(old.to_string()),
        previous_profile: Some(old.to_string()),
        phase: Phase::Activating,
        auto_rollback: true,
        failure: None,
        plan: Plan {
            health_checks: vec![crate::health::Check {
                command: "true".into(),
                timeout: Duration::from_secs(5),
                interval: Duration::from_millis(50),
            }],
            ..Plan::default()
        },
        activation: Some(launched),
    };
    host.activator().journal.write(&entry).unwrap();
}

#[tokio::test]
async fn a_restarted_agent_waits_for_the_activation_and_carries_on() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let status = host.path("d-1-1.status");
    let output = host.path("d-1-1.out");
    let switch = format!("{new}/bin/switch-to-configuration");
    // The activation outlives the agent: a separate process that finishes
    // after the restart and writes its status the way run-detached does.
    let script = format!(
        "until [ -e {go} ]; do sleep 0.02; done; {switch} test > {out} 2>&1; echo '{{\"code\": 0}}' > {status}.tmp; mv {status}.tmp {status}",
        go = host.path("go").display(),
        out = output.display(),
        status = status.display(),
    );
    let mut runner = std::process::Command::new("sh")
        .args(["-c", &script, crate::detached::MODE])
        .spawn()
        .unwrap();
    killed_while_activating(
        &host,
        &old,
        &new,
        Launched {
            n: 1,
            status_file: status,
            output_file: output,
            unit: None,
            pid: Some(runner.id()),
            command: format!("{switch} test"),
        },
    );
    let activator = host.activator();
    let (sink, _) = recorder();
    let recovering = tokio::spawn(async move { activator.recover(&sink).await });
    std::fs::write(host.path("go"), "").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), recovering)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    runner.wait().unwrap();
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    // Activated once (by the runner), then committed.
    assert_eq!(host.calls(), ["new test", "new boot"]);
    assert_eq!(host.paths.profile_target().as_deref(), Some(new.as_str()));
}

#[tokio::test]
async fn an_activation_gone_without_a_status_is_a_failure_and_rolls_back() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    // It half ran: the new closure is active, then the runner vanished.
    host.run(&new);
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    killed_while_activating(
        &host,
        &old,
        &new,
        Launched {
            n: 1,
            status_file: host.path("never.status"),
            output_file: host.path("never.out"),
            unit: None,
            pid: Some(pid),
            command: format!("{new}/bin/switch-to-configuration test"),
        },
    );
    let (sink, _) = recorder();
    let outcome = host.activator().recover(&sink).await.unwrap();
    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Activating);
    assert!(
        outcome
            .reason
            .contains("the activation ended without leaving its exit status"),
        "{}",
        outcome.reason
    );
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
    assert_eq!(host.calls(), ["old test"]);
}

#[tokio::test]
async fn the_closure_is_a_gc_root_from_the_copy_to_the_end() {
    let (host, _old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let link = host.path("state/gcroots/deploying");
    let mut want = desired(&new);
    // The check passes only while the root points at the new closure.
    want.health_checks = vec![crate::health::Check {
        command: format!("test \"$(readlink {})\" = {new}", link.display()),
        timeout: Duration::from_secs(5),
        interval: Duration::from_millis(50),
    }];
    let (sink, _) = recorder();
    let outcome = host.activator().run(&want, &sink).await;
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the root is gone"
    );
}

#[tokio::test]
async fn a_restart_while_copying_copies_again() {
    let (host, old) = host_running_old().await;
    let new = host.system("new", Behaviour::default()).await;
    let activator = host.activator();
    let entry = Entry {
        deployment_id: "d-1".into(),
        closure: new.to_string(),
        previous: Some(old.to_string()),
        previous_profile: Some(old.to_string()),
        phase: Phase::Copying,
        auto_rollback: true,
        failure: None,
        plan: Plan::default(),
        activation: None,
    };
    activator.journal.write(&entry).unwrap();
    let (sink, progress) = recorder();
    let outcome = activator.recover(&sink).await.unwrap();
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert_eq!(crate::testing::states(&progress)[0], MachineState::Copying);
    assert_eq!(host.calls(), ["new test", "new boot"]);
}
