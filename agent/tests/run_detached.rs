//! The real binary's hidden `run-detached` mode, started the way the agent
//! starts it where systemd is not PID 1: under `setsid`.

// A test that cannot set up should panic.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn run_detached_keeps_output_and_exit_status_under_setsid() {
    let dir = tempfile::tempdir().unwrap();
    let status_file = dir.path().join("a.status");
    let output_file = dir.path().join("a.out");
    let ran = Command::new("setsid")
        .arg(env!("CARGO_BIN_EXE_procurator-agent"))
        .arg("run-detached")
        .arg("--status-file")
        .arg(&status_file)
        .arg("--output-file")
        .arg(&output_file)
        .args(["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .status()
        .unwrap();
    assert!(ran.success(), "{ran}");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(status["code"], 3, "{status}");
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), "out\nerr\n");
}

#[test]
fn run_detached_refuses_bad_arguments_with_exit_2() {
    let ran = Command::new(env!("CARGO_BIN_EXE_procurator-agent"))
        .args(["run-detached", "--status-file"])
        .output()
        .unwrap();
    assert_eq!(ran.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&ran.stderr).contains("run-detached"));
}
