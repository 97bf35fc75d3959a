//! `procurator-bench swarm`: N simulated agents against the real control
//! plane, each run on a fresh store, measuring
//! - the control plane's RSS per connected agent (/proc/PID/status),
//! - its idle CPU with every agent connected and keepalive on (/proc/PID/stat),
//! - submit → every agent holds its desired state (p50, p99, max),
//! - submit → finished with instant agents, with and without the
//!   connectivity confirmation over a new connection,
//! - M concurrent `watch` streams during that rollout: events/s and lag,
//! - the connect storm after a control-plane restart (the agents' real
//!   backoff and jitter), and how many agents gave up (must be none);
//! - with `--replicas N --database postgres`: the same over N replicas on
//!   one PostgreSQL database the bench starts (memory and CPU summed, the
//!   database's CPU included), and instead of the restart, one replica
//!   SIGKILLed mid-rollout: its agents reconnected elsewhere, none refused,
//!   every machine activated exactly once, the rollout finished, and the
//!   watchers' revisions contiguous.

pub mod agents;
mod commands;
mod fleet;
mod operator;
mod plane;
mod planes;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use procurator_core::tls::TlsFiles;
use serde::Serialize;
use tokio::time::Instant;

use self::agents::Behaviour;
use self::fleet::{AgentProcesses, Layout};
use self::planes::Planes;
use crate::stats;

/// Agents wait at most this long for everything to happen at 10,000 agents.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
const PREFIX: &str = "m";

#[derive(Debug, Clone, clap::Args)]
pub struct SwarmArgs {
    /// Swarm sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub agents: Vec<usize>,
    /// Runs per size (each on a fresh control plane and store).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Agents per swarm process (each process may hold 20,000 open files).
    #[arg(long, default_value_t = 2500)]
    pub agents_per_process: usize,
    /// Concurrent `watch` streams following the rollout.
    #[arg(long, default_value_t = 10)]
    pub watchers: usize,
    /// How long to measure idle CPU, seconds (at least one keepalive period).
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// The control plane binary (default: procurator-control-plane beside this one).
    #[arg(long)]
    pub control_plane: Option<PathBuf>,
    /// Control-plane replicas, sharing one PostgreSQL database (needs
    /// --database postgres); each swarm process dials its own first.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// The store: `sqlite` (the embedded default) or `postgres` (a cluster
    /// the bench starts, fsync on).
    #[arg(long, value_enum, default_value = "sqlite")]
    pub database: Engine,
    /// Write every run's figures and the summaries here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep each run's directory (the control plane's logs and store).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub behaviour: Behaviour,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub agents: usize,
    /// From the agents' first dial to all connected (cold start, no backoff yet).
    pub connect_s: f64,
    pub rss_idle_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_per_agent_kib: f64,
    /// VmHWM after both rollouts.
    pub rss_peak_kib: u64,
    pub idle_cpu_percent: f64,
    /// Submit → desired state received, with confirmation on.
    pub desired_p50_ms: f64,
    pub desired_p99_ms: f64,
    pub desired_max_ms: f64,
    /// The Submit call of the rollout without confirmation: upload,
    /// validation, storing and scheduling all machines.
    pub submit_ms: f64,
    /// The same with confirmation off: agents do no TLS handshake of their
    /// own while the desired states go out.
    pub desired_no_confirm_p50_ms: f64,
    pub desired_no_confirm_p99_ms: f64,
    pub desired_no_confirm_max_ms: f64,
    /// Submit → deployment finished, confirmation on (the default) and off.
    pub finished_s: f64,
    /// TLS handshakes the control plane completed during the rollout with
    /// confirmation: each confirmation dials anew and should resume.
    pub confirm_full_handshakes: f64,
    pub confirm_resumed_handshakes: f64,
    pub finished_no_confirm_s: f64,
    pub succeeded: usize,
    pub watchers: usize,
    pub watch_events: u64,
    /// Events per second the slowest watcher received, and all together.
    pub watch_slowest_events_per_s: f64,
    pub watch_total_events_per_s: f64,
    /// The largest (receipt − event time) any watcher saw, milliseconds.
    pub watch_max_lag_ms: f64,
    /// Control plane restarted → every agent connected again.
    pub storm_s: f64,
    /// SIGTERM to the old control plane → the new one listening.
    pub storm_down_s: f64,
    pub storm_dial_failures: u64,
    /// Agents refused for good (the real agent would back off for long): must be 0.
    pub storm_refused: u64,
    pub replicas: usize,
    /// One replica SIGKILLed mid-rollout (replicas only): → every agent
    /// connected to the others, → the rollout finished (from submit).
    pub kill_reconnect_s: f64,
    pub kill_finished_s: f64,
    pub kill_succeeded: usize,
    /// Deployments the agents started in that rollout (must be one each),
    /// and desired states they had been sent before (answered, not rerun).
    pub kill_activations: u64,
    pub kill_repeats: u64,
    pub kill_refused: u64,
    /// Revisions a watcher missed or saw twice, over all watchers (must be 0).
    pub watch_gaps: u64,
    /// `procurator-ctl deployments`, `deployments ID` (every row), `status`
    /// (every agent) and `watch ID` (a finished rollout replayed), against
    /// the swarm; and the floor: the same rows and agents paged by a bare
    /// gRPC client.
    pub ctl_deployments_s: f64,
    pub ctl_deployment_rows_s: f64,
    pub ctl_status_s: f64,
    pub ctl_watch_s: f64,
    /// `procurator-ctl logs ID m-0` and `machine m-0`, and their floor:
    /// the one RPC each makes, from a bare gRPC client.
    pub ctl_logs_ms: f64,
    pub ctl_machine_ms: f64,
    pub floor_log_ms: f64,
    pub floor_history_ms: f64,
    pub floor_rows_s: f64,
    pub floor_agents_s: f64,
}

