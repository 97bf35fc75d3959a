//! `procurator-agent run-detached --status-file F --output-file O -- PROGRAM ARGS…`:
//! runs PROGRAM with stdout and stderr to O and writes its exit status to F
//! (atomically), so that an activation started by the agent outlives the
//! agent — `switch-to-configuration` may restart the agent itself — and a
//! restarted agent can still learn how it ended.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde::{Deserialize, Serialize};

use crate::journal::{JournalError, read_json, write_json};

/// The hidden mode's name: the first argument.
pub const MODE: &str = "run-detached";

/// How the program ended, as written to the status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunStatus {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    /// The program could not be started at all.
    #[serde(default)]
    pub error: Option<String>,
}

impl RunStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.error.is_none()
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal, &self.error) {
            (_, _, Some(error)) => format!("could not start: {error}"),
            (Some(code), _, _) => format!("exit status: {code}"),
            (None, Some(signal), _) => format!("killed by signal {signal}"),
            (None, None, None) => "ended in an unknown way".to_owned(),
        }
    }

    /// The status file, or `None` while it does not exist yet.
    pub fn read(path: &Path) -> Result<Option<Self>, JournalError> {
        read_json(path)
    }
}

/// The runner's arguments (everything after [`MODE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub status_file: PathBuf,
    pub output_file: PathBuf,
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl Args {
    /// The argument vector that runs `program args…` through [`MODE`].
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![
            MODE.into(),
            "--status-file".into(),
            self.status_file.clone().into(),
            "--output-file".into(),
            self.output_file.clone().into(),
            "--".into(),
            self.program.clone(),
        ];
        argv.extend(self.args.iter().cloned());
        argv
    }

    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut args = args.into_iter();
        let (mut status_file, mut output_file) = (None, None);
        loop {
            let Some(arg) = args.next() else {
                return Err("missing `-- PROGRAM`".into());
            };
            let slot = match arg.to_str() {
                Some("--") => break,
                Some("--status-file") => &mut status_file,
                Some("--output-file") => &mut output_file,
                _ => return Err(format!("unexpected argument {arg:?}")),
            };
            let value = args
                .next()
                .ok_or_else(|| format!("{arg:?} needs a value"))?;
            *slot = Some(PathBuf::from(value));
        }
        let program = args.next().ok_or("missing the program after `--`")?;
        Ok(Self {
            status_file: status_file.ok_or("missing --status-file")?,
            output_file: output_file.ok_or("missing --output-file")?,
            program,
            args: args.collect(),
        })
    }
}

/// Runs the program to its end.
pub fn run(args: &Args) -> RunStatus {
    let failed = |error: String| RunStatus {
        code: None,
        signal: None,
        error: Some(error),
    };
    let output = match File::create(&args.output_file) {
        Ok(file) => file,
        Err(e) => return failed(format!("cannot create {}: {e}", args.output_file.display())),
    };
    let stderr = match output.try_clone() {
        Ok(file) => file,
        Err(e) => return failed(format!("cannot share {}: {e}", args.output_file.display())),
    };
    let status = Command::new(&args.program)
        .args(&args.args)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(stderr)
        .status();
    match status {
        Ok(status) => RunStatus {
            code: status.code(),
            signal: status.signal(),
            error: None,
        },
        Err(e) => failed(format!("{}: {e}", Path::new(&args.program).display())),
    }
}

/// The mode's entry point: `argv` is everything after [`MODE`]. Exits 0 once
/// the status is written, whatever the program did.
pub fn main(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match Args::parse(argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("procurator-agent {MODE}: {e}");
            return ExitCode::from(2);
        }
    };
    let status = run(&args);
    match write_json(&args.status_file, &status) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("procurator-agent {MODE}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, program: &str, rest: &[&str]) -> Args {
        Args {
            status_file: dir.join("a.status"),
            output_file: dir.join("a.out"),
            program: program.into(),
            args: rest.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn arguments_round_trip() {
        let a = args(Path::new("/state"), "/bin/sh", &["-c", "--status-file x"]);
        let argv = a.to_argv();
        assert_eq!(argv[0], MODE);
        assert_eq!(Args::parse(argv.into_iter().skip(1)).unwrap(), a);
        assert!(Args::parse(["--status-file".into(), "f".into()]).is_err());
        assert!(Args::parse(["--bogus".into()]).is_err());
    }

    #[test]
    fn the_status_and_both_streams_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path(), "sh", &["-c", "echo out; echo err >&2; exit 3"]);
        let argv: Vec<OsString> = a.to_argv().into_iter().skip(1).collect();
        assert_eq!(main(argv), ExitCode::SUCCESS);
        let status = RunStatus::read(&a.status_file).unwrap().unwrap();
        assert_eq!(status.code, Some(3));
        assert!(!status.success());
        assert_eq!(status.describe(), "exit status: 3");
        let output = std::fs::read_to_string(&a.output_file).unwrap();
        assert_eq!(output, "out\nerr\n");
        // Nothing but the two files: the status was renamed into place.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn signals_and_missing_programs_are_statuses_too() {
        let dir = tempfile::tempdir().unwrap();
        let killed = run(&args(dir.path(), "sh", &["-c", "kill -9 $$"]));
        assert_eq!((killed.code, killed.signal), (None, Some(9)));
        let missing = run(&args(dir.path(), "/nonexistent/program", &[]));
        assert!(
            missing.describe().starts_with("could not start: "),
            "{missing:?}"
        );
        let ok = run(&args(dir.path(), "true", &[]));
        assert!(ok.success());
    }
}
