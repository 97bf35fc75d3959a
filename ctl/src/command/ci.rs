//! `procurator-ctl ci`: the whole chain a CI job runs on every push —
//! evaluate, build, detect change, publish, write the artifact, submit, and
//! with `--wait` follow the rollout.

use std::path::PathBuf;

use anyhow::anyhow;
use procurator_proto::v1::SubmitRequest;
use serde_json::{Value, json};

use super::submit::refused;
use crate::connection::{ConnectionArgs, is_retryable};
use crate::failure::{self, Stage, StageError};
use crate::output::{OutputArgs, OutputFormat};
use crate::pipeline::baseline::Baseline;
use crate::pipeline::change::Plan;
use crate::pipeline::intent::{self, IntentKeyArgs};
use crate::pipeline::publish::{Destination, Published, publish};
use crate::pipeline::{Flake, FlakeArgs, artifact, rollout};
use crate::render::{self, PlainRenderer};
use crate::{Outcome, follow, output};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes:
  0  deployed (with --wait: and the rollout succeeded)
  1  another error (bad input, no connection to the control plane, …)
  2  usage error
  3  the rollout failed, halted, was superseded or cancelled (--wait)
  4  evaluation failed (nix eval, or an invalid blueprint)
  5  a machine's build failed
  6  publishing to the binary cache failed
  7  the control plane refused the deployment (a stale commit: see --force)
  8  nothing changed: nothing published, written or submitted

Compared with: what each machine runs now as the control plane knows it
(the system its agent last reported, else what its newest succeeded
deployment put there), or --previous FILE. Either way the control plane is
asked first, so an unreachable one or a refused certificate stops ci (exit
1) before anything is built or published.")]
pub struct Args {
    #[command(flatten)]
    pub flake: FlakeArgs,

    /// The deployment.json of the last deployment, to compare with instead
    /// of what the fleet runs.
    #[arg(long, value_name = "FILE")]
    pub previous: Option<PathBuf>,

    /// The binary cache the agents pull from: a Nix store URI or attic:CACHE.
    #[arg(long, value_name = "STORE_URI")]
    pub publish_to: String,

    /// Sign what is published with this secret key (`nix key generate-secret`).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,

    /// Publish without signing and without the warning that agents will
    /// refuse what is not signed: for paths something else signs.
    #[arg(long, conflicts_with = "signing_key")]
    pub no_sign: bool,

    /// Also write the artifact here (atomically), e.g. to keep it as the
    /// next run's --previous.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

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

    #[command(flatten)]
    pub on: super::submit::OnArgs,

    /// Follow the rollout until it ends; exit 3 if it failed.
    #[arg(long)]
    pub wait: bool,

