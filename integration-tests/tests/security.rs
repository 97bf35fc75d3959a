//! Who may talk to the control plane, and what they get: mutual TLS with
//! the fleet CA, roles from the certificate checked on every RPC, an
//! agent's machine name taken from its certificate only. Raw RPCs go
//! through the real grpcurl.

use std::time::Duration;

use procurator_integration_tests::{Fleet, FleetOptions, NixEnv, Pki, ctl::grpc_code, scenario};
use serde_json::{Value, json};

fn no_agents() -> FleetOptions {
    FleetOptions {
        agents: vec![],
        ..FleetOptions::default()
    }
}

const LIST: &str = "procurator.v1.DeploymentService/ListDeployments";
const SUBMIT: &str = "procurator.v1.DeploymentService/Submit";

#[test]
fn reflection_lists_the_services_and_health_is_serving() {
    let fleet = Fleet::start_with(no_agents()).expect("fleet");
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let operator = fleet.pki.operator();

    let out = grpcurl
        .run(Some(&operator), &[], &["list"])
        .expect("grpcurl list");
    out.expect_code(0).expect("reflection answers");
    let services: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    for service in [
        "procurator.v1.AgentService",
        "procurator.v1.DeploymentService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&service), "{service} listed: {out}");
    }

    let out = grpcurl
        .run(
            Some(&operator),
            &["-d", "{}"],
            &["grpc.health.v1.Health/Check"],
        )
        .expect("health check");
    out.expect_code(0).expect("health answers");
    let reply: Value = serde_json::from_str(&out.stdout).expect("health JSON");
    assert_eq!(reply["status"], "SERVING", "{out}");

    // Reflection describes Procurator's own messages too.
    let out = grpcurl
        .run(
            Some(&operator),
            &[],
            &["describe", "procurator.v1.DeploymentService"],
        )
        .expect("describe");
    out.expect_code(0).expect("describe answers");
    assert!(out.stdout.contains("rpc Submit"), "{out}");
}

#[test]
fn connections_without_a_fleet_certificate_are_refused() {
    let fleet = Fleet::start_with(no_agents()).expect("fleet");
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let ctl = fleet.ctl().expect("ctl");
    let before = ctl
        .run(&["deployments", "--output", "json"])
        .expect("deployments");
    before.expect_code(0).expect("the operator may list");
    let (artifact, _) = fleet.write_deployment(&fleet.initial).expect("artifact");
    let artifact = artifact.to_str().expect("utf-8 path");

    // No client certificate at all.
    let out = grpcurl.call(None, LIST, "{}").expect("grpcurl");
    assert_ne!(out.code, Some(0), "no certificate must be refused: {out}");
    assert!(out.stdout.trim().is_empty(), "{out}");
    if let Some(code) = grpc_code(&out) {
        assert_eq!(code, "Unauthenticated", "{out}");
    }

    // Certificates from another CA.
    let nix = NixEnv::temp().expect("nix");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Pki::init(&nix, &other_dir.path().join("pki")).expect("another CA");
    let foreign_ci = other.issue(&nix, "ci", "github").expect("foreign ci cert");
    let foreign_agent = other
        .issue(&nix, "agent", "worker-1")
        .expect("foreign agent cert");
    for id in [other.operator(), foreign_ci] {
        let out = grpcurl.call(Some(&id), LIST, "{}").expect("grpcurl");
        assert_ne!(
            out.code,
            Some(0),
            "a foreign certificate must be refused: {out}"
        );
        assert!(out.stdout.trim().is_empty(), "{out}");
        let out = ctl
            .with_identity(&id)
            .run(&["submit", artifact])
            .expect("ctl");
        assert_eq!(
            out.code,
            Some(1),
            "ctl submit with a foreign certificate: {out}"
        );
    }
    let hello = json!({ "hello": { "protocolVersion": 1, "agentVersion": "grpcurl" } });
    let out = grpcurl
        .agent_stream(
            Some(&foreign_agent),
            &[hello],
            false,
            Duration::from_secs(10),
            |s| !s.is_empty(),
        )
        .expect("grpcurl connect");
    assert!(
        !out.stdout.contains("welcome"),
        "a foreign agent must not be welcomed: {out}"
    );
    assert_ne!(out.code, Some(0), "{out}");

    // A client that trusts another CA does not trust the control plane.
    let out = grpcurl
        .with_ca(&other.ca())
        .call(Some(&fleet.pki.operator()), LIST, "{}")
        .expect("grpcurl");
    assert_ne!(
        out.code,
        Some(0),
        "the server's certificate is not from that CA: {out}"
    );
    let out = ctl.with_ca(&other.ca()).run(&["deployments"]).expect("ctl");
    assert_eq!(out.code, Some(1), "{out}");

    let after = ctl
        .run(&["deployments", "--output", "json"])
        .expect("deployments");
    assert_eq!(before.stdout, after.stdout, "nothing was submitted");
}

