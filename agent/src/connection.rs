//! The agent's one connection: dial out, say `Hello`, wait for `Welcome`,
//! then pass desired states in and progress, results and heartbeats out.
//! On any failure: back off (exponential, full jitter) and dial again.

use std::sync::Arc;
use std::time::Duration;

use procurator_core::PROTOCOL_VERSION;
use procurator_core::control_planes::ControlPlanes;
use procurator_core::nix::Nix;
use procurator_core::tls::{EndpointCache, TlsError, TlsFiles, TlsMaterial};
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use procurator_proto::v1::{
    AgentMessage, ControlMessage, Heartbeat, Hello, VmAssignments, VmHostCapacity, Welcome,
    agent_message, control_message,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::desired::Inbound;
use crate::outbox::{Outbox, Outgoing};
use crate::system::SystemPaths;
use procurator_core::backoff::{
    BASE, Backoff, HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL, STABLE_AFTER, refusal_is_terminal,
};

const OUTBOUND_CAPACITY: usize = 64;
const NIX_VERSION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot connect: {}", procurator_core::error_chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the control plane answered {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("no Welcome within {}s", HANDSHAKE_TIMEOUT.as_secs())]
    NoWelcome,
    #[error("the control plane sent a desired state or a cancellation before Welcome")]
    DesiredBeforeWelcome,
    #[error("the control plane closed the stream")]
    Closed,
}

impl SessionError {
    /// The control plane said this agent's certificate is revoked (at
    /// the RPC; a refused handshake says nothing the client can read).
    pub fn is_revocation(&self) -> bool {
        matches!(self, SessionError::Status(s)
            if s.code() == tonic::Code::PermissionDenied && s.message().contains(" was revoked on "))
    }

    /// Errors that dialling again will not fix: only an operator can (a new
    /// certificate, an upgraded agent).
    pub fn is_terminal(&self) -> bool {
        match self {
            SessionError::Status(s) => refusal_is_terminal(s.code()),
            SessionError::Tls(_) => true,
            SessionError::Connect(_)
            | SessionError::NoWelcome
            | SessionError::DesiredBeforeWelcome
            | SessionError::Closed => false,
        }
    }
}

pub struct Dialer {
    /// Tried in turn; the one that answered last first.
    pub control_planes: Arc<ControlPlanes>,
    pub tls: TlsFiles,
    /// The TLS material that loaded last; kept if a reload fails.
    pub material: TlsMaterial,
    pub keepalive: Duration,
    /// Shared with the confirmer (see [`EndpointCache`]).
    pub endpoints: Arc<EndpointCache>,
    pub max_backoff: Duration,
    pub outbox: Arc<Outbox>,
    /// Desired states and cancellations, for the deployer.
    pub desired: mpsc::Sender<Inbound>,
    pub paths: SystemPaths,
    pub nix: Nix,
    /// What this machine offers VMs, sent in every Hello; `None` on a plain machine.
    pub vm_host: Option<VmHostCapacity>,
    /// Where a VM host's assignments go (the VM runner); `None` on a plain machine.
    pub vm_assignments: Option<watch::Sender<Option<VmAssignments>>>,
    /// The VM runner's reports, sent on whichever stream is up.
    pub vm_results: Option<Arc<tokio::sync::Mutex<mpsc::Receiver<agent_message::Kind>>>>,
}

