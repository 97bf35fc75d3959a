//! `procurator-ctl completions SHELL`: a completion script on stdout, e.g.
//! `procurator-ctl completions bash > /etc/bash_completion.d/procurator-ctl`.

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::Outcome;
use crate::cli::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to write completions for.
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(args: Args) -> anyhow::Result<Outcome> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "procurator-ctl", &mut script);
    crate::output::print(&String::from_utf8_lossy(&script))?;
    Ok(Outcome::Success)
}
