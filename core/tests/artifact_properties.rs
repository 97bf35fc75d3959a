//! Properties of deployment.json over generated artifacts: whatever a
//! blueprint holds, the parser takes it, its canonical form parses back to
//! the same artifact and digest, layout does not change the digest, what it
//! deploys does, and the rollout puts every row in exactly one wave.

use std::collections::BTreeSet;

use procurator_core::DeploymentArtifact;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const BASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";

fn store_path() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(proptest::sample::select(BASE32.as_bytes().to_vec()), 32),
        "[a-zA-Z0-9][a-zA-Z0-9+._?=-]{0,40}",
    )
        .prop_map(|(hash, name)| {
            format!(
                "/nix/store/{}-{name}",
                String::from_utf8(hash).unwrap_or_default()
            )
        })
}

fn health_check() -> impl Strategy<Value = Value> {
    // Not blank: a command of spaces is refused, as it should be.
    ("[!-~][ -~]{0,39}", 1u32..=86_400, 1u32..=600, any::<bool>()).prop_map(
        |(command, timeout, interval, enabled)| {
            json!({ "command": command, "timeout": timeout, "interval": interval, "enabled": enabled })
        },
    )
}

fn machine() -> impl Strategy<Value = Value> {
    (
        prop_oneof!["web", "db", "worker"],
        0.001f64..256.0,
        (
            0.001f64..64.0,
            prop_oneof!["MB", "GB", "TB", "MiB", "GiB", "TiB"],
        ),
        proptest::collection::vec("[a-z]{1,6}", 0..4),
        prop_oneof![Just("ssh"), Just("cloud-hypervisor"), Just("qemu")],
        1u32..=4,
        proptest::collection::vec(health_check(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(role, cpu, (amount, unit), labels, backend, replicas, checks, reboot)| {
                let mut spec = json!({
                    "role": role, "cpu": cpu, "memory": { "amount": amount, "unit": unit },
                    "labels": labels,
                    "deployment": { "addr": "192.0.2.1", "backend": backend,
                                    "healthChecks": checks, "allowReboot": reboot },
                });
                if backend != "ssh" {
                    spec["replicas"] = json!(replicas);
                }
                spec
            },
        )
}

/// (deployment.json as a value, its machine names)
fn artifact() -> impl Strategy<Value = Value> {
    // A name ends in a letter: a replicated machine's instances are NAME-1,
    // NAME-2…, and a row named like one of them is refused, as it should be.
    let machines = proptest::collection::btree_map("[a-z]([a-z0-9-]{0,9}[a-z])?", machine(), 1..8);
    (machines, any::<u64>(), proptest::option::of(0u32..4), 0u32..3)
        .prop_flat_map(|(blueprint, commit, max_in_flight, budget)| {
            let names: Vec<String> = blueprint.keys().cloned().collect();
            let closures = proptest::collection::vec(store_path(), names.len());
            let waves = proptest::collection::vec(
                (
                    "[a-z]{1,8}",
                    proptest::option::of(proptest::sample::subsequence(names.clone(), 0..=names.len())),
                    proptest::option::of(proptest::collection::vec(prop_oneof!["web", "db"], 1..2)),
                    proptest::option::of(1u32..4),
                ),
                0..3,
            );
            (Just(blueprint), Just(names), closures, waves, Just(commit), Just(max_in_flight), Just(budget))
        })
        .prop_map(|(blueprint, names, closures, waves, commit, max_in_flight, budget)| {
            let closures: Map<String, Value> = names
                .iter()
                .cloned()
                .zip(closures.into_iter().map(Value::String))
                .collect();
            let mut artifact = json!({
                "gitCommit": format!("{commit:040x}"),
                "blueprint": blueprint,
                "closures": closures,
            });
            if let Some(max_in_flight) = max_in_flight {
                let waves: Vec<Value> = waves
                    .into_iter()
                    .map(|(name, machines, roles, count)| {
                        let mut wave = json!({ "name": name });
                        if let Some(m) = machines {
                            wave["machines"] = json!(m);
                        }
                        if let Some(r) = roles {
                            wave["roles"] = json!(r);
                        }
                        if let Some(c) = count {
                            wave["count"] = json!(c);
                        }
                        wave
                    })
                    .collect();
                artifact["rollout"] =
                    json!({ "maxInFlight": max_in_flight, "failureBudget": budget, "waves": waves });
            }
            artifact
        })
}

fn parse(text: &str) -> DeploymentArtifact {
    DeploymentArtifact::from_json(text.as_bytes())
        .unwrap_or_else(|e| panic!("a valid artifact was refused: {e}\n{text}"))
}

proptest! {
    // No regression files: a failure prints its minimal input, which goes
    // into a test of its own.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_canonical_form_round_trips(value in artifact()) {
        let parsed = parse(&value.to_string());
        let canonical = parsed.canonical_json();
        let again = parse(&canonical);
        prop_assert_eq!(&again, &parsed);
        prop_assert_eq!(again.digest(), parsed.digest());
        prop_assert_eq!(again.canonical_json(), canonical);
    }

    #[test]
    fn layout_does_not_change_the_digest(value in artifact()) {
        let compact = parse(&value.to_string());
        let pretty = parse(&serde_json::to_string_pretty(&value).unwrap_or_default());
        prop_assert_eq!(compact.digest(), pretty.digest());
    }

    #[test]
    fn another_closure_is_another_digest(value in artifact(), other in store_path()) {
        let parsed = parse(&value.to_string());
        let mut changed = value.clone();
        let first = parsed.closures.keys().next().map(ToString::to_string).unwrap_or_default();
        prop_assume!(parsed.closures.values().next().map(|c| c.as_str()) != Some(other.as_str()));
        changed["closures"][&first] = json!(other);
        prop_assert_ne!(parse(&changed.to_string()).digest(), parsed.digest());
    }

    #[test]
    fn every_row_is_in_exactly_one_wave(value in artifact()) {
        let parsed = parse(&value.to_string());
        let rows: BTreeSet<String> = parsed.targets().iter().map(|t| t.name.to_string()).collect();
        let mut planned = BTreeSet::new();
        for wave in parsed.waves() {
            prop_assert!(!wave.machines.is_empty());
            for m in wave.machines {
                prop_assert!(planned.insert(m.to_string()), "{} is in two waves", m);
            }
        }
        prop_assert_eq!(planned, rows);
    }
}
