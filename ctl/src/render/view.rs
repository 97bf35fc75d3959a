//! What we know about the followed deployment, folded from its events.

use std::collections::BTreeMap;

use procurator_proto::v1::{
    CopyProgress, Deployment, DeploymentState, Event, MachineState, MachineUpdate, event,
};

use crate::Outcome;

#[derive(Debug, Clone, PartialEq)]
pub struct MachineView {
    pub state: MachineState,
    pub failed_phase: MachineState,
    pub closure: String,
    /// The latest message (for failures: the reason).
    pub message: String,
    pub output_tail: String,
    pub copy: Option<CopyProgress>,
}

impl Default for MachineView {
    fn default() -> Self {
        Self {
            state: MachineState::Pending,
            failed_phase: MachineState::Unspecified,
            closure: String::new(),
            message: String::new(),
            output_tail: String::new(),
            copy: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentView {
    pub id: String,
    pub git_commit: String,
    pub machines: BTreeMap<String, MachineView>,
    pub state: DeploymentState,
    /// Set once the `DeploymentFinished` event (or a final `GetDeployment`) was seen.
    pub finished: bool,
}

impl DeploymentView {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            git_commit: String::new(),
            machines: BTreeMap::new(),
            state: DeploymentState::Running,
            finished: false,
        }
    }

    /// Take over everything `GetDeployment` reports: it is authoritative.
    pub fn merge(&mut self, d: &Deployment) {
        self.git_commit.clone_from(&d.git_commit);
        self.state = d.state();
        self.finished = self.state.is_final();
        for m in &d.machines {
            self.machines.insert(
                m.machine.clone(),
                MachineView {
                    state: m.state(),
                    failed_phase: m.failed_phase(),
                    closure: m.closure.clone(),
                    message: m.reason.clone(),
                    output_tail: m.output_tail.clone(),
                    copy: m.copy,
                },
            );
        }
    }

    pub fn apply(&mut self, ev: &Event) {
        match &ev.kind {
            Some(event::Kind::Submitted(s)) => {
                self.git_commit.clone_from(&s.git_commit);
                for m in &s.machines {
                    self.machines.entry(m.clone()).or_default();
                }
            }
            Some(event::Kind::Machine(u)) => self.apply_machine(u),
            Some(event::Kind::Finished(f)) => {
                self.state = f.state();
                self.finished = true;
            }
            Some(event::Kind::Agent(_)) | None => {}
        }
    }

    fn apply_machine(&mut self, u: &MachineUpdate) {
        let m = self.machines.entry(u.machine.clone()).or_default();
        let state = u.state();
        // Not every update repeats the closure: keep the last one seen. Copy
        // figures mean something only while copying.
        m.state = state;
        m.failed_phase = u.failed_phase();
        if !u.closure.is_empty() {
            m.closure.clone_from(&u.closure);
        }
        m.message.clone_from(&u.message);
        m.output_tail.clone_from(&u.output_tail);
        if u.copy.is_some() {
            m.copy = u.copy;
        } else if state != MachineState::Copying {
            m.copy = None;
        }
    }

    /// 0 if the deployment succeeded; 3 if it failed, was superseded or
    /// cancelled, or any machine failed, rolled back or was unreachable.
    pub fn outcome(&self) -> Outcome {
        let any_failed = self.machines.values().any(|m| m.state.is_failure());
        if self.state == DeploymentState::Succeeded && !any_failed {
            Outcome::Success
        } else {
            Outcome::DeploymentFailed
        }
    }

    /// The widest machine name, for aligning columns.
    pub fn name_width(&self) -> usize {
        self.machines
            .keys()
            .map(|k| k.chars().count())
            .max()
            .unwrap_or(0)
    }
}

/// The server's summary keys are enum names (`ROLLED_BACK`); print them as
/// the labels used everywhere else (`rolled-back`).
pub fn summary_label(key: &str) -> String {
    match MachineState::from_str_name(&format!("MACHINE_STATE_{key}")) {
        Some(state) => state.label().to_owned(),
        None => key.to_ascii_lowercase().replace('_', "-"),
    }
}

#[cfg(test)]
mod tests {
    use procurator_proto::v1::{DeploymentFinished, DeploymentSubmitted};

    use super::*;

    fn ev(revision: u64, kind: event::Kind) -> Event {
        Event {
            revision,
            at_ms: 0,
            deployment_id: "d-1".into(),
            kind: Some(kind),
        }
    }

    fn machine(name: &str, state: MachineState) -> event::Kind {
        event::Kind::Machine(MachineUpdate {
            machine: name.into(),
            state: state as i32,
            ..Default::default()
        })
    }

    #[test]
    fn events_fold_into_per_machine_states_and_an_outcome() {
        let mut view = DeploymentView::new("d-1");
        view.apply(&ev(
            1,
            event::Kind::Submitted(DeploymentSubmitted {
                git_commit: "3f2c1a9".into(),
                machines: vec!["a".into(), "b".into()],
                submitted_by: "ci/ci".into(),
            }),
        ));
        assert_eq!(view.machines.len(), 2);
        assert_eq!(view.machines["a"].state, MachineState::Pending);
        view.apply(&ev(2, machine("a", MachineState::Succeeded)));
        view.apply(&ev(3, machine("b", MachineState::Skipped)));
        assert!(!view.finished);
        view.apply(&ev(
            4,
            event::Kind::Finished(DeploymentFinished {
                state: DeploymentState::Succeeded as i32,
                summary: Default::default(),
            }),
        ));
        assert!(view.finished);
        assert_eq!(view.outcome(), Outcome::Success);

        view.apply(&ev(5, machine("b", MachineState::RolledBack)));
        assert_eq!(
            view.outcome(),
            Outcome::DeploymentFailed,
            "a failed machine is a failure"
        );
    }

    #[test]
    fn superseded_and_running_deployments_are_not_successes() {
        let mut view = DeploymentView::new("d-1");
        assert_eq!(view.outcome(), Outcome::DeploymentFailed);
        view.state = DeploymentState::Superseded;
        assert_eq!(view.outcome(), Outcome::DeploymentFailed);
    }

    #[test]
    fn summary_keys_become_labels() {
        assert_eq!(summary_label("ROLLED_BACK"), "rolled-back");
        assert_eq!(summary_label("SUCCEEDED"), "succeeded");
        assert_eq!(summary_label("SOMETHING_NEW"), "something-new");
    }
}
