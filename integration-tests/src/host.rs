//! A test host: one machine of the fleet, faked on this one. It has a Nix
//! store of its own (`HOSTDIR/root/nix`) seeded with an "old" closure, and
//! a `/run` of its own (`HOSTDIR/run`, bind-mounted rather than a tmpfs so
//! the test can read where `/run/current-system` points). Its agent runs in
//! a mount and PID namespace with those on `/nix` and `/run`, so the agent's
//! plain `nix` commands and `/run/current-system` are the host's own, and
//! everything the agent starts dies with it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context as _, Result, bail};

use crate::ctl::CmdOutput;
use crate::nixenv::NixEnv;
use crate::pki::Identity;
use crate::process::{Process, STOP_GRACE, guarded};

/// Prepares the namespace, then execs the program: `$1` HOSTDIR, `$2` the
/// initial closure, the rest the command. Links in /run survive an agent
/// restart, as they would on a machine that did not reboot.
const NAMESPACE_SCRIPT: &str = r#"set -e
mount --bind "$1/root/nix" /nix
mount --bind "$1/run" /run
[ -L /run/current-system ] || ln -s "$2" /run/current-system
[ -L /run/booted-system ] || ln -s "$2" /run/booted-system
shift 2
exec "$@"
"#;

/// What an agent is told besides its host.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub control_plane: String,
    pub ca: PathBuf,
    pub identity: Identity,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
}

pub struct TestHost {
    name: String,
    dir: PathBuf,
    initial: String,
    agent: Option<Process>,
    starts: u32,
}

impl TestHost {
    /// A host in `dir` whose store holds `initial` (copied from this
    /// machine's store), whose system profile and boot entry point at it.
    pub fn create(nix: &NixEnv, dir: &Path, name: &str, initial: &str) -> Result<Self> {
        let root = dir.join("root");
        for sub in [root.clone(), dir.join("run"), dir.join("state")] {
            crate::mkdir(&sub)?;
        }
        // Paths built here carry no signature; the seed is the harness's
        // doing, not something an agent would accept.
        let root_arg = root.to_string_lossy().into_owned();
        nix.run(
            "nix",
            [
                "copy",
                "--no-check-sigs",
                "--to",
                root_arg.as_str(),
                initial,
            ],
        )
        .with_context(|| format!("seeding {name}'s store"))?;
        let host = Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            initial: initial.to_owned(),
            agent: None,
            starts: 0,
        };
        // As nix-env would leave them after `--set`, so a profile that "did
        // not move" is one that still says generation 1.
        let profiles = host.host_path("/nix/var/nix/profiles");
        crate::mkdir(&profiles)?;
        symlink(Path::new(initial), &profiles.join("system-1-link"))?;
        symlink(Path::new("system-1-link"), &profiles.join("system"))?;
        let boot = host.host_path("/nix/var/nix/procurator-test");
        crate::mkdir(&boot)?;
        symlink(Path::new(initial), &boot.join("boot-entry"))?;
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The closure the host started with.
    pub fn initial(&self) -> &str {
        &self.initial
    }

