//! A `DesiredState` from the control plane, validated before anything runs.
//! With intent keys, what runs comes from the signed statement instead
//! (crate::intent); the limits are the artifact's own (invariant 10).

use std::time::Duration;

use procurator_core::artifact::{MAX_CHECK_COMMAND_BYTES, MAX_HEALTH_CHECKS};
use procurator_core::intent::Intent;
use procurator_core::names::NameError;
use procurator_core::store_path::StorePathError;
use procurator_core::{DeploymentId, StorePath};
use procurator_proto::v1::{Cancel, DesiredState, HealthCheck};

use crate::health::Check;

const MAX_SUBSTITUTER_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum InvalidDesired {
    #[error("bad deployment id: {0}")]
    DeploymentId(NameError),
    #[error("bad closure: {0}")]
    Closure(StorePathError),
    #[error("bad health check: {0}")]
    HealthCheck(String),
}

/// What this machine should run, and how to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub deployment_id: DeploymentId,
    pub closure: StorePath,
    pub health_checks: Vec<Check>,
    pub auto_rollback: bool,
    /// Zero: no connectivity confirmation.
    pub confirm_timeout: Duration,
    /// Reboot after committing when the new closure needs it.
    pub allow_reboot: bool,
}

/// What the stream hands the deployer.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Desired(DesiredState),
    Cancel(Cancel),
}

impl From<DesiredState> for Inbound {
    fn from(state: DesiredState) -> Self {
        Inbound::Desired(state)
    }
}

impl From<Cancel> for Inbound {
    fn from(cancel: Cancel) -> Self {
        Inbound::Cancel(cancel)
    }
}

impl Desired {
    /// The desired state, with what it runs taken from `intent` when the
    /// agent verified one (the control plane's fields are then ignored).
    pub fn from_proto(
        state: &DesiredState,
        intent: Option<&Intent>,
    ) -> Result<Self, InvalidDesired> {
        let deployment_id =
            DeploymentId::parse(&state.deployment_id).map_err(InvalidDesired::DeploymentId)?;
        let closure = StorePath::parse(&state.closure).map_err(InvalidDesired::Closure)?;
        if let Some(intent) = intent {
            return Ok(Self {
                deployment_id,
                closure,
                health_checks: intent
                    .health_checks
                    .iter()
                    .map(|c| {
                        Check::from_proto(&HealthCheck {
                            command: c.command.clone(),
                            timeout_secs: c.timeout_secs,
                            interval_secs: c.interval_secs,
                        })
                    })
                    .collect(),
                auto_rollback: intent.auto_rollback,
                confirm_timeout: Duration::from_secs(u64::from(intent.confirm_timeout_secs)),
                allow_reboot: intent.allow_reboot,
            });
        }
        if state.health_checks.len() > MAX_HEALTH_CHECKS {
            return Err(InvalidDesired::HealthCheck(format!(
                "{} checks; at most {MAX_HEALTH_CHECKS} are run",
                state.health_checks.len()
            )));
        }
        for check in &state.health_checks {
            if check.command.trim().is_empty() || check.command.len() > MAX_CHECK_COMMAND_BYTES {
                return Err(InvalidDesired::HealthCheck(format!(
                    "the command must be 1 to {MAX_CHECK_COMMAND_BYTES} bytes, not blank"
                )));
            }
        }
        Ok(Self {
            deployment_id,
            closure,
            health_checks: state.health_checks.iter().map(Check::from_proto).collect(),
            auto_rollback: state.auto_rollback,
            confirm_timeout: Duration::from_secs(u64::from(state.confirm_timeout_secs)),
            allow_reboot: state.allow_reboot,
        })
    }
}

/// A substituter is a store URI (`https://…`, `file:///…`, `s3://…`) or an
/// absolute path. It is one argument of `nix copy`, so it must not look like
/// an option or hold whitespace.
pub fn check_substituter(uri: &str) -> Result<(), String> {
    let shape_ok = uri.contains("://") || uri.starts_with('/');
    if uri.is_empty()
        || uri.len() > MAX_SUBSTITUTER_LEN
        || !shape_ok
        || uri.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{uri:?} is not a store URI: expected e.g. https://cache.example or file:///srv/cache, without spaces, at most {MAX_SUBSTITUTER_LEN} bytes"
        ));
    }
    Ok(())
}

/// A string from the wire, cut short enough to log and echo back.
pub fn clip(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSURE: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1-25.11";

    fn state() -> DesiredState {
        DesiredState {
            deployment_id: "d-1".into(),
            closure: CLOSURE.into(),
            health_checks: vec![HealthCheck {
                command: "true".into(),
                timeout_secs: 5,
                interval_secs: 1,
            }],
            auto_rollback: true,
            confirm_timeout_secs: 30,
            allow_reboot: false,
            intent: String::new(),
        }
    }

    #[test]
    fn a_good_desired_state_is_accepted() {
        let desired = Desired::from_proto(&state(), None).unwrap();
        assert_eq!(desired.closure.as_str(), CLOSURE);
        assert_eq!(desired.health_checks.len(), 1);
        assert_eq!(desired.confirm_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_fields_are_refused_with_the_reason() {
        type Spoil = fn(&mut DesiredState);
        let cases: Vec<(Spoil, &str)> = vec![
            (|s| s.deployment_id = "D 1".into(), "bad deployment id"),
            (|s| s.closure = "/tmp/evil".into(), "bad closure"),
            (|s| s.closure = format!("{CLOSURE}/bin"), "bad closure"),
            (
                |s| s.health_checks[0].command = " ".into(),
                "bad health check",
            ),
        ];
        for (spoil, expected) in cases {
            let mut s = state();
            spoil(&mut s);
            let err = Desired::from_proto(&s, None).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn absolute_paths_are_stores_too() {
        assert!(check_substituter("/srv/chroot-store").is_ok());
        assert!(check_substituter("relative/path").is_err());
    }
}
