//! The real control plane binary under measurement: started on a fresh
//! store (SQLite, or a replica on PostgreSQL), restarted on the same ports
//! or killed, read through /proc and its Prometheus endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ControlPlane {
    bin: PathBuf,
    dir: PathBuf,
    pki: PathBuf,
    keepalive: u64,
    /// More arguments (`--database URL`).
    extra: Vec<String>,
    /// `127.0.0.1:0` until the first start picked the ports; then kept, so
    /// agents find a restarted control plane where they left it.
    listen: SocketAddr,
    metrics: SocketAddr,
    child: Child,
    starts: u32,
}

impl ControlPlane {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        pki: &Path,
        keepalive: u64,
        extra: &[String],
    ) -> Result<Self> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let child = spawn(bin, dir, pki, keepalive, extra, any, any, 0)?;
        let mut plane = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            pki: pki.to_owned(),
            keepalive,
            extra: extra.to_vec(),
            listen: any,
            metrics: any,
            child,
            starts: 0,
        };
        plane.wait_ready().await?;
        Ok(plane)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("the control plane has exited")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("control-plane-{}.log", self.starts))
    }

    /// SIGTERM (the control plane drains and exits), then start again on
    /// the same ports and store. Returns when the new process was spawned,
    /// and how long none was listening (SIGTERM to the new one's ready file).
    pub async fn restart(&mut self) -> Result<(Instant, Duration)> {
        let signalled = Instant::now();
        self.stop().await?;
        self.starts += 1;
        self.child = spawn(
            &self.bin,
            &self.dir,
            &self.pki,
            self.keepalive,
            &self.extra,
            self.listen,
            self.metrics,
            self.starts,
        )?;
        let spawned = Instant::now();
        self.wait_ready().await?;
        Ok((spawned, signalled.elapsed()))
    }

    /// SIGKILL, as a crash would; waits until it is gone.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await.context("killing the control plane")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn stop(&mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                status.context("waiting for the control plane")?;
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the control plane did not stop within {STOP_TIMEOUT:?} of SIGTERM; see {}",
                    self.log().display()
                )
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let ready = self.dir.join("ready");
        let metrics_ready = self.dir.join("metrics-ready");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the control plane exited ({status}) while starting; see {}",
                    self.log().display()
                );
            }
            if let (Ok(a), Ok(m)) = (
                std::fs::read_to_string(&ready),
                std::fs::read_to_string(&metrics_ready),
            ) {
                self.listen = a.trim().parse().context("the ready file")?;
                self.metrics = m.trim().parse().context("the metrics ready file")?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the control plane was not ready within {START_TIMEOUT:?}; see {}",
                    self.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        self.status_kib("VmRSS")
    }

    /// The most resident memory so far, KiB.
    pub fn rss_peak_kib(&self) -> Result<u64> {
        self.status_kib("VmHWM")
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }

    /// CPU time used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds_of(self.pid()?)
    }

    /// One sample (no labels) from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.scrape().await?;
        text.lines()
            .find_map(|line| {
                let (metric, value) = line.split_once(' ')?;
                (metric == name).then(|| value.trim().parse().ok())?
            })
            .with_context(|| format!("{name} is not in the control plane's /metrics"))
    }

    /// A counter that may not have been created yet (a label value nothing
    /// has been counted under is absent, not zero).
    pub async fn counter(&self, name: &str) -> Result<f64> {
        let text = self.scrape().await?;
        Ok(text
            .lines()
            .find_map(|line| {
                let (metric, value) = line.split_once(' ')?;
                (metric == name).then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0.0))
    }

    async fn scrape(&self) -> Result<String> {
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .with_context(|| format!("connecting to the metrics endpoint {}", self.metrics))?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("a malformed HTTP response from /metrics")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "/metrics answered {}",
                head.lines().next().unwrap_or_default()
            );
        }
        Ok(body.to_owned())
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    bin: &Path,
    dir: &Path,
    pki: &Path,
    keepalive: u64,
    extra: &[String],
    listen: SocketAddr,
    metrics: SocketAddr,
    start: u32,
) -> Result<Child> {
    for ready in ["ready", "metrics-ready"] {
        let _ = std::fs::remove_file(dir.join(ready));
    }
    let log = std::fs::File::create(dir.join(format!("control-plane-{start}.log")))?;
    // Killed with the benchmark, even when it dies without cleaning up.
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(bin)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--tls-ca")
        .arg(pki.join("ca.crt"))
        .arg("--tls-cert")
        .arg(pki.join("control-plane.crt"))
        .arg("--tls-key")
        .arg(pki.join("control-plane.key"))
        .arg("--ready-file")
        .arg(dir.join("ready"))
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .arg("--metrics-ready-file")
        .arg(dir.join("metrics-ready"))
        .arg("--keepalive")
        .arg(keepalive.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// CPU time process `pid` used so far (user + system), in seconds.
pub fn cpu_seconds_of(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces, in parentheses.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of the whole line.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((field(11)? + field(12)?) / hz)
}

/// CPU time of PostgreSQL: the postmaster `pid` and every process it
/// started (backends, writer, checkpointer, WAL writer), in seconds.
pub fn cpu_seconds_of_tree(pid: u32) -> Result<f64> {
    let mut total = cpu_seconds_of(pid)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The parent is the second field after the command name.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) {
            total += cpu_seconds_of(child).unwrap_or(0.0);
        }
    }
    Ok(total)
}
