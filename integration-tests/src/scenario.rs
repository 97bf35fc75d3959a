//! What the rollout-control, magic-rollback and crash-safety tests share:
//! artifacts carrying a `rollout` key (docs/rollouts.md), reading
//! deployments and machine states back, and reading what happened on a
//! host from outside it (activation log, journal).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::ctl::Ctl;
use crate::fixture::{self, Closures};
use crate::fleet::Fleet;
use crate::host::TestHost;

/// A machine's or deployment's `state`, `..._UNSPECIFIED` when absent
/// (proto3 JSON leaves defaults out).
pub fn state(value: &Value) -> &str {
    value
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or("STATE_UNSPECIFIED")
}

/// `ROLLED_BACK`, `rolled back` and `rolled-back` all read the same.
pub fn normalized(text: &str) -> String {
    text.to_lowercase().replace(['_', ' '], "-")
}

/// Deployment states after which nothing changes any more.
pub const FINAL_DEPLOYMENT_STATES: [&str; 5] = [
    "DEPLOYMENT_STATE_SUCCEEDED",
    "DEPLOYMENT_STATE_FAILED",
    "DEPLOYMENT_STATE_SUPERSEDED",
    "DEPLOYMENT_STATE_CANCELLED",
    "DEPLOYMENT_STATE_HALTED",
];

/// Writes deployment.json for `closures` with a fresh commit and the
/// top-level keys of `extra` (e.g. `rollout`, `gitCommitTime`) added.
pub fn write_artifact(
    fleet: &Fleet,
    closures: &Closures,
    extra: &Value,
) -> Result<(PathBuf, String)> {
    let commit = crate::commit_id();
    write_artifact_for(fleet, &commit, closures, extra).map(|p| (p, commit))
}

/// [`write_artifact`] with a given commit, in a file named after `commit`
/// and a counter (the same commit may be written twice with other keys).
pub fn write_artifact_for(
    fleet: &Fleet,
    commit: &str,
    closures: &Closures,
    extra: &Value,
) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let blueprint = fleet.fixture.blueprint(&fleet.nix)?;
    let mut artifact = fixture::deployment(commit, &blueprint, closures);
    if let (Some(object), Some(extra)) = (artifact.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            object.insert(k.clone(), v.clone());
        }
    }
    let dir = fleet.dir().join("deployments");
    crate::mkdir(&dir)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{commit}-{n}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&artifact)?)?;
    Ok(path)
}

/// Builds and publishes (signed) closures for `settings`, and writes their
/// artifact with `extra`.
pub fn prepare(
    fleet: &Fleet,
    settings: &Value,
    extra: &Value,
) -> Result<(Closures, PathBuf, String)> {
    let closures = fleet.build(settings)?;
    fleet.publish(&closures)?;
    let (path, commit) = write_artifact(fleet, &closures, extra)?;
    Ok((closures, path, commit))
}

/// `submit FILE --output json ARGS…` that must exit 0: the deployment id
/// and whether it was created.
pub fn submit(ctl: &Ctl, artifact: &std::path::Path, args: &[&str]) -> Result<(String, bool)> {
    let path = artifact.to_str().context("utf-8 path")?;
    let mut all = vec!["submit", path, "--output", "json"];
    all.extend_from_slice(args);
    let out = ctl.run(&all)?;
    out.expect_code(0)?;
    // With --wait the follow output comes after the first object; the
    // submission is the first line.
    let first = out.stdout.lines().next().unwrap_or_default();
    let reply: Value =
        serde_json::from_str(first).with_context(|| format!("submit printed no JSON: {out}"))?;
    let id = reply["deploymentId"]
        .as_str()
        .with_context(|| format!("no deploymentId: {out}"))?
        .to_owned();
    Ok((id, reply["created"].as_bool().unwrap_or(false)))
}

