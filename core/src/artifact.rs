//! `deployment.json`: the artifact CI writes and the control plane executes,
//! in exactly the shape of the user's workflow notes. Parsing validates
//! everything, so a value of [`DeploymentArtifact`] is always deployable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::intent::Statement;
use crate::names::MachineName;
use crate::store_path::StorePath;

pub use crate::limits::{MAX_ARTIFACT_BYTES, MAX_CHECK_COMMAND_BYTES, MAX_HEALTH_CHECKS};
use crate::limits::{MAX_LABELS, MAX_MACHINES, MAX_STRING_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("the artifact is empty: expected a JSON object with gitCommit, blueprint and closures")]
    Empty,
    #[error("the artifact is {0} bytes; the limit is {MAX_ARTIFACT_BYTES}")]
    TooLarge(usize),
    #[error(
        "the artifact ends early (line {line}, column {column}): the file is truncated; write it again"
    )]
    Truncated { line: usize, column: usize },
    #[error("the artifact is not valid JSON (line {line}, column {column}): {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Field { path: String, message: String },
    #[error(
        "closures.{0}: machine {0:?} has a closure but is not in the blueprint; add it to the blueprint or drop the closure"
    )]
    ClosureWithoutMachine(String),
    #[error(
        "blueprint.{0}: machine {0:?} has no closure in closures; build it, or remove it from the blueprint"
    )]
    MachineWithoutClosure(String),
    #[error("{0}")]
    Rollout(String),
    #[error("{0}")]
    Replicas(String),
    #[error("{0}")]
    Intents(String),
    #[error("{0}")]
    HealthChecks(String),
    #[error("{0}")]
    Limit(String),
    #[error("blueprint: the blueprint names no machine; there is nothing to deploy")]
    NoMachines,
}

/// `deployment.json`: `{ gitCommit, blueprint, closures }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentArtifact {
    /// The commit the closures were built from.
    pub git_commit: GitCommit,
    /// Every machine of the fleet, as `blueprintJSON` describes it.
    pub blueprint: BTreeMap<MachineName, MachineSpec>,
    /// The system closure each machine should run.
    pub closures: BTreeMap<MachineName, StorePath>,
    /// The commit's committer time (Unix seconds), so the control plane can
    /// refuse an artifact older than the one in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit_time: Option<i64>,
    /// How the deployment moves through the fleet (docs/rollouts.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// A signed statement per row (machine or VM instance), when the
    /// artifact is signed (crate::intent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intents: BTreeMap<MachineName, Statement>,
}

/// One machine of the blueprint (`VmSpec` in the workflow notes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineSpec {
    pub role: String,
    /// Virtual CPUs (fractional allowed).
    pub cpu: Cpu,
    pub memory: Memory,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    pub deployment: DeploymentSpec,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// A positive number of CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Cpu(f64);

impl TryFrom<f64> for Cpu {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 {
            Ok(Self(v))
        } else {
            Err(format!("cpu must be a positive number, got {v}"))
        }
    }
}

impl From<Cpu> for f64 {
    fn from(c: Cpu) -> f64 {
        c.0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    pub amount: Amount,
    pub unit: MemoryUnit,
}

/// A positive amount.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Amount(f64);

impl TryFrom<f64> for Amount {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 {
            Ok(Self(v))
        } else {
            Err(format!("memory amount must be a positive number, got {v}"))
        }
    }
}

