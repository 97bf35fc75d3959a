//! Change detection: what was built against what ran before (a
//! [`Baseline`]: `--previous`, or what the fleet runs).
//!
//! A machine has changed when its closure differs, when it is new, when it
//! is gone, or when only its blueprint entry differs (health checks,
//! rollback, address): the control plane needs the new spec even when the
//! system is the same, so that counts as a change too ("blueprint").

use anyhow::Context as _;
use procurator_core::artifact::{MachineSpec, instance_names};
use procurator_core::nix::{Nix, PathInfoQuery};
use procurator_core::{MachineName, StorePath};
use serde_json::{Value, json};

use super::Evaluated;
use super::baseline::{Baseline, Before, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// No deployment is known to have run it before.
    Added,
    /// In force before, no longer in the blueprint.
    Removed,
    /// A new closure (or one not known to run there).
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
    pub compared_with: Source,
}

/// How `name` changed, and the closure it ran before. A VM machine runs on
/// each of its instances: it is unchanged only when every one of them is.
fn change_of(
    baseline: &Baseline,
    name: &MachineName,
    spec: &MachineSpec,
    closure: Option<&StorePath>,
) -> (Change, Option<StorePath>) {
    let rows = if spec.is_vm() {
        // Checked when the blueprint was read: the names are valid.
        instance_names(name, spec.replicas).unwrap_or_default()
    } else {
        vec![name.clone()]
    };
    let before: Vec<&Before> = rows.iter().filter_map(|r| baseline.rows.get(r)).collect();
    let Some(first) = before.first() else {
        return (Change::Added, None);
    };
    // An agent that runs a system no kept deployment put there (its first
    // deployment is still to come) is new to the control plane.
    if before.iter().all(|b| b.spec.is_none()) {
        return (Change::Added, first.closure.clone());
    }
    if let Some(other) = before.iter().find(|b| b.closure.as_ref() != closure) {
        return (Change::Closure, other.closure.clone());
    }
    // New instances of a VM machine come with a new replica count.
    let new_instances = before.len() < rows.len();
    if new_instances || before.iter().any(|b| b.spec.as_ref() != Some(spec)) {
        return (Change::Blueprint, first.closure.clone());
    }
    (Change::Unchanged, first.closure.clone())
}

impl Plan {
    /// Compares what was built with what ran before.
    pub fn compare(baseline: &Baseline, new: &Evaluated) -> Self {
        let mut machines: Vec<MachineChange> = new
            .specs
            .iter()
            .map(|(name, spec)| {
                let closure = new.closures.get(name).cloned();
                let (change, previous) = change_of(baseline, name, spec, closure.as_ref());
                MachineChange {
                    name: name.clone(),
                    previous,
                    closure,
                    change,
                    closure_size: None,
                    diff: None,
                }
            })
            .collect();
        machines.extend(
            baseline
                .in_force
                .iter()
                .filter(|(name, _)| !new.specs.contains_key(*name))
                .map(|(name, old)| MachineChange {
                    name: name.clone(),
                    previous: old.clone(),
                    closure: None,
                    change: Change::Removed,
                    closure_size: None,
                    diff: None,
                }),
        );
        machines.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            machines,
            compared_with: baseline.source.clone(),
        }
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

    /// `{changed, comparedWith, machines}`.
    pub fn json(&self) -> Value {
        json!({
            "changed": self.changed(),
            "comparedWith": self.compared_with.json(),
            "machines": self.machines_json(),
        })
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;