#[test]
fn every_rpc_checks_the_role_in_the_certificate() {
    let fleet = Fleet::start_with(no_agents()).expect("fleet");
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let ctl = fleet.ctl().expect("ctl");
    let agent = fleet.pki.agent("worker-1");
    let ci = fleet.pki.identity("ci", "github");
    let operator = fleet.pki.operator();
    let (artifact, commit) = fleet.write_deployment(&fleet.initial).expect("artifact");
    let artifact_json = std::fs::read_to_string(&artifact).expect("read artifact");
    let submit = serde_json::to_string(&json!({ "artifactJson": artifact_json })).expect("json");

    // An agent may not submit, nor read the fleet's deployments.
    let out = grpcurl
        .call(Some(&agent), SUBMIT, &submit)
        .expect("grpcurl");
    assert_eq!(
        grpc_code(&out).as_deref(),
        Some("PermissionDenied"),
        "{out}"
    );
    let out = grpcurl.call(Some(&agent), LIST, "{}").expect("grpcurl");
    assert_eq!(
        grpc_code(&out).as_deref(),
        Some("PermissionDenied"),
        "{out}"
    );
    let out = ctl
        .with_identity(&agent)
        .run(&["submit", artifact.to_str().expect("utf-8")])
        .expect("ctl");
    assert_eq!(out.code, Some(1), "{out}");
    let why = out.stderr.to_lowercase();
    assert!(
        why.contains("permission") || why.contains("role"),
        "says why: {out}"
    );

    // Operators and CI may not act as agents.
    let hello = json!({ "hello": { "protocolVersion": 1, "agentVersion": "grpcurl" } });
    for id in [&operator, &ci] {
        let out = grpcurl
            .agent_stream(
                Some(id),
                std::slice::from_ref(&hello),
                false,
                Duration::from_secs(10),
                |s| !s.is_empty(),
            )
            .expect("grpcurl connect");
        assert_eq!(
            grpc_code(&out).as_deref(),
            Some("PermissionDenied"),
            "{out}"
        );
        assert!(!out.stdout.contains("welcome"), "{out}");
    }

    // Nothing was stored by the refused calls; CI may submit.
    let listed = grpcurl.call_json(&operator, LIST, "{}").expect("list");
    assert!(
        listed
            .get("deployments")
            .is_none_or(|d| d.as_array().is_some_and(Vec::is_empty)),
        "{listed}"
    );
    let out = grpcurl.call(Some(&ci), SUBMIT, &submit).expect("grpcurl");
    out.expect_code(0).expect("ci may submit");
    let reply: Value = serde_json::from_str(&out.stdout).expect("submit reply");
    let deployment = fleet.deployment_by_commit(&commit).expect("stored");
    assert_eq!(
        deployment["id"], reply["deploymentId"],
        "{reply} {deployment}"
    );
    assert_eq!(deployment["submittedBy"], "github", "{deployment}");

    // CI may not stop or undo a rollout: only a person may.
    let id = reply["deploymentId"].as_str().expect("id");
    let cancel = json!({ "deploymentId": id }).to_string();
    for (rpc, body) in [
        ("procurator.v1.DeploymentService/Cancel", cancel.as_str()),
        ("procurator.v1.DeploymentService/Rollback", "{}"),
        ("procurator.v1.DeploymentService/PlanRollback", "{}"),
    ] {
        let out = grpcurl.call(Some(&ci), rpc, body).expect("grpcurl");
        assert_eq!(
            grpc_code(&out).as_deref(),
            Some("PermissionDenied"),
            "{rpc}: {out}"
        );
        assert!(out.stderr.contains("role operator"), "{rpc}: {out}");
    }
    let still = fleet.deployment_by_commit(&commit).expect("stored");
    assert_eq!(still["state"], "DEPLOYMENT_STATE_RUNNING", "{still}");

    // An agent whose certificate lacks the VM-host mark may not pose as one.
    let posing = json!({ "hello": {
        "protocolVersion": 1,
        "agentVersion": "grpcurl",
        "vmHost": { "milliCpus": 1_000_000_000u64, "memoryBytes": 1_000_000_000_000_000u64, "vmm": "cloud-hypervisor" },
    }});
    let out = grpcurl
        .agent_stream(
            Some(&agent),
            &[posing],
            false,
            Duration::from_secs(10),
            |s| !s.is_empty(),
        )
        .expect("grpcurl connect");
    assert_eq!(
        grpc_code(&out).as_deref(),
        Some("PermissionDenied"),
        "{out}"
    );
    assert!(out.stderr.contains("--vm-host"), "{out}");
    let agents = fleet.agents().expect("agents");
    assert!(
        agents.iter().all(|a| a.get("vmHost").is_none()),
        "no capacity recorded: {agents:?}"
    );
}

