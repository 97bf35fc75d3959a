//! The control plane under measurement as a whole: one process on SQLite,
//! or `--replicas N` processes on one PostgreSQL database that the bench
//! starts itself (fsync on, as a real server runs). Memory and CPU are
//! summed over the processes, PostgreSQL's CPU included; connected agents
//! over the replicas that run.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use procurator_integration_tests::postgres::Postgres;
use tokio::time::Instant;

use super::plane::{ControlPlane, cpu_seconds_of_tree};

pub struct Planes {
    pub replicas: Vec<ControlPlane>,
    /// Dropped after the replicas (field order): stopped and removed.
    pub postgres: Option<Postgres>,
}

impl Planes {
    /// `replicas` control planes, on PostgreSQL when `postgres`, each in a
    /// folder of its own under `dir`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        pki: &Path,
        keepalive: u64,
        replicas: usize,
        postgres: bool,
    ) -> Result<Self> {
        let (postgres, extra) = if postgres {
            let pg = Postgres::start_durable()?;
            pg.psql("postgres", "CREATE DATABASE procurator")?;
            let url = pg.url("procurator");
            (Some(pg), vec!["--database".to_owned(), url])
        } else {
            (None, Vec::new())
        };
        let mut planes = Self {
            replicas: Vec::new(),
            postgres,
        };
        for i in 0..replicas {
            let dir = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir)?;
            planes
                .replicas
                .push(ControlPlane::start(bin, &dir, pki, keepalive, &extra).await?);
        }
        Ok(planes)
    }

    pub fn first(&self) -> &ControlPlane {
        &self.replicas[0]
    }

    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(ControlPlane::url).collect()
    }

    /// Resident memory of every replica that runs, KiB.
    pub fn rss_kib(&mut self) -> Result<u64> {
        self.running().map(ControlPlane::rss_kib).sum()
    }

    pub fn rss_peak_kib(&mut self) -> Result<u64> {
        self.running().map(ControlPlane::rss_peak_kib).sum()
    }

    /// CPU seconds of the replicas that run, and of PostgreSQL.
    pub fn cpu_seconds(&mut self) -> Result<f64> {
        let mut total: f64 = self
            .running()
            .map(ControlPlane::cpu_seconds)
            .sum::<Result<f64>>()?;
        if let Some(pg) = &self.postgres {
            total += cpu_seconds_of_tree(pg.postmaster_pid()?)?;
        }
        Ok(total)
    }

    /// A counter summed over the replicas that run.
    pub async fn counter(&mut self, name: &str) -> Result<f64> {
        let mut total = 0.0;
        for plane in self.running_mut() {
            total += plane.counter(name).await?;
        }
        Ok(total)
    }

    /// Until the replicas that run hold `n` agents' streams between them.
    pub async fn wait_connected(&mut self, n: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            // Alone, the store's count is its own (and older control
            // planes, measured for comparison, have only that one).
            let metric = if self.replicas.len() == 1 {
                "procurator_connected_agents"
            } else {
                "procurator_agent_streams"
            };
            let mut connected = 0.0;
            for plane in self.running_mut() {
                connected += plane.metric(metric).await?;
            }
            if connected >= n as f64 {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!("only {connected} of {n} agents connected within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(&mut self) -> Result<()> {
        let mut result = Ok(());
        for plane in &mut self.replicas {
            if let Err(e) = plane.stop().await {
                result = Err(e);
            }
        }
        result
    }

    fn running(&mut self) -> impl Iterator<Item = &ControlPlane> {
        self.replicas
            .iter_mut()
            .filter_map(|p| p.running().then_some(&*p))
    }

    fn running_mut(&mut self) -> impl Iterator<Item = &mut ControlPlane> {
        self.replicas
            .iter_mut()
            .filter_map(|p| p.running().then_some(p))
    }
}
