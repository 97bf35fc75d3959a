//! The fixture flake (`fixtures/fleet`), copied into a test's own directory
//! so the test can write its own `settings.json`: no git there, so it is a
//! plain `path:` flake that sees every file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::nixenv::NixEnv;
use crate::pki::SigningKey;

/// Machine name -> system closure.
pub type Closures = BTreeMap<String, String>;

pub struct Fixture {
    dir: PathBuf,
    /// The machines [`Fixture::build`] builds ([`crate::MACHINES`] for the
    /// fixture fleet).
    machines: Vec<String>,
    /// Baked into every store path the fixture builds, so tests running at
    /// the same time never share a path (and never see each other's
    /// signatures on it in the host's store).
    nonce: String,
}

impl Fixture {
    /// Copies the fixture flake into `dir`.
    pub fn copy_to(dir: &Path) -> Result<Self> {
        let machines: Vec<String> = crate::MACHINES.iter().map(|m| m.to_string()).collect();
        Self::copy_from(&crate::fixture_source(), dir, &machines)
    }

    /// Copies another fixture flake (`flake.nix`, `procurator-lib.nix` and
    /// its default `settings.json` in `source`, e.g. `fixtures/bench-fleet`)
    /// into `dir`; [`Fixture::build`] builds `machines`, which the flake's
    /// settings must define.
    pub fn copy_from(source: &Path, dir: &Path, machines: &[String]) -> Result<Self> {
        crate::mkdir(dir)?;
        // `procurator-lib.nix` links to nix/lib.nix; `fs::copy` follows it.
        for file in ["flake.nix", "procurator-lib.nix"] {
            std::fs::copy(source.join(file), dir.join(file))
                .with_context(|| format!("copying {file} from {}", source.display()))?;
        }
        let fixture = Self {
            dir: dir.to_owned(),
            machines: machines.to_vec(),
            nonce: unique_nonce(dir),
        };
        let defaults = std::fs::read(source.join("settings.json"))
            .context("reading the fixture's settings.json")?;
        fixture.write_settings(&serde_json::from_slice(&defaults)?)?;
        Ok(fixture)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machines [`Fixture::build`] builds.
    pub fn machines(&self) -> &[String] {
        &self.machines
    }

    fn flake_ref(&self) -> String {
        format!("path:{}", self.dir.display())
    }

    /// Writes `settings.json`, e.g.
    /// `{"generation": 2, "machines": {"worker-2": {"health": "broken"}}}`,
    /// with this fixture's nonce added.
    pub fn write_settings(&self, settings: &Value) -> Result<()> {
        let mut settings = settings.clone();
        if let Some(object) = settings.as_object_mut() {
            object
                .entry("nonce")
                .or_insert_with(|| Value::String(self.nonce.clone()));
        }
        std::fs::write(
            self.dir.join("settings.json"),
            serde_json::to_vec_pretty(&settings)?,
        )
        .context("writing settings.json")
    }

    /// `nix eval --json path:DIR#blueprintJSON`.
    pub fn blueprint(&self, nix: &NixEnv) -> Result<Value> {
        nix.eval_json(&format!("{}#blueprintJSON", self.flake_ref()))
    }

    /// Copies `from` into the flake as `to` (a path relative to the flake),
    /// for files a fixture needs but git does not hold.
    pub fn add_file(&self, from: &Path, to: &Path) -> Result<()> {
        let dest = self.dir.join(to);
        if let Some(parent) = dest.parent() {
            crate::mkdir(parent)?;
        }
        std::fs::copy(from, &dest)
            .map(drop)
            .with_context(|| format!("copying {} into the fixture flake", from.display()))
    }

    /// Builds every machine's toplevel with the current settings.
    pub fn build(&self, nix: &NixEnv) -> Result<Closures> {
        self.build_machines(nix, &self.machines)
    }

    /// Builds the toplevels of `machines`, which the flake's current
    /// settings must define.
    pub fn build_machines(&self, nix: &NixEnv, machines: &[String]) -> Result<Closures> {
        let installables: Vec<String> = machines
            .iter()
            .map(|m| {
                format!(
                    "{}#nixosConfigurations.{m}.config.system.build.toplevel",
                    self.flake_ref()
                )
            })
            .collect();
        // `nix build` does not say which path is whose: evaluate each
        // machine's path first, then check the build made exactly those.
        let names = serde_json::to_string(machines)?;
        let evaluated = nix.eval_json_apply(
            &format!("{}#nixosConfigurations", self.flake_ref()),
            &format!(
                "configs: map (name: configs.${{name}}.config.system.build.toplevel.outPath) \
                 (builtins.fromJSON ''{names}'')"
            ),
        )?;
        let paths: Vec<String> = serde_json::from_value(evaluated)
            .context("the toplevels' paths are not a list of strings")?;
        let mut built = nix.build(&installables)?;
        let mut expected = paths.clone();
        built.sort();
        expected.sort();
        if built != expected {
            bail!("nix build made {built:?}, but the machines evaluate to {expected:?}");
        }
        Ok(machines.iter().cloned().zip(paths).collect())
    }

    /// Writes `settings`, then builds.
    pub fn build_with(&self, nix: &NixEnv, settings: &Value) -> Result<Closures> {
        self.write_settings(settings)?;
        self.build(nix)
    }
}

/// A nonce unique to this process and directory: the pid tells concurrent
/// test binaries apart, the temp dir's name tells tests of one binary apart.
fn unique_nonce(dir: &Path) -> String {
    let tag: String = dir
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .rev()
        .take(24)
        .collect();
    format!("p{}-{tag}", std::process::id())
}

/// `nix copy --to file://CACHE[?secret-key=…] PATHS…`: publishes closures
/// to a binary cache, signed when a key is given.
pub fn publish(
    nix: &NixEnv,
    cache: &Path,
    key: Option<&SigningKey>,
    closures: &Closures,
) -> Result<()> {
    let mut to = format!("file://{}", cache.display());
    if let Some(key) = key {
        to.push_str(&format!("?secret-key={}", key.secret.display()));
    }
    let mut args = vec!["copy".to_owned(), "--to".to_owned(), to];
    args.extend(closures.values().cloned());
    nix.run("nix", &args)
        .context("publishing closures to the binary cache")?;
    Ok(())
}

/// The deployment artifact: `{gitCommit, blueprint, closures}`.
pub fn deployment(commit: &str, blueprint: &Value, closures: &Closures) -> Value {
    json!({ "gitCommit": commit, "blueprint": blueprint, "closures": closures })
}
