//! What the agent has to tell the control plane, kept across disconnects:
//! results are persisted in `STATE_DIR/results.json` until a stream took
//! them; of progress only the newest matters.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use procurator_proto::v1::{ActivationResult, Progress};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::journal::{read_json, write_json};
use crate::logbook::Logbook;
use crate::outcome::Outcome;

/// Results remembered, so a repeated desired state is answered, not re-run.
const KEPT_RESULTS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    outcome: Outcome,
    /// Written to a stream once; sent again after a reconnect if not.
    delivered: bool,
}

#[derive(Debug, Default)]
struct State {
    results: Vec<Stored>,
    /// Unsent progress, the newest of each phase in turn: a report replaces
    /// one of its own phase, never the last of an earlier one (a copy's
    /// final figures must not vanish behind "activating").
    progress: VecDeque<Progress>,
}

/// Phases one deployment reports in a row, at most.
const MAX_PENDING_PROGRESS: usize = 16;

/// The next message for the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Result(Outcome),
    Progress(Progress),
}

#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    /// Where each result's output comes from when it is sent (results.json
    /// would be rewritten with all of it on every change otherwise).
    logbook: Logbook,
    state: Mutex<State>,
    notify: Notify,
}

impl Outbox {
    /// Loads the results an earlier run left. A damaged file is logged and
    /// ignored: results are a courtesy, the journal is what keeps the machine safe.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("results.json");
        let results = match read_json::<Vec<Stored>>(&path) {
            Ok(results) => results.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "starting without earlier results");
                Vec::new()
            }
        };
        Self {
            path,
            logbook: Logbook::new(state_dir),
            state: Mutex::new(State {
                results,
                progress: VecDeque::new(),
            }),
            notify: Notify::new(),
        }
    }

    /// `outcome` as the message that carries it, with the deployment's log.
    pub fn result_message(&self, outcome: &Outcome) -> ActivationResult {
        ActivationResult {
            output: self.logbook.read(&outcome.deployment_id),
            ..outcome.to_proto()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn persist(&self, state: &State) {
        if let Err(e) = write_json(&self.path, &state.results) {
            tracing::warn!(error = %e, "cannot persist results; they are sent if the agent keeps running");
        }
    }

    /// Keeps `outcome` until it is delivered and answers repeats with it.
    pub fn record(&self, outcome: Outcome) {
        let mut state = self.lock();
        state
            .results
            .retain(|s| !same(&s.outcome, &outcome.deployment_id, &outcome.closure));
        state
            .progress
            .retain(|p| p.deployment_id != outcome.deployment_id);
        state.results.push(Stored {
            outcome,
            delivered: false,
        });
        while state.results.len() > KEPT_RESULTS {
            let oldest = state.results.iter().position(|s| s.delivered).unwrap_or(0);
            state.results.remove(oldest);
        }
        self.persist(&state);
        drop(state);
        self.notify.notify_one();
    }

    /// The result already produced for (deployment, closure), if any.
    #[cfg(test)]
    pub fn find(&self, deployment_id: &str, closure: &str) -> Option<Outcome> {
        let state = self.lock();
        state
            .results
            .iter()
            .find(|s| same(&s.outcome, deployment_id, closure))
            .map(|s| s.outcome.clone())
    }

    /// Sends the result for (deployment, closure) again; false if there is none.
    pub fn resend(&self, deployment_id: &str, closure: &str) -> bool {
        let mut state = self.lock();
        let Some(stored) = state
            .results
            .iter_mut()
            .find(|s| same(&s.outcome, deployment_id, closure))
        else {
            return false;
        };
        stored.delivered = false;
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Replaces unsent progress of the same deployment and phase, else
    /// queues behind it.
    pub fn progress(&self, progress: Progress) {
        let mut state = self.lock();
        let queue = &mut state.progress;
        match queue.back_mut() {
            Some(last)
                if last.deployment_id == progress.deployment_id && last.state == progress.state =>
            {
                *last = progress;
            }
            _ => {
                if queue.len() == MAX_PENDING_PROGRESS {
                    queue.pop_front();
                }
                queue.push_back(progress);
            }
        }
        drop(state);
        self.notify.notify_one();
    }

    /// Waits for the next message: undelivered results first, oldest first.
    /// A result stays next until [`Outbox::delivered`] is called.
    pub async fn next(&self) -> Outgoing {
        loop {
            let notified = self.notify.notified();
            {
                let mut state = self.lock();
                if let Some(stored) = state.results.iter().find(|s| !s.delivered) {
                    return Outgoing::Result(stored.outcome.clone());
                }
                if let Some(progress) = state.progress.pop_front() {
                    return Outgoing::Progress(progress);
                }
            }
            notified.await;
        }
    }

    /// Whether the result for `outcome`'s (deployment, closure) was written
    /// to a stream.
    pub fn is_delivered(&self, outcome: &Outcome) -> bool {
        self.lock()
            .results
            .iter()
            .any(|s| same(&s.outcome, &outcome.deployment_id, &outcome.closure) && s.delivered)
    }

    /// `outcome` was written to a stream.
    pub fn delivered(&self, outcome: &Outcome) {
        let mut state = self.lock();
        if let Some(stored) = state
            .results
            .iter_mut()
            .find(|s| s.outcome == *outcome && !s.delivered)
        {
            stored.delivered = true;
            self.persist(&state);
        }
    }
}

fn same(outcome: &Outcome, deployment_id: &str, closure: &str) -> bool {
    outcome.deployment_id == deployment_id && outcome.closure == closure
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use procurator_proto::v1::MachineState;

    use super::*;

    fn outcome(id: &str) -> Outcome {
        Outcome::succeeded(
            id,
            "/nix/store/x",
            MachineState::Succeeded,
            "/nix/store/x".into(),
        )
    }

    fn progress(id: &str, message: &str) -> Progress {
        Progress {
            deployment_id: id.into(),
            message: message.into(),
            ..Progress::default()
        }
    }

    #[tokio::test]
    async fn a_new_phase_queues_behind_the_last_report_of_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::load(dir.path());
        let at = |state: procurator_proto::v1::MachineState, message: &str| Progress {
            state: state.into(),
            ..progress("d-1", message)
        };
        use procurator_proto::v1::MachineState::{Activating, Copying};
        outbox.progress(at(Copying, "half"));
        outbox.progress(at(Copying, "copied"));
        outbox.progress(at(Activating, "switch"));
        assert_eq!(
            outbox.next().await,
            Outgoing::Progress(at(Copying, "copied"))
        );
        assert_eq!(
            outbox.next().await,
            Outgoing::Progress(at(Activating, "switch"))
        );
    }

    #[tokio::test]
    async fn results_come_first_and_survive_a_restart_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::load(dir.path());
        outbox.progress(progress("d-2", "copying"));
        outbox.record(outcome("d-1"));
        assert_eq!(outbox.next().await, Outgoing::Result(outcome("d-1")));
        // Not delivered yet: still next, and still there after a restart.
        assert_eq!(outbox.next().await, Outgoing::Result(outcome("d-1")));
        let outbox = Outbox::load(dir.path());
        assert_eq!(outbox.next().await, Outgoing::Result(outcome("d-1")));
        outbox.delivered(&outcome("d-1"));
        let outbox = Outbox::load(dir.path());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), outbox.next())
                .await
                .is_err()
        );
        // Delivered results are still known, and can be sent again.
        assert_eq!(outbox.find("d-1", "/nix/store/x"), Some(outcome("d-1")));
        assert!(outbox.resend("d-1", "/nix/store/x"));
        assert!(!outbox.resend("d-1", "/nix/store/y"));
        assert_eq!(outbox.next().await, Outgoing::Result(outcome("d-1")));
    }

    #[tokio::test]
    async fn only_the_newest_progress_is_kept_and_a_result_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::load(dir.path());
        outbox.progress(progress("d-1", "one"));
        outbox.progress(progress("d-1", "two"));
        assert_eq!(
            outbox.next().await,
            Outgoing::Progress(progress("d-1", "two"))
        );
        outbox.progress(progress("d-1", "three"));
        outbox.record(outcome("d-1"));
        outbox.delivered(&outcome("d-1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), outbox.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_up() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = std::sync::Arc::new(Outbox::load(dir.path()));
        let reader = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.next().await }
        });
        tokio::task::yield_now().await;
        outbox.progress(progress("d-1", "go"));
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, Outgoing::Progress(progress("d-1", "go")));
    }

    #[test]
    fn a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("results.json"), "[{").unwrap();
        let outbox = Outbox::load(dir.path());
        assert_eq!(outbox.find("d-1", "/nix/store/x"), None);
    }
}
