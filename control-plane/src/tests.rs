//! The server on 127.0.0.1:0 with a PKI made for the test, driven by the
//! generated clients over mutual TLS.

use std::path::Path;
use std::time::Duration;

use procurator_core::pki;
use procurator_core::tls::TlsFiles;
use procurator_core::{PROTOCOL_VERSION, Role};
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use procurator_proto::v1::deployment_service_client::DeploymentServiceClient;
use procurator_proto::v1::{
    ActivationResult, AgentMessage, ControlMessage, DeploymentState, GetDeploymentRequest, Hello,
    ListAgentsRequest, MachineState, Progress, SubmitRequest, WatchRequest, agent_message,
    control_message, event,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::server::{self, ServerError};
use crate::test_support::artifact_json;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct TestServer {
    dir: tempfile::TempDir,
    config: server::Config,
    addr: String,
    signal: CancellationToken,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    async fn start(hello_timeout: Duration) -> Self {
        Self::start_with(hello_timeout, |_| {}).await
    }

    /// As [`Self::start`], with `adjust` applied to the configuration.
    async fn start_with(hello_timeout: Duration, adjust: impl FnOnce(&mut server::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        let init = pki::init(&pki_dir, &[], "admin").unwrap();
        // web-1 and web-2 may host VMs; web-3 may not.
        for host in ["web-1", "web-2"] {
            let identity = pki::identity(Role::Agent, host, true).unwrap();
            pki::issue_for(&pki_dir, &identity, &[], false).unwrap();
        }
        pki::issue(&pki_dir, Role::Agent, "web-3", &[], false).unwrap();
        pki::issue(&pki_dir, Role::Ci, "ci", &[], false).unwrap();
        let ready = dir.path().join("ready");
        let mut config = server::Config {
            listen: "127.0.0.1:0".into(),
            database: crate::store::Database::Sqlite {
                data_dir: dir.path().join("data"),
            },
            tls: TlsFiles {
                ca: init.ca_cert,
                cert: init.control_plane.cert,
                key: init.control_plane.key,
            },
            ready_file: Some(ready.clone()),
            hello_timeout,
            keepalive: Duration::from_secs(20),
            metrics_listen: None,
            metrics_ready_file: None,
            retention: crate::store::Retention::default(),
            issuing_ca: None,
        };
        adjust(&mut config);
        let signal = CancellationToken::new();
        let handle = tokio::spawn(server::run(config.clone(), signal.clone()));
        let addr = wait_for_ready_file(&ready).await;
        Self {
            dir,
            config,
            addr,
            signal,
            handle,
        }
    }

    /// Shut down gracefully and start again on the same store and address.
    async fn restart(&mut self) {
        self.signal.cancel();
        (&mut self.handle).await.unwrap().unwrap();
        let ready = self.config.ready_file.clone().unwrap();
        std::fs::remove_file(&ready).unwrap();
        self.config.listen = self.addr.clone();
        self.signal = CancellationToken::new();
        self.handle = tokio::spawn(server::run(self.config.clone(), self.signal.clone()));
        assert_eq!(wait_for_ready_file(&ready).await, self.addr);
    }

    fn channel(&self, role: Role, name: &str) -> Channel {
        let pki_dir = self.dir.path().join("pki");
        let (cert, key) = pki::leaf_paths(&pki_dir, role, &name.parse().unwrap());
        let files = TlsFiles {
            ca: pki::ca_cert_path(&pki_dir),
            cert,
            key,
        };
        files
            .load()
            .unwrap()
            .channel(&format!("https://{}", self.addr))
            .unwrap()
    }

    fn deployments(&self, role: Role, name: &str) -> DeploymentServiceClient<Channel> {
        DeploymentServiceClient::new(self.channel(role, name))
    }

    /// Dial as agent `web-1`, send `first`, return the outbound sender and the
    /// response (or the status the handshake failed with).
    async fn dial(
        &self,
        role: Role,
        name: &str,
        first: Option<AgentMessage>,
    ) -> (
        mpsc::Sender<AgentMessage>,
        Result<Streaming<ControlMessage>, tonic::Status>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        if let Some(first) = first {
            tx.send(first).await.unwrap();
        }
        let mut client = AgentServiceClient::new(self.channel(role, name));
        let response = client
            .connect(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner());
        (tx, response)
    }
}

impl TestServer {
    /// An agent stream as `name` whose `first` message is accepted: the
    /// server's `Welcome` has been read.
    async fn connect(
        &self,
        name: &str,
        first: AgentMessage,
    ) -> (mpsc::Sender<AgentMessage>, Streaming<ControlMessage>) {
        let (tx, response) = self.dial(Role::Agent, name, Some(first)).await;
        let mut stream = response.unwrap();
        assert!(matches!(
            next(&mut stream).await,
            control_message::Kind::Welcome(_)
        ));
        (tx, stream)
    }
}

async fn wait_for_ready_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never wrote {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hello() -> AgentMessage {
    agent(agent_message::Kind::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        current_system: format!("/nix/store/{}-old", "0".repeat(32)),
        ..Default::default()
    }))
}

/// A VM host's Hello offering `cpus` CPUs and `gib` GiB, labelled `labels`.
fn vm_host_hello(cpus: u64, gib: u64, labels: &[&str]) -> AgentMessage {
    agent(agent_message::Kind::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        vm_host: Some(capacity(cpus, gib, labels)),
        ..Default::default()
    }))
}

