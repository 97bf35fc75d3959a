//! `procurator-ctl`: the CLI for CI and operators.
//!
//! Exit codes (docs/interfaces.md): 0 success, 1 an error, 2 a usage error
//! (clap), 3 a followed deployment ended failed, superseded or cancelled,
//! 130 interrupted.

// A test that cannot set up its input should fail loudly.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod command;
mod connection;
mod follow;
mod format;
mod output;
mod render;

use std::process::ExitCode;

use clap::Parser as _;

/// What a command that ran to completion has to say to the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 3: the followed deployment did not succeed.
    DeploymentFailed,
}

const EXIT_ERROR: u8 = 1;
const EXIT_DEPLOYMENT_FAILED: u8 = 3;
/// 128 + SIGINT, as shells report a command ended by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
            result = cli::run(cli) => Some(result),
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
        Some(Ok(Outcome::Success)) => ExitCode::SUCCESS,
        Some(Ok(Outcome::DeploymentFailed)) => ExitCode::from(EXIT_DEPLOYMENT_FAILED),
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
