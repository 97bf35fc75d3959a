//! Real Nix with a configuration of the test's own: every process a test
//! starts gets `NIX_CONF_DIR` (nix.conf of docs NIX-TESTING.md) and its own
//! `XDG_CACHE_HOME`, so nothing depends on /etc/nix or on what another test
//! cached.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::ctl::CmdOutput;
use crate::process::run_with_timeout;

/// The nix.conf every test uses. `build-users-group =` because Debian has no
/// nixbld group; `substituters =` so builds do not wait on cache.nixos.org;
/// busybox as the sandbox's /bin/sh for the fixture's builders.
pub const NIX_CONF: &str = "\
experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
";

/// Nix commands in tests take well under a second; this only catches hangs.
const NIX_TIMEOUT: Duration = Duration::from_secs(300);

pub struct NixEnv {
    conf_dir: PathBuf,
    cache_home: PathBuf,
    _temp: Option<TempDir>,
}

impl NixEnv {
    /// A Nix environment in a temporary directory of its own.
    pub fn temp() -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("procurator-nix-")
            .tempdir()?;
        let mut env = Self::in_dir(temp.path())?;
        env._temp = Some(temp);
        Ok(env)
    }

    /// A Nix environment under `dir` (`dir/nix.conf.d`, `dir/cache`).
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let conf_dir = dir.join("nix.conf.d");
        let cache_home = dir.join("xdg-cache");
        crate::mkdir(&conf_dir)?;
        crate::mkdir(&cache_home)?;
        std::fs::write(conf_dir.join("nix.conf"), NIX_CONF).context("writing nix.conf")?;
        Ok(Self {
            conf_dir,
            cache_home,
            _temp: None,
        })
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// Gives `cmd` this environment.
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("NIX_CONF_DIR", &self.conf_dir)
            .env("XDG_CACHE_HOME", &self.cache_home)
    }

    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.apply(&mut cmd);
        cmd
    }

    /// Runs `program args…`, failing with its stderr if it exits non-zero.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)?;
        if out.code != Some(0) {
            bail!("{out}");
        }
        Ok(out)
    }

    /// `nix eval --json INSTALLABLE`. The exit code is checked before the
    /// output is parsed: a failed evaluation may leave partial JSON.
    pub fn eval_json(&self, installable: &str) -> Result<Value> {
        let out = self.run("nix", ["eval", "--json", installable])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("nix eval printed no JSON: {}", out.stdout))
    }

    /// `nix eval --json INSTALLABLE --apply FUNCTION`.
    pub fn eval_json_apply(&self, installable: &str, function: &str) -> Result<Value> {
        let out = self.run("nix", ["eval", "--json", installable, "--apply", function])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("nix eval printed no JSON: {}", out.stdout))
    }

    /// Builds the installables in one `nix build` and returns their `out`
    /// paths, in Nix's order: Nix 2.8 sorts them, and has no
    /// `--print-out-paths` (the paths come from `--json`).
    pub fn build(&self, installables: &[String]) -> Result<Vec<String>> {
        let mut args = vec![
            "build".to_owned(),
            "--no-link".to_owned(),
            "--json".to_owned(),
        ];
        args.extend(installables.iter().cloned());
        let out = self.run("nix", &args)?;
        let built: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("nix build printed no JSON: {}", out.stdout))?;
        let paths = built
            .as_array()
            .context("nix build --json did not print a list")?
            .iter()
            .map(|b| {
                b.pointer("/outputs/out")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .with_context(|| format!("no outputs.out in {b}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if paths.len() != installables.len() {
            bail!(
                "built {} paths for {} installables",
                paths.len(),
                installables.len()
            );
        }
        Ok(paths)
    }

    /// Every store path in the closure of `path` (`nix-store -qR`).
    pub fn closure(&self, path: &str) -> Result<Vec<String>> {
        let out = self.run("nix-store", ["-qR", path])?;
        Ok(out.stdout.lines().map(str::to_owned).collect())
    }
}
