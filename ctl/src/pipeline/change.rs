//! Change detection: what was built against the previous deployment.
//!
//! A machine has changed when its closure differs, when it is new, when it
//! is gone, or when only its blueprint entry differs (health checks,
//! rollback, address): the control plane needs the new spec even when the
//! system is the same, so that counts as a change too ("blueprint").

use std::path::Path;

use anyhow::Context as _;
use procurator_core::nix::{Nix, PathInfoQuery};
use procurator_core::{DeploymentArtifact, MachineName, StorePath};
use serde_json::{Value, json};

use super::Evaluated;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Not in the previous deployment (or there is none).
    Added,
    /// In the previous deployment, no longer in the blueprint.
    Removed,
    /// A new closure.
    Closure,
    /// The same closure, a different blueprint entry.
    Blueprint,
    /// Nothing to deploy.
    Unchanged,
}

impl Change {
    pub fn is_change(self) -> bool {
        self != Change::Unchanged
    }

    /// The CHANGED column of `plan`.
    pub fn text(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Closure => "yes",
            Change::Blueprint => "blueprint",
            Change::Unchanged => "no",
        }
    }

    /// `change` in JSON output.
    pub fn json(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Closure => "closure",
            Change::Blueprint => "blueprint",
            Change::Unchanged => "none",
        }
    }
}

/// One machine of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineChange {
    pub name: MachineName,
    pub previous: Option<StorePath>,
    /// `None` for a removed machine.
    pub closure: Option<StorePath>,
    pub change: Change,
    /// Bytes of the new closure, once [`Plan::fill_sizes`] asked Nix.
    pub closure_size: Option<u64>,
    /// `nix store diff-closures` output, when asked for.
    pub diff: Option<String>,
}

/// Every machine, new and old, in name order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub machines: Vec<MachineChange>,
}

/// Reads the artifact of the previous deployment. A path that does not
/// exist is an error: a typo must not make every machine look new.
pub fn load_previous(path: &Path) -> anyhow::Result<DeploymentArtifact> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "--previous {}: cannot read it; pass the deployment.json of the last deployment, \
             or leave --previous out to treat every machine as changed",
            path.display()
        )
    })?;
    DeploymentArtifact::from_json(&bytes).with_context(|| {
        format!(
            "--previous {} is not a valid deployment.json",
            path.display()
        )
    })
}

impl Plan {
    /// Compares what was built with `previous`; without one, every machine
    /// is added.
    pub fn compare(previous: Option<&DeploymentArtifact>, new: &Evaluated) -> Self {
        let mut machines: Vec<MachineChange> = new
            .specs
            .iter()
            .map(|(name, spec)| {
                let closure = new.closures.get(name).cloned();
                let before =
                    previous.and_then(|p| Some((p.closures.get(name)?, p.blueprint.get(name)?)));
                let change = match before {
                    None => Change::Added,
                    Some((old, _)) if Some(old) != closure.as_ref() => Change::Closure,
                    Some((_, old_spec)) if old_spec != spec => Change::Blueprint,
                    Some(_) => Change::Unchanged,
                };
                MachineChange {
                    name: name.clone(),
                    previous: before.map(|(old, _)| old.clone()),
                    closure,
                    change,
                    closure_size: None,
                    diff: None,
                }
            })
            .collect();
        if let Some(previous) = previous {
            machines.extend(
                previous
                    .closures
                    .iter()
                    .filter(|(name, _)| !new.specs.contains_key(*name))
                    .map(|(name, old)| MachineChange {
                        name: name.clone(),
                        previous: Some(old.clone()),
                        closure: None,
                        change: Change::Removed,
                        closure_size: None,
                        diff: None,
                    }),
            );
        }
        machines.sort_by(|a, b| a.name.cmp(&b.name));
        Self { machines }
    }

    /// Whether anything needs deploying.
    pub fn changed(&self) -> bool {
        self.machines.iter().any(|m| m.change.is_change())
    }

    pub fn changed_count(&self) -> usize {
        self.machines
            .iter()
            .filter(|m| m.change.is_change())
            .count()
    }

