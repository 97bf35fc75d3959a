//! What each machine runs now, as far as the store knows: the baseline
//! `plan` and `ci` compare a new build with (`ListRunning`).
//!
//! A row's closure is what its agent last reported; for an agent never
//! seen, the closure of the newest deployment that succeeded on it. Its
//! blueprint entry comes from that deployment, so a change of health checks
//! alone is still seen as a change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use procurator_core::limits::{MAX_PAGE_BYTES, MAX_PAGE_ROWS};
use procurator_core::{DeploymentArtifact, MachineName};
use procurator_proto::v1::{MachineState, RunningMachine};

use super::deployments::in_force;
use super::engine::{SqlExt as _, ToParam};
use super::{Store, StoreError};

/// One page of [`Store::running`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunningPage {
    pub machines: Vec<RunningMachine>,
    /// The last row name of this page when more follow.
    pub next_after: Option<String>,
    /// The deployment in force and its commit.
    pub in_force: Option<(String, String)>,
}

impl Store {
    /// Up to `page_size` rows whose names sort after `after`, in name order.
    pub async fn running(&self, after: String, page_size: u32) -> Result<RunningPage, StoreError> {
        let artifacts = self.inner.artifacts.clone();
        let page_size = page_size.clamp(1, MAX_PAGE_ROWS);
        self.read(move |conn| {
            let in_force = in_force(conn)?.map(|d| (d.id, d.git_commit));
            let in_force_id = in_force.as_ref().map_or("", |(id, _)| id.as_str());
            let mut names: Vec<String> = conn.fetch_all(
                &format!(
                    "SELECT machine FROM (
                         SELECT machine FROM agents
                         UNION SELECT machine FROM machines WHERE state IN ({succeeded})
                         UNION SELECT machine FROM machines WHERE deployment_id = ?1
                     ) AS names WHERE machine > ?2 ORDER BY machine LIMIT ?3",
                    succeeded = *SUCCEEDED
                ),
                &[&in_force_id, &after.as_str(), &(page_size + 1)],
                |r| r.get(0),
            )?;
            let more = names.len() > page_size as usize;
            names.truncate(page_size as usize);
            let (Some(first), Some(last)) = (names.first(), names.last()) else {
                return Ok(RunningPage {
                    in_force,
                    ..RunningPage::default()
                });
            };
            let range: [&dyn ToParam; 2] = [&first.as_str(), &last.as_str()];
            let reported: HashMap<String, String> = conn
                .fetch_all(
                    "SELECT machine, current_system FROM agents
                     WHERE machine >= ?1 AND machine <= ?2 AND current_system != ''",
                    &range,
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .into_iter()
                .collect();
            let succeeded: HashMap<String, (String, String)> = conn
                .fetch_all(
                    &format!(
                        "SELECT machine, closure, deployment_id FROM (
                             SELECT m.machine, m.closure, m.deployment_id,
                                    ROW_NUMBER() OVER (PARTITION BY m.machine ORDER BY d.seq DESC) AS nth
                             FROM machines m JOIN deployments d ON d.id = m.deployment_id
                             WHERE m.state IN ({succeeded}) AND m.machine >= ?1 AND m.machine <= ?2
                         ) AS newest WHERE nth = 1",
                        succeeded = *SUCCEEDED
                    ),
                    &range,
                    |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))),
                )?
                .into_iter()
                .collect();
            let in_force_rows: BTreeSet<String> = conn
                .fetch_all(
                    "SELECT machine FROM machines
                     WHERE deployment_id = ?1 AND machine >= ?2 AND machine <= ?3",
                    &[&in_force_id, &first.as_str(), &last.as_str()],
                    |r| r.get(0),
                )?
                .into_iter()
                .collect();

            let mut parsed: BTreeMap<String, Arc<DeploymentArtifact>> = BTreeMap::new();
            let mut page = RunningPage {
                in_force: in_force.clone(),
                ..RunningPage::default()
            };
            let mut bytes = 0;
            for name in &names {
                let (deployment_id, deployed) = match succeeded.get(name) {
                    Some((closure, id)) => (id.clone(), Some(closure.clone())),
                    None => (String::new(), None),
                };
                // The blueprint machine and its entry: from the deployment
                // that succeeded, else from the one in force.
                let source = if deployment_id.is_empty() && in_force_rows.contains(name) {
                    in_force_id
                } else {
                    &deployment_id
                };
                let (blueprint_machine, spec_json) = if source.is_empty() {
                    (String::new(), String::new())
                } else {
                    let artifact = match parsed.get(source) {
                        Some(found) => found.clone(),
                        None => {
                            let found = artifacts.get(conn, source)?;
                            parsed.insert(source.to_owned(), found.clone());
                            found
                        }
                    };
                    entry(&artifact, name)
                };
                let agent = reported.get(name);
                let row = RunningMachine {
                    machine: name.clone(),
                    blueprint_machine,
                    closure: agent.cloned().or(deployed).unwrap_or_default(),
                    reported_by_agent: agent.is_some(),
                    // Only the deployment that succeeded says what runs.
                    spec_json: if deployment_id.is_empty() {
                        String::new()
                    } else {
                        spec_json
                    },
                    deployment_id,
                    in_force: in_force_rows.contains(name),
                };
                bytes += prost::Message::encoded_len(&row);
                page.machines.push(row);
                if bytes > MAX_PAGE_BYTES {
                    break;
                }
            }
            if more || page.machines.len() < names.len() {
                page.next_after = page.machines.last().map(|m| m.machine.clone());
            }
            Ok(page)
        })
        .await
    }
}

/// `state IN (…)` for rows whose machine ran the deployment's closure at the
/// end: succeeded, or skipped because it ran it already.
static SUCCEEDED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}, {}",
        MachineState::Succeeded as i32,
        MachineState::Skipped as i32
    )
});

/// The blueprint machine behind row `name` in `artifact`, and its entry as JSON.
fn entry(artifact: &DeploymentArtifact, name: &str) -> (String, String) {
    let Some((machine, spec)) = MachineName::parse(name)
        .ok()
        .and_then(|row| artifact.machine_of(&row))
    else {
        return (String::new(), String::new());
    };
    let json = serde_json::to_string(spec).unwrap_or_else(|e| {
        tracing::warn!(error = %e, machine = %machine, "a blueprint entry cannot be encoded");
        String::new()
    });
    (machine.to_string(), json)
}
