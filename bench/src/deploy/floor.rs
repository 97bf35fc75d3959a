//! The floor: what a deploy costs when a plain script does it. The same
//! `nix copy --from` the agent runs (same nix.conf, same `--option`s, same
//! trusted key, same file:// cache, into the host's own store, inside the
//! host's namespace), then `switch-to-configuration test`, `nix-env --set`
//! and `switch-to-configuration boot`: no control plane, no agent, no
//! health check, no confirmation.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use procurator_integration_tests::{NixEnv, TestHost};
use serde::Serialize;

/// `$1` substituter, `$2` closure, `$3` trusted key. Prints one line
/// `FLOOR T0 T1 T2 T3 T4` (Unix nanoseconds): start, after the copy, after
/// `test`, after `nix-env --set`, after `boot`. The `nix copy` options are
/// those of `procurator_core::nix::Nix::copy_from`; its progress goes to a
/// file, as the agent reads it from a pipe.
const FLOOR_SCRIPT: &str = r#"set -eu
t0=$(date +%s%N)
nix copy --from "$1" "$2" \
  --option trusted-public-keys "$3" \
  --option require-sigs true \
  --option narinfo-cache-negative-ttl 0 \
  --log-format internal-json -v 2>/run/procurator-bench-floor-copy.log
t1=$(date +%s%N)
"$2/bin/switch-to-configuration" test >/dev/null
t2=$(date +%s%N)
nix-env -p /nix/var/nix/profiles/system --set "$2"
t3=$(date +%s%N)
"$2/bin/switch-to-configuration" boot >/dev/null
t4=$(date +%s%N)
echo "FLOOR $t0 $t1 $t2 $t3 $t4"
"#;

/// One host's floor run, in Unix nanoseconds as the script saw them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HostFloor {
    pub start_ns: u128,
    pub copied_ns: u128,
    pub tested_ns: u128,
    pub profile_ns: u128,
    pub booted_ns: u128,
}

impl HostFloor {
    pub fn total_ms(&self) -> f64 {
        ns_to_ms(self.booted_ns.saturating_sub(self.start_ns))
    }
}

/// The floor of one deploy to every host at once.
#[derive(Debug, Clone, Serialize)]
pub struct FloorRun {
    /// First start to last finish over every host, as the scripts timed
    /// themselves (without the namespace set-up around them).
    pub ms: f64,
    /// Wall time around the whole thing, namespace set-up included.
    pub outer_ms: f64,
    /// Per-step times of the slowest host: copy, test, nix-env --set, boot.
    pub steps_ms: Steps,
    pub hosts: Vec<HostFloor>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Steps {
    pub copy: f64,
    pub test: f64,
    pub set_profile: f64,
    pub boot: f64,
}

fn ns_to_ms(ns: u128) -> f64 {
    ns as f64 / 1e6
}

/// Runs the floor script on every `(host, closure)` in parallel.
pub fn run(
    nix: &NixEnv,
    targets: &[(&TestHost, &str)],
    substituter: &str,
    trusted_key: &str,
) -> Result<FloorRun> {
    let started = Instant::now();
    let results: Vec<Result<HostFloor>> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&(host, closure)| {
                scope.spawn(move || run_one(nix, host, closure, substituter, trusted_key))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a floor thread panicked")))
            })
            .collect()
    });
    let outer_ms = started.elapsed().as_secs_f64() * 1e3;
    let hosts = results.into_iter().collect::<Result<Vec<_>>>()?;
    let first = hosts.iter().map(|h| h.start_ns).min().context("no hosts")?;
    let last = hosts
        .iter()
        .map(|h| h.booted_ns)
        .max()
        .context("no hosts")?;
    let slowest = hosts
        .iter()
        .max_by(|a, b| a.total_ms().total_cmp(&b.total_ms()))
        .context("no hosts")?;
    let steps_ms = Steps {
        copy: ns_to_ms(slowest.copied_ns.saturating_sub(slowest.start_ns)),
        test: ns_to_ms(slowest.tested_ns.saturating_sub(slowest.copied_ns)),
        set_profile: ns_to_ms(slowest.profile_ns.saturating_sub(slowest.tested_ns)),
        boot: ns_to_ms(slowest.booted_ns.saturating_sub(slowest.profile_ns)),
    };
    Ok(FloorRun {
        ms: ns_to_ms(last.saturating_sub(first)),
        outer_ms,
        steps_ms,
        hosts,
    })
}

fn run_one(
    nix: &NixEnv,
    host: &TestHost,
    closure: &str,
    substituter: &str,
    trusted_key: &str,
) -> Result<HostFloor> {
    let out = host
        .run(
            nix,
            "sh",
            &[
                "-c",
                FLOOR_SCRIPT,
                "floor",
                substituter,
                closure,
                trusted_key,
            ],
        )
        .with_context(|| format!("running the floor script on {}", host.name()))?;
    if out.code != Some(0) {
        let log = std::fs::read_to_string(host.host_path("/run/procurator-bench-floor-copy.log"))
            .unwrap_or_default();
        bail!(
            "the floor script failed on {}: {out}\n--- nix copy's log\n{}",
            host.name(),
            procurator_integration_tests::strip_ansi(&log)
        );
    }
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("FLOOR "))
        .with_context(|| {
            format!(
                "the floor script printed no times on {}: {out}",
                host.name()
            )
        })?;
    let t: Vec<u128> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad times from the floor script: {line:?}"))?;
    let [start_ns, copied_ns, tested_ns, profile_ns, booted_ns] = t[..] else {
        bail!(
            "the floor script printed {} times, not 5: {line:?}",
            t.len()
        );
    };
    let current = host.current_system()?;
    if current.as_deref() != Some(closure) {
        bail!(
            "after the floor script {} runs {current:?}, not {closure}",
            host.name()
        );
    }
    Ok(HostFloor {
        start_ns,
        copied_ns,
        tested_ns,
        profile_ns,
        booted_ns,
    })
}
