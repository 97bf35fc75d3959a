//! The swarm's agent processes, seen from `swarm`: start them, read their
//! reports, ask for their counters. Several processes because one may hold
//! at most 20,000 open files here.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::agents::{Behaviour, Counters, Report};

pub struct AgentProcesses {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    reports: mpsc::UnboundedReceiver<Report>,
}

pub struct Layout<'a> {
    pub ca_dir: &'a Path,
    /// Every control plane (replica); agent `i` dials the `i`-th first
    /// (modulo their number), then the others in turn.
    pub urls: &'a [String],
    pub prefix: &'a str,
    pub agents: usize,
    pub per_process: usize,
    pub behaviour: &'a Behaviour,
}

impl AgentProcesses {
    pub fn start(layout: &Layout<'_>) -> Result<Self> {
        let exe = std::env::current_exe().context("locating procurator-bench")?;
        let (tx, reports) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut first = 0;
        while first < layout.agents {
            let count = layout.per_process.min(layout.agents - first);
            let b = layout.behaviour;
            let mut command = Command::new(&exe);
            command
                .arg("swarm-agents")
                .arg("--ca-dir")
                .arg(layout.ca_dir);
            let n = layout.urls.len();
            for url in layout
                .urls
                .iter()
                .cycle()
                .skip(children.len() % n.max(1))
                .take(n)
            {
                command.args(["--url", url]);
            }
            let mut child = command
                .args(["--prefix", layout.prefix])
                .args(["--first", &first.to_string(), "--count", &count.to_string()])
                .args(["--keepalive", &b.keepalive.to_string()])
                .args(["--copy-delay-ms", &b.copy_delay_ms.to_string()])
                .args(["--activation-delay-ms", &b.activation_delay_ms.to_string()])
                .args(["--failure-rate", &b.failure_rate.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} swarm-agents", exe.display()))?;
            let stdout = child.stdout.take().context("no stdout")?;
            stdins.push(child.stdin.take().context("no stdin")?);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Report>(&line) {
                        Ok(report) => {
                            if tx.send(report).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("swarm: an unreadable report {line:?}: {e}"),
                    }
                }
            });
            children.push(child);
            first += count;
        }
        Ok(Self {
            children,
            stdins,
            reports,
        })
    }

    async fn next(&mut self, deadline: Instant, what: &str) -> Result<Report> {
        for child in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("a swarm-agents process exited ({status}) while waiting for {what}");
            }
        }
        match tokio::time::timeout_at(deadline, self.reports.recv()).await {
            Ok(Some(report)) => Ok(report),
            Ok(None) => bail!("the swarm-agents processes closed their output"),
            Err(_) => bail!("timed out waiting for {what}"),
        }
    }

    /// Until every process has issued its certificates and started dialling.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut ready = 0;
        while ready < self.children.len() {
            if let Report::Ready { .. } = self.next(deadline, "the agents' certificates").await? {
                ready += 1;
            }
        }
        Ok(())
    }

    /// When each of `n` agents received `deployment`'s desired state, Unix
    /// microseconds.
    pub async fn desired(
        &mut self,
        deployment: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<u64>> {
        let deadline = Instant::now() + timeout;
        let mut at = Vec::with_capacity(n);
        while at.len() < n {
            let what = format!("desired states ({} of {n} so far)", at.len());
            if let Report::Desired {
                deployment: d,
                at_us,
                ..
            } = self.next(deadline, &what).await?
                && d == deployment
            {
                at.push(at_us);
            }
        }
        Ok(at)
    }

    /// The processes' counters, summed.
    pub async fn counters(&mut self) -> Result<Counters> {
        for stdin in &mut self.stdins {
            stdin.write_all(b"counters\n").await?;
            stdin.flush().await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut total = Counters::default();
        let mut answered = 0;
        while answered < self.children.len() {
            if let Report::Counters(c) = self.next(deadline, "the agents' counters").await? {
                total.dials += c.dials;
                total.dial_failures += c.dial_failures;
                total.refused += c.refused;
                total.confirms += c.confirms;
                total.confirm_failures += c.confirm_failures;
                total.results += c.results;
                total.sessions += c.sessions;
                total.activations += c.activations;
                total.repeats += c.repeats;
                answered += 1;
            }
        }
        Ok(total)
    }

    pub async fn stop(mut self) {
        // End of stdin ends them; kill what does not end at once.
        self.stdins.clear();
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}
