//! Certificates agents get for themselves: a machine with only a join
//! token enrolls (its key made in its own state directory), connects and
//! deploys; a used, expired or other machine's token is refused; with
//! 90-second certificates an agent renews and keeps deploying past the end
//! of its first one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use procurator_core::certificate::CertificateInfo;
use procurator_integration_tests::ctl::grpc_code;
use procurator_integration_tests::{Fleet, FleetOptions, MACHINES, wait_for};
use serde_json::{Value, json};

/// The agent's certificate and key when it enrolls: in its state directory.
fn agent_cert(fleet: &Fleet, machine: &str) -> PathBuf {
    fleet.host(machine).dir().join("state/tls/agent.crt")
}

fn certificate(path: &Path) -> CertificateInfo {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    CertificateInfo::from_pem(&pem).expect("a certificate")
}

/// `AgentService/Enroll` without a client certificate, as grpcurl sends it.
fn enroll_by_hand(fleet: &Fleet, machine: &str, token: &Path) -> (Option<String>, String) {
    let (_, csr) = procurator_core::pki::certificate_request(machine).expect("request");
    let token = std::fs::read_to_string(token).expect("token");
    let request = json!({ "machine": machine, "token": token.trim(), "csrPem": csr });
    let out = fleet
        .grpcurl()
        .expect("grpcurl")
        .call(
            None,
            "procurator.v1.AgentService/Enroll",
            &request.to_string(),
        )
        .expect("grpcurl");
    (grpc_code(&out), out.all())
}

fn agent_row(fleet: &Fleet, machine: &str) -> Value {
    fleet
        .agents()
        .expect("status")
        .into_iter()
        .find(|a| a["machine"] == machine)
        .unwrap_or_default()
}

