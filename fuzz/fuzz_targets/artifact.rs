//! deployment.json as `validate`, Submit and the agent parse it: no input
//! panics or allocates past the limits, and what parses round-trips through
//! its canonical form and plans into waves that hold every row once.

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use procurator_core::DeploymentArtifact;
use procurator_core::limits::{MAX_MACHINES, MAX_ROWS, MAX_WAVES};

fuzz_target!(|data: &[u8]| {
    let Ok(artifact) = DeploymentArtifact::from_json(data) else {
        return;
    };
    assert!(artifact.blueprint.len() <= MAX_MACHINES);

    // The canonical form parses back to the same artifact and digest.
    let canonical = artifact.canonical_json();
    let again = DeploymentArtifact::from_json(canonical.as_bytes())
        .unwrap_or_else(|e| panic!("the canonical form does not parse: {e}\n{canonical}"));
    assert_eq!(again, artifact);
    assert_eq!(again.digest(), artifact.digest());
    assert_eq!(again.canonical_json(), canonical);

    // Every row is in exactly one wave, and no wave takes more than its count.
    let targets = artifact.targets();
    assert!(targets.len() <= MAX_ROWS);
    let rows: BTreeSet<String> = targets.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(rows.len(), targets.len(), "two rows of one name");
    let waves = artifact.waves();
    assert!(waves.len() <= MAX_WAVES + 1);
    let mut planned = BTreeSet::new();
    for wave in &waves {
        assert!(!wave.machines.is_empty(), "an empty wave: {}", wave.name);
        for m in &wave.machines {
            assert!(planned.insert(m.to_string()), "{m} is in two waves");
        }
    }
    assert_eq!(planned, rows);
    let rollout = artifact.rollout();
    for wave in &waves {
        let mut specs = rollout.waves.iter().filter(|w| w.name == wave.name);
        if let (Some(spec), None) = (specs.next(), specs.next())
            && let Some(count) = spec.count
        {
            assert!(
                wave.machines.len() <= count as usize,
                "{} over its count",
                wave.name
            );
        }
    }
    for target in &targets {
        let _ = artifact.enabled_health_checks(&target.name);
        let _ = artifact.statement(&target.name);
    }
});