pub fn run(args: SwarmArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.agents.is_empty() || args.agents.contains(&0) {
        bail!("--agents needs sizes of at least 1, e.g. --agents 1000,5000,10000");
    }
    if args.agents_per_process == 0 {
        bail!("--agents-per-process must be at least 1");
    }
    if args.behaviour.keepalive == 0 {
        bail!("--keepalive must be at least 1 second");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if args.replicas > 1 && args.database == Engine::Sqlite {
        bail!("replicas share a PostgreSQL database: add --database postgres");
    }
    let control_plane = match &args.control_plane {
        Some(path) => path.clone(),
        None => sibling("procurator-control-plane")?,
    };
    raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(measure_all(&args, &control_plane))
}

async fn measure_all(args: &SwarmArgs, control_plane: &std::path::Path) -> Result<()> {
    let mut all = Vec::new();
    for &n in &args.agents {
        let mut runs = Vec::new();
        for r in 1..=args.runs {
            eprintln!("swarm: {n} agents, run {r} of {}", args.runs);
            let figures = one_run(args, control_plane, n)
                .await
                .with_context(|| format!("{n} agents, run {r}"))?;
            eprintln!("swarm:   {}", report::one_line(&figures));
            runs.push(figures);
        }
        all.push(runs);
    }
    let summaries: Vec<report::Summary> = all.iter().map(|runs| report::summarise(runs)).collect();
    println!("{}", report::table(args, &summaries));
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "benchmark": "swarm",
            "machine": report::machine(),
            "behaviour": args.behaviour,
            "watchers": args.watchers,
            "idleSecs": args.idle_secs,
            "summaries": summaries,
            "runs": all,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn one_run(
    args: &SwarmArgs,
    control_plane: &std::path::Path,
    n: usize,
) -> Result<RunFigures> {
    let dir = tempfile::Builder::new()
        .prefix("procurator-swarm-")
        .tempdir()?;
    let pki = dir.path().join("pki");
    procurator_core::pki::init(&pki, &[], "bench")?;
    let plane_dir = dir.path().join("control-plane");
    let mut planes = Planes::start(
        control_plane,
        &plane_dir,
        &pki,
        args.behaviour.keepalive,
        args.replicas,
        args.database == Engine::Postgres,
    )
    .await?;
    let result = measure(args, &mut planes, &pki, n).await;
    let stopped = planes.stop().await;
    if result.is_err() || args.keep {
        eprintln!(
            "swarm: the control plane's logs are in {}",
            plane_dir.display()
        );
        // Kept for a look at what went wrong, or at the timeline.
        let _ = dir.keep();
    }
    let figures = result?;
    stopped?;
    Ok(figures)
}

async fn measure(
    args: &SwarmArgs,
    planes: &mut Planes,
    pki: &std::path::Path,
    n: usize,
) -> Result<RunFigures> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kib = planes.rss_kib()?;

    let urls = planes.urls();
    let mut swarm = AgentProcesses::start(&Layout {
        ca_dir: pki,
        urls: &urls,
        prefix: PREFIX,
        agents: n,
        per_process: args.agents_per_process,
        behaviour: &args.behaviour,
    })?;
    let measured = async {
        swarm.wait_ready(PHASE_TIMEOUT).await?;
        let connect = all_connected(planes, &mut swarm, n).await?;
        // Let the handshakes' transient buffers go before reading memory.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_connected_kib = planes.rss_kib()?;

        let cpu_before = planes.cpu_seconds()?;
        let idle_from = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
        let idle_cpu_percent =
            (planes.cpu_seconds()? - cpu_before) / idle_from.elapsed().as_secs_f64() * 100.0;

        let operator = operator_client(pki, &urls[0]).await?;
        let all = 0..planes.replicas.len();
        let with_confirm = rollout(
            planes,
            &mut swarm,
            &operator,
            pki,
            n,
            1,
            30,
            args.watchers,
            all.clone(),
        )
        .await?;
        let without_confirm = rollout(planes, &mut swarm, &operator, pki, n, 2, 0, 0, all).await?;
        let rss_peak_kib = planes.rss_peak_kib()?;

        let (storm, killed) = if planes.replicas.len() > 1 {
            let killed =
                kill_mid_rollout(planes, &mut swarm, &operator, pki, n, args.watchers).await?;
            (None, Some(killed))
        } else {
            let before = swarm.counters().await?;
            let (spawned, down) = planes.replicas[0].restart().await?;
            all_connected(planes, &mut swarm, n).await?;
            let storm_s = spawned.elapsed().as_secs_f64();
            let after = swarm.counters().await?;
            (Some((storm_s, down, before, after)), None)
        };

        // Five deployments of every machine in the store, as a fleet has
        // after a week: what an operator's commands cost then.
        let all = 0..planes.replicas.len();
        for generation in 3..=5 {
            rollout(
                planes,
                &mut swarm,
                &operator,
                pki,
                n,
                generation,
                0,
                0,
                all.clone(),
            )
            .await?;
        }
        let commands = commands::measure(pki, &urls[0], &operator, &with_confirm.id, n).await?;

        let sorted = stats::sorted(&with_confirm.desired_ms);
        let pct = |p| stats::percentile(&sorted, p).unwrap_or(f64::NAN);
        let sorted_nc = stats::sorted(&without_confirm.desired_ms);
        let pct_nc = |p| stats::percentile(&sorted_nc, p).unwrap_or(f64::NAN);
        let watched = &with_confirm.watched;
        let nan = f64::NAN;
        Ok::<_, anyhow::Error>(RunFigures {
            agents: n,
            connect_s: connect.as_secs_f64(),
            rss_idle_kib,
            rss_connected_kib,
            rss_per_agent_kib: rss_connected_kib.saturating_sub(rss_idle_kib) as f64 / n as f64,
            rss_peak_kib,
            idle_cpu_percent,
            desired_p50_ms: pct(50.0),
            desired_p99_ms: pct(99.0),
            desired_max_ms: pct(100.0),
            submit_ms: without_confirm.submit_ms,
            desired_no_confirm_p50_ms: pct_nc(50.0),
            desired_no_confirm_p99_ms: pct_nc(99.0),
            desired_no_confirm_max_ms: pct_nc(100.0),
            finished_s: with_confirm.finished_s,
            confirm_full_handshakes: with_confirm.full_handshakes,
            confirm_resumed_handshakes: with_confirm.resumed_handshakes,
            finished_no_confirm_s: without_confirm.finished_s,
            succeeded: with_confirm.succeeded,
            watchers: watched.len(),
            watch_events: watched.iter().map(|w| w.events).max().unwrap_or(0),
            watch_slowest_events_per_s: watched
                .iter()
                .map(operator::Watched::events_per_second)
                .fold(f64::NAN, f64::min),
            watch_total_events_per_s: watched
                .iter()
                .map(operator::Watched::events_per_second)
                .sum(),
            watch_max_lag_ms: watched.iter().map(|w| w.max_lag_ms).max().unwrap_or(0) as f64,
            storm_s: storm.as_ref().map_or(nan, |s| s.0),
            storm_down_s: storm.as_ref().map_or(nan, |s| s.1.as_secs_f64()),
            storm_dial_failures: storm
                .as_ref()
                .map_or(0, |(_, _, b, a)| a.dial_failures - b.dial_failures),
            storm_refused: storm
                .as_ref()
                .map_or(0, |(_, _, b, a)| a.refused - b.refused),
            replicas: planes.replicas.len(),
            kill_reconnect_s: killed.as_ref().map_or(nan, |k| k.reconnect_s),
            kill_finished_s: killed.as_ref().map_or(nan, |k| k.rollout.finished_s),
            kill_succeeded: killed.as_ref().map_or(0, |k| k.rollout.succeeded),
            kill_activations: killed.as_ref().map_or(0, |k| k.activations),
            kill_repeats: killed.as_ref().map_or(0, |k| k.repeats),
            kill_refused: killed.as_ref().map_or(0, |k| k.refused),
            ctl_deployments_s: commands.deployments_s,
            ctl_deployment_rows_s: commands.deployment_rows_s,
            ctl_status_s: commands.status_s,
            ctl_watch_s: commands.watch_s,
            ctl_logs_ms: commands.logs_s * 1000.0,
            ctl_machine_ms: commands.machine_s * 1000.0,
            floor_log_ms: commands.floor_log_s * 1000.0,
            floor_history_ms: commands.floor_history_s * 1000.0,
            floor_rows_s: commands.floor_rows_s,
            floor_agents_s: commands.floor_agents_s,
            watch_gaps: watched
                .iter()
                .chain(killed.iter().flat_map(|k| &k.rollout.watched))
                .map(|w| w.gaps)
                .sum(),
        })
    }
    .await;
    swarm.stop().await;
    measured
}

/// Waits for all `n` agents to be connected; on failure says what the
/// agents themselves counted.
async fn all_connected(
    planes: &mut Planes,
    swarm: &mut AgentProcesses,
    n: usize,
) -> Result<Duration> {
    match planes.wait_connected(n, PHASE_TIMEOUT).await {
        Ok(took) => Ok(took),
        Err(e) => match swarm.counters().await {
            Ok(c) => Err(e.context(format!("the agents counted {c:?}"))),
            Err(_) => Err(e),
        },
    }
}

struct Rollout {
    id: String,
    /// The Submit call itself: upload, validation, storing, scheduling.
    submit_ms: f64,
    desired_ms: Vec<f64>,
    finished_s: f64,
    full_handshakes: f64,
    resumed_handshakes: f64,
    succeeded: usize,
    watched: Vec<operator::Watched>,
}

/// A rollout with confirmation during which replica 1 is SIGKILLed, once
/// every agent holds its desired state: what it cost and what it lost.
struct Killed {
    rollout: Rollout,
    reconnect_s: f64,
    activations: u64,
    repeats: u64,
    refused: u64,
}

async fn kill_mid_rollout(
    planes: &mut Planes,
    swarm: &mut AgentProcesses,
    operator: &operator::Client,
    pki: &std::path::Path,
    n: usize,
    watchers: usize,
) -> Result<Killed> {
    let before = swarm.counters().await?;
    // Watchers follow on the replicas that live; the killed one's move.
    let survivors: Vec<usize> = (0..planes.replicas.len()).filter(|&i| i != 1).collect();
    let mut started = start_rollout(planes, operator, pki, n, 3, 30, watchers, &survivors).await?;
    let received = swarm.desired(&started.id, n, PHASE_TIMEOUT).await?;
    planes.replicas[1].kill().await?;
    let killed = Instant::now();
    all_connected(planes, swarm, n).await?;
    let reconnect_s = killed.elapsed().as_secs_f64();
    let rollout = finish_rollout(planes, operator, &mut started, received).await?;
    let after = swarm.counters().await?;
    Ok(Killed {
        rollout,
        reconnect_s,
        activations: after.activations - before.activations,
        repeats: after.repeats - before.repeats,
        refused: after.refused - before.refused,
    })
}

/// Submits generation `generation` to all `n` machines with `watchers`
/// extra `watch` streams following it (on the replicas `on`, in turn), and
/// waits for the end.
#[allow(clippy::too_many_arguments)]
async fn rollout(
    planes: &mut Planes,
    swarm: &mut AgentProcesses,
    operator: &operator::Client,
    pki: &std::path::Path,
    n: usize,
    generation: u32,
    confirm_timeout: u32,
    watchers: usize,
    on: std::ops::Range<usize>,
) -> Result<Rollout> {
    let on: Vec<usize> = on.collect();
    let mut started = start_rollout(
        planes,
        operator,
        pki,
        n,
        generation,
        confirm_timeout,
        watchers,
        &on,
    )
    .await?;
    let received = swarm.desired(&started.id, n, PHASE_TIMEOUT).await?;
    finish_rollout(planes, operator, &mut started, received).await
}

/// A submitted rollout, its watchers following.
struct Started {
    id: String,
    submitted_us: u64,
    answered_us: u64,
    full_before: f64,
    resumed_before: f64,
    followers: Vec<tokio::task::JoinHandle<Result<operator::Watched>>>,
}

#[allow(clippy::too_many_arguments)]
async fn start_rollout(
    planes: &mut Planes,
    operator: &operator::Client,
    pki: &std::path::Path,
    n: usize,
    generation: u32,
    confirm_timeout: u32,
    watchers: usize,
    on: &[usize],
) -> Result<Started> {
    let revision = planes
        .first()
        .metric("procurator_event_log_revision")
        .await? as u64;
    let full_before = planes.counter(HANDSHAKES_FULL).await?;
    let resumed_before = planes.counter(HANDSHAKES_RESUMED).await?;
    let (id_tx, id_rx) = tokio::sync::watch::channel(None);
    // The first stream only says when it ended; the others are measured.
    let mut streams = Vec::new();
    for i in 0..=watchers {
        let url = planes.replicas[on[i % on.len()]].url();
        let client = operator_client(pki, &url).await?;
        streams.push(operator::open_watch(client, revision).await?);
    }
    let mut followers = Vec::new();
    for stream in streams {
        followers.push(tokio::spawn(operator::follow(
            stream,
            id_rx.clone(),
            PHASE_TIMEOUT,
        )));
    }
    let artifact = operator::artifact(PREFIX, n, generation, confirm_timeout);
    let (id, submitted_us, answered_us) =
        operator::submit(&mut operator.clone(), &artifact).await?;
    let _ = id_tx.send(Some(id.clone()));
    Ok(Started {
        id,
        submitted_us,
        answered_us,
        full_before,
        resumed_before,
        followers,
    })
}

const HANDSHAKES_FULL: &str = r#"procurator_tls_handshakes_total{kind="full"}"#;
const HANDSHAKES_RESUMED: &str = r#"procurator_tls_handshakes_total{kind="resumed"}"#;

async fn finish_rollout(
    planes: &mut Planes,
    operator: &operator::Client,
    started: &mut Started,
    received: Vec<u64>,
) -> Result<Rollout> {
    let desired_ms = received
        .iter()
        .map(|&at| at.saturating_sub(started.submitted_us) as f64 / 1000.0)
        .collect();
    let mut watched = Vec::new();
    for follower in started.followers.drain(..) {
        watched.push(follower.await.context("a watcher failed")??);
    }
    watched.remove(0);
    let deployment = operator::get(&mut operator.clone(), &started.id).await?;
    let finished_us = u64::try_from(deployment.finished_at_ms).unwrap_or(0) * 1000;
    let succeeded = deployment
        .machine_counts
        .get(procurator_proto::v1::MachineState::Succeeded.label())
        .copied()
        .unwrap_or(0) as usize;
    Ok(Rollout {
        id: started.id.clone(),
        full_handshakes: planes.counter(HANDSHAKES_FULL).await? - started.full_before,
        resumed_handshakes: planes.counter(HANDSHAKES_RESUMED).await? - started.resumed_before,
        submit_ms: started.answered_us.saturating_sub(started.submitted_us) as f64 / 1000.0,
        desired_ms,
        finished_s: finished_us.saturating_sub(started.submitted_us) as f64 / 1e6,
        succeeded,
        watched,
    })
}

async fn operator_client(pki: &std::path::Path, url: &str) -> Result<operator::Client> {
    let files = TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join("operator-bench.crt"),
        key: pki.join("operator-bench.key"),
    };
    let channel = files
        .load()?
        .endpoint(url, Duration::from_secs(20))?
        .connect()
        .await
        .with_context(|| format!("connecting to {url} as operator/bench"))?;
    Ok(operator::Client::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// A binary installed beside this one.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating procurator-bench")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: build it (cargo build --release --workspace --bins) or pass its path",
            path.display()
        );
    }
    Ok(path)
}

/// Thousands of sockets need more than the usual 1,024 open files; children
/// (the control plane, the agent processes) inherit the raised limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
