//! `procurator-bench swarm` end to end on a small swarm: simulated agents
//! against the real control plane binary. Not a timed assertion: the
//! figures are checked to exist and to say what happened (every machine
//! succeeded; with every activation failing, none did and the report says so).
//!
//! Needs the control plane built beside the bench binary
//! (`cargo build --workspace --bins`).

use std::process::Command;

use serde_json::Value;

fn swarm(extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("swarm.json");
    let output = Command::new(env!("CARGO_BIN_EXE_procurator-bench"))
        .args(["swarm", "--agents", "40", "--runs", "1", "--idle-secs", "1"])
        .args(["--watchers", "2", "--agents-per-process", "15", "--json"])
        .arg(&json)
        .args(extra)
        .output()
        .expect("running procurator-bench");
    assert!(
        output.status.success(),
        "procurator-bench swarm failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the --json file");
    serde_json::from_str(&text).expect("valid JSON")
}

fn only_run(report: &Value) -> &Value {
    let runs = report["runs"][0].as_array().expect("runs per size");
    assert_eq!(runs.len(), 1, "{report}");
    &runs[0]
}

#[test]
fn a_small_swarm_deploys_everywhere_and_reports_every_figure() {
    let report = swarm(&[]);
    let run = only_run(&report);
    assert_eq!(run["agents"], 40);
    assert_eq!(run["succeeded"], 40, "{run}");
    assert_eq!(report["summaries"][0]["succeeded_every_run"], true);
    for key in [
        "rss_connected_kib",
        "desired_p50_ms",
        "desired_p99_ms",
        "desired_no_confirm_p99_ms",
        "finished_s",
        "finished_no_confirm_s",
        "storm_s",
        "connect_s",
    ] {
        let value = run[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {run}"));
        assert!(value > 0.0, "{key} = {value}");
    }
    // Three processes of at most 15 agents; each watcher saw the rollout:
    // per machine at least sent, copying, activating, confirming,
    // committing, succeeded.
    assert!(run["watch_events"].as_u64().unwrap_or(0) >= 40 * 6, "{run}");
    assert_eq!(run["storm_refused"], 0, "{run}");
    assert!(run["desired_p99_ms"].as_f64() <= run["desired_max_ms"].as_f64());
}

#[test]
fn failing_activations_are_counted_not_hidden() {
    let report = swarm(&["--failure-rate", "1"]);
    let run = only_run(&report);
    assert_eq!(run["succeeded"], 0, "{run}");
    assert_eq!(report["summaries"][0]["succeeded_every_run"], false);
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() {
    for (args, says) in [
        (&["swarm", "--runs", "0"][..], "--runs"),
        (&["swarm", "--agents", "0"][..], "--agents"),
        (&["swarm", "--failure-rate", "2"][..], "fraction"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_procurator-bench"))
            .args(args)
            .output()
            .expect("running procurator-bench");
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
