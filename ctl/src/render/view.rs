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
    /// The 0-based index of the machine's wave, once known.
    pub wave: Option<u32>,
    /// The new closure needs a reboot the agent was not allowed to do.
    pub reboot_required: bool,
    /// When it left pending (Unix ms, the control plane's clock); 0: not yet.
    pub since_ms: i64,
    /// When it reached a final state; 0: not yet.
    pub ended_ms: i64,
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
            wave: None,
            reboot_required: false,
            since_ms: 0,
            ended_ms: 0,
        }
    }
}

impl MachineView {
    /// How long it has been (or was) on the deployment, as of `now_ms`.
    pub fn elapsed_ms(&self, now_ms: i64) -> Option<i64> {
        if self.since_ms == 0 {
            return None;
        }
        let until = if self.ended_ms != 0 {
            self.ended_ms
        } else {
            now_ms
        };
        Some((until - self.since_ms).max(0))
    }
}

/// The wave being rolled out, from the latest `WaveStarted` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveView {
    /// 0-based.
    pub index: u32,
    pub total: u32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentView {
    pub id: String,
    pub git_commit: String,
    pub machines: BTreeMap<String, MachineView>,
    pub state: DeploymentState,
    /// Set once the `DeploymentFinished` event (or a final `GetDeployment`) was seen.
    pub finished: bool,
    /// Why the rollout halted or was cancelled, when it did.
    pub halted_reason: String,
    /// The machines whose failures used up the budget.
    pub halted_machines: Vec<String>,
    /// The wave rolling out now (or last), when the deployment has waves.
    pub wave: Option<WaveView>,
    /// The deployment this one rolls back to, when it is a rollback.
    pub rollback_of: String,
    /// The keys its statements say signed them; empty when unsigned.
    pub intent_keys: Vec<String>,
    /// Who submitted it with force; empty when nobody did.
    pub forced_by: String,
    /// When it was submitted (Unix ms); 0: not known.
    pub created_ms: i64,
}

