//! Crash safety (docs/rollouts.md, "Crash safety"): agents SIGKILLed in the
//! middle of a deployment and restarted by a supervisor (as systemd would),
//! a control plane SIGKILLed mid-rollout and restarted on its data, and an
//! activation that kills the agent itself. Every run ends with each host on
//! exactly one of its two closures, its profile agreeing, and the control
//! plane's row matching the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Child, Stdio};
use std::time::Duration;

use procurator_integration_tests::netns::CONTROL_PLANE_IP;
use procurator_integration_tests::scenario::{
    self, activation_count, consistent_on, journal_phase, state, submit, wait_final,
};
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES, wait_for};
use serde_json::{Value, json};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);

fn supervised_fleet() -> Fleet {
    Fleet::start_with(FleetOptions {
        supervised: MACHINES.iter().map(|m| m.to_string()).collect(),
        ..FleetOptions::default()
    })
    .expect("fleet with supervised agents")
}

/// The host is on exactly one of its closures and the row says the same.
fn assert_host_matches_row(fleet: &Fleet, machine: &str, new: &str, row: &Value) {
    let host = fleet.host(machine);
    let on = consistent_on(host, &fleet.initial[machine], new)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    let row_state = state(row);
    match on {
        "new" => assert_eq!(
            row_state, "MACHINE_STATE_SUCCEEDED",
            "{machine} runs the new closure: {row}"
        ),
        _ => assert!(
            ["MACHINE_STATE_ROLLED_BACK", "MACHINE_STATE_FAILED"].contains(&row_state),
            "{machine} runs the old closure: {row}"
        ),
    }
}

/// Waits until `machine`'s journal records `phase`, then SIGKILLs its
/// agent; returns the run killed.
fn kill_agent_in_phase(fleet: &Fleet, machine: &str, phase: &str) -> u32 {
    let host = fleet.host(machine);
    wait_for(
        &format!("{machine}'s journal to say {phase}"),
        ROLLOUT_TIMEOUT,
        || Ok((journal_phase(host).as_deref() == Some(phase)).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    host.kill_supervised_agent()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()))
}

/// Submits a rollout of `settings` (with `rollout` options) to `fleet`,
/// SIGKILLs each listed machine's agent once its journal says the phase
/// given, in order, and checks the outcome: every host on exactly one of its
/// closures with the row agreeing, each killed agent started again, and no
/// second activation of the new closure.
fn kill_agents_in_phases(
    fleet: &Fleet,
    settings: &Value,
    rollout: &Value,
    kills: &[(&str, &str)],
) -> BTreeMap<String, Value> {
    let (closures, artifact, _) = scenario::prepare(fleet, settings, rollout).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");

    let killed: Vec<(&str, u32)> = kills
        .iter()
        .map(|(m, phase)| (*m, kill_agent_in_phase(fleet, m, phase)))
        .collect();

    let deployment = wait_final(fleet, &id, ROLLOUT_TIMEOUT).expect("the deployment finishes");
    let machines = Fleet::machine_states(&deployment);
    for m in MACHINES {
        assert_host_matches_row(fleet, m, &closures[m], &machines[m]);
    }
    for (m, killed) in killed {
        let (_, runs) = fleet.host(m).supervised_agent().expect("supervisor");
        assert!(
            runs > killed,
            "{m}'s agent was started again after the kill"
        );
        // Resuming waits for the recorded activation; it never starts a
        // second one of the same closure.
        assert!(
            activation_count(fleet.host(m), &closures[m]) <= 1,
            "{m}: {:?}",
            scenario::activations(fleet.host(m))
        );
    }
    machines
}

#[test]
fn agents_killed_while_activating_or_checking_end_on_one_closure() {
    // worker-1 activates slowly, worker-2 checks slowly: each is killed in
    // the middle of its slow phase.
    let settings = json!({
        "generation": 1,
        "healthCheckTimeout": 20,
        "machines": {
            "worker-1": { "activationDelay": 5 },
            "worker-2": { "healthDelay": 5 }
        }
    });
    kill_agents_in_phases(
        &supervised_fleet(),
        &settings,
        &json!({}),
        &[("worker-1", "activating"), ("worker-2", "checking")],
    );
}

