//! Confirm, cancel, stale commits and rollback over real mTLS.

use procurator_proto::v1::{CancelRequest, ConfirmRequest, RollbackRequest};

use super::*;

const OLDER: &str = "1111111111111111111111111111111111111111";

fn submit_commit(commit: &str, machines: &[(&str, &str)], force: bool) -> SubmitRequest {
    SubmitRequest {
        artifact_json: artifact_json(commit, machines),
        force,
        on: Vec::new(),
    }
}

#[tokio::test]
async fn confirm_is_answered_then_refused_after_cancel() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let id = ci
        .submit(submit_request(&[("web-1", "sys")]))
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    let (tx, mut stream) = server.connect("web-1", hello()).await;
    let control_message::Kind::DesiredState(desired) = next(&mut stream).await else {
        panic!("no DesiredState")
    };
    assert_eq!(desired.confirm_timeout_secs, 30);
    tx.send(agent(agent_message::Kind::Progress(Progress {
        deployment_id: id.clone(),
        state: MachineState::Checking as i32,
        ..Default::default()
    })))
    .await
    .unwrap();

    // A new connection, as the agent makes it after its health checks.
    let mut confirmer = AgentServiceClient::new(server.channel(Role::Agent, "web-1"));
    let request = ConfirmRequest {
        deployment_id: id.clone(),
        closure: desired.closure.clone(),
    };
    let answer = confirmer
        .confirm(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(answer.confirmed, "{answer:?}");
    let unknown = ConfirmRequest {
        deployment_id: "d-19700101-000000-0000".into(),
        closure: desired.closure.clone(),
    };
    assert_eq!(
        confirmer.confirm(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let malformed = ConfirmRequest {
        deployment_id: id.clone(),
        closure: "/tmp/x".into(),
    };
    assert_eq!(
        confirmer.confirm(malformed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut as_ci = AgentServiceClient::new(server.channel(Role::Ci, "ci"));
    assert_eq!(
        as_ci.confirm(request.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Only an operator may cancel.
    let mut operator = server.deployments(Role::Operator, "admin");
    let cancelled = operator
        .cancel(CancelRequest {
            deployment_id: id.clone(),
            reason: "wrong closure".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        cancelled.halted_reason.contains("wrong closure"),
        "{cancelled:?}"
    );
    let control_message::Kind::Cancel(cancel) = next(&mut stream).await else {
        panic!("no Cancel")
    };
    assert_eq!(cancel.deployment_id, id);
    let answer = confirmer.confirm(request).await.unwrap().into_inner();
    assert!(!answer.confirmed);
    assert!(answer.reason.contains("cancelled"), "{answer:?}");

    tx.send(agent(agent_message::Kind::Result(ActivationResult {
        deployment_id: id.clone(),
        state: MachineState::RolledBack as i32,
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut watch = ci
        .watch(WatchRequest {
            deployment_id: id.clone(),
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut finished = None;
    while let Some(event) = watch.message().await.unwrap() {
        if let Some(event::Kind::Finished(fin)) = event.kind {
            finished = Some(fin.state());
        }
    }
    assert_eq!(finished, Some(DeploymentState::Cancelled));
    let again = CancelRequest {
        deployment_id: id,
        reason: String::new(),
    };
    assert_eq!(
        operator.cancel(again).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn an_older_commit_is_refused_unless_forced() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let machines = &[("web-1", "old")];
    ci.submit(submit_commit(OLDER, machines, false))
        .await
        .unwrap();
    ci.submit(submit_request(&[("web-1", "new")]))
        .await
        .unwrap();

    let refused = ci
        .submit(submit_commit(OLDER, machines, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--force"), "{refused:?}");
    let forced = ci
        .submit(submit_commit(OLDER, machines, true))
        .await
        .unwrap()
        .into_inner();
    assert!(forced.created);
}

#[tokio::test]
async fn rollback_creates_a_new_deployment_marked_as_a_rollback() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Operator, "admin");
    let nothing = ci.rollback(RollbackRequest::default()).await.unwrap_err();
    assert_eq!(nothing.code(), Code::NotFound, "{nothing:?}");

    let first = ci
        .submit(submit_commit(OLDER, &[("web-1", "old")], false))
        .await
        .unwrap()
        .into_inner();
    ci.submit(submit_request(&[("web-1", "new")]))
        .await
        .unwrap();
    let back = ci
        .rollback(RollbackRequest {
            to_deployment_id: first.deployment_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(back.created);
    assert_ne!(back.deployment_id, first.deployment_id);
    let deployment = crate::test_support::with_rows(&mut ci, &back.deployment_id).await;
    assert_eq!(deployment.rollback_of, first.deployment_id);
    assert_eq!(deployment.git_commit, OLDER);
    assert_eq!(deployment.waves.len(), 1);
}

#[tokio::test]
async fn an_offline_machine_ends_unreachable_and_converges_when_it_connects() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let json = crate::test_support::artifact_json_with(
        COMMIT,
        &[("web-1", "sys")],
        r#""rollout": {"unreachableAfter": 1}"#,
    );
    let id = ci
        .submit(SubmitRequest {
            artifact_json: json,
            force: false,
            on: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    // The timer marks it unreachable, which finishes the deployment.
    let mut watch = ci
        .watch(WatchRequest {
            deployment_id: id.clone(),
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the deployment did not finish")
        .unwrap()
    {
        match event.kind {
            Some(event::Kind::Machine(update)) => seen.push(update.state()),
            Some(event::Kind::Finished(fin)) => {
                assert_eq!(fin.state(), DeploymentState::Failed);
            }
            _ => {}
        }
    }
    assert_eq!(seen, [MachineState::Unreachable]);

    // The agent comes back: the row re-opens and the machine gets it.
    let (_tx, mut stream) = server.connect("web-1", hello()).await;
    let control_message::Kind::DesiredState(desired) = next(&mut stream).await else {
        panic!("no DesiredState")
    };
    assert_eq!(desired.deployment_id, id);
    let deployment = crate::test_support::with_rows(&mut ci, &id).await;
    assert_eq!(deployment.state(), DeploymentState::Running);
    assert_eq!(deployment.machines[0].state(), MachineState::Sent);
}
