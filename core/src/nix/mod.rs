//! The typed wrapper around the `nix` CLI.
//!
//! Every command is an argument vector (no shell), its exit status is checked
//! before its output is parsed, and errors carry the command and the end of
//! its output with colour removed. Works with Debian's Nix 2.8 and later.

mod command;
mod copy;
mod progress;
mod query;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

pub use command::{CommandOutput, RunError, describe, run_captured};
pub use progress::{CopyProgress, CopyTracker, strip_ansi};
pub use query::{PathInfo, PathInfoQuery};

use crate::limits::MAX_ACTIVATION_LOG_BYTES;
use crate::output::BoundedOutput;
use crate::store_path::{StorePath, StorePathError};

/// Lines of output kept for error messages.
pub const TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{command} failed ({status}){}", last_line(tail))]
    Failed {
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("{command} printed what Nix does not print: {message}")]
    BadOutput { command: String, message: String },
    #[error("{command} printed a path outside the store: {source}")]
    BadStorePath {
        command: String,
        source: StorePathError,
    },
}

impl NixError {
    /// The last lines of the failing command's output (may be empty).
    pub fn tail(&self) -> &str {
        match self {
            NixError::Run(e) => e.tail(),
            NixError::Failed { tail, .. } => tail,
            NixError::BadOutput { .. } | NixError::BadStorePath { .. } => "",
        }
    }
}

fn last_line(tail: &str) -> String {
    match tail.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(": {}", line.trim()),
        None => String::new(),
    }
}

/// How to run Nix: which programs, with which `--option`s and environment.
/// How `nix build` is told to build a derivation's `out`: `DRV^out`
/// since Nix 2.13 (where a bare `DRV` is the file itself), the bare `DRV`
/// before (where `^` is not understood). `version` is what `nix --version`
/// printed: `nix (Nix) 2.8.0`, `nix (Lix, like Nix) 2.91.1`.
pub fn output_suffix(version: &str) -> &'static str {
    let number = version.split_whitespace().last().unwrap_or_default();
    let mut parts = number.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) < (2, 13) => "",
        _ => "^out",
    }
}

/// A derivation `nix build` built, and its `out` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub drv_path: StorePath,
    pub out: StorePath,
}

#[derive(Debug, Clone)]
pub struct Nix {
    nix: PathBuf,
    nix_env: PathBuf,
    options: Vec<(String, String)>,
    env: Vec<(OsString, OsString)>,
    destination: Option<String>,
    timeout: Option<Duration>,
}

impl Default for Nix {
    fn default() -> Self {
        Self::new()
    }
}

impl Nix {
    /// `nix` and `nix-env` from `PATH`, the local store, no timeout.
    pub fn new() -> Self {
        Self {
            nix: "nix".into(),
            nix_env: "nix-env".into(),
            options: Vec::new(),
            env: Vec::new(),
            destination: None,
            timeout: None,
        }
    }

    /// Other `nix` and `nix-env` programs.
    pub fn with_programs(mut self, nix: impl Into<PathBuf>, nix_env: impl Into<PathBuf>) -> Self {
        self.nix = nix.into();
        self.nix_env = nix_env.into();
        self
    }

    /// Adds `--option NAME VALUE` to every command.
    pub fn with_option(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((name.into(), value.into()));
        self
    }

