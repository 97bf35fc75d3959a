//! Global options and dispatch to `command/<name>.rs`.

use clap::{Parser, Subcommand};

use crate::config::{self, Resolved, Source};
use crate::connection::ConnectionArgs;
use crate::{Outcome, command};

/// GitOps for NixOS fleets: submit deployments, follow them live, manage the
/// fleet's certificates.
#[derive(Debug, Parser)]
#[command(
    name = "procurator-ctl",
    version,
    propagate_version = true,
    after_help = crate::connection::CONNECTION_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the fleet's CA and issue certificates.
    #[command(subcommand)]
    Pki(command::pki::Command),
    /// Check a deployment.json locally, without contacting the control plane.
    Validate(command::validate::Args),
    /// Validate a deployment.json and hand it to the control plane.
    Submit(command::submit::Args),
    /// Follow a deployment live until it ends.
    Watch(command::watch::Args),
    /// Stop a running deployment: machines not started end cancelled, those
    /// in flight roll back.
    Cancel(command::cancel::Args),
    /// Deploy an earlier deployment's closures again, as a new deployment.
    Rollback(command::rollback::Args),
    /// Show the fleet's agents: connected or not, what they run.
    Status(command::status::Args),
    /// Make a one-time token with which one machine's agent enrolls
    /// (gets its certificate); the token goes to stdout.
    EnrollToken(command::trust::EnrollTokenArgs),
    /// Stop accepting a certificate, or every certificate of one identity.
    Revoke(command::trust::RevokeArgs),
    /// List revoked certificates and identities.
    Revocations(command::trust::RevocationsArgs),
    /// List deployments, newest first.
    Deployments(command::deployments::Args),
    /// One machine's deployments, newest first, and how each ended there.
    Machine(command::machine::Args),
    /// What a deployment ran on a machine: every command and its output.
    Logs(command::logs::Args),
    /// Serve the web dashboard on this machine (a URL with its token is
    /// printed), backed by the control plane with your certificate.
    Dashboard(command::dashboard::Args),
    /// Evaluate and build the flake; show which machines changed since the
    /// previous deployment.
    Plan(command::plan::Args),
    /// Copy the closures to a binary cache (signed), skipping what is there.
    Publish(command::publish::Args),
    /// Evaluate and build the flake; write deployment.json.
    Artifact(command::artifact::Args),
    /// Sign what each machine of a deployment.json is to do with an intent key.
    Sign(command::sign::Args),
    /// CI on every push: evaluate, build, detect change, publish, write the
    /// artifact, submit, and with --wait follow the rollout.
    Ci(command::ci::Args),
    /// Print a shell completion script to stdout.
    Completions(command::completions::Args),
    /// The connection settings in use, and where each came from.
    #[command(subcommand)]
    Config(command::config::Command),
}

impl Command {
    /// Whether it reads the connection settings or an intent key (so the
    /// config file matters to it).
    pub fn uses_settings(&self) -> bool {
        !matches!(
            self,
            Command::Pki(_) | Command::Validate(_) | Command::Completions(_)
        )
    }

    /// `--intent-key`, for the commands that sign.
    pub fn intent_key_mut(&mut self) -> Option<&mut Option<std::path::PathBuf>> {
        match self {
            Command::Ci(args) => Some(&mut args.intent.intent_key),
            Command::Artifact(args) => Some(&mut args.intent.intent_key),
            Command::Sign(args) => Some(&mut args.intent_key),
            Command::Rollback(args) => Some(&mut args.intent.intent_key),
            _ => None,
        }
    }
}

/// Fills what flags and variables left unset from the config file's
/// context, and says where each setting came from.
pub fn apply_config(cli: &mut Cli, matches: &clap::ArgMatches) -> anyhow::Result<Resolved> {
    let env = |k: &str| std::env::var(k).ok();
    let file = config::config_path(&env);
    let chosen = cli.connection.context.clone().map(|name| {
        let why = match config::given(matches, "context", "--context", "PROCURATOR_CONTEXT") {
            Some(source) => source.to_string(),
            None => "--context".to_owned(),
        };
        (name, why)
    });
    let context = config::context(file.as_deref(), chosen, env("HOME").as_deref())?;
    let mut resolved = Resolved {
        file: file.clone(),
        context: context
            .as_ref()
            .map(|(name, why, _)| (name.clone(), why.clone())),
        sources: Default::default(),
        intent_key: None,
    };
    let from_context = |name: &str| Source::Context {
        name: name.to_owned(),
        file: file.clone().unwrap_or_default(),
    };
    for (id, flag, var) in config::SETTINGS {
        // A command without --intent-key (`config show`) still shows the variable.
        let unparsed = (id == "intent_key" && cli.command.intent_key_mut().is_none())
            .then(|| env(var).filter(|v| !v.is_empty()))
            .flatten();
        if let Some(value) = unparsed {
            resolved.intent_key = Some(value.into());
            resolved.sources.insert(id, Source::Env(var));
            continue;
        }
        let source = match config::given(matches, id, flag, var) {
            Some(source) => source,
            None => {
                let Some((name, _, ctx)) = &context else {
                    resolved.sources.insert(id, Source::Unset);
                    continue;
                };
                let filled = match id {
                    "control_plane" if !ctx.control_plane.is_empty() => {
                        cli.connection.control_plane.clone_from(&ctx.control_plane);
                        true
                    }
                    "tls_ca" => fill(&mut cli.connection.tls_ca, &ctx.tls_ca),
                    "tls_cert" => fill(&mut cli.connection.tls_cert, &ctx.tls_cert),
                    "tls_key" => fill(&mut cli.connection.tls_key, &ctx.tls_key),
                    "intent_key" => match cli.command.intent_key_mut() {
                        Some(slot) => fill(slot, &ctx.intent_key),
                        None => fill(&mut resolved.intent_key, &ctx.intent_key),
                    },
                    _ => false,
                };
                if filled {
                    from_context(name)
                } else {
                    Source::Unset
                }
            }
        };
        resolved.sources.insert(id, source);
    }
    if let Some(slot) = cli.command.intent_key_mut() {
        resolved.intent_key.clone_from(slot);
    }
    Ok(resolved)
}

