//! Processes a test starts: each in a process group of its own, so stopping
//! it also stops what it started (an agent's `nix copy`, a health check), and
//! under `setpriv --pdeathsig KILL`, so a test process that dies without
//! unwinding takes them along.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::ctl::CmdOutput;

/// How long a stopped process gets to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// `program args…` run so that the kernel kills it when the thread that
/// started it ends. The pid stays the program's own: setpriv execs it.
pub fn guarded(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
    cmd
}

/// A long-running process whose stdout and stderr go to a log file. Dropping
/// it stops the whole process group and waits for it.
pub struct Process {
    name: String,
    /// The leader's pid, which is also the process group's id.
    pgid: Pid,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .env("RUST_BACKTRACE", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pgid = Pid::from_raw(child.id() as i32);
        Ok(Self {
            name: name.to_owned(),
            pgid,
            child: Some(child),
            log: log.to_owned(),
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if the process has ended.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.status);
        };
        let status = child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        if let Some(status) = status {
            self.status = Some(status);
            self.child = None;
        }
        Ok(status)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// SIGTERM to the process group, then waits up to `grace`; SIGKILL after
    /// that. Returns how the process ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.try_status()?.is_none() {
            self.signal_group(Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while self.try_status()?.is_none() {
                if Instant::now() >= deadline {
                    eprintln!(
                        "{} did not stop within {grace:?} of SIGTERM; killing it",
                        self.name
                    );
                    return self.kill();
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        self.reap_group();
        self.status.context("no exit status")
    }

    /// SIGKILL to the process group, and waits.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal_group(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let status = child
                .wait()
                .with_context(|| format!("waiting for {}", self.name))?;
            self.status = Some(status);
        }
        self.reap_group();
        self.status.context("no exit status")
    }

    /// Sends `signal` to its process group (SIGHUP, say).
    pub fn signal(&self, signal: Signal) {
        self.signal_group(signal);
    }

    fn signal_group(&self, signal: Signal) {
        // ESRCH only means the group is already gone.
        let _ = killpg(self.pgid, signal);
    }

    /// After the leader exits, its group may still hold processes it started
    /// (e.g. a `nix copy` of an agent killed mid-copy): kill them and wait
    /// until the group is empty.
    fn reap_group(&self) {
        if killpg(self.pgid, None).is_err() {
            return;
        }
        self.signal_group(Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while killpg(self.pgid, None).is_ok() {
            if Instant::now() >= deadline {
                eprintln!(
                    "processes of {}'s group {} are still there",
                    self.name, self.pgid
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!("stopping {}: {e:#}", self.name);
        }
    }
}

/// Runs `cmd` to completion, capturing its output; kills it (and its process
/// group) if it runs longer than `timeout`, so a hung client fails the test
/// instead of hanging it.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<CmdOutput> {
    let description = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {description}"))?;
    let pgid = Pid::from_raw(child.id() as i32);
    // Read both pipes while waiting, so a chatty child cannot block on a
    // full pipe.
    let mut stdout = child.stdout.take().context("stdout pipe")?;
    let mut stderr = child.stderr.take().context("stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = killpg(pgid, Signal::SIGKILL);
            break child.wait().context("waiting for a killed child")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever the child left running in its group goes too; otherwise a
    // grandchild holding the pipes open would block the readers forever.
    let _ = killpg(pgid, Signal::SIGKILL);
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let output = CmdOutput {
        command: description,
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    if std::env::var_os("PROCURATOR_TEST_TRACE").is_some() {
        eprintln!(
            "[{:?}, exit {:?}] {}",
            started.elapsed(),
            output.code,
            output.command
        );
    }
    if timed_out {
        bail!("timed out after {timeout:?}: {output}");
    }
    Ok(output)
}