impl From<Amount> for f64 {
    fn from(a: Amount) -> f64 {
        a.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryUnit {
    MB,
    GB,
    TB,
    MiB,
    GiB,
    TiB,
}

impl Memory {
    pub fn bytes(&self) -> u64 {
        let scale: f64 = match self.unit {
            MemoryUnit::MB => 1e6,
            MemoryUnit::GB => 1e9,
            MemoryUnit::TB => 1e12,
            MemoryUnit::MiB => (1u64 << 20) as f64,
            MemoryUnit::GiB => (1u64 << 30) as f64,
            MemoryUnit::TiB => (1u64 << 40) as f64,
        };
        (self.amount.0 * scale) as u64
    }
}

/// How a machine is reached and activated (`Deployment` in the workflow notes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentSpec {
    pub addr: String,
    pub backend: String,
    #[serde(default = "root")]
    pub ssh_user: String,
    #[serde(default = "ssh_port")]
    pub ssh_port: u16,
    #[serde(default)]
    pub health_checks: Vec<HealthCheckSpec>,
    /// Re-activate the closure that ran before when activation or a check fails.
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    /// Reboot after committing when the new closure needs it; otherwise the
    /// agent only reports that a reboot is needed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_reboot: bool,
}

fn root() -> String {
    "root".to_owned()
}

fn ssh_port() -> u16 {
    22
}

/// A health check: `sh -c command`, retried every `interval` seconds until it
/// exits 0 or `timeout` seconds have passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub command: NonEmpty,
    /// Seconds.
    pub timeout: Seconds,
    /// Seconds between attempts.
    #[serde(default = "default_interval")]
    pub interval: Seconds,
}

fn default_interval() -> Seconds {
    Seconds(1)
}

/// A whole number of seconds, at least 1 and at most a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "u32")]
pub struct Seconds(u32);

impl Seconds {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<f64> for Seconds {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.fract() == 0.0 && (1.0..=86_400.0).contains(&v) {
            Ok(Self(v as u32))
        } else {
            Err(format!(
                "expected whole seconds between 1 and 86400, got {v}"
            ))
        }
    }
}

impl From<Seconds> for u32 {
    fn from(s: Seconds) -> u32 {
        s.0
    }
}

/// A string with something in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NonEmpty(String);

impl NonEmpty {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NonEmpty {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.trim().is_empty() {
            Err("must not be empty")
        } else {
            Ok(Self(s))
        }
    }
}

impl From<NonEmpty> for String {
    fn from(s: NonEmpty) -> String {
        s.0
    }
}

/// A git commit id: 7 to 64 hex digits (SHA-1 or SHA-256, possibly abbreviated).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GitCommit(String);

impl GitCommit {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GitCommit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(format!("{s:?} is not a git commit id (7 to 64 hex digits)"))
        }
    }
}

impl From<GitCommit> for String {
    fn from(c: GitCommit) -> String {
        c.0
    }
}

