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

/// The namespace's init when the agent is supervised: it restarts the agent
/// whenever it exits, as systemd's `Restart=always` would, and writes the
/// running agent's pid to /run/procurator-agent.pid (what the fixture's
/// `restartAgent` kills, and what crash tests SIGKILL). `$1` is where each
/// run's log goes (`N` is appended), the rest is the agent's command line.
const SUPERVISOR_SCRIPT: &str = r#"log="$1"; shift
trap 'kill -TERM "$pid" 2>/dev/null; exit 0' TERM INT
n=0
while :; do
  n=$((n + 1))
  "$@" >>"$log.$n" 2>&1 &
  pid=$!
  echo "$pid" > /run/procurator-agent.pid
  echo "$n" > /run/procurator-agent.runs
  wait "$pid" || true
  sleep 0.2
done
"#;

/// What an agent is told besides its host.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub control_plane: String,
    pub ca: PathBuf,
    /// Its certificate; `None` for an agent that enrolls (`--join-token`
    /// in `extra_args`) and keeps its own in its state directory.
    pub identity: Option<Identity>,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Appended to the agent's command line, e.g. `--vm-host`.
    pub extra_args: Vec<String>,
}

pub struct TestHost {
    name: String,
    dir: PathBuf,
    initial: String,
    agent: Option<Process>,
    starts: u32,
    /// The network namespace the host lives in (`ip netns`), if not this
    /// machine's own network.
    netns: Option<String>,
    /// Whether the agent runs under [`SUPERVISOR_SCRIPT`].
    supervised: bool,
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
            netns: None,
            supervised: false,
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

    /// Links /run/current-system and /run/booted-system to the initial
    /// closure now, as on a machine that booted, rather than when its agent
    /// first starts: a fleet reads the hosts of agents never started too.
    pub fn boot(&self) -> Result<()> {
        for link in ["/run/current-system", "/run/booted-system"] {
            let path = self.host_path(link);
            if std::fs::symlink_metadata(&path).is_err() {
                symlink(Path::new(&self.initial), &path)?;
            }
        }
        Ok(())
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

    /// Puts the host (its agent and every command run on it from now on)
    /// into the network namespace `netns`, which the caller made. The
    /// marker file tells the fixture's activation it may change this
    /// namespace's firewall.
    pub fn set_netns(&mut self, netns: &str) -> Result<()> {
        self.netns = Some(netns.to_owned());
        let marker = self.dir.join("run/procurator-test");
        crate::mkdir(&marker)?;
        std::fs::write(marker.join("own-netns"), format!("{netns}\n"))
            .context("writing the own-netns marker")
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs the agent under a supervisor that restarts it whenever it
    /// exits (see [`SUPERVISOR_SCRIPT`]); takes effect at the next start.
    pub fn set_supervised(&mut self, supervised: bool) {
        self.supervised = supervised;
    }

    /// The pid (in the host's PID namespace) of the agent the supervisor
    /// runs now, and how many times it started it.
    pub fn supervised_agent(&self) -> Option<(u32, u32)> {
        let read = |name: &str| -> Option<u32> {
            std::fs::read_to_string(self.dir.join("run").join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some((
            read("procurator-agent.pid")?,
            read("procurator-agent.runs")?,
        ))
    }

    /// `unshare … sh -c NAMESPACE_SCRIPT sh HOSTDIR INITIAL PROGRAM ARGS…`,
    /// unstarted (under `ip netns exec NS` for a host in its own network).
    /// `--kill-child` plus the PID namespace: when unshare dies, everything
    /// inside dies too.
    pub fn namespaced(&self, nix: &NixEnv, program: &Path) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = guarded(Path::new("ip"));
                cmd.args(["netns", "exec", ns, "unshare"]);
                cmd
            }
            None => guarded(Path::new("unshare")),
        };
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
        let agent = crate::bin("procurator-agent")?;
        self.starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        let mut cmd = if self.supervised {
            let mut cmd = self.namespaced(nix, Path::new("sh"));
            cmd.args(["-c", SUPERVISOR_SCRIPT, "supervisor"])
                .arg(self.dir.join(format!("agent-{}.run", self.starts)))
                .arg(&agent);
            cmd
        } else {
            self.namespaced(nix, &agent)
        };
        cmd.arg("--control-plane")
            .arg(&opts.control_plane)
            .arg("--tls-ca")
            .arg(&opts.ca);
        if let Some(identity) = &opts.identity {
            cmd.arg("--tls-cert")
                .arg(&identity.cert)
                .arg("--tls-key")
                .arg(&identity.key);
        }
        cmd.arg("--state-dir")
            .arg(self.dir.join("state"))
            // Reconnect quickly after a control-plane restart.
            .args(["--max-backoff", "2"]);
        for s in &opts.substituters {
            cmd.arg("--substituter").arg(s);
        }
        for k in &opts.trusted_public_keys {
            cmd.arg("--trusted-public-key").arg(k);
        }
        cmd.args(&opts.extra_args);
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
        let mut log = self.agent.as_ref().map(Process::log).unwrap_or_default();
        for run in self.supervised_logs() {
            log.push_str(&format!("=== {}\n", run.display()));
            log.push_str(&std::fs::read_to_string(&run).unwrap_or_default());
        }
        log
    }

    /// The logs of each run of a supervised agent, oldest first.
    pub fn supervised_logs(&self) -> Vec<PathBuf> {
        let prefix = format!("agent-{}.run.", self.starts);
        let mut runs: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        runs.sort();
        runs.into_iter().map(|(_, p)| p).collect()
    }

    /// SIGKILLs the agent a supervisor runs (found from outside through its
    /// `--state-dir` and its pid inside the host's PID namespace), as a
    /// crash or the OOM killer would; returns the run number killed.
    pub fn kill_supervised_agent(&self) -> Result<u32> {
        let (inner, run) = self
            .supervised_agent()
            .context("no supervised agent has started")?;
        let state_dir = self.dir.join("state");
        let state_dir = state_dir.to_string_lossy();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_ours = args
                .first()
                .is_some_and(|a| a.ends_with("procurator-agent"))
                && args
                    .windows(2)
                    .any(|w| w[0] == "--state-dir" && w[1] == state_dir);
            if !is_ours {
                continue;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let ns_pid = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if ns_pid == Some(inner) {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .with_context(|| format!("killing {}'s agent (pid {pid})", self.name))?;
                return Ok(run);
            }
        }
        bail!(
            "{}'s supervised agent (pid {inner} inside) is not running",
            self.name
        )
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

    /// Panics unless the host runs `closure` and its system profile (at
    /// generation link `generation`, e.g. `system-2-link`) and boot entry
    /// point at it too: what "on exactly this closure" means for a test.
    pub fn assert_on(&self, closure: &str, generation: &str) {
        let name = self.name();
        let want = Some(closure);
        let read = |what: &str, value: Result<Option<String>>| {
            value.unwrap_or_else(|e| panic!("{name}: reading the {what}: {e:#}"))
        };
        assert_eq!(
            read("current system", self.current_system()).as_deref(),
            want,
            "{name}: /run/current-system"
        );
        assert_eq!(
            read("system profile", self.system_profile()).as_deref(),
            want,
            "{name}: system profile"
        );
        assert_eq!(
            self.system_generation()
                .unwrap_or_else(|e| panic!("{name}: {e:#}")),
            generation,
            "{name}: system profile generation"
        );
        assert_eq!(
            read("boot entry", self.boot_entry()).as_deref(),
            want,
            "{name}: boot entry"
        );
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
