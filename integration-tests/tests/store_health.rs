//! The control plane's health tells the truth about its store: with its
//! data directory on a small tmpfs that fills up, it reports NOT_SERVING and
//! says the store cannot be written; once space is freed it serves again,
//! and every deployment it acknowledged is still there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use procurator_integration_tests::{Fleet, FleetOptions, wait_for};
use serde_json::{Value, json};

/// A tmpfs mounted for the test, unmounted when dropped (also on failure).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn health(fleet: &Fleet) -> String {
    let out = fleet
        .grpcurl()
        .expect("grpcurl")
        .run(
            Some(&fleet.pki.operator()),
            &["-d", "{}"],
            &["grpc.health.v1.Health/Check"],
        )
        .expect("health");
    serde_json::from_str::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("no answer: {out}"))
}

#[test]
fn a_full_disk_is_reported_and_nothing_acknowledged_is_lost() {
    let mut fleet = Fleet::start_with(FleetOptions {
        agents: Vec::new(),
        ..FleetOptions::default()
    })
    .expect("fleet");
    let ctl = fleet.ctl().expect("ctl");
    let (first, first_commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
    ctl.run(&["submit", first.to_str().expect("utf-8")])
        .expect("submit")
        .expect_code(0)
        .expect("the first deployment is acknowledged");

    // The store moves onto a small tmpfs (after a clean stop, the database
    // is one file).
    fleet.control_plane.stop().expect("stop");
    let data = fleet.control_plane.data_dir();
    let saved = fleet.dir().join("saved-data");
    std::fs::rename(&data, &saved).expect("move the data aside");
    std::fs::create_dir(&data).expect("mkdir");
    let _tmpfs = Tmpfs::mount(&data, "16m");
    for entry in std::fs::read_dir(&saved).expect("read") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), data.join(entry.file_name())).expect("copy");
    }
    fleet.control_plane.start_again(&fleet.nix).expect("start");
    assert_eq!(health(&fleet), "SERVING");

    // Fill it.
    let filler = data.join("filler");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }
    // A deployment with labels enough that it cannot fit anywhere.
    let (big, big_commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
    let mut value: Value =
        serde_json::from_slice(&std::fs::read(&big).expect("read")).expect("json");
    for spec in value["blueprint"]
        .as_object_mut()
        .expect("blueprint")
        .values_mut()
    {
        spec["labels"] = json!(
            (0..64)
                .map(|i| format!("{i:03}{}", "l".repeat(250)))
                .collect::<Vec<_>>()
        );
    }
    std::fs::write(&big, value.to_string()).expect("write");
    let out = ctl
        .run(&["submit", big.to_str().expect("utf-8")])
        .expect("submit");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("cannot write its store"), "{out}");
    assert!(!out.stderr.contains("is it running"), "{out}");
    wait_for("health NOT_SERVING", Duration::from_secs(30), || {
        Ok((health(&fleet) == "NOT_SERVING").then_some(()))
    })
    .expect("health tells the truth");

    // Space again: the next write succeeds and health follows.
    std::fs::remove_file(&filler).expect("free the space");
    ctl.run(&["submit", big.to_str().expect("utf-8")])
        .expect("submit")
        .expect_code(0)
        .expect("accepted once there is room");
    wait_for("health SERVING", Duration::from_secs(30), || {
        Ok((health(&fleet) == "SERVING").then_some(()))
    })
    .expect("serving again");
    for commit in [&first_commit, &big_commit] {
        fleet
            .deployment_by_commit(commit)
            .expect("acknowledged and kept");
    }
    // The control plane is stopped before the tmpfs goes.
    fleet.control_plane.stop().expect("stop");
}
