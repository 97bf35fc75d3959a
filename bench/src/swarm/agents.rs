//! One process of simulated agents. Each has its own certificate (issued in
//! memory by the fleet CA), its own mTLS connection and the agent's real
//! reconnect policy, and speaks the real protocol: Hello, then for every
//! desired state the phases the real agent reports (copying, activating,
//! checking, confirming over a NEW connection, committing) and a result.
//! Nothing is copied or activated: the phases take the configured delays.
//!
//! Talks to `swarm` over stdio: JSON lines out ([`Report`]), commands in
//! (`counters`); end of stdin ends the process.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
// The real agent's reconnect policy and session timing.
use procurator_core::backoff::{
    BASE, Backoff, DEFAULT_CAP, HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL, STABLE_AFTER,
    refusal_is_terminal,
};
use procurator_core::pki::Authority;
use procurator_core::tls::TlsMaterial;
use procurator_core::{MachineName, PROTOCOL_VERSION, Role};
use procurator_proto::v1::agent_service_client::AgentServiceClient;
use procurator_proto::v1::{
    ActivationResult, AgentMessage, ConfirmRequest, ControlMessage, CopyProgress, DesiredState,
    Heartbeat, Hello, MachineState, Progress, agent_message, control_message,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArgs {
    /// The directory holding the fleet CA (ca.crt, ca.key).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// The control plane, https://HOST:PORT: once per replica, tried in
    /// turn as the real agent does; agent `i` starts with the `i`-th.
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Machine names are `<prefix>-<index>`.
    #[arg(long, default_value = "m")]
    pub prefix: String,
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub count: usize,
    #[command(flatten)]
    pub behaviour: Behaviour,
}

/// How the simulated agents behave.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Behaviour {
    /// HTTP/2 keepalive interval, seconds (the real agent's default).
    #[arg(long, default_value_t = 20)]
    pub keepalive: u64,
    /// How long a simulated copy takes, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub copy_delay_ms: u64,
    /// How long a simulated `switch-to-configuration test` takes, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub activation_delay_ms: u64,
    /// The fraction of activations that fail (and roll back), 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub failure_rate: f64,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

/// What a swarm process tells `swarm`, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// Every agent has its certificate; they are dialling now.
    Ready {
        agents: usize,
    },
    /// An agent received a desired state, at Unix microseconds `at_us`.
    Desired {
        machine: String,
        deployment: String,
        at_us: u64,
    },
    Counters(Counters),
}

/// Totals over this process's agents since it started.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Counters {
    /// Connection attempts, and those that failed before `Welcome`.
    pub dials: u64,
    pub dial_failures: u64,
    /// Refusals only an operator could fix (the real agent keeps retrying
    /// these slowly; in a benchmark they mean something is wrong).
    pub refused: u64,
    pub confirms: u64,
    pub confirm_failures: u64,
    pub results: u64,
    /// Agents holding a stream past `Welcome` right now.
    pub sessions: u64,
    /// Deployments started (the real agent's activations).
    pub activations: u64,
    /// Desired states for a deployment already started or done: dropped,
    /// or answered with the stored result, as the real agent does.
    pub repeats: u64,
}

#[derive(Default)]
struct Tally {
    dials: AtomicU64,
    dial_failures: AtomicU64,
    refused: AtomicU64,
    confirms: AtomicU64,
    confirm_failures: AtomicU64,
    results: AtomicU64,
    sessions: AtomicU64,
    activations: AtomicU64,
    repeats: AtomicU64,
}

impl Tally {
    fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            dials: get(&self.dials),
            dial_failures: get(&self.dial_failures),
            refused: get(&self.refused),
            confirms: get(&self.confirms),
            confirm_failures: get(&self.confirm_failures),
            results: get(&self.results),
            sessions: get(&self.sessions),
            activations: get(&self.activations),
            repeats: get(&self.repeats),
        }
    }
}

/// Agent `index`'s own loopback address, as each real agent has its own IP.
/// Sharing 127.0.0.1 made every dial search the one address's ephemeral
/// ports among tens of thousands of open and TIME_WAIT sockets: that kernel
/// search was 40 % of the swarm's CPU in a rollout with confirmation.
fn source_address(index: usize) -> IpAddr {
    let offset = u32::try_from(index).unwrap_or(u32::MAX) % (1 << 23);
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 1, 0, 0)) + offset,
    ))
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn run(args: AgentsArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(args))
}