impl DeploymentView {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            git_commit: String::new(),
            machines: BTreeMap::new(),
            state: DeploymentState::Running,
            finished: false,
            halted_reason: String::new(),
            halted_machines: Vec::new(),
            wave: None,
            rollback_of: String::new(),
            intent_keys: Vec::new(),
            forced_by: String::new(),
            created_ms: 0,
        }
    }

    /// Take over everything `GetDeployment` reports: it is authoritative.
    pub fn merge(&mut self, d: &Deployment) {
        self.git_commit.clone_from(&d.git_commit);
        self.state = d.state();
        self.finished = self.state.is_final();
        if !d.halted_reason.is_empty() {
            self.halted_reason.clone_from(&d.halted_reason);
        }
        self.rollback_of.clone_from(&d.rollback_of);
        self.intent_keys.clone_from(&d.intent_keys);
        self.forced_by.clone_from(&d.forced_by);
        if d.created_at_ms != 0 {
            self.created_ms = d.created_at_ms;
        }
        let has_waves = !d.waves.is_empty();
        for m in &d.machines {
            // The row says when it last changed, not when it began: the best
            // there is for a machine already under way.
            let known = self.machines.get(&m.machine);
            let since_ms = match known {
                Some(k) if k.since_ms != 0 => k.since_ms,
                _ if m.state() != MachineState::Pending => m.updated_at_ms,
                _ => 0,
            };
            let ended_ms = match known {
                Some(k) if k.ended_ms != 0 => k.ended_ms,
                _ if m.state().is_final() => m.updated_at_ms,
                _ => 0,
            };
            self.machines.insert(
                m.machine.clone(),
                MachineView {
                    since_ms,
                    ended_ms,
                    state: m.state(),
                    failed_phase: m.failed_phase(),
                    closure: m.closure.clone(),
                    message: m.reason.clone(),
                    output_tail: m.output_tail.clone(),
                    copy: m.copy,
                    wave: has_waves.then_some(m.wave),
                    reboot_required: m.reboot_required,
                },
            );
        }
        // The newest wave that has a machine beyond pending is the current one.
        let total = u32::try_from(d.waves.len()).unwrap_or(u32::MAX);
        let started = d.waves.iter().rev().find(|w| {
            w.machines.iter().any(|name| {
                self.machines
                    .get(name)
                    .is_some_and(|m| m.state != MachineState::Pending)
            })
        });
        if let Some(w) = started.or(d.waves.first()) {
            self.wave = Some(WaveView {
                index: w.index,
                total,
                name: w.name.clone(),
            });
        }
    }

    pub fn apply(&mut self, ev: &Event) {
        match &ev.kind {
            Some(event::Kind::Submitted(s)) => {
                if self.created_ms == 0 {
                    self.created_ms = ev.at_ms;
                }
                self.git_commit.clone_from(&s.git_commit);
                self.intent_keys.clone_from(&s.intent_keys);
                self.forced_by.clone_from(&s.forced_by);
                for m in &s.machines {
                    self.machines.entry(m.clone()).or_default();
                }
            }
            Some(event::Kind::Machine(u)) => self.apply_machine(u, ev.at_ms),
            Some(event::Kind::Finished(f)) => {
                self.state = f.state();
                self.finished = true;
            }
            Some(event::Kind::WaveStarted(w)) => {
                for name in &w.machines {
                    self.machines.entry(name.clone()).or_default().wave = Some(w.index);
                }
                self.wave = Some(WaveView {
                    index: w.index,
                    total: w.total,
                    name: w.name.clone(),
                });
            }
            Some(event::Kind::Halted(h)) => {
                self.halted_reason.clone_from(&h.reason);
                self.halted_machines.clone_from(&h.failed_machines);
            }
            Some(
                event::Kind::Agent(_)
                | event::Kind::VmsPlaced(_)
                | event::Kind::Cancelled(_)
                | event::Kind::Certificate(_),
            )
            | None => {}
        }
    }

    fn apply_machine(&mut self, u: &MachineUpdate, at_ms: i64) {
        let m = self.machines.entry(u.machine.clone()).or_default();
        let state = u.state();
        if m.since_ms == 0 && state != MachineState::Pending {
            m.since_ms = at_ms;
        }
        if state.is_final() {
            if m.ended_ms == 0 {
                m.ended_ms = at_ms;
            }
        } else {
            m.ended_ms = 0;
        }
        // Not every update repeats the closure: keep the last one seen. Copy
        // figures mean something only while copying.
        m.state = state;
        m.failed_phase = u.failed_phase();
        if !u.closure.is_empty() {
            m.closure.clone_from(&u.closure);
        }
        m.message.clone_from(&u.message);
        m.output_tail.clone_from(&u.output_tail);
        m.reboot_required |= u.reboot_required;
        if u.copy.is_some() {
            m.copy = u.copy;
        } else if state != MachineState::Copying {
            m.copy = None;
        }
    }

    /// 0 if the deployment succeeded; 3 if it failed, halted, was superseded
    /// or cancelled, or any machine failed, rolled back or was unreachable.
    pub fn outcome(&self) -> Outcome {
        let any_failed = self.machines.values().any(|m| m.state.is_failure());
        if self.state == DeploymentState::Succeeded && !any_failed {
            Outcome::Success
        } else {
            Outcome::DeploymentFailed
        }
    }

    /// Machines that were never sent the deployment (pending) or were
    /// cancelled: what a halt leaves exactly as it was.
    pub fn left_alone(&self) -> usize {
        self.machines
            .values()
            .filter(|m| matches!(m.state, MachineState::Pending | MachineState::Cancelled))
            .count()
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
    use procurator_proto::v1::{
        DeploymentFinished, DeploymentSubmitted, RolloutHalted, WaveStarted,
    };

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
                ..Default::default()
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
    fn waves_and_halts_are_remembered_and_a_halt_exits_3() {
        let mut view = DeploymentView::new("d-1");
        view.apply(&ev(
            1,
            event::Kind::WaveStarted(WaveStarted {
                index: 1,
                total: 3,
                name: "canary".into(),
                machines: vec!["worker-1".into()],
            }),
        ));
        assert_eq!(view.machines["worker-1"].wave, Some(1));
        assert_eq!(view.wave.as_ref().map(|w| w.name.as_str()), Some("canary"));
        view.apply(&ev(
            2,
            event::Kind::Halted(RolloutHalted {
                reason: "1 machine failed".into(),
                failed_machines: vec!["worker-1".into()],
            }),
        ));
        assert_eq!(view.halted_machines, ["worker-1"]);
        view.apply(&ev(
            3,
            event::Kind::Finished(DeploymentFinished {
                state: DeploymentState::Halted as i32,
                summary: Default::default(),
            }),
        ));
        assert!(view.finished);
        assert_eq!(view.outcome(), Outcome::DeploymentFailed);
    }

    #[test]
    fn reboot_required_sticks_once_reported() {
        let mut view = DeploymentView::new("d-1");
        view.apply(&ev(
            1,
            event::Kind::Machine(MachineUpdate {
                machine: "a".into(),
                state: MachineState::Committing as i32,
                reboot_required: true,
                ..Default::default()
            }),
        ));
        view.apply(&ev(2, machine("a", MachineState::Succeeded)));
        assert!(view.machines["a"].reboot_required);
    }

    #[test]
    fn summary_keys_become_labels() {
        assert_eq!(summary_label("ROLLED_BACK"), "rolled-back");
        assert_eq!(summary_label("SUCCEEDED"), "succeeded");
        assert_eq!(summary_label("SOMETHING_NEW"), "something-new");
    }
}
