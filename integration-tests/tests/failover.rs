//! Clients given several control planes (one per replica, no load
//! balancer) go to one that answers: `procurator-ctl` against the real
//! control plane with a dead address listed first, and a clear error when
//! none answers. (The agent's dialer and confirmer are shown the same way
//! in their unit tests.)

use procurator_integration_tests::{Fleet, FleetOptions, scenario};

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

#[test]
fn ctl_watch_moves_to_the_next_control_plane_when_its_own_goes() {
    use procurator_integration_tests::control_plane::ControlPlane;
    use std::io::Read as _;
    use std::time::{Duration, Instant};

    let mut fleet = Fleet::start_with(FleetOptions {
        agents: Vec::new(),
        ..FleetOptions::default()
    })
    .expect("fleet");
    // A second control plane of the same fleet, with a store of its own:
    // until replicas share one, it does not know the first one's
    // deployments, which is how the test sees whom ctl asked.
    let second = ControlPlane::start(&fleet.nix, &fleet.dir().join("second"), &fleet.pki)
        .expect("second control plane");
    let second_url = second.url().expect("url");
    let ctl = fleet.ctl().expect("ctl");
    let (artifact, _) = fleet.write_deployment(&fleet.initial).expect("artifact");
    let (id, _) = scenario::submit(&ctl, &artifact, &[]).expect("submitted");

    let first_url = fleet.control_plane.url().expect("url");
    let mut watch = ctl
        .with_url(&format!("{first_url} {second_url}"))
        .command()
        .args(["watch", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    // It follows the first (its first event, the deployment's submission,
    // is its first line), until that one goes.
    let stdout = watch.stdout.take().expect("stdout");
    let (first_line, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut reader, &mut line);
        let _ = first_line.send(line);
        // Drained to the end: a closed pipe would end ctl early.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = got
        .recv_timeout(Duration::from_secs(60))
        .expect("ctl watch printed nothing within 60 s");
    assert!(!line.is_empty(), "ctl watch ended before following");
    fleet.control_plane.kill().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = watch.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = watch.kill();
            panic!("ctl watch did not end after its control plane went");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    watch
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("following on the control plane at {second_url}")),
        "{stderr}"
    );
    // And asked it, which (with a store of its own) does not know the deployment.
    assert!(stderr.contains(&second_url), "{stderr}");
    assert!(stderr.contains(&id), "{stderr}");
}
