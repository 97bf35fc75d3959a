//! CONFIRMING in the state machine: confirmed commits; refused or silent
//! rolls back to the exact previous closure, whatever `auto_rollback` says.

use std::sync::Mutex;
use std::time::Duration;

use procurator_core::{DeploymentId, StorePath};
use procurator_proto::v1::MachineState;

use super::*;
use crate::testing::{Behaviour, Host, recorder, states};

/// Answers every confirmation with `verdict` and remembers what was asked.
struct Stub {
    verdict: Verdict,
    asked: Mutex<Vec<(String, String, Duration)>>,
}

impl Confirm for Stub {
    fn confirm<'a>(
        &'a self,
        deployment_id: &'a str,
        closure: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Verdict> {
        self.asked
            .lock()
            .unwrap()
            .push((deployment_id.into(), closure.into(), timeout));
        Box::pin(async move { self.verdict.clone() })
    }
}

fn desired(closure: &StorePath, auto_rollback: bool) -> Desired {
    Desired {
        deployment_id: DeploymentId::parse("d-1").unwrap(),
        closure: closure.clone(),
        health_checks: Vec::new(),
        auto_rollback,
        confirm_timeout: Duration::from_secs(7),
        allow_reboot: false,
    }
}

async fn run(verdict: Verdict, auto_rollback: bool) -> (Host, StorePath, StorePath, Outcome) {
    let host = Host::new().await;
    let old = host.system("old", Behaviour::default()).await;
    host.run(&old);
    host.nix
        .set_profile(&host.paths.profile, &old)
        .await
        .unwrap();
    let new = host.system("new", Behaviour::default()).await;
    let stub = Arc::new(Stub {
        verdict,
        asked: Mutex::new(Vec::new()),
    });
    let mut activator = host.activator();
    activator.confirmer = Some(stub.clone());
    let (sink, progress) = recorder();
    let outcome = activator.run(&desired(&new, auto_rollback), &sink).await;
    assert_eq!(
        stub.asked.lock().unwrap().as_slice(),
        [("d-1".to_owned(), new.to_string(), Duration::from_secs(7))]
    );
    assert!(states(&progress).contains(&MachineState::Confirming));
    (host, old, new, outcome)
}

#[tokio::test]
async fn a_confirmed_deployment_commits() {
    let (host, _old, new, outcome) = run(Verdict::Confirmed, true).await;
    assert_eq!(outcome.state, MachineState::Succeeded, "{outcome:?}");
    assert_eq!(host.paths.profile_target().as_deref(), Some(new.as_str()));
    assert_eq!(host.calls(), ["new test", "new boot"]);
}

#[tokio::test]
async fn a_refused_confirmation_rolls_back_with_the_control_planes_reason() {
    let (host, old, _new, outcome) =
        run(Verdict::Refused("cancelled by alice".into()), false).await;
    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(outcome.failed_phase, MachineState::Confirming);
    assert_eq!(outcome.reason, "cancelled by alice");
    assert_eq!(outcome.current_system, old.as_str());
    assert_eq!(host.paths.profile_target().as_deref(), Some(old.as_str()));
    assert_eq!(host.calls(), ["new test", "old test"]);
}

#[tokio::test]
async fn no_confirmation_in_time_rolls_back_and_says_why() {
    let (host, old, _new, outcome) = run(Verdict::NoAnswer("cannot connect".into()), true).await;
    assert_eq!(outcome.state, MachineState::RolledBack, "{outcome:?}");
    assert_eq!(
        outcome.reason,
        format!(
            "no confirmation from the control plane within 7 s over a new connection: the new system may have cut this machine off; rolled back to {old}"
        )
    );
    assert_eq!(outcome.output_tail, "last attempt: cannot connect");
    assert_eq!(
        host.resolve("current-system").as_deref(),
        Some(old.as_str())
    );
}
