//! `AgentService.Connect`: the one long-lived stream each agent dials in on;
//! `AgentService.Confirm`: the connectivity proof over a new connection.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::certificate::CertificateInfo;
use procurator_core::identity::Rpc;
use procurator_core::tls::require_role;
use procurator_core::{
    DeploymentId, MIN_PROTOCOL_VERSION, MachineName, PROTOCOL_VERSION, StorePath,
};
use procurator_proto::v1::agent_service_server::AgentService;
use procurator_proto::v1::{
    AgentMessage, ConfirmRequest, ConfirmResponse, ControlMessage, EnrollRequest, Hello,
    IssuedCertificate, MachineState, RenewRequest, Welcome, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::connections::{Conn, Connections, dispatch_to, dispatch_vms};
use crate::dispatcher::Dispatcher;
use crate::enrollment::Enrollment;
use crate::metrics::Metrics;
use crate::revocations::Revocations;
use crate::rollout;
use crate::store::{Confirmation, ResultOutcome, Store, StoreError};

/// Frames queued towards one agent before the sender waits.
const OUTBOUND_CAPACITY: usize = 16;
/// How long the closing status may wait for room on the agent's stream.
const FINAL_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no Hello within {0:?}; an agent must send Hello as its first frame")]
    HelloTimeout(Duration),
    #[error("the first frame must be Hello")]
    NotHello,
    #[error("the stream ended before Hello")]
    NoHello,
    #[error("a malformed Hello: {0}")]
    BadHello(String),
    #[error(
        "the agent speaks protocol version {got}; this control plane speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade the older side"
    )]
    Version { got: u32 },
    #[error(
        "{0} offers VM-host capacity, but its certificate does not allow it to host VMs; issue it with `procurator-ctl pki issue --role agent --name {0} --vm-host`, or start the agent without --vm-host"
    )]
    NotAVmHost(MachineName),
    #[error("replaced by a newer connection")]
    Replaced,
    #[error("{0}")]
    Revoked(String),
    #[error("the control plane is shutting down; reconnect")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ConnectError> for Status {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::HelloTimeout(_) => Status::deadline_exceeded(e.to_string()),
            ConnectError::NotHello | ConnectError::NoHello | ConnectError::BadHello(_) => {
                Status::invalid_argument(e.to_string())
            }
            ConnectError::Version { .. } => Status::failed_precondition(e.to_string()),
            ConnectError::NotAVmHost(_) => Status::permission_denied(e.to_string()),
            ConnectError::Replaced => Status::aborted(e.to_string()),
            ConnectError::Revoked(_) => Status::permission_denied(e.to_string()),
            ConnectError::ShuttingDown => Status::unavailable(e.to_string()),
            ConnectError::Store(e) => e.into(),
        }
    }
}

