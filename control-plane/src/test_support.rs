//! Helpers shared by this crate's tests.

use procurator_core::DeploymentArtifact;

/// A valid `deployment.json` for `machines` (name, closure name), each with
/// one enabled health check.
pub fn artifact_json(commit: &str, machines: &[(&str, &str)]) -> String {
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
    format!(
        r#"{{"gitCommit": "{commit}", "blueprint": {{{}}}, "closures": {{{}}}}}"#,
        blueprint.join(","),
        closures.join(",")
    )
}

pub fn artifact(commit: &str, machines: &[(&str, &str)]) -> (DeploymentArtifact, String) {
    let json = artifact_json(commit, machines);
    let parsed = DeploymentArtifact::from_json(json.as_bytes())
        .unwrap_or_else(|e| panic!("test artifact is invalid: {e}\n{json}"));
    (parsed, json)
}
