//! VM workers end to end: VM host agents in test hosts run the blueprint's
//! VMs under real QEMU (TCG), each guest booting a real kernel (Debian's
//! cloud kernel) and a busybox initrd built by Nix from the fixture flake
//! (`fixtures/vm-fleet`), which reports the closure it booted on its serial
//! console.

use std::collections::BTreeMap;
use std::time::Duration;

use procurator_integration_tests::scenario::{self, state};
use procurator_integration_tests::{Fleet, vms, wait_for};
use serde_json::{Value, json};

/// Whole deployments of booting TCG guests, several tests at once on two
/// cores.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);

/// Signs the artifact with CI's intent key, which every host and guest
/// trusts, and submits it.
fn submit(fleet: &Fleet, artifact: &std::path::Path) -> String {
    fleet.sign(artifact, None).expect("sign");
    let ctl = fleet.ctl().expect("ctl");
    scenario::submit(&ctl, artifact, &[]).expect("submit").0
}

/// Submits and waits until the deployment ends; panics unless it ends
/// `want` (e.g. "SUCCEEDED").
fn deploy(fleet: &Fleet, artifact: &std::path::Path, want: &str) -> (String, Value) {
    let id = submit(fleet, artifact);
    let done = scenario::wait_final(fleet, &id, DEPLOY_TIMEOUT).expect("deployment finishes");
    assert_eq!(
        state(&done),
        format!("DEPLOYMENT_STATE_{want}"),
        "{done:#}\n{}",
        fleet.logs()
    );
    (id, done)
}

fn row_state(deployment: &Value, instance: &str) -> String {
    let rows = Fleet::machine_states(deployment);
    let row = rows
        .get(instance)
        .unwrap_or_else(|| panic!("no row for {instance} in {deployment:#}"));
    state(row).to_owned()
}

/// The host each instance runs on, checked from outside: one QEMU process
/// per instance, on the host the control plane placed it on, and that
/// guest reported `closures[machine]` on its console.
fn running_vms(
    fleet: &Fleet,
    closures: &BTreeMap<String, String>,
    instances: &[(&str, &str)],
) -> BTreeMap<String, (String, i32)> {
    let placed = vms::placements(fleet).expect("placements");
    let mut running = BTreeMap::new();
    for &(instance, machine) in instances {
        let host_name = placed
            .get(instance)
            .unwrap_or_else(|| panic!("{instance} is not placed: {placed:?}"));
        let host = fleet.host(host_name);
        let pid = vms::qemu_pid(host, instance).expect("one QEMU process");
        let want = &closures[machine];
        let reported = wait_for(
            &format!("{instance} to report {want}"),
            Duration::from_secs(60),
            || Ok(vms::reported_closure(host, instance).filter(|c| c == want)),
        );
        assert!(reported.is_ok(), "{reported:?}\n{}", fleet.logs());
        running.insert(instance.to_owned(), (host_name.clone(), pid));
    }
    running
}

