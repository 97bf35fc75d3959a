//! `procurator-ctl validate FILE`: the checks the control plane makes on
//! submit, made locally, so CI fails before anything is sent.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use procurator_core::DeploymentArtifact;

use crate::Outcome;
use crate::pipeline::intent::{IntentPublicKeyArgs, verify_all};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The deployment.json to check.
    pub file: PathBuf,

    #[command(flatten)]
    pub intent: IntentPublicKeyArgs,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let keys = args.intent.keys()?;
    let (artifact, _) = load(&args.file)?;
    let signed = if keys.is_empty() {
        match artifact.intents.len() {
            0 => String::new(),
            n => format!(", {n} statements not checked: give --intent-public-key"),
        }
    } else {
        let n = verify_all(&artifact, &keys).with_context(|| {
            format!(
                "{} is not signed as the agents require",
                args.file.display()
            )
        })?;
        format!(", {n} statements signed by trusted keys")
    };
    crate::output::print(&format!(
        "{}: ok ({} machines, commit {}{signed})\n",
        args.file.display(),
        artifact.blueprint.len(),
        artifact.git_commit
    ))?;
    Ok(Outcome::Success)
}

/// Read and validate a deployment.json; the error names the file and, for a
/// malformed artifact, the field. Returns the artifact and the text as read.
pub fn load(file: &Path) -> anyhow::Result<(DeploymentArtifact, String)> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read {}; pass the deployment.json that CI wrote",
            file.display()
        )
    })?;
    let artifact = DeploymentArtifact::from_json(text.as_bytes())
        .with_context(|| format!("{} is not a valid deployment", file.display()))?;
    Ok((artifact, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_says_which() {
        let err = load(Path::new("/nonexistent/deployment.json"))
            .err()
            .map(|e| format!("{e:#}"));
        let err = err.unwrap_or_default();
        assert!(
            err.contains("cannot read /nonexistent/deployment.json"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_file_names_the_field() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("deployment.json");
        std::fs::write(
            &file,
            r#"{"gitCommit":"3f2c1a9","blueprint":{},"closures":{"worker-1":"/nix/store/abc123-nixos-system-25.11"}}"#,
        )?;
        let err = load(&file)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("is not a valid deployment"), "{err}");
        assert!(err.contains("closures.worker-1"), "{err}");
        Ok(())
    }
}
