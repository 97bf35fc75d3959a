//! Every agent holds one connection, so the control plane's open-file limit
//! is its fleet size. Outside the NixOS module (which sets LimitNOFILE) the
//! soft limit is often 1,024: raise it to the hard limit at start, and say
//! what it allows.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for the store, listeners, logs and handshakes in flight.
pub const RESERVED: u64 = 256;

/// Raises the soft open-file limit to the hard one; returns the limit now
/// in force.
pub fn raise_limit() -> u64 {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return 0;
        }
    };
    let now = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    tracing::info!(
        open_files = now,
        agents = now.saturating_sub(RESERVED),
        "open-file limit; one per connected agent (raise LimitNOFILE or `ulimit -Hn` for more)"
    );
    now
}
