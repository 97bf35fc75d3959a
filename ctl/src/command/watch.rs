//! `procurator-ctl watch [DEPLOYMENT]`: follow a deployment live until it ends.

use anyhow::anyhow;
use procurator_core::DeploymentId;
use procurator_proto::v1::{Deployment, ListDeploymentsRequest};

use crate::connection::{Connection, ConnectionArgs};
use crate::output::OutputArgs;
use crate::{Outcome, follow, render};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The deployment to follow; the newest one if left out.
    pub deployment: Option<String>,

    /// Show only events after this revision (e.g. the last one seen before
    /// a disconnect). 0 replays the deployment from its start.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub from_revision: u64,

    #[command(flatten)]
    pub follow: render::FollowArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    let id = match args.deployment {
        Some(id) => parse_id(&id)?,
        None => newest(&mut conn).await?,
    };
    let mut renderer = render::for_output(args.output.output, args.follow.style());
    follow::follow(&mut conn, &id, args.from_revision, renderer.as_mut()).await
}

/// A deployment id as the user typed it, checked before it is sent.
pub fn parse_id(id: &str) -> anyhow::Result<String> {
    Ok(DeploymentId::parse(id)
        .map_err(|e| anyhow!("{e}; `procurator-ctl deployments` lists them"))?
        .to_string())
}

async fn newest(conn: &mut Connection) -> anyhow::Result<String> {
    Ok(newest_deployment(conn).await?.id)
}

/// The newest deployment, or an error saying there is none yet.
pub async fn newest_deployment(conn: &mut Connection) -> anyhow::Result<Deployment> {
    let response = conn
        .client
        .list_deployments(ListDeploymentsRequest { limit: 1 })
        .await
        .map_err(|status| conn.error(&status, "listing deployments"))?
        .into_inner();
    response.deployments.into_iter().next().ok_or_else(|| {
        anyhow!(
            "the control plane at {} has no deployment yet; submit one with `procurator-ctl submit deployment.json`",
            conn.url
        )
    })
}
