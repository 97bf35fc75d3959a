//! Publishing closures to a binary cache: copy only what the cache lacks,
//! signed by our key, and say how much that was.
//!
//! Any store Nix can copy to works (`file://`, `s3://`, `ssh-ng://`,
//! `http(s)://` with an upload-capable server). Signing happens in the local
//! store first (`nix store sign`), so it works for every kind of store.
//! `attic:NAME` goes through `attic push NAME`, which signs with the
//! cache's own key and skips what the cache has.

use std::path::{Path, PathBuf};

use procurator_core::StorePath;
use procurator_core::nix::{Nix, NixError, PathInfo, PathInfoQuery, run_captured};
use serde_json::{Value, json};

use crate::failure::{Stage, StageError, nix_message};

/// Where `--to` / `--publish-to` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A Nix store URI.
    Store(String),
    /// An attic cache, by the name `attic` knows it (`server:cache`).
    Attic(String),
}

impl Destination {
    pub fn parse(uri: &str) -> Result<Self, StageError> {
        let uri = uri.trim();
        if uri.is_empty() {
            return Err(StageError::new(
                Stage::Publish,
                "no binary cache given: pass a Nix store URI such as file:///var/cache/nix, s3://bucket or ssh-ng://host, or attic:CACHE",
            ));
        }
        match uri.strip_prefix("attic:") {
            Some("") => Err(StageError::new(
                Stage::Publish,
                "attic: needs a cache name, e.g. attic:myserver:fleet",
            )),
            Some(name) => Ok(Self::Attic(name.to_owned())),
            None => Ok(Self::Store(uri.to_owned())),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Store(uri) => f.write_str(uri),
            Destination::Attic(name) => write!(f, "attic:{name}"),
        }
    }
}

/// What to say, loudly, before publishing paths nobody signs: agents copy
/// only paths signed by a key they trust, so every machine would refuse
/// them. `None` when they will be signed: with a key, by attic (with the
/// cache's key), by a store URI's `secret-key=`, or when `--no-sign` says
/// that something else signs them.
pub fn unsigned_warning(
    destination: &Destination,
    signing_key: Option<&Path>,
    no_sign: bool,
) -> Option<String> {
    let signed_by_uri =
        matches!(destination, Destination::Store(uri) if uri.contains("secret-key="));
    if signing_key.is_some()
        || no_sign
        || signed_by_uri
        || matches!(destination, Destination::Attic(_))
    {
        return None;
    }
    Some(format!(
        "warning: publishing to {destination} without --signing-key: agents copy only paths signed by a key they trust (--trusted-public-key), so every machine will refuse these closures. Make a key with `nix key generate-secret --key-name NAME > cache.secret`, pass --signing-key cache.secret, and give the agents its public half (`nix key convert-secret-to-public < cache.secret`); pass --no-sign if the paths are signed some other way"
    ))
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub destination: String,
    /// Paths copied.
    pub paths: usize,
    /// Their NAR size.
    pub bytes: u64,
    /// Paths the cache had already; unknown for attic, which decides itself.
    pub already_there: Option<usize>,
}

impl Published {
    pub fn summary(&self) -> String {
        let size = crate::format::bytes(self.bytes);
        match self.already_there {
            Some(already) => format!(
                "published {} paths ({size}) to {}; {already} already there",
                self.paths, self.destination
            ),
            None => format!(
                "pushed {} paths ({size}) with attic to {} (attic skips what the cache has)",
                self.paths, self.destination
            ),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "destination": self.destination,
            "paths": self.paths,
            "bytes": self.bytes,
            "alreadyThere": self.already_there,
        })
    }
}

/// Copies the closures of `closures` to `destination`, signing what is
/// copied with `signing_key` first. Every failure is a [`Stage::Publish`]
/// error carrying Nix's message.
pub async fn publish(
    nix: &Nix,
    destination: &Destination,
    signing_key: Option<&Path>,
    closures: &[StorePath],
) -> Result<Published, StageError> {
    let fail = |context: &str, e: &NixError| StageError::nix(Stage::Publish, context, e);
    if let Some(key) = signing_key {
        check_key(key, destination)?;
    }
    let attic = match destination {
        Destination::Attic(_) => Some(find_attic()?),
        Destination::Store(_) => None,
    };

    // Built here, so they must be here: say so rather than let `-r` fail.
    let tops = nix
        .path_info(PathInfoQuery::default(), closures)
        .await
        .map_err(|e| fail("cannot query the local store", &e))?;
    let absent: Vec<String> = tops
        .iter()
        .filter(|i| !i.valid)
        .map(|i| i.path.to_string())
        .collect();
    if !absent.is_empty() {
        return Err(StageError::new(
            Stage::Publish,
            format!(
                "not in this machine's store: {}; build them here first (`procurator-ctl artifact --flake …` builds them), or publish from the machine that built them",
                absent.join(", ")
            ),
        ));
    }
    let recursive = PathInfoQuery {
        recursive: true,
        ..PathInfoQuery::default()
    };
    let all = nix
        .path_info(recursive, closures)
        .await
        .map_err(|e| fail("cannot list the closures' paths", &e))?;

    let uri = match (destination, attic) {
        (Destination::Attic(name), Some(attic)) => {
            return push_with_attic(&attic, name, closures, &all).await;
        }
        (Destination::Store(uri), _) | (Destination::Attic(uri), None) => uri,
    };

    let paths: Vec<StorePath> = all.iter().map(|i| i.path.clone()).collect();
    let remote = PathInfoQuery {
        store: Some(uri),
        ..PathInfoQuery::default()
    };
    let there = nix
        .path_info(remote, &paths)
        .await
        .map_err(|e| fail(&format!("cannot ask {uri} what it holds"), &e))?;
    let missing: Vec<&PathInfo> = all
        .iter()
        .filter(|i| !there.iter().any(|t| t.path == i.path && t.valid))
        .collect();
    let missing_paths: Vec<StorePath> = missing.iter().map(|i| i.path.clone()).collect();
    let bytes = missing.iter().map(|i| i.nar_size).sum();
    if !missing_paths.is_empty() {
        if let Some(key) = signing_key {
            nix.sign(key, &missing_paths)
                .await
                .map_err(|e| fail(&format!("cannot sign with {}", key.display()), &e))?;
        }
        eprintln!("copying {} paths to {uri}", missing_paths.len());
        nix.copy_to(uri, &missing_paths)
            .await
            .map_err(|e| fail(&format!("cannot copy to {uri}"), &e))?;
    }
    Ok(Published {
        destination: uri.clone(),
        paths: missing_paths.len(),
        bytes,
        already_there: Some(all.len() - missing_paths.len()),
    })
}

