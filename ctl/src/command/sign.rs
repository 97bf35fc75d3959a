//! `procurator-ctl sign --intent-key FILE deployment.json`: add a signed
//! statement per machine to an artifact written by other means (or sign it
//! again after editing), in place unless `--out` says where.

use std::path::PathBuf;

use crate::pipeline::artifact::write_atomically;
use crate::pipeline::intent::{read_key, sign_text};
use crate::{Outcome, output};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 signed, 1 error (an unreadable key, an invalid artifact); nothing is written unless 0."
)]
pub struct Args {
    /// The deployment.json to sign.
    pub file: PathBuf,

    /// The key to sign with, made by `nix key generate-secret --key-name NAME`
    /// (or the context's intent-key).
    #[arg(long, env = "PROCURATOR_INTENT_KEY", value_name = "FILE")]
    pub intent_key: Option<PathBuf>,

    /// Write the signed artifact here instead of replacing FILE (atomically).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let Some(key) = &args.intent_key else {
        anyhow::bail!(
            "no intent key: pass --intent-key FILE, set PROCURATOR_INTENT_KEY, or give the context an intent-key"
        );
    };
    let key = read_key(key)?;
    let (_, text) = super::validate::load(&args.file)?;
    let (artifact, signed) = sign_text(&text, &key)?;
    let out = args.out.as_ref().unwrap_or(&args.file);
    write_atomically(out, &signed)?;
    output::print(&format!(
        "signed {} statements ({} machines, commit {}) with intent key {} into {}\n",
        artifact.intents.len(),
        artifact.blueprint.len(),
        artifact.git_commit,
        key.name(),
        out.display()
    ))?;
    Ok(Outcome::Success)
}
