//! Which step of the CI chain failed, and the exit code that tells a CI
//! script so without parsing messages (docs/interfaces.md, "Exit codes").

use std::fmt;

use procurator_core::nix::NixError;

use crate::Outcome;

pub const EXIT_OK: u8 = 0;
/// Bad input, no connection, anything without a code of its own.
pub const EXIT_ERROR: u8 = 1;
/// clap's own code for a usage error: clap exits with it, we never do.
#[cfg_attr(not(test), allow(dead_code))]
pub const EXIT_USAGE: u8 = 2;
/// The followed deployment did not succeed.
pub const EXIT_DEPLOYMENT_FAILED: u8 = 3;
/// Nothing differs from what runs (or from `--previous`): nothing was
/// published or submitted.
pub const EXIT_NOTHING_CHANGED: u8 = 8;
/// 128 + SIGINT, as shells report a command ended by Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A step of `ci` (and of `plan`, `artifact`, `publish`) with its own exit
/// code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `nix eval` failed, or the flake's blueprint is not a valid one.
    Evaluation,
    /// `nix build` of a machine's system failed.
    Build,
    /// Copying the closures to the binary cache failed.
    Publish,
    /// The control plane refused the deployment.
    Submit,
}

impl Stage {
    pub fn exit_code(self) -> u8 {
        match self {
            Stage::Evaluation => 4,
            Stage::Build => 5,
            Stage::Publish => 6,
            Stage::Submit => 7,
        }
    }

    /// The `result` of `ci --output json`.
    pub fn result_label(self) -> &'static str {
        match self {
            Stage::Evaluation => "evaluation-failed",
            Stage::Build => "build-failed",
            Stage::Publish => "publish-failed",
            Stage::Submit => "submit-refused",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Stage::Evaluation => "evaluation failed",
            Stage::Build => "build failed",
            Stage::Publish => "publishing failed",
            Stage::Submit => "submit refused",
        }
    }
}

/// An error that ends a command with its stage's exit code. The message is
/// complete (it includes Nix's own output), so it has no `source`.
#[derive(Debug)]
pub struct StageError {
    pub stage: Stage,
    message: String,
}

impl StageError {
    pub fn new(stage: Stage, message: impl Into<String>) -> Self {
        Self {
            stage,
            message: message.into(),
        }
    }

    /// What went wrong, without the stage.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A failed Nix command: its one-line error, then the end of what Nix
    /// printed (colour removed), indented.
    pub fn nix(stage: Stage, context: &str, error: &NixError) -> Self {
        Self::new(stage, format!("{context}: {}", nix_message(error)))
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage.what(), self.message)
    }
}

impl std::error::Error for StageError {}

/// `NixError`'s message plus the tail of Nix's output, which holds the
/// whole error (`error: …` and the `at file:line` lines under it).
pub fn nix_message(error: &NixError) -> String {
    let tail = error.tail().trim_end();
    if tail.is_empty() {
        return error.to_string();
    }
    let indented: Vec<String> = tail.lines().map(|l| format!("    {l}")).collect();
    // The tail has the whole message: a one-line summary of it would repeat
    // its last line, which for Nix is often just `at file:line`.
    let head = match error {
        NixError::Failed {
            command, status, ..
        } => format!("{} failed ({status}):", short_command(command)),
        other => other.to_string(),
    };
    format!("{head}\n{}", indented.join("\n"))
}

/// A command line without its thousands of store paths: the first one
/// and how many there were.
fn short_command(command: &str) -> String {
    let words: Vec<&str> = command.split(' ').collect();
    let paths = words
        .iter()
        .filter(|w| w.starts_with("/nix/store/"))
        .count();
    if paths <= 2 {
        return command.to_owned();
    }
    let mut out: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !w.starts_with("/nix/store/"))
        .collect();
    let first = words.iter().find(|w| w.starts_with("/nix/store/"));
    out.extend(first);
    format!("{} … ({paths} store paths)", out.join(" "))
}

/// The stage an error belongs to, if any: anywhere in its chain, so context
/// added on the way up does not hide it.
pub fn stage_of(error: &anyhow::Error) -> Option<Stage> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<StageError>())
        .map(|e| e.stage)
}

/// The process exit code for how a command ended.
pub fn exit_code(result: &anyhow::Result<Outcome>) -> u8 {
    match result {
        Ok(Outcome::Success) => EXIT_OK,
        Ok(Outcome::DeploymentFailed) => EXIT_DEPLOYMENT_FAILED,
        Ok(Outcome::NothingChanged) => EXIT_NOTHING_CHANGED,
        Err(e) => stage_of(e).map_or(EXIT_ERROR, Stage::exit_code),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    use anyhow::Context as _;

    use super::*;

    #[test]
    fn every_ending_has_its_own_code() {
        let codes = [
            exit_code(&Ok(Outcome::Success)),
            exit_code(&Ok(Outcome::DeploymentFailed)),
            exit_code(&Ok(Outcome::NothingChanged)),
            exit_code(&Err(anyhow::anyhow!("no such file"))),
            EXIT_USAGE,
            exit_code(&Err(StageError::new(Stage::Evaluation, "x").into())),
            exit_code(&Err(StageError::new(Stage::Build, "x").into())),
            exit_code(&Err(StageError::new(Stage::Publish, "x").into())),
            exit_code(&Err(StageError::new(Stage::Submit, "x").into())),
            EXIT_INTERRUPTED,
        ];
        assert_eq!(codes, [0, 3, 8, 1, 2, 4, 5, 6, 7, 130]);
    }

    #[test]
    fn long_lists_of_store_paths_are_cut() {
        let a = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-a";
        let command = format!("nix copy --to file:///c {a} {a} {a}");
        assert_eq!(
            short_command(&command),
            format!("nix copy --to file:///c {a} … (3 store paths)")
        );
        assert_eq!(
            short_command("nix eval --json /f#x"),
            "nix eval --json /f#x"
        );
    }

    #[test]
    fn context_does_not_hide_the_stage() {
        let err: anyhow::Error = StageError::new(Stage::Publish, "disk full").into();
        let err = Err::<(), _>(err).context("publishing").unwrap_err();
        assert_eq!(stage_of(&err), Some(Stage::Publish));
        assert_eq!(exit_code(&Err(err)), 6);
    }

    #[test]
    fn nix_errors_keep_their_whole_message() {
        let error = NixError::Failed {
            command: "nix eval --json /f#blueprintJSON".into(),
            status: ExitStatus::from_raw(256),
            tail: "error: syntax error, unexpected '}'\n       at /f/flake.nix:3:1:".into(),
        };
        let err = StageError::nix(Stage::Evaluation, "blueprintJSON", &error);
        assert_eq!(
            err.to_string(),
            "evaluation failed: blueprintJSON: nix eval --json /f#blueprintJSON failed (exit status: 1):\n    \
             error: syntax error, unexpected '}'\n           at /f/flake.nix:3:1:"
        );
    }
}
