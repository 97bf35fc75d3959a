//! Running one command with a deadline and keeping its output, bounded:
//! what activation, health checks and the Nix wrapper share.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;

use super::progress::strip_ansi;
use crate::limits::MAX_ACTIVATION_LOG_BYTES;
use crate::output::BoundedOutput;

/// How long to keep reading output after the process ended: a background
/// child may hold the pipe open forever.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// A command that ran to its end.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    /// The last lines of stdout and stderr, interleaved as they arrived,
    /// colour removed.
    pub tail: String,
    /// All of it, or its start and end within
    /// [`MAX_ACTIVATION_LOG_BYTES`], for the logs an agent keeps.
    pub output: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} did not finish within {}s and was killed", timeout.as_secs_f64())]
    TimedOut {
        command: String,
        timeout: Duration,
        tail: String,
        output: String,
    },
    #[error("waiting for {command} failed: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
}

impl RunError {
    /// The output captured before things went wrong.
    pub fn tail(&self) -> &str {
        match self {
            RunError::TimedOut { tail, .. } => tail,
            RunError::Spawn { .. } | RunError::Wait { .. } => "",
        }
    }

    /// All the output captured before things went wrong, bounded.
    pub fn output(&self) -> &str {
        match self {
            RunError::TimedOut { output, .. } => output,
            RunError::Spawn { .. } | RunError::Wait { .. } => "",
        }
    }
}

/// `program arg1 arg2`, for messages.
pub fn describe(command: &Command) -> String {
    let std = command.as_std();
    std::iter::once(std.get_program())
        .chain(std.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` with stdin closed, killing it (and every process in its
/// process group) once `timeout` passes, and keeps its combined output
/// (bounded) and its last `tail_lines` lines.
pub async fn run_captured(
    mut command: Command,
    timeout: Option<Duration>,
    tail_lines: usize,
) -> Result<CommandOutput, RunError> {
    let description = describe(&command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also kills what it started.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| RunError::Spawn {
        command: description.clone(),
        source,
    })?;
    let pid = child.id();
    let output = Arc::new(Mutex::new(BoundedOutput::new(MAX_ACTIVATION_LOG_BYTES)));
    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(collect_lines(out, output.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(collect_lines(err, output.clone()));
    }

    let waited = match timeout {
        Some(limit) => tokio::time::timeout(limit, child.wait()).await,
        None => Ok(child.wait().await),
    };
    match waited {
        Ok(Ok(status)) => {
            drain(&mut readers).await;
            let (tail, output) = take(&output, tail_lines);
            Ok(CommandOutput {
                status,
                tail,
                output,
            })
        }
        Ok(Err(source)) => Err(RunError::Wait {
            command: description,
            source,
        }),
        Err(_elapsed) => {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            // Reap it; the group kill already made it exit.
            let _ = child.kill().await;
            drain(&mut readers).await;
            let (tail, output) = take(&output, tail_lines);
            Err(RunError::TimedOut {
                command: description,
                timeout: timeout.unwrap_or_default(),
                tail,
                output,
            })
        }
    }
}

fn kill_group(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // ESRCH (already gone) is fine.
    let _ = ::nix::sys::signal::killpg(
        ::nix::unistd::Pid::from_raw(pid),
        ::nix::sys::signal::Signal::SIGKILL,
    );
}

async fn drain(readers: &mut tokio::task::JoinSet<()>) {
    let all = async { while readers.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_GRACE, all).await.is_err() {
        readers.abort_all();
    }
}

/// The last `tail_lines` lines and the whole (bounded) output.
fn take(output: &Mutex<BoundedOutput>, tail_lines: usize) -> (String, String) {
    output
        .lock()
        .map(|o| (o.last_lines(tail_lines), o.render()))
        .unwrap_or_default()
}

async fn collect_lines(stream: impl AsyncRead + Unpin, output: Arc<Mutex<BoundedOutput>>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = strip_ansi(line.trim_end_matches(['\n', '\r']));
                if let Ok(mut output) = output.lock() {
                    output.push(&line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[tokio::test]
    async fn keeps_the_last_lines_of_both_streams() {
        let out = run_captured(
            sh("echo out; echo err >&2; printf '\\033[31mred\\033[0m\\n'; exit 3"),
            Some(Duration::from_secs(10)),
            10,
        )
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(!out.success());
        // The two pipes are read independently: their relative order is not kept.
        let mut lines: Vec<&str> = out.tail.lines().collect();
        lines.sort();
        assert_eq!(lines, ["err", "out", "red"]);
    }

    #[tokio::test]
    async fn only_the_last_lines_are_kept() {
        let out = run_captured(sh("for i in 1 2 3 4 5; do echo $i; done"), None, 2)
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.tail, "4\n5");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let started = Instant::now();
        let err = run_captured(
            sh("echo before; sleep 30 & sleep 30; echo never"),
            Some(Duration::from_millis(300)),
            10,
        )
        .await
        .unwrap_err();
        // The background sleep holds the pipe: killing only `sh` would leave
        // us waiting on it.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, RunError::TimedOut { .. }), "{err}");
        assert_eq!(err.tail(), "before");
        assert!(
            err.to_string().contains("did not finish within 0.3s"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let err = run_captured(Command::new("/nonexistent/prog"), None, 5)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot start /nonexistent/prog"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_whole_output_is_kept_beside_the_tail() {
        let out = run_captured(sh("seq 1 100"), None, 3).await.unwrap();
        assert_eq!(out.tail, "98\n99\n100");
        assert_eq!(out.output.lines().count(), 100);
        assert!(out.output.starts_with("1\n2\n"), "{}", out.output);
    }
}
