//! The fleet's certificates over their life: the control plane serves only
//! with a control plane's certificate, read from its own variables; its
//! certificate is renewed with `pki issue --role control-plane` and taken
//! up without a restart (SIGHUP, or its files changing), while the agents'
//! streams stay; a bundle of two CAs admits the agents of both.

use std::time::Duration;

use procurator_core::certificate::CertificateInfo;
use procurator_integration_tests::{Fleet, FleetOptions, Grpcurl, Identity, MACHINES, wait_for};

fn no_agents() -> FleetOptions {
    FleetOptions {
        agents: vec![],
        ..FleetOptions::default()
    }
}

/// `pki issue --role control-plane --san NAME --force`: the control
/// plane's certificate, renewed to name `name`.
fn renew_control_plane(fleet: &Fleet, name: &str) {
    fleet
        .pki
        .issue_with(
            &fleet.nix,
            "control-plane",
            "control-plane",
            &["--san", name, "--force"],
        )
        .expect("renewed");
}

/// Waits until the control plane has logged `line`.
fn wait_logged(fleet: &Fleet, line: &str) {
    wait_for(&format!("{line:?} logged"), Duration::from_secs(10), || {
        Ok(fleet.control_plane.log().contains(line).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.control_plane.log()));
}

/// The serial of the certificate a new TLS connection is served, as
/// `openssl s_client` sees it, in `CertificateInfo`'s form.
fn served_serial(fleet: &Fleet) -> String {
    let addr = fleet.control_plane.host_port().expect("address");
    let operator = fleet.pki.operator();
    let mut s_client = std::process::Command::new("openssl");
    s_client
        .args(["s_client", "-connect", &addr, "-CAfile"])
        .arg(fleet.pki.ca())
        .arg("-cert")
        .arg(&operator.cert)
        .arg("-key")
        .arg(&operator.key)
        .stdin(std::process::Stdio::null());
    let out =
        procurator_integration_tests::process::run_with_timeout(s_client, Duration::from_secs(30))
            .expect("s_client");
    let mut x509 = std::process::Command::new("openssl");
    x509.args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = x509.spawn().expect("openssl x509");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        out.stdout.as_bytes(),
    )
    .expect("write");
    let printed = child.wait_with_output().expect("x509");
    let text = String::from_utf8_lossy(&printed.stdout);
    let serial = text
        .trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("no serial in {text:?}; s_client said {out}"));
    procurator_core::certificate::normalize_serial(serial)
}

/// `grpcurl list` with the TLS server name `name`: it succeeds only when
/// the control plane's certificate names it.
fn list_as(grpcurl: &Grpcurl, operator: &Identity, name: &str) -> Option<i32> {
    grpcurl
        .run(Some(operator), &["-servername", name], &["list"])
        .expect("grpcurl")
        .code
}

/// The control plane reads its own TLS variables (`PROCURATOR_SERVER_TLS_*`,
/// not the `PROCURATOR_TLS_*` an operator's shell exports for ctl) and
/// refuses to serve with a certificate that is not a control plane's; `pki
/// issue --role control-plane` renews its certificate with a name `pki
/// init` was not given, which it serves after a restart.
#[test]
fn the_control_plane_serves_only_with_a_control_plane_certificate() {
    let mut fleet = Fleet::start_with(no_agents()).expect("fleet");
    let operator = fleet.pki.operator();
    let ca = fleet.pki.ca();
    let dir = fleet.dir().join("refusing");
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = procurator_integration_tests::bin("procurator-control-plane").expect("binary");
    let start = |name: &str, prefix: &str| {
        let mut cmd = fleet.nix.command(&bin);
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .env(format!("{prefix}_CA"), &ca)
            .env(format!("{prefix}_CERT"), &operator.cert)
            .env(format!("{prefix}_KEY"), &operator.key);
        let log = dir.join(format!("{name}.log"));
        let mut process =
            procurator_integration_tests::Process::spawn(name, cmd, &log).expect("spawn");
        // It must exit by itself; one still serving is killed when dropped.
        let status = procurator_integration_tests::wait_for(
            "the control plane to refuse",
            Duration::from_secs(30),
            || process.try_status(),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", process.log()));
        (status, process.log())
    };

    let (status, log) = start("client-variables", "PROCURATOR_TLS");
    assert_eq!(status.code(), Some(2), "a usage error: {log}");
    assert!(log.contains("--tls-ca"), "{log}");

    let (status, log) = start("operator-certificate", "PROCURATOR_SERVER_TLS");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "cannot serve the control plane: it is operator/admin's certificate, of role operator"
        ) && log.contains("pki issue --dir DIR --role control-plane"),
        "{log}"
    );

    // A name the certificate from `pki init` does not carry.
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    assert_ne!(
        list_as(&grpcurl, &operator, "cp-2.example"),
        Some(0),
        "not valid for cp-2.example yet"
    );
    renew_control_plane(&fleet, "cp-2.example");
    fleet.control_plane.restart(&fleet.nix).expect("restart");
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    assert_eq!(
        list_as(&grpcurl, &operator, "cp-2.example"),
        Some(0),
        "the renewed certificate names cp-2.example"
    );
}

