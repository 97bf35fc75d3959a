//! Wiring: open the store, bind, serve every service over mutual TLS on one
//! port, and shut down in order when told to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use procurator_core::artifact::MAX_ARTIFACT_BYTES;
use procurator_core::tls::{ClientPolicy, TlsError, TlsFiles};

use crate::server_tls::ServerTls;
use procurator_proto::v1::agent_service_server::AgentServiceServer;
use procurator_proto::v1::deployment_service_server::DeploymentServiceServer;
use procurator_proto::v1::trust_service_server::TrustServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::agent_service::AgentSvc;
use crate::connections::Connections;
use crate::deployment_service::DeploymentSvc;
use crate::dispatcher::Dispatcher;
use crate::enrollment::Enrollment;
use crate::metrics::Metrics;
use crate::metrics::layer::RpcMetricsLayer;
use crate::require_certificate::RequireCertificateLayer;
use crate::revocations::{RevocationCheck, Revocations};
use crate::store::{Database, Retention, Store, StoreError};
use crate::trust_service::TrustSvc;

/// How long in-flight RPCs may take to finish after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Room for a maximal artifact plus the request's framing.
const MAX_SUBMIT_BYTES: usize = MAX_ARTIFACT_BYTES + 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    /// Where the state store lives.
    pub database: Database,
    pub tls: TlsFiles,
    pub ready_file: Option<PathBuf>,
    pub hello_timeout: Duration,
    pub keepalive: Duration,
    /// Where to serve `GET /metrics` over plain HTTP; `None` turns it off.
    pub metrics_listen: Option<String>,
    /// Once the metrics listener is bound, write its `HOST:PORT` here.
    pub metrics_ready_file: Option<PathBuf>,
    /// What the store keeps of its history.
    pub retention: Retention,
    /// The CA that signs agents' certificates; `None`: no enrollment.
    pub issuing_ca: Option<IssuingCaFiles>,
}

/// `--issuing-ca-cert`, `--issuing-ca-key`, `--agent-cert-validity`.
#[derive(Debug, Clone)]
pub struct IssuingCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub agent_cert_validity: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot load the TLS material: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enrollment(#[from] crate::enrollment::EnrollmentError),
    #[error("cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the gRPC server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

type AgentServer = AgentServiceServer<AgentSvc>;
type DeploymentServer = DeploymentServiceServer<DeploymentSvc>;
type TrustServer = TrustServiceServer<TrustSvc>;

/// Every name health answers for: the server, then each service.
const SERVICES: [&str; 4] = [
    "",
    AgentServer::NAME,
    DeploymentServer::NAME,
    TrustServer::NAME,
];

/// Health follows the store: NOT_SERVING while it cannot be written, so a
/// load balancer or supervisor sees a control plane with a full disk as the
/// broken one it is, SERVING again once a write succeeds.
async fn report_writable(
    mut writable: tokio::sync::watch::Receiver<Option<String>>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = writable.changed() => if changed.is_err() { return },
        }
        let status = if writable.borrow_and_update().is_some() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        if stop.is_cancelled() {
            return;
        }
        for name in SERVICES {
            health.set_service_status(name, status).await;
        }
    }
}