#[test]
fn an_agent_only_ever_receives_its_own_machines_state() {
    // worker-1's agent is not running: grpcurl speaks for it.
    let opts = FleetOptions {
        agents: vec!["control-plane-1".to_owned(), "worker-2".to_owned()],
        ..FleetOptions::default()
    };
    let mut fleet = Fleet::start_with(opts).expect("fleet");
    let (closures, artifact, commit) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["submit", artifact.to_str().expect("utf-8")])
        .expect("submit")
        .expect_code(0)
        .expect("submitted");

    // worker-1's certificate, claiming to run worker-2's closure: the name
    // comes from the certificate, so it is welcomed as worker-1 and handed
    // worker-1's closure only.
    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let hello = json!({ "hello": {
        "protocolVersion": 1,
        "agentVersion": "grpcurl",
        "currentSystem": fleet.initial["worker-2"],
        "bootedSystem": fleet.initial["worker-2"],
    }});
    let out = grpcurl
        .agent_stream(
            Some(&fleet.pki.agent("worker-1")),
            &[hello],
            true,
            Duration::from_secs(30),
            |s| s.contains("desiredState"),
        )
        .expect("grpcurl connect");
    assert!(
        out.stdout.contains("\"machine\": \"worker-1\""),
        "welcomed as worker-1: {out}"
    );
    assert!(
        out.stdout.contains("desiredState"),
        "worker-1's desired state arrives: {out}"
    );
    assert!(out.stdout.contains(&closures["worker-1"]), "{out}");
    for other in ["worker-2", "control-plane-1"] {
        assert!(
            !out.stdout.contains(&closures[other]),
            "never {other}'s closure: {out}"
        );
    }

    // The real agent takes over and converges on worker-1's own closure.
    fleet.start_agent("worker-1").expect("start worker-1");
    let id = fleet.deployment_id(&commit).expect("deployment");
    ctl.run(&["watch", &id])
        .expect("watch")
        .expect_code(0)
        .expect("the deployment succeeds");
    let worker1 = fleet.host("worker-1");
    assert_eq!(
        worker1.current_system().expect("current").as_deref(),
        Some(closures["worker-1"].as_str())
    );
    assert!(
        !worker1.has_path(&closures["worker-2"]),
        "worker-2's closure never reached worker-1"
    );
}

