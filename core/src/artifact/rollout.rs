//! The optional `rollout` key of `deployment.json`: how a deployment moves
//! through the fleet (docs/rollouts.md), and the wave plan derived from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::MachineSpec;
use crate::names::MachineName;

/// Defaults when the artifact says nothing (documented in docs/rollouts.md).
pub const DEFAULT_CONFIRM_TIMEOUT_SECS: u32 = 30;
pub const DEFAULT_UNREACHABLE_AFTER_SECS: u32 = 300;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// Machines of the current wave in flight at once; 0 means no limit.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Ordered waves; none means one wave with every machine.
    #[serde(default)]
    pub waves: Vec<WaveSpec>,
    /// Failed machines tolerated before the rollout halts.
    #[serde(default)]
    pub failure_budget: u32,
    /// Seconds the agent waits for a confirmation over a new connection; 0 turns it off.
    #[serde(default)]
    pub confirm_timeout: Option<u32>,
    /// Seconds a machine may go without a connected agent before it is unreachable.
    #[serde(default)]
    pub unreachable_after: Option<u32>,
}

/// One wave: the machines not taken by an earlier wave that match all of its
/// selectors, in name order, at most `count` of them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<Vec<MachineName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// A wave as planned for one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWave {
    pub name: String,
    pub machines: Vec<MachineName>,
}

impl Rollout {
    pub fn confirm_timeout_secs(&self) -> u32 {
        self.confirm_timeout.unwrap_or(DEFAULT_CONFIRM_TIMEOUT_SECS)
    }

    pub fn unreachable_after_secs(&self) -> u32 {
        self.unreachable_after
            .unwrap_or(DEFAULT_UNREACHABLE_AFTER_SECS)
    }

    /// Check what can only be checked against the blueprint: a wave that
    /// names a machine the blueprint does not have, or an empty name.
    pub(super) fn check(
        &self,
        blueprint: &BTreeMap<MachineName, MachineSpec>,
    ) -> Result<(), String> {
        use crate::limits::{MAX_LABELS, MAX_STRING_BYTES, MAX_WAVES};
        if self.waves.len() > MAX_WAVES {
            return Err(format!(
                "rollout.waves: {} waves; at most {MAX_WAVES} are allowed",
                self.waves.len()
            ));
        }
        for (i, wave) in self.waves.iter().enumerate() {
            if wave.name.trim().is_empty() {
                return Err(format!("rollout.waves[{i}].name: must not be empty"));
            }
            if wave.name.len() > MAX_STRING_BYTES {
                return Err(format!(
                    "rollout.waves[{i}].name: {} bytes; at most {MAX_STRING_BYTES} are allowed",
                    wave.name.len()
                ));
            }
            for (what, selector) in [("labels", &wave.labels), ("roles", &wave.roles)] {
                let selector = selector.as_deref().unwrap_or_default();
                if selector.len() > MAX_LABELS
                    || selector.iter().any(|s| s.len() > MAX_STRING_BYTES)
                {
                    return Err(format!(
                        "rollout.waves[{i}].{what}: at most {MAX_LABELS} of at most {MAX_STRING_BYTES} bytes each are allowed"
                    ));
                }
            }
            for m in wave.machines.iter().flatten() {
                if !blueprint.contains_key(m) {
                    return Err(format!(
                        "rollout.waves[{i}].machines: {m:?} is not in the blueprint"
                    ));
                }
            }
            if wave.count == Some(0) {
                return Err(format!(
                    "rollout.waves[{i}].count: must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        Ok(())
    }

    /// Assign every row of `rows` (name, its blueprint machine, the
    /// machine's spec) to a wave, in order. Rows no wave takes form a last
    /// wave named `rest`; waves that select nothing are dropped.
    pub fn plan<'a>(
        &self,
        rows: impl IntoIterator<Item = (MachineName, MachineName, &'a MachineSpec)>,
    ) -> Vec<PlannedWave> {
        let mut left: Vec<(MachineName, MachineName, &MachineSpec)> = rows.into_iter().collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        let mut planned = Vec::new();
        for wave in &self.waves {
            let limit = wave.count.map_or(usize::MAX, |c| c as usize);
            let mut taken = Vec::new();
            left.retain(|(name, machine, spec)| {
                if taken.len() < limit && wave.selects(name, machine, spec) {
                    taken.push(name.clone());
                    false
                } else {
                    true
                }
            });
            if !taken.is_empty() {
                planned.push(PlannedWave {
                    name: wave.name.clone(),
                    machines: taken,
                });
            }
        }
        if !left.is_empty() {
            planned.push(PlannedWave {
                name: if self.waves.is_empty() {
                    "all".to_owned()
                } else {
                    "rest".to_owned()
                },
                machines: left.into_iter().map(|(name, ..)| name).collect(),
            });
        }
        planned
    }
}

impl WaveSpec {
    /// A VM instance is selected by its own name or its machine's.
    fn selects(&self, name: &MachineName, machine: &MachineName, spec: &MachineSpec) -> bool {
        self.machines
            .as_ref()
            .is_none_or(|ms| ms.contains(name) || ms.contains(machine))
            && self
                .labels
                .as_ref()
                .is_none_or(|ls| ls.iter().all(|l| spec.labels.contains(l)))
            && self.roles.as_ref().is_none_or(|rs| rs.contains(&spec.role))
    }
}
