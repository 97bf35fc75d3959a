//! Prometheus metrics. RPC counters are fed by [`layer`], agent and phase
//! metrics by the event log (so no handler needs to know about metrics),
//! and the fleet gauges are read from the store at scrape time.

mod http;
pub mod layer;

use std::collections::HashMap;
use std::sync::Arc;

use procurator_proto::v1::{Event, MachineState, event};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;
use tokio_rustls::rustls::HandshakeKind;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

pub use http::serve;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabel {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    role: &'static str,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric, registered once. Shared by the layer, the event watcher
/// and the HTTP listener.
pub struct Metrics {
    registry: Registry,
    connected_agents: Gauge,
    agent_streams: Gauge,
    deployments: Family<StateLabel, Gauge>,
    machines: Family<StateLabel, Gauge>,
    event_log_revision: Gauge,
    phase_seconds: HistogramFamily<PhaseLabel>,
    rpcs: Family<RpcLabel, Counter>,
    rpc_errors: Family<RpcLabel, Counter>,
    submits: Family<OutcomeLabel, Counter>,
    agent_connects: Counter,
    agent_disconnects: Counter,
    tls_handshakes: Family<KindLabel, Counter>,
    tls_handshake_failures: Counter,
    /// The end of validity of this replica's agents' and its own certificate.
    certificate_expiry: Family<IdentityLabel, Gauge>,
    /// Where its own certificate is read at every scrape (it is reloaded).
    server_tls: Option<Arc<crate::server_tls::ServerTls>>,
    /// Scrapes reset and refill the store gauges; one at a time keeps two
    /// concurrent scrapes from seeing each other's half-filled families.
    scrape: tokio::sync::Mutex<()>,
}

fn phase_histogram() -> Histogram {
    // 0.5 s … ~68 min: from a no-op activation to a slow closure copy.
    Histogram::new(exponential_buckets(0.5, 2.0, 14))
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            connected_agents: Gauge::default(),
            agent_streams: Gauge::default(),
            deployments: Family::default(),
            machines: Family::default(),
            event_log_revision: Gauge::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
            rpcs: Family::default(),
            rpc_errors: Family::default(),
            submits: Family::default(),
            agent_connects: Counter::default(),
            agent_disconnects: Counter::default(),
            tls_handshakes: Family::default(),
            tls_handshake_failures: Counter::default(),
            certificate_expiry: Family::default(),
            server_tls: None,
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::with_prefix("procurator"),
        };
        let r = &mut m.registry;
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When a certificate stops being valid (Unix seconds): each agent with a stream to this control plane, and the control plane's own",
            m.certificate_expiry.clone(),
        );
        r.register(
            "connected_agents",
            "Agents with an open stream",
            m.connected_agents.clone(),
        );
        r.register(
            "agent_streams",
            "Agent streams this control plane holds (connected_agents counts them over every replica)",
            m.agent_streams.clone(),
        );
        r.register("deployments", "Deployments by state", m.deployments.clone());
        r.register(
            "machines",
            "Machine rows of every deployment, by state",
            m.machines.clone(),
        );
        r.register(
            "event_log_revision",
            "The highest revision in the event log",
            m.event_log_revision.clone(),
        );
        r.register(
            "machine_phase_duration_seconds",
            "Time a machine spent in a phase, observed when it left the phase",
            m.phase_seconds.clone(),
        );
        r.register(
            "rpc_requests",
            "Finished gRPC calls by method and status code",
            m.rpcs.clone(),
        );
        r.register(
            "rpc_errors",
            "gRPC calls that ended with a status other than OK",
            m.rpc_errors.clone(),
        );
        r.register(
            "submits",
            "DeploymentService.Submit calls by outcome",
            m.submits.clone(),
        );
        r.register(
            "agent_connects",
            "Agent streams opened",
            m.agent_connects.clone(),
        );
        r.register(
            "agent_disconnects",
            "Agent streams closed",
            m.agent_disconnects.clone(),
        );
        r.register(
            "tls_handshakes",
            "Completed TLS handshakes by kind: full, or resumed from a session ticket",
            m.tls_handshakes.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        m
    }

    /// Count one completed TLS handshake.
    pub fn tls_handshake(&self, kind: Option<HandshakeKind>) {
        let kind = match kind {
            Some(HandshakeKind::Resumed) => "resumed",
            Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest) => "full",
            // Not reachable for a completed handshake; counted, not hidden.
            None => "unknown",
        };
        self.tls_handshakes.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Count one finished RPC. `method` is the request path.
    pub fn rpc_finished(&self, method: &str, code: tonic::Code) {
        let label = RpcLabel {
            method: method.to_owned(),
            code: format!("{code:?}"),
        };
        self.rpcs.get_or_create(&label).inc();
        if code != tonic::Code::Ok {
            self.rpc_errors.get_or_create(&label).inc();
        }
        if method == layer::SUBMIT_PATH {
            let outcome = match code {
                tonic::Code::Ok => "accepted".to_owned(),
                other => format!("{other:?}"),
            };
            self.submits.get_or_create(&OutcomeLabel { outcome }).inc();
        }
    }

    /// Its own certificate's expiry read from `tls` at every scrape.
    pub fn serving_with(mut self, tls: Arc<crate::server_tls::ServerTls>) -> Self {
        self.server_tls = Some(tls);
        self
    }

    /// An agent's stream opened with a certificate valid until `not_after`.
    pub fn agent_certificate(&self, machine: &str, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&agent_label(machine))
            .set(not_after);
    }

    /// An agent's stream ended (and no newer one replaced it).
    pub fn agent_certificate_gone(&self, machine: &str) {
        self.certificate_expiry.remove(&agent_label(machine));
    }

    /// The text exposition, with the store gauges read just now.
    pub async fn render(&self, store: &Store) -> Result<String, StoreError> {
        let _one_at_a_time = self.scrape.lock().await;
        if let Some(own) = self.server_tls.as_ref().and_then(|tls| tls.certificate()) {
            self.certificate_expiry
                .get_or_create(&IdentityLabel {
                    role: procurator_core::Role::ControlPlane.as_str(),
                    name: own.identity.name.to_string(),
                })
                .set(own.not_after);
        }
        let stats = store.fleet_stats().await?;
        self.connected_agents.set(stats.connected_agents);
        self.event_log_revision.set(stats.event_log_revision);
        // Cleared first so that a state nothing is in any more disappears.
        self.deployments.clear();
        for (state, n) in stats.deployments {
            let state = state_name(state.as_str_name(), "DEPLOYMENT_STATE_");
            self.deployments.get_or_create(&StateLabel { state }).set(n);
        }
        self.machines.clear();
        for (state, n) in stats.machines {
            let state = state_name(state.as_str_name(), "MACHINE_STATE_");
            self.machines.get_or_create(&StateLabel { state }).set(n);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        Ok(out)
    }

    /// An agent's stream completed its handshake. Counted here, not from the
    /// event log: the log records what agents report, not every reconnect.
    pub fn agent_connected(&self) {
        self.agent_connects.inc();
    }

    pub fn agent_disconnected(&self) {
        self.agent_disconnects.inc();
    }

    /// How many agent streams this process holds now.
    pub fn set_agent_streams(&self, streams: usize) {
        self.agent_streams
            .set(i64::try_from(streams).unwrap_or(i64::MAX));
    }

    /// Follow the event log until `stop`: time each machine's phases from
    /// the events' stamps.
    pub async fn watch_events(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let mut events = store.subscribe();
        let mut phases = PhaseClock::default();
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.recv() => event,
            };
            match event {
                Ok(event) => self.observe(&mut phases, &event),
                // Entry times may be missing now; better no sample than a wrong one.
                Err(RecvError::Lagged(_)) => phases.entered.clear(),
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn observe(&self, phases: &mut PhaseClock, event: &Event) {
        match &event.kind {
            Some(event::Kind::Machine(m)) => {
                let key = (event.deployment_id.clone(), m.machine.clone());
                if let Some((phase, seconds)) = phases.moved(key, m.state(), event.at_ms) {
                    let phase = state_name(phase.as_str_name(), "MACHINE_STATE_");
                    self.phase_seconds
                        .get_or_create(&PhaseLabel { phase })
                        .observe(seconds);
                }
            }
            Some(event::Kind::Finished(_)) => phases
                .entered
                .retain(|(deployment, _), _| *deployment != event.deployment_id),
            _ => {}
        }
    }
}

/// When each machine entered its current state, as far as we saw it happen.
#[derive(Default)]
struct PhaseClock {
    entered: HashMap<(String, String), (MachineState, i64)>,
}

impl PhaseClock {
    /// Record `state` for `key`; if that ends a timed phase, return the phase
    /// and how long it lasted. Progress updates within a state keep its
    /// entry time.
    fn moved(
        &mut self,
        key: (String, String),
        state: MachineState,
        at_ms: i64,
    ) -> Option<(MachineState, f64)> {
        let previous = self.entered.get(&key).copied();
        if previous.is_some_and(|(s, _)| s == state) {
            return None;
        }
        if state.is_final() {
            self.entered.remove(&key);
        } else {
            self.entered.insert(key, (state, at_ms));
        }
        let (phase, since) = previous?;
        // Stamps come from one clock, but a stepped clock must not give a
        // negative duration.
        is_timed(phase).then(|| (phase, (at_ms - since).max(0) as f64 / 1000.0))
    }
}

fn agent_label(machine: &str) -> IdentityLabel {
    IdentityLabel {
        role: procurator_core::Role::Agent.as_str(),
        name: machine.to_owned(),
    }
}

fn is_timed(state: MachineState) -> bool {
    use MachineState as S;
    matches!(
        state,
        S::Copying | S::Activating | S::Checking | S::Confirming | S::Committing
    )
}

/// `MACHINE_STATE_COPYING` → `copying`.
fn state_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_timed_when_the_machine_leaves_it() {
        let mut clock = PhaseClock::default();
        let key = || ("d".to_owned(), "web-1".to_owned());
        assert_eq!(clock.moved(key(), MachineState::Sent, 0), None);
        assert_eq!(clock.moved(key(), MachineState::Copying, 1_000), None);
        // Progress within the phase does not restart its clock.
        assert_eq!(clock.moved(key(), MachineState::Copying, 2_000), None);
        assert_eq!(
            clock.moved(key(), MachineState::Activating, 4_500),
            Some((MachineState::Copying, 3.5))
        );
        assert_eq!(
            clock.moved(key(), MachineState::Succeeded, 5_000),
            Some((MachineState::Activating, 0.5))
        );
        assert!(clock.entered.is_empty());
    }
}