    /// Submit even if the control plane refuses the commit as stale (see
    /// `submit --force`).
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub follow: render::FollowArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// What `--output json` prints at the end, filled in as the chain goes.
#[derive(Debug, Default)]
struct Report {
    git_commit: Option<String>,
    plan: Option<Plan>,
    published: Option<Published>,
    artifact: Option<PathBuf>,
    deployment_id: Option<String>,
}

impl Report {
    fn json(&self, result: &anyhow::Result<Outcome>) -> Value {
        let label = match result {
            Ok(Outcome::Success) => "deployed",
            Ok(Outcome::DeploymentFailed) => "rollout-failed",
            Ok(Outcome::NothingChanged) => "nothing-changed",
            Err(e) => failure::stage_of(e).map_or("error", Stage::result_label),
        };
        json!({
            "result": label,
            "exitCode": failure::exit_code(result),
            "gitCommit": self.git_commit,
            "deploymentId": self.deployment_id,
            "comparedWith": self.plan.as_ref().map(|p| p.compared_with.json()),
            "machines": self.plan.as_ref().map_or_else(|| json!([]), Plan::machines_json),
            "published": self.published.as_ref().map(|p| json!({"paths": p.paths, "bytes": p.bytes, "alreadyThere": p.already_there})),
            "artifact": self.artifact.as_ref().map(|p| p.display().to_string()),
            "error": result.as_ref().err().map(|e| format!("{e:#}")),
        })
    }
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let mut report = Report::default();
    let result = chain(conn, &args, &mut report).await;
    if args.output.output == OutputFormat::Json {
        output::print_json(&report.json(&result))?;
    }
    result
}

/// Results go to stdout in text mode; with `--output json` stdout holds only
/// the final object, so everything else goes to stderr.
fn say(args: &Args, text: &str) -> anyhow::Result<()> {
    match args.output.output {
        OutputFormat::Text => output::print(text),
        OutputFormat::Json => {
            eprint!("{text}");
            Ok(())
        }
    }
}

fn nothing_done(e: anyhow::Error) -> anyhow::Error {
    anyhow!("{e:#}; nothing was built or published")
}

async fn chain(conn: &ConnectionArgs, args: &Args, report: &mut Report) -> anyhow::Result<Outcome> {
    // Everything that can be wrong with the settings is found before a
    // build that may take an hour.
    let mut conn = conn.connect().await?;
    let destination = Destination::parse(&args.publish_to)?;
    if let Some(warning) = crate::pipeline::publish::unsigned_warning(
        &destination,
        args.signing_key.as_deref(),
        args.no_sign,
    ) {
        eprintln!("{warning}");
    }
    let previous = args
        .previous
        .as_deref()
        .map(Baseline::load_previous)
        .transpose()?;
    let flake = Flake::open(&args.flake.flake)?;
    let commit = artifact::resolve_commit(
        flake.dir(),
        args.git_commit.as_deref(),
        args.git_commit_time,
    )?;
    report.git_commit = Some(commit.sha.to_string());
    let rollout = args.rollout.as_deref().map(rollout::load).transpose()?;
    let intent_key = args.intent.load()?;
    // The control plane is asked before anything is built: one that does
    // not answer, or refuses this certificate, would refuse the submit.
    let baseline = match previous {
        Some(previous) => {
            Baseline::check_fleet(&mut conn)
                .await
                .map_err(nothing_done)?;
            previous
        }
        None => Baseline::from_fleet(&mut conn)
            .await
            .map_err(nothing_done)?,
    };

    let nix = crate::pipeline::nix();
    let evaluated = args.flake.evaluate_and_build(&nix, &flake).await?;
    let mut plan = Plan::compare(&baseline, &evaluated);
    let (mut deployment, mut artifact_json) =
        artifact::render(&commit, rollout.as_ref(), &evaluated)?;
    // Only the selected machines count, and only they are deployed.
    let on = args.on.check(&deployment)?;
    if !on.is_empty() {
        let chosen: std::collections::BTreeSet<_> = deployment
            .selected_targets(&on)?
            .into_iter()
            .map(|t| t.machine.clone())
            .collect();
        plan.machines.retain(|m| chosen.contains(&m.name));
    }
    // Sizes are for people; a store that cannot say them stops nothing.
    if let Err(e) = plan.fill_sizes(&nix).await {
        eprintln!("warning: {e:#}");
    }
    say(args, &format!("{}\n{}\n", plan.table(), plan.verdict()))?;
    let changed = plan.changed();
    report.plan = Some(plan);
    if !changed {
        eprintln!(
            "nothing changed since {}: nothing was published, written or submitted",
            baseline.source
        );
        return Ok(Outcome::NothingChanged);
    }

    // Checked (rendered) before publishing: an artifact the control plane
    // would refuse is not worth a cache upload.
    if let Some(key) = &intent_key {
        (deployment, artifact_json) = intent::sign_text(&artifact_json, key)?;
        say(
            args,
            &format!(
                "signed {} statements with intent key {}\n",
                deployment.intents.len(),
                key.name()
            ),
        )?;
    }
    if rollout.is_some() {
        say(args, &rollout::waves_text(&deployment.waves()))?;
    }
    let closures: Vec<_> = deployment
        .selected_targets(&on)?
        .into_iter()
        .map(|t| t.closure.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let published = publish(&nix, &destination, args.signing_key.as_deref(), &closures).await?;
    say(args, &format!("{}\n", published.summary()))?;
    report.published = Some(published);

    if let Some(out) = &args.out {
        artifact::write_atomically(out, &artifact_json)?;
        say(args, &format!("wrote {}\n", out.display()))?;
        report.artifact = Some(out.clone());
    }

    let retry = match &args.out {
        Some(out) => format!(
            "; once fixed, submit it again with `procurator-ctl submit {}`",
            out.display()
        ),
        None => String::new(),
    };
    let request = SubmitRequest {
        artifact_json,
        force: args.force,
        on: args.on.on.clone(),
    };
    let response = match conn.client.submit(request).await {
        Ok(response) => response.into_inner(),
        // Unreachable is not a refusal: the same submit may work in a minute.
        Err(status) if is_retryable(&status) => {
            return Err(anyhow!(
                "{}{retry}",
                conn.error(&status, "submitting the deployment")
            ));
        }
        Err(status) => {
            let message = refused(&conn, &status, args.force);
            return Err(StageError::new(Stage::Submit, format!("{message}{retry}")).into());
        }
    };
    report.deployment_id = Some(response.deployment_id.clone());
    say(
        args,
        &format!("submitted deployment {}\n", response.deployment_id),
    )?;
    if !response.created {
        eprintln!("(the control plane had it already)");
    }
    if !args.wait {
        return Ok(Outcome::Success);
    }
    let mut renderer = match args.output.output {
        OutputFormat::Text => render::for_output(OutputFormat::Text, args.follow.style()),
        // The rollout as plain lines on stderr: stdout is for the summary.
        OutputFormat::Json => Box::new(PlainRenderer {
            out: Box::new(std::io::stderr()),
            style: args.follow.style(),
        }),
    };
    // Start just before the submit so the `submitted` event is shown.
    let from = response.revision.saturating_sub(1);
    follow::follow(&mut conn, &response.deployment_id, from, renderer.as_mut()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_summary_names_the_result_and_its_code() {
        let report = Report {
            git_commit: Some("3f2c1a9".into()),
            ..Report::default()
        };
        let v = report.json(&Ok(Outcome::NothingChanged));
        assert_eq!(v["result"], "nothing-changed");
        assert_eq!(v["exitCode"], 8);
        assert_eq!(v["deploymentId"], Value::Null);
        let v = report.json(&Err(StageError::new(Stage::Build, "worker-1").into()));
        assert_eq!(v["result"], "build-failed");
        assert_eq!(v["exitCode"], 5);
        assert!(v["error"].as_str().unwrap_or_default().contains("worker-1"));
        let v = report.json(&Err(anyhow!("no such file")));
        assert_eq!(
            (v["result"].as_str(), v["exitCode"].as_u64()),
            (Some("error"), Some(1))
        );
        let v = report.json(&Ok(Outcome::DeploymentFailed));
        assert_eq!(
            (v["result"].as_str(), v["exitCode"].as_u64()),
            (Some("rollout-failed"), Some(3))
        );
    }
}
