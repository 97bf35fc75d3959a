//! `procurator-bench`: the numbers behind BENCHMARKS.md.
//!
//! - `swarm`: thousands of simulated agents, each with its own certificate
//!   and mTLS connection, against the real control plane binary.
//! - `deploy`: real-Nix deploys to test hosts, side by side with the floor
//!   (the same work done by a plain script).
//! - `ci`: `procurator-ctl plan` on generated flakes, side by side with one
//!   `nix eval` and one `nix build` of the same machines.
//!
//! Both print min/median/max over several runs, and `--json` writes them.

// A benchmark that cannot set up should say so and stop.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod ci;
mod deploy;
mod stats;
mod swarm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "procurator-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulated agents against the real control plane: memory per agent,
    /// idle CPU, connect storm, desired-state latency, rollout time, watchers.
    Swarm(swarm::SwarmArgs),
    /// Real-Nix deploys to 1 and 10 test hosts against the floor script.
    Deploy(deploy::DeployArgs),
    /// `procurator-ctl plan` on generated flakes against one `nix eval`
    /// and one `nix build` of the same machines.
    Ci(ci::CiArgs),
    /// Runs a command and prints its peak resident set (used by `ci`).
    #[command(hide = true)]
    Peak {
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// One process of the swarm's agents (started by `swarm`).
    #[command(hide = true)]
    SwarmAgents(swarm::agents::AgentsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Swarm(args) => swarm::run(args),
        Command::Deploy(args) => deploy::run(args),
        Command::Ci(args) => ci::run(args),
        Command::Peak { command } => ci::peak(command),
        Command::SwarmAgents(args) => swarm::agents::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("procurator-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
