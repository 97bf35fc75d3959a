//! `switch-to-configuration` outside the agent's process tree: an activation
//! may restart the agent, and must neither die with it nor be forgotten. The
//! agent runs it through `procurator-agent run-detached` — in a transient
//! systemd unit where systemd is PID 1 (a `setsid` child would die with the
//! agent's cgroup), in its own session otherwise — records the status and
//! output files in the journal, and polls the status file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use procurator_core::limits::MAX_ACTIVATION_LOG_BYTES;
use procurator_core::nix::run_captured;
use procurator_core::output::BoundedOutput;
use procurator_proto::v1::MachineState;
use tokio::process::Command;
use tokio::time::Instant;

use super::{Activator, Deployment};
use crate::detached::{self, RunStatus};
use crate::journal::Launched;
use crate::outcome::Failure;

/// The status file is polled first after this long, then twice as long
/// each time up to [`MAX_POLL`]: most switches finish in milliseconds, and
/// a fixed 100 ms poll was most of a fast deployment's time.
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(100);
/// Liveness is asked at most this often (`systemctl` is not free).
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long a runner that looked gone is given to show up again.
const EXEC_GRACE: Duration = Duration::from_millis(250);
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// How `switch-to-configuration` is started.
#[derive(Debug, Clone, Default)]
pub enum Launcher {
    /// As a child of the agent (tests; dies with the agent).
    #[default]
    Child,
    /// Through `<exe> run-detached`.
    Detached(Detached),
}

#[derive(Debug, Clone)]
pub struct Detached {
    /// The agent's own executable.
    pub exe: PathBuf,
    /// Through `systemd-run` (systemd is PID 1) rather than `setsid`.
    pub systemd: bool,
    /// Where the status and output files go (`STATE_DIR/activations`).
    pub dir: PathBuf,
}

/// How a started command ended: its status (or why there is none), the
/// last lines of its output and all of it, bounded.
#[derive(Debug)]
pub struct Ended {
    pub status: Result<RunStatus, String>,
    pub tail: String,
    pub output: String,
}

impl Deployment<'_> {
    /// Starts `program args` detached, journalled, and waits for its end.
    pub(super) async fn run_detached(
        &self,
        how: &Detached,
        program: &Path,
        args: &[&str],
        phase: MachineState,
    ) -> Result<Ended, Failure> {
        let launched = self.launch(how, program, args, phase).await?;
        let name = program
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let doing = format!("{name} {}", args.join(" "));
        Ok(self
            .activator
            .await_launched(&launched, |line| {
                self.report(phase, format!("{doing}: {line}"));
            })
            .await)
    }

    async fn launch(
        &self,
        how: &Detached,
        program: &Path,
        args: &[&str],
        phase: MachineState,
    ) -> Result<Launched, Failure> {
        let io = |what: &str, e: std::io::Error| Failure::new(phase, format!("{what}: {e}"), "");
        let n = self.launches.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{}-{n}", self.entry.deployment_id);
        std::fs::create_dir_all(&how.dir)
            .map_err(|e| io(&format!("cannot create {}", how.dir.display()), e))?;
        let runner = detached::Args {
            status_file: how.dir.join(format!("{name}.status")),
            output_file: how.dir.join(format!("{name}.out")),
            program: program.into(),
            args: args.iter().map(Into::into).collect(),
        };
        for stale in [&runner.status_file, &runner.output_file] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&format!("cannot remove {}", stale.display()), e));
                }
                _ => {}
            }
        }
        let mut launched = Launched {
            n,
            status_file: runner.status_file.clone(),
            output_file: runner.output_file.clone(),
            unit: how.systemd.then(|| format!("procurator-activation-{name}")),
            pid: None,
            command: std::iter::once(program.display().to_string())
                .chain(args.iter().map(|a| (*a).to_owned()))
                .collect::<Vec<_>>()
                .join(" "),
        };
        // Journalled before it starts: a restart then knows what to wait for.
        self.record(Some(&launched), phase)?;
        if let Some(unit) = &launched.unit {
            let mut command = Command::new("systemd-run");
            command
                .arg(format!("--unit={unit}"))
                .args([
                    "--collect",
                    "--quiet",
                    "--no-ask-password",
                    "--service-type=exec",
                ])
                .arg(&how.exe)
                .args(runner.to_argv());
            let tail_lines = self.activator.settings.tail_lines;
            let out = run_captured(command, Some(HELPER_TIMEOUT), tail_lines)
                .await
                .map_err(|e| Failure::new(phase, e.to_string(), e.tail()))?;
            if !out.success() {
                return Err(Failure::new(
                    phase,
                    format!("systemd-run could not start {unit} ({})", out.status),
                    out.tail,
                ));
            }
        } else {
            let mut child = Command::new("setsid")
                .arg(&how.exe)
                .args(runner.to_argv())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| io("cannot start setsid", e))?;
            launched.pid = child.id();
            // Reaps the runner when it ends; never kills it.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            // It runs now: failing here would start a rollback beside it.
            // This run still waits for it; only a restart would not know the pid.
            if let Err(e) = self.record(Some(&launched), phase) {
                tracing::warn!(error = %e.reason, "cannot record the activation's pid");
            }
        }
        Ok(launched)
    }

    /// Removes the status and output files of this deployment's launches,
    /// once it is over: they would pile up otherwise.
    pub(super) fn remove_launch_files(&self) {
        let Launcher::Detached(how) = &self.activator.settings.launcher else {
            return;
        };
        for n in 1..=self.launches.load(Ordering::Relaxed) {
            for ext in ["status", "out"] {
                let file = how
                    .dir
                    .join(format!("{}-{n}.{ext}", self.entry.deployment_id));
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(file = %file.display(), error = %e, "cannot remove an activation file");
                    }
                    _ => {}
                }
            }
        }
    }

    /// Writes the journal with `launched` as the activation in progress.
    fn record(&self, launched: Option<&Launched>, phase: MachineState) -> Result<(), Failure> {
        let mut entry = self.entry.clone();
        entry.activation = launched.cloned();
        self.activator
            .journal
            .write(&entry)
            .map_err(|e| Failure::new(phase, format!("cannot write the journal: {e}"), ""))
    }
}

