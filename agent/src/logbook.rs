//! The output of this machine's recent deployments: every command each one
//! ran (copy, switches, health-check attempts, profile, confirmation,
//! rollback), one section per command, in `STATE_DIR/logs/<deployment>.log`.
//! It is sent with the result and kept for the newest
//! [`KEPT_ACTIVATION_LOGS`] deployments, each within
//! [`MAX_ACTIVATION_LOG_BYTES`]: a restart mid-deployment appends to it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use procurator_core::DeploymentId;
use procurator_core::atomic_file::{PRIVATE, write_atomically};
use procurator_core::limits::{KEPT_ACTIVATION_LOGS, MAX_ACTIVATION_LOG_BYTES};
use procurator_core::output::BoundedOutput;

#[derive(Debug, Clone)]
pub struct Logbook {
    dir: PathBuf,
}

impl Logbook {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("logs"),
        }
    }

    /// Where `deployment_id`'s log is, if the id can name a file (every id
    /// the control plane assigns can; anything else is not logged).
    fn path(&self, deployment_id: &str) -> Option<PathBuf> {
        DeploymentId::parse(deployment_id)
            .ok()
            .map(|id| self.dir.join(format!("{id}.log")))
    }

    /// The log of `deployment_id` to add to: what an earlier run of the
    /// agent wrote for it, or a new one (and the oldest logs beyond the
    /// kept number are removed).
    pub fn open(&self, deployment_id: &str) -> ActivationLog {
        let path = self.path(deployment_id);
        let output = match &path {
            Some(path) if path.exists() => read_bounded(path),
            Some(_) => {
                self.prune(KEPT_ACTIVATION_LOGS.saturating_sub(1));
                BoundedOutput::new(MAX_ACTIVATION_LOG_BYTES)
            }
            None => BoundedOutput::new(MAX_ACTIVATION_LOG_BYTES),
        };
        ActivationLog { path, output }
    }

    /// `deployment_id`'s log as kept (empty when there is none).
    pub fn read(&self, deployment_id: &str) -> String {
        self.path(deployment_id)
            .filter(|p| p.exists())
            .map(|p| read_bounded(&p).render())
            .unwrap_or_default()
    }

    /// Removes all but the `keep` newest logs.
    fn prune(&self, keep: usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        logs.sort_by(|a, b| b.cmp(a));
        for (_, old) in logs.into_iter().skip(keep) {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!(file = %old.display(), error = %e, "cannot remove an old deployment log");
            }
        }
    }
}

fn read_bounded(path: &Path) -> BoundedOutput {
    let read = File::open(path)
        .and_then(|f| BoundedOutput::read(BufReader::new(f), MAX_ACTIVATION_LOG_BYTES));
    read.unwrap_or_else(|e| {
        tracing::warn!(file = %path.display(), error = %e, "cannot read a deployment log");
        BoundedOutput::new(MAX_ACTIVATION_LOG_BYTES)
    })
}

/// One deployment's log, written through after every section.
#[derive(Debug)]
pub struct ActivationLog {
    path: Option<PathBuf>,
    output: BoundedOutput,
}

impl ActivationLog {
    /// Adds `== title` and `output` below it, and saves the log. A log that
    /// cannot be saved is only a warning: the deployment goes on.
    pub fn section(&mut self, title: &str, output: &str) {
        self.output.push(&format!("== {title}"));
        self.output.push_text(output);
        let Some(path) = &self.path else { return };
        let saved = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| write_atomically(path, self.output.render().as_bytes(), PRIVATE));
        if let Err(e) = saved {
            tracing::warn!(file = %path.display(), error = %e, "cannot save the deployment log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_saved_and_an_open_after_a_restart_appends() {
        let dir = tempfile::tempdir().unwrap();
        let logbook = Logbook::new(dir.path());
        let mut log = logbook.open("d-1");
        log.section("switch-to-configuration test: exit status 0", "one\ntwo");
        drop(log);
        let mut again = logbook.open("d-1");
        again.section("rolled back", "");
        assert_eq!(
            logbook.read("d-1"),
            "== switch-to-configuration test: exit status 0\none\ntwo\n== rolled back"
        );
        assert_eq!(logbook.read("d-2"), "");
    }

    #[test]
    fn only_the_newest_logs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let logbook = Logbook::new(dir.path());
        for n in 0..KEPT_ACTIVATION_LOGS + 5 {
            logbook.open(&format!("d-{n}")).section("ran", "");
            // Modification times must differ for "newest" to mean anything.
            let path = logbook.path(&format!("d-{n}")).unwrap();
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + n as u64);
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        let kept: Vec<String> = (0..KEPT_ACTIVATION_LOGS + 5)
            .map(|n| format!("d-{n}"))
            .filter(|id| !logbook.read(id).is_empty())
            .collect();
        assert_eq!(kept.len(), KEPT_ACTIVATION_LOGS);
        assert_eq!(kept[0], "d-5", "the oldest five went");
    }

    #[test]
    fn an_id_that_cannot_name_a_file_is_not_logged() {
        let dir = tempfile::tempdir().unwrap();
        let logbook = Logbook::new(dir.path());
        logbook.open("../escape").section("ran", "");
        assert_eq!(logbook.read("../escape"), "");
        assert!(!dir.path().join("escape.log").exists());
        assert!(!dir.path().join("logs").exists());
    }

    #[test]
    fn a_log_stays_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let logbook = Logbook::new(dir.path());
        let mut log = logbook.open("d-big");
        let line = "y".repeat(100);
        for i in 0..10 {
            log.section(
                &format!("attempt {i}"),
                &vec![line.as_str(); 1000].join("\n"),
            );
        }
        let kept = logbook.read("d-big");
        assert!(kept.len() <= MAX_ACTIVATION_LOG_BYTES, "{}", kept.len());
        assert!(kept.starts_with("== attempt 0\n"));
        assert!(kept.contains("== attempt 9\n"));
        assert!(kept.contains(" left out …]"));
    }
}
