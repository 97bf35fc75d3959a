//! The deploy benchmark's table, its breakdown of where the time goes, and
//! its JSON.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use super::{Case, DeployArgs, Mode};
use crate::stats::Spread;

/// One host without health checks: Procurator within this many times the floor.
pub const ONE_HOST_LIMIT: f64 = 2.0;
/// Ten (any more than one) hosts: within this many times one host.
pub const MANY_HOSTS_LIMIT: f64 = 1.5;

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared, e.g. "procurator / floor".
    pub what: String,
    pub value: f64,
    pub limit: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub hosts: u32,
    pub mode: &'static str,
    pub floor_ms: Option<Spread>,
    pub floor_outer_ms: Option<Spread>,
    pub procurator_ms: Option<Spread>,
    pub procurator_server_ms: Option<Spread>,
    pub submit_ms: Option<Spread>,
    /// Median Procurator over median floor.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    /// For more than one host: the floor's median over the 1-host floor's
    /// median, the same work on the same CPUs without Procurator.
    pub floor_vs_one_host: Option<f64>,
}

fn spread(values: impl Iterator<Item = f64>) -> Option<Spread> {
    Spread::of(&values.collect::<Vec<_>>())
}

fn median(s: &Option<Spread>) -> Option<f64> {
    s.map(|s| s.median)
}

pub fn summarize(cases: &[Case]) -> Vec<Summary> {
    let procurator_median = |hosts: u32, mode: Mode| {
        cases
            .iter()
            .find(|c| c.hosts == hosts && c.mode == mode)
            .and_then(|c| median(&spread(c.procurator.iter().map(|p| p.ms))))
    };
    let floor_median = |hosts: u32, mode: Mode| {
        cases
            .iter()
            .find(|c| c.hosts == hosts && c.mode == mode)
            .and_then(|c| median(&spread(c.floor.iter().map(|f| f.ms))))
    };
    cases
        .iter()
        .map(|c| {
            let floor_ms = spread(c.floor.iter().map(|f| f.ms));
            let procurator_ms = spread(c.procurator.iter().map(|p| p.ms));
            let ratio = match (median(&procurator_ms), median(&floor_ms)) {
                (Some(p), Some(f)) if f > 0.0 => Some(p / f),
                _ => None,
            };
            let target = if c.hosts == 1 {
                match (c.mode, ratio) {
                    (Mode::NoHealthCheck, Some(r)) => Some(Target {
                        what: "procurator / floor".into(),
                        value: r,
                        limit: ONE_HOST_LIMIT,
                        met: r <= ONE_HOST_LIMIT,
                    }),
                    _ => None,
                }
            } else {
                match (median(&procurator_ms), procurator_median(1, c.mode)) {
                    (Some(many), Some(one)) if one > 0.0 => {
                        let r = many / one;
                        Some(Target {
                            what: format!("procurator {} hosts / 1 host", c.hosts),
                            value: r,
                            limit: MANY_HOSTS_LIMIT,
                            met: r <= MANY_HOSTS_LIMIT,
                        })
                    }
                    _ => None,
                }
            };
            let floor_vs_one_host = match (c.hosts, median(&floor_ms), floor_median(1, c.mode)) {
                (2.., Some(many), Some(one)) if one > 0.0 => Some(many / one),
                _ => None,
            };
            Summary {
                floor_vs_one_host,
                hosts: c.hosts,
                mode: c.mode.label(),
                floor_ms,
                floor_outer_ms: spread(c.floor.iter().map(|f| f.outer_ms)),
                procurator_ms,
                procurator_server_ms: spread(c.procurator.iter().map(|p| p.server_ms)),
                submit_ms: spread(c.procurator.iter().map(|p| p.submit_ms)),
                ratio,
                target,
            }
        })
        .collect()
}

fn three(s: &Option<Spread>) -> String {
    match s {
        Some(s) => format!("{:7.1} {:7.1} {:7.1}", s.min, s.median, s.max),
        None => format!("{:>7} {:>7} {:>7}", "-", "-", "-"),
    }
}

pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<15}  {:^23}  {:^23}  {:>7}  {:>6}  {:<36}  verdict",
        "hosts",
        "mode",
        "floor ms min/med/max",
        "procurator ms min/med/max",
        "server",
        "ratio",
        "target"
    );
    for s in summaries {
        let ratio = s.ratio.map_or("-".to_owned(), |r| format!("{r:.2}x"));
        let server = median(&s.procurator_server_ms).map_or("-".to_owned(), |m| format!("{m:.0}"));
        let (target, verdict) = match &s.target {
            Some(t) => (
                format!("{} = {:.2}x <= {:.1}x", t.what, t.value, t.limit),
                if t.met { "met" } else { "missed" },
            ),
            None if s.hosts > 1 => ("(needs a 1-host run)".to_owned(), "-"),
            None => ("(none)".to_owned(), "-"),
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<15}  {}  {}  {:>7}  {:>6}  {:<36}  {}",
            s.hosts,
            s.mode,
            three(&s.floor_ms),
            three(&s.procurator_ms),
            server,
            ratio,
            target,
            verdict
        );
    }
    for s in summaries {
        if let Some(r) = s.floor_vs_one_host {
            let _ = writeln!(
                out,
                "context: {} hosts, {}: the floor takes {r:.2}x its 1-host time on the same {} CPU(s)",
                s.hosts,
                s.mode,
                cpus()
            );
        }
    }
    out.push_str(
        "floor: the plain script (nix copy + switch-to-configuration test + nix-env --set + \
         switch-to-configuration boot), on every host at once, timed by the script itself.\n\
         procurator: just before Submit to the finishing event on the Watch stream; server: the \
         control plane's finished_at - created_at (median).",
    );
    out
}