/// The control plane's certificate renewed twice with a new name each time,
/// taken up once on SIGHUP and once because its files changed: new
/// connections see each new certificate, the agents' streams are never
/// dropped, and a certificate that cannot serve is refused with the
/// current one kept.
#[test]
fn the_control_plane_takes_a_new_certificate_without_dropping_its_agents() {
    let mut fleet = Fleet::start().expect("fleet");
    let all: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet.wait_connected(&all).expect("connected");
    let connects = || fleet.control_plane.log().matches("agent connected").count();
    let connected_before = connects();
    let operator = fleet.pki.operator();
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let served_within = |name: &str| {
        wait_for(
            &format!("a certificate naming {name}"),
            Duration::from_secs(30),
            || Ok((list_as(&grpcurl, &operator, name) == Some(0)).then_some(())),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.control_plane.log()));
    };

    assert_ne!(list_as(&grpcurl, &operator, "cp-2.example"), Some(0));
    let first_serial = served_serial(&fleet);
    renew_control_plane(&fleet, "cp-2.example");
    fleet.control_plane.hangup().expect("SIGHUP");
    served_within("cp-2.example");
    wait_logged(&fleet, "reloaded on SIGHUP");
    let renewed = CertificateInfo::from_pem(
        &std::fs::read(fleet.pki.control_plane().cert).expect("renewed certificate"),
    )
    .expect("a certificate");
    assert_ne!(renewed.serial, first_serial);
    assert_eq!(
        served_serial(&fleet),
        renewed.serial,
        "a new connection is served the new certificate"
    );

    // No signal: the changed files are noticed.
    renew_control_plane(&fleet, "cp-3.example");
    served_within("cp-3.example");
    assert_ne!(
        list_as(&grpcurl, &operator, "cp-2.example"),
        Some(0),
        "the newest certificate only"
    );

    // An operator's certificate in its place is refused; it keeps serving.
    let server = fleet.pki.control_plane();
    std::fs::copy(&operator.cert, &server.cert).expect("copy");
    std::fs::copy(&operator.key, &server.key).expect("copy");
    fleet.control_plane.hangup().expect("SIGHUP");
    wait_logged(&fleet, "cannot reload the TLS material");
    assert_eq!(list_as(&grpcurl, &operator, "cp-3.example"), Some(0));

    assert_eq!(
        connects(),
        connected_before,
        "no agent connected again: {}",
        fleet.control_plane.log()
    );
    let agents = fleet.agents().expect("status");
    let connected = agents.iter().filter(|a| a["connected"] == true).count();
    assert_eq!(connected, MACHINES.len(), "{agents:?}");
}

/// A CA rollover: the fleet CA's file becomes a bundle of the old CA and a
/// new one, and the control plane reloads it (SIGHUP). Then an agent whose
/// certificate the new CA signed connects beside agents of the old one;
/// before the reload the same agent is refused.
#[test]
fn a_ca_bundle_of_the_old_and_the_new_ca_admits_agents_of_both() {
    let mut fleet = Fleet::start().expect("fleet");
    let all: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet.wait_connected(&all).expect("connected");
    let new_ca = procurator_integration_tests::Pki::init(&fleet.nix, &fleet.dir().join("pki-new"))
        .expect("a new CA");
    let moved = MACHINES[0];
    let issued = new_ca.issue(&fleet.nix, "agent", moved).expect("issued");
    let old = fleet.pki.agent(moved);
    let restart_agent = |fleet: &mut Fleet| {
        fleet
            .hosts
            .get_mut(moved)
            .expect("host")
            .stop_agent()
            .expect("stop");
        fleet.start_agent(moved).expect("start");
    };
    let connected = |fleet: &Fleet| -> bool {
        fleet
            .agents()
            .expect("status")
            .iter()
            .any(|a| a["machine"] == moved && a["connected"] == true)
    };

    // The new CA's agent, before the control plane trusts that CA.
    std::fs::copy(&issued.cert, &old.cert).expect("cert");
    std::fs::copy(&issued.key, &old.key).expect("key");
    restart_agent(&mut fleet);
    wait_for(
        "the new CA's agent to be refused",
        Duration::from_secs(60),
        || {
            Ok(fleet
                .host(moved)
                .agent_log()
                .contains("disconnected from the control plane")
                .then_some(()))
        },
    )
    .expect("refused");
    assert!(!connected(&fleet), "{}", fleet.host(moved).agent_log());

    // Every party's CA file becomes the bundle; the control plane reloads it.
    let bundle = [fleet.pki.ca(), new_ca.ca()]
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("CA"))
        .collect::<String>();
    std::fs::write(fleet.pki.ca(), bundle).expect("bundle");
    fleet.control_plane.hangup().expect("SIGHUP");
    wait_logged(&fleet, "reloaded on SIGHUP");
    restart_agent(&mut fleet);
    fleet
        .wait_connected(&all)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    // The old CA's agents are there too, and a deployment reaches all.
    let (closures, artifact, _) = fleet
        .prepare(&serde_json::json!({ "generation": 1 }))
        .expect("prepare");
    fleet
        .ctl()
        .expect("ctl")
        .run(&["submit", artifact.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    for m in MACHINES {
        fleet.host(m).assert_on(&closures[m], "system-2-link");
    }
}
