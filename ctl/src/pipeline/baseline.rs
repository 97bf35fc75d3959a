//! What a new build is compared with: the deployment.json of `--previous`,
//! or what the fleet runs now as the control plane knows it (`ListRunning`),
//! or nothing (every machine is added).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use procurator_core::artifact::MachineSpec;
use procurator_core::{DeploymentArtifact, MachineName, StorePath};
use procurator_proto::v1::{ListRunningRequest, RunningMachine};
use tonic::Code;

use crate::connection::Connection;

/// What one row (a machine, or a VM instance) ran before.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Before {
    /// `None` when nothing is known to run there.
    pub closure: Option<StorePath>,
    /// Its blueprint entry then; `None` when no deployment that ran there is known.
    pub spec: Option<MachineSpec>,
}

/// Where a [`Baseline`] came from, for what `plan` and `ci` say.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Nothing to compare with.
    Nothing,
    /// `--previous FILE`, of this commit.
    Previous { file: String, git_commit: String },
    /// The control plane, with the deployment in force when there is one.
    Fleet { in_force: Option<(String, String)> },
}

/// What each row ran, and which blueprint machines are in force (a machine
/// in force and gone from the new blueprint is removed).
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub source: Source,
    pub rows: BTreeMap<MachineName, Before>,
    /// Blueprint machine -> the closure it ran.
    pub in_force: BTreeMap<MachineName, Option<StorePath>>,
}

impl Baseline {
    pub fn nothing() -> Self {
        Self {
            source: Source::Nothing,
            rows: BTreeMap::new(),
            in_force: BTreeMap::new(),
        }
    }

    /// The machines of an earlier artifact, as if each ran it.
    pub fn from_artifact(file: &Path, artifact: &DeploymentArtifact) -> Self {
        let rows = artifact
            .targets()
            .into_iter()
            .map(|t| {
                let before = Before {
                    closure: Some(t.closure.clone()),
                    spec: Some(t.spec.clone()),
                };
                (t.name, before)
            })
            .collect();
        let in_force = artifact
            .closures
            .iter()
            .filter(|(name, _)| artifact.blueprint.contains_key(*name))
            .map(|(name, closure)| (name.clone(), Some(closure.clone())))
            .collect();
        Self {
            source: Source::Previous {
                file: file.display().to_string(),
                git_commit: artifact.git_commit.to_string(),
            },
            rows,
            in_force,
        }
    }

