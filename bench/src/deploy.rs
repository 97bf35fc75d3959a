//! `procurator-bench deploy`: the time from Submit to Succeeded for real-Nix
//! deploys to test hosts (as in the integration tests: the harness's
//! `Fleet`, the real control plane, agents and Nix, closures already in a
//! signed file:// cache), side by side with the floor: a plain script doing
//! the same `nix copy`, `switch-to-configuration test`, `nix-env --set` and
//! `switch-to-configuration boot` on the same hosts (see [`floor`]).
//!
//! For each fleet size (`--hosts`, default 1 and 10) one fleet is started
//! from `integration-tests/fixtures/bench-fleet`. Each run deploys once
//! without health checks and once with one health check that passes at
//! once; each of those measures the floor and Procurator alternately (the
//! order flips every run) on the same hosts. Every measurement copies
//! closures the hosts do not have yet: the next generations are built,
//! signed and published before the clock starts. One untimed warm-up run
//! comes first.
//!
//! Targets (reported, not asserted): one host without health checks within
//! 2× the floor of the same run; ten hosts within 1.5× one host.

mod client;
mod floor;
mod report;

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use procurator_integration_tests::{self as harness, Fleet, FleetOptions};
use serde_json::{Value, json};

use client::{Client, ProcuratorRun};
use floor::FloorRun;

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// Timed runs per fleet size and mode (after one untimed warm-up).
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,

    /// Fleet sizes to measure, comma-separated (1 to 99 hosts each).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,10",
          value_parser = clap::value_parser!(u32).range(1..=99))]
    pub hosts: Vec<u32>,

    /// Also write every sample and summary to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// With or without the blueprint's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    NoHealthCheck,
    OneHealthCheck,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::NoHealthCheck, Mode::OneHealthCheck];

    pub fn label(self) -> &'static str {
        match self {
            Mode::NoHealthCheck => "no health check",
            Mode::OneHealthCheck => "1 health check",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Mode::NoHealthCheck => "no-health-check",
            Mode::OneHealthCheck => "one-health-check",
        }
    }
}

/// Everything measured for one fleet size and mode.
pub struct Case {
    pub hosts: u32,
    pub mode: Mode,
    pub floor: Vec<FloorRun>,
    pub procurator: Vec<ProcuratorRun>,
}

pub fn run(args: DeployArgs) -> Result<()> {
    let mut sizes = args.hosts.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        bail!("--hosts names no fleet size");
    }
    harness::require_root()?;
    for bin in [
        "procurator-control-plane",
        "procurator-agent",
        "procurator-ctl",
    ] {
        harness::bin(bin)?;
    }
    // Nothing is measured if the JSON cannot be written at the end.
    if let Some(path) = &args.json {
        std::fs::write(path, b"{}\n")
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    eprintln!(
        "deploy: binaries from {}; {} timed run(s) per case after a warm-up; fleets of {:?} host(s)",
        harness::bin_dir().display(),
        args.runs,
        sizes
    );

    let mut cases = Vec::new();
    for &size in &sizes {
        cases.extend(measure_fleet(size, args.runs)?);
    }

    let summaries = report::summarize(&cases);
    println!("{}", report::table(&summaries));
    println!("{}", report::breakdown(&cases));
    if let Some(path) = &args.json {
        let doc = report::json(&args, &cases, &summaries);
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("deploy: wrote {}", path.display());
    }
    Ok(())
}

fn settings(hosts: u32, generation: u32, mode: Mode) -> Value {
    json!({
        "generation": generation,
        "machineCount": hosts,
        "healthCheck": mode == Mode::OneHealthCheck,
        "healthCheckTimeout": 5,
    })
}

/// Starts a fleet of `size` hosts and measures both modes on it.
fn measure_fleet(size: u32, runs: u32) -> Result<Vec<Case>> {
    let machines = harness::bench_machines(size as usize);
    eprintln!("deploy: starting a fleet of {size} test host(s)");
    let fleet = Fleet::start_from(
        &harness::bench_fixture_source(),
        &machines,
        FleetOptions {
            initial_settings: settings(size, 0, Mode::OneHealthCheck),
            agents: machines.clone(),
            nat: false,
            supervised: Vec::new(),
            flake_files: Vec::new(),
            signed: false,
        },
    )
    .with_context(|| format!("starting a fleet of {size} test hosts"))?;
    // The fleet's guards stop everything when it drops, whatever happened.
    measure(&fleet, size, &machines, runs).with_context(|| {
        format!(
            "measuring deploys to {size} host(s) in {}\n{}",
            fleet.dir().display(),
            fleet.logs()
        )
    })
}

fn measure(fleet: &Fleet, size: u32, machines: &[String], runs: u32) -> Result<Vec<Case>> {
    let mut client = Client::connect(fleet)?;
    let substituter = format!("file://{}", fleet.cache.display());
    let mut cases: Vec<Case> = Mode::ALL
        .iter()
        .map(|&mode| Case {
            hosts: size,
            mode,
            floor: Vec::new(),
            procurator: Vec::new(),
        })
        .collect();
    let mut generation = 0;
    for run in 0..=runs {
        for case in &mut cases {
            let mode = case.mode;
            // Two fresh generations, built, signed and published before
            // either clock starts: one for the floor, one for Procurator.
            generation += 1;
            let floor_closures = fleet.build(&settings(size, generation, mode))?;
            fleet.publish(&floor_closures)?;
            generation += 1;
            let closures = fleet.build(&settings(size, generation, mode))?;
            fleet.publish(&closures)?;
            // The blueprint comes from the settings just written: with or
            // without the health check.
            let (artifact, _) = fleet.write_deployment(&closures)?;
            let artifact_json = std::fs::read_to_string(&artifact)
                .with_context(|| format!("reading {}", artifact.display()))?;
            for m in machines {
                let host = fleet.host(m);
                for closure in [&floor_closures[m], &closures[m]] {
                    if host.has_path(closure) {
                        bail!("{m} already has {closure}: the copy would not be measured");
                    }
                }
            }

            let do_floor = || -> Result<FloorRun> {
                let targets: Vec<_> = machines
                    .iter()
                    .map(|m| (fleet.host(m), floor_closures[m].as_str()))
                    .collect();
                floor::run(&fleet.nix, &targets, &substituter, &fleet.key.public)
            };
            let mut do_procurator = || -> Result<ProcuratorRun> {
                let result = client.deploy(artifact_json.clone())?;
                for m in machines {
                    let current = fleet.host(m).current_system()?;
                    if current.as_deref() != Some(closures[m].as_str()) {
                        bail!(
                            "{m} runs {current:?} after the deployment, not {}",
                            closures[m]
                        );
                    }
                }
                Ok(result)
            };
            let (f, p) = if run % 2 == 0 {
                let f = do_floor().context("the floor")?;
                (f, do_procurator().context("Procurator")?)
            } else {
                let p = do_procurator().context("Procurator")?;
                (do_floor().context("the floor")?, p)
            };
            let what = if run == 0 {
                "warm-up".to_owned()
            } else {
                format!("run {run}/{runs}")
            };
            eprintln!(
                "deploy: {size} host(s), {}, {what}: floor {:.1} ms (copy {:.1}), procurator {:.1} ms (server {:.0} ms), ratio {:.2}",
                mode.label(),
                f.ms,
                f.steps_ms.copy,
                p.ms,
                p.server_ms,
                p.ms / f.ms
            );
            if run > 0 {
                case.floor.push(f);
                case.procurator.push(p);
            }
        }
    }
    Ok(cases)
}