    /// `unshare … sh -c NAMESPACE_SCRIPT sh HOSTDIR INITIAL PROGRAM ARGS…`,
    /// unstarted. `--kill-child` plus the PID namespace: when unshare dies,
    /// everything inside dies too.
    pub fn namespaced(&self, nix: &NixEnv, program: &Path) -> Command {
        let mut cmd = guarded(Path::new("unshare"));
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--mount-proc",
            "--kill-child",
            "--",
        ])
        .args(["sh", "-c", NAMESPACE_SCRIPT, "sh"])
        .arg(&self.dir)
        .arg(&self.initial)
        .arg(program);
        nix.apply(&mut cmd);
        cmd
    }

    /// Runs a command on the host (inside its namespace) to completion.
    pub fn run(&self, nix: &NixEnv, program: &str, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = self.namespaced(nix, Path::new(program));
        cmd.args(args);
        crate::process::run_with_timeout(cmd, std::time::Duration::from_secs(120))
    }

    /// Starts `procurator-agent` on this host.
    pub fn start_agent(&mut self, nix: &NixEnv, opts: &AgentOptions) -> Result<()> {
        if self.agent.as_mut().is_some_and(Process::is_running) {
            bail!("{}'s agent is already running", self.name);
        }
        let mut cmd = self.namespaced(nix, &crate::bin("procurator-agent")?);
        cmd.arg("--control-plane")
            .arg(&opts.control_plane)
            .arg("--tls-ca")
            .arg(&opts.ca)
            .arg("--tls-cert")
            .arg(&opts.identity.cert)
            .arg("--tls-key")
            .arg(&opts.identity.key)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            // Reconnect quickly after a control-plane restart.
            .args(["--max-backoff", "2"]);
        for s in &opts.substituters {
            cmd.arg("--substituter").arg(s);
        }
        for k in &opts.trusted_public_keys {
            cmd.arg("--trusted-public-key").arg(k);
        }
        self.starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        self.agent = Some(Process::spawn(
            &format!("agent of {}", self.name),
            cmd,
            &log,
        )?);
        Ok(())
    }

    /// SIGTERM to the agent (and what it started); how it exited.
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        let mut agent = self.agent.take().context("no agent is running")?;
        agent.stop(STOP_GRACE)
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(Process::is_running)
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Process::log).unwrap_or_default()
    }

    pub fn agent_log_path(&self) -> Option<&Path> {
        self.agent.as_ref().map(Process::log_path)
    }

    /// Where `/run/current-system` points, as a store path.
    pub fn current_system(&self) -> Result<Option<String>> {
        self.resolve("/run/current-system")
    }

    pub fn booted_system(&self) -> Result<Option<String>> {
        self.resolve("/run/booted-system")
    }

    /// Where the system profile points (through its generation link).
    pub fn system_profile(&self) -> Result<Option<String>> {
        self.resolve("/nix/var/nix/profiles/system")
    }

    /// The generation link the system profile names, e.g. `system-2-link`.
    pub fn system_generation(&self) -> Result<String> {
        let link = self.host_path("/nix/var/nix/profiles/system");
        Ok(std::fs::read_link(&link)
            .with_context(|| format!("reading {}", link.display()))?
            .to_string_lossy()
            .into_owned())
    }

    /// The closure `switch-to-configuration boot` recorded.
    pub fn boot_entry(&self) -> Result<Option<String>> {
        self.resolve("/nix/var/nix/procurator-test/boot-entry")
    }

    /// Whether the host's own store holds `store_path`.
    pub fn has_path(&self, store_path: &str) -> bool {
        self.host_path(store_path).exists()
    }

    /// The file outside the namespace that is `path` inside it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        if let Some(rest) = path.strip_prefix("/nix/") {
            self.dir.join("root/nix").join(rest)
        } else if let Some(rest) = path.strip_prefix("/run/") {
            self.dir.join("run").join(rest)
        } else {
            PathBuf::from(path)
        }
    }

    /// Follows symlinks as the host sees them until a top-level store path;
    /// `None` when a link is missing.
    fn resolve(&self, path: &str) -> Result<Option<String>> {
        let mut current = PathBuf::from(path);
        for _ in 0..40 {
            if let Some(store_path) = top_level_store_path(&current) {
                return Ok(Some(store_path));
            }
            let outside = self.host_path(&current.to_string_lossy());
            let target = match std::fs::read_link(&outside) {
                Ok(target) => target,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(e).with_context(|| format!("reading link {}", outside.display()));
                }
            };
            current = if target.is_absolute() {
                target
            } else {
                current.parent().unwrap_or(Path::new("/")).join(target)
            };
        }
        bail!("{path} on {}: too many levels of symlinks", self.name)
    }
}

/// `/nix/store/<hash>-<name>` itself, not something inside it.
fn top_level_store_path(path: &Path) -> Option<String> {
    let rest = path.strip_prefix("/nix/store").ok()?;
    let mut parts = rest.components();
    let name = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some(
        Path::new("/nix/store")
            .join(name)
            .to_string_lossy()
            .into_owned(),
    )
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
