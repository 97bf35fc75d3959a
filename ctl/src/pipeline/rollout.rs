//! `--rollout FILE`: the artifact's optional `rollout` object
//! (docs/rollouts.md), and the wave plan it gives for the evaluated fleet.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use procurator_core::artifact::{PlannedWave, Rollout};
use serde_json::{Value, json};

use super::Evaluated;
use super::artifact::{Commit, render};

/// The `rollout` object in FILE, as written (so the artifact carries it
/// verbatim). The file holds the object itself; `{"rollout": {…}}` is
/// accepted too, as that is how it looks inside deployment.json.
pub fn load(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --rollout {}", path.display()))?;
    let mut value: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "--rollout {}: not JSON: {e}; it should hold the rollout object, e.g. {{\"waves\": [{{\"name\": \"canary\", \"count\": 1}}]}}",
            path.display()
        )
    })?;
    if let Some(inner) = value.as_object_mut().and_then(|o| {
        if o.len() == 1 {
            o.remove("rollout")
        } else {
            None
        }
    }) {
        value = inner;
    }
    // The shape is checked now, before a build; what depends on the
    // blueprint (machine names) once the artifact is put together.
    serde_json::from_value::<Rollout>(value.clone()).map_err(|e| {
        anyhow!(
            "--rollout {}: {e}; see docs/rollouts.md for the fields",
            path.display()
        )
    })?;
    Ok(value)
}

/// The waves this rollout gives for the evaluated machines, checked as the
/// control plane checks them (by parsing a whole artifact).
pub fn plan(rollout: &Value, evaluated: &Evaluated) -> anyhow::Result<Vec<PlannedWave>> {
    // `plan` has no commit to stamp; this artifact is only parsed, never
    // written or submitted, so any well-formed one does.
    let commit = Commit::placeholder()?;
    let (artifact, _) = render(&commit, Some(rollout), evaluated)?;
    Ok(artifact.waves())
}

/// `waves:` then one line per wave: `  1/3 canary  worker-1`.
pub fn waves_text(waves: &[PlannedWave]) -> String {
    let width = waves
        .iter()
        .map(|w| w.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::from("waves:\n");
    for (i, w) in waves.iter().enumerate() {
        let machines: Vec<&str> = w.machines.iter().map(|m| m.as_str()).collect();
        out.push_str(&format!(
            "  {}/{} {:<width$}  {}\n",
            i + 1,
            waves.len(),
            w.name,
            machines.join(", ")
        ));
    }
    out
}

pub fn waves_json(waves: &[PlannedWave]) -> Value {
    Value::Array(
        waves
            .iter()
            .map(|w| json!({ "name": w.name, "machines": w.machines }))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use procurator_core::MachineName;

    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn the_object_is_read_bare_or_wrapped() {
        let bare = write(r#"{"failureBudget": 1}"#);
        assert_eq!(load(bare.path()).unwrap(), json!({"failureBudget": 1}));
        let wrapped = write(r#"{"rollout": {"maxInFlight": 2}}"#);
        assert_eq!(load(wrapped.path()).unwrap(), json!({"maxInFlight": 2}));
    }

    #[test]
    fn a_bad_rollout_is_refused_before_a_build() {
        let err = load(write(r#"{"failureBugdet": 1}"#).path()).unwrap_err();
        assert!(err.to_string().contains("failureBugdet"), "{err}");
        let err = load(write("{").path()).unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
        let err = load(Path::new("/nonexistent/rollout.json")).unwrap_err();
        assert!(err.to_string().contains("--rollout"), "{err}");
    }

    #[test]
    fn waves_are_listed_in_order() {
        let name = |n: &str| MachineName::parse(n).unwrap();
        let waves = vec![
            PlannedWave {
                name: "canary".into(),
                machines: vec![name("worker-1")],
            },
            PlannedWave {
                name: "rest".into(),
                machines: vec![name("worker-2"), name("worker-3")],
            },
        ];
        assert_eq!(
            waves_text(&waves),
            "waves:\n  1/2 canary  worker-1\n  2/2 rest    worker-2, worker-3\n"
        );
        assert_eq!(
            waves_json(&waves)[1],
            json!({"name": "rest", "machines": ["worker-2", "worker-3"]})
        );
    }
}