fn capacity(cpus: u64, gib: u64, labels: &[&str]) -> procurator_proto::v1::VmHostCapacity {
    procurator_proto::v1::VmHostCapacity {
        milli_cpus: cpus * 1000,
        memory_bytes: gib << 30,
        labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        vmm: "cloud-hypervisor".into(),
    }
}

fn agent(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

async fn next(stream: &mut Streaming<ControlMessage>) -> control_message::Kind {
    let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("no message within 30 s")
        .expect("stream failed")
        .expect("stream ended");
    message.kind.expect("empty control message")
}

async fn ending_status(stream: &mut Streaming<ControlMessage>) -> Code {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Code::Ok,
            Ok(Err(status)) => return status.code(),
            Err(_) => panic!("the stream did not end within 30 s"),
        }
    }
}

fn submit_request(machines: &[(&str, &str)]) -> SubmitRequest {
    SubmitRequest {
        artifact_json: artifact_json(COMMIT, machines),
        force: false,
        on: Vec::new(),
    }
}

// The test artifacts' machines are cloud-hypervisor VMs: with no VM host
// connected, a VM whose own agent is connected deploys in place like any
// machine.
#[tokio::test]
async fn an_agent_receives_and_completes_its_desired_state() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut ci = server.deployments(Role::Ci, "ci");
    let submitted = ci
        .submit(submit_request(&[("web-1", "sys-new")]))
        .await
        .unwrap()
        .into_inner();
    assert!(submitted.created);
    let id = submitted.deployment_id;

    let (tx, response) = server.dial(Role::Agent, "web-1", Some(hello())).await;
    let mut stream = response.unwrap();
    let control_message::Kind::Welcome(welcome) = next(&mut stream).await else {
        panic!("not Welcome")
    };
    assert_eq!(welcome.machine, "web-1");
    let control_message::Kind::DesiredState(desired) = next(&mut stream).await else {
        panic!("no DesiredState")
    };
    assert_eq!(desired.deployment_id, id);
    assert!(desired.closure.ends_with("-sys-new"));
    assert_eq!(desired.health_checks.len(), 1);

    let mut watch = ci
        .watch(WatchRequest {
            deployment_id: id.clone(),
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tx.send(agent(agent_message::Kind::Progress(Progress {
        deployment_id: id.clone(),
        state: MachineState::Activating as i32,
        ..Default::default()
    })))
    .await
    .unwrap();
    tx.send(agent(agent_message::Kind::Result(ActivationResult {
        deployment_id: id.clone(),
        state: MachineState::Succeeded as i32,
        current_system: desired.closure.clone(),
        ..Default::default()
    })))
    .await
    .unwrap();

    // The watch replays from the start and ends with the finishing event.
    let mut states = Vec::new();
    let mut finished = None;
    while let Some(event) = watch.message().await.unwrap() {
        assert_eq!(event.deployment_id, id);
        match event.kind {
            Some(event::Kind::Machine(update)) => states.push(update.state()),
            Some(event::Kind::Finished(fin)) => finished = Some(fin.state()),
            _ => {}
        }
    }
    assert_eq!(
        states,
        [
            MachineState::Sent,
            MachineState::Activating,
            MachineState::Succeeded
        ]
    );
    assert_eq!(finished, Some(DeploymentState::Succeeded));

    let request = GetDeploymentRequest {
        deployment_id: id.clone(),
    };
    let deployment = ci.get_deployment(request).await.unwrap().into_inner();
    assert_eq!(deployment.state(), DeploymentState::Succeeded);
    let agents = ci
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected);
    assert_eq!(agents[0].current_system, desired.closure);

    // Shutdown ends the agent's stream with UNAVAILABLE and the server exits cleanly.
    server.signal.cancel();
    assert_eq!(ending_status(&mut stream).await, Code::Unavailable);
    server.handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn every_rpc_checks_the_role_in_the_certificate() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let mut as_agent = server.deployments(Role::Agent, "web-1");
    let denied = as_agent
        .submit(submit_request(&[("web-1", "sys")]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = as_agent
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    let (_tx, response) = server.dial(Role::Operator, "admin", Some(hello())).await;
    assert_eq!(response.unwrap_err().code(), Code::PermissionDenied);

    let mut operator = server.deployments(Role::Operator, "admin");
    let bad = operator
        .submit(SubmitRequest {
            artifact_json: "{}".into(),
            force: false,
            on: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("gitCommit"), "{bad:?}");
    let missing = GetDeploymentRequest {
        deployment_id: "d-19700101-000000-0000".into(),
    };
    assert_eq!(
        operator.get_deployment(missing).await.unwrap_err().code(),
        Code::NotFound
    );
    let malformed = GetDeploymentRequest {
        deployment_id: "../x".into(),
    };
    assert_eq!(
        operator.get_deployment(malformed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let unknown = WatchRequest {
        deployment_id: "d-19700101-000000-0000".into(),
        from_revision: 0,
    };
    assert_eq!(
        operator.watch(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn the_handshake_is_checked() {
    let server = TestServer::start(Duration::from_millis(500)).await;
    let old = agent(agent_message::Kind::Hello(Hello {
        protocol_version: 0,
        ..Default::default()
    }));
    let (_tx, response) = server.dial(Role::Agent, "web-1", Some(old)).await;
    assert_eq!(response.unwrap_err().code(), Code::FailedPrecondition);

    let beat = agent(agent_message::Kind::Heartbeat(Default::default()));
    let (_tx, response) = server.dial(Role::Agent, "web-1", Some(beat)).await;
    assert_eq!(response.unwrap_err().code(), Code::InvalidArgument);

    let (_tx, response) = server.dial(Role::Agent, "web-1", None).await;
    assert_eq!(response.unwrap_err().code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn a_second_connection_replaces_the_first() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let (_tx1, mut first) = server.connect("web-1", hello()).await;
    let (_tx2, mut second) = server.connect("web-1", hello()).await;
    assert_eq!(ending_status(&mut first).await, Code::Aborted);

    // The old stream's end did not mark the machine disconnected: a
    // deployment submitted now still reaches the new stream.
    let mut ci = server.deployments(Role::Ci, "ci");
    let id = ci
        .submit(submit_request(&[("web-1", "sys")]))
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    let control_message::Kind::DesiredState(desired) = next(&mut second).await else {
        panic!("no DesiredState")
    };
    assert_eq!(desired.deployment_id, id);
    let agents = ci
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents[0].connected);
}

#[tokio::test]
async fn after_a_restart_an_agent_is_welcomed_at_its_first_dial() {
    let mut server = TestServer::start(Duration::from_secs(10)).await;
    // Several connections: the store remembers generation 3 for web-1.
    for _ in 0..3 {
        let (_tx, _stream) = server.connect("web-1", hello()).await;
    }
    server.restart().await;

    // The new process numbers its connections after the stored ones, so this
    // one is not taken for an older connection and refused as replaced.
    let (_tx, stream) = server.dial(Role::Agent, "web-1", Some(hello())).await;
    let mut stream = stream.expect("the first dial after a restart is accepted");
    assert!(matches!(
        next(&mut stream).await,
        control_message::Kind::Welcome(_)
    ));
    let agents = server
        .deployments(Role::Ci, "ci")
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents[0].connected, "{agents:?}");
}

#[tokio::test]
async fn a_vm_host_is_listed_with_what_it_offers_until_it_says_otherwise() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let list = || async {
        server
            .deployments(Role::Ci, "ci")
            .list_agents(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents
    };
    let (_tx, stream) = server
        .dial(
            Role::Agent,
            "web-1",
            Some(vm_host_hello(8, 32, &["rack-1"])),
        )
        .await;
    let mut stream = stream.unwrap();
    assert!(matches!(
        next(&mut stream).await,
        control_message::Kind::Welcome(_)
    ));
    assert_eq!(list().await[0].vm_host, Some(capacity(8, 32, &["rack-1"])));

    // Restarted without --vm-host: no longer a VM host.
    let (_tx2, _again) = server.connect("web-1", hello()).await;
    assert_eq!(list().await[0].vm_host, None);
}

#[tokio::test]
async fn a_vm_host_is_told_which_vms_to_run_on_connecting_and_after_each_submit() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let hello = vm_host_hello(4, 8, &[]);
    // web-1 stands in for the VM host here: its certificate is the one issued.
    let (report, mut host) = server.connect("web-1", hello).await;
    let assigned = |kind| match kind {
        control_message::Kind::VmAssignments(a) => a.vms,
        other => panic!("expected VM assignments, got {other:?}"),
    };
    assert!(assigned(next(&mut host).await).is_empty());
    // Every change sends the whole set (a scheduled row and the submit may
    // each send one): read until it is the one expected.
    async fn until(
        host: &mut Streaming<ControlMessage>,
        done: impl Fn(&[procurator_proto::v1::VmAssignment]) -> bool,
    ) -> Vec<procurator_proto::v1::VmAssignment> {
        loop {
            match next(host).await {
                control_message::Kind::VmAssignments(set) if done(&set.vms) => return set.vms,
                control_message::Kind::VmAssignments(_) => continue,
                other => panic!("expected VM assignments, got {other:?}"),
            }
        }
    }

    // Two VMs (the test artifact's backend is cloud-hypervisor, 1 CPU, 1 GB),
    // sent through their host since they have no agent of their own.
    let mut ci = server.deployments(Role::Ci, "ci");
    let first = ci
        .submit(submit_request(&[("app-1", "sys-a"), ("app-2", "sys-a")]))
        .await
        .unwrap()
        .into_inner();
    let vms = until(&mut host, |vms| vms.len() == 2).await;
    let names: Vec<&str> = vms.iter().map(|v| v.instance.as_str()).collect();
    assert_eq!(names, ["app-1", "app-2"]);
    assert!(vms[0].closure.ends_with("-sys-a"), "{vms:?}");
    assert_eq!(vms[0].deployment_id, first.deployment_id);
    // "1 GB", rounded up to whole 2 MiB pages (477 of them).
    assert_eq!(vms[0].memory_bytes, 1_000_341_504);
    assert!(!vms[0].guest_agent_connected);
    let d = crate::test_support::with_rows(&mut ci, &first.deployment_id).await;
    assert!(
        d.machines.iter().all(|m| m.state() == MachineState::Sent),
        "{d:?}"
    );

    // The host reports for its instances, and a result for an instance it
    // does not host is ignored: app-2 is moved onto a second host first.
    let (other_tx, _other) = server.connect("web-2", vm_host_hello(4, 8, &[])).await;
    for instance in ["app-1", "app-2"] {
        let result = ActivationResult {
            instance: instance.into(),
            deployment_id: first.deployment_id.clone(),
            state: MachineState::Succeeded.into(),
            current_system: vms[0].closure.clone(),
            ..Default::default()
        };
        // web-2 hosts neither yet (placements change at the next submit).
        let tx = if instance == "app-1" {
            &report
        } else {
            &other_tx
        };
        tx.send(agent(agent_message::Kind::Result(result)))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = crate::test_support::with_rows(&mut ci, &first.deployment_id).await;
        let states: Vec<(String, MachineState)> = d
            .machines
            .iter()
            .map(|m| (m.machine.clone(), m.state()))
            .collect();
        if states[0].1 == MachineState::Succeeded {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // web-2's stream is handled in order: once its heartbeat after the
    // result shows, the result was handled, and ignored.
    let marker = format!("/nix/store/{}-marker", "m".repeat(32));
    other_tx
        .send(agent(agent_message::Kind::Heartbeat(
            procurator_proto::v1::Heartbeat {
                current_system: marker.clone(),
            },
        )))
        .await
        .unwrap();
    loop {
        let agents = ci
            .list_agents(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents;
        if agents
            .iter()
            .any(|a| a.machine == "web-2" && a.current_system == marker)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agents:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = crate::test_support::with_rows(&mut ci, &first.deployment_id).await;
    assert_eq!(d.machines[1].machine, "app-2");
    assert_eq!(d.machines[1].state(), MachineState::Sent, "{d:?}");

    // app-2 leaves the blueprint: the host's set no longer has it.
    ci.submit(SubmitRequest {
        artifact_json: artifact_json(
            "1123456789abcdef0123456789abcdef01234567",
            &[("app-1", "sys-b")],
        ),
        force: false,
        on: Vec::new(),
    })
    .await
    .unwrap();
    let vms = until(&mut host, |vms| vms.len() == 1).await;
    assert!(vms[0].closure.ends_with("-sys-b"), "{vms:?}");
}

#[tokio::test]
async fn a_vm_with_its_own_agent_goes_through_its_host_which_leaves_it_in_place() {
    let server = TestServer::start(Duration::from_secs(10)).await;
    let (host_tx, mut host) = server.connect("web-1", vm_host_hello(4, 8, &[])).await;
    // The VM's own agent, inside the guest.
    let (_guest_tx, mut guest) = server.connect("web-2", hello()).await;

    let mut ci = server.deployments(Role::Ci, "ci");
    let id = ci
        .submit(submit_request(&[("web-2", "sys-new")]))
        .await
        .unwrap()
        .into_inner()
        .deployment_id;
    // The host decides first: it hears of web-2, whose agent is connected.
    let vm = loop {
        match next(&mut host).await {
            control_message::Kind::VmAssignments(set) if !set.vms.is_empty() => {
                break set.vms[0].clone();
            }
            control_message::Kind::VmAssignments(_) => continue,
            other => panic!("expected VM assignments, got {other:?}"),
        }
    };
    assert_eq!(
        (vm.instance.as_str(), vm.deployment_id.as_str()),
        ("web-2", id.as_str())
    );
    assert!(vm.guest_agent_connected);
    // Nothing goes to the guest's agent before the host answers. (Checked
    // for half a second: a regression shows as a message here.)
    let early = tokio::time::timeout(Duration::from_millis(500), guest.message()).await;
    assert!(
        early.is_err(),
        "the guest's agent was sent {early:?} before its host answered"
    );

    // Same kernel line: in place. Only now does the guest's agent get it.
    let in_place = procurator_proto::v1::VmInPlace {
        instance: "web-2".into(),
        deployment_id: id.clone(),
    };
    host_tx
        .send(agent(agent_message::Kind::VmInPlace(in_place)))
        .await
        .unwrap();
    let control_message::Kind::DesiredState(desired) = next(&mut guest).await else {
        panic!("the guest's agent got no desired state")
    };
    assert_eq!(desired.deployment_id, id);
    assert!(desired.closure.ends_with("-sys-new"));

    // watch says which path it took.
    let mut events = ci
        .watch(WatchRequest {
            deployment_id: id.clone(),
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("no in-place event within 30 s")
            .unwrap()
            .expect("the watch ended");
        if let Some(event::Kind::Machine(update)) = event.kind
            && update.message.starts_with("in place:")
        {
            assert_eq!(update.machine, "web-2");
            assert!(
                update.message.contains("web-1 keeps the VM running"),
                "{update:?}"
            );
            break;
        }
    }
}

mod metrics;
mod rollout;
mod trust;