/// Why `Confirm` was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error("{0}")]
    InvalidId(#[from] procurator_core::names::NameError),
    #[error("{0}")]
    InvalidClosure(#[from] procurator_core::store_path::StorePathError),
    #[error("this machine has no deployment {0} with that closure")]
    NotFound(DeploymentId),
    #[error("this machine's row of deployment {0} is {1}, not sent: there is nothing to confirm")]
    NotSent(DeploymentId, MachineState),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ConfirmError> for Status {
    fn from(e: ConfirmError) -> Self {
        match e {
            ConfirmError::InvalidId(_) | ConfirmError::InvalidClosure(_) => {
                Status::invalid_argument(e.to_string())
            }
            ConfirmError::NotFound(_) => Status::not_found(e.to_string()),
            ConfirmError::NotSent(..) => Status::failed_precondition(e.to_string()),
            ConfirmError::Store(e) => e.into(),
        }
    }
}

pub struct AgentSvc {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    pub dispatcher: Dispatcher,
    pub hello_timeout: Duration,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub revocations: Arc<Revocations>,
    /// `None`: enrollment and renewal are off.
    pub enrollment: Option<Arc<Enrollment>>,
}

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ConnectStream = ReceiverStream<Result<ControlMessage, Status>>;

    /// Status codes: see `agent.proto`.
    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = require_role(&request, Rpc::Connect)?;
        let certificate = peer_certificate(&request);
        let machine = identity.name;
        let mut inbound = request.into_inner();
        let hello = self.await_hello(&mut inbound).await?;
        if hello.vm_host.is_some() && !identity.vm_host {
            tracing::warn!(machine = %machine, "refused: a Hello with VM-host capacity from a certificate without the VM-host mark");
            return Err(ConnectError::NotAVmHost(machine).into());
        }

        // Committed before the agent hears Welcome.
        let generation = self
            .store
            .agent_connected(machine.clone(), hello.clone(), certificate.clone())
            .await
            .map_err(ConnectError::from)?;
        self.metrics.agent_connected();
        if let Some(certificate) = &certificate {
            self.metrics
                .agent_certificate(machine.as_str(), certificate.not_after);
        }
        tracing::info!(
            machine = %machine,
            generation,
            agent_version = %hello.agent_version,
            current_system = %hello.current_system,
            "agent connected"
        );

        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            machine: machine.to_string(),
            control_plane_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        // Queued before the stream is registered, so Welcome is always first.
        let welcome = ControlMessage {
            kind: Some(control_message::Kind::Welcome(welcome)),
        };
        if tx.try_send(Ok(welcome)).is_err() {
            return Err(Status::internal(
                "could not queue Welcome on a fresh stream",
            ));
        }
        let conn = Conn::new(generation, tx, hello.vm_host.is_some(), &self.shutdown);
        self.connections.register(machine.clone(), conn.clone());
        self.metrics.set_agent_streams(self.connections.len());

        let stream = AgentStream {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            connections: self.connections.clone(),
            dispatcher: self.dispatcher.clone(),
            shutdown: self.shutdown.clone(),
            machine: machine.clone(),
            conn,
            vm_host: hello.vm_host.is_some(),
            certificate,
            revocations: self.revocations.clone(),
        };
        let span = tracing::info_span!("agent", machine = %machine, generation);
        self.tasks.spawn(stream.run(inbound).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// Status codes: see `agent.proto`.
    async fn confirm(
        &self,
        request: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmResponse>, Status> {
        let machine = require_role(&request, Rpc::Confirm)?.name;
        let ConfirmRequest {
            deployment_id,
            closure,
        } = request.into_inner();
        let id = DeploymentId::parse(&deployment_id).map_err(ConfirmError::from)?;
        let closure = StorePath::parse(&closure).map_err(ConfirmError::from)?;
        let answer = self
            .store
            .confirm(machine.clone(), id.clone(), closure.to_string())
            .await
            .map_err(ConfirmError::from)?;
        let response = match answer {
            Confirmation::NotFound => return Err(ConfirmError::NotFound(id).into()),
            Confirmation::NotSent(state) => return Err(ConfirmError::NotSent(id, state).into()),
            Confirmation::Refused(reason) => {
                tracing::info!(machine = %machine, deployment = %id, %reason, "confirmation refused");
                ConfirmResponse {
                    confirmed: false,
                    reason,
                }
            }
            Confirmation::Confirmed => {
                tracing::info!(machine = %machine, deployment = %id, "confirmed");
                ConfirmResponse {
                    confirmed: true,
                    reason: String::new(),
                }
            }
        };
        Ok(Response::new(response))
    }

    /// Status codes: see `agent.proto`.
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let Some(enrollment) = &self.enrollment else {
            return Err(crate::trust_service::enrollment_off());
        };
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let issued = enrollment
            .enroll(&self.store, &self.revocations, request.into_inner(), peer)
            .await?;
        Ok(Response::new(issued))
    }

    /// Status codes: see `agent.proto`.
    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let identity = require_role(&request, Rpc::Renew)?;
        let Some(enrollment) = &self.enrollment else {
            return Err(crate::trust_service::enrollment_off());
        };
        let issued = enrollment
            .renew(
                &self.store,
                &self.revocations,
                &identity,
                request.into_inner(),
            )
            .await?;
        Ok(Response::new(issued))
    }
}

/// The peer's leaf certificate, read (its identity was checked already).
fn peer_certificate<T>(request: &Request<T>) -> Option<CertificateInfo> {
    let certs = request.peer_certs()?;
    CertificateInfo::from_der(certs.first()?.as_ref()).ok()
}

impl AgentSvc {
    async fn await_hello(&self, inbound: &mut Streaming<AgentMessage>) -> Result<Hello, Status> {
        let first = tokio::select! {
            () = self.shutdown.cancelled() => return Err(ConnectError::ShuttingDown.into()),
            first = tokio::time::timeout(self.hello_timeout, inbound.message()) => first,
        };
        let mut hello = match first {
            Err(_) => return Err(ConnectError::HelloTimeout(self.hello_timeout).into()),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(ConnectError::NoHello.into()),
            Ok(Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => return Err(ConnectError::NotHello.into()),
        };
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.protocol_version) {
            return Err(ConnectError::Version {
                got: hello.protocol_version,
            }
            .into());
        }
        crate::received::hello(&mut hello).map_err(ConnectError::BadHello)?;
        Ok(hello)
    }
}

/// The inbound side of one agent's stream, after the handshake.
struct AgentStream {
    store: Store,
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    machine: MachineName,
    conn: Conn,
    /// Its Hello offered capacity for VMs.
    vm_host: bool,
    /// The certificate the stream was opened with: its revocation ends it.
    certificate: Option<CertificateInfo>,
    revocations: Arc<Revocations>,
}

impl AgentStream {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let ended = self.serve(&mut inbound).await;
        // Whatever waits to send on this stream gives up now.
        self.conn.closing.cancel();
        if let Err(e) = ended {
            tracing::info!(reason = %e, "closing agent stream");
            // Best effort, bounded: an agent that stopped reading never gets it.
            let status = Err(Status::from(e));
            let _ = tokio::time::timeout(FINAL_STATUS_TIMEOUT, self.conn.tx.send(status)).await;
        }
        if self
            .connections
            .remove_if_current(&self.machine, self.conn.generation)
        {
            self.metrics.agent_certificate_gone(self.machine.as_str());
        }
        self.metrics.set_agent_streams(self.connections.len());
        match self
            .store
            .agent_disconnected(self.machine.clone(), self.conn.generation)
            .await
        {
            Ok(true) => {
                self.metrics.agent_disconnected();
                tracing::info!("agent disconnected");
            }
            Ok(false) => tracing::debug!("stream ended after a newer one took over"),
            Err(e) => tracing::warn!(error = %e, "could not record the disconnect"),
        }
    }

    /// Read frames until the agent hangs up (`Ok`) or the stream must end
    /// with a status.
    async fn serve(&self, inbound: &mut Streaming<AgentMessage>) -> Result<(), ConnectError> {
        // A machine given up as unreachable converges after all.
        if self.store.reopen_unreachable(self.machine.clone()).await? {
            tracing::info!("re-opened the machine's unreachable row");
        }
        // A machine that reconnects gets its desired state again.
        dispatch_to(&self.store, &self.conn, &self.machine).await?;
        // A VM host learns which VMs to run; one that has come (back) may
        // change where the newest deployment's VMs go, and then every host
        // learns its new set.
        if self.vm_host {
            if self.store.replace_vms().await? {
                tracing::info!("VM placement changed with this host");
                self.dispatcher.send_vm_assignments().await?;
            } else {
                dispatch_vms(&self.store, &self.conn, &self.machine).await?;
            }
        }
        // Its pending rows may be sendable now that it is connected.
        self.dispatcher.kick().await?;
        let revoked = async {
            match &self.certificate {
                Some(certificate) => self.revocations.until_revoked(certificate).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(revoked);
        loop {
            let frame = tokio::select! {
                refusal = &mut revoked => {
                    tracing::warn!(%refusal, "closing the stream of a revoked certificate");
                    return Err(ConnectError::Revoked(refusal));
                }
                () = self.conn.closing.cancelled() => {
                    return Err(if self.shutdown.is_cancelled() {
                        ConnectError::ShuttingDown
                    } else {
                        ConnectError::Replaced
                    });
                }
                frame = inbound.message() => frame,
            };
            match frame {
                Ok(Some(message)) => self.handle(message).await?,
                Ok(None) => return Ok(()),
                Err(status) => {
                    tracing::debug!(%status, "agent stream broke");
                    return Ok(());
                }
            }
        }
    }

    async fn handle(&self, message: AgentMessage) -> Result<(), ConnectError> {
        let machine = self.machine.clone();
        match message.kind {
            Some(agent_message::Kind::Progress(mut progress)) => {
                crate::received::progress(&mut progress);
                let state = MachineState::try_from(progress.state).unwrap_or_default();
                let Some(id) = self.deployment_id(&progress.deployment_id) else {
                    return Ok(());
                };
                if !rollout::is_progress_state(state) {
                    tracing::debug!(%state, "progress with a state progress cannot set; ignored");
                    return Ok(());
                }
                if !self
                    .store
                    .record_progress(machine, id.clone(), state, progress)
                    .await?
                {
                    tracing::debug!(deployment = %id, "progress for a finished or unknown row; ignored");
                }
            }
            Some(agent_message::Kind::Result(mut result)) => {
                crate::received::result(&mut result);
                let state = MachineState::try_from(result.state).unwrap_or_default();
                let Some(id) = self.deployment_id(&result.deployment_id) else {
                    return Ok(());
                };
                if !rollout::is_result_state(state) {
                    tracing::warn!(deployment = %id, %state, "result with a state that is not a result; ignored");
                    return Ok(());
                }
                // A VM host reports for the instances placed on it, and
                // only for those.
                let row = if result.instance.is_empty() {
                    machine
                } else if !self.vm_host {
                    tracing::warn!("a VM result from an agent that is not a VM host; ignored");
                    return Ok(());
                } else {
                    let Ok(instance) = MachineName::parse(&result.instance) else {
                        tracing::warn!(instance = %result.instance, "a result for a malformed instance name; ignored");
                        return Ok(());
                    };
                    let hosts = self.store.hosts_of(vec![instance.clone()]).await?;
                    if !hosts.contains(&machine) {
                        tracing::warn!(%instance, "a result for a VM instance not placed on this host; ignored");
                        return Ok(());
                    }
                    instance
                };
                let reason = result.reason.clone();
                match self
                    .store
                    .record_result(row.clone(), id.clone(), state, result)
                    .await?
                {
                    ResultOutcome::Recorded { finished } => {
                        tracing::info!(deployment = %id, machine = %row, %state, %reason, "machine finished");
                        if let Some(outcome) = finished {
                            tracing::info!(deployment = %id, state = %outcome, "deployment finished");
                        }
                    }
                    ResultOutcome::Stale => {
                        tracing::debug!(deployment = %id, %state, "result for a row that is already final");
                    }
                }
                // A newer deployment may be waiting for this machine, the
                // next wave may start or the rollout may halt.
                dispatch_to(&self.store, &self.conn, &self.machine).await?;
                self.dispatcher.kick().await?;
            }
            Some(agent_message::Kind::VmInPlace(_)) if !self.vm_host => {
                tracing::warn!("an in-place answer from an agent that is not a VM host; ignored");
            }
            Some(agent_message::Kind::VmInPlace(in_place)) => {
                let Some(id) = self.deployment_id(&in_place.deployment_id) else {
                    return Ok(());
                };
                let Ok(instance) = MachineName::parse(&in_place.instance) else {
                    tracing::warn!(instance = %in_place.instance, "an in-place answer for a malformed instance name; ignored");
                    return Ok(());
                };
                if !self
                    .store
                    .hosts_of(vec![instance.clone()])
                    .await?
                    .contains(&machine)
                {
                    tracing::warn!(%instance, "an in-place answer for a VM instance not placed on this host; ignored");
                    return Ok(());
                }
                if self
                    .store
                    .note_in_place(instance.clone(), id.clone(), machine)
                    .await?
                    && let Some(conn) = self.connections.get(&instance)
                {
                    tracing::info!(deployment = %id, %instance, "in place: sending the guest's agent its desired state");
                    dispatch_to(&self.store, &conn, &instance).await?;
                }
            }
            Some(agent_message::Kind::Heartbeat(beat)) => {
                let current_system = crate::received::heartbeat_system(beat.current_system);
                self.store.agent_heartbeat(&machine, current_system);
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::warn!("a second Hello on the same stream; ignored");
            }
            None => tracing::debug!("an empty frame; ignored"),
        }
        Ok(())
    }

    fn deployment_id(&self, raw: &str) -> Option<DeploymentId> {
        match DeploymentId::parse(raw) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!(error = %e, "report for a malformed deployment id; ignored");
                None
            }
        }
    }
}
