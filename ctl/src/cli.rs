//! Global options and dispatch to `command/<name>.rs`.

use clap::{Parser, Subcommand};

use crate::Outcome;
use crate::command;
use crate::connection::ConnectionArgs;

/// GitOps for NixOS fleets: submit deployments, follow them live, manage the
/// fleet's certificates.
#[derive(Debug, Parser)]
#[command(name = "procurator-ctl", version, propagate_version = true)]
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
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let conn = &cli.connection;
    match cli.command {
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
