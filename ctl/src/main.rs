//! `procurator-ctl`: the CLI for CI and operators.
//!
//! Exit codes (docs/interfaces.md, `failure.rs`): 0 success, 1 an error,
//! 2 a usage error (clap), 3 a followed deployment ended failed, halted,
//! superseded or cancelled, 4 evaluation failed, 5 build failed, 6 publish failed,
//! 7 submit refused, 8 nothing changed, 130 interrupted.

// A test that cannot set up its input should fail loudly.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod command;
mod config;
mod connection;
mod dashboard;
mod failure;
mod follow;
mod format;
mod output;
mod pages;
mod pipeline;
mod render;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use failure::{EXIT_ERROR, EXIT_INTERRUPTED};

/// What a command that ran to completion has to say to the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 3: the followed deployment did not succeed (for `cancel --wait`:
    /// did not end cancelled).
    DeploymentFailed,
    /// Exit 8: `ci` found nothing to deploy.
    NothingChanged,
}

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let mut cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let resolved = if cli.command.uses_settings() {
        match cli::apply_config(&mut cli, &matches) {
            Ok(resolved) => resolved,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    } else {
        config::Resolved::default()
    };
    // Warnings only (e.g. a private key readable by others): the CLI's output
    // is its own, on stdout, and must stay parseable.
    procurator_core::telemetry::init(procurator_core::telemetry::LogFormat::Text, "warn");

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = cli::run(cli, resolved) => Some(result),
            // Dropping the command's future drops its progress bars and its
            // stream; the deployment itself carries on at the control plane.
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match result {
        None => {
            eprintln!("\ninterrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Some(result) => {
            if let Err(e) = &result {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(failure::exit_code(&result))
        }
    }
}
