//! `procurator-ctl rollback [--to DEPLOYMENT]`: deploy an earlier
//! deployment's closures again, as a new deployment through the same safe
//! path (waves, health checks, magic rollback).

use std::collections::HashMap;

use anyhow::anyhow;
use procurator_core::DeploymentArtifact;
use procurator_proto::v1::{Deployment, RollbackRequest};
use serde_json::json;
use tonic::Code;

use super::watch::parse_id;
use crate::connection::{Connection, ConnectionArgs};
use crate::output::{self, OutputArgs, OutputFormat};
use crate::pipeline::intent::{IntentKeyArgs, IntentPublicKeyArgs, sign_text, verify_all};
use crate::{Outcome, follow, format, render};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes:
  0  the rollback deployment was created (with --wait: and it succeeded)
  1  an error: no such deployment, no earlier succeeded one, no connection
  3  with --wait: the rollback failed, halted, was superseded or cancelled")]
pub struct Args {
    /// The deployment whose closures to deploy again; default: the newest
    /// succeeded deployment before the one in force.
    #[arg(long, value_name = "DEPLOYMENT")]
    pub to: Option<String>,

    /// Follow the new deployment like `watch` until it ends; exit 3 if it
    /// failed.
    #[arg(long)]
    pub wait: bool,

    /// Sign fresh statements for the earlier closures with this key (an
    /// operator's, trusted by the agents), so agents with intent keys take
    /// the rollback as a new intent rather than refuse a replay.
    #[command(flatten)]
    pub intent: IntentKeyArgs,

    /// Before signing, check that the target's statements were signed by
    /// this key (CI's): the operator then signs what CI built, not what the
    /// control plane says it built.
    #[command(flatten)]
    pub verify: IntentPublicKeyArgs,

    #[command(flatten)]
    pub follow: render::FollowArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut to_deployment_id = args.to.as_deref().map(parse_id).transpose()?;
    let key = args.intent.load()?;
    let trusted = args.verify.keys()?;
    if !trusted.is_empty() && key.is_none() {
        eprintln!(
            "warning: --intent-public-key checks what --intent-key signs; without --intent-key the old statements go out as they were, and agents with intent keys refuse them"
        );
    }
    let mut conn = conn.connect().await?;
    let mut intents = HashMap::new();
    if let Some(key) = &key {
        // Sign what the target deployed, for exactly that target.
        let plan = RollbackRequest {
            to_deployment_id: to_deployment_id.clone().unwrap_or_default(),
            ..RollbackRequest::default()
        };
        let plan = match conn.client.plan_rollback(plan).await {
            Ok(plan) => plan.into_inner(),
            Err(status) => return Err(rollback_error(&conn, &status, to_deployment_id.as_deref())),
        };
        if !trusted.is_empty() {
            let earlier =
                DeploymentArtifact::from_json(plan.artifact_json.as_bytes()).map_err(|e| {
                    anyhow!("the artifact of {} is invalid: {e}", plan.to_deployment_id)
                })?;
            verify_all(&earlier, &trusted).map_err(|e| {
                anyhow!(
                    "refusing to sign {} again: the control plane's copy is not what a trusted key signed: {e:#}",
                    plan.to_deployment_id
                )
            })?;
        }
        let (artifact, _) = sign_text(&plan.artifact_json, key).map_err(|e| {
            anyhow!(
                "the artifact of {} cannot be signed: {e:#}",
                plan.to_deployment_id
            )
        })?;
        eprintln!(
            "signed {} statements for {} (commit {}) with intent key {}",
            artifact.intents.len(),
            plan.to_deployment_id,
            format::short_commit(&plan.git_commit),
            key.name()
        );
        intents = artifact
            .intents
            .iter()
            .map(|(row, statement)| (row.to_string(), statement.as_str().to_owned()))
            .collect();
        to_deployment_id = Some(plan.to_deployment_id);
    }
    let request = RollbackRequest {
        to_deployment_id: to_deployment_id.clone().unwrap_or_default(),
        intents,
    };
    let response = match conn.client.rollback(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(rollback_error(&conn, &status, to_deployment_id.as_deref())),
    };
    // What it rolls back to is for people; the rollback is under way even
    // if this look-up fails.
    let new = match follow::get_deployment(&mut conn, &response.deployment_id).await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("warning: {e:#}");
            None
        }
    };
    match args.output.output {
        OutputFormat::Text => {
            output::print(&format!("{}\n", response.deployment_id))?;
            if let Some(text) = new.as_ref().and_then(target_text) {
                eprintln!("{text}");
            }
            if !response.created {
                eprintln!("(already submitted)");
            }
        }
        OutputFormat::Json => output::print_json(&json!({
            "deploymentId": response.deployment_id,
            "created": response.created,
            "revision": response.revision,
            "rollbackOf": new.as_ref().map(|d| d.rollback_of.clone()),
            "gitCommit": new.as_ref().map(|d| d.git_commit.clone()),
        }))?,
    }
    if !args.wait {
        return Ok(Outcome::Success);
    }
    let mut renderer = render::for_output(args.output.output, args.follow.style());
    // Just before the new deployment was stored, so its `submitted` event shows.
    let from = response.revision.saturating_sub(1);
    follow::follow(&mut conn, &response.deployment_id, from, renderer.as_mut()).await
}

/// `rolling back to d-1 (commit 3f2c1a9b8e7d)`, when the new deployment says.
fn target_text(d: &Deployment) -> Option<String> {
    if d.rollback_of.is_empty() {
        return None;
    }
    let mut text = format!("rolling back to {}", d.rollback_of);
    if !d.git_commit.is_empty() {
        text.push_str(&format!(
            " (commit {})",
            format::short_commit(&d.git_commit)
        ));
    }
    Some(text)
}

/// The control plane's refusal, with what to do about it.
fn rollback_error(conn: &Connection, status: &tonic::Status, to: Option<&str>) -> anyhow::Error {
    let error = conn.error(status, "rolling back");
    match status.code() {
        Code::NotFound => anyhow!("{error}\n{}", not_found_hint(to)),
        _ => error,
    }
}

fn not_found_hint(to: Option<&str>) -> &'static str {
    match to {
        Some(_) => "list the deployments with `procurator-ctl deployments` and pass one with --to",
        None => {
            "there is no succeeded deployment before the one in force to go back to; pass one with --to (see `procurator-ctl deployments`)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_named_with_its_commit() {
        let mut d = Deployment {
            id: "d-2".into(),
            git_commit: "3f2c1a9b8e7d6c5b4a39".into(),
            rollback_of: "d-1".into(),
            ..Default::default()
        };
        assert_eq!(
            target_text(&d).as_deref(),
            Some("rolling back to d-1 (commit 3f2c1a9b8e7d)")
        );
        d.rollback_of.clear();
        assert_eq!(target_text(&d), None);
    }

    #[test]
    fn not_found_says_what_to_do() {
        assert!(not_found_hint(None).contains("--to"));
        assert!(not_found_hint(Some("d-1")).contains("deployments"));
    }
}
