//! One evaluation for the whole fleet: the blueprint and every machine's
//! toplevel derivation come out of one `nix eval` (or `--eval-workers N`
//! of them, each taking a share of the machines), so what the machines
//! share (nixpkgs, the module system) is evaluated once, not once per
//! machine; then one `nix build --keep-going` builds every derivation.
//! Only when an evaluation fails are the machines evaluated one by one, to
//! name the ones that do not evaluate.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use futures::StreamExt as _;
use procurator_core::nix::{Nix, NixError};
use procurator_core::{MachineName, StorePath};
use serde_json::Value;

use super::Flake;
use crate::failure::{Stage, StageError};

/// Installables per `nix build`: a command line stays far below the
/// kernel's limit (each is ~100 bytes) however large the fleet.
const BUILD_BATCH: usize = 1000;

/// A machine's toplevel, evaluated but not built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub drv_path: StorePath,
    pub out: StorePath,
}

/// `s` as a Nix string literal.
fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The expression `nix eval --json --impure --expr` evaluates: the
/// blueprint (when `machines` is `None`) and the `drvPath` and `outPath`
/// of each machine's toplevel (as `drv` and `out`: JSON would print a set
/// with an `outPath` as that string), every machine of the blueprint or those in
/// `machines`. `getFlake` of the plain directory sees a git checkout as
/// `nix build DIR#…` does (tracked files only).
pub fn expression(flake: &Path, machines: Option<&[MachineName]>) -> String {
    let names = match machines {
        Some(machines) => format!(
            "[ {} ]",
            machines
                .iter()
                .map(|m| nix_string(m.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        None => "builtins.attrNames flake.blueprintJSON".to_owned(),
    };
    let blueprint = if machines.is_none() {
        "flake.blueprintJSON"
    } else {
        "null"
    };
    format!(
        "let flake = builtins.getFlake {dir}; \
         toplevel = name: flake.nixosConfigurations.${{name}}.config.system.build.toplevel; \
         in {{ blueprint = {blueprint}; \
         machines = builtins.listToAttrs (map (name: {{ inherit name; \
         value = {{ drv = (toplevel name).drvPath; out = (toplevel name).outPath; }}; }}) ({names})); }}",
        dir = nix_string(&flake.display().to_string()),
    )
}

/// What one evaluation printed: the blueprint if it was asked for, and the
/// machines' derivations.
pub struct Evaluated {
    pub blueprint: Option<Value>,
    pub derivations: BTreeMap<MachineName, Derivation>,
}

fn parse_evaluated(value: Value) -> Result<Evaluated, String> {
    let blueprint = value.get("blueprint").filter(|b| !b.is_null()).cloned();
    let machines = value
        .get("machines")
        .and_then(Value::as_object)
        .ok_or("no `machines` in what nix eval printed")?;
    let mut derivations = BTreeMap::new();
    for (name, paths) in machines {
        let machine = MachineName::parse(name).map_err(|e| e.to_string())?;
        let path = |field: &str| {
            paths
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("machine {name}: no {field}"))
                .and_then(|p| StorePath::parse(p).map_err(|e| format!("machine {name}: {e}")))
        };
        derivations.insert(
            machine,
            Derivation {
                drv_path: path("drv")?,
                out: path("out")?,
            },
        );
    }
    Ok(Evaluated {
        blueprint,
        derivations,
    })
}

/// One `nix eval` of `expression(flake, machines)`.
pub async fn evaluate(
    nix: &Nix,
    flake: &Flake,
    machines: Option<&[MachineName]>,
) -> Result<Evaluated, NixError> {
    let expr = expression(flake.dir(), machines);
    let value = nix.eval_json(&["--impure", "--expr", &expr]).await?;
    parse_evaluated(value).map_err(|message| NixError::BadOutput {
        command: "nix eval --json --impure --expr (the fleet)".into(),
        message,
    })
}

/// The derivations of `machines`, `workers` evaluators at once, each with
/// a share; a share that fails is evaluated machine by machine (`jobs` at
/// once) to name the machines that do not evaluate.
pub async fn derivations(
    nix: &Nix,
    flake: &Flake,
    machines: &[MachineName],
    workers: usize,
    jobs: usize,
) -> (BTreeMap<MachineName, Derivation>, Vec<StageError>) {
    let workers = workers.clamp(1, machines.len().max(1));
    let share = machines.len().div_ceil(workers).max(1);
    let shares: Vec<Vec<MachineName>> = machines.chunks(share).map(<[_]>::to_vec).collect();
    let evaluated: Vec<(Vec<MachineName>, Result<Evaluated, NixError>)> =
        futures::stream::iter(shares)
            .map(|share| async move {
                let result = evaluate(nix, flake, Some(&share)).await;
                (share, result)
            })
            .buffer_unordered(workers)
            .collect()
            .await;
    let mut derivations = BTreeMap::new();
    let mut failed_shares = Vec::new();
    for (share, result) in evaluated {
        match result {
            Ok(evaluated) => derivations.extend(evaluated.derivations),
            Err(_) => failed_shares.extend(share),
        }
    }
    let (found, failures) = one_by_one(nix, flake, &failed_shares, jobs).await;
    derivations.extend(found);
    (derivations, failures)
}

/// Each of `machines` in an evaluator of its own: slow, so only done to
/// tell which machines of a failed evaluation are at fault.
pub async fn one_by_one(
    nix: &Nix,
    flake: &Flake,
    machines: &[MachineName],
    jobs: usize,
) -> (BTreeMap<MachineName, Derivation>, Vec<StageError>) {
    if !machines.is_empty() {
        eprintln!(
            "the evaluation failed; evaluating {} machine{} one by one to find which",
            machines.len(),
            if machines.len() == 1 { "" } else { "s" }
        );
    }
    let results: Vec<(MachineName, Result<Evaluated, NixError>)> =
        futures::stream::iter(machines.iter().cloned())
            .map(|machine| async move {
                let result = evaluate(nix, flake, Some(std::slice::from_ref(&machine))).await;
                (machine, result)
            })
            .buffer_unordered(jobs.max(1))
            .collect()
            .await;
    let mut derivations = BTreeMap::new();
    let mut failures = Vec::new();
    for (machine, result) in results {
        match result.map(|e| e.derivations.into_iter().next()) {
            Ok(Some((_, derivation))) => {
                derivations.insert(machine, derivation);
            }
            Ok(None) => failures.push(StageError::new(
                Stage::Evaluation,
                format!("machine {machine}: nix eval printed no derivation for it"),
            )),
            Err(e) => failures.push(StageError::nix(
                Stage::Evaluation,
                &format!("machine {machine}"),
                &e,
            )),
        }
    }
    (derivations, failures)
}

/// Builds every derivation with `nix build --keep-going --max-jobs JOBS`
/// (in batches of [`BUILD_BATCH`]), reading the outputs from its JSON.
/// When a batch fails, the machines whose output is not in the store are
/// the ones that failed; the others are built all the same.
pub async fn build(
    nix: &Nix,
    derivations: &BTreeMap<MachineName, Derivation>,
    jobs: usize,
) -> (BTreeMap<MachineName, StorePath>, Option<StageError>) {
    let suffix = match nix.version().await {
        Ok(version) => procurator_core::nix::output_suffix(&version),
        Err(e) => {
            return (
                BTreeMap::new(),
                Some(StageError::nix(Stage::Build, "nix --version", &e)),
            );
        }
    };
    // Machines with the same configuration share a derivation.
    let mut machines_of: BTreeMap<&StorePath, Vec<&MachineName>> = BTreeMap::new();
    for (machine, derivation) in derivations {
        machines_of
            .entry(&derivation.drv_path)
            .or_default()
            .push(machine);
    }
    let drvs: Vec<&StorePath> = machines_of.keys().copied().collect();
    eprintln!(
        "building {} machine{} ({} derivation{}, --max-jobs {jobs})",
        derivations.len(),
        if derivations.len() == 1 { "" } else { "s" },
        drvs.len(),
        if drvs.len() == 1 { "" } else { "s" },
    );
    let started = Instant::now();
    let max_jobs = jobs.max(1).to_string();
    let mut closures = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for batch in drvs.chunks(BUILD_BATCH) {
        let installables: Vec<String> = batch.iter().map(|drv| format!("{drv}{suffix}")).collect();
        let mut args = vec!["--keep-going", "--max-jobs", &max_jobs];
        args.extend(installables.iter().map(String::as_str));
        match nix.build_outputs(&args).await {
            Ok(built) => {
                for b in built {
                    for machine in machines_of.get(&b.drv_path).into_iter().flatten() {
                        closures.insert((*machine).clone(), b.out.clone());
                    }
                }
            }
            Err(e) => {
                let outs: Vec<StorePath> = batch
                    .iter()
                    .flat_map(|drv| &machines_of[*drv])
                    .map(|m| derivations[*m].out.clone())
                    .collect();
                let invalid = match nix.invalid_paths(&outs).await {
                    Ok(invalid) => invalid,
                    // Cannot tell which: count them all as failed.
                    Err(_) => outs.clone(),
                };
                for drv in batch {
                    for machine in &machines_of[*drv] {
                        let out = &derivations[*machine].out;
                        if invalid.contains(out) {
                            failed.push(machine.to_string());
                        } else {
                            closures.insert((*machine).clone(), out.clone());
                        }
                    }
                }
                errors.push(crate::failure::nix_message(&e));
            }
        }
    }
    for (machine, closure) in &closures {
        eprintln!("built {machine}: {closure}");
    }
    eprintln!(
        "built {} of {} machines in {:.1} s",
        closures.len(),
        derivations.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() && errors.is_empty() {
        return (closures, None);
    }
    failed.sort();
    let what = if failed.is_empty() {
        "the build failed".to_owned()
    } else {
        format!(
            "machine{} {} failed to build",
            if failed.len() == 1 { "" } else { "s" },
            failed.join(", ")
        )
    };
    let error = StageError::new(Stage::Build, format!("{what}: {}", errors.join("\n")));
    (closures, Some(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_for_nix() {
        assert_eq!(nix_string("/srv/fleet"), "\"/srv/fleet\"");
        assert_eq!(nix_string("a\"b\\c${d}$e"), "\"a\\\"b\\\\c\\${d}$e\"");
    }

    #[test]
    fn the_expression_asks_for_the_blueprint_only_once() {
        let all = expression(Path::new("/srv/fleet"), None);
        assert!(all.contains("builtins.getFlake \"/srv/fleet\""), "{all}");
        assert!(all.contains("blueprint = flake.blueprintJSON"), "{all}");
        assert!(
            all.contains("(builtins.attrNames flake.blueprintJSON)"),
            "{all}"
        );
        let m = MachineName::parse("worker-1").unwrap();
        let share = expression(Path::new("/srv/fleet"), Some(&[m]));
        assert!(share.contains("blueprint = null"), "{share}");
        assert!(share.contains("[ \"worker-1\" ]"), "{share}");
    }

    #[test]
    fn what_nix_printed_is_read_per_machine() {
        let value = serde_json::json!({
            "blueprint": { "worker-1": {} },
            "machines": { "worker-1": {
                "drv": "/nix/store/09b1h505rnnhc314ppqhkcgwb6na2147-nixos-system-worker-1-gen1.drv",
                "out": "/nix/store/ld8rrxxkqia52vsxjih93lv6yxpx8awk-nixos-system-worker-1-gen1",
            }},
        });
        let evaluated = parse_evaluated(value).unwrap();
        assert!(evaluated.blueprint.is_some());
        let m = MachineName::parse("worker-1").unwrap();
        assert!(
            evaluated.derivations[&m]
                .drv_path
                .as_str()
                .ends_with(".drv")
        );
        let err = parse_evaluated(serde_json::json!({ "machines": { "worker-1": {} } }))
            .err()
            .unwrap();
        assert!(err.contains("no drv"), "{err}");
    }
}
