//! Signing deployment intent (`--intent-key`): a statement per machine and
//! VM instance, in the artifact's `intents`, so that agents started with
//! the key's public half act on exactly what CI (or an operator) signed and
//! nothing a control plane says (docs/interfaces.md, "Signed intent").

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use procurator_core::DeploymentArtifact;
use procurator_core::intent::{PublicKey, SigningKey};
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct IntentKeyArgs {
    /// Sign what each machine is to do with this key, made by `nix key
    /// generate-secret --key-name NAME`; agents given its public half
    /// (`--intent-public-key`) act only on what it signed.
    #[arg(long, env = "PROCURATOR_INTENT_KEY", value_name = "FILE")]
    pub intent_key: Option<PathBuf>,
}

impl IntentKeyArgs {
    /// The key, read now so a bad file fails before anything is built.
    pub fn load(&self) -> anyhow::Result<Option<SigningKey>> {
        self.intent_key.as_deref().map(read_key).transpose()
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct IntentPublicKeyArgs {
    /// Check that every statement was signed by this key, `NAME:BASE64` as
    /// `nix key convert-secret-to-public` prints it (repeatable; the
    /// environment variable is space separated): as the agents will.
    #[arg(
        long = "intent-public-key",
        env = "PROCURATOR_INTENT_PUBLIC_KEYS",
        value_name = "KEY",
        value_delimiter = ' '
    )]
    pub intent_public_keys: Vec<String>,
}

impl IntentPublicKeyArgs {
    pub fn keys(&self) -> anyhow::Result<Vec<PublicKey>> {
        self.intent_public_keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.parse()
                    .map_err(|e| anyhow!("--intent-public-key {k:?}: {e}"))
            })
            .collect()
    }
}

/// Checks, as an agent would, that every row's statement was signed by
/// one of `keys`; returns how many were checked.
pub fn verify_all(artifact: &DeploymentArtifact, keys: &[PublicKey]) -> anyhow::Result<usize> {
    let rows = artifact.targets();
    for row in &rows {
        let statement = artifact.statement(&row.name).ok_or_else(|| {
            anyhow!(
                "intents.{}: there is no statement for {}: the artifact is not signed",
                row.name,
                row.name
            )
        })?;
        statement
            .verify(keys)
            .map_err(|e| anyhow!("intents.{}: {e}", row.name))?;
    }
    Ok(rows.len())
}

pub fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    SigningKey::read(path).map_err(|e| anyhow!("--intent-key: {e}"))
}

/// Unix milliseconds now: a statement's issue time.
pub fn now_ms() -> u64 {
    u64::try_from(procurator_core::now_ms()).unwrap_or(0)
}

/// `text` (a valid artifact) with a fresh statement for every row, signed by
/// `key` and issued now, replacing any it had; the rest of the text is kept
/// as it was. Checked again as the control plane will check it.
pub fn sign_text(text: &str, key: &SigningKey) -> anyhow::Result<(DeploymentArtifact, String)> {
    let mut artifact = DeploymentArtifact::from_json(text.as_bytes())
        .context("the artifact is not valid; nothing was signed")?;
    artifact
        .sign(key, now_ms())
        .map_err(|e| anyhow!("cannot sign the artifact: {e}"))?;
    let mut value: Value = serde_json::from_str(text).context("the artifact is not valid JSON")?;
    value["intents"] =
        serde_json::to_value(&artifact.intents).context("cannot serialize the statements")?;
    let mut signed =
        serde_json::to_string_pretty(&value).context("cannot serialize the artifact")?;
    signed.push('\n');
    let checked = DeploymentArtifact::from_json(signed.as_bytes())
        .context("the signed artifact would not be valid; nothing was written")?;
    Ok((checked, signed))
}

#[cfg(test)]
mod tests {
    use procurator_core::MachineName;
    use serde_json::json;

    use super::*;

    #[test]
    fn signing_adds_a_statement_per_row_and_keeps_the_rest() {
        let text = json!({
            "gitCommit": "3f2c1a9",
            "blueprint": {"worker-1": {"role": "w", "cpu": 1, "memory": {"amount": 1, "unit": "GB"},
                "deployment": {"addr": "x", "backend": "nixos"}}},
            "closures": {"worker-1": "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1"}
        })
        .to_string();
        let key = SigningKey::generate("ci-1").unwrap();
        let (artifact, signed) = sign_text(&text, &key).unwrap();
        let statement = artifact
            .statement(&MachineName::parse("worker-1").unwrap())
            .unwrap();
        let intent = statement.verify(&[key.public_key()]).unwrap();
        assert!(intent.issued_at_ms > 1_700_000_000_000);
        let value: Value = serde_json::from_str(&signed).unwrap();
        assert!(
            value["blueprint"]["worker-1"].get("replicas").is_none(),
            "not normalized"
        );
        // Signing again replaces the statements with newer ones.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (again, _) = sign_text(&signed, &key).unwrap();
        let newer = again.intents.values().next().unwrap().unverified_intent();
        assert!(newer.issued_at_ms > intent.issued_at_ms);

        assert_eq!(verify_all(&again, &[key.public_key()]).unwrap(), 1);
        let other = SigningKey::generate("ci-2").unwrap();
        let err = verify_all(&again, &[other.public_key()]).unwrap_err();
        assert!(
            err.to_string().contains("signed by unknown key ci-1"),
            "{err}"
        );
        let unsigned = DeploymentArtifact::from_json(text.as_bytes()).unwrap();
        let err = verify_all(&unsigned, &[key.public_key()]).unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
    }
}
