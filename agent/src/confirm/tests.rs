//! The confirmation against a real mTLS control plane stand-in, and against
//! a port nobody listens on.

use procurator_core::Role;
use procurator_core::pki;
use procurator_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use procurator_proto::v1::{AgentMessage, ConfirmResponse, ControlMessage};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::*;
use procurator_core::control_planes::ControlPlanes;

/// Confirms `d-yes`, refuses `d-no`, knows nothing else.
struct Fake;

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
        _request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn confirm(
        &self,
        request: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmResponse>, Status> {
        let request = request.into_inner();
        assert!(request.closure.starts_with("/nix/store/"));
        match request.deployment_id.as_str() {
            "d-yes" => Ok(Response::new(ConfirmResponse {
                confirmed: true,
                reason: String::new(),
            })),
            "d-no" => Ok(Response::new(ConfirmResponse {
                confirmed: false,
                reason: "deployment d-no was cancelled".into(),
            })),
            _ => Err(Status::not_found("no such deployment")),
        }
    }
}

fn files(pki_dir: &std::path::Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: pki_dir.join("ca.crt"),
        cert: pki_dir.join(format!("{name}.crt")),
        key: pki_dir.join(format!("{name}.key")),
    }
}

fn pki_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[], "admin").unwrap();
    pki::issue(&pki_dir, Role::Agent, "worker-1", &[], false).unwrap();
    pki_dir
}

const CLOSURE: &str = "/nix/store/00000000000000000000000000000000-new";

#[tokio::test]
async fn the_control_plane_confirms_refuses_or_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = pki_dir(&dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server_tls = files(&pki_dir, "control-plane")
        .load()
        .unwrap()
        .server_config();
    let server = tonic::transport::Server::builder()
        .tls_config(server_tls)
        .unwrap()
        .add_service(AgentServiceServer::new(Fake))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    // The first replica given is gone: the confirmation goes to the next.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_address = gone.local_addr().unwrap();
    drop(gone);
    let confirmer = GrpcConfirmer {
        control_planes: Arc::new(
            ControlPlanes::new([
                format!("https://{gone_address}"),
                format!("https://{address}"),
            ])
            .unwrap(),
        ),
        tls: files(&pki_dir, "agent-worker-1"),
        keepalive: Duration::from_secs(20),
        endpoints: Arc::default(),
    };
    let timeout = Duration::from_secs(20);
    assert_eq!(
        confirmer.confirm("d-yes", CLOSURE, timeout).await,
        Verdict::Confirmed
    );
    assert_eq!(
        confirmer.confirm("d-no", CLOSURE, timeout).await,
        Verdict::Refused("deployment d-no was cancelled".into())
    );
    match confirmer.confirm("d-other", CLOSURE, timeout).await {
        Verdict::Refused(reason) => assert!(reason.contains("no such deployment"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_control_plane_out_of_reach_is_no_answer_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = pki_dir(&dir);
    // A port that was free a moment ago: every dial is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let confirmer = GrpcConfirmer {
        control_planes: Arc::new(ControlPlanes::new([format!("https://{address}")]).unwrap()),
        tls: files(&pki_dir, "agent-worker-1"),
        keepalive: Duration::from_secs(20),
        endpoints: Arc::default(),
    };
    let started = Instant::now();
    let verdict = confirmer
        .confirm("d-yes", CLOSURE, Duration::from_millis(2500))
        .await;
    let took = started.elapsed();
    match verdict {
        Verdict::NoAnswer(last) => assert!(last.contains("cannot connect"), "{last}"),
        other => panic!("expected no answer, got {other:?}"),
    }
    // It retried until the deadline, and not much longer.
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn answers_and_transient_errors_are_told_apart() {
    let refused = decide(Ok(ConfirmResponse {
        confirmed: false,
        reason: String::new(),
    }));
    assert!(
        matches!(refused, Attempt::Answer(Verdict::Refused(ref r)) if r.contains("refused")),
        "{refused:?}"
    );
    assert!(matches!(
        decide(Err(Status::unavailable("shutting down"))),
        Attempt::Retry(_)
    ));
    assert!(matches!(
        decide(Err(Status::not_found("gone"))),
        Attempt::Answer(Verdict::Refused(_))
    ));
}
