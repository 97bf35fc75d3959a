//! Asking a store what it holds (`nix path-info`), signing paths
//! (`nix store sign`) and comparing closures (`nix store diff-closures`):
//! what CI needs to decide what to publish and to show what changed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{Nix, NixError, describe};
use crate::store_path::StorePath;

/// Paths per `nix path-info` call: a NixOS closure holds thousands of paths,
/// more than fits on one command line.
const PATHS_PER_CALL: usize = 500;

/// What `nix path-info --json` says about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    /// Whether the store holds it.
    pub valid: bool,
    /// The size of its NAR (0 when not valid).
    pub nar_size: u64,
    /// The size of its whole closure, with `closure_size: true` only.
    pub closure_size: Option<u64>,
}

/// Which store [`Nix::path_info`] asks and what it asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathInfoQuery<'a> {
    /// A store URI (`file:///dir`, `s3://bucket`, `ssh-ng://host`); the local
    /// store when `None`.
    pub store: Option<&'a str>,
    /// Every path in the closures of the paths given (`-r`). The paths must
    /// then be valid.
    pub recursive: bool,
    /// Each path's closure size (`-S`).
    pub closure_size: bool,
}

impl Nix {
    /// `nix path-info --json [--store URI] [-r] [-S] PATHS...`, never
    /// substituting.
    ///
    /// A path the store does not hold comes back with `valid: false`: Nix
    /// 2.8 prints `{"path": P, "valid": false}` for it and exits 0, newer Nix
    /// prints `P: null` in an object keyed by path. Both are understood.
    pub async fn path_info(
        &self,
        query: PathInfoQuery<'_>,
        paths: &[StorePath],
    ) -> Result<Vec<PathInfo>, NixError> {
        let mut found: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
        for chunk in paths.chunks(PATHS_PER_CALL) {
            // A query: a path the store lacks must not be fetched from the
            // substituters (Nix 2.8 tries to, and retries an unreachable
            // cache.nixos.org for seconds before answering).
            let mut args = vec!["path-info", "--json", "--option", "substitute", "false"];
            if let Some(store) = query.store {
                args.extend(["--store", store]);
            }
            if query.recursive {
                args.push("-r");
            }
            if query.closure_size {
                args.push("-S");
            }
            let mut command = self.nix(&args);
            command.args(chunk.iter().map(StorePath::as_str));
            let name = describe(&command);
            let stdout = self.stdout_of(command).await?;
            for info in parse_path_info(&stdout).map_err(|message| NixError::BadOutput {
                command: name.clone(),
                message,
            })? {
                found.insert(info.path.clone(), info);
            }
        }
        Ok(found.into_values().collect())
    }

    /// `nix store sign --key-file KEY PATHS...`: adds a signature to each of
    /// `paths` in the local store, so that copying them anywhere carries it.
    pub async fn sign(&self, key_file: &Path, paths: &[StorePath]) -> Result<(), NixError> {
        for chunk in paths.chunks(PATHS_PER_CALL) {
            let mut command = self.nix(&["store", "sign"]);
            command.arg("--key-file").arg(key_file);
            command.args(chunk.iter().map(StorePath::as_str));
            self.stdout_of(command).await?;
        }
        Ok(())
    }

    /// `nix store diff-closures OLD NEW`: what was added, removed or changed
    /// version between two closures, one package per line.
    pub async fn diff_closures(
        &self,
        old: &StorePath,
        new: &StorePath,
    ) -> Result<String, NixError> {
        let command = self.nix(&["store", "diff-closures", old.as_str(), new.as_str()]);
        let stdout = self.stdout_of(command).await?;
        Ok(super::strip_ansi(&stdout))
    }
}

/// Both shapes of `nix path-info --json`: a list of objects with `path`
/// (Nix < 2.19), or an object keyed by path whose value is null for a path
/// the store does not hold (Nix >= 2.19).
fn parse_path_info(stdout: &str) -> Result<Vec<PathInfo>, String> {
    let value: Value = serde_json::from_str(stdout).map_err(|e| e.to_string())?;
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let path = item
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("an entry without a path: {item}"))?;
                info(path, item)
            })
            .collect(),
        Value::Object(map) => map.iter().map(|(path, item)| info(path, item)).collect(),
        other => Err(format!("expected a list or an object, got {other}")),
    }
}

fn info(path: &str, item: &Value) -> Result<PathInfo, String> {
    let path = StorePath::parse(path).map_err(|e| e.to_string())?;
    let valid = !item.is_null() && item.get("valid").and_then(Value::as_bool) != Some(false);
    Ok(PathInfo {
        path,
        valid,
        nar_size: item.get("narSize").and_then(Value::as_u64).unwrap_or(0),
        closure_size: item.get("closureSize").and_then(Value::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/f33p5wjd7lpczyi6p5b16dj9bd8x3y47-nixos-system-worker-1-gen1";
    const B: &str = "/nix/store/04xv0wfsczwslhki9i2fsh11kd7nigcf-procurator-test-base";

    #[test]
    fn reads_what_nix_2_8_prints() {
        // `nix path-info -S --json` and an invalid path, as Nix 2.8 prints them.
        let stdout = format!(
            r#"[{{"path":"{A}","narHash":"sha256-x","narSize":2816,"references":[],"closureSize":4040,"ultimate":true}},{{"path":"{B}","valid":false}}]"#
        );
        let infos = parse_path_info(&stdout).unwrap();
        assert_eq!(infos.len(), 2);
        assert!(infos[0].valid);
        assert_eq!(infos[0].nar_size, 2816);
        assert_eq!(infos[0].closure_size, Some(4040));
        assert!(!infos[1].valid);
        assert_eq!(infos[1].path.as_str(), B);
    }

    #[test]
    fn reads_what_newer_nix_prints() {
        let stdout = format!(r#"{{"{A}":{{"narSize":10,"closureSize":20}},"{B}":null}}"#);
        let infos = parse_path_info(&stdout).unwrap();
        let a = infos.iter().find(|i| i.path.as_str() == A).unwrap();
        assert!(a.valid);
        assert_eq!((a.nar_size, a.closure_size), (10, Some(20)));
        assert!(!infos.iter().find(|i| i.path.as_str() == B).unwrap().valid);
    }

    #[test]
    fn refuses_what_is_not_a_store_path() {
        let err = parse_path_info(r#"[{"path":"/tmp/x"}]"#).unwrap_err();
        assert!(err.contains("not a Nix store path"), "{err}");
        assert!(parse_path_info("42").is_err());
    }
}