/// Deploys `generation` to every machine and waits until it succeeded.
fn deploy(fleet: &Fleet, generation: u64) {
    let (closures, path, _) = fleet
        .prepare(&json!({ "generation": generation }))
        .expect("prepare");
    fleet
        .ctl()
        .expect("ctl")
        .run(&["submit", path.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    for m in MACHINES {
        assert_eq!(
            fleet.host(m).current_system().expect("current"),
            Some(closures[m].clone()),
            "{m} runs generation {generation}"
        );
    }
}

#[test]
fn machines_enroll_with_a_token_once_and_renew_their_certificates() {
    let mut fleet = Fleet::start_with(FleetOptions {
        agents: vec![],
        ..FleetOptions::default()
    })
    .expect("fleet");
    fleet
        .enable_enrollment(&["--agent-cert-validity", "90s"])
        .expect("control plane with an issuing CA");
    // Made now, used once its minute is over.
    let short_lived = fleet.join_token("worker-2", "60s").expect("token");

    let tokens: Vec<PathBuf> = MACHINES
        .iter()
        .map(|m| fleet.join_token(m, "1h").expect("token"))
        .collect();
    // A token for another machine stops the agent with the reason.
    fleet
        .start_enrolling_agent("worker-1", &tokens[0])
        .expect("start");
    let host = fleet.hosts.get_mut("worker-1").expect("host");
    wait_for("the refused agent to exit", Duration::from_secs(30), || {
        Ok((!host.agent_running()).then_some(()))
    })
    .expect("exits");
    let log = host.agent_log();
    assert!(
        log.contains("refused to enroll worker-1")
            && log.contains("this join token is for machine control-plane-1, not worker-1")
            && log.contains("procurator-ctl enroll-token --name worker-1"),
        "{log}"
    );
    assert!(!agent_cert(&fleet, "worker-1").exists());

    // Each machine with its own token: no certificate was given to any.
    for (m, token) in MACHINES.iter().zip(&tokens) {
        fleet.start_enrolling_agent(m, token).expect("start");
    }
    let all: Vec<String> = MACHINES.iter().map(|m| m.to_string()).collect();
    fleet.wait_connected(&all).expect("enrolled agents connect");
    let first = certificate(&agent_cert(&fleet, "worker-1"));
    assert_eq!(first.identity.to_string(), "agent/worker-1");
    // The key was made on the machine and never left it.
    let key_path = fleet.host("worker-1").dir().join("state/tls/agent.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path).expect("key").permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
    let key_pem = std::fs::read_to_string(&key_path).expect("key");
    let cert_pem = std::fs::read(agent_cert(&fleet, "worker-1")).expect("cert");
    assert!(procurator_core::pki::certificate_is_for_key(
        &cert_pem, &key_pem
    ));
    // Nothing of the key is in what the control plane keeps or logs.
    let secret_line = key_pem.lines().nth(1).expect("a PEM body");
    let data = fleet.control_plane.data_dir();
    for kept in [
        data.join("procurator.db"),
        data.join("procurator.db-wal"),
        fleet.control_plane.log_path(),
    ]
    .into_iter()
    .filter(|p| p.exists())
    {
        let bytes = std::fs::read(&kept).expect("readable");
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret_line),
            "{} holds the agent's key",
            kept.display()
        );
    }
    assert!(
        fleet.host("worker-1").agent_log().contains("enrolled"),
        "{}",
        fleet.host("worker-1").agent_log()
    );
    assert_eq!(
        agent_row(&fleet, "worker-1")["certificateSerial"],
        first.serial.as_str()
    );

    // Used, for another machine, unknown: refused, and nothing issued.
    let (code, out) = enroll_by_hand(&fleet, "worker-1", &tokens[1]);
    assert_eq!(code.as_deref(), Some("PermissionDenied"), "{out}");
    assert!(out.contains("this join token was used already"), "{out}");
    let (code, out) = enroll_by_hand(&fleet, "worker-1", &short_lived);
    assert_eq!(code.as_deref(), Some("PermissionDenied"), "{out}");
    assert!(
        out.contains("is for machine worker-2, not worker-1"),
        "{out}"
    );
    // Each refusal of a known token is in the event log, beside the enrollments.
    let events_log = fleet.dir().join("events.log");
    let _events = fleet
        .grpcurl()
        .expect("grpcurl")
        .spawn_stream(
            Some(&fleet.pki.operator()),
            "procurator.v1.DeploymentService/Watch",
            "{}",
            &events_log,
        )
        .expect("watch");
    wait_for("the certificate events", Duration::from_secs(30), || {
        let events = std::fs::read_to_string(&events_log).unwrap_or_default();
        Ok((events.matches("\"ENROLLED\"").count() == MACHINES.len()
            && events.contains("\"ENROLL_REFUSED\"")
            && events.contains("is for machine worker-2, not worker-1")
            && events.contains("\"JOIN_TOKEN_CREATED\""))
        .then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}",
            std::fs::read_to_string(&events_log).unwrap_or_default()
        )
    });
    // Without a certificate nothing but Enroll answers.
    let out = fleet
        .grpcurl()
        .expect("grpcurl")
        .call(None, "procurator.v1.DeploymentService/ListAgents", "{}")
        .expect("grpcurl");
    assert_eq!(grpc_code(&out).as_deref(), Some("Unauthenticated"), "{out}");

    deploy(&fleet, 1);

    // Two thirds into its 99 s (90 s, started 9 s early) it renews.
    wait_for("worker-1 to renew", Duration::from_secs(120), || {
        Ok(fleet
            .host("worker-1")
            .agent_log()
            .contains("renewed this agent's certificate")
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.logs()));
    let renewed = certificate(&agent_cert(&fleet, "worker-1"));
    assert_ne!(renewed.serial, first.serial);
    assert!(renewed.not_after > first.not_after);
    assert_eq!(
        agent_row(&fleet, "worker-1")["certificateSerial"],
        renewed.serial.as_str(),
        "status shows the renewed certificate"
    );

    // The short-lived token has expired by now (asked for by another
    // machine, so that it cannot be used before it does).
    wait_for("the 60 s token to expire", Duration::from_secs(60), || {
        let (code, out) = enroll_by_hand(&fleet, "worker-1", &short_lived);
        Ok(
            (code.as_deref() == Some("PermissionDenied") && out.contains("expired at"))
                .then_some(()),
        )
    })
    .expect("an expired token is refused");

    // Past the first certificate's end, a restart makes every agent dial
    // again, with the certificate it renewed itself.
    wait_for(
        "the first certificate to expire",
        Duration::from_secs(120),
        || {
            Ok(first
                .expired_at(procurator_core::now_ms() / 1000)
                .then_some(()))
        },
    )
    .expect("expired");
    fleet.control_plane.restart(&fleet.nix).expect("restart");
    fleet.wait_connected(&all).expect("reconnected");
    deploy(&fleet, 2);
    let log = fleet.control_plane.log();
    assert!(!log.contains("refused a client certificate"), "{log}");
}
