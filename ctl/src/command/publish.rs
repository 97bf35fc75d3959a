//! `procurator-ctl publish --to STORE_URI (--artifact FILE | --flake PATH)`:
//! copy every closure to a binary cache, signed, skipping what is there.

use std::path::PathBuf;

use procurator_core::StorePath;

use crate::output::{OutputArgs, OutputFormat};
use crate::pipeline::Flake;
use crate::pipeline::publish::{Destination, publish};
use crate::{Outcome, output};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 published, 1 error (e.g. an invalid --artifact), 2 usage, 4 evaluation failed, 5 build failed (--flake), 6 publishing failed."
)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["artifact", "flake"])))]
pub struct Args {
    /// The binary cache: any Nix store URI (file:///dir, s3://bucket,
    /// ssh-ng://host, …), or attic:CACHE to push with the attic client.
    #[arg(long, value_name = "STORE_URI")]
    pub to: String,

    /// Sign what is copied with this secret key (`nix key generate-secret`)
    /// first, in the local store.
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,

    /// Publish without signing and without the warning that agents will
    /// refuse what is not signed: for paths something else signs.
    #[arg(long, conflicts_with = "signing_key")]
    pub no_sign: bool,

    /// Publish the closures a deployment.json names (they must be in the
    /// local store).
    #[arg(long, value_name = "FILE")]
    pub artifact: Option<PathBuf>,

    /// Evaluate and build this flake, then publish what was built.
    #[arg(long, value_name = "PATH")]
    pub flake: Option<PathBuf>,

    /// Derivations built at once with --flake, Nix's `--max-jobs`
    /// (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), requires = "flake")]
    pub jobs: Option<u32>,

    /// Evaluators to share the machines among with --flake (see `plan --help`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), requires = "flake")]
    pub eval_workers: u32,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(args: Args) -> anyhow::Result<Outcome> {
    let destination = Destination::parse(&args.to)?;
    if let Some(warning) = crate::pipeline::publish::unsigned_warning(
        &destination,
        args.signing_key.as_deref(),
        args.no_sign,
    ) {
        eprintln!("{warning}");
    }
    let nix = crate::pipeline::nix();
    let closures: Vec<StorePath> = match (&args.artifact, &args.flake) {
        (Some(file), _) => {
            let (artifact, _) = super::validate::load(file)?;
            artifact.closures.into_values().collect()
        }
        (None, Some(dir)) => {
            let flake = Flake::open(dir)?;
            let settings = crate::pipeline::FlakeArgs {
                flake: dir.clone(),
                jobs: args.jobs,
                eval_workers: args.eval_workers,
            };
            let evaluated = settings.evaluate_and_build(&nix, &flake).await?;
            evaluated.closures.into_values().collect()
        }
        // clap's group makes one of them required.
        (None, None) => anyhow::bail!("pass --artifact deployment.json or --flake PATH"),
    };
    let published = publish(&nix, &destination, args.signing_key.as_deref(), &closures).await?;
    match args.output.output {
        OutputFormat::Text => output::print(&format!("{}\n", published.summary()))?,
        OutputFormat::Json => output::print_json(&published.json())?,
    }
    Ok(Outcome::Success)
}
