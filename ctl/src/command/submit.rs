//! `procurator-ctl submit FILE`: validate locally, hand the artifact to the
//! control plane, optionally follow it to the end.

use std::path::PathBuf;

use anyhow::anyhow;
use procurator_proto::v1::SubmitRequest;
use serde_json::json;

use crate::connection::ConnectionArgs;
use crate::output::{OutputArgs, OutputFormat};
use crate::{Outcome, follow, output, render};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The deployment.json CI wrote (gitCommit, blueprint, closures).
    pub file: PathBuf,

    /// Follow the deployment like `watch` until it ends; exit 3 if it failed.
    #[arg(long)]
    pub wait: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    // Invalid input never leaves this machine.
    let (_, artifact_json) = super::validate::load(&args.file)
        .map_err(|e| anyhow!("{e:#}\nnothing was sent to the control plane"))?;
    let mut conn = conn.connect()?;
    let response = conn
        .client
        .submit(SubmitRequest { artifact_json })
        .await
        .map_err(|status| conn.error(&status, "submitting the deployment"))?
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
    let mut renderer = render::for_output(args.output.output);
    // `revision` is where the deployment was stored: start just before it so
    // the `submitted` event (machines, commit) is part of what we show.
    let from = response.revision.saturating_sub(1);
    follow::follow(&mut conn, &response.deployment_id, from, renderer.as_mut()).await
}