#[test]
fn agent_strings_reach_an_operators_terminal_escaped() {
    // worker-1's agent is not running: grpcurl speaks for it.
    let opts = FleetOptions {
        agents: vec!["control-plane-1".to_owned(), "worker-2".to_owned()],
        ..FleetOptions::default()
    };
    let fleet = Fleet::start_with(opts).expect("fleet");
    let (_, artifact, _) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    let ctl = fleet.ctl().expect("ctl");
    let (id, _) = scenario::submit(&ctl, &artifact, &[]).expect("submitted");

    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let forged = "ok\u{1b}[1A\u{1b}[2Kworker-1 succeeded";
    // A Hello whose system is not a store path is refused outright.
    let bad_hello = json!({ "hello": { "protocolVersion": 1, "currentSystem": format!("/nix/store/x{forged}") } });
    let out = grpcurl
        .agent_stream(
            Some(&fleet.pki.agent("worker-1")),
            &[bad_hello],
            false,
            Duration::from_secs(10),
            |s| !s.is_empty(),
        )
        .expect("grpcurl");
    assert_eq!(grpc_code(&out).as_deref(), Some("InvalidArgument"), "{out}");
    // A result's reason is only text: it is kept, and shown escaped.
    let frames = [
        json!({ "hello": { "protocolVersion": 1, "agentVersion": "grpcurl" } }),
        json!({ "result": { "deploymentId": id, "state": "MACHINE_STATE_FAILED", "reason": forged } }),
    ];
    grpcurl
        .agent_stream(
            Some(&fleet.pki.agent("worker-1")),
            &frames,
            true,
            Duration::from_secs(30),
            |s| s.contains("desiredState"),
        )
        .expect("grpcurl");
    let out = ctl.run(&["watch", &id]).expect("watch");
    assert!(
        !out.stdout.contains('\u{1b}'),
        "a raw escape reached the terminal: {out}"
    );
    assert!(
        out.stdout
            .contains("ok\\u{1b}[1A\\u{1b}[2Kworker-1 succeeded"),
        "{out}"
    );
    let out = ctl.run(&["deployments"]).expect("deployments");
    assert!(!out.stdout.contains('\u{1b}'), "{out}");
}

#[test]
fn idle_connections_cannot_starve_the_control_plane() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // The control plane starts under a soft limit of 1,024 open files, as
    // anywhere outside the NixOS module; it raises its own to the hard one.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if hard < 8192 {
        eprintln!("the hard open-file limit is {hard}: too low to test with 3,000 connections");
        return;
    }
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(soft), hard).expect("lower the soft limit");
    let fleet = Fleet::start_with(no_agents());
    // This test's own sockets need more than 1,024.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the soft limit");
    let fleet = fleet.expect("fleet");
    let log = fleet.control_plane.log();
    assert!(
        log.contains(&format!("open_files={hard}")),
        "the control plane raised its limit to {hard}: {log}"
    );

    let grpcurl = fleet.grpcurl().expect("grpcurl");
    let operator = fleet.pki.operator();
    let healthy = || {
        let out = grpcurl
            .run(
                Some(&operator),
                &["-d", "{}"],
                &["grpc.health.v1.Health/Check"],
            )
            .expect("grpcurl");
        out.code == Some(0) && out.stdout.contains("SERVING")
    };
    let addr = fleet.control_plane.host_port().expect("address");
    // 3,000 connections that never send a byte.
    let idle: Vec<std::net::TcpStream> = (0..3000)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Health answers all along while they are held (they are closed after
    // the first-byte timeout, 3 s).
    for _ in 0..10 {
        assert!(
            healthy(),
            "health did not answer with 3,000 idle connections open"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(idle);
    assert!(healthy(), "health answers once they close");
    let ctl = fleet.ctl().expect("ctl");
    ctl.run(&["deployments"])
        .expect("deployments")
        .expect_code(0)
        .expect("the control plane serves");
}
