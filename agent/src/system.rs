//! The machine's system links and NixOS closures that can be activated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use procurator_core::StorePath;
use procurator_core::nix::{CommandOutput, RunError, run_captured};
use tokio::process::Command;

/// Where the machine keeps its system links. Production uses the defaults;
/// tests point them into a temporary directory.
#[derive(Debug, Clone)]
pub struct SystemPaths {
    /// The closure that runs now (`switch-to-configuration test` moves it).
    pub current_system: PathBuf,
    /// The closure the machine booted.
    pub booted_system: PathBuf,
    /// The system profile: the boot menu's generations.
    pub profile: PathBuf,
}

impl SystemPaths {
    pub fn new(profile: PathBuf) -> Self {
        Self {
            current_system: "/run/current-system".into(),
            booted_system: "/run/booted-system".into(),
            profile,
        }
    }

    /// `readlink -f /run/current-system`, or `None` when it does not exist.
    pub fn current_system(&self) -> Option<String> {
        resolve(&self.current_system)
    }

    /// `readlink -f /run/booted-system`, or `None`.
    pub fn booted_system(&self) -> Option<String> {
        resolve(&self.booted_system)
    }

    /// What the system profile points at now, or `None`.
    pub fn profile_target(&self) -> Option<String> {
        resolve(&self.profile)
    }
}

/// `readlink -f`: the fully resolved target, if the link resolves.
pub fn resolve(link: &Path) -> Option<String> {
    std::fs::canonicalize(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// What `switch-to-configuration` is asked to do. The agent never uses
/// `switch`: the profile moves only after the checks passed, so activation
/// (`test`) and the boot entry (`boot`) are separate steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Activate now; the next boot runs the old default.
    Test,
    /// Make the profile's closure the boot default without activating.
    Boot,
}

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Test => "test",
            Goal::Boot => "boot",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "{closure} cannot be activated: it has no bin/switch-to-configuration (is it a NixOS system closure?)"
)]
pub struct NotASystem {
    pub closure: StorePath,
}

/// A closure that holds `bin/switch-to-configuration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile(StorePath);

impl Profile {
    pub fn new(closure: StorePath) -> Result<Self, NotASystem> {
        if Self::switch_path(&closure).is_file() {
            Ok(Self(closure))
        } else {
            Err(NotASystem { closure })
        }
    }

    fn switch_path(closure: &StorePath) -> PathBuf {
        Path::new(closure.as_str()).join("bin/switch-to-configuration")
    }

    pub fn closure(&self) -> &StorePath {
        &self.0
    }

    /// `<closure>/bin/switch-to-configuration <goal>`.
    pub fn switch_command(&self, goal: Goal) -> Command {
        let mut command = Command::new(Self::switch_path(&self.0));
        command.arg(goal.as_str());
        command
    }

    /// Runs `switch-to-configuration <goal>`, killed after `timeout`.
    pub async fn activate(
        &self,
        goal: Goal,
        timeout: Duration,
        tail_lines: usize,
    ) -> Result<CommandOutput, RunError> {
        run_captured(self.switch_command(goal), Some(timeout), tail_lines).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_the_words_switch_to_configuration_takes() {
        assert_eq!((Goal::Test.as_str(), Goal::Boot.as_str()), ("test", "boot"));
    }

    #[test]
    fn a_closure_without_switch_to_configuration_is_not_a_system() {
        let path =
            StorePath::parse("/nix/store/00000000000000000000000000000000-not-there").unwrap();
        let err = Profile::new(path).unwrap_err();
        assert!(
            err.to_string().contains("no bin/switch-to-configuration"),
            "{err}"
        );
    }

    #[test]
    fn links_resolve_fully_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("a")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("b")).unwrap();
        let paths = SystemPaths {
            current_system: dir.path().join("b"),
            booted_system: dir.path().join("missing"),
            profile: dir.path().join("a"),
        };
        let expected = std::fs::canonicalize(&target)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(paths.current_system(), Some(expected.clone()));
        assert_eq!(paths.profile_target(), Some(expected));
        assert_eq!(paths.booted_system(), None);
    }
}
