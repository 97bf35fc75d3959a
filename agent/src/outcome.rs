//! How a deployment ended on this machine, in a form that survives restarts.

use procurator_proto::v1::{ActivationResult, MachineState};
use serde::{Deserialize, Serialize};

/// A step that failed: the phase, why in one line, and the failing command's
/// output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    #[serde(with = "state_name")]
    pub phase: MachineState,
    pub reason: String,
    pub tail: String,
}

impl Failure {
    pub fn new(phase: MachineState, reason: impl Into<String>, tail: impl Into<String>) -> Self {
        Self {
            phase,
            reason: reason.into(),
            tail: tail.into(),
        }
    }
}

/// The final word on one (deployment, closure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub deployment_id: String,
    pub closure: String,
    /// SUCCEEDED, SKIPPED, FAILED, ROLLED_BACK or ROLLBACK_FAILED.
    #[serde(with = "state_name")]
    pub state: MachineState,
    /// UNSPECIFIED unless something failed.
    #[serde(with = "state_name")]
    pub failed_phase: MachineState,
    pub reason: String,
    pub output_tail: String,
    /// `readlink -f /run/current-system` when it was over.
    pub current_system: String,
    /// The new closure's kernel, initrd or kernel modules differ from the
    /// booted system's (only on SUCCEEDED).
    #[serde(default)]
    pub reboot_required: bool,
    /// What differs, e.g. "kernel, initrd".
    #[serde(default)]
    pub reboot_reason: String,
}

impl Outcome {
    pub fn succeeded(
        deployment_id: &str,
        closure: &str,
        state: MachineState,
        current_system: String,
    ) -> Self {
        Self {
            deployment_id: deployment_id.to_owned(),
            closure: closure.to_owned(),
            state,
            failed_phase: MachineState::Unspecified,
            reason: String::new(),
            output_tail: String::new(),
            current_system,
            reboot_required: false,
            reboot_reason: String::new(),
        }
    }

    /// A desired state dropped before it started.
    pub fn cancelled(
        deployment_id: &str,
        closure: &str,
        reason: String,
        current_system: String,
    ) -> Self {
        Self {
            deployment_id: deployment_id.to_owned(),
            closure: closure.to_owned(),
            state: MachineState::Cancelled,
            failed_phase: MachineState::Unspecified,
            reason,
            output_tail: String::new(),
            current_system,
            reboot_required: false,
            reboot_reason: String::new(),
        }
    }

    pub fn failed(
        deployment_id: &str,
        closure: &str,
        state: MachineState,
        failure: Failure,
        current_system: String,
    ) -> Self {
        Self {
            deployment_id: deployment_id.to_owned(),
            closure: closure.to_owned(),
            state,
            failed_phase: failure.phase,
            reason: failure.reason,
            output_tail: failure.tail,
            current_system,
            reboot_required: false,
            reboot_reason: String::new(),
        }
    }

    pub fn to_proto(&self) -> ActivationResult {
        ActivationResult {
            deployment_id: self.deployment_id.clone(),
            state: self.state.into(),
            failed_phase: self.failed_phase.into(),
            reason: self.reason.clone(),
            output_tail: self.output_tail.clone(),
            current_system: self.current_system.clone(),
            reboot_required: self.reboot_required,
            reboot_reason: self.reboot_reason.clone(),
            // The agent's own machine.
            instance: String::new(),
            // Filled from the logbook when the result is sent.
            output: String::new(),
        }
    }
}

/// `MachineState` as its protobuf name, e.g. `MACHINE_STATE_ROLLED_BACK`.
mod state_name {
    use procurator_proto::v1::MachineState;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(state: &MachineState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(state.as_str_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MachineState, D::Error> {
        let name = String::deserialize(d)?;
        MachineState::from_str_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown machine state {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_json_and_proto() {
        let outcome = Outcome::failed(
            "d-1",
            "/nix/store/00000000000000000000000000000000-new",
            MachineState::RolledBack,
            Failure::new(MachineState::Checking, "health check failed", "tail"),
            "/nix/store/11111111111111111111111111111111-old".into(),
        );
        let json = serde_json::to_string(&outcome).unwrap();
        assert!(json.contains("\"MACHINE_STATE_ROLLED_BACK\""), "{json}");
        assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
        let proto = outcome.to_proto();
        assert_eq!(proto.state(), MachineState::RolledBack);
        assert_eq!(proto.failed_phase(), MachineState::Checking);
        assert_eq!(proto.output_tail, "tail");
        assert!(serde_json::from_str::<Outcome>(&json.replace("ROLLED_BACK", "NOPE")).is_err());
    }
}