async fn serve(args: AgentsArgs) -> Result<()> {
    let authority = Authority::load(&args.ca_dir)?;
    let ca_pem = std::fs::read(args.ca_dir.join("ca.crt")).context("reading ca.crt")?;
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let tally = Arc::new(Tally::default());
    let behaviour = Arc::new(args.behaviour.clone());

    let mut agents = Vec::with_capacity(args.count);
    for index in args.first..args.first + args.count {
        let name = MachineName::parse(&format!("{}-{index}", args.prefix))?;
        let leaf = authority.issue(Role::Agent, &name, &[])?;
        let material = TlsMaterial {
            ca_pem: ca_pem.clone(),
            cert_pem: leaf.cert_pem.into_bytes(),
            key_pem: leaf.key_pem.into_bytes(),
            identity: leaf.identity,
        };
        let endpoints = args
            .url
            .iter()
            .map(|url| {
                Ok(material
                    .endpoint(url, Duration::from_secs(behaviour.keepalive))
                    .context("the control plane URL")?
                    .local_address(Some(source_address(index))))
            })
            .collect::<Result<Vec<_>>>()?;
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        agents.push(SimulatedAgent {
            name: name.to_string(),
            endpoints,
            behaviour: behaviour.clone(),
            reports: report_tx.clone(),
            tally: tally.clone(),
            state: Arc::new(AgentState {
                outbox,
                outbox_rx: tokio::sync::Mutex::new(outbox_rx),
                current: std::sync::Mutex::new(String::new()),
                seen: std::sync::Mutex::new(Vec::new()),
                // Agents spread over the replicas, as behind a balancer.
                dialled: std::sync::atomic::AtomicUsize::new(index % args.url.len()),
            }),
        });
    }
    let _ = report_tx.send(Report::Ready {
        agents: agents.len(),
    });
    for agent in agents {
        tokio::spawn(agent.run());
    }
    tokio::spawn(write_reports(report_rx));

    // Commands until `swarm` closes our stdin.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "counters" => {
                let _ = report_tx.send(Report::Counters(tally.snapshot()));
            }
            other => eprintln!("swarm-agents: unknown command {other:?}"),
        }
    }
    Ok(())
}

async fn write_reports(mut reports: mpsc::UnboundedReceiver<Report>) {
    let mut stdout = tokio::io::BufWriter::new(tokio::io::stdout());
    while let Some(report) = reports.recv().await {
        let Ok(mut line) = serde_json::to_vec(&report) else {
            continue;
        };
        line.push(b'\n');
        if stdout.write_all(&line).await.is_err() {
            return;
        }
        // Flush when nothing else is queued: batches under load, prompt when idle.
        if reports.is_empty() && stdout.flush().await.is_err() {
            return;
        }
    }
}

struct SimulatedAgent {
    name: String,
    /// One per control-plane URL, tried in turn.
    endpoints: Vec<Endpoint>,
    behaviour: Arc<Behaviour>,
    reports: mpsc::UnboundedSender<Report>,
    tally: Arc<Tally>,
    state: Arc<AgentState>,
}

/// What outlives a session, as in the real agent: its deployments go on
/// while it reconnects, and what they report goes out over the next stream.
struct AgentState {
    outbox: mpsc::UnboundedSender<AgentMessage>,
    outbox_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<AgentMessage>>,
    /// What it "runs": the last closure it committed.
    current: std::sync::Mutex<String>,
    /// The last few deployments started, each with its result once done.
    seen: std::sync::Mutex<Vec<(String, Option<AgentMessage>)>>,
    /// The index of the endpoint that answered last.
    dialled: std::sync::atomic::AtomicUsize,
}

/// Deployments an agent remembers: enough to know the one it is on.
const SEEN_KEPT: usize = 4;

