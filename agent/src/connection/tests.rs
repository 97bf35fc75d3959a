//! The dialler against an in-process control plane over real mutual TLS.

use std::collections::VecDeque;
use std::sync::Mutex;

use procurator_core::Role;
use procurator_core::pki;
use procurator_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use procurator_proto::v1::{ConfirmRequest, ConfirmResponse, DesiredState, MachineState, Progress};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::outcome::Outcome;
use procurator_core::control_planes::ControlPlanes;

#[test]
fn errors_are_sorted_into_retryable_and_terminal() {
    let terminal = [
        tonic::Status::failed_precondition("protocol 9 is not spoken here"),
        tonic::Status::unauthenticated("no certificate"),
        tonic::Status::permission_denied("role ci"),
    ];
    for status in terminal {
        assert!(SessionError::Status(status).is_terminal());
    }
    let retryable = [
        tonic::Status::unavailable("shutting down"),
        tonic::Status::aborted("replaced by a newer connection"),
        tonic::Status::deadline_exceeded("no hello"),
        tonic::Status::internal("oops"),
    ];
    for status in retryable {
        assert!(!SessionError::Status(status).is_terminal());
    }
    assert!(!SessionError::NoWelcome.is_terminal());
    assert!(!SessionError::Closed.is_terminal());
}

#[test]
fn status_errors_read_well() {
    let e = SessionError::Status(tonic::Status::permission_denied("agent/x may not do this"));
    assert_eq!(
        e.to_string(),
        "the control plane answered PermissionDenied: agent/x may not do this"
    );
}

enum Event {
    Connected {
        hello: Hello,
        control: mpsc::Sender<Result<ControlMessage, Status>>,
    },
    Message(AgentMessage),
}

/// Answers `Hello` with `Welcome` (or refuses with the next queued status)
/// and hands the test each stream's sending side.
struct Fake {
    events: mpsc::UnboundedSender<Event>,
    refusals: Mutex<VecDeque<Status>>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    async fn enroll(
        &self,
        _request: tonic::Request<procurator_proto::v1::EnrollRequest>,
    ) -> Result<tonic::Response<procurator_proto::v1::IssuedCertificate>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn renew(
        &self,
        _request: tonic::Request<procurator_proto::v1::RenewRequest>,
    ) -> Result<tonic::Response<procurator_proto::v1::IssuedCertificate>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    type ConnectStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if let Some(status) = self.refusals.lock().unwrap().pop_front() {
            return Err(status);
        }
        let mut inbound = request.into_inner();
        let Some(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("the first frame must be Hello"));
        };
        let (control, rx) = mpsc::channel(16);
        let welcome = Welcome {
            protocol_version: 1,
            machine: "worker-1".into(),
            control_plane_version: "test".into(),
        };
        control
            .send(Ok(ControlMessage {
                kind: Some(control_message::Kind::Welcome(welcome)),
            }))
            .await
            .unwrap();
        let _ = self.events.send(Event::Connected { hello, control });
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let _ = events.send(Event::Message(message));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn confirm(
        &self,
        _request: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmResponse>, Status> {
        Ok(Response::new(ConfirmResponse {
            confirmed: true,
            reason: String::new(),
        }))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    events: mpsc::UnboundedReceiver<Event>,
    desired: mpsc::Receiver<Inbound>,
    outbox: Arc<Outbox>,
    /// What the dialer hands the VM runner.
    vm_sets: watch::Receiver<Option<procurator_proto::v1::VmAssignments>>,
    /// Where the VM runner's results enter the dialer.
    vm_results: mpsc::Sender<agent_message::Kind>,
    cancel: CancellationToken,
    dialer: tokio::task::JoinHandle<()>,
}

async fn start(refusals: Vec<Status>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[], "admin").unwrap();
    pki::issue(&pki_dir, Role::Agent, "worker-1", &[], false).unwrap();
    let files = |name: &str| TlsFiles {
        ca: pki_dir.join("ca.crt"),
        cert: pki_dir.join(format!("{name}.crt")),
        key: pki_dir.join(format!("{name}.key")),
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (events_tx, events) = mpsc::unbounded_channel();
    let fake = Fake {
        events: events_tx,
        refusals: Mutex::new(refusals.into()),
    };
    let server_tls = files("control-plane").load().unwrap().server_config();
    let server = tonic::transport::Server::builder()
        .tls_config(server_tls)
        .unwrap()
        .add_service(AgentServiceServer::new(fake))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);

    let outbox = Arc::new(Outbox::load(dir.path()));
    let (desired_tx, desired) = mpsc::channel(4);
    let tls = files("agent-worker-1");
    let (vm_tx, vm_sets) = watch::channel(None);
    let (vm_results, vm_results_rx) = mpsc::channel(4);
    // The first replica given is gone: the agent dials the next in turn.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_address = gone.local_addr().unwrap();
    drop(gone);
    let dialer = Dialer {
        control_planes: Arc::new(
            ControlPlanes::new([
                format!("https://{gone_address}"),
                format!("https://{address}"),
            ])
            .unwrap(),
        ),
        material: tls.load().unwrap(),
        tls,
        keepalive: Duration::from_secs(20),
        endpoints: Arc::default(),
        max_backoff: Duration::from_secs(1),
        outbox: outbox.clone(),
        desired: desired_tx,
        paths: SystemPaths {
            current_system: dir.path().into(),
            booted_system: dir.path().join("missing"),
            profile: dir.path().join("profile"),
        },
        nix: Nix::new(),
        vm_host: Some(host_capacity()),
        vm_assignments: Some(vm_tx),
        vm_results: Some(Arc::new(tokio::sync::Mutex::new(vm_results_rx))),
    };
    let cancel = CancellationToken::new();
    let dialer = tokio::spawn(dialer.run(cancel.clone()));
    Harness {
        dir,
        events,
        desired,
        outbox,
        vm_sets,
        vm_results,
        cancel,
        dialer,
    }
}

