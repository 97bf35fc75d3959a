//! A compromised control plane: it holds the fleet's real control-plane
//! certificate and key, so agents connect to it as to their own, and it
//! sends each agent whatever desired state the test scripts (another
//! machine's statement, an old one, none, a root "health check"), confirms
//! anything, and records what the agents answer. Only the agents' own
//! checks stand between it and the machines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use procurator_core::tls::{TlsFiles, peer_identity};
use procurator_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use procurator_proto::v1::{
    ActivationResult, AgentMessage, ConfirmRequest, ConfirmResponse, ControlMessage, DesiredState,
    Welcome, agent_message, control_message,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pki::Pki;

/// What each machine's agent answered: its results, in order.
pub type Answers = Arc<Mutex<BTreeMap<String, Vec<ActivationResult>>>>;

pub struct RogueControlPlane {
    answers: Answers,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Service {
    script: BTreeMap<String, DesiredState>,
    answers: Answers,
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let machine = peer_identity(&request)?.name.to_string();
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let welcome = control_message::Kind::Welcome(Welcome {
            protocol_version: procurator_core::PROTOCOL_VERSION,
            machine: machine.clone(),
            control_plane_version: "rogue".into(),
        });
        let mut queued = vec![welcome];
        if let Some(desired) = self.script.get(&machine) {
            queued.push(control_message::Kind::DesiredState(desired.clone()));
        }
        for kind in queued {
            let _ = tx.send(Ok(ControlMessage { kind: Some(kind) })).await;
        }
        let answers = self.answers.clone();
        tokio::spawn(async move {
            // Keeps `tx` (and so the stream) open while the agent talks.
            let _open = tx;
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(agent_message::Kind::Result(result)) = message.kind {
                    let mut answers = answers.lock().unwrap_or_else(|p| p.into_inner());
                    answers.entry(machine.clone()).or_default().push(result);
                }
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

    async fn enroll(
        &self,
        _request: Request<procurator_proto::v1::EnrollRequest>,
    ) -> Result<Response<procurator_proto::v1::IssuedCertificate>, Status> {
        Err(Status::unimplemented("a rogue control plane signs nothing"))
    }

    async fn renew(
        &self,
        _request: Request<procurator_proto::v1::RenewRequest>,
    ) -> Result<Response<procurator_proto::v1::IssuedCertificate>, Status> {
        Err(Status::unimplemented("a rogue control plane signs nothing"))
    }
}

impl RogueControlPlane {
    /// Serves on `listen` (the real control plane's address, once it is
    /// stopped) with the control plane's own certificate from `pki`.
    pub fn start(listen: &str, pki: &Pki, script: BTreeMap<String, DesiredState>) -> Result<Self> {
        let id = pki.control_plane();
        let tls = TlsFiles {
            ca: pki.ca(),
            cert: id.cert.clone(),
            key: id.key.clone(),
        }
        .load()
        .context("loading the control plane's TLS files")?;
        let addr: std::net::SocketAddr = listen.parse().context("the address to serve on")?;
        let answers = Answers::default();
        let service = Service {
            script,
            answers: answers.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = bound_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = bound_tx.send(Err(anyhow::anyhow!("binding {addr}: {e}")));
                        return;
                    }
                };
                let router =
                    match tonic::transport::Server::builder().tls_config(tls.server_config()) {
                        Ok(mut builder) => builder.add_service(AgentServiceServer::new(service)),
                        Err(e) => {
                            let _ = bound_tx.send(Err(e.into()));
                            return;
                        }
                    };
                let _ = bound_tx.send(Ok(()));
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                // Not a graceful shutdown: the agents' streams never end by
                // themselves. Dropping the server and the runtime cuts them.
                tokio::select! {
                    _ = router.serve_with_incoming(incoming) => {}
                    _ = stopped => {}
                }
            });
        });
        bound_rx
            .recv()
            .context("the rogue control plane's thread ended before serving")??;
        Ok(Self {
            answers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The results each agent sent so far.
    pub fn answers(&self) -> BTreeMap<String, Vec<ActivationResult>> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for RogueControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
