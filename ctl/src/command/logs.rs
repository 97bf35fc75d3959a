//! `procurator-ctl logs [DEPLOYMENT] MACHINE`: what a deployment ran on a
//! machine, every command with its output, as the agent sent it.

use procurator_proto::v1::{GetMachineLogRequest, MachineLog};
use serde_json::json;

use crate::connection::ConnectionArgs;
use crate::output::{self, OutputArgs, OutputFormat};
use crate::{Outcome, format};

#[derive(Debug, clap::Args)]
#[command(override_usage = "procurator-ctl logs [OPTIONS] [DEPLOYMENT] <MACHINE>")]
pub struct Args {
    /// `[DEPLOYMENT] MACHINE`: the deployment (`d-…`, as `machine NAME`
    /// lists them), or none for the newest one whose output is kept.
    #[arg(value_name = "TARGET", num_args = 1..=2, required = true)]
    pub target: Vec<String>,

    #[command(flatten)]
    pub output: OutputArgs,
}

impl Args {
    /// The deployment (empty: the newest) and the machine.
    fn split(&self) -> (&str, &str) {
        match self.target.as_slice() {
            [deployment, machine] => (deployment, machine),
            [machine] => ("", machine),
            _ => ("", ""),
        }
    }
}

pub async fn run(conn: &ConnectionArgs, args: Args) -> anyhow::Result<Outcome> {
    let (deployment_id, machine) = args.split();
    let mut conn = conn.connect().await?;
    let request = GetMachineLogRequest {
        machine: machine.to_owned(),
        deployment_id: deployment_id.to_owned(),
    };
    let log = conn
        .client
        .get_machine_log(request)
        .await
        .map_err(|status| conn.error(&status, &format!("reading the output of {machine}")))?
        .into_inner();
    match args.output.output {
        OutputFormat::Text => output::print(&log_text(&log))?,
        OutputFormat::Json => output::print_json(&log_json(&log))?,
    }
    Ok(Outcome::Success)
}

/// The log as `--output json` prints it (exact: no escaping).
pub fn log_json(log: &MachineLog) -> serde_json::Value {
    json!({
        "machine": log.machine,
        "deploymentId": log.deployment_id,
        "state": log.state().label(),
        "output": log.output,
    })
}

/// A heading, then the output line by line with control characters
/// escaped: an agent's output must not rewrite the operator's screen.
pub fn log_text(log: &MachineLog) -> String {
    let mut out = format!(
        "# {} in {} ({})\n",
        format::safe(&log.machine),
        format::safe(&log.deployment_id),
        log.state().label()
    );
    for line in log.output.lines() {
        out.push_str(&format::safe(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use procurator_proto::v1::MachineState;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_deployment_is_optional_and_comes_first() {
        let parse = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("logs").chain(argv.iter().copied())).map(|cli| {
                let (d, m) = cli.args.split();
                (d.to_owned(), m.to_owned())
            })
        };
        assert_eq!(parse(&["web-1"]).unwrap(), ("".into(), "web-1".into()));
        assert_eq!(
            parse(&["d-1", "web-1"]).unwrap(),
            ("d-1".into(), "web-1".into())
        );
        assert!(parse(&[]).is_err());
        assert!(parse(&["d-1", "web-1", "web-2"]).is_err());
    }

    #[test]
    fn output_is_shown_line_by_line_without_escape_sequences() {
        let log = MachineLog {
            machine: "web-1".into(),
            deployment_id: "d-1".into(),
            state: MachineState::RolledBack as i32,
            output: "== check\nbad\u{1b}[2J\r".into(),
        };
        assert_eq!(
            log_text(&log),
            "# web-1 in d-1 (rolled-back)\n== check\nbad\\u{1b}[2J\\u{d}\n"
        );
    }
}
