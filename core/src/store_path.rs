//! Nix store paths that can only be built valid.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::quoted;

/// The store every Procurator machine uses.
pub const STORE_DIR: &str = "/nix/store/";

/// Nix's base32 alphabet: digits and lower-case letters without e, o, u, t.
const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
const HASH_LEN: usize = 32;
/// Nix's own limit on the name part of a store path.
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{0:?} is not a Nix store path: it must start with {STORE_DIR}")]
    NotInStore(String),
    #[error(
        "{0:?} is not a Nix store path: after {STORE_DIR} come 32 characters of Nix base32, '-' and a name"
    )]
    BadHash(String),
    #[error(
        "{0:?} is not a Nix store path: the name must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9+-._?=] and not start with '.'"
    )]
    BadName(String),
    #[error(
        "{0:?} is not a Nix store path: it names something inside a store path, not the path itself"
    )]
    Nested(String),
}

/// A top-level store path: `/nix/store/<32 chars of base32>-<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let rest = s
            .strip_prefix(STORE_DIR)
            .ok_or_else(|| StorePathError::NotInStore(quoted(s)))?;
        if rest.contains('/') {
            return Err(StorePathError::Nested(quoted(s)));
        }
        let (hash, name) = match (rest.get(..HASH_LEN), rest.get(HASH_LEN..)) {
            (Some(hash), Some(name)) => (hash, name),
            _ => return Err(StorePathError::BadHash(quoted(s))),
        };
        if !hash.bytes().all(|b| NIX_BASE32.contains(&b)) {
            return Err(StorePathError::BadHash(quoted(s)));
        }
        let name = name
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::BadHash(quoted(s)))?;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
        if !name_ok {
            return Err(StorePathError::BadName(quoted(s)));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the hash, e.g. `nixos-system-worker-1-25.11`.
    pub fn name(&self) -> &str {
        &self.0[STORE_DIR.len() + HASH_LEN + 1..]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<std::path::Path> for StorePath {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";

    #[test]
    fn accepts_a_real_store_path() {
        let p = StorePath::parse(GOOD).unwrap();
        assert_eq!(p.name(), "nixos-system-worker-1-25.11");
        assert_eq!(p.to_string(), GOOD);
    }

    #[test]
    fn rejects_what_is_not_a_store_path() {
        for (bad, why) in [
            ("/tmp/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-x", "must start with"),
            ("/nix/store/abc123-nixos-system", "32 characters"),
            (
                "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hse-x",
                "32 characters",
            ),
            (
                "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa",
                "32 characters",
            ),
            ("/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-", "the name"),
            (
                "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-a b",
                "the name",
            ),
            ("/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-.x", "the name"),
            (
                "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-x/bin",
                "inside a store path",
            ),
            ("", "must start with"),
        ] {
            let err = StorePath::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_error_quotes_a_bounded_part_of_its_input() {
        let junk = format!("/nix/store/x{}", "y".repeat(4 << 20));
        let e = StorePath::parse(&junk).unwrap_err().to_string();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(e.contains("bytes cut"), "{e}");
        let e = crate::MachineName::parse(&junk).unwrap_err().to_string();
        assert!(e.len() < 1024, "{} bytes", e.len());
    }
}
