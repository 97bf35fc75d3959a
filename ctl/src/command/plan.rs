//! `procurator-ctl plan --flake PATH`: evaluate, build every machine, and
//! show what changed against what runs (the fleet, or `--previous`).
//! Publishes nothing, submits nothing.

use std::path::PathBuf;

use crate::connection::ConnectionArgs;
use crate::output::{OutputArgs, OutputFormat};
use crate::pipeline::baseline::Baseline;
use crate::pipeline::change::Plan;
use crate::pipeline::{Flake, FlakeArgs, rollout};
use crate::{Outcome, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Compared with: --previous FILE if given; else, with --control-plane (or
PROCURATOR_CONTROL_PLANE), what each machine runs now as the control plane
knows it; else nothing (every machine is added).

Exit codes: 0 planned (whether or not anything changed; see 'changed' in
--output json), 1 error, 2 usage, 4 evaluation failed, 5 build failed.")]
pub struct Args {
    #[command(flatten)]
    pub flake: FlakeArgs,

    /// The deployment.json of the last deployment, to compare with instead
    /// of what the fleet runs.
    #[arg(long, value_name = "FILE")]
    pub previous: Option<PathBuf>,

    /// Show `nix store diff-closures OLD NEW` for each machine with a new
    /// closure (when both closures are in the local store).
    #[arg(long)]
    pub diff: bool,

    /// A JSON file holding the `rollout` object (as for `artifact
    /// --rollout`): also show the waves the machines would roll out in.
    #[arg(long, value_name = "FILE")]
    pub rollout: Option<PathBuf>,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    // Read before building: a wrong path or an unreachable control plane
    // should not cost a build.
    let baseline = match &args.previous {
        Some(path) => Baseline::load_previous(path)?,
        None if conn.control_plane.is_empty() => Baseline::nothing(),
        None => Baseline::from_fleet(&mut conn.connect().await?).await?,
    };
    let rollout = args.rollout.as_deref().map(rollout::load).transpose()?;
    let flake = Flake::open(&args.flake.flake)?;
    let nix = crate::pipeline::nix();
    let evaluated = args.flake.evaluate_and_build(&nix, &flake).await?;
    let mut plan = Plan::compare(&baseline, &evaluated);
    plan.fill_sizes(&nix).await?;
    if args.diff {
        plan.fill_diffs(&nix).await?;
    }
    let waves = rollout
        .as_ref()
        .map(|r| rollout::plan(r, &evaluated))
        .transpose()?;
    match args.output.output {
        OutputFormat::Text => {
            let mut text = format!("{}\n{}\n", plan.table(), plan.verdict());
            if let Some(waves) = &waves {
                text.push_str(&rollout::waves_text(waves));
            }
            output::print(&text)?;
        }
        OutputFormat::Json => {
            let mut json = plan.json();
            if let Some(waves) = &waves {
                json["waves"] = rollout::waves_json(waves);
            }
            output::print_json(&json)?;
        }
    }
    Ok(Outcome::Success)
}
