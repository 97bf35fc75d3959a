//! `procurator-ctl submit FILE`: validate locally, hand the artifact to the
//! control plane, optionally follow it to the end.

use std::path::PathBuf;

use anyhow::anyhow;
use procurator_core::DeploymentArtifact;
use procurator_core::artifact::{Selector, parse_selectors};
use procurator_proto::v1::SubmitRequest;
use serde_json::json;

use tonic::{Code, Status};

use crate::connection::{Connection, ConnectionArgs};
use crate::output::{OutputArgs, OutputFormat};
use crate::{Outcome, follow, output, render};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes:
  0  submitted (with --wait: and the rollout succeeded)
  1  an error: invalid file, no connection, or the control plane refused it
     (a stale commit: see --force)
  3  the rollout failed, halted, was superseded or cancelled (--wait)")]
pub struct Args {
    /// The deployment.json CI wrote (gitCommit, blueprint, closures).
    pub file: PathBuf,

    /// Follow the deployment like `watch` until it ends; exit 3 if it failed.
    #[arg(long)]
    pub wait: bool,

    /// Submit even if the control plane refuses the commit as stale (it was
    /// deployed before, or is older than the deployment in force), e.g. to
    /// go back on purpose.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub on: OnArgs,

    #[command(flatten)]
    pub follow: render::FollowArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// `--on`, for `submit` and `ci`.
#[derive(Debug, Clone, clap::Args)]
pub struct OnArgs {
    /// Deploy only these machines (repeatable; any of them): a name, a
    /// pattern (`web-*`), `@LABEL` or `role:NAME`. The others are left as
    /// they are and not counted.
    #[arg(long = "on", value_name = "SELECTOR")]
    pub on: Vec<String>,
}

impl OnArgs {
    /// The selectors, each checked to select a machine of `artifact`.
    pub fn check(&self, artifact: &DeploymentArtifact) -> anyhow::Result<Vec<Selector>> {
        let selectors = parse_selectors(&self.on).map_err(|e| anyhow!("--on: {e}"))?;
        artifact
            .selected_targets(&selectors)
            .map_err(|e| anyhow!("--on: {e}"))?;
        Ok(selectors)
    }
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    // Invalid input never leaves this machine.
    let nothing_sent = |e: anyhow::Error| anyhow!("{e:#}\nnothing was sent to the control plane");
    let (artifact, artifact_json) = super::validate::load(&args.file).map_err(nothing_sent)?;
    args.on.check(&artifact).map_err(nothing_sent)?;
    let mut conn = conn.connect().await?;
    let response = conn
        .client
        .submit(SubmitRequest {
            artifact_json,
            force: args.force,
            on: args.on.on.clone(),
        })
        .await
        .map_err(|status| refused(&conn, &status, args.force))?
        .into_inner();

    match args.output.output {
        OutputFormat::Text => {
            output::print(&format!("{}\n", response.deployment_id))?;
            if !response.created {
                eprintln!("(already submitted)");
            }
        }
        OutputFormat::Json => output::print_json(&json!({
            "deploymentId": response.deployment_id,
            "created": response.created,
            "revision": response.revision,
        }))?,
    }
    if !args.wait {
        return Ok(Outcome::Success);
    }
    let mut renderer = render::for_output(args.output.output, args.follow.style());
    // `revision` is where the deployment was stored: start just before it so
    // the `submitted` event (machines, commit) is part of what we show.
    let from = response.revision.saturating_sub(1);
    follow::follow(&mut conn, &response.deployment_id, from, renderer.as_mut()).await
}

/// The control plane's answer, and for a stale commit how to insist.
pub fn refused(conn: &Connection, status: &Status, force: bool) -> anyhow::Error {
    let message = conn.error(status, "submitting the deployment");
    anyhow!("{message}{}", force_hint(status.code(), force))
}

/// FAILED_PRECONDITION is the stale-commit refusal (docs/rollouts.md): the
/// artifact is fine, only older than what runs, so `--force` is the way on.
pub fn force_hint(code: Code, force: bool) -> &'static str {
    if code == Code::FailedPrecondition && !force {
        "\nif this older commit is what you mean to deploy, submit it again with --force"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stale_commit_refusal_hints_force() {
        assert!(force_hint(Code::FailedPrecondition, false).contains("--force"));
        assert_eq!(force_hint(Code::FailedPrecondition, true), "");
        assert_eq!(force_hint(Code::InvalidArgument, false), "");
    }
}
