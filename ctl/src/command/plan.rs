//! `procurator-ctl plan --flake PATH`: evaluate, build every machine, and
//! show what changed against the previous deployment. Publishes nothing,
//! submits nothing.

use std::path::PathBuf;

use crate::output::{OutputArgs, OutputFormat};
use crate::pipeline::change::{Plan, load_previous};
use crate::pipeline::{Flake, FlakeArgs, rollout};
use crate::{Outcome, output};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 planned (whether or not anything changed; see 'changed' in --output json), 1 error, 2 usage, 4 evaluation failed, 5 build failed."
)]
pub struct Args {
    #[command(flatten)]
    pub flake: FlakeArgs,

    /// The deployment.json of the last deployment. Without it every machine
    /// counts as added.
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

pub async fn run(args: Args) -> anyhow::Result<Outcome> {
    // Read before building: a wrong path should not cost a build.
    let previous = args.previous.as_deref().map(load_previous).transpose()?;
    let rollout = args.rollout.as_deref().map(rollout::load).transpose()?;
    let flake = Flake::open(&args.flake.flake)?;
    let nix = crate::pipeline::nix();
    let evaluated = args.flake.evaluate_and_build(&nix, &flake).await?;
    let mut plan = Plan::compare(previous.as_ref(), &evaluated);
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