#[test]
fn an_agent_killed_while_committing_ends_on_one_closure() {
    // worker-1's boot entry is slow to write: its agent is killed while
    // the journal says committing.
    let settings = json!({
        "generation": 1,
        "machines": { "worker-1": { "bootDelay": 5 } }
    });
    kill_agents_in_phases(
        &supervised_fleet(),
        &settings,
        &json!({}),
        &[("worker-1", "committing")],
    );
}

#[test]
fn an_agent_killed_while_confirming_ends_on_one_closure() {
    // worker-1's new system cuts it off the control plane for a few
    // seconds, well inside the confirmation timeout: its agent is killed
    // while it retries confirming, and the restarted agent checks and
    // confirms again.
    let fleet = Fleet::start_with(FleetOptions {
        nat: true,
        supervised: MACHINES.iter().map(|m| m.to_string()).collect(),
        ..FleetOptions::default()
    })
    .expect("fleet behind NAT with supervised agents");
    let settings = json!({
        "generation": 1,
        "machines": {
            "worker-1": { "blockControlPlane": CONTROL_PLANE_IP, "blockControlPlaneFor": 4 }
        }
    });
    let rollout = json!({ "rollout": { "confirmTimeout": 20 } });
    kill_agents_in_phases(&fleet, &settings, &rollout, &[("worker-1", "confirming")]);
}

/// A `procurator-ctl watch --output json` running in the background, killed
/// on drop.
struct Watcher {
    child: Child,
    out: std::path::PathBuf,
}

impl Watcher {
    fn start(fleet: &Fleet, id: &str) -> Self {
        let out = fleet.dir().join(format!("watch-{id}.json"));
        let mut cmd = fleet.ctl().expect("ctl").command();
        cmd.args(["watch", id, "--output", "json"])
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("watch output"))
            .stderr(File::create(out.with_extension("err")).expect("watch errors"));
        Self {
            child: cmd.spawn().expect("start watch"),
            out,
        }
    }

    fn events(&self) -> Vec<Value> {
        events(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One JSON event per line; a line cut short by a kill is not an event.
fn events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("revision").is_some())
        .collect()
}

fn revisions(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| e["revision"].as_u64())
        .collect()
}

