//! Clients given several control planes (one per replica, no load
//! balancer) go to one that answers: `procurator-ctl` against the real
//! control plane with a dead address listed first, and a clear error when
//! none answers. (The agent's dialer and confirmer are shown the same way
//! in their unit tests.)

use procurator_integration_tests::{Fleet, FleetOptions};

/// A loopback address nothing listens on.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    format!("https://{address}")
}

#[test]
fn ctl_goes_to_the_control_plane_that_answers() {
    let fleet = Fleet::start_with(FleetOptions {
        agents: Vec::new(),
        ..FleetOptions::default()
    })
    .expect("fleet");
    let live = fleet.control_plane.url().expect("url");
    let ctl = fleet.ctl().expect("ctl");

    let dead = dead_url();
    let out = ctl
        .with_url(&format!("{dead} {live}"))
        .run(&["deployments"])
        .expect("deployments");
    assert_eq!(out.code, Some(0), "{out}");

    let out = ctl
        .with_url(&format!("{dead} {}", dead_url()))
        .run(&["deployments"])
        .expect("deployments");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("none of the control planes answered"),
        "{out}"
    );
    assert!(out.stderr.contains(&dead), "{out}");
}
