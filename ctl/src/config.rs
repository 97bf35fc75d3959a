//! Named contexts: `$XDG_CONFIG_HOME/procurator/config.toml` (or
//! `PROCURATOR_CONFIG`) holds the connection settings of each fleet an
//! operator works with. A flag wins over its environment variable, which
//! wins over the context; `procurator-ctl config show` says where each
//! setting came from.
//!
//! ```toml
//! current-context = "prod"
//!
//! [contexts.prod]
//! control-plane = ["https://cp-1.example:7700", "https://cp-2.example:7700"]
//! tls-ca = "prod/ca.crt"          # relative: to this file's folder
//! tls-cert = "~/.procurator/operator-alice.crt"
//! tls-key = "~/.procurator/operator-alice.key"
//! intent-key = "~/.procurator/ops.secret"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use serde::Deserialize;

/// The config file is read whole: more than this is not a config file.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    current_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context>,
}

/// One fleet's settings, as the file holds them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    #[serde(default, deserialize_with = "one_or_many")]
    pub control_plane: Vec<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub intent_key: Option<PathBuf>,
}

/// `control-plane = "URL"` or `control-plane = ["URL", …]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

/// Where one setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    Context { name: String, file: PathBuf },
    Unset,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "{flag}"),
            Source::Env(var) => write!(f, "${var}"),
            Source::Context { name, file } => write!(f, "context {name} in {}", file.display()),
            Source::Unset => write!(f, "unset"),
        }
    }
}

/// The settings a context may give, with their flag and variable names.
pub const SETTINGS: [(&str, &str, &str); 5] = [
    (
        "control_plane",
        "--control-plane",
        "PROCURATOR_CONTROL_PLANE",
    ),
    ("tls_ca", "--tls-ca", "PROCURATOR_TLS_CA"),
    ("tls_cert", "--tls-cert", "PROCURATOR_TLS_CERT"),
    ("tls_key", "--tls-key", "PROCURATOR_TLS_KEY"),
    ("intent_key", "--intent-key", "PROCURATOR_INTENT_KEY"),
];

/// The chosen context and where each setting came from.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// The config file looked at, whether or not it exists.
    pub file: Option<PathBuf>,
    /// The context in use and what chose it.
    pub context: Option<(String, String)>,
    pub sources: BTreeMap<&'static str, Source>,
    /// The intent key in use, for `config show` (the commands that sign
    /// hold theirs in their own arguments).
    pub intent_key: Option<PathBuf>,
}

/// The config file's path: `PROCURATOR_CONFIG`, else
/// `$XDG_CONFIG_HOME/procurator/config.toml`, else `~/.config/…`.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = env("PROCURATOR_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let base = env("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("procurator").join("config.toml"))
}

/// Reads the file, if there is one; a file that is there and wrong is an error.
fn read(path: &Path) -> anyhow::Result<Option<ConfigFile>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if meta.len() > MAX_CONFIG_BYTES {
        bail!(
            "{} is {} bytes: more than a config file holds (at most {MAX_CONFIG_BYTES})",
            path.display(),
            meta.len()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ConfigFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid config file", path.display()))?;
    Ok(Some(file))
}

/// The context to use — `--context` or `PROCURATOR_CONTEXT` (`chosen`,
/// with what chose it), else the file's `current-context` — with its
/// relative paths made absolute against the file's folder and `~` expanded.
pub fn context(
    path: Option<&Path>,
    chosen: Option<(String, String)>,
    home: Option<&str>,
) -> anyhow::Result<Option<(String, String, Context)>> {
    let file = match path {
        Some(path) => read(path)?,
        None => None,
    };
    let (name, why) = match (
        chosen,
        file.as_ref().and_then(|f| f.current_context.clone()),
    ) {
        (Some(chosen), _) => chosen,
        (None, Some(current)) => (current, "current-context".to_owned()),
        (None, None) => return Ok(None),
    };
    let shown = path.map_or_else(
        || "(no config file path: set HOME or PROCURATOR_CONFIG)".to_owned(),
        |p| p.display().to_string(),
    );
    let Some(file) = file else {
        bail!("{why} names context {name:?}, but there is no config file {shown}");
    };
    let Some(mut context) = file.contexts.get(&name).cloned() else {
        let known: Vec<&str> = file.contexts.keys().map(String::as_str).collect();
        bail!(
            "{why} names context {name:?}, which {shown} does not hold (it holds: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let dir = path.and_then(Path::parent).unwrap_or(Path::new("."));
    for p in [
        &mut context.tls_ca,
        &mut context.tls_cert,
        &mut context.tls_key,
        &mut context.intent_key,
    ]
    .into_iter()
    .flatten()
    {
        *p = absolute(p, dir, home);
    }
    Ok(Some((name, why, context)))
}

fn absolute(path: &Path, dir: &Path, home: Option<&str>) -> PathBuf {
    if let (Ok(rest), Some(home)) = (path.strip_prefix("~"), home) {
        return Path::new(home).join(rest);
    }
    if path.is_relative() {
        return dir.join(path);
    }
    path.to_owned()
}

/// Where the value of argument `id` came from on the command line, if
/// it did.
pub fn given(
    matches: &clap::ArgMatches,
    id: &str,
    flag: &'static str,
    var: &'static str,
) -> Option<Source> {
    let mut level = Some(matches);
    let mut found = None;
    // A global argument may be given at any subcommand's level.
    while let Some(m) = level {
        // Asking for an argument this level does not define would panic.
        let defined = m.try_get_raw(id).is_ok();
        match defined.then(|| m.value_source(id)).flatten() {
            Some(ValueSource::CommandLine) => found = Some(Source::Flag(flag)),
            Some(ValueSource::EnvVariable) if found.is_none() => found = Some(Source::Env(var)),
            _ => {}
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    found
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
