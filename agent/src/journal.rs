//! The crash journal: which deployment the agent is in, the closure that ran
//! before it, and the phase it entered last, written atomically and fsynced
//! before each phase so a restart can finish or undo what was started.

use std::path::{Path, PathBuf};

use procurator_core::atomic_file;
use procurator_proto::v1::MachineState;
use serde::{Deserialize, Serialize};

use crate::health::Check;
use crate::outcome::Failure;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a journal this agent wrote ({source}); move it away to start afresh")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The phase a deployment entered last.
/// In the order a deployment goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Copying,
    Activating,
    Checking,
    Confirming,
    Committing,
    RollingBack,
    /// Finished one way or another; nothing to recover.
    Done,
}

impl Phase {
    /// The machine state a deployment in this phase is in.
    pub fn machine_state(self) -> MachineState {
        match self {
            Phase::Copying => MachineState::Copying,
            Phase::Activating => MachineState::Activating,
            Phase::Checking => MachineState::Checking,
            Phase::Confirming => MachineState::Confirming,
            Phase::Committing => MachineState::Committing,
            Phase::RollingBack => MachineState::RollingBack,
            Phase::Done => MachineState::Unspecified,
        }
    }
}

/// One deployment's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub deployment_id: String,
    /// The closure being deployed.
    pub closure: String,
    /// `readlink -f /run/current-system` before anything changed.
    pub previous: Option<String>,
    /// What the system profile pointed at before anything changed.
    #[serde(default)]
    pub previous_profile: Option<String>,
    pub phase: Phase,
    pub auto_rollback: bool,
    /// Why a rollback started (set with [`Phase::RollingBack`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// What a restart needs to run the deployment's steps again.
    #[serde(default)]
    pub plan: Plan,
    /// The `switch-to-configuration` running outside the agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Launched>,
}

/// The parts of the desired state a resumed deployment needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Written by agents whose desired states carried substituters; read
    /// and ignored, so their journals still resume.
    #[serde(default, rename = "substituters", skip_serializing)]
    pub legacy_substituters: Vec<String>,
    #[serde(default)]
    pub health_checks: Vec<Check>,
    #[serde(default)]
    pub confirm_timeout_secs: u64,
    #[serde(default)]
    pub allow_reboot: bool,
}

/// One `switch-to-configuration` started through `run-detached`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launched {
    /// Counts the deployment's launches; names the files and the unit.
    pub n: u32,
    /// Appears, atomically, when the activation is over.
    pub status_file: PathBuf,
    pub output_file: PathBuf,
    /// The transient systemd unit, where systemd runs the activation.
    #[serde(default)]
    pub unit: Option<String>,
    /// The detached runner's process id (its session and process group).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The command, for messages: `…/bin/switch-to-configuration test`.
    pub command: String,
}

/// `STATE_DIR/journal.json`.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("journal.json"),
        }
    }

    /// The state directory the journal lives in.
    pub fn state_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last entry written, or `None` if there never was one.
    pub fn read(&self) -> Result<Option<Entry>, JournalError> {
        read_json(&self.path)
    }

    pub fn write(&self, entry: &Entry) -> Result<(), JournalError> {
        write_json(&self.path, entry)
    }
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JournalError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| JournalError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), JournalError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| JournalError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_atomically(path, &bytes).map_err(|source| JournalError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The agent's state files: replaced whole (a crash leaves the old or the
/// new), readable by root only.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic_file::write_atomically(path, bytes, atomic_file::PRIVATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(phase: Phase) -> Entry {
        Entry {
            deployment_id: "d-1".into(),
            closure: "/nix/store/00000000000000000000000000000000-new".into(),
            previous: Some("/nix/store/11111111111111111111111111111111-old".into()),
            previous_profile: None,
            phase,
            auto_rollback: true,
            failure: None,
            plan: Plan::default(),
            activation: None,
        }
    }

    #[test]
    fn entries_round_trip_and_the_last_write_wins() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        assert_eq!(journal.read().unwrap(), None);
        journal.write(&entry(Phase::Copying)).unwrap();
        journal.write(&entry(Phase::RollingBack)).unwrap();
        assert_eq!(journal.read().unwrap(), Some(entry(Phase::RollingBack)));
        // Only the journal is left: no temporary files.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("journal.json")]);
        let text = std::fs::read_to_string(journal.path()).unwrap();
        assert!(text.contains("\"phase\": \"rolling-back\""), "{text}");
        assert!(text.contains("\"deployment_id\": \"d-1\""), "{text}");
    }

    #[test]
    fn a_corrupt_journal_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        std::fs::write(journal.path(), b"{\"deployment_id\": ").unwrap();
        let err = journal.read().unwrap_err().to_string();
        assert!(err.contains("journal.json is not a journal"), "{err}");
    }
}
