//! What Procurator's binaries share: the deployment artifact, validated names
//! and store paths, identities and TLS, logging, the `nix` CLI wrapper.

// A test that cannot set up should panic.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod artifact;
pub mod atomic_file;
pub mod backoff;
pub mod certificate;
pub mod control_planes;
pub mod identity;
pub mod intent;
pub mod limits;
pub mod names;
pub mod nix;
pub mod output;
pub mod pattern;
pub mod pki;
pub mod sd_notify;
pub mod store_path;
pub mod telemetry;
pub mod tls;

pub use artifact::DeploymentArtifact;
pub use identity::{Identity, Role};
pub use names::{DeploymentId, MachineName};
pub use store_path::StorePath;

/// The agent protocol version this build speaks. The control plane accepts
/// agents speaking `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`.
pub const PROTOCOL_VERSION: u32 = 1;
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An error and its sources, `a: b: c`: transport errors say the useful
/// part (refused, a certificate) in their sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
