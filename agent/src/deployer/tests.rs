//! Delivery rules against real fixture closures: repeats never run twice,
//! only the newest queued desired state runs next.

use std::time::Duration;

use procurator_core::StorePath;
use procurator_proto::v1::HealthCheck;

use super::*;
use crate::outbox::Outgoing;
use crate::testing::{Behaviour, Host, eventually};

struct Harness {
    host: Host,
    outbox: Arc<Outbox>,
    activity: Arc<Activity>,
    tx: mpsc::Sender<Inbound>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    async fn new() -> Self {
        Self::trusting(Vec::new()).await
    }

    /// A deployer that acts only on statements signed by `keys`.
    async fn trusting(keys: Vec<procurator_core::intent::PublicKey>) -> Self {
        let host = Host::new().await;
        let outbox = Arc::new(Outbox::load(&host.path("state")));
        let activity = Arc::new(Activity::default());
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let deployer = Deployer {
            activator: Arc::new(host.activator()),
            outbox: outbox.clone(),
            activity: activity.clone(),
            intents: Arc::new(IntentPolicy::load(keys, &host.path("state")).unwrap()),
            machine: MachineName::parse("worker-1").unwrap(),
        };
        let task = tokio::spawn(deployer.run(rx, cancel.clone()));
        Harness {
            host,
            outbox,
            activity,
            tx,
            cancel,
            task,
        }
    }

    async fn send(&self, id: &str, closure: &StorePath, checks: &[&str]) {
        let state = DesiredState {
            deployment_id: id.into(),
            closure: closure.to_string(),
            health_checks: checks
                .iter()
                .map(|c| HealthCheck {
                    command: (*c).into(),
                    timeout_secs: 30,
                    interval_secs: 1,
                })
                .collect(),
            auto_rollback: true,
            ..DesiredState::default()
        };
        self.tx.send(state.into()).await.unwrap();
    }

