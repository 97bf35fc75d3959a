//! `procurator-bench ci`: `procurator-ctl plan` on generated flakes of N
//! machines, side by side with the floor measured in the same run: one
//! `nix eval` of every machine's `drvPath` through one `builtins.getFlake`,
//! then one `nix build` of those derivations. Everything is built before
//! the clock starts, so both measure evaluation and Nix's check that there
//! is nothing to build.
//!
//! Two flakes per size: `shared`, whose machines all use one value that
//! costs `--shared-cost` steps to evaluate (as a real fleet's machines all
//! evaluate nixpkgs and the module system), and `independent`, whose
//! machines share nothing. Each run measures the floor and `plan`
//! alternately (the order flips every run) after one untimed warm-up, and
//! the peak memory of each (the largest resident set of its processes, from
//! the kernel's accounting of waited-for children).
//!
//! Target (reported, not asserted): `plan` within 1.3× the floor.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use procurator_integration_tests::{self as harness, NixEnv};
use serde_json::{Value, json};

use crate::stats::Spread;

#[derive(Debug, clap::Args)]
pub struct CiArgs {
    /// Fleet sizes, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "20,100",
          value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub machines: Vec<u32>,

    /// Timed runs per size and flake (after one untimed warm-up).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// Steps of the evaluation the `shared` flake's machines share (a fold
    /// over a list this long: 1,500,000 is about 1.5 s here).
    #[arg(long, value_name = "N", default_value_t = 1_500_000)]
    pub shared_cost: u64,

    /// Also write every sample and summary to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The target ratio of `plan` to the floor.
const TARGET: f64 = 1.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Independent,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Shared => "shared",
            Kind::Independent => "independent",
        }
    }
}

/// One timed command: wall seconds and peak resident KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    peak_kib: u64,
}

struct Case {
    machines: u32,
    kind: Kind,
    floor: Vec<Sample>,
    plan: Vec<Sample>,
}