impl Dialer {
    /// Dials until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(BASE, self.max_backoff);
        loop {
            self.reload_tls();
            let mut welcomed_at = None;
            let ended = tokio::select! {
                ended = self.session(&mut welcomed_at) => ended,
                _ = cancel.cancelled() => return,
            };
            if welcomed_at.is_some_and(|at: Instant| at.elapsed() >= STABLE_AFTER) {
                backoff.reset();
            }
            let expired = self
                .material
                .certificate_info()
                .filter(|info| info.expired_at(procurator_core::now_ms().div_euclid(1000)));
            let delay = if let Some(info) = expired {
                // The control plane refuses it at the handshake, which the
                // client sees only as a broken connection: say why here.
                let delay = backoff.terminal_delay(&mut rand::rng());
                tracing::error!(
                    error = %ended,
                    retry_in = ?delay,
                    "{}",
                    crate::credentials::expired_advice(&info, &self.tls.cert)
                );
                delay
            } else if ended.is_revocation() {
                let delay = backoff.terminal_delay(&mut rand::rng());
                tracing::error!(
                    error = %ended,
                    retry_in = ?delay,
                    "this agent's certificate is revoked; it comes back only by enrolling again: `procurator-ctl enroll-token --name {}`, the token in --join-token FILE, {} removed, and the agent restarted",
                    self.material.identity.name,
                    self.tls.cert.display()
                );
                delay
            } else if ended.is_terminal() {
                let delay = backoff.terminal_delay(&mut rand::rng());
                tracing::error!(
                    error = %ended,
                    retry_in = ?delay,
                    "the control plane refuses this agent; check its certificate (role agent, signed by the fleet CA) and version"
                );
                delay
            } else {
                let delay = backoff.next_delay(&mut rand::rng());
                tracing::warn!(error = %ended, retry_in = ?delay, "disconnected from the control plane");
                delay
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Picks up a replaced certificate: an operator may have fixed it.
    fn reload_tls(&mut self) {
        match self.tls.load() {
            Ok(material) => self.material = material,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the TLS files; using the ones loaded before")
            }
        }
    }

    /// One connection, from dialling to its end (always an error: the agent
    /// never hangs up by itself except on shutdown, which cancels this).
    async fn session(&self, welcomed_at: &mut Option<Instant>) -> SessionError {
        let url = self.control_planes.current().to_owned();
        let (tx, inbound, welcome) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&url)).await {
                Ok(Ok(connected)) => connected,
                Ok(Err(e)) => {
                    // The next attempt goes to the next replica.
                    self.control_planes.failed(&url);
                    return e;
                }
                Err(_) => {
                    self.control_planes.failed(&url);
                    return SessionError::NoWelcome;
                }
            };
        self.control_planes.answered(&url);
        *welcomed_at = Some(Instant::now());
        tracing::info!(
            url = %url,
            machine = %welcome.machine,
            control_plane_version = %welcome.control_plane_version,
            protocol_version = welcome.protocol_version,
            "connected"
        );
        self.serve(tx, inbound).await
    }

    async fn handshake(
        &self,
        url: &str,
    ) -> Result<
        (
            mpsc::Sender<AgentMessage>,
            tonic::Streaming<ControlMessage>,
            Welcome,
        ),
        SessionError,
    > {
        let channel = self
            .endpoints
            .endpoint(&self.material, url, self.keepalive)?
            .connect()
            .await?;
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let hello = self.hello().await;
        // The receiver is alive right here: this cannot fail.
        let _ = tx.send(message(agent_message::Kind::Hello(hello))).await;
        let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        loop {
            match inbound.message().await? {
                Some(ControlMessage {
                    kind: Some(control_message::Kind::Welcome(welcome)),
                }) => {
                    return Ok((tx, inbound, welcome));
                }
                Some(ControlMessage {
                    kind:
                        Some(
                            control_message::Kind::DesiredState(_)
                            | control_message::Kind::Cancel(_)
                            | control_message::Kind::VmAssignments(_),
                        ),
                }) => {
                    return Err(SessionError::DesiredBeforeWelcome);
                }
                // A kind this build does not know: newer control plane.
                Some(ControlMessage { kind: None }) => continue,
                None => return Err(SessionError::Closed),
            }
        }
    }

    async fn hello(&self) -> Hello {
        let nix_version = match tokio::time::timeout(NIX_VERSION_TIMEOUT, self.nix.version()).await
        {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot tell the Nix version");
                String::new()
            }
            Err(_) => String::new(),
        };
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            current_system: self.paths.current_system().unwrap_or_default(),
            booted_system: self.paths.booted_system().unwrap_or_default(),
            nix_version,
            vm_host: self.vm_host.clone(),
        }
    }

    /// After `Welcome`: until the stream breaks.
    async fn serve(
        &self,
        tx: mpsc::Sender<AgentMessage>,
        mut inbound: tonic::Streaming<ControlMessage>,
    ) -> SessionError {
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
        loop {
            tokio::select! {
                received = inbound.message() => match received {
                    Ok(Some(ControlMessage { kind: Some(control_message::Kind::DesiredState(state)) })) => {
                        tracing::info!(deployment = %crate::desired::clip(&state.deployment_id, 64), "desired state received");
                        if self.desired.send(state.into()).await.is_err() {
                            // The deployer stopped: the agent is shutting down.
                            return SessionError::Closed;
                        }
                    }
                    Ok(Some(ControlMessage { kind: Some(control_message::Kind::Cancel(cancel)) })) => {
                        tracing::info!(deployment = %crate::desired::clip(&cancel.deployment_id, 64), "cancellation received");
                        if self.desired.send(cancel.into()).await.is_err() {
                            return SessionError::Closed;
                        }
                    }
                    Ok(Some(ControlMessage { kind: Some(control_message::Kind::VmAssignments(set)) })) => {
                        match &self.vm_assignments {
                            Some(runner) => {
                                tracing::info!(vms = set.vms.len(), "VM assignments received");
                                runner.send_replace(Some(set));
                            }
                            None => tracing::warn!("VM assignments received, but this agent is not a VM host (--vm-host); ignored"),
                        }
                    }
                    Ok(Some(_)) => tracing::debug!("ignoring an unexpected control message"),
                    Ok(None) => return SessionError::Closed,
                    Err(status) => return SessionError::Status(status),
                },
                Some(report) = next_vm_result(self.vm_results.as_ref()) => {
                    tracing::debug!(?report, "VM report sent");
                    if tx.send(message(report)).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                outgoing = self.outbox.next() => {
                    let (kind, result) = match outgoing {
                        Outgoing::Result(outcome) => {
                            (agent_message::Kind::Result(self.outbox.result_message(&outcome)), Some(outcome))
                        }
                        Outgoing::Progress(progress) => (agent_message::Kind::Progress(progress), None),
                    };
                    if tx.send(message(kind)).await.is_err() {
                        return SessionError::Closed;
                    }
                    if let Some(outcome) = result {
                        tracing::info!(deployment = %outcome.deployment_id, state = %outcome.state, "result sent");
                        self.outbox.delivered(&outcome);
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { current_system: self.paths.current_system().unwrap_or_default() };
                    if tx.send(message(agent_message::Kind::Heartbeat(beat))).await.is_err() {
                        return SessionError::Closed;
                    }
                }
            }
        }
    }
}

/// The next VM report, or never on a plain machine.
async fn next_vm_result(
    results: Option<&Arc<tokio::sync::Mutex<mpsc::Receiver<agent_message::Kind>>>>,
) -> Option<agent_message::Kind> {
    match results {
        Some(results) => results.lock().await.recv().await,
        None => std::future::pending().await,
    }
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests;
