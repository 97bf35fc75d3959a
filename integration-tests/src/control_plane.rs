//! `procurator-control-plane` on 127.0.0.1, restartable on the same address
//! and data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::nixenv::NixEnv;
use crate::pki::Pki;
use crate::process::{Process, STOP_GRACE, guarded};

/// How long the control plane may take to write its ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ControlPlane {
    dir: PathBuf,
    pki: Pki,
    process: Option<Process>,
    addr: Option<SocketAddr>,
    starts: u32,
    /// The network namespace it runs in, if not this machine's network.
    netns: Option<String>,
    /// More arguments, from the next start on ([`Self::restart_with`]).
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane listening on `127.0.0.1:0`, with its data in
    /// `dir/data`, and waits until it is serving (its `--ready-file`).
    pub fn start(nix: &NixEnv, dir: &Path, pki: &Pki) -> Result<Self> {
        Self::start_in(nix, dir, pki, None, "127.0.0.1:0")
    }

    /// [`Self::start`] with more arguments, e.g. `--database URL` for
    /// another replica on a shared store.
    pub fn start_with(nix: &NixEnv, dir: &Path, pki: &Pki, args: &[&str]) -> Result<Self> {
        let mut cp = Self::new(dir, pki, None, args)?;
        cp.spawn(nix, "127.0.0.1:0")?;
        Ok(cp)
    }

    /// Starts it inside the network namespace `netns` (if any), listening
    /// on `listen` (an address of that namespace, port 0).
    pub fn start_in(
        nix: &NixEnv,
        dir: &Path,
        pki: &Pki,
        netns: Option<&str>,
        listen: &str,
    ) -> Result<Self> {
        let mut cp = Self::new(dir, pki, netns, &[])?;
        cp.spawn(nix, listen)?;
        Ok(cp)
    }

    fn new(dir: &Path, pki: &Pki, netns: Option<&str>, args: &[&str]) -> Result<Self> {
        crate::mkdir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            pki: pki.clone(),
            process: None,
            addr: None,
            starts: 0,
            netns: netns.map(str::to_owned),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        })
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    fn spawn(&mut self, nix: &NixEnv, listen: &str) -> Result<()> {
        let ready = self.dir.join("ready");
        match std::fs::remove_file(&ready) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("removing the old ready file");
            }
            _ => {}
        }
        let server = self.pki.control_plane();
        let bin = crate::bin("procurator-control-plane")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = guarded(Path::new("ip"));
                cmd.args(["netns", "exec", ns]).arg(&bin);
                cmd
            }
            None => guarded(&bin),
        };
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--tls-ca")
            .arg(self.pki.ca())
            .arg("--tls-cert")
            .arg(&server.cert)
            .arg("--tls-key")
            .arg(&server.key)
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args);
        nix.apply(&mut cmd);
        self.starts += 1;
        let log = self.dir.join(format!("control-plane-{}.log", self.starts));
        let mut process = Process::spawn("procurator-control-plane", cmd, &log)?;
        let addr = crate::wait_for("the control plane's ready file", READY_TIMEOUT, || {
            if let Some(status) = process.try_status()? {
                bail!(
                    "procurator-control-plane exited ({status}) before it was ready:\n{}",
                    crate::log_tail(&log, 40)
                );
            }
            // Written atomically, so a present file is a complete one.
            match std::fs::read_to_string(&ready) {
                Ok(text) => {
                    let addr = text
                        .trim()
                        .parse::<SocketAddr>()
                        .with_context(|| format!("the ready file holds {text:?}, not HOST:PORT"))?;
                    Ok(Some(addr))
                }
                Err(_) => Ok(None),
            }
        })
        .with_context(|| format!("log:\n{}", crate::log_tail(&log, 40)))?;
        self.process = Some(process);
        self.addr = Some(addr);
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn addr(&self) -> Result<SocketAddr> {
        self.addr.context("the control plane has not started")
    }

    /// `https://127.0.0.1:PORT`, as clients and agents are given it.
    pub fn url(&self) -> Result<String> {
        Ok(format!("https://{}", self.addr()?))
    }

    /// `127.0.0.1:PORT`, as grpcurl wants it.
    pub fn host_port(&self) -> Result<String> {
        Ok(self.addr()?.to_string())
    }

    /// SIGKILL, as a crash would: no shutdown code runs.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut process = self
            .process
            .take()
            .context("the control plane is not running")?;
        process.kill()
    }

    /// Starts it again after [`Self::kill`] or [`Self::stop`], on the same
    /// address and data directory.
    pub fn start_again(&mut self, nix: &NixEnv) -> Result<()> {
        anyhow::ensure!(self.process.is_none(), "the control plane is running");
        let listen = self.host_port()?;
        self.spawn(nix, &listen)
    }

    /// SIGHUP: it reloads its TLS material.
    pub fn hangup(&self) -> Result<()> {
        self.process
            .as_ref()
            .context("the control plane is not running")?
            .signal(nix::sys::signal::Signal::SIGHUP);
        Ok(())
    }

    /// SIGTERM; returns how it exited (SIGKILL after a grace period).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut process = self
            .process
            .take()
            .context("the control plane is not running")?;
        process.stop(STOP_GRACE)
    }

    /// Starts it again on the address it had, with the same data directory,
    /// so agents configured with its URL reconnect.
    pub fn restart(&mut self, nix: &NixEnv) -> Result<()> {
        if self.process.is_some() {
            self.stop()?;
        }
        let listen = self.host_port()?;
        self.spawn(nix, &listen)
    }

    /// [`Self::restart`] with `args` added to its command line, then and on
    /// every later start.
    pub fn restart_with(&mut self, nix: &NixEnv, args: &[&str]) -> Result<()> {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self.restart(nix)
    }

    /// Everything it logged since it last started.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("control-plane-{}.log", self.starts))
    }
}
