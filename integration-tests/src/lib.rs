//! The harness of Procurator's integration tests: it starts the real
//! binaries (`procurator-control-plane`, `procurator-agent`,
//! `procurator-ctl`) against real Nix, real TLS and real SQLite.
//!
//! Every agent runs on a [`TestHost`]: its own Nix store and its own `/run`,
//! in a mount namespace the harness builds around it (docs/interfaces.md,
//! "Test hosts"). Everything a test starts is owned by a guard that stops it
//! on drop, so nothing outlives the test, and readiness is polled with
//! deadlines rather than slept for.
//!
//! The tests run as root (mounts, the Nix store) and need the binaries built
//! first: `cargo build --workspace --bins`.
//!
//! Environment:
//! - `PROCURATOR_BIN_DIR`: where the binaries are (default `target/debug`);
//! - `GRPCURL`: the grpcurl binary (default /usr/local/bin/grpcurl, then PATH);
//! - `PROCURATOR_KEEP_TEST_DIRS`: keep each fleet's directory (logs, stores);
//! - `PROCURATOR_TEST_TRACE`: print every command run, its time and exit code.

pub mod ci;
pub mod control_plane;
pub mod ctl;
pub mod fixture;
pub mod fleet;
pub mod host;
pub mod netns;
pub mod nixenv;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod rogue;
pub mod scenario;
pub mod simulated;
pub mod vms;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub use control_plane::ControlPlane;
pub use ctl::{CmdOutput, Ctl, Grpcurl};
pub use fixture::Fixture;
pub use fleet::{Fleet, FleetOptions};
pub use host::{AgentOptions, TestHost};
pub use nixenv::NixEnv;
pub use pki::{Identity, Pki, SigningKey};
pub use process::Process;

/// The machines of the fixture fleet (`fixtures/fleet/flake.nix`).
pub const MACHINES: [&str; 3] = ["control-plane-1", "worker-1", "worker-2"];

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The fixture flake's directory in the source tree.
pub fn fixture_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fleet")
}

/// The deploy benchmark's fixture flake (`fixtures/bench-fleet`):
/// `machineCount` identical machines `host-01`, `host-02`, … (see
/// [`bench_machines`]), with or without one health check.
pub fn bench_fixture_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bench-fleet")
}

/// The machines of `fixtures/bench-fleet` with `"machineCount": count`.
pub fn bench_machines(count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("host-{i:02}")).collect()
}

/// The `.proto` files, so grpcurl needs no reflection for Procurator's RPCs.
pub fn proto_root() -> PathBuf {
    workspace_root().join("proto/proto")
}

/// Where the binaries under test are: `PROCURATOR_BIN_DIR`, else
/// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROCURATOR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug")
}

/// One of the binaries under test, which must have been built already: the
/// tests start the real programs, not code linked into the test.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` before the integration tests \
             (or point PROCURATOR_BIN_DIR at the directory holding {name})",
            path.display()
        );
    }
    Ok(path)
}

/// The tests mount file systems and write Nix stores: they need root.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the integration tests need root (mount namespaces, Nix stores); run them as root");
    }
    Ok(())
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after
/// `timeout` with `what` in the message. `check` may fail to abort early.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh git commit id (40 hex digits), different on every call.
pub fn commit_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:08x}{:032x}", n ^ std::process::id(), nanos)
}

/// Text without ANSI colour codes: Nix colours its errors even when piped.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = strip_ansi(&text);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Creates a directory and its parents, naming it on failure.
pub fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour() {
        assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m bad"), "error: bad");
    }

    #[test]
    fn commit_ids_are_fresh_and_valid() {
        let (a, b) = (commit_id(), commit_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 40);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
