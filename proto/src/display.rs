//! Human names for the protocol's enums, as `watch` and `status` print them.

use crate::v1::{DeploymentState, MachineState};

impl MachineState {
    /// Whether a machine in this state is done with its deployment.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MachineState::Succeeded
                | MachineState::Skipped
                | MachineState::Failed
                | MachineState::RolledBack
                | MachineState::RollbackFailed
                | MachineState::Superseded
                | MachineState::Cancelled
                | MachineState::Unreachable
        )
    }

    /// Whether the machine runs what it was sent: it succeeded, or had
    /// nothing to do.
    pub fn is_success(self) -> bool {
        matches!(self, MachineState::Succeeded | MachineState::Skipped)
    }

    /// Whether this final state counts against the deployment.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            MachineState::Failed
                | MachineState::RolledBack
                | MachineState::RollbackFailed
                | MachineState::Unreachable
        )
    }

    /// The short lower-case name used in CLI output and JSON, e.g. `rolled-back`.
    pub fn label(self) -> &'static str {
        match self {
            MachineState::Unspecified => "unknown",
            MachineState::Pending => "pending",
            MachineState::Sent => "sent",
            MachineState::Copying => "copying",
            MachineState::Activating => "activating",
            MachineState::Checking => "checking",
            MachineState::Confirming => "confirming",
            MachineState::Committing => "committing",
            MachineState::Succeeded => "succeeded",
            MachineState::Skipped => "skipped",
            MachineState::Failed => "failed",
            MachineState::RollingBack => "rolling-back",
            MachineState::RolledBack => "rolled-back",
            MachineState::RollbackFailed => "rollback-failed",
            MachineState::Superseded => "superseded",
            MachineState::Cancelled => "cancelled",
            MachineState::Unreachable => "unreachable",
        }
    }
}

impl MachineState {
    /// Every state, in protocol order.
    pub const ALL: [MachineState; 17] = [
        MachineState::Unspecified,
        MachineState::Pending,
        MachineState::Sent,
        MachineState::Copying,
        MachineState::Activating,
        MachineState::Checking,
        MachineState::Confirming,
        MachineState::Committing,
        MachineState::Succeeded,
        MachineState::Skipped,
        MachineState::Failed,
        MachineState::RollingBack,
        MachineState::RolledBack,
        MachineState::RollbackFailed,
        MachineState::Superseded,
        MachineState::Cancelled,
        MachineState::Unreachable,
    ];

    /// The state a [`MachineState::label`] names.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.label() == label)
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl DeploymentState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            DeploymentState::Running | DeploymentState::Unspecified
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            DeploymentState::Unspecified => "unknown",
            DeploymentState::Running => "running",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::Superseded => "superseded",
            DeploymentState::Cancelled => "cancelled",
            DeploymentState::Halted => "halted",
        }
    }
}

impl std::fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_machine_state_is_listed_and_found_by_its_label() {
        let known = (0..=255).filter_map(|n| MachineState::try_from(n).ok());
        for state in known {
            assert!(MachineState::ALL.contains(&state), "{state:?}");
            assert_eq!(MachineState::from_label(state.label()), Some(state));
        }
        assert_eq!(MachineState::from_label("nonsense"), None);
    }
}
