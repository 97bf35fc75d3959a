//! What the control plane lets each role do, what it passes on of a signed
//! artifact, and the stale-commit rule without intents, over real mTLS.

use procurator_core::DeploymentArtifact;
use procurator_core::intent::SigningKey;
use procurator_proto::v1::{CancelRequest, RollbackRequest};

use super::*;
use crate::test_support::artifact_json_with;

#[tokio::test]
async fn ci_may_submit_and_read_but_not_cancel_or_roll_back() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let id = ci
        .submit(submit_request(&[("web-1", "sys")]))
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    let cancel = CancelRequest {
        deployment_id: id.clone(),
        reason: String::new(),
    };
    let denied = ci.cancel(cancel.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("role operator"), "{denied:?}");
    let denied = ci.rollback(RollbackRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = ci
        .plan_rollback(RollbackRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // The operator may; the deployment was not touched by CI's attempts.
    let mut operator = server.deployments(Role::Operator, "admin");
    let get = GetDeploymentRequest {
        deployment_id: id.clone(),
    };
    let before = ci.get_deployment(get.clone()).await.unwrap().into_inner();
    assert_eq!(before.state(), DeploymentState::Running);
    let cancelled = operator.cancel(cancel).await.unwrap().into_inner();
    assert_eq!(cancelled.id, id);
}

#[tokio::test]
async fn only_a_marked_certificate_may_offer_vm_capacity() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let (_tx, refused) = server
        .dial(
            Role::Agent,
            "web-3",
            Some(vm_host_hello(1_000_000, 1 << 20, &[])),
        )
        .await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("--vm-host"), "{status:?}");

    // Nothing was placed on it, nor recorded of it.
    let mut operator = server.deployments(Role::Operator, "admin");
    let agents = operator
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents.iter().all(|a| a.vm_host.is_none()), "{agents:?}");
    // As a plain machine it is welcome.
    let (_tx, _stream) = server.connect("web-3", hello()).await;
    // A marked one is a VM host.
    let (_tx, _host) = server.connect("web-1", vm_host_hello(4, 8, &[])).await;
    let agents = operator
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let hosts: Vec<&str> = agents
        .iter()
        .filter(|a| a.vm_host.is_some())
        .map(|a| a.machine.as_str())
        .collect();
    assert_eq!(hosts, ["web-1"]);
}

