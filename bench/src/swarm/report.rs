//! The swarm's figures, summarised over runs and set against the targets.

use std::fmt::Write as _;

use serde::Serialize;

use super::{RunFigures, SwarmArgs};
use crate::stats::Spread;

/// The targets hold at this size.
const TARGET_SIZE: usize = 10_000;

struct Figure {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    value: fn(&RunFigures) -> f64,
    /// The most the median may be at [`TARGET_SIZE`] agents, on one
    /// control plane.
    target: Option<f64>,
    /// The same over replicas on PostgreSQL (the targets there).
    replicas_target: Option<f64>,
}

/// A figure of one node's restart storm: NaN (not shown) over replicas.
fn single(r: &RunFigures, value: f64) -> f64 {
    if r.replicas > 1 { f64::NAN } else { value }
}

/// A figure of the replicas' kill scenario: NaN (not shown) on one node.
fn replicated(r: &RunFigures, value: f64) -> f64 {
    if r.replicas > 1 { value } else { f64::NAN }
}

const FIGURES: &[Figure] = &[
    Figure {
        key: "rss_per_agent_kib",
        label: "control-plane RSS per connected agent",
        unit: "KiB",
        value: |r| r.rss_per_agent_kib,
        target: Some(48.0),
        replicas_target: Some(48.0),
    },
    Figure {
        key: "idle_cpu_percent",
        label: "idle control-plane CPU, all connected",
        unit: "% core",
        value: |r| r.idle_cpu_percent,
        target: Some(8.0),
        replicas_target: Some(8.0),
    },
    Figure {
        key: "desired_p50_ms",
        label: "submit -> desired state held, p50",
        unit: "ms",
        value: |r| r.desired_p50_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "desired_p99_ms",
        label: "submit -> desired state held, p99",
        unit: "ms",
        value: |r| r.desired_p99_ms,
        target: Some(500.0),
        replicas_target: Some(1500.0),
    },
    Figure {
        key: "desired_max_ms",
        label: "submit -> desired state held, max",
        unit: "ms",
        value: |r| r.desired_max_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "submit_ms",
        label: "  the Submit call (store, schedule), confirm off",
        unit: "ms",
        value: |r| r.submit_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "desired_no_confirm_p50_ms",
        label: "  the same, confirm off: p50",
        unit: "ms",
        value: |r| r.desired_no_confirm_p50_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "desired_no_confirm_p99_ms",
        label: "  the same, confirm off: p99",
        unit: "ms",
        value: |r| r.desired_no_confirm_p99_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "desired_no_confirm_max_ms",
        label: "  the same, confirm off: max",
        unit: "ms",
        value: |r| r.desired_no_confirm_max_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "finished_s",
        label: "submit -> finished, instant agents (confirm on)",
        unit: "s",
        value: |r| r.finished_s,
        target: Some(5.0),
        replicas_target: Some(10.0),
    },
    Figure {
        key: "confirm_resumed_handshakes",
        label: "  TLS handshakes in it: resumed",
        unit: "",
        value: |r| r.confirm_resumed_handshakes,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "confirm_full_handshakes",
        label: "  TLS handshakes in it: full",
        unit: "",
        value: |r| r.confirm_full_handshakes,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "finished_no_confirm_s",
        label: "submit -> finished, instant agents (confirm off)",
        unit: "s",
        value: |r| r.finished_no_confirm_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "storm_s",
        label: "connect storm: restarted -> all connected",
        unit: "s",
        value: |r| r.storm_s,
        target: Some(12.0),
        replicas_target: None,
    },
    Figure {
        key: "storm_down_s",
        label: "  control plane down (SIGTERM -> listening)",
        unit: "s",
        value: |r| r.storm_down_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "storm_refused",
        label: "agents refused during the storm",
        unit: "",
        value: |r| single(r, r.storm_refused as f64),
        target: Some(0.0),
        replicas_target: None,
    },
    Figure {
        key: "storm_dial_failures",
        label: "failed dials during the storm",
        unit: "",
        value: |r| single(r, r.storm_dial_failures as f64),
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "connect_s",
        label: "cold start: all agents connected",
        unit: "s",
        value: |r| r.connect_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "rss_peak_mib",
        label: "control-plane peak RSS",
        unit: "MiB",
        value: |r| r.rss_peak_kib as f64 / 1024.0,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "watch_events",
        label: "watch: events of the rollout per watcher",
        unit: "",
        value: |r| r.watch_events as f64,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "watch_slowest_events_per_s",
        label: "watch: slowest watcher",
        unit: "events/s",
        value: |r| r.watch_slowest_events_per_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "watch_total_events_per_s",
        label: "watch: all watchers together",
        unit: "events/s",
        value: |r| r.watch_total_events_per_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "watch_max_lag_ms",
        label: "watch: largest lag behind the event log",
        unit: "ms",
        value: |r| r.watch_max_lag_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "watch_gaps",
        label: "watch: revisions missed or seen twice, all watchers",
        unit: "",
        value: |r| r.watch_gaps as f64,
        target: Some(0.0),
        replicas_target: Some(0.0),
    },
    Figure {
        key: "ctl_deployments_s",
        label: "procurator-ctl deployments",
        unit: "s",
        value: |r| r.ctl_deployments_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "ctl_deployment_rows_s",
        label: "procurator-ctl deployments ID (every row)",
        unit: "s",
        value: |r| r.ctl_deployment_rows_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "floor_rows_s",
        label: "  floor: ListMachines, every page",
        unit: "s",
        value: |r| r.floor_rows_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "ctl_status_s",
        label: "procurator-ctl status (every agent)",
        unit: "s",
        value: |r| r.ctl_status_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "floor_agents_s",
        label: "  floor: ListAgents, every page",
        unit: "s",
        value: |r| r.floor_agents_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "ctl_watch_s",
        label: "procurator-ctl watch ID (finished, replayed)",
        unit: "s",
        value: |r| r.ctl_watch_s,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "ctl_logs_ms",
        label: "procurator-ctl logs ID MACHINE",
        unit: "ms",
        value: |r| r.ctl_logs_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "floor_log_ms",
        label: "  floor: GetMachineLog",
        unit: "ms",
        value: |r| r.floor_log_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "ctl_machine_ms",
        label: "procurator-ctl machine MACHINE (5+ deployments)",
        unit: "ms",
        value: |r| r.ctl_machine_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "floor_history_ms",
        label: "  floor: GetMachineHistory",
        unit: "ms",
        value: |r| r.floor_history_ms,
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "kill_reconnect_s",
        label: "a replica SIGKILLed mid-rollout: all reconnected",
        unit: "s",
        value: |r| replicated(r, r.kill_reconnect_s),
        target: None,
        replicas_target: Some(10.0),
    },
    Figure {
        key: "kill_refused",
        label: "  agents refused meanwhile",
        unit: "",
        value: |r| replicated(r, r.kill_refused as f64),
        target: None,
        replicas_target: Some(0.0),
    },
    Figure {
        key: "kill_extra_activations",
        label: "  activations beyond one per machine",
        unit: "",
        value: |r| replicated(r, r.kill_activations as f64 - r.agents as f64),
        target: None,
        replicas_target: Some(0.0),
    },
    Figure {
        key: "kill_not_succeeded",
        label: "  machines that did not succeed",
        unit: "",
        value: |r| replicated(r, r.agents as f64 - r.kill_succeeded as f64),
        target: None,
        replicas_target: Some(0.0),
    },
    Figure {
        key: "kill_finished_s",
        label: "  submit -> finished (confirm on)",
        unit: "s",
        value: |r| replicated(r, r.kill_finished_s),
        target: None,
        replicas_target: None,
    },
    Figure {
        key: "kill_repeats",
        label: "  desired states sent again (answered, not rerun)",
        unit: "",
        value: |r| replicated(r, r.kill_repeats as f64),
        target: None,
        replicas_target: None,
    },
];

