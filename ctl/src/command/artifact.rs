//! `procurator-ctl artifact --flake PATH --out deployment.json`: evaluate,
//! build, and write the deployment artifact (nothing at all on any error).

use std::path::PathBuf;

use crate::pipeline::intent::{self, IntentKeyArgs};
use crate::pipeline::{Flake, FlakeArgs, artifact, rollout};
use crate::{Outcome, output};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 written, 1 error (e.g. no commit), 2 usage, 4 evaluation failed, 5 build failed; nothing is written unless 0."
)]
pub struct Args {
    #[command(flatten)]
    pub flake: FlakeArgs,

    /// Where to write deployment.json (replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// The commit the flake was built from (default: `git -C PATH rev-parse
    /// HEAD`, with its committer time as gitCommitTime).
    #[arg(long, value_name = "SHA")]
    pub git_commit: Option<String>,

    /// The committer time of --git-commit (Unix seconds), written as
    /// gitCommitTime so the control plane can refuse older commits
    /// [default with --git-commit: now].
    #[arg(long, value_name = "SECS", requires = "git_commit")]
    pub git_commit_time: Option<i64>,

    /// A JSON file holding the artifact's `rollout` object (waves, failure
    /// budget, …; docs/rollouts.md).
    #[arg(long, value_name = "FILE")]
    pub rollout: Option<PathBuf>,

    #[command(flatten)]
    pub intent: IntentKeyArgs,
}

pub async fn run(args: Args) -> anyhow::Result<Outcome> {
    let flake = Flake::open(&args.flake.flake)?;
    // Before building: a missing commit should not cost a build.
    let commit = artifact::resolve_commit(
        flake.dir(),
        args.git_commit.as_deref(),
        args.git_commit_time,
    )?;
    let rollout = args.rollout.as_deref().map(rollout::load).transpose()?;
    let intent_key = args.intent.load()?;
    let nix = crate::pipeline::nix();
    let evaluated = args.flake.evaluate_and_build(&nix, &flake).await?;
    let (mut deployment, mut text) = artifact::render(&commit, rollout.as_ref(), &evaluated)?;
    if let Some(key) = &intent_key {
        (deployment, text) = intent::sign_text(&text, key)?;
    }
    artifact::write_atomically(&args.out, &text)?;
    let signed = match &intent_key {
        Some(key) => format!(", signed with intent key {}", key.name()),
        None => String::new(),
    };
    output::print(&format!(
        "wrote {} ({} machines, commit {}{signed})\n",
        args.out.display(),
        deployment.blueprint.len(),
        deployment.git_commit
    ))?;
    Ok(Outcome::Success)
}