pub fn run(args: CiArgs) -> Result<()> {
    let ctl = harness::bin("procurator-ctl")?;
    if let Some(path) = &args.json {
        std::fs::write(path, b"{}\n")
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    let dir = tempfile::Builder::new()
        .prefix("procurator-bench-ci-")
        .tempdir()?;
    let nix = NixEnv::in_dir(&dir.path().join("nix"))?;
    let version = nix.run("nix", ["--version"])?.stdout.trim().to_owned();
    eprintln!(
        "ci: {} from {}; {version}; {} timed run(s) per case after a warm-up; shared cost {}",
        ctl.display(),
        harness::bin_dir().display(),
        args.runs,
        args.shared_cost
    );
    let mut cases = Vec::new();
    for &machines in &args.machines {
        for kind in [Kind::Shared, Kind::Independent] {
            let flake = dir.path().join(format!("{}-{machines}", kind.label()));
            write_flake(&flake, machines, kind, args.shared_cost)?;
            cases.push(measure(
                &nix, &ctl, &flake, machines, kind, args.runs, &version,
            )?);
        }
    }
    println!("{}", table(&cases));
    if let Some(path) = &args.json {
        let doc = json!({
            "nix": version,
            "sharedCost": args.shared_cost,
            "runs": args.runs,
            "cases": cases.iter().map(case_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// A flake of `machines` machines `m-0`…, each toplevel a derivation that
/// builds at once; with `Kind::Shared` each depends on one costly value.
fn write_flake(dir: &Path, machines: u32, kind: Kind, cost: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let shared = match kind {
        Kind::Shared => {
            format!("builtins.foldl' (acc: x: acc + x) 0 (builtins.genList (i: i * i) {cost})")
        }
        Kind::Independent => "0".to_owned(),
    };
    let flake = format!(
        r#"{{
  outputs = {{ self }}:
    let
      shared = {shared};
      names = builtins.genList (i: "m-${{toString i}}") {machines};
      machine = i: {{
        role = "worker"; cpu = 1; memory = {{ amount = 1; unit = "GB"; }};
        deployment = {{ addr = "10.${{toString (i / 62500)}}.${{toString (i / 250 - i / 62500 * 250)}}.${{toString (i - i / 250 * 250 + 1)}}"; backend = "nixos"; }};
      }};
      toplevel = name: builtins.derivation {{
        name = "nixos-system-${{name}}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "echo ${{name}} ${{toString shared}} > $out" ];
      }};
    in {{
      blueprintJSON = builtins.listToAttrs (builtins.genList (i: {{ name = "m-${{toString i}}"; value = machine i; }}) {machines});
      nixosConfigurations = builtins.listToAttrs (map (name: {{
        inherit name;
        value.config.system.build.toplevel = toplevel name;
      }}) names);
    }};
}}
"#
    );
    std::fs::write(dir.join("flake.nix"), flake)?;
    Ok(())
}

/// The floor's evaluation: every machine's `drvPath` through one `getFlake`.
fn floor_expression(flake: &Path) -> String {
    format!(
        "let f = builtins.getFlake \"{}\"; in map (n: f.nixosConfigurations.${{n}}.config.system.build.toplevel.drvPath) (builtins.attrNames f.blueprintJSON)",
        flake.display()
    )
}

fn measure(
    nix: &NixEnv,
    ctl: &Path,
    flake: &Path,
    machines: u32,
    kind: Kind,
    runs: u32,
    version: &str,
) -> Result<Case> {
    let mut case = Case {
        machines,
        kind,
        floor: Vec::new(),
        plan: Vec::new(),
    };
    // The warm-up builds everything; it is not counted.
    let warm = plan(nix, ctl, flake)?;
    floor(nix, flake, version)?;
    eprintln!(
        "ci: {machines} machines, {}: warm-up plan {:.2} s",
        kind.label(),
        warm.seconds
    );
    for run in 0..runs {
        if run % 2 == 0 {
            case.floor.push(floor(nix, flake, version)?);
            case.plan.push(plan(nix, ctl, flake)?);
        } else {
            case.plan.push(plan(nix, ctl, flake)?);
            case.floor.push(floor(nix, flake, version)?);
        }
    }
    Ok(case)
}

/// `procurator-ctl plan --flake F --output json`, timed.
fn plan(nix: &NixEnv, ctl: &Path, flake: &Path) -> Result<Sample> {
    let mut cmd = nix.command(ctl);
    cmd.args(["plan", "--flake"])
        .arg(flake)
        .args(["--output", "json"]);
    let (sample, stdout) = timed(cmd)?;
    let plan: Value = serde_json::from_str(&stdout).context("plan printed no JSON")?;
    if plan["machines"].as_array().map_or(0, Vec::len) == 0 {
        bail!("plan listed no machine: {stdout}");
    }
    Ok(sample)
}

/// The floor: one `nix eval` of every `drvPath`, one `nix build` of them.
fn floor(nix: &NixEnv, flake: &Path, version: &str) -> Result<Sample> {
    let mut eval = nix.command("nix");
    eval.args([
        "eval",
        "--json",
        "--impure",
        "--option",
        "eval-cache",
        "false",
        "--expr",
    ])
    .arg(floor_expression(flake));
    let (evaluated, stdout) = timed(eval)?;
    let drvs: Vec<String> = serde_json::from_str(&stdout).context("nix eval printed no list")?;
    let suffix = procurator_core::nix::output_suffix(version);
    let mut build = nix.command("nix");
    build.args(["build", "--no-link"]);
    build.args(drvs.iter().map(|d| format!("{d}{suffix}")));
    let (built, _) = timed(build)?;
    Ok(Sample {
        seconds: evaluated.seconds + built.seconds,
        peak_kib: evaluated.peak_kib.max(built.peak_kib),
    })
}

/// Runs `cmd` through `procurator-bench peak` (a process of its own, so
/// that the kernel's peak of its children is this command's alone): its
/// wall time, its peak resident set and its stdout.
fn timed(cmd: Command) -> Result<(Sample, String)> {
    let me = std::env::current_exe().context("the benchmark's own executable")?;
    let mut wrapped = Command::new(me);
    wrapped.arg("peak").arg("--").arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    let started = Instant::now();
    let out = wrapped.output().context("running a measured command")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let peak_kib = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("peak-rss-kib "))
        .and_then(|n| n.trim().parse().ok())
        .context("the measured command's peak was not reported")?;
    Ok((
        Sample { seconds, peak_kib },
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `procurator-bench peak -- PROGRAM ARGS…`: runs it (stdout and stderr
/// passed through), then prints `peak-rss-kib N` on stderr, the largest
/// resident set of it and every process it waited for; exits as it did.
pub fn peak(command: Vec<String>) -> Result<()> {
    let (program, args) = command.split_first().context("peak: no command")?;
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("starting {program}"))?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    eprintln!("peak-rss-kib {}", usage.max_rss());
    if !status.success() {
        bail!("{program} exited {status}");
    }
    Ok(())
}

fn seconds(samples: &[Sample]) -> Option<Spread> {
    Spread::of(&samples.iter().map(|s| s.seconds).collect::<Vec<_>>())
}

fn peak_mib(samples: &[Sample]) -> f64 {
    samples.iter().map(|s| s.peak_kib).max().unwrap_or(0) as f64 / 1024.0
}

fn ratio(case: &Case) -> Option<f64> {
    Some(seconds(&case.plan)?.median / seconds(&case.floor)?.median)
}

fn table(cases: &[Case]) -> String {
    let spread = |s: Option<Spread>| {
        s.map_or_else(
            || "-".to_owned(),
            |s| format!("{:.2} / {:.2} / {:.2}", s.min, s.median, s.max),
        )
    };
    let mut out = String::from(
        "| machines | flake | floor s (min / median / max) | plan s (min / median / max) | plan ÷ floor (target ≤ 1.3) | peak MiB floor / plan |\n|---|---|---|---|---|---|\n",
    );
    for case in cases {
        let ratio = ratio(case).map_or_else(
            || "-".to_owned(),
            |r| format!("{r:.2}{}", if r <= TARGET { "" } else { " (over)" }),
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} / {:.0} |\n",
            case.machines,
            case.kind.label(),
            spread(seconds(&case.floor)),
            spread(seconds(&case.plan)),
            ratio,
            peak_mib(&case.floor),
            peak_mib(&case.plan),
        ));
    }
    out
}

fn case_json(case: &Case) -> Value {
    let samples = |s: &[Sample]| {
        s.iter()
            .map(|s| json!({ "seconds": s.seconds, "peakKib": s.peak_kib }))
            .collect::<Vec<_>>()
    };
    json!({
        "machines": case.machines,
        "flake": case.kind.label(),
        "floor": samples(&case.floor),
        "plan": samples(&case.plan),
        "floorSeconds": seconds(&case.floor),
        "planSeconds": seconds(&case.plan),
        "ratio": ratio(case),
        "target": TARGET,
    })
}