#[derive(Debug, Serialize)]
pub struct Summary {
    pub agents: usize,
    pub runs: usize,
    pub succeeded_every_run: bool,
    pub figures: Vec<SummaryFigure>,
}

#[derive(Debug, Serialize)]
pub struct SummaryFigure {
    pub key: &'static str,
    pub unit: &'static str,
    #[serde(flatten)]
    pub spread: Option<Spread>,
    pub target: Option<f64>,
    /// Whether the median met the target (at the target size only).
    pub met: Option<bool>,
}

pub fn summarise(runs: &[RunFigures]) -> Summary {
    let agents = runs.first().map_or(0, |r| r.agents);
    let replicated = runs.first().is_some_and(|r| r.replicas > 1);
    let figures = FIGURES
        .iter()
        .map(|f| {
            let samples: Vec<f64> = runs.iter().map(f.value).collect();
            let spread = Spread::of(&samples);
            let target = if replicated {
                f.replicas_target
            } else {
                f.target
            };
            let target = target.filter(|_| agents == TARGET_SIZE);
            SummaryFigure {
                key: f.key,
                unit: f.unit,
                spread,
                target,
                met: target.zip(spread).map(|(t, s)| s.median <= t),
            }
        })
        .collect();
    Summary {
        agents,
        runs: runs.len(),
        succeeded_every_run: runs.iter().all(|r| r.succeeded == r.agents),
        figures,
    }
}