impl Activator {
    /// Waits, at most the switch timeout, for a launched command's status
    /// file. A runner that is gone without one failed. Meanwhile the last
    /// line it printed goes to `on_output` when it changed, at most every
    /// `output_interval`: the operator's live view shows it.
    pub(super) async fn await_launched(
        &self,
        launched: &Launched,
        mut on_output: impl FnMut(&str),
    ) -> Ended {
        let timeout = self.settings.switch_timeout;
        let deadline = Instant::now() + timeout;
        let mut poll = FIRST_POLL;
        let mut next_liveness = Instant::now();
        let output_interval = self.settings.output_interval;
        let mut next_output = Instant::now() + output_interval;
        let mut last_line = String::new();
        let status = loop {
            match RunStatus::read(&launched.status_file) {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(e.to_string()),
            }
            if Instant::now() >= next_liveness {
                if !alive(launched).await && !alive_after(launched, EXEC_GRACE).await {
                    // It may have written the status just before it ended.
                    break match RunStatus::read(&launched.status_file) {
                        Ok(Some(status)) => Ok(status),
                        _ => Err("the activation ended without leaving its exit status".into()),
                    };
                }
                next_liveness = Instant::now() + LIVENESS_INTERVAL;
            }
            if Instant::now() >= next_output {
                if let Some(line) = last_line_of(&launched.output_file)
                    && line != last_line
                {
                    on_output(&line);
                    last_line = line;
                }
                next_output = Instant::now() + output_interval;
            }
            if Instant::now() >= deadline {
                stop(launched).await;
                break Err(format!("did not finish within {}s", timeout.as_secs()));
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(MAX_POLL);
        };
        let output = read_output(&launched.output_file);
        Ended {
            status,
            tail: output.last_lines(self.settings.tail_lines),
            output: output.render(),
        }
    }
}

/// Whether the unit or the runner process still runs.
/// Whether the runner is alive when looked at again after `grace`. A
/// process in the middle of an `exec` (setsid becoming the runner) can show
/// no command line for a moment, and must not be taken for one that ended.
async fn alive_after(launched: &Launched, grace: Duration) -> bool {
    tokio::time::sleep(grace).await;
    alive(launched).await
}

async fn alive(launched: &Launched) -> bool {
    if let Some(unit) = &launched.unit {
        let mut command = Command::new("systemctl");
        command.args(["is-active", "--quiet", unit]);
        return match run_captured(command, Some(HELPER_TIMEOUT), 0).await {
            Ok(out) => out.success(),
            // Cannot tell: keep waiting, the deadline still holds.
            Err(_) => true,
        };
    }
    match launched.pid {
        Some(pid) => runner_alive(pid),
        // The agent died between journalling the launch and recording the
        // runner's pid: look for the runner by its status file instead.
        None => runner_for_status_file(&launched.status_file).is_some(),
    }
}

/// The pid of a live `run-detached` runner writing `status_file`, if any.
fn runner_for_status_file(status_file: &Path) -> Option<u32> {
    let wanted = status_file.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == wanted))
                && runner_alive(*pid)
        })
}

/// `/proc/PID` is a live (not zombie) `run-detached` process: a pid reused
/// by something else after a reboot does not count.
pub fn runner_alive(pid: u32) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let runs_runner = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == detached::MODE.as_bytes());
    let zombie = std::fs::read_to_string(proc.join("stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    });
    // Between fork and exec a freshly spawned runner has an empty cmdline;
    // kernel threads do too, but have no executable.
    let starting = cmdline.is_empty() && std::fs::read_link(proc.join("exe")).is_ok();
    (runs_runner || starting) && !zombie
}

/// Ends an activation that ran out of time: the unit, or the runner's
/// whole process group (`setsid` made it the group's leader).
async fn stop(launched: &Launched) {
    let command = match (&launched.unit, launched.pid) {
        (Some(unit), _) => {
            let mut command = Command::new("systemctl");
            command.args(["stop", unit]);
            command
        }
        (None, Some(pid)) => {
            let mut command = Command::new("kill");
            command.args(["-KILL", "--", &format!("-{pid}")]);
            command
        }
        (None, None) => return,
    };
    if let Err(e) = run_captured(command, Some(HELPER_TIMEOUT), 0).await {
        tracing::warn!(error = %e, "cannot stop an activation that ran out of time");
    }
}

/// The last line with text in a command's output file, colour removed, cut
/// to what a progress message holds. Reads only the file's end.
fn last_line_of(path: &Path) -> Option<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const END: u64 = 4096;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(END))).ok()?;
    let mut end = Vec::new();
    file.take(END).read_to_end(&mut end).ok()?;
    let text = String::from_utf8_lossy(&end);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(procurator_core::limits::clip(
        &procurator_core::nix::strip_ansi(line),
        procurator_core::limits::MAX_STRING_BYTES,
    ))
}

/// A command's output file, bounded: an activation may print without end.
fn read_output(path: &Path) -> BoundedOutput {
    std::fs::File::open(path)
        .and_then(|f| BoundedOutput::read(std::io::BufReader::new(f), MAX_ACTIVATION_LOG_BYTES))
        .unwrap_or_else(|_| BoundedOutput::new(MAX_ACTIVATION_LOG_BYTES))
}