    /// The next result, marked delivered.
    async fn result(&self) -> Outcome {
        let deadline = Duration::from_secs(60);
        loop {
            match tokio::time::timeout(deadline, self.outbox.next())
                .await
                .expect("no result in time")
            {
                Outgoing::Result(outcome) => {
                    self.outbox.delivered(&outcome);
                    return outcome;
                }
                Outgoing::Progress(_) => continue,
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_repeat_never_runs_twice_and_a_finished_one_is_answered_again() {
    let h = Harness::new().await;
    let old = h.host.system("old", Behaviour::default()).await;
    h.host.run(&old);
    let new = h.host.system("new", Behaviour::default()).await;
    let release = h.host.path("release");
    let wait = format!("while [ ! -e {} ]; do sleep 0.02; done", release.display());

    h.send("d-1", &new, &[&wait]).await;
    h.send("d-1", &new, &[&wait]).await;
    eventually("d-1 is active", || {
        h.activity.active_deployment().as_deref() == Some("d-1")
    })
    .await;
    h.send("d-1", &new, &[&wait]).await;
    std::fs::write(&release, "").unwrap();
    let first = h.result().await;
    assert_eq!(
        (first.deployment_id.as_str(), first.state),
        ("d-1", MachineState::Succeeded)
    );

    // Delivered already: the same desired state gets the same answer, nothing runs.
    h.send("d-1", &new, &[&wait]).await;
    assert_eq!(h.result().await, first);
    assert_eq!(h.host.calls(), ["new test", "new boot"]);
    assert_eq!(h.activity.active_deployment(), None);
    h.stop().await;
}

#[tokio::test]
async fn only_the_newest_desired_state_runs_after_the_current_one() {
    let h = Harness::new().await;
    let a = h.host.system("a", Behaviour::default()).await;
    h.host.run(&a);
    let b = h.host.system("b", Behaviour::default()).await;
    let c = h.host.system("c", Behaviour::default()).await;
    let d = h.host.system("d", Behaviour::default()).await;
    let release = h.host.path("release");
    let wait = format!("while [ ! -e {} ]; do sleep 0.02; done", release.display());

    h.send("d-b", &b, &[&wait]).await;
    eventually("d-b is active", || {
        h.activity.active_deployment().as_deref() == Some("d-b")
    })
    .await;
    h.send("d-c", &c, &[]).await;
    h.send("d-d", &d, &[]).await;
    eventually("d-d is queued", || {
        h.activity.queued_deployment().as_deref() == Some("d-d")
    })
    .await;
    std::fs::write(&release, "").unwrap();

    let first = h.result().await;
    assert_eq!(
        (first.deployment_id.as_str(), first.state),
        ("d-b", MachineState::Succeeded)
    );
    let second = h.result().await;
    assert_eq!(
        (second.deployment_id.as_str(), second.state),
        ("d-d", MachineState::Succeeded)
    );
    assert_eq!(second.current_system, d.as_str());
    assert_eq!(h.host.calls(), ["b test", "b boot", "d test", "d boot"]);
    h.stop().await;
}

#[tokio::test]
async fn an_invalid_desired_state_is_reported_failed() {
    let h = Harness::new().await;
    let state = DesiredState {
        deployment_id: "d-1".into(),
        closure: "/tmp/not-a-store-path".into(),
        ..DesiredState::default()
    };
    h.tx.send(state.into()).await.unwrap();
    let outcome = h.result().await;
    assert_eq!(outcome.state, MachineState::Failed);
    assert!(
        outcome
            .reason
            .starts_with("refused the desired state: bad closure: \"/tmp/not-a-store-path\""),
        "{}",
        outcome.reason
    );
    h.stop().await;
}

#[tokio::test]
async fn with_intent_keys_only_the_signed_statement_is_obeyed() {
    use procurator_core::intent::{Intent, IntentCheck, SigningKey};
    let ci = SigningKey::generate("ci-1").unwrap();
    let h = Harness::trusting(vec![ci.public_key()]).await;
    let old = h.host.system("old", Behaviour::default()).await;
    h.host.run(&old);
    let new = h.host.system("new", Behaviour::default()).await;
    let marker = h.host.path("PWNED");
    let signed_check = h.host.path("signed-check-ran");
    let intent = Intent {
        name: MachineName::parse("worker-1").unwrap(),
        closure: new.clone(),
        git_commit: "0123456789abcdef".to_owned().try_into().unwrap(),
        issued_at_ms: 1_000,
        health_checks: vec![IntentCheck {
            command: format!("touch {}", signed_check.display()),
            timeout_secs: 30,
            interval_secs: 1,
        }],
        auto_rollback: true,
        allow_reboot: false,
        confirm_timeout_secs: 0,
        vm: None,
    };
    let statement = ci.sign(&intent).unwrap().as_str().to_owned();
    let evil = HealthCheck {
        command: format!("touch {}", marker.display()),
        timeout_secs: 30,
        interval_secs: 1,
    };

    // Unsigned: refused, nothing runs.
    let unsigned = DesiredState {
        deployment_id: "d-1".into(),
        closure: new.to_string(),
        health_checks: vec![evil.clone()],
        ..DesiredState::default()
    };
    h.tx.send(unsigned.into()).await.unwrap();
    let outcome = h.result().await;
    assert_eq!(outcome.state, MachineState::Failed);
    assert!(
        outcome
            .reason
            .starts_with("intent refused: the control plane sent no signed statement"),
        "{}",
        outcome.reason
    );

    // Signed, with the control plane's own health check beside it: the
    // statement's check runs, the control plane's never does.
    let signed = DesiredState {
        deployment_id: "d-2".into(),
        closure: new.to_string(),
        health_checks: vec![evil],
        intent: statement,
        ..DesiredState::default()
    };
    h.tx.send(signed.into()).await.unwrap();
    let outcome = h.result().await;
    assert_eq!(outcome.state, MachineState::Succeeded, "{}", outcome.reason);
    assert!(signed_check.exists(), "the signed check ran");
    assert!(!marker.exists(), "the control plane's check never ran");
    assert_eq!(h.host.calls(), ["new test", "new boot"]);
    h.stop().await;
}

#[tokio::test]
async fn a_cancelled_queued_state_is_dropped_and_a_running_one_continues() {
    let h = Harness::new().await;
    let a = h.host.system("a", Behaviour::default()).await;
    h.host.run(&a);
    let b = h.host.system("b", Behaviour::default()).await;
    let c = h.host.system("c", Behaviour::default()).await;
    let release = h.host.path("release");
    let wait = format!("while [ ! -e {} ]; do sleep 0.02; done", release.display());

    h.send("d-b", &b, &[&wait]).await;
    eventually("d-b is active", || {
        h.activity.active_deployment().as_deref() == Some("d-b")
    })
    .await;
    h.send("d-c", &c, &[]).await;
    eventually("d-c is queued", || {
        h.activity.queued_deployment().as_deref() == Some("d-c")
    })
    .await;
    for id in ["d-c", "d-b"] {
        let cancel = Cancel {
            deployment_id: id.into(),
            reason: "cancelled by alice".into(),
        };
        h.tx.send(cancel.into()).await.unwrap();
    }
    let dropped = h.result().await;
    assert_eq!(
        (
            dropped.deployment_id.as_str(),
            dropped.state,
            dropped.reason.as_str()
        ),
        ("d-c", MachineState::Cancelled, "cancelled by alice")
    );
    assert_eq!(dropped.to_proto().state(), MachineState::Cancelled);
    assert_eq!(h.activity.queued_deployment(), None);
    std::fs::write(&release, "").unwrap();
    let running = h.result().await;
    assert_eq!(
        (running.deployment_id.as_str(), running.state),
        ("d-b", MachineState::Succeeded)
    );
    assert_eq!(h.host.calls(), ["b test", "b boot"]);
    h.stop().await;
}
