//! Machine names and deployment ids: identifiers that cross trust boundaries,
//! so they can only be built valid.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A refused input as its error quotes it: a peer's megabyte of junk must
/// not come back in the message, the logs or a gRPC status.
pub(crate) fn quoted(s: &str) -> String {
    crate::limits::clip(s, crate::limits::MAX_STRING_BYTES)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{0:?} is not a valid machine name: use 1 to 63 characters of a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    Machine(String),
    #[error("{0:?} is not a valid deployment id: use 1 to 64 characters of a-z, 0-9 and '-'")]
    Deployment(String),
}

/// A machine's name as the blueprint and its agent's certificate carry it.
/// Like a DNS label, so it fits in hostnames, URIs and file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineName(String);

impl MachineName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = (1..=63).contains(&s.len())
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Machine(quoted(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A deployment's id, as the control plane assigns it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeploymentId(String);

impl DeploymentId {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Deployment(quoted(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_newtype_impls!(MachineName);
string_newtype_impls!(DeploymentId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names() {
        for good in ["worker-1", "control-plane-1", "a", "db_2"] {
            MachineName::parse(good).unwrap();
        }
        for bad in ["", "-x", "a b", "x/y", "ü", &"a".repeat(64), "../etc"] {
            assert!(MachineName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deployment_ids() {
        DeploymentId::parse("d-0193a1b2c3").unwrap();
        for bad in ["", "D1", "a/b", &"a".repeat(65)] {
            assert!(DeploymentId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