impl AgentState {
    fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<(String, Option<AgentMessage>)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one session ended with.
enum Ended {
    /// Before `Welcome`: dialling, TLS, or the handshake failed.
    Dial,
    /// Refused for a reason only an operator can fix.
    Refused,
    /// After `Welcome`, at this instant.
    Session(Instant),
}

impl SimulatedAgent {
    async fn run(self) {
        let mut backoff = Backoff::new(BASE, DEFAULT_CAP);
        loop {
            bump(&self.tally.dials);
            let at = self.state.dialled.load(Ordering::Relaxed) % self.endpoints.len();
            let delay = match self.session(&self.endpoints[at]).await {
                Ended::Dial => {
                    bump(&self.tally.dial_failures);
                    // The next control plane in the list.
                    self.state
                        .dialled
                        .store((at + 1) % self.endpoints.len(), Ordering::Relaxed);
                    backoff.next_delay(&mut rand::rng())
                }
                Ended::Refused => {
                    bump(&self.tally.refused);
                    backoff.terminal_delay(&mut rand::rng())
                }
                Ended::Session(welcomed) => {
                    if welcomed.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    backoff.next_delay(&mut rand::rng())
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(&self, endpoint: &Endpoint) -> Ended {
        // As the real agent: dialling, TLS and the handshake up to Welcome
        // share one deadline.
        let current = self.state.current();
        let (tx, mut inbound) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(endpoint, &current)).await
            {
                Ok(Ok(connected)) => connected,
                Ok(Err(ended)) => return ended,
                Err(_) => return Ended::Dial,
            };
        self.tally.sessions.fetch_add(1, Ordering::Relaxed);
        let ended = self.serve(tx, &mut inbound).await;
        self.tally.sessions.fetch_sub(1, Ordering::Relaxed);
        ended
    }

    async fn handshake(
        &self,
        endpoint: &Endpoint,
        current: &str,
    ) -> Result<(mpsc::Sender<AgentMessage>, tonic::Streaming<ControlMessage>), Ended> {
        let refused = |status: &tonic::Status| {
            if refusal_is_terminal(status.code()) {
                Ended::Refused
            } else {
                Ended::Dial
            }
        };
        let channel = endpoint.connect().await.map_err(|_| Ended::Dial)?;
        let (tx, rx) = mpsc::channel(16);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: concat!("swarm-", env!("CARGO_PKG_VERSION")).into(),
            current_system: current.to_owned(),
            booted_system: current.to_owned(),
            nix_version: "nix (Nix) simulated".into(),
            vm_host: None,
        };
        // The receiver is alive right here: this cannot fail.
        let _ = tx.send(message(agent_message::Kind::Hello(hello))).await;
        let mut inbound = AgentServiceClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(|s| refused(&s))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(m)) if matches!(m.kind, Some(control_message::Kind::Welcome(_))) => {
                Ok((tx, inbound))
            }
            Err(status) => Err(refused(&status)),
            _ => Err(Ended::Dial),
        }
    }