/// The machine states in the order a deployment goes through them, each
/// with the name of the phase that runs from when a machine reaches it
/// until it reaches the next state it reports.
const PHASES: [(&str, &str); 7] = [
    ("SENT", "sent -> copy starts"),
    ("COPYING", "copy"),
    ("ACTIVATING", "switch test"),
    ("CHECKING", "health check"),
    ("CONFIRMING", "confirm (new connection)"),
    ("COMMITTING", "commit (nix-env --set + switch boot)"),
    ("SUCCEEDED", ""),
];

/// Medians of each phase: Procurator's from the Watch events' server
/// timestamps (the last machine to reach each state; millisecond
/// resolution), the floor's from the script's own clock.
pub fn breakdown(cases: &[Case]) -> String {
    let mut out = String::from("where the time goes (medians, ms):\n");
    for c in cases {
        let _ = writeln!(out, "  {} host(s), {}:", c.hosts, c.mode.label());
        let floor_step = |f: fn(&super::floor::Steps) -> f64| {
            median(&spread(c.floor.iter().map(|r| f(&r.steps_ms)))).unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            out,
            "    floor:      copy {:.1}, switch test {:.1}, nix-env --set {:.1}, switch boot {:.1}",
            floor_step(|s| s.copy),
            floor_step(|s| s.test),
            floor_step(|s| s.set_profile),
            floor_step(|s| s.boot),
        );
        // Phase name -> its duration in each run.
        let mut phases: Vec<(&str, Vec<f64>)> = vec![("submit -> sent", Vec::new())];
        phases.extend(
            PHASES
                .iter()
                .filter(|(_, n)| !n.is_empty())
                .map(|(_, n)| (*n, Vec::new())),
        );
        for p in &c.procurator {
            let mut from = ("submit -> sent", 0);
            for (state, name) in PHASES {
                let Some(&at) = p.milestones.get(state) else {
                    continue;
                };
                if let Some((_, v)) = phases.iter_mut().find(|(n, _)| *n == from.0) {
                    v.push((at - from.1) as f64);
                }
                from = (name, at);
            }
        }
        let mut parts: Vec<String> = phases
            .iter()
            .filter_map(|(name, v)| Some(format!("{name} {:.0}", median(&Spread::of(v))?)))
            .collect();
        let tail: Vec<f64> = c
            .procurator
            .iter()
            .filter_map(|p| Some(p.server_ms - *p.milestones.get("SUCCEEDED")? as f64))
            .collect();
        if let Some(m) = median(&Spread::of(&tail)) {
            parts.push(format!("succeeded -> deployment finished {m:.0}"));
        }
        let watch_lag: Vec<f64> = c.procurator.iter().map(|p| p.ms - p.server_ms).collect();
        if let Some(m) = median(&Spread::of(&watch_lag)) {
            parts.push(format!("client-side extra (submit RPC, watch) {m:.0}"));
        }
        let _ = writeln!(out, "    procurator: {}", parts.join(", "));
    }
    out
}

pub fn json(args: &DeployArgs, cases: &[Case], summaries: &[Summary]) -> Value {
    let cases: Vec<Value> = cases
        .iter()
        .zip(summaries)
        .map(|(c, s)| {
            json!({
                "hosts": c.hosts,
                "mode": c.mode.key(),
                "floor_ms": c.floor.iter().map(|f| f.ms).collect::<Vec<_>>(),
                "floor_outer_ms": c.floor.iter().map(|f| f.outer_ms).collect::<Vec<_>>(),
                "procurator_ms": c.procurator.iter().map(|p| p.ms).collect::<Vec<_>>(),
                "procurator_server_ms": c.procurator.iter().map(|p| p.server_ms).collect::<Vec<_>>(),
                "floor_runs": c.floor,
                "procurator_runs": c.procurator,
                "summary": s,
            })
        })
        .collect();
    json!({
        "benchmark": "deploy",
        "runs": args.runs,
        "hosts": args.hosts,
        "bin_dir": procurator_integration_tests::bin_dir(),
        "cpus": cpus(),
        "targets": {
            "one_host_no_health_check_vs_floor": ONE_HOST_LIMIT,
            "many_hosts_vs_one_host": MANY_HOSTS_LIMIT,
        },
        "cases": cases,
    })
}

/// CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
