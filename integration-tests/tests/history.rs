//! The control plane's state outlives it: restarted between two
//! deployments, it still lists both, replays the first one's events and
//! shows each machine's history and output, and the agents reconnect to
//! it on their own.

use procurator_integration_tests::{Fleet, MACHINES};
use serde_json::json;

#[test]
fn a_restarted_control_plane_keeps_its_history() {
    let mut fleet = Fleet::start().expect("fleet");
    let ctl = fleet.ctl().expect("ctl");

    let (first, first_path, first_commit) = fleet
        .prepare(&json!({ "generation": 1 }))
        .expect("prepare 1");
    ctl.run(&["submit", first_path.to_str().expect("utf-8"), "--wait"])
        .expect("submit 1")
        .expect_code(0)
        .expect("first deployment succeeds");
    let first_id = fleet.deployment_id(&first_commit).expect("first");

    let status = fleet.control_plane.stop().expect("stop");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM ends the control plane cleanly: {status}"
    );
    fleet.control_plane.restart(&fleet.nix).expect("restart");
    let machines: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet
        .wait_connected(&machines)
        .expect("the agents reconnect");

    let (second, second_path, second_commit) = fleet
        .prepare(&json!({ "generation": 2 }))
        .expect("prepare 2");
    ctl.run(&["submit", second_path.to_str().expect("utf-8"), "--wait"])
        .expect("submit 2")
        .expect_code(0)
        .expect("second deployment succeeds");
    let second_id = fleet.deployment_id(&second_commit).expect("second");
    assert_ne!(first_id, second_id);

    let listed = ctl.run(&["deployments"]).expect("deployments");
    listed.expect_code(0).expect("deployments");
    assert!(listed.stdout.contains(&first_id), "{listed}");
    assert!(listed.stdout.contains(&second_id), "{listed}");
    let newest_first = listed.stdout.find(&second_id) < listed.stdout.find(&first_id);
    assert!(newest_first, "newest first: {listed}");

    // The first deployment's events, recorded before the restart, replay.
    let watched = ctl.run(&["watch", &first_id]).expect("watch");
    watched
        .expect_code(0)
        .expect("the first deployment succeeded");
    for m in MACHINES {
        assert!(watched.stdout.contains(m), "{m} in the replay: {watched}");
    }
    assert!(
        watched.stdout.to_lowercase().contains("succeeded"),
        "{watched}"
    );
    let json_events = ctl
        .run(&["watch", &first_id, "--output", "json"])
        .expect("watch json");
    json_events.expect_code(0).expect("watch json");
    let events: Vec<serde_json::Value> = json_events
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(events.len() >= MACHINES.len(), "{json_events}");
    let text = json_events.stdout;
    for m in MACHINES {
        assert!(
            text.contains(&first[m]),
            "{m}'s first closure in the replay"
        );
        assert!(
            !text.contains(&second[m]),
            "only the first deployment's events"
        );
    }

    // Each machine's history lists both, newest first, with what each ran;
    // the first one's output, sent before the restart, is still there.
    for m in MACHINES {
        let listed = ctl
            .run(&["machine", m, "--output", "json"])
            .expect("machine");
        listed.expect_code(0).expect("machine");
        let entries: Vec<serde_json::Value> =
            serde_json::from_str(&listed.stdout).expect("a JSON array");
        let seen: Vec<(&str, &str, &str, bool)> = entries
            .iter()
            .map(|e| {
                (
                    e["deploymentId"].as_str().unwrap_or_default(),
                    e["state"].as_str().unwrap_or_default(),
                    e["closure"].as_str().unwrap_or_default(),
                    e["hasLog"] == true,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (second_id.as_str(), "succeeded", second[m].as_str(), true),
                (first_id.as_str(), "succeeded", first[m].as_str(), true),
            ],
            "{m}: {listed}"
        );
        let log = ctl.run(&["logs", &first_id, m]).expect("logs");
        log.expect_code(0).expect("logs of the first deployment");
        assert!(
            log.stdout
                .contains(&format!("== succeeded: {} runs", first[m])),
            "{m}: {log}"
        );
    }

    for m in MACHINES {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(second[m].as_str())
        );
        assert_eq!(
            host.system_generation().expect("generation"),
            "system-3-link"
        );
    }
}