fn fill(slot: &mut Option<std::path::PathBuf>, value: &Option<std::path::PathBuf>) -> bool {
    if value.is_some() {
        slot.clone_from(value);
    }
    value.is_some()
}

pub async fn run(cli: Cli, resolved: Resolved) -> anyhow::Result<Outcome> {
    let conn = &cli.connection;
    match cli.command {
        Command::Config(cmd) => command::config::run(cmd, &cli.connection, &resolved),
        Command::Pki(cmd) => command::pki::run(cmd),
        Command::Validate(args) => command::validate::run(args),
        Command::Submit(args) => command::submit::run(conn, args).await,
        Command::Watch(args) => command::watch::run(conn, args).await,
        Command::Cancel(args) => command::cancel::run(conn, args).await,
        Command::Rollback(args) => command::rollback::run(conn, args).await,
        Command::Status(args) => command::status::run(conn, args).await,
        Command::EnrollToken(args) => command::trust::enroll_token(conn, args).await,
        Command::Revoke(args) => command::trust::revoke(conn, args).await,
        Command::Revocations(args) => command::trust::revocations(conn, args).await,
        Command::Deployments(args) => command::deployments::run(conn, args).await,
        Command::Machine(args) => command::machine::run(conn, args).await,
        Command::Logs(args) => command::logs::run(conn, args).await,
        Command::Dashboard(args) => command::dashboard::run(conn, args).await,
        Command::Plan(args) => command::plan::run(conn, args).await,
        Command::Publish(args) => command::publish::run(args).await,
        Command::Artifact(args) => command::artifact::run(args).await,
        Command::Sign(args) => command::sign::run(args),
        Command::Ci(args) => command::ci::run(conn, args).await,
        Command::Completions(args) => command::completions::run(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;
    use crate::output::OutputFormat;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("procurator-ctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_work_before_and_after_the_subcommand() {
        let before = parse(&["--control-plane", "https://cp:7700", "status"]).unwrap();
        assert_eq!(before.connection.control_plane, ["https://cp:7700"]);
        let after = parse(&[
            "status",
            "--tls-ca",
            "ca.crt",
            "--control-plane",
            "https://x:1",
        ])
        .unwrap();
        assert_eq!(after.connection.control_plane, ["https://x:1"]);
        // Once per replica, or space separated.
        let several = parse(&[
            "status",
            "--control-plane",
            "https://a:1 https://b:1",
            "--control-plane",
            "https://c:1",
        ])
        .unwrap();
        assert_eq!(
            several.connection.control_plane,
            ["https://a:1", "https://b:1", "https://c:1"]
        );
        assert_eq!(
            after.connection.tls_ca.as_deref(),
            Some(std::path::Path::new("ca.crt"))
        );
    }

    #[test]
    fn submit_takes_a_file_wait_and_output() {
        let cli = parse(&["submit", "deployment.json", "--wait", "--output", "json"]).unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(args.file, std::path::Path::new("deployment.json"));
        assert!(args.wait);
        assert_eq!(args.output.output, OutputFormat::Json);
        assert!(parse(&["submit"]).is_err(), "the file is required");
        assert!(parse(&["submit", "d.json", "--output", "yaml"]).is_err());
    }

    #[test]
    fn watch_defaults_to_the_newest_deployment_from_the_start() {
        let cli = parse(&["watch"]).unwrap();
        let Command::Watch(args) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(args.deployment, None);
        assert_eq!(args.from_revision, 0);
        assert_eq!(args.output.output, OutputFormat::Text);
        let cli = parse(&["watch", "d-1", "--from-revision", "42"]).unwrap();
        let Command::Watch(args) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(args.deployment.as_deref(), Some("d-1"));
        assert_eq!(args.from_revision, 42);
        assert!(parse(&["watch", "--from-revision", "-1"]).is_err());
    }

    #[test]
    fn pki_issue_needs_a_known_role() {
        let cli = parse(&[
            "pki", "issue", "--dir", "pki", "--role", "agent", "--name", "worker-1",
        ])
        .unwrap();
        let Command::Pki(command::pki::Command::Issue(args)) = cli.command else {
            panic!("not pki issue")
        };
        assert_eq!(args.role.role(), procurator_core::Role::Agent);
        assert!(!args.force);
        for bad in ["root", "admin", ""] {
            let err = parse(&["pki", "issue", "--dir", "p", "--role", bad, "--name", "n"]);
            assert!(err.is_err(), "{bad}");
        }
        // A client's certificate names its holder; the control plane's
        // need not.
        assert!(parse(&["pki", "issue", "--dir", "p", "--role", "ci"]).is_err());
        let cli = parse(&["pki", "issue", "--dir", "p", "--role", "control-plane"]).unwrap();
        let Command::Pki(command::pki::Command::Issue(args)) = cli.command else {
            panic!("not pki issue")
        };
        assert_eq!(args.role.role(), procurator_core::Role::ControlPlane);
        assert_eq!(args.name, None);
    }

    #[test]
    fn pki_init_defaults_to_an_admin_operator() {
        let cli = parse(&[
            "pki",
            "init",
            "--dir",
            "pki",
            "--san",
            "cp.example",
            "--san",
            "10.0.0.1",
        ])
        .unwrap();
        let Command::Pki(command::pki::Command::Init(args)) = cli.command else {
            panic!("not pki init")
        };
        assert_eq!(args.operator, "admin");
        assert_eq!(args.san, ["cp.example", "10.0.0.1"]);
    }

    #[test]
    fn deployments_has_a_limit() {
        let cli = parse(&["deployments", "--limit", "5"]).unwrap();
        let Command::Deployments(args) = cli.command else {
            panic!("not deployments")
        };
        assert_eq!(args.limit, 5);
    }

    #[test]
    fn ci_commands_need_their_inputs() {
        let cli = parse(&[
            "ci",
            "--flake",
            "f",
            "--publish-to",
            "file:///c",
            "--jobs",
            "3",
        ])
        .unwrap();
        let Command::Ci(args) = cli.command else {
            panic!("not ci")
        };
        assert_eq!(args.flake.jobs(), 3);
        assert!(!args.wait);
        assert!(
            parse(&["ci", "--flake", "f"]).is_err(),
            "--publish-to is required"
        );
        assert!(parse(&["plan", "--flake", "f", "--jobs", "0"]).is_err());
        assert!(
            parse(&["publish", "--to", "file:///c"]).is_err(),
            "a source is required"
        );
        assert!(parse(&["publish", "--to", "c", "--artifact", "a", "--flake", "f"]).is_err());
        assert!(
            parse(&["artifact", "--flake", "f"]).is_err(),
            "--out is required"
        );
    }

    #[test]
    fn submit_and_ci_take_force() {
        let cli = parse(&["submit", "d.json", "--force"]).unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert!(args.force);
        let cli = parse(&["ci", "--flake", "f", "--publish-to", "c", "--force"]).unwrap();
        let Command::Ci(args) = cli.command else {
            panic!("not ci")
        };
        assert!(args.force);
    }

    #[test]
    fn cancel_defaults_to_the_newest_without_a_reason() {
        let cli = parse(&["cancel"]).unwrap();
        let Command::Cancel(args) = cli.command else {
            panic!("not cancel")
        };
        assert_eq!(args.deployment, None);
        assert_eq!(args.reason, None);
        assert!(!args.wait);
        let cli = parse(&["cancel", "d-1", "--reason", "bad kernel", "--wait"]).unwrap();
        let Command::Cancel(args) = cli.command else {
            panic!("not cancel")
        };
        assert_eq!(args.deployment.as_deref(), Some("d-1"));
        assert_eq!(args.reason.as_deref(), Some("bad kernel"));
        assert!(args.wait);
        assert!(parse(&["cancel", "--reason"]).is_err());
    }

    #[test]
    fn rollback_takes_an_optional_target() {
        let cli = parse(&["rollback"]).unwrap();
        let Command::Rollback(args) = cli.command else {
            panic!("not rollback")
        };
        assert_eq!(args.to, None);
        let cli = parse(&["rollback", "--to", "d-1", "--wait", "--output", "json"]).unwrap();
        let Command::Rollback(args) = cli.command else {
            panic!("not rollback")
        };
        assert_eq!(args.to.as_deref(), Some("d-1"));
        assert!(args.wait);
        assert_eq!(args.output.output, OutputFormat::Json);
        assert!(
            parse(&["rollback", "d-1"]).is_err(),
            "the target needs --to"
        );
    }

    #[test]
    fn a_usage_error_exits_2() {
        let err = parse(&["frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["validate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