#[tokio::test]
async fn a_signed_artifact_is_forwarded_verbatim_and_its_key_recorded() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let key = SigningKey::generate("ci-1").unwrap();
    let mut artifact =
        DeploymentArtifact::from_json(artifact_json(COMMIT, &[("web-1", "sys")]).as_bytes())
            .unwrap();
    artifact.sign(&key, 1_000).unwrap();
    let statement = artifact
        .intents
        .values()
        .next()
        .unwrap()
        .as_str()
        .to_owned();
    let mut ci = server.deployments(Role::Ci, "ci");
    let id = ci
        .submit(SubmitRequest {
            artifact_json: artifact.canonical_json(),
            force: false,
            on: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    let (_tx, mut stream) = server.connect("web-1", hello()).await;
    let control_message::Kind::DesiredState(desired) = next(&mut stream).await else {
        panic!("no DesiredState")
    };
    assert_eq!(desired.intent, statement);
    let deployment = crate::test_support::with_rows(&mut ci, &id).await;
    assert_eq!(deployment.intent_keys, ["ci-1"]);

    // Edited after signing: refused at the door, nothing stored.
    let mut value: serde_json::Value = serde_json::from_str(&artifact.canonical_json()).unwrap();
    value["blueprint"]["web-1"]["deployment"]["healthChecks"][0]["command"] =
        "id > /run/PWNED".into();
    let refused = ci
        .submit(SubmitRequest {
            artifact_json: value.to_string(),
            force: true,
            on: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("healthChecks"), "{refused:?}");
}

#[tokio::test]
async fn an_artifact_without_a_time_cannot_displace_one_with_a_time() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let timed = artifact_json_with(
        COMMIT,
        &[("web-1", "gen2")],
        r#""gitCommitTime": 1800000000"#,
    );
    ci.submit(SubmitRequest {
        artifact_json: timed,
        force: false,
        on: Vec::new(),
    })
    .await
    .unwrap();
    // The downgrade: a fresh commit id, no time, an old closure.
    let downgrade = artifact_json(
        "deadbeef00000000000000000000000000000000",
        &[("web-1", "gen1")],
    );
    let refused = ci
        .submit(SubmitRequest {
            artifact_json: downgrade.clone(),
            force: false,
            on: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("has no gitCommitTime"),
        "{refused:?}"
    );

    // Forced, it goes through and says who forced it.
    let forced = ci
        .submit(SubmitRequest {
            artifact_json: downgrade,
            force: true,
            on: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let deployment = crate::test_support::with_rows(&mut ci, &forced.deployment_id).await;
    assert_eq!(deployment.forced_by, "ci");
    let mut watch = ci
        .watch(WatchRequest {
            deployment_id: forced.deployment_id,
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    let Some(event::Kind::Submitted(submitted)) = first.kind else {
        panic!("the first event is not the submission: {first:?}")
    };
    assert_eq!(submitted.forced_by, "ci");
}

#[tokio::test]
async fn a_rollback_carries_fresh_statements_or_is_refused() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let key = SigningKey::generate("ops-1").unwrap();
    let mut operator = server.deployments(Role::Operator, "admin");
    let first = operator
        .submit(submit_request(&[("web-1", "old")]))
        .await
        .unwrap()
        .into_inner();
    let plan = operator
        .plan_rollback(RollbackRequest {
            to_deployment_id: first.deployment_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.to_deployment_id, first.deployment_id);
    let mut artifact = DeploymentArtifact::from_json(plan.artifact_json.as_bytes()).unwrap();
    artifact.sign(&key, 2_000).unwrap();
    let intents: std::collections::HashMap<String, String> = artifact
        .intents
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_str().to_owned()))
        .collect();

    // Statements for another closure do not fit the target.
    let mut wrong =
        DeploymentArtifact::from_json(artifact_json(COMMIT, &[("web-1", "other")]).as_bytes())
            .unwrap();
    wrong.sign(&key, 2_000).unwrap();
    let refused = operator
        .rollback(RollbackRequest {
            to_deployment_id: first.deployment_id.clone(),
            intents: wrong
                .intents
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_str().to_owned()))
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("closure"), "{refused:?}");

    let back = operator
        .rollback(RollbackRequest {
            to_deployment_id: first.deployment_id.clone(),
            intents,
        })
        .await
        .unwrap()
        .into_inner();
    let deployment = crate::test_support::with_rows(&mut operator, &back.deployment_id).await;
    assert_eq!(deployment.rollback_of, first.deployment_id);
    assert_eq!(deployment.intent_keys, ["ops-1"]);
}

#[tokio::test]
async fn a_row_never_sent_cannot_be_confirmed() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let request = submit_request(&[("web-1", "sys")]);
    let closure = DeploymentArtifact::from_json(request.artifact_json.as_bytes())
        .unwrap()
        .closures
        .into_values()
        .next()
        .unwrap()
        .to_string();
    // web-1's agent is not connected: its row waits, PENDING.
    let id = ci.submit(request).await.unwrap().into_inner().deployment_id;
    let mut confirmer = AgentServiceClient::new(server.channel(Role::Agent, "web-1"));
    let refused = confirmer
        .confirm(procurator_proto::v1::ConfirmRequest {
            deployment_id: id.clone(),
            closure,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("not sent"), "{refused:?}");
    let deployment = crate::test_support::with_rows(&mut ci, &id).await;
    assert_eq!(deployment.machines[0].state(), MachineState::Pending);
}
