//! The agent's side of signed intent (DESIGN.md invariant 9): with intent
//! keys configured, a desired state is acted on only if its statement was
//! signed by one of them, is for this machine (or the VM instance at hand)
//! and its closure, and is newer than every statement accepted before. The
//! newest accepted statement per name is kept in `STATE_DIR/intents.json`,
//! written before anything is copied, so a restart does not reopen the door
//! to a replay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use procurator_core::MachineName;
use procurator_core::intent::{Intent, PublicKey, Statement};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Every refusal's reason starts so, on the machine's row and in the log.
pub const REFUSED: &str = "intent refused";

/// What the agent trusts to command it.
pub struct IntentPolicy {
    /// Empty: the control plane is trusted for commands (the old behaviour).
    keys: Vec<PublicKey>,
    ledger_path: PathBuf,
    /// The newest accepted statement per name, as on disk.
    ledger: Mutex<Ledger>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    accepted: BTreeMap<MachineName, Accepted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Accepted {
    issued_at_ms: u64,
    /// Hex SHA-256 of the statement's text: the same statement again is a
    /// repeat, not a replay.
    sha256: String,
    key: String,
    deployment_commit: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "cannot read {path}: {source}; remove it only if you accept that older signed deployments can be replayed once"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt ({source}); remove it only if you accept that older signed deployments can be replayed once"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl IntentPolicy {
    /// The policy for `keys`, with the ledger in `state_dir`. A ledger that
    /// cannot be read stops the agent: guessing would allow replays.
    pub fn load(keys: Vec<PublicKey>, state_dir: &Path) -> Result<Self, LedgerError> {
        let ledger_path = state_dir.join("intents.json");
        let ledger = match std::fs::read(&ledger_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
                path: ledger_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
            Err(source) => {
                return Err(LedgerError::Read {
                    path: ledger_path,
                    source,
                });
            }
        };
        Ok(Self {
            keys,
            ledger_path,
            ledger: Mutex::new(ledger),
        })
    }

    /// Whether statements are checked at all.
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The intent `statement` signs for `name` running `closure`, or why it
    /// is refused (starting with [`REFUSED`]). `Ok(None)`: no keys are
    /// configured, so the control plane's fields are used as they are.
    pub fn admit(
        &self,
        name: &MachineName,
        closure: &str,
        statement: &str,
    ) -> Result<Option<Intent>, String> {
        if !self.enforced() {
            return Ok(None);
        }
        let refuse = |why: String| format!("{REFUSED}: {why}");
        if statement.is_empty() {
            return Err(refuse(format!(
                "the control plane sent no signed statement, and this agent acts only on intents signed by {}",
                self.key_names()
            )));
        }
        let parsed = Statement::parse(statement).map_err(|e| refuse(e.to_string()))?;
        let intent = parsed
            .verify(&self.keys)
            .map_err(|e| refuse(e.to_string()))?;
        if &intent.name != name {
            return Err(refuse(format!(
                "the statement is for {}, not for {name}",
                intent.name
            )));
        }
        if intent.closure.as_str() != closure {
            return Err(refuse(format!(
                "the statement is for closure {}, not {} that the control plane sent",
                intent.closure,
                crate::desired::clip(closure, 300)
            )));
        }
        let accepted = Accepted {
            issued_at_ms: intent.issued_at_ms,
            sha256: hex::encode(Sha256::digest(statement.as_bytes())),
            key: parsed.key_name().to_owned(),
            deployment_commit: intent.git_commit.to_string(),
        };
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        match ledger.accepted.get(name) {
            Some(newest) if *newest == accepted => return Ok(Some(intent.clone())),
            Some(newest) if newest.issued_at_ms >= accepted.issued_at_ms => {
                return Err(refuse(format!(
                    "the statement was issued at {} (commit {}), not after the newest this machine accepted, issued at {} (commit {}): an older deployment cannot be replayed; sign a new statement (procurator-ctl sign, or rollback --intent-key)",
                    format_ms(accepted.issued_at_ms),
                    accepted.deployment_commit,
                    format_ms(newest.issued_at_ms),
                    newest.deployment_commit
                )));
            }
            _ => {}
        }
        let mut next = ledger.clone();
        next.accepted.insert(name.clone(), accepted);
        self.persist(&next).map_err(|e| {
            refuse(format!(
                "cannot record it in {} before acting on it: {e}",
                self.ledger_path.display()
            ))
        })?;
        *ledger = next;
        Ok(Some(intent.clone()))
    }

    fn persist(&self, ledger: &Ledger) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(ledger).map_err(std::io::Error::other)?;
        crate::journal::write_atomically(&self.ledger_path, &bytes)
    }

    fn key_names(&self) -> String {
        let names: Vec<&str> = self.keys.iter().map(PublicKey::name).collect();
        names.join(", ")
    }
}

/// Unix milliseconds as RFC 3339 UTC, for refusals a human reads.
fn format_ms(ms: u64) -> String {
    let at = i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    match at.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    }) {
        Some(text) => text,
        None => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests;