pub fn table(args: &SwarmArgs, summaries: &[Summary]) -> String {
    let mut out = String::new();
    let b = &args.behaviour;
    let _ = writeln!(
        out,
        "procurator-bench swarm: {} watchers, keepalive {} s, copy {} ms, activation {} ms, failure rate {}",
        args.watchers, b.keepalive, b.copy_delay_ms, b.activation_delay_ms, b.failure_rate
    );
    let _ = writeln!(
        out,
        "{} control plane(s) on {}",
        args.replicas,
        match args.database {
            super::Engine::Sqlite => "SQLite",
            super::Engine::Postgres =>
                "PostgreSQL (started by the bench, fsync on; its CPU counted)",
        }
    );
    let _ = writeln!(out, "{}", machine());
    for summary in summaries {
        let _ = writeln!(
            out,
            "\n{} agents, {} runs (min / median / max){}",
            summary.agents,
            summary.runs,
            if summary.succeeded_every_run {
                ""
            } else {
                "; NOT every machine succeeded in every run"
            }
        );
        for (figure, s) in FIGURES.iter().zip(&summary.figures) {
            let Some(spread) = s.spread else { continue };
            let verdict = match (s.target, s.met) {
                (Some(t), Some(met)) => {
                    format!(
                        "  target <= {} {}",
                        number(t),
                        if met { "met" } else { "MISSED" }
                    )
                }
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<50} {:>9} / {:>9} / {:>9} {}{verdict}",
                figure.label,
                number(spread.min),
                number(spread.median),
                number(spread.max),
                figure.unit
            );
        }
    }
    out
}

pub fn one_line(r: &RunFigures) -> String {
    format!(
        "{:.1} KiB/agent, idle {:.1} %, desired p99 {:.0} ms, finished {:.2} s (no confirm {:.2} s), storm {:.2} s, watch lag {:.0} ms, {}/{} succeeded",
        r.rss_per_agent_kib,
        r.idle_cpu_percent,
        r.desired_p99_ms,
        r.finished_s,
        r.finished_no_confirm_s,
        r.storm_s,
        r.watch_max_lag_ms,
        r.succeeded,
        r.agents
    )
}

fn number(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// The machine the figures come from: cores and memory.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    format!(
        "machine: {cores} cores, {:.1} GiB memory",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}
