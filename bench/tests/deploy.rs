//! `procurator-bench deploy` end to end: one run on one host writes positive
//! samples for the floor and for Procurator, with and without a health
//! check. Not a timed assertion: the numbers are only checked to exist.
//!
//! Needs root and the binaries (`cargo build --workspace --bins`), like the
//! integration tests.

use std::process::Command;

use serde_json::Value;

fn positive_samples(case: &Value, key: &str) -> Vec<f64> {
    let samples: Vec<f64> = case[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {case}"))
        .iter()
        .map(|v| {
            v.as_f64()
                .unwrap_or_else(|| panic!("{key}: {v} is no number"))
        })
        .collect();
    assert_eq!(samples.len(), 1, "{key}: one sample per run: {case}");
    for s in &samples {
        assert!(s.is_finite() && *s > 0.0, "{key}: {s} is not positive");
    }
    samples
}

#[test]
fn one_run_on_one_host_measures_floor_and_procurator_in_both_modes() {
    // Like the integration tests: not root is a failure that says so, not a pass.
    procurator_integration_tests::require_root().expect("the deploy benchmark needs root");
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("deploy.json");
    let out = Command::new(env!("CARGO_BIN_EXE_procurator-bench"))
        .args(["deploy", "--runs", "1", "--hosts", "1", "--json"])
        .arg(&json)
        .output()
        .expect("run procurator-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "procurator-bench deploy failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(stdout.contains("procurator"), "a table: {stdout}");

    let doc: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON file")).expect("JSON");
    let cases = doc["cases"].as_array().expect("cases");
    for mode in ["no-health-check", "one-health-check"] {
        let case = cases
            .iter()
            .find(|c| c["hosts"] == 1 && c["mode"] == mode)
            .unwrap_or_else(|| panic!("no 1-host {mode} case in {doc}"));
        positive_samples(case, "floor_ms");
        positive_samples(case, "procurator_ms");
        positive_samples(case, "procurator_server_ms");
        let summary = &case["summary"];
        assert!(
            summary["procurator_ms"]["median"]
                .as_f64()
                .is_some_and(|m| m > 0.0),
            "{summary}"
        );
        assert!(
            summary["floor_ms"]["median"]
                .as_f64()
                .is_some_and(|m| m > 0.0),
            "{summary}"
        );
        assert!(
            summary["ratio"].as_f64().is_some_and(|r| r > 0.0),
            "{summary}"
        );
    }
}

#[test]
fn zero_runs_is_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_procurator-bench"))
        .args(["deploy", "--runs", "0"])
        .output()
        .expect("run procurator-bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--runs"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