    /// After `Welcome`: until the stream breaks.
    async fn serve(
        &self,
        tx: mpsc::Sender<AgentMessage>,
        inbound: &mut tonic::Streaming<ControlMessage>,
    ) -> Ended {
        let welcomed = Instant::now();
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
        // One session at a time forwards what the deployments report.
        let mut outbox = self.state.outbox_rx.lock().await;
        loop {
            tokio::select! {
                received = inbound.message() => match received {
                    Ok(Some(m)) => {
                        if let Some(control_message::Kind::DesiredState(desired)) = m.kind {
                            self.desired(desired);
                        }
                    }
                    _ => return Ended::Session(welcomed),
                },
                Some(report) = outbox.recv() => {
                    if let Err(unsent) = tx.send(report).await {
                        // Goes out over the next stream.
                        let _ = self.state.outbox.send(unsent.0);
                        return Ended::Session(welcomed);
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { current_system: self.state.current() };
                    if tx.send(message(agent_message::Kind::Heartbeat(beat))).await.is_err() {
                        return Ended::Session(welcomed);
                    }
                }
            }
        }
    }

    /// A desired state: started once per deployment; one seen before is
    /// answered with its result if it is done, as the real agent does.
    fn desired(&self, desired: DesiredState) {
        let repeat = {
            let mut seen = self.state.seen();
            match seen.iter().find(|(id, _)| *id == desired.deployment_id) {
                Some((_, result)) => Some(result.clone()),
                None => {
                    if seen.len() >= SEEN_KEPT {
                        seen.remove(0);
                    }
                    seen.push((desired.deployment_id.clone(), None));
                    None
                }
            }
        };
        match repeat {
            Some(result) => {
                bump(&self.tally.repeats);
                if let Some(result) = result {
                    let _ = self.state.outbox.send(result);
                }
            }
            None => {
                bump(&self.tally.activations);
                let _ = self.reports.send(Report::Desired {
                    machine: self.name.clone(),
                    deployment: desired.deployment_id.clone(),
                    at_us: unix_micros(),
                });
                tokio::spawn(self.deploy(desired));
            }
        }
    }

    /// The phases of one deployment, as the real agent reports them.
    fn deploy(&self, desired: DesiredState) -> impl Future<Output = ()> + Send + 'static {
        let behaviour = self.behaviour.clone();
        let endpoints = self.endpoints.clone();
        let tally = self.tally.clone();
        let state = self.state.clone();
        async move {
            let tx = &state.outbox;
            let id = desired.deployment_id.clone();
            let progress = |state: MachineState, copy: Option<CopyProgress>, text: &str| {
                message(agent_message::Kind::Progress(Progress {
                    deployment_id: id.clone(),
                    state: state.into(),
                    copy,
                    message: text.to_owned(),
                }))
            };
            let copied = CopyProgress {
                bytes_done: 4096,
                bytes_expected: 4096,
                paths_done: 1,
                paths_expected: 1,
            };
            // Halfway, as a real copy reports along the way.
            let halfway = CopyProgress {
                bytes_done: 2048,
                paths_done: 0,
                ..copied
            };
            let _ = tx.send(progress(MachineState::Copying, Some(halfway), "copying"));
            sleep_ms(behaviour.copy_delay_ms).await;
            let _ = tx.send(progress(MachineState::Copying, Some(copied), "copied"));
            let _ = tx.send(progress(MachineState::Activating, None, "switch test"));
            sleep_ms(behaviour.activation_delay_ms).await;

            let mut failure = None;
            if rand::rng().random_bool(behaviour.failure_rate) {
                failure = Some((MachineState::Activating, "simulated activation failure"));
            }
            if failure.is_none() && !desired.health_checks.is_empty() {
                let _ = tx.send(progress(MachineState::Checking, None, "health checks"));
            }
            if failure.is_none() && desired.confirm_timeout_secs > 0 {
                let _ = tx.send(progress(MachineState::Confirming, None, "confirming"));
                let timeout = Duration::from_secs(desired.confirm_timeout_secs.into());
                bump(&tally.confirms);
                let first = state.dialled.load(Ordering::Relaxed);
                if !confirm(&endpoints, first, &desired, timeout).await {
                    bump(&tally.confirm_failures);
                    failure = Some((MachineState::Confirming, "no confirmation"));
                }
            }
            let result = match failure {
                None => {
                    let _ = tx.send(progress(MachineState::Committing, None, "committing"));
                    *state.current.lock().unwrap_or_else(|p| p.into_inner()) =
                        desired.closure.clone();
                    ActivationResult {
                        deployment_id: id.clone(),
                        state: MachineState::Succeeded.into(),
                        current_system: desired.closure.clone(),
                        output: activation_log(&desired.closure, None),
                        ..Default::default()
                    }
                }
                Some((phase, reason)) => {
                    let _ = tx.send(progress(MachineState::RollingBack, None, "rolling back"));
                    ActivationResult {
                        deployment_id: id.clone(),
                        state: MachineState::RolledBack.into(),
                        failed_phase: phase.into(),
                        reason: reason.into(),
                        output: activation_log(&desired.closure, Some(reason)),
                        ..Default::default()
                    }
                }
            };
            let result = message(agent_message::Kind::Result(result));
            if let Some(entry) = state.seen().iter_mut().find(|(d, _)| *d == id) {
                entry.1 = Some(result.clone());
            }
            if tx.send(result).is_ok() {
                bump(&tally.results);
            }
        }
    }
}

/// Magic rollback's connectivity proof: a NEW connection, one call, to
/// each control plane in turn from `first` until one answers or `timeout`.
async fn confirm(
    endpoints: &[Endpoint],
    first: usize,
    desired: &DesiredState,
    timeout: Duration,
) -> bool {
    let attempts = async {
        for i in (0..).map(|k| (first + k) % endpoints.len()) {
            let attempt = async {
                let channel = endpoints[i].connect().await.ok()?;
                let reply = AgentServiceClient::new(channel)
                    .confirm(ConfirmRequest {
                        deployment_id: desired.deployment_id.clone(),
                        closure: desired.closure.clone(),
                    })
                    .await
                    .ok()?;
                Some(reply.into_inner().confirmed)
            };
            if let Some(confirmed) = attempt.await {
                return confirmed;
            }
            tokio::time::sleep(BASE).await;
        }
        false
    };
    tokio::time::timeout(timeout, attempts)
        .await
        .unwrap_or(false)
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// What a real agent's log of one deployment holds (agent/src/logbook.rs),
/// about 3 KiB of it: the sections of every step, an activation's output.
fn activation_log(closure: &str, failure: Option<&str>) -> String {
    let mut log = format!(
        "== nix copy --from file:///cache {closure}: copied 1 paths, 4096 bytes\n\
         == {closure}/bin/switch-to-configuration test: exit status: 0\n"
    );
    for step in 1..=40 {
        log.push_str(&format!("activation step {step} of 40\n"));
    }
    match failure {
        None => log.push_str(&format!(
            "== {closure}/bin/switch-to-configuration boot: exit status: 0\n== succeeded: {closure} runs"
        )),
        Some(reason) => log.push_str(&format!("== rolled-back: activating failed\n{reason}")),
    }
    log
}

pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
