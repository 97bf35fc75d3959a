//! `scripts/local-fleet.sh --stay` leaves the demo's fleet running for a
//! new shell to try procurator-ctl on, and `--stop` ends it without a trace.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use procurator_integration_tests::process::run_with_timeout;
use procurator_integration_tests::{CmdOutput, require_root, workspace_root};
use serde_json::Value;

/// Where `--stay` records the running fleet.
const CURRENT: &str = "/run/procurator-local-fleet";

fn script(args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(workspace_root().join("scripts/local-fleet.sh"));
    cmd.args(args);
    // The demo's own settings, not this test's.
    for var in [
        "PROCURATOR_CONTROL_PLANE",
        "PROCURATOR_TLS_CA",
        "PROCURATOR_TLS_CERT",
        "PROCURATOR_TLS_KEY",
        "NIX_CONF_DIR",
    ] {
        cmd.env_remove(var);
    }
    run_with_timeout(cmd, Duration::from_secs(900)).expect("local-fleet.sh")
}

/// Stops a fleet this test left running, also when it fails.
struct StopOnDrop;

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if Path::new(CURRENT).exists() {
            let _ = script(&["--stop"]);
        }
    }
}

/// Processes whose command line names `dir`.
fn processes_in(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[test]
fn the_demo_stays_up_for_a_new_shell_and_stops_without_a_trace() {
    require_root().expect("root");
    assert!(
        !Path::new(CURRENT).exists(),
        "a fleet left by `local-fleet.sh --stay` is running; stop it with --stop first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("fleet");
    let _stop = StopOnDrop;

    let out = script(&["--stay", "--work-dir", work.to_str().expect("utf-8")]);
    out.expect_code(0).expect("the demo");
    assert!(out.stdout.contains("local-fleet.sh --stop"), "{out}");
    assert!(out.stdout.contains(&format!(". {CURRENT}/env")), "{out}");

    // A new shell, with nothing of the demo's environment.
    let ctl = procurator_integration_tests::bin("procurator-ctl").expect("ctl");
    let mut shell = Command::new("bash");
    shell
        .args([
            "-c",
            &format!(". {CURRENT}/env && exec \"$0\" status --output json"),
            ctl.to_str().expect("utf-8"),
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    let status = run_with_timeout(shell, Duration::from_secs(60)).expect("status");
    status.expect_code(0).expect("status in a new shell");
    let agents: Value = serde_json::from_str(&status.stdout).expect("json");
    let connected: Vec<&str> = agents
        .as_array()
        .expect("agents")
        .iter()
        .filter(|a| a["connected"] == true)
        .filter_map(|a| a["machine"].as_str())
        .collect();
    assert_eq!(
        connected,
        ["control-plane-1", "worker-1", "worker-2"],
        "{status}"
    );
    assert!(
        !processes_in(&work).is_empty(),
        "the fleet runs from {}",
        work.display()
    );

    // A second demo is refused while this one stays.
    let again = script(&["--stay"]);
    assert_eq!(again.code, Some(1), "{again}");
    assert!(again.stderr.contains("--stop"), "{again}");

    let stopped = script(&["--stop"]);
    stopped.expect_code(0).expect("--stop");
    let left = processes_in(&work);
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(!work.exists() && !Path::new(CURRENT).exists(), "{stopped}");
}
