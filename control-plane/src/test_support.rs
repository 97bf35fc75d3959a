//! Helpers shared by this crate's tests.

use procurator_core::DeploymentArtifact;

/// A valid `deployment.json` for `machines` (name, closure name), each with
/// one enabled health check.
pub fn artifact_json(commit: &str, machines: &[(&str, &str)]) -> String {
    artifact_json_with(commit, machines, "")
}

/// As [`artifact_json`], with `extra` top-level keys (`"rollout": {…}`, …)
/// spliced in; an empty `extra` adds nothing.
pub fn artifact_json_with(commit: &str, machines: &[(&str, &str)], extra: &str) -> String {
    let blueprint: Vec<String> = machines
        .iter()
        .map(|(m, _)| {
            format!(
                r#""{m}": {{"role": "worker", "cpu": 1, "memory": {{"amount": 1, "unit": "GB"}},
                  "deployment": {{"addr": "192.0.2.1", "backend": "cloud-hypervisor",
                    "healthChecks": [{{"command": "true", "timeout": 5, "interval": 1}}]}}}}"#
            )
        })
        .collect();
    let closures: Vec<String> = machines
        .iter()
        .map(|(m, c)| format!(r#""{m}": "/nix/store/{}-{c}""#, "a".repeat(32)))
        .collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        r#"{{"gitCommit": "{commit}", "blueprint": {{{}}}, "closures": {{{}}}{extra}}}"#,
        blueprint.join(","),
        closures.join(",")
    )
}

pub fn artifact_with(
    commit: &str,
    machines: &[(&str, &str)],
    extra: &str,
) -> (DeploymentArtifact, String) {
    let json = artifact_json_with(commit, machines, extra);
    let parsed = DeploymentArtifact::from_json(json.as_bytes())
        .unwrap_or_else(|e| panic!("test artifact is invalid: {e}\n{json}"));
    (parsed, json)
}

pub fn artifact(commit: &str, machines: &[(&str, &str)]) -> (DeploymentArtifact, String) {
    let json = artifact_json(commit, machines);
    let parsed = DeploymentArtifact::from_json(json.as_bytes())
        .unwrap_or_else(|e| panic!("test artifact is invalid: {e}\n{json}"));
    (parsed, json)
}

/// Deployment `id` as GetDeployment says, with every row ListMachines pages.
pub async fn with_rows(
    client: &mut procurator_proto::v1::deployment_service_client::DeploymentServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
) -> procurator_proto::v1::Deployment {
    use procurator_proto::v1::{GetDeploymentRequest, ListMachinesRequest};
    let mut deployment = client
        .get_deployment(GetDeploymentRequest {
            deployment_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_machines(ListMachinesRequest {
                deployment_id: id.to_owned(),
                page_token,
                ..ListMachinesRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        deployment.machines.extend(page.machines);
        if page.next_page_token.is_empty() {
            return deployment;
        }
        page_token = page.next_page_token;
    }
}
