//! What `plan`, `artifact` and `ci` share: evaluate the flake's blueprint,
//! build every machine's system closure in parallel, compare with the
//! previous deployment, publish, write the artifact.

pub mod artifact;
pub mod change;
pub mod intent;
pub mod publish;
pub mod rollout;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use procurator_core::artifact::MachineSpec;
use procurator_core::nix::{Nix, NixError};
use procurator_core::{MachineName, StorePath};
use serde_json::Value;

use crate::failure::{Stage, StageError};

/// The `nix` the CI commands run. The parallel builds of one flake would
/// otherwise fight over Nix's evaluation cache (one SQLite file per flake):
/// Nix 2.8 then reports "database is busy" and, worse, a missing attribute.
pub fn nix() -> Nix {
    Nix::new().with_option("eval-cache", "false")
}

/// `--flake` and `--jobs`, for every command that evaluates and builds.
#[derive(Debug, Clone, clap::Args)]
pub struct FlakeArgs {
    /// The directory holding the fleet's flake.nix (with blueprintJSON and
    /// nixosConfigurations). Inside a git checkout Nix sees only the files
    /// git tracks.
    #[arg(long, value_name = "PATH")]
    pub flake: PathBuf,

    /// How many machines to build at once (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
}

impl FlakeArgs {
    pub fn jobs(&self) -> usize {
        match self.jobs {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// A flake in a local directory.
#[derive(Debug, Clone)]
pub struct Flake {
    dir: PathBuf,
}

impl Flake {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let dir = path.canonicalize().with_context(|| {
            format!(
                "--flake {}: no such directory; point --flake at the directory holding the fleet's flake.nix",
                path.display()
            )
        })?;
        if !dir.join("flake.nix").is_file() {
            bail!(
                "--flake {}: there is no flake.nix in {}; point --flake at the directory holding it",
                path.display(),
                dir.display()
            );
        }
        // Nix would read these as the start of an attribute or a query.
        if dir.to_string_lossy().contains(['#', '?']) {
            bail!(
                "--flake {}: Nix cannot address a directory whose path holds '#' or '?'; move or link the flake elsewhere",
                dir.display()
            );
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR#ATTRIBUTE`. A plain path, so that Nix treats a git checkout as
    /// a git flake (tracked files only), as `nix build .#…` would.
    fn installable(&self, attribute: &str) -> String {
        format!("{}#{attribute}", self.dir.display())
    }

    fn toplevel(&self, machine: &MachineName) -> String {
        // Machine names are validated ([A-Za-z0-9_-]): quoting them is enough.
        self.installable(&format!(
            "nixosConfigurations.\"{machine}\".config.system.build.toplevel"
        ))
    }
}

/// What the flake describes and what was built from it.
#[derive(Debug, Clone)]
pub struct Evaluated {
    /// `blueprintJSON` exactly as Nix printed it: what goes into the artifact.
    pub blueprint: Value,
    /// The same, parsed and validated: what change detection compares.
    pub specs: BTreeMap<MachineName, MachineSpec>,
    /// Each machine's system closure.
    pub closures: BTreeMap<MachineName, StorePath>,
}

/// Evaluates `blueprintJSON`, then builds every machine's toplevel, `jobs`
/// at a time. Progress goes to stderr.
pub async fn evaluate_and_build(
    nix: &Nix,
    flake: &Flake,
    jobs: usize,
) -> anyhow::Result<Evaluated> {
    let (blueprint, specs) = evaluate(nix, flake).await?;
    let machines: Vec<MachineName> = specs.keys().cloned().collect();
    let closures = build_all(nix, flake, &machines, jobs).await?;
    Ok(Evaluated {
        blueprint,
        specs,
        closures,
    })
}

/// `nix eval --json DIR#blueprintJSON`, validated as a blueprint.
pub async fn evaluate(
    nix: &Nix,
    flake: &Flake,
) -> anyhow::Result<(Value, BTreeMap<MachineName, MachineSpec>)> {
    let attribute = flake.installable("blueprintJSON");
    eprintln!("evaluating {attribute}");
    let blueprint = match nix.eval_json(&[&attribute]).await {
        Ok(blueprint) => blueprint,
        // Nix did not run at all: not the flake's fault.
        Err(e @ NixError::Run(_)) => {
            return Err(anyhow::anyhow!("{e}; is Nix installed and on PATH?"));
        }
        Err(e) => return Err(StageError::nix(Stage::Evaluation, "blueprintJSON", &e).into()),
    };
    let specs = parse_blueprint(&blueprint).map_err(|e| StageError::new(Stage::Evaluation, e))?;
    Ok((blueprint, specs))
}

/// The checks the control plane makes on the blueprint, with the path of
/// the offending field, so a bad flake fails here rather than at submit.
fn parse_blueprint(blueprint: &Value) -> Result<BTreeMap<MachineName, MachineSpec>, String> {
    let specs: BTreeMap<MachineName, MachineSpec> = serde_path_to_error::deserialize(blueprint)
        .map_err(|e| {
            format!(
                "blueprintJSON is not a valid blueprint: {}: {}; fix the flake's blueprint",
                e.path(),
                e.inner()
            )
        })?;
    if specs.is_empty() {
        return Err(
            "blueprintJSON names no machine: there is nothing to build or deploy".to_owned(),
        );
    }
    Ok(specs)
}

/// Builds every machine, `jobs` at a time; all of them run to their end so
/// that one report names every machine that failed.
async fn build_all(
    nix: &Nix,
    flake: &Flake,
    machines: &[MachineName],
    jobs: usize,
) -> Result<BTreeMap<MachineName, StorePath>, StageError> {
    let jobs = jobs.clamp(1, machines.len().max(1));
    eprintln!(
        "building {} machine{} ({jobs} at a time)",
        machines.len(),
        if machines.len() == 1 { "" } else { "s" },
    );
    let results: Vec<(MachineName, Result<StorePath, StageError>)> =
        futures::stream::iter(machines.iter().cloned())
            .map(|machine| async move {
                let result = build_one(nix, flake, &machine).await;
                (machine, result)
            })
            .buffer_unordered(jobs)
            .collect()
            .await;

    let mut closures = BTreeMap::new();
    let mut failures: Vec<StageError> = Vec::new();
    for (machine, result) in results {
        match result {
            Ok(closure) => {
                closures.insert(machine, closure);
            }
            Err(e) => failures.push(e),
        }
    }
    if failures.is_empty() {
        return Ok(closures);
    }
    // Evaluation comes before building: if any machine failed to evaluate,
    // that is what the flake's author has to fix first.
    let stage = if failures.iter().any(|f| f.stage == Stage::Evaluation) {
        Stage::Evaluation
    } else {
        Stage::Build
    };
    let messages: Vec<String> = failures
        .iter()
        .filter(|f| f.stage == stage)
        .map(|f| f.message().to_owned())
        .collect();
    Err(StageError::new(stage, messages.join("\n")))
}

/// `nix build --no-link --json` of one machine's toplevel. When it fails,
/// evaluating the derivation alone tells an evaluation error (exit 4) from
/// a failed builder (exit 5); a successful build pays for one evaluation.
async fn build_one(
    nix: &Nix,
    flake: &Flake,
    machine: &MachineName,
) -> Result<StorePath, StageError> {
    let installable = flake.toplevel(machine);
    let started = Instant::now();
    let built = nix.build(&[&installable]).await;
    let error = match built {
        Ok(paths) => match <[StorePath; 1]>::try_from(paths) {
            Ok([closure]) => {
                eprintln!(
                    "built {machine} in {:.1} s: {closure}",
                    started.elapsed().as_secs_f64()
                );
                return Ok(closure);
            }
            Err(paths) => {
                return Err(StageError::new(
                    Stage::Build,
                    format!(
                        "machine {machine}: nix build printed {} paths for one installable",
                        paths.len()
                    ),
                ));
            }
        },
        Err(e) => e,
    };
    eprintln!("{machine} failed to build");
    let drv = format!("{installable}.drvPath");
    let stage = match nix.eval_json(&[&drv]).await {
        Err(eval_error @ NixError::Failed { .. }) => {
            return Err(StageError::nix(
                Stage::Evaluation,
                &format!("machine {machine}"),
                &eval_error,
            ));
        }
        // It evaluates (or Nix cannot even start): the build is what failed.
        Ok(_) | Err(_) => Stage::Build,
    };
    Err(StageError::nix(
        stage,
        &format!("machine {machine}"),
        &error,
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn machine(addr: &str) -> Value {
        json!({
            "role": "worker", "cpu": 2, "memory": {"amount": 4, "unit": "GB"},
            "deployment": {"addr": addr, "backend": "nixos"}
        })
    }

    #[test]
    fn a_blueprint_is_checked_like_the_artifact() {
        let specs = parse_blueprint(&json!({ "worker-1": machine("10.0.0.1") })).unwrap();
        assert_eq!(specs.len(), 1);

        let mut bad = machine("10.0.0.1");
        bad["deployment"]["healthChecks"] = json!([{ "command": "true", "timeout": 0 }]);
        let err = parse_blueprint(&json!({ "worker-1": bad })).unwrap_err();
        assert!(
            err.contains("worker-1.deployment.healthChecks[0].timeout"),
            "{err}"
        );
        let err = parse_blueprint(&json!({ "bad name": machine("x") })).unwrap_err();
        assert!(err.contains("not a valid machine name"), "{err}");
        let err = parse_blueprint(&json!({})).unwrap_err();
        assert!(err.contains("names no machine"), "{err}");
    }

    #[test]
    fn installables_quote_the_machine_name() {
        let flake = Flake {
            dir: PathBuf::from("/srv/fleet"),
        };
        let m = MachineName::parse("worker-1").unwrap();
        assert_eq!(
            flake.toplevel(&m),
            "/srv/fleet#nixosConfigurations.\"worker-1\".config.system.build.toplevel"
        );
        assert_eq!(
            flake.installable("blueprintJSON"),
            "/srv/fleet#blueprintJSON"
        );
    }

    #[test]
    fn a_missing_flake_says_what_to_pass() {
        let err = Flake::open(Path::new("/nonexistent/fleet")).unwrap_err();
        assert!(
            err.to_string().contains("--flake /nonexistent/fleet"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = Flake::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no flake.nix"), "{err}");
    }
}
