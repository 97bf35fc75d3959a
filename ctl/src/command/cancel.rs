//! `procurator-ctl cancel [DEPLOYMENT]`: stop a rollout. Machines not started
//! end cancelled; a machine in flight is refused its confirmation and rolls
//! back.

use anyhow::{anyhow, bail};
use procurator_proto::v1::{CancelRequest, Deployment, DeploymentState};
use tonic::Code;

use super::deployments::summary_json;
use super::watch::{newest_deployment, parse_id};
use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::{Outcome, follow, render};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes:
  0  the control plane accepted the cancellation (with --wait: the deployment
     ended cancelled)
  1  an error: no such deployment, it had already ended, no connection
  3  with --wait: the deployment ended in another state than cancelled")]
pub struct Args {
    /// The deployment to cancel; the newest one if left out (it must still
    /// be running).
    pub deployment: Option<String>,

    /// Why, recorded with the cancellation and shown by `watch`.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Follow the deployment until machines in flight have finished or
    /// rolled back; exit 0 if it ended cancelled, 3 if not.
    #[arg(long)]
    pub wait: bool,

    #[command(flatten)]
    pub follow: render::FollowArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut conn = conn.connect().await?;
    let id = match &args.deployment {
        Some(id) => parse_id(id)?,
        None => {
            let newest = newest_deployment(&mut conn).await?;
            if newest.state().is_final() {
                bail!(
                    "nothing to cancel: the newest deployment {} already ended {}; name one with `procurator-ctl cancel DEPLOYMENT`",
                    newest.id,
                    newest.state().label()
                );
            }
            newest.id
        }
    };
    let request = CancelRequest {
        deployment_id: id.clone(),
        reason: args.reason.clone().unwrap_or_default(),
    };
    let deployment = match conn.client.cancel(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => {
            return Err(anyhow!(
                "the control plane knows no deployment {id:?}: list them with `procurator-ctl deployments`"
            ));
        }
        Err(status) => return Err(conn.error(&status, &format!("cancelling deployment {id}"))),
    };
    match args.output.output {
        OutputFormat::Text => output::print(&cancelled_text(&deployment))?,
        OutputFormat::Json => output::print_json(&summary_json(&deployment))?,
    }
    if !args.wait {
        return Ok(Outcome::Success);
    }
    let state = if deployment.state().is_final() {
        deployment.state()
    } else {
        // Machines in flight finish or roll back first. The whole history is
        // replayed: the Deployment carries no revision to start from.
        let mut renderer = render::for_output(args.output.output, args.follow.style());
        follow::follow_view(&mut conn, &id, 0, renderer.as_mut())
            .await?
            .state
    };
    Ok(cancel_outcome(state))
}

/// `deployment d-1 cancelled`, or for one still finishing what to expect.
pub fn cancelled_text(d: &Deployment) -> String {
    let mut out = format!("deployment {} {}", d.id, d.state().label());
    if !d.halted_reason.is_empty() {
        out.push_str(&format!(": {}", d.halted_reason));
    }
    if !d.state().is_final() {
        out.push_str(&format!(
            "\nmachines in flight finish or roll back first; follow them with `procurator-ctl watch {}`",
            d.id
        ));
    }
    out.push('\n');
    out
}

/// What was asked for happened only if the deployment ended cancelled.
pub fn cancel_outcome(state: DeploymentState) -> Outcome {
    if state == DeploymentState::Cancelled {
        Outcome::Success
    } else {
        Outcome::DeploymentFailed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ended_cancellation_is_a_success() {
        assert_eq!(cancel_outcome(DeploymentState::Cancelled), Outcome::Success);
        for other in [
            DeploymentState::Succeeded,
            DeploymentState::Halted,
            DeploymentState::Running,
        ] {
            assert_eq!(cancel_outcome(other), Outcome::DeploymentFailed);
        }
    }

    #[test]
    fn the_text_says_the_state_and_what_is_still_going_on() {
        let mut d = Deployment {
            id: "d-1".into(),
            state: DeploymentState::Running as i32,
            halted_reason: "bad kernel".into(),
            ..Default::default()
        };
        assert_eq!(
            cancelled_text(&d),
            "deployment d-1 running: bad kernel\n\
             machines in flight finish or roll back first; follow them with `procurator-ctl watch d-1`\n"
        );
        d.state = DeploymentState::Cancelled as i32;
        assert_eq!(cancelled_text(&d), "deployment d-1 cancelled: bad kernel\n");
    }
}
