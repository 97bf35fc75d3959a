//! What `plan`, `artifact` and `ci` share: evaluate the flake's blueprint
//! and every machine's toplevel at once, build them with one `nix build`,
//! compare with what ran before, publish, write the artifact.

pub mod artifact;
pub mod baseline;
pub mod change;
pub mod fleet;
pub mod intent;
pub mod publish;
pub mod rollout;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
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

/// `--flake`, `--jobs` and `--eval-workers`, for every command that
/// evaluates and builds.
#[derive(Debug, Clone, clap::Args)]
pub struct FlakeArgs {
    /// The directory holding the fleet's flake.nix (with blueprintJSON and
    /// nixosConfigurations). Inside a git checkout Nix sees only the files
    /// git tracks.
    #[arg(long, value_name = "PATH")]
    pub flake: PathBuf,

    /// How many derivations to build at once, Nix's `--max-jobs` (default:
    /// the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,

    /// Evaluators to share the machines among. One evaluates what the
    /// machines share (nixpkgs) once; more hold it once each, so raise it
    /// only when one evaluator's memory is more than the CI runner has.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_workers: u32,
}

impl FlakeArgs {
    /// [`evaluate_and_build`] with these settings.
    pub async fn evaluate_and_build(&self, nix: &Nix, flake: &Flake) -> anyhow::Result<Evaluated> {
        evaluate_and_build(nix, flake, self.jobs(), self.eval_workers as usize).await
    }

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

/// Evaluates the blueprint and every machine's toplevel in one evaluator
/// (`eval_workers` of them, each with a share of the machines, when more
/// than one), then builds them all with one `nix build --max-jobs JOBS`.
/// Machines that do not evaluate are named (exit 4) and those that fail to
/// build too (exit 5), after the others were built. Progress goes to
/// stderr.
pub async fn evaluate_and_build(
    nix: &Nix,
    flake: &Flake,
    jobs: usize,
    eval_workers: usize,
) -> anyhow::Result<Evaluated> {
    let started = Instant::now();
    let (blueprint, specs, derivations, failures) =
        evaluate_fleet(nix, flake, jobs, eval_workers).await?;
    eprintln!(
        "evaluated {} of {} machines in {:.1} s",
        derivations.len(),
        specs.len(),
        started.elapsed().as_secs_f64()
    );
    let (closures, build_error) = fleet::build(nix, &derivations, jobs).await;
    // Evaluation comes before building: a machine that does not evaluate
    // is what the flake's author has to fix first.
    if !failures.is_empty() {
        let messages: Vec<&str> = failures.iter().map(StageError::message).collect();
        return Err(StageError::new(Stage::Evaluation, messages.join("\n")).into());
    }
    if let Some(error) = build_error {
        return Err(error.into());
    }
    Ok(Evaluated {
        blueprint,
        specs,
        closures,
    })
}

type FleetEvaluation = (
    Value,
    BTreeMap<MachineName, MachineSpec>,
    BTreeMap<MachineName, fleet::Derivation>,
    Vec<StageError>,
);

/// The blueprint and each machine's derivation, and the machines that do
/// not evaluate.
async fn evaluate_fleet(
    nix: &Nix,
    flake: &Flake,
    jobs: usize,
    eval_workers: usize,
) -> anyhow::Result<FleetEvaluation> {
    if eval_workers <= 1 {
        eprintln!(
            "evaluating {} and every machine in one evaluator",
            flake.installable("blueprintJSON")
        );
        match fleet::evaluate(nix, flake, None).await {
            Ok(evaluated) => {
                let blueprint = evaluated.blueprint.unwrap_or(Value::Null);
                let specs = parse_blueprint(&blueprint)
                    .map_err(|e| StageError::new(Stage::Evaluation, e))?;
                return Ok((blueprint, specs, evaluated.derivations, Vec::new()));
            }
            Err(e @ NixError::Run(_)) => {
                return Err(anyhow::anyhow!("{e}; is Nix installed and on PATH?"));
            }
            // Some part does not evaluate: which, is found below.
            Err(_) => {}
        }
    }
    let (blueprint, specs) = evaluate(nix, flake).await?;
    let machines: Vec<MachineName> = specs.keys().cloned().collect();
    let (derivations, failures) = if eval_workers <= 1 {
        fleet::one_by_one(nix, flake, &machines, jobs).await
    } else {
        eprintln!(
            "evaluating {} machines in {eval_workers} evaluators",
            machines.len()
        );
        fleet::derivations(nix, flake, &machines, eval_workers, jobs).await
    };
    Ok((blueprint, specs, derivations, failures))
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
    fn installables_are_the_directory_and_the_attribute() {
        let flake = Flake {
            dir: PathBuf::from("/srv/fleet"),
        };
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