    /// Asks the local store for each new closure's size.
    pub async fn fill_sizes(&mut self, nix: &Nix) -> anyhow::Result<()> {
        let closures: Vec<StorePath> = self
            .machines
            .iter()
            .filter_map(|m| m.closure.clone())
            .collect();
        let query = PathInfoQuery {
            closure_size: true,
            ..PathInfoQuery::default()
        };
        let infos = nix
            .path_info(query, &closures)
            .await
            .context("cannot read the closures' sizes")?;
        for m in &mut self.machines {
            m.closure_size = infos
                .iter()
                .find(|i| Some(&i.path) == m.closure.as_ref())
                .and_then(|i| i.closure_size);
        }
        Ok(())
    }

    /// `nix store diff-closures OLD NEW` for each machine with a new
    /// closure, when both are in the local store (the old one may have been
    /// built elsewhere or collected).
    pub async fn fill_diffs(&mut self, nix: &Nix) -> anyhow::Result<()> {
        let pairs: Vec<StorePath> = self
            .machines
            .iter()
            .filter(|m| m.change == Change::Closure)
            .flat_map(|m| m.previous.iter().chain(m.closure.iter()).cloned())
            .collect();
        let local = nix
            .path_info(PathInfoQuery::default(), &pairs)
            .await
            .context("cannot ask the local store which closures it holds")?;
        let here = |p: &StorePath| local.iter().any(|i| &i.path == p && i.valid);
        for m in &mut self.machines {
            let (Change::Closure, Some(old), Some(new)) = (m.change, &m.previous, &m.closure)
            else {
                continue;
            };
            m.diff = Some(if here(old) && here(new) {
                nix.diff_closures(old, new).await.with_context(|| {
                    format!("cannot compare {m_name}'s closures", m_name = m.name)
                })?
            } else {
                format!("(the previous closure {old} is not in this machine's store: no diff)\n")
            });
        }
        Ok(())
    }

    /// MACHINE, PREVIOUS, NEW, CHANGED, SIZE; then each diff, if any.
    pub fn table(&self) -> String {
        let dash = || "-".to_owned();
        let rows: Vec<Vec<String>> = self
            .machines
            .iter()
            .map(|m| {
                vec![
                    m.name.to_string(),
                    m.previous.as_ref().map_or_else(dash, ToString::to_string),
                    m.closure.as_ref().map_or_else(dash, ToString::to_string),
                    m.change.text().to_owned(),
                    m.closure_size.map_or_else(dash, crate::format::bytes),
                ]
            })
            .collect();
        let mut out =
            crate::output::table(&["MACHINE", "PREVIOUS", "NEW", "CHANGED", "SIZE"], &rows);
        for m in &self.machines {
            if let Some(diff) = &m.diff {
                out.push_str(&format!("\n{} ({}):\n", m.name, m.change.text()));
                if diff.trim().is_empty() {
                    out.push_str("  (no package changed version)\n");
                }
                for line in diff.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
        out
    }

    /// The last line of `plan`: how many machines changed.
    pub fn verdict(&self) -> String {
        match self.changed_count() {
            0 => "nothing changed".to_owned(),
            n => format!("{n} of {} machines changed", self.machines.len()),
        }
    }

    /// `[{name, previous, closure, change, closureSize}]`.
    pub fn machines_json(&self) -> Value {
        self.machines
            .iter()
            .map(|m| {
                let mut row = json!({
                    "name": m.name.as_str(),
                    "previous": m.previous.as_ref().map(StorePath::as_str),
                    "closure": m.closure.as_ref().map(StorePath::as_str),
                    "change": m.change.json(),
                    "closureSize": m.closure_size,
                });
                if let Some(diff) = &m.diff {
                    row["diff"] = diff.as_str().into();
                }
                row
            })
            .collect()
    }

    /// `{changed, machines}`.
    pub fn json(&self) -> Value {
        json!({ "changed": self.changed(), "machines": self.machines_json() })
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;
