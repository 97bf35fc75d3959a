//! The artifact's `intents`: one signed statement per row (machine or VM
//! instance), each binding exactly what that row's agent will act on. The
//! artifact's parser checks that every statement says what the artifact
//! says, so a statement and the fields beside it can never disagree; who
//! signed it is for the agent to check (crate::intent).

use std::collections::BTreeSet;

use super::{DeploymentArtifact, Target};
use crate::intent::{Intent, IntentCheck, IntentError, SigningKey, Statement, VmIntent};
use crate::names::MachineName;

impl DeploymentArtifact {
    /// What `row` is to do, as a statement for it must say, stamped `issued_at_ms`.
    pub fn intent_for(&self, row: &Target<'_>, issued_at_ms: u64) -> Intent {
        let deployment = &row.spec.deployment;
        Intent {
            name: row.name.clone(),
            closure: row.closure.clone(),
            git_commit: self.git_commit.clone(),
            issued_at_ms,
            health_checks: deployment
                .health_checks
                .iter()
                .filter(|c| c.enabled)
                .map(|c| IntentCheck {
                    command: c.command.as_str().to_owned(),
                    timeout_secs: c.timeout.get(),
                    interval_secs: c.interval.get(),
                })
                .collect(),
            auto_rollback: deployment.auto_rollback,
            allow_reboot: deployment.allow_reboot,
            confirm_timeout_secs: self.rollout().confirm_timeout_secs(),
            vm: row.spec.is_vm().then(|| {
                let demand = super::Demand::of(row.spec);
                VmIntent {
                    machine: row.machine.clone(),
                    milli_cpus: demand.milli_cpus,
                    memory_bytes: demand.memory_bytes,
                }
            }),
        }
    }

    /// Sign a statement for every row with `key`, replacing any there were.
    pub fn sign(&mut self, key: &SigningKey, issued_at_ms: u64) -> Result<(), IntentError> {
        let intents = self
            .targets()
            .iter()
            .map(|row| {
                let statement = key.sign(&self.intent_for(row, issued_at_ms))?;
                Ok((row.name.clone(), statement))
            })
            .collect::<Result<_, IntentError>>()?;
        self.intents = intents;
        Ok(())
    }

    /// The statement for `row`, when the artifact is signed.
    pub fn statement(&self, row: &MachineName) -> Option<&Statement> {
        self.intents.get(row)
    }

    /// The names of the keys the statements say signed them (unverified).
    pub fn intent_key_names(&self) -> BTreeSet<&str> {
        self.intents.values().map(Statement::key_name).collect()
    }

    /// Unsigned, or a statement for every row and none for anything else,
    /// each saying exactly what the artifact says.
    pub(super) fn check_intents(&self) -> Result<(), String> {
        if self.intents.is_empty() {
            return Ok(());
        }
        let targets = self.targets();
        let rows: BTreeSet<&MachineName> = targets.iter().map(|t| &t.name).collect();
        if let Some(extra) = self.intents.keys().find(|k| !rows.contains(k)) {
            return Err(format!(
                "intents.{extra}: a statement for \"{extra}\", which is neither a machine of the blueprint nor one of its VM instances; sign the artifact again (procurator-ctl sign)"
            ));
        }
        for row in &targets {
            let Some(statement) = self.intents.get(&row.name) else {
                return Err(format!(
                    "intents.{0}: the artifact is signed, but \"{0}\" has no statement; sign the whole artifact again (procurator-ctl sign)",
                    row.name
                ));
            };
            let said = statement.unverified_intent();
            let expected = self.intent_for(row, said.issued_at_ms);
            let differ = said.differences(&expected);
            if !differ.is_empty() {
                return Err(format!(
                    "intents.{}: the statement disagrees with the artifact on {}; the artifact was changed after signing: sign it again (procurator-ctl sign)",
                    row.name,
                    differ.join(", ")
                ));
            }
        }
        Ok(())
    }
}
