//! `procurator-ctl rollback [--to DEPLOYMENT]`: deploy an earlier
//! deployment's closures again, as a new deployment through the same safe
//! path (waves, health checks, magic rollback).

use anyhow::anyhow;
use procurator_proto::v1::{Deployment, RollbackRequest};
use serde_json::json;
use tonic::Code;

use super::watch::parse_id;
use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
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

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let to_deployment_id = args.to.as_deref().map(parse_id).transpose()?;
    let mut conn = conn.connect()?;
    let request = RollbackRequest {
        to_deployment_id: to_deployment_id.clone().unwrap_or_default(),
    };
    let response = match conn.client.rollback(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => {
            return Err(anyhow!(
                "{}\n{}",
                conn.error(&status, "rolling back"),
                not_found_hint(to_deployment_id.as_deref())
            ));
        }
        Err(status) => return Err(conn.error(&status, "rolling back")),
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
    let mut renderer = render::for_output(args.output.output);
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