    /// Sets an environment variable for every command (e.g. `NIX_CONF_DIR`).
    pub fn with_env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Makes [`Nix::copy_from`] copy into the store at `destination` (passed
    /// as `--to`, e.g. a chroot store `/tmp/host/root`) instead of the local
    /// store.
    pub fn with_store(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Kills any command that runs longer than `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// `program args... --option NAME VALUE...` with the configured environment.
    /// `program ARGS --option NAME VALUE…`: the options follow `args`, so
    /// `args` must end with a complete flag (never a flag awaiting its value).
    fn command<I, S>(&self, program: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        command.args(args);
        for (name, value) in &self.options {
            command.arg("--option").arg(name).arg(value);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn nix(&self, args: &[&str]) -> Command {
        self.command(&self.nix, args.iter().copied())
    }

    /// `nix --version`, e.g. `nix (Nix) 2.8.0`.
    pub async fn version(&self) -> Result<String, NixError> {
        let stdout = self.stdout_of(self.nix(&["--version"])).await?;
        Ok(stdout.trim().to_owned())
    }

    /// `nix-env -p PROFILE --set CLOSURE`: a new generation of `profile`
    /// pointing at `closure`.
    pub async fn set_profile(&self, profile: &Path, closure: &StorePath) -> Result<(), NixError> {
        let args = [
            OsStr::new("-p"),
            profile.as_os_str(),
            OsStr::new("--set"),
            OsStr::new(closure.as_str()),
        ];
        self.stdout_of(self.command(&self.nix_env, args))
            .await
            .map(drop)
    }

    /// `nix-store --add-root LINK --indirect --realise PATH`: `path` survives
    /// garbage collections for as long as `link` exists (removing the link
    /// is enough to drop the root). `link`'s directory must exist.
    pub async fn add_root(&self, link: &Path, path: &StorePath) -> Result<(), NixError> {
        let args = [
            OsStr::new("--add-root"),
            link.as_os_str(),
            OsStr::new("--indirect"),
            OsStr::new("--realise"),
            OsStr::new(path.as_str()),
        ];
        self.stdout_of(self.command(&self.nix_store(), args))
            .await
            .map(drop)
    }

    /// `nix-store` beside the configured `nix-env`.
    fn nix_store(&self) -> PathBuf {
        match self.nix_env.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("nix-store"),
            _ => "nix-store".into(),
        }
    }

    /// `nix copy --to DESTINATION PATHS...`, e.g. to publish to a cache
    /// (`file:///dir?secret-key=/path/sk` signs while copying).
    pub async fn copy_to(&self, destination: &str, paths: &[StorePath]) -> Result<(), NixError> {
        let mut command = self.nix(&["copy", "--to", destination]);
        command.args(paths.iter().map(StorePath::as_str));
        self.stdout_of(command).await.map(drop)
    }

    /// `nix build --no-link --json ARGS...`: the `out` output of each
    /// installable built.
    pub async fn build(&self, args: &[&str]) -> Result<Vec<StorePath>, NixError> {
        Ok(self
            .build_outputs(args)
            .await?
            .into_iter()
            .map(|built| built.out)
            .collect())
    }

    /// `nix build --no-link --json ARGS...`: each derivation built and its
    /// `out` output, from Nix's JSON (the same from 2.8 to 2.24).
    pub async fn build_outputs(&self, args: &[&str]) -> Result<Vec<Built>, NixError> {
        let mut command = self.nix(&["build", "--no-link", "--json"]);
        command.args(args);
        let name = describe(&command);
        let stdout = self.stdout_of(command).await?;
        let built: Vec<serde_json::Value> =
            serde_json::from_str(&stdout).map_err(|e| NixError::BadOutput {
                command: name.clone(),
                message: e.to_string(),
            })?;
        let path = |b: &serde_json::Value, pointer: &str| {
            let text =
                b.pointer(pointer)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| NixError::BadOutput {
                        command: name.clone(),
                        message: format!("no {pointer} in {b}"),
                    })?;
            StorePath::parse(text).map_err(|source| NixError::BadStorePath {
                command: name.clone(),
                source,
            })
        };
        built
            .iter()
            .map(|b| {
                Ok(Built {
                    drv_path: path(b, "/drvPath")?,
                    out: path(b, "/outputs/out")?,
                })
            })
            .collect()
    }

    /// Which of `paths` are not valid in the store (`nix-store
    /// --check-validity --print-invalid`): what a failed build left unbuilt.
    pub async fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, NixError> {
        let mut command = self.command(
            &self.nix_store(),
            ["--check-validity", "--print-invalid"].map(OsStr::new),
        );
        command.args(paths.iter().map(StorePath::as_str));
        let name = describe(&command);
        let stdout = self.stdout_of(command).await?;
        stdout
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                StorePath::parse(l).map_err(|source| NixError::BadStorePath {
                    command: name.clone(),
                    source,
                })
            })
            .collect()
    }

    /// `nix eval --json ARGS...`, parsed.
    pub async fn eval_json(&self, args: &[&str]) -> Result<serde_json::Value, NixError> {
        let mut command = self.nix(&["eval", "--json"]);
        command.args(args);
        let name = describe(&command);
        let stdout = self.stdout_of(command).await?;
        serde_json::from_str(&stdout).map_err(|e| NixError::BadOutput {
            command: name,
            message: e.to_string(),
        })
    }

    /// Runs `command`, checks its exit status, returns its stdout. Stderr
    /// (colour removed) goes into the error.
    async fn stdout_of(&self, mut command: Command) -> Result<String, NixError> {
        let name = describe(&command);
        command.stdin(Stdio::null()).kill_on_drop(true);
        let run = command.output();
        let output = match self.timeout {
            Some(limit) => {
                tokio::time::timeout(limit, run)
                    .await
                    .map_err(|_| RunError::TimedOut {
                        command: name.clone(),
                        timeout: limit,
                        tail: String::new(),
                        output: String::new(),
                    })?
            }
            None => run.await,
        }
        .map_err(|source| RunError::Spawn {
            command: name.clone(),
            source,
        })?;
        if !output.status.success() {
            let stderr = strip_ansi(&String::from_utf8_lossy(&output.stderr));
            return Err(NixError::Failed {
                command: name,
                status: output.status,
                tail: BoundedOutput::of(&stderr, MAX_ACTIVATION_LOG_BYTES).last_lines(TAIL_LINES),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_syntax_follows_the_nix_version() {
        assert_eq!(output_suffix("nix (Nix) 2.8.0"), "");
        assert_eq!(output_suffix("nix (Nix) 2.12.1"), "");
        assert_eq!(output_suffix("nix (Nix) 2.13.0"), "^out");
        assert_eq!(output_suffix("nix (Nix) 2.24.15"), "^out");
        assert_eq!(output_suffix("nix (Lix, like Nix) 2.91.1"), "^out");
        assert_eq!(output_suffix("nix (Nix) 3.0.0pre"), "^out");
        assert_eq!(output_suffix("something else"), "^out");
    }

    #[test]
    fn failure_messages_name_the_command_and_the_last_line() {
        use std::os::unix::process::ExitStatusExt as _;
        let err = NixError::Failed {
            command: "nix copy --from file:///c /nix/store/x".into(),
            status: ExitStatus::from_raw(256),
            tail: "copying path\nerror: it lacks a valid signature\n".into(),
        };
        assert_eq!(
            err.to_string(),
            "nix copy --from file:///c /nix/store/x failed (exit status: 1): error: it lacks a valid signature"
        );
        assert!(err.tail().starts_with("copying path"));
    }

    #[test]
    fn options_and_env_reach_every_command() {
        let nix = Nix::new()
            .with_option("sandbox", "false")
            .with_env("NIX_CONF_DIR", "/x");
        let command = nix.nix(&["--version"]);
        assert_eq!(describe(&command), "nix --version --option sandbox false");
        let envs: Vec<_> = command.as_std().get_envs().collect();
        assert_eq!(
            envs,
            vec![(
                std::ffi::OsStr::new("NIX_CONF_DIR"),
                Some(std::ffi::OsStr::new("/x"))
            )]
        );
    }
}