fn check_key(key: &Path, destination: &Destination) -> Result<(), StageError> {
    if let Destination::Attic(_) = destination {
        return Err(StageError::new(
            Stage::Publish,
            "--signing-key does not apply to attic: the attic server signs with its cache's own key; leave --signing-key out",
        ));
    }
    match std::fs::metadata(key) {
        Ok(meta) if meta.is_file() => Ok(()),
        _ => Err(StageError::new(
            Stage::Publish,
            format!(
                "--signing-key {}: no such file; make one with `nix key generate-secret --key-name NAME > FILE`",
                key.display()
            ),
        )),
    }
}

/// `attic` on PATH.
fn find_attic() -> Result<PathBuf, StageError> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|dir| dir.join("attic"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            StageError::new(
                Stage::Publish,
                "publishing to attic:… needs the attic client, and there is no `attic` on PATH; install it (and `attic login`), or publish to a Nix store URI instead",
            )
        })
}

/// `attic push NAME CLOSURES...`: attic walks the closures and uploads what
/// the cache lacks.
async fn push_with_attic(
    attic: &Path,
    name: &str,
    closures: &[StorePath],
    all: &[PathInfo],
) -> Result<Published, StageError> {
    let mut command = tokio::process::Command::new(attic);
    command.arg("push").arg(name);
    command.args(closures.iter().map(StorePath::as_str));
    let description = format!("attic push {name} …");
    eprintln!("{description}");
    let output = run_captured(command, None, procurator_core::nix::TAIL_LINES)
        .await
        .map_err(|e| StageError::new(Stage::Publish, e.to_string()))?;
    if !output.success() {
        let error = NixError::Failed {
            command: description,
            status: output.status,
            tail: output.tail,
        };
        return Err(StageError::new(Stage::Publish, nix_message(&error)));
    }
    Ok(Published {
        destination: format!("attic:{name}"),
        paths: all.len(),
        bytes: all.iter().map(|i| i.nar_size).sum(),
        already_there: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attic_caches_are_told_apart_from_store_uris() {
        assert_eq!(
            Destination::parse("attic:srv:fleet").unwrap(),
            Destination::Attic("srv:fleet".into())
        );
        assert_eq!(
            Destination::parse("file:///var/cache?compression=zstd").unwrap(),
            Destination::Store("file:///var/cache?compression=zstd".into())
        );
        assert!(Destination::parse("attic:").is_err());
        assert!(Destination::parse(" ").is_err());
    }

    #[test]
    fn summaries_say_what_was_copied_and_what_was_there() {
        let published = Published {
            destination: "file:///c".into(),
            paths: 3,
            bytes: 3 << 20,
            already_there: Some(2),
        };
        assert_eq!(
            published.summary(),
            "published 3 paths (3.0 MiB) to file:///c; 2 already there"
        );
        assert_eq!(published.json()["alreadyThere"], 2);
    }

    #[test]
    fn publishing_unsigned_is_warned_about_unless_something_signs() {
        let file = Destination::parse("file:///srv/cache").unwrap();
        let warning = unsigned_warning(&file, None, false).unwrap();
        assert!(
            warning.contains("without --signing-key")
                && warning.contains("every machine will refuse")
                && warning.contains("--no-sign"),
            "{warning}"
        );
        assert_eq!(unsigned_warning(&file, Some(Path::new("k")), false), None);
        assert_eq!(unsigned_warning(&file, None, true), None);
        let signing_uri = Destination::parse("file:///srv/cache?secret-key=/k").unwrap();
        assert_eq!(unsigned_warning(&signing_uri, None, false), None);
        let attic = Destination::parse("attic:srv:fleet").unwrap();
        assert_eq!(unsigned_warning(&attic, None, false), None);
    }

    #[test]
    fn a_signing_key_must_exist_and_does_not_apply_to_attic() {
        let store = Destination::Store("file:///c".into());
        let err = check_key(Path::new("/nonexistent/sk"), &store).unwrap_err();
        assert_eq!(err.stage, Stage::Publish);
        assert!(err.to_string().contains("nix key generate-secret"), "{err}");
        let attic = Destination::Attic("c".into());
        assert!(check_key(Path::new("/etc/hostname"), &attic).is_err());
    }
}