#[test]
fn vms_are_placed_restarted_per_machine_adopted_unplaced_and_removed() {
    let fleet = vms::start(&["host-a", "host-b"], &[]).expect("VM fleet");
    let present = json!(["host-a", "host-b", "web", "db"]);

    // Three VMs on two hosts with room for two each; the two replicas of
    // `web` on different hosts.
    let gen1 = json!({ "generation": 1, "present": present });
    let (c1, artifact) = vms::prepare(&fleet, &gen1).expect("generation 1");
    let (_, d1) = deploy(&fleet, &artifact, "SUCCEEDED");
    for instance in ["web-0", "web-1", "db"] {
        assert_eq!(
            row_state(&d1, instance),
            "MACHINE_STATE_SUCCEEDED",
            "{d1:#}"
        );
    }
    let instances = [("web-0", "web"), ("web-1", "web"), ("db", "db")];
    let before = running_vms(&fleet, &c1, &instances);
    assert_ne!(
        before["web-0"].0, before["web-1"].0,
        "the replicas of web share a host: {before:?}"
    );

    // A new closure for `web` only: exactly its VMs restart, db's QEMU is
    // the same process.
    let web2 = json!({
        "generation": 1,
        "present": present,
        "machines": { "web": { "generation": 2 } }
    });
    let (c2, artifact) = vms::prepare(&fleet, &web2).expect("web generation 2");
    assert_ne!(c1["web"], c2["web"]);
    assert_eq!(c1["db"], c2["db"]);
    let (_, d2) = deploy(&fleet, &artifact, "SUCCEEDED");
    let after = running_vms(&fleet, &c2, &instances);
    for web in ["web-0", "web-1"] {
        assert_eq!(row_state(&d2, web), "MACHINE_STATE_SUCCEEDED", "{d2:#}");
        assert_eq!(after[web].0, before[web].0, "{web} moved host");
        assert_ne!(after[web].1, before[web].1, "{web} was not restarted");
    }
    assert_eq!(after["db"], before["db"], "db was restarted");

    // A host agent killed (as by the OOM killer) and restarted adopts the
    // VMs it ran: the next deployment finds each still running, once.
    let db_host = after["db"].0.clone();
    let killed = fleet.host(&db_host).kill_supervised_agent().expect("kill");
    wait_for(
        "the killed agent to be restarted",
        Duration::from_secs(30),
        || {
            Ok(fleet
                .host(&db_host)
                .supervised_agent()
                .filter(|&(_, run)| run > killed))
        },
    )
    .expect("restarted");
    wait_for(
        "the restarted agent to reconnect",
        Duration::from_secs(60),
        || {
            Ok(fleet
                .agents()?
                .iter()
                .any(|a| a["machine"] == db_host.as_str() && a["connected"] == true)
                .then_some(()))
        },
    )
    .expect("reconnected");
    let db2 = json!({
        "generation": 1,
        "present": present,
        "machines": { "web": { "generation": 2 }, "db": { "generation": 2 } }
    });
    let (c3, artifact) = vms::prepare(&fleet, &db2).expect("db generation 2");
    deploy(&fleet, &artifact, "SUCCEEDED");
    let adopted = running_vms(&fleet, &c3, &instances);
    for web in ["web-0", "web-1"] {
        assert_eq!(
            adopted[web], after[web],
            "{web} was restarted or duplicated"
        );
    }
    assert_ne!(adopted["db"].1, after["db"].1, "db was not restarted");
    for host in ["host-a", "host-b"] {
        let host = fleet.host(host);
        let on_it = adopted.values().filter(|(h, _)| h == host.name()).count();
        assert_eq!(vms::all_qemu_pids(host).len(), on_it, "{}", host.name());
        assert_eq!(
            vms::taps(host).expect("taps").len(),
            on_it,
            "{}",
            host.name()
        );
    }

    // More than the hosts hold: the VM that does not fit is reported with
    // the reason, and the others are unaffected.
    let with_big = json!({
        "generation": 1,
        "present": ["host-a", "host-b", "web", "db", "big"],
        "machines": { "web": { "generation": 2 }, "db": { "generation": 2 } }
    });
    let (_, artifact) = vms::prepare(&fleet, &with_big).expect("with big");
    let big = submit(&fleet, &artifact);
    let row = scenario::wait_machine(
        &fleet,
        &big,
        "big",
        Duration::from_secs(60),
        "a reason why it is not placed",
        |row| {
            row["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not placed"))
        },
    )
    .expect("big is reported unplaced");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("65536 MiB") && reason.contains("more than any VM host has"),
        "{reason}"
    );

    // `db` leaves the blueprint: its VM goes with everything it left.
    let db_host = fleet.host(&adopted["db"].0);
    let without_db = json!({
        "generation": 1,
        "present": ["host-a", "host-b", "web"],
        "machines": { "web": { "generation": 2 } }
    });
    let (_, artifact) = vms::prepare(&fleet, &without_db).expect("without db");
    deploy(&fleet, &artifact, "SUCCEEDED");
    wait_for("db's VM to be removed", Duration::from_secs(60), || {
        Ok(
            (vms::qemu_pids(db_host, "db").is_empty() && !vms::state_dir(db_host, "db").exists())
                .then_some(()),
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    let webs_left = adopted
        .iter()
        .filter(|(i, (h, _))| i.starts_with("web") && h == db_host.name())
        .count();
    assert_eq!(vms::all_qemu_pids(db_host).len(), webs_left);
    assert_eq!(vms::taps(db_host).expect("taps").len(), webs_left);
    assert!(
        !vms::placements(&fleet)
            .expect("placements")
            .contains_key("db"),
        "db is still placed"
    );

    // What `watch` showed of the deployment that had no room for `big`
    // (superseded by the last one, so the watch ends).
    let placed = watch(&fleet, &big)
        .into_iter()
        .find(|e| e["type"] == "vms-placed")
        .expect("a vms-placed event");
    let unplaced = placed["unplaced"].as_array().cloned().unwrap_or_default();
    assert_eq!(unplaced.len(), 1, "{placed:#}");
    assert_eq!(unplaced[0]["instance"], "big", "{placed:#}");
    assert_eq!(
        placed["placements"].as_array().map(Vec::len),
        Some(3),
        "{placed:#}"
    );
}

/// Every event `procurator-ctl watch ID --output json` prints for a
/// deployment that has ended (its exit code says how it ended).
fn watch(fleet: &Fleet, id: &str) -> Vec<Value> {
    let out = fleet
        .ctl()
        .expect("ctl")
        .run(&["watch", id, "--output", "json"])
        .expect("watch");
    let events: Vec<Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.last().is_some_and(|e| e["type"] == "finished"),
        "watch did not follow {id} to its end: {out}"
    );
    events
}

/// The machine-level events of `instance` that `watch` printed.
fn messages(events: &[Value], instance: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["machine"] == instance)
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_vm_with_its_own_agent_switches_in_place_restarts_for_a_kernel_and_a_broken_guest_rolls_back() {
    // `app`'s own agent runs in a test host standing in for the guest's
    // inside; `db` has no agent of its own.
    let fleet = vms::start(&["host-a"], &["app"]).expect("VM fleet");
    let present = json!(["host-a", "app", "db"]);
    let host = fleet.host("host-a");
    let guest = fleet.host("app");

    let gen1 = json!({ "generation": 1, "present": present });
    let (c1, artifact) = vms::prepare(&fleet, &gen1).expect("generation 1");
    deploy(&fleet, &artifact, "SUCCEEDED");
    let instances = [("app", "app"), ("db", "db")];
    let first = running_vms(&fleet, &c1, &instances);
    assert_eq!(first["app"].0, "host-a");

    // Userspace only, and the guest has an agent: in place. The VM keeps
    // running; its agent copies, activates, checks and commits the new
    // closure.
    let userspace = json!({
        "generation": 1,
        "present": present,
        "machines": { "app": { "generation": 2 } }
    });
    let (c2, artifact) = vms::prepare(&fleet, &userspace).expect("app generation 2");
    let (id, done) = deploy(&fleet, &artifact, "SUCCEEDED");
    assert_eq!(
        row_state(&done, "app"),
        "MACHINE_STATE_SUCCEEDED",
        "{done:#}"
    );
    assert_eq!(
        vms::qemu_pid(host, "app").expect("app runs"),
        first["app"].1
    );
    guest.assert_on(&c2["app"], "system-2-link");
    assert_eq!(
        vms::reported_closure(host, "app").as_deref(),
        Some(c1["app"].as_str()),
        "the guest was rebooted"
    );
    let said = messages(&watch(&fleet, &id), "app");
    assert!(said.iter().any(|m| m.starts_with("in place:")), "{said:?}");

    // A new kernel: the host restarts the VM on the new closure, whatever
    // its agent could do.
    let kernel = json!({
        "generation": 1,
        "present": present,
        "machines": { "app": { "generation": 3, "kernel": "b" } }
    });
    let (c3, artifact) = vms::prepare(&fleet, &kernel).expect("app with kernel b");
    let (id, _) = deploy(&fleet, &artifact, "SUCCEEDED");
    let restarted = running_vms(&fleet, &c3, &[("app", "app")]);
    assert_ne!(restarted["app"].1, first["app"].1, "app was not restarted");
    let said = messages(&watch(&fleet, &id), "app");
    assert!(
        said.iter().any(|m| m == "restarted: its kernel changed"),
        "{said:?}"
    );
    assert_eq!(vms::qemu_pid(host, "db").expect("db runs"), first["db"].1);

    // A guest that never reports readiness (its init dies): the host boots
    // the previous closure again, and the deployment says why.
    let broken = json!({
        "generation": 1,
        "present": present,
        "machines": {
            "app": { "generation": 3, "kernel": "b" },
            "db": { "generation": 2, "broken": true }
        }
    });
    let (c4, artifact) = vms::prepare(&fleet, &broken).expect("broken db");
    assert_ne!(c4["db"], c1["db"]);
    let id = submit(&fleet, &artifact);
    let done = scenario::wait_final(&fleet, &id, DEPLOY_TIMEOUT).expect("deployment finishes");
    assert_eq!(state(&done), "DEPLOYMENT_STATE_FAILED", "{done:#}");
    let row = &Fleet::machine_states(&done)["db"];
    assert_eq!(state(row), "MACHINE_STATE_ROLLED_BACK", "{row:#}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stopped before it reported ready"),
        "{reason}"
    );
    // A new QEMU, running the closure db had before.
    let back = running_vms(&fleet, &c1, &[("db", "db")]);
    assert_ne!(back["db"].1, first["db"].1);
}