    /// Reads the artifact of `--previous`. A path that does not exist is an
    /// error: a typo must not make every machine look new.
    pub fn load_previous(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "--previous {}: cannot read it; pass the deployment.json of the last deployment, \
                 or leave --previous out to compare with what the fleet runs",
                path.display()
            )
        })?;
        let artifact = DeploymentArtifact::from_json(&bytes).with_context(|| {
            format!(
                "--previous {} is not a valid deployment.json",
                path.display()
            )
        })?;
        Ok(Self::from_artifact(path, &artifact))
    }

    /// Every page of `ListRunning`. Also what tells `ci` that the control
    /// plane answers and takes its certificate, before anything is built.
    pub async fn from_fleet(conn: &mut Connection) -> anyhow::Result<Self> {
        let doing = "asking the control plane what the fleet runs";
        let mut rows = Vec::new();
        let mut page_token = String::new();
        let mut in_force = None;
        // A bound on the pages, so a control plane that hands out tokens
        // forever cannot keep ctl here: a million rows at the smallest page.
        for _ in 0..MAX_PAGES {
            let request = ListRunningRequest {
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
            };
            let page = match conn.client.list_running(request).await {
                Ok(page) => page.into_inner(),
                Err(status) if status.code() == Code::Unimplemented => bail!(
                    "the control plane at {} is older than this procurator-ctl and cannot say what the fleet runs; \
                     upgrade it, or pass --previous FILE (the deployment.json of the last deployment)",
                    conn.url
                ),
                Err(status) => return Err(conn.error(&status, doing)),
            };
            if page_token.is_empty() && !page.deployment_id.is_empty() {
                in_force = Some((page.deployment_id.clone(), page.git_commit.clone()));
            }
            rows.extend(page.machines);
            if page.next_page_token.is_empty() {
                return Self::from_rows(in_force, rows);
            }
            if page.next_page_token <= page_token {
                bail!(
                    "the control plane at {} answered ListRunning with a page token that does not move on ({:?})",
                    conn.url,
                    page.next_page_token
                );
            }
            page_token = page.next_page_token;
        }
        Err(anyhow!(
            "the control plane at {} listed more than {} pages of machines; is it a Procurator control plane?",
            conn.url,
            MAX_PAGES
        ))
    }

    /// One row of `ListRunning`: the control plane answers and takes this
    /// certificate for the reads (and so for `Submit`, which the same roles
    /// may call). One too old to list what runs still answered.
    pub async fn check_fleet(conn: &mut Connection) -> anyhow::Result<()> {
        let request = ListRunningRequest {
            page_size: 1,
            page_token: String::new(),
        };
        match conn.client.list_running(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::Unimplemented => Ok(()),
            Err(status) => Err(conn.error(&status, "asking the control plane what the fleet runs")),
        }
    }

    /// The rows as the control plane listed them; a row that does not parse
    /// is the control plane's fault and is named.
    pub fn from_rows(
        in_force: Option<(String, String)>,
        listed: Vec<RunningMachine>,
    ) -> anyhow::Result<Self> {
        let mut rows = BTreeMap::new();
        let mut in_force_machines = BTreeMap::new();
        for row in listed {
            let bad = |what: &str| {
                anyhow!(
                    "the control plane listed machine {:?} with {what}",
                    row.machine
                )
            };
            let name = MachineName::parse(&row.machine)
                .map_err(|e| bad(&format!("an invalid name: {e}")))?;
            let closure = match row.closure.as_str() {
                "" => None,
                path => Some(
                    StorePath::parse(path).map_err(|e| bad(&format!("an invalid closure: {e}")))?,
                ),
            };
            let spec =
                match row.spec_json.as_str() {
                    "" => None,
                    json => Some(serde_json::from_str::<MachineSpec>(json).map_err(|e| {
                        bad(&format!("a blueprint entry this ctl cannot read: {e}"))
                    })?),
                };
            if row.in_force && !row.blueprint_machine.is_empty() {
                let machine = MachineName::parse(&row.blueprint_machine)
                    .map_err(|e| bad(&format!("an invalid blueprint machine: {e}")))?;
                in_force_machines.entry(machine).or_insert(closure.clone());
            }
            rows.insert(name, Before { closure, spec });
        }
        Ok(Self {
            source: Source::Fleet { in_force },
            rows,
            in_force: in_force_machines,
        })
    }
}

/// Rows per `ListRunning` page, and how many pages ctl reads at most.
const PAGE_SIZE: u32 = 1000;
const MAX_PAGES: usize = 1000;

impl fmt::Display for Source {
    /// "since …" in what `ci` and `plan` say.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Nothing => write!(f, "nothing (every machine is new)"),
            Source::Previous { file, git_commit } => {
                write!(f, "commit {git_commit} (--previous {file})")
            }
            Source::Fleet { in_force: None } => {
                write!(f, "what the fleet runs (no deployment in force)")
            }
            Source::Fleet {
                in_force: Some((id, commit)),
            } => write!(
                f,
                "what the fleet runs (deployment {id} of commit {commit} in force)"
            ),
        }
    }
}

impl Source {
    /// `comparedWith` in JSON output.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Source::Nothing => serde_json::json!({ "source": "nothing" }),
            Source::Previous { file, git_commit } => {
                serde_json::json!({ "source": "previous", "file": file, "gitCommit": git_commit })
            }
            Source::Fleet { in_force } => serde_json::json!({
                "source": "fleet",
                "deploymentId": in_force.as_ref().map(|(id, _)| id),
                "gitCommit": in_force.as_ref().map(|(_, commit)| commit),
            }),
        }
    }
}
