//! `--on` selectors: which machines of an artifact a deployment deploys.
//! `@LABEL` (a blueprint label), `role:NAME`, or a name pattern (`web-1`,
//! `worker-*`) that matches a row (machine or VM instance) or the machine
//! it belongs to. A row is deployed when any selector matches it.

use std::fmt;

use super::{DeploymentArtifact, Target};
use crate::limits::{MAX_SELECTORS, MAX_STRING_BYTES};
use crate::pattern::NamePattern;

#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Label(String),
    Role(String),
    Name(NamePattern),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("{0:?} is not a selector: use NAME or a pattern (web-*), @LABEL, or role:NAME")]
    Malformed(String),
    #[error("{count} selectors; at most {MAX_SELECTORS} are allowed")]
    TooMany { count: usize },
    #[error("selector {0} matches no machine of the artifact")]
    NoMatch(String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let malformed = || SelectorError::Malformed(text.chars().take(64).collect());
        if text.len() > MAX_STRING_BYTES {
            return Err(malformed());
        }
        let word =
            |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if let Some(label) = text.strip_prefix('@') {
            return word(label)
                .then(|| Self::Label(label.to_owned()))
                .ok_or_else(malformed);
        }
        if let Some(role) = text.strip_prefix("role:") {
            return word(role)
                .then(|| Self::Role(role.to_owned()))
                .ok_or_else(malformed);
        }
        NamePattern::parse(text)
            .map(Self::Name)
            .map_err(|_| malformed())
    }

    pub fn matches(&self, target: &Target<'_>) -> bool {
        match self {
            Self::Label(label) => target.spec.labels.iter().any(|l| l == label),
            Self::Role(role) => &target.spec.role == role,
            Self::Name(pattern) => {
                pattern.matches(target.name.as_str()) || pattern.matches(target.machine.as_str())
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(label) => write!(f, "@{label}"),
            Self::Role(role) => write!(f, "role:{role}"),
            Self::Name(pattern) => write!(f, "{pattern}"),
        }
    }
}

/// Parses every selector; at most [`MAX_SELECTORS`].
pub fn parse_all(texts: &[String]) -> Result<Vec<Selector>, SelectorError> {
    if texts.len() > MAX_SELECTORS {
        return Err(SelectorError::TooMany { count: texts.len() });
    }
    texts.iter().map(|t| Selector::parse(t)).collect()
}

impl DeploymentArtifact {
    /// What identifies a deployment of this artifact on `selectors`: the
    /// artifact's digest, and with selectors a digest of both, so the same
    /// artifact on other machines is another deployment.
    pub fn digest_on(&self, selectors: &[Selector]) -> String {
        use sha2::{Digest as _, Sha256};
        let digest = self.digest();
        if selectors.is_empty() {
            return digest;
        }
        let on: Vec<String> = selectors.iter().map(ToString::to_string).collect();
        hex::encode(Sha256::digest(
            format!("{digest} on {}", on.join(" ")).as_bytes(),
        ))
    }

    /// The rows `selectors` deploy: every row when there are none. A
    /// selector that matches nothing is an error (a typo must not deploy
    /// less than meant without a word).
    pub fn selected_targets(
        &self,
        selectors: &[Selector],
    ) -> Result<Vec<Target<'_>>, SelectorError> {
        let targets = self.targets();
        if selectors.is_empty() {
            return Ok(targets);
        }
        if let Some(unmatched) = selectors
            .iter()
            .find(|s| !targets.iter().any(|t| s.matches(t)))
        {
            return Err(SelectorError::NoMatch(unmatched.to_string()));
        }
        Ok(targets
            .into_iter()
            .filter(|t| selectors.iter().any(|s| s.matches(t)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact() -> DeploymentArtifact {
        let spec = |role: &str, labels: &[&str]| {
            serde_json::json!({
                "role": role, "cpu": 1, "memory": {"amount": 1, "unit": "GB"},
                "labels": labels,
                "deployment": {"addr": "192.0.2.1", "backend": "nixos"}
            })
        };
        let closure = |n: &str| format!("/nix/store/{}-{n}", "a".repeat(32));
        let json = serde_json::json!({
            "gitCommit": "3f2c1a9",
            "blueprint": {
                "db-1": spec("db", &["storage"]),
                "web-1": spec("web", &["edge", "eu"]),
                "web-2": spec("web", &["edge"]),
            },
            "closures": {"db-1": closure("db"), "web-1": closure("w1"), "web-2": closure("w2")},
        });
        DeploymentArtifact::from_json(json.to_string().as_bytes()).unwrap()
    }

    fn names(a: &DeploymentArtifact, on: &[&str]) -> Result<Vec<String>, SelectorError> {
        let on: Vec<String> = on.iter().map(|s| (*s).to_owned()).collect();
        let selectors = parse_all(&on)?;
        Ok(a.selected_targets(&selectors)?
            .into_iter()
            .map(|t| t.name.to_string())
            .collect())
    }

    #[test]
    fn labels_roles_names_and_globs_select_rows() {
        let a = artifact();
        assert_eq!(names(&a, &[]).unwrap(), ["db-1", "web-1", "web-2"]);
        assert_eq!(names(&a, &["@edge"]).unwrap(), ["web-1", "web-2"]);
        assert_eq!(names(&a, &["@eu", "role:db"]).unwrap(), ["db-1", "web-1"]);
        assert_eq!(names(&a, &["web-*"]).unwrap(), ["web-1", "web-2"]);
        assert_eq!(names(&a, &["db-1"]).unwrap(), ["db-1"]);
    }

    #[test]
    fn a_selector_that_matches_nothing_or_is_malformed_is_refused() {
        let a = artifact();
        assert_eq!(
            names(&a, &["@nope"]),
            Err(SelectorError::NoMatch("@nope".into()))
        );
        assert!(matches!(
            names(&a, &["@"]),
            Err(SelectorError::Malformed(_))
        ));
        assert!(matches!(
            names(&a, &["a b"]),
            Err(SelectorError::Malformed(_))
        ));
        assert!(matches!(
            names(&a, &["role:"]),
            Err(SelectorError::Malformed(_))
        ));
        let many: Vec<&str> = vec!["web-1"; MAX_SELECTORS + 1];
        assert!(matches!(
            names(&a, &many),
            Err(SelectorError::TooMany { .. })
        ));
    }
}