impl std::fmt::Display for GitCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl DeploymentArtifact {
    /// Parse and validate `deployment.json`. Errors name the offending field
    /// as a path, e.g. `blueprint.worker-1.deployment.healthChecks[0].timeout`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ArtifactError> {
        if bytes.len() > MAX_ARTIFACT_BYTES {
            return Err(ArtifactError::TooLarge(bytes.len()));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ArtifactError::Empty);
        }
        unique_keys::check(bytes)?;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let artifact: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            classify(path, inner)
        })?;
        de.end().map_err(|e| classify(String::new(), e))?;
        artifact.check_consistency()?;
        Ok(artifact)
    }

    fn check_consistency(&self) -> Result<(), ArtifactError> {
        if self.blueprint.is_empty() {
            return Err(ArtifactError::NoMachines);
        }
        if self.blueprint.len() > MAX_MACHINES {
            return Err(ArtifactError::Limit(format!(
                "blueprint: {} machines; at most {MAX_MACHINES} are allowed in one deployment",
                self.blueprint.len()
            )));
        }
        self.check_strings().map_err(ArtifactError::Limit)?;
        if let Some(m) = self
            .closures
            .keys()
            .find(|m| !self.blueprint.contains_key(*m))
        {
            return Err(ArtifactError::ClosureWithoutMachine(m.to_string()));
        }
        if let Some(m) = self
            .blueprint
            .keys()
            .find(|m| !self.closures.contains_key(*m))
        {
            return Err(ArtifactError::MachineWithoutClosure(m.to_string()));
        }
        self.check_replicas().map_err(ArtifactError::Replicas)?;
        self.check_health_checks()
            .map_err(ArtifactError::HealthChecks)?;
        if let Some(rollout) = &self.rollout {
            rollout
                .check(&self.blueprint)
                .map_err(ArtifactError::Rollout)?;
        }
        self.check_intents().map_err(ArtifactError::Intents)?;
        Ok(())
    }

    /// Every string of the blueprint and its labels within crate::limits.
    fn check_strings(&self) -> Result<(), String> {
        let long = |path: String, value: &str| {
            (value.len() > MAX_STRING_BYTES).then(|| {
                format!(
                    "{path}: {} bytes; at most {MAX_STRING_BYTES} are allowed",
                    value.len()
                )
            })
        };
        for (machine, spec) in &self.blueprint {
            let d = &spec.deployment;
            let fields = [
                ("role", spec.role.as_str()),
                ("deployment.addr", d.addr.as_str()),
                ("deployment.backend", d.backend.as_str()),
                ("deployment.sshUser", d.ssh_user.as_str()),
            ];
            if let Some(e) = fields
                .iter()
                .find_map(|(f, v)| long(format!("blueprint.{machine}.{f}"), v))
            {
                return Err(e);
            }
            if spec.labels.len() > MAX_LABELS {
                return Err(format!(
                    "blueprint.{machine}.labels: {} labels; at most {MAX_LABELS} are allowed",
                    spec.labels.len()
                ));
            }
            if let Some(e) = spec
                .labels
                .iter()
                .enumerate()
                .find_map(|(i, l)| long(format!("blueprint.{machine}.labels[{i}]"), l))
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// What an agent runs is bounded here, once, for `validate`, Submit and
    /// the agent alike.
    fn check_health_checks(&self) -> Result<(), String> {
        for (machine, spec) in &self.blueprint {
            let checks = &spec.deployment.health_checks;
            if checks.len() > MAX_HEALTH_CHECKS {
                return Err(format!(
                    "blueprint.{machine}.deployment.healthChecks: {} checks; at most {MAX_HEALTH_CHECKS} are allowed",
                    checks.len()
                ));
            }
            if let Some(i) = checks
                .iter()
                .position(|c| c.command.as_str().len() > MAX_CHECK_COMMAND_BYTES)
            {
                return Err(format!(
                    "blueprint.{machine}.deployment.healthChecks[{i}].command: longer than {MAX_CHECK_COMMAND_BYTES} bytes; run a script from the closure instead"
                ));
            }
        }
        Ok(())
    }

    /// The artifact in canonical form: sorted keys, no whitespace. Two
    /// artifacts that mean the same serialize the same.
    pub fn canonical_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Hex SHA-256 of [`Self::canonical_json`]: the same artifact submitted
    /// twice has the same digest.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The enabled health checks of a row (a machine, or a VM instance:
    /// its machine's checks).
    pub fn enabled_health_checks(&self, row: &MachineName) -> Vec<&HealthCheckSpec> {
        self.machine_of(row)
            .map(|(_, spec)| {
                spec.deployment
                    .health_checks
                    .iter()
                    .filter(|c| c.enabled)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn classify(path: String, e: serde_json::Error) -> ArtifactError {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Eof => ArtifactError::Truncated { line, column },
        Category::Syntax | Category::Io => ArtifactError::Syntax {
            line,
            column,
            message: strip_position(&e.to_string()),
        },
        Category::Data => ArtifactError::Field {
            path: if path.is_empty() || path == "." {
                "(top level)".to_owned()
            } else {
                path
            },
            message: strip_position(&e.to_string()),
        },
    }
}

/// serde_json appends " at line L column C"; the error already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

impl DeploymentArtifact {
    /// The rollout settings, defaults filled in when the key is absent.
    pub fn rollout(&self) -> Rollout {
        self.rollout.clone().unwrap_or_default()
    }

    /// The waves of this deployment, every row (machine or VM instance)
    /// in exactly one.
    pub fn waves(&self) -> Vec<PlannedWave> {
        self.rollout().plan(
            self.targets()
                .into_iter()
                .map(|t| (t.name, t.machine.clone(), t.spec)),
        )
    }
}

mod instances;
mod intents;
mod rollout;
mod selector;
mod unique_keys;
pub use instances::{
    Demand, Target, VM_BACKENDS, VM_MEMORY_ALIGNMENT, VmInstance, instance_names, vm_memory_bytes,
};
pub use rollout::{PlannedWave, Rollout, WaveSpec};
pub use selector::{Selector, SelectorError, parse_all as parse_selectors};

#[cfg(test)]
mod tests;