/// Serve until `signal` fires, then: health NOT_SERVING, agent and watch
/// streams end with UNAVAILABLE, in-flight RPCs drain for at most
/// [`DRAIN_DEADLINE`].
pub async fn run(config: Config, signal: CancellationToken) -> Result<(), ServerError> {
    // Filled from the store before anything is served.
    let revocations = Arc::new(Revocations::default());
    let clients = ClientPolicy {
        anonymous: config.issuing_ca.is_some(),
        check: Some(Arc::new(RevocationCheck(revocations.clone()))),
    };
    let tls = Arc::new(ServerTls::load(config.tls.clone(), clients)?);
    let enrollment = match &config.issuing_ca {
        Some(files) => {
            let enrollment = Enrollment::load(
                &files.cert,
                &files.key,
                files.agent_cert_validity,
                &tls.material()?,
            )?;
            tracing::info!(
                issuing_ca = %files.cert.display(),
                agent_cert_validity_secs = files.agent_cert_validity.as_secs(),
                "enrollment on: machines may join with a token"
            );
            Some(Arc::new(enrollment))
        }
        None => None,
    };
    let database = config.database.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_database(&database))
        .await
        .map_err(StoreError::from)??;
    tracing::info!(database = %config.database, "state store open");
    revocations.replace(store.list_revocations().await?);

    // Only now, with the store open, does anything report SERVING.
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }

    let (listener, addr) = bind(&config.listen).await?;
    tracing::info!(address = %addr, "listening");
    let metrics_listener = match &config.metrics_listen {
        Some(listen) => Some(bind(listen).await?),
        None => None,
    };

    // Streams end on `stop`, which fires only after health went NOT_SERVING.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let connections = Arc::new(Connections::default());
    let dispatcher = Dispatcher::new(store.clone(), connections.clone(), tasks.clone());
    // Offline machines become unreachable on time, and a restarted control
    // plane carries on with the rollouts its store holds.
    tasks.spawn(dispatcher.clone().tick(stop.clone()));
    if store.is_shared() {
        tracing::info!(
            replica = store.replica(),
            "one replica of several on a shared store"
        );
        tasks.spawn(crate::fanout::run(dispatcher.clone(), stop.clone()));
        tasks.spawn(crate::liveness::run(dispatcher.clone(), stop.clone()));
    }
    tasks.spawn(store.clone().keep_pruned(config.retention, stop.clone()));
    tasks.spawn(store.clone().keep_heartbeats_flushed(stop.clone()));
    tasks.spawn(tls.clone().keep_current(stop.clone()));
    tasks.spawn(
        revocations
            .clone()
            .keep_current(store.clone(), stop.clone()),
    );
    tasks.spawn(report_writable(
        store.writable(),
        health.clone(),
        stop.clone(),
    ));
    let metrics = Arc::new(Metrics::new().serving_with(tls.clone()));
    tasks.spawn(metrics.clone().watch_events(store.clone(), stop.clone()));
    if let Some((listener, metrics_addr)) = metrics_listener {
        tracing::info!(address = %metrics_addr, "metrics listening");
        tasks.spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            store.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        if let Some(path) = &config.metrics_ready_file
            && let Err(source) = write_ready_file(path, metrics_addr)
        {
            // Nothing else has started serving yet; stop what has.
            stop.cancel();
            return Err(ServerError::ReadyFile {
                path: path.clone(),
                source,
            });
        }
    }
    let agents = AgentSvc {
        store: store.clone(),
        metrics: metrics.clone(),
        connections,
        dispatcher: dispatcher.clone(),
        hello_timeout: config.hello_timeout,
        shutdown: stop.clone(),
        tasks: tasks.clone(),
        revocations: revocations.clone(),
        enrollment: enrollment.clone(),
    };
    let trust = TrustSvc {
        store: store.clone(),
        revocations: revocations.clone(),
        enrollment,
    };
    let deployments = DeploymentSvc {
        revocations: revocations.clone(),
        store,
        dispatcher,
        shutdown: stop.clone(),
        tasks: tasks.clone(),
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(procurator_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };

    let router = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .layer(RpcMetricsLayer {
            metrics: metrics.clone(),
        })
        .layer(RequireCertificateLayer {
            revocations: revocations.clone(),
        })
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(AgentServer::new(agents))
        .add_service(TrustServer::new(trust))
        .add_service(
            DeploymentServer::new(deployments).max_decoding_message_size(MAX_SUBMIT_BYTES),
        );
    let server_stop = stop.clone();
    let mut serving = tokio::spawn(router.serve_with_incoming_shutdown(
        crate::acceptor::incoming(listener, tls, metrics, stop.clone()),
        async move { server_stop.cancelled().await },
    ));

    if let Some(path) = &config.ready_file {
        write_ready_file(path, addr).map_err(|source| ServerError::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
    tell_systemd(&format!("READY=1\nSTATUS=serving on {addr}"));

    tokio::select! {
        () = signal.cancelled() => {}
        ended = &mut serving => {
            // The server stopped without being asked: report why.
            stop.cancel();
            ended??;
            return Ok(());
        }
    }

    tracing::info!("shutting down");
    tell_systemd("STOPPING=1\nSTATUS=draining in-flight RPCs");
    for name in SERVICES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    stop.cancel();
    tasks.close();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        let served = serving.await;
        tasks.wait().await;
        served
    })
    .await;
    match drained {
        Ok(served) => served??,
        Err(_) => tracing::warn!(
            deadline_secs = DRAIN_DEADLINE.as_secs(),
            "in-flight RPCs did not finish in time; exiting anyway"
        ),
    }
    tracing::info!("stopped");
    Ok(())
}

/// A `Type=notify` unit's state; nothing outside systemd. A failure is only
/// logged: serving matters more than telling.
fn tell_systemd(state: &str) {
    if let Err(e) = procurator_core::sd_notify::notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

async fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_error = |source| ServerError::Bind {
        addr: listen.to_owned(),
        source,
    };
    let mut last_error = None;
    for candidate in tokio::net::lookup_host(listen).await.map_err(bind_error)? {
        match listen_on(candidate) {
            Ok(listener) => {
                let addr = listener.local_addr().map_err(bind_error)?;
                return Ok((listener, addr));
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(bind_error(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    })))
}

/// Pending connections the kernel queues before accepting (it caps this at
/// net.core.somaxconn). tokio's default of 1,024 drops the SYNs of a fleet
/// reconnecting at once, and each dropped SYN costs its agent a 1 s, then
/// 3 s, … retransmission.
const LISTEN_BACKLOG: u32 = 16_384;

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's bind does on Unix: a restarted control plane can bind the
    // port while the old connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Write `HOST:PORT\n` so that a reader never sees a partial file.
fn write_ready_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    use procurator_core::atomic_file;
    atomic_file::write_atomically(path, format!("{addr}\n").as_bytes(), atomic_file::PUBLIC)
}