/// Every deployment, as `ListDeployments` returns them: summaries, no rows.
pub fn deployments(fleet: &Fleet) -> Result<Vec<Value>> {
    let reply = fleet.grpcurl()?.call_json(
        &fleet.pki.operator(),
        "procurator.v1.DeploymentService/ListDeployments",
        "{}",
    )?;
    Ok(reply
        .get("deployments")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// Deployment `id`, with its rows.
pub fn deployment(fleet: &Fleet, id: &str) -> Result<Value> {
    let summary = fleet.grpcurl()?.call_json(
        &fleet.pki.operator(),
        "procurator.v1.DeploymentService/GetDeployment",
        &serde_json::json!({ "deploymentId": id }).to_string(),
    )?;
    fleet.with_rows(summary)
}

/// Polls until deployment `id` is in a final state; returns it.
pub fn wait_final(fleet: &Fleet, id: &str, timeout: Duration) -> Result<Value> {
    let mut last = Value::Null;
    crate::wait_for(&format!("deployment {id} to finish"), timeout, || {
        last = deployment(fleet, id)?;
        Ok(FINAL_DEPLOYMENT_STATES
            .contains(&state(&last))
            .then(|| last.clone()))
    })
    .with_context(|| format!("last seen: {last}\n{}", fleet.logs()))
}

/// Polls until `machine`'s row of deployment `id` satisfies `pred`.
pub fn wait_machine(
    fleet: &Fleet,
    id: &str,
    machine: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    crate::wait_for(&format!("{machine} of {id}: {what}"), timeout, || {
        let d = deployment(fleet, id)?;
        last = Fleet::machine_states(&d)
            .remove(machine)
            .unwrap_or(Value::Null);
        Ok(pred(&last).then(|| last.clone()))
    })
    .with_context(|| format!("last seen: {last}\n{}", fleet.logs()))
}

/// The lines the fixture's `switch-to-configuration` appended to
/// /run/procurator-test/activations: `ACTION CLOSURE`, one per call.
pub fn activations(host: &TestHost) -> Vec<String> {
    std::fs::read_to_string(host.host_path("/run/procurator-test/activations"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many times `closure` was activated with `test` or `switch`.
pub fn activation_count(host: &TestHost, closure: &str) -> usize {
    activations(host)
        .iter()
        .filter(|l| {
            let mut words = l.split_whitespace();
            matches!(words.next(), Some("test" | "switch")) && words.next() == Some(closure)
        })
        .count()
}

/// The agent's journal (STATE_DIR/journal.json), read from outside;
/// `None` when there is none (or it is being replaced right now).
pub fn journal(host: &TestHost) -> Option<Value> {
    let text = std::fs::read_to_string(host.dir().join("state/journal.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The `phase` the journal records, wherever in the file it is.
pub fn journal_phase(host: &TestHost) -> Option<String> {
    fn find(v: &Value) -> Option<String> {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(p)) = map.get("phase") {
                    return Some(p.clone());
                }
                map.values().find_map(find)
            }
            Value::Array(items) => items.iter().find_map(find),
            _ => None,
        }
    }
    find(&journal(host)?)
}

/// The host runs `closure` with profile and boot entry on it (committed),
/// or runs `old` with the profile and boot entry untouched (rolled back or
/// never started): "exactly one of the two", docs/rollouts.md.
pub fn consistent_on(host: &TestHost, old: &str, new: &str) -> Result<&'static str> {
    let current = host.current_system()?;
    let profile = host.system_profile()?;
    let boot = host.boot_entry()?;
    if current.as_deref() == Some(new)
        && profile.as_deref() == Some(new)
        && boot.as_deref() == Some(new)
    {
        return Ok("new");
    }
    if current.as_deref() == Some(old)
        && profile.as_deref() == Some(old)
        && boot.as_deref() == Some(old)
        && host.system_generation()? == "system-1-link"
    {
        return Ok("old");
    }
    bail!(
        "{} is inconsistent: current {current:?}, profile {profile:?} ({}), boot entry {boot:?}; \
         old {old}, new {new}",
        host.name(),
        host.system_generation().unwrap_or_default()
    )
}