impl Harness {
    async fn event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("nothing from the agent in time")
            .expect("the fake control plane stopped")
    }

    async fn connected(&mut self) -> (Hello, mpsc::Sender<Result<ControlMessage, Status>>) {
        loop {
            if let Event::Connected { hello, control } = self.event().await {
                return (hello, control);
            }
        }
    }

    async fn message(&mut self) -> agent_message::Kind {
        loop {
            if let Event::Message(AgentMessage { kind: Some(kind) }) = self.event().await {
                return kind;
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.dialer)
            .await
            .unwrap()
            .unwrap();
    }
}

fn host_capacity() -> procurator_proto::v1::VmHostCapacity {
    procurator_proto::v1::VmHostCapacity {
        milli_cpus: 3500,
        memory_bytes: 8 << 30,
        labels: vec!["rack-1".into()],
        vmm: "qemu".into(),
    }
}

fn outcome(id: &str) -> Outcome {
    Outcome::succeeded(id, "/nix/store/x", MachineState::Succeeded, String::new())
}

#[tokio::test]
async fn hello_then_results_progress_and_desired_states_flow_and_a_dropped_stream_is_redialled() {
    let mut h = start(Vec::new()).await;
    // A result from before the agent (re)started waits for the connection.
    h.outbox.record(outcome("d-0"));

    let (hello, control) = h.connected().await;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    let current = std::fs::canonicalize(h.dir.path()).unwrap();
    assert_eq!(hello.current_system, current.to_string_lossy());
    assert_eq!(hello.booted_system, "");
    assert_eq!(hello.vm_host, Some(host_capacity()));
    assert!(
        hello.nix_version.starts_with("nix (Nix) "),
        "{}",
        hello.nix_version
    );
    match h.message().await {
        agent_message::Kind::Result(r) => assert_eq!(
            (r.deployment_id.as_str(), r.state()),
            ("d-0", MachineState::Succeeded)
        ),
        other => panic!("expected the stored result, got {other:?}"),
    }

    let state = DesiredState {
        deployment_id: "d-1".into(),
        ..DesiredState::default()
    };
    let desired = ControlMessage {
        kind: Some(control_message::Kind::DesiredState(state.clone())),
    };
    control.send(Ok(desired)).await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(10), h.desired.recv())
        .await
        .unwrap();
    assert_eq!(received, Some(Inbound::Desired(state)));

    h.outbox.progress(Progress {
        deployment_id: "d-1".into(),
        message: "copying".into(),
        ..Progress::default()
    });
    match h.message().await {
        agent_message::Kind::Progress(p) => assert_eq!(p.message, "copying"),
        other => panic!("expected progress, got {other:?}"),
    }

    // Replaced by a newer connection: the agent dials again, and does not
    // send the result that was already delivered.
    control
        .send(Err(Status::aborted("replaced by a newer connection")))
        .await
        .unwrap();
    let (_, _control) = h.connected().await;
    h.outbox.record(outcome("d-2"));
    match h.message().await {
        agent_message::Kind::Result(r) => assert_eq!(r.deployment_id, "d-2"),
        other => panic!("expected the new result, got {other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn a_refused_agent_keeps_dialling_at_the_longest_backoff() {
    let started = std::time::Instant::now();
    let mut h = start(vec![Status::permission_denied("role ci may not connect")]).await;
    let _ = h.connected().await;
    // Terminal errors wait in the upper half of --max-backoff (1 s here).
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_vm_hosts_assignments_go_to_its_runner_newest_first_and_its_results_come_back() {
    let mut h = start(Vec::new()).await;
    let (_hello, control) = h.connected().await;
    let set = |closure: &str| procurator_proto::v1::VmAssignments {
        vms: vec![procurator_proto::v1::VmAssignment {
            instance: "web-0".into(),
            machine: "web".into(),
            closure: closure.into(),
            ..Default::default()
        }],
    };
    for closure in ["/nix/store/old", "/nix/store/new"] {
        let message = ControlMessage {
            kind: Some(control_message::Kind::VmAssignments(set(closure))),
        };
        control.send(Ok(message)).await.unwrap();
    }
    // The runner's results go out on the stream, named by instance.
    h.vm_results
        .send(agent_message::Kind::Result(
            procurator_proto::v1::ActivationResult {
                instance: "web-0".into(),
                deployment_id: "d-7".into(),
                state: MachineState::Succeeded.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    loop {
        if let agent_message::Kind::Result(r) = h.message().await {
            assert_eq!(
                (r.instance.as_str(), r.deployment_id.as_str()),
                ("web-0", "d-7")
            );
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let newest = h.vm_sets.borrow_and_update().clone();
        if newest == Some(set("/nix/store/new")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the runner got {newest:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), h.vm_sets.changed()).await;
    }
    h.stop().await;
}
