//! Agents on a network of their own (docs/rollouts.md, "confirming"): each
//! test host in its own network namespace behind a NAT router, the control
//! plane and every client in another. A host whose new system cuts it off
//! the control plane gets no confirmation and rolls back on its own.

use std::time::{Duration, Instant};

use procurator_integration_tests::netns::{CONTROL_PLANE_IP, ROUTER_CP_SIDE_IP};
use procurator_integration_tests::scenario::{self, activation_count, normalized, state, submit};
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES, wait_for};
use serde_json::json;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

fn nat_fleet() -> Fleet {
    Fleet::start_with(FleetOptions {
        nat: true,
        ..FleetOptions::default()
    })
    .expect("fleet behind NAT")
}

#[test]
fn agents_behind_nat_deploy_and_the_control_plane_sees_only_the_router() {
    let fleet = nat_fleet();
    let net = fleet.network.as_ref().expect("network");
    // The control plane's namespace cannot reach the hosts: everything it
    // gets from them comes through the router's masquerade.
    for (machine, _, ip) in &net.hosts {
        let route = net
            .control_plane
            .try_exec("ip", &["route", "get", ip])
            .expect("ip route get");
        assert_ne!(
            route.code,
            Some(0),
            "the control plane has a route to {machine} ({ip}): {route}"
        );
    }

    let (closures, artifact, commit) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", artifact.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("the deployment succeeds through NAT");
    let deployment = fleet.deployment_by_commit(&commit).expect("deployment");
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
            host.system_profile().expect("profile").as_deref(),
            Some(closures[m].as_str()),
            "{m}"
        );
    }

    // The agents' connections, as the control plane's kernel sees them:
    // every peer is the router, none is a host's own address.
    let port = fleet.control_plane.addr().expect("addr").port();
    let sockets = net
        .control_plane
        .exec(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ],
        )
        .expect("ss");
    let peers: Vec<&str> = sockets
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert!(
        peers.len() >= MACHINES.len(),
        "every agent is connected: {sockets}"
    );
    for peer in &peers {
        assert!(
            peer.starts_with(&format!("{ROUTER_CP_SIDE_IP}:")),
            "a connection from {peer}, not the router ({ROUTER_CP_SIDE_IP}): {sockets}"
        );
    }
}

#[test]
fn a_system_that_cuts_the_host_off_is_rolled_back_by_the_agent() {
    let fleet = nat_fleet();
    let confirm_timeout = 5;
    let settings = json!({
        "generation": 1,
        "machines": { "worker-1": { "blockControlPlane": CONTROL_PLANE_IP } }
    });
    let rollout = json!({ "rollout": { "confirmTimeout": confirm_timeout, "failureBudget": 1 } });
    let (closures, artifact, _) = scenario::prepare(&fleet, &settings, &rollout).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = submit(&ctl, &artifact, &[]).expect("submit");

    let worker1 = fleet.host("worker-1");
    let new = closures["worker-1"].as_str();
    let old = fleet.initial["worker-1"].as_str();
    // The activation log is written when switch-to-configuration starts;
    // the new system runs (its firewall up) once the link moved.
    wait_for("worker-1 to run the new system", ROLLOUT_TIMEOUT, || {
        Ok((activation_count(worker1, new) > 0
            && worker1.current_system()?.as_deref() == Some(new))
        .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    let activated = Instant::now();

    // On its own, cut off from the control plane: the old system runs again
    // within the confirmation timeout plus a little.
    let limit = Duration::from_secs(confirm_timeout + 10);
    wait_for("worker-1 to run the old system again", limit, || {
        Ok((worker1.current_system()?.as_deref() == Some(old)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    eprintln!(
        "worker-1 rolled back {:?} after activating",
        activated.elapsed()
    );
    assert_eq!(
        worker1.system_profile().expect("profile").as_deref(),
        Some(old),
        "the profile did not move"
    );
    assert_eq!(worker1.system_generation().expect("gen"), "system-1-link");
    assert_eq!(worker1.boot_entry().expect("boot").as_deref(), Some(old));
    // Activating the old system took the new one's firewall rule away.
    let (ns, _) = fleet
        .network
        .as_ref()
        .expect("network")
        .host("worker-1")
        .expect("worker-1's namespace");
    let rules = ns.iptables_rules("filter", "OUTPUT").expect("iptables -S");
    assert!(!rules.contains(CONTROL_PLANE_IP), "{rules}");

    // Once it can connect again, it reports the rollback.
    let deployment = scenario::wait_final(&fleet, &id, ROLLOUT_TIMEOUT).expect("final");
    let machines = Fleet::machine_states(&deployment);
    assert_eq!(
        state(&machines["worker-1"]),
        "MACHINE_STATE_ROLLED_BACK",
        "{deployment}"
    );
    let reason = normalized(machines["worker-1"]["reason"].as_str().unwrap_or_default());
    assert!(
        reason.contains("confirm"),
        "the reason names the missing confirmation: {deployment}"
    );
    for m in ["control-plane-1", "worker-2"] {
        assert_eq!(
            state(&machines[m]),
            "MACHINE_STATE_SUCCEEDED",
            "{m}: {deployment}"
        );
    }
}