#[test]
fn a_control_plane_killed_mid_rollout_finishes_it_after_restart() {
    let mut fleet = Fleet::start().expect("fleet");
    let settings = json!({
        "generation": 1,
        "machines": { "worker-2": { "activationDelay": 6 } }
    });
    let (closures, artifact, _) =
        scenario::prepare(&fleet, &settings, &json!({})).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");
    let mut watcher = Watcher::start(&fleet, &id);

    let worker2 = fleet.host("worker-2");
    wait_for("worker-2 to start activating", ROLLOUT_TIMEOUT, || {
        Ok((activation_count(worker2, &closures["worker-2"]) > 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    fleet
        .control_plane
        .kill()
        .expect("SIGKILL the control plane");
    // What the watcher saw before the kill is where a user would resume
    // from; the watcher itself keeps reconnecting (ctl's follow) and must
    // carry on from there too.
    let before = watcher.events();
    let last_seen = revisions(&before).last().copied().unwrap_or(0);

    fleet
        .control_plane
        .start_again(&fleet.nix)
        .expect("restart the control plane");
    let deployment = wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("the rollout finishes");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );
    for m in MACHINES {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
        assert_eq!(
            activation_count(host, &closures[m]),
            1,
            "{m} was activated exactly once: {:?}",
            scenario::activations(host)
        );
    }

    // Resuming from the last revision seen gives exactly what a replay
    // from the start gives after it: no gap, no duplicate.
    let resumed = ctl
        .run(&[
            "watch",
            &id,
            "--output",
            "json",
            "--from-revision",
            &last_seen.to_string(),
        ])
        .expect("watch --from-revision");
    resumed
        .expect_code(0)
        .expect("the resumed watch ends succeeded");
    let full = ctl
        .run(&["watch", &id, "--output", "json"])
        .expect("watch from the start");
    full.expect_code(0).expect("replay");
    let mut combined = revisions(&before);
    combined.extend(revisions(&events(&resumed.stdout)));
    let replay = revisions(&events(&full.stdout));
    assert!(
        combined.windows(2).all(|w| w[0] < w[1]),
        "no duplicates, in order: {combined:?}"
    );
    assert_eq!(
        combined, replay,
        "before the kill + resumed == replay\n{resumed}\n{full}"
    );
    // The watcher that lived through the restart ends with the deployment
    // and saw every event exactly once.
    let status = wait_for("the live watcher to end", Duration::from_secs(60), || {
        Ok(watcher.child.try_wait()?)
    })
    .expect("the live watcher ends with the deployment");
    let live = revisions(&watcher.events());
    assert!(
        status.success(),
        "live watch: {status}: {}",
        std::fs::read_to_string(watcher.out.with_extension("err")).unwrap_or_default()
    );
    assert_eq!(live, replay, "the live watcher across the restart");
    drop(watcher);
}

#[test]
fn an_activation_that_kills_the_agent_still_succeeds_once() {
    let fleet = supervised_fleet();
    let settings = json!({
        "generation": 1,
        "machines": { "worker-1": { "restartAgent": true } }
    });
    let (closures, artifact, _) =
        scenario::prepare(&fleet, &settings, &json!({})).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");
    let deployment = wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("finishes");
    assert_eq!(
        state(&deployment),
        "DEPLOYMENT_STATE_SUCCEEDED",
        "{deployment}"
    );

    let worker1 = fleet.host("worker-1");
    assert!(
        worker1
            .host_path("/run/procurator-test/agent-killed")
            .exists(),
        "the activation killed the agent"
    );
    let (_, runs) = worker1.supervised_agent().expect("supervisor");
    assert!(runs >= 2, "the agent was restarted");
    assert_eq!(
        activation_count(worker1, &closures["worker-1"]),
        1,
        "{:?}",
        scenario::activations(worker1)
    );
    for m in MACHINES {
        let host = fleet.host(m);
        assert_eq!(
            host.current_system().expect("current").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
        assert_eq!(
            host.system_profile().expect("profile").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
    }

    // One result for worker-1: a single final machine event.
    let watched = ctl.run(&["watch", &id, "--output", "json"]).expect("watch");
    watched.expect_code(0).expect("watch");
    let results: Vec<Value> = events(&watched.stdout)
        .into_iter()
        .filter(|e| e["type"] == "machine" && e["machine"] == "worker-1")
        .filter(|e| {
            let s = scenario::normalized(e["state"].as_str().unwrap_or_default());
            ["succeeded", "failed", "rolled-back", "rollback-failed"].contains(&s.as_str())
        })
        .collect();
    assert_eq!(results.len(), 1, "worker-1's result once: {watched}");
}

#[test]
fn an_agent_killed_while_copying_ends_on_one_closure() {
    // worker-1's closure carries a large path: its agent is killed while
    // the journal says copying, and the restarted agent copies again.
    let settings = json!({
        "generation": 1,
        "machines": { "worker-1": { "copyPadding": 96 } }
    });
    let machines = kill_agents_in_phases(
        &supervised_fleet(),
        &settings,
        &json!({}),
        &[("worker-1", "copying")],
    );
    // Nothing had changed yet: the restarted agent copies again and goes on.
    assert_eq!(
        machines["worker-1"]["state"], "MACHINE_STATE_SUCCEEDED",
        "{:?}",
        machines["worker-1"]
    );
}
