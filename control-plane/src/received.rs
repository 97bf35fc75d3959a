//! What an agent sends, checked and clipped on receipt, before it reaches
//! the store, the event log or an operator's screen: the paths it says it
//! runs must be store paths, and every string is bounded
//! (procurator_core::limits), so no agent can bloat the store or `status`.

use procurator_core::StorePath;
use procurator_core::limits::{
    MAX_ACTIVATION_LOG_BYTES, MAX_AGENT_STRING_BYTES, MAX_LABELS, MAX_OUTPUT_TAIL_BYTES,
    MAX_REASON_BYTES, clip,
};
use procurator_core::output::BoundedOutput;
use procurator_proto::v1::{ActivationResult, Hello, Progress};

/// A store path, or nothing.
fn system(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    StorePath::parse(path)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Refuses a Hello whose systems are not store paths; clips the rest.
pub fn hello(hello: &mut Hello) -> Result<(), String> {
    system(&hello.current_system).map_err(|e| format!("Hello.current_system: {e}"))?;
    system(&hello.booted_system).map_err(|e| format!("Hello.booted_system: {e}"))?;
    hello.agent_version = clip(&hello.agent_version, MAX_AGENT_STRING_BYTES);
    hello.nix_version = clip(&hello.nix_version, MAX_AGENT_STRING_BYTES);
    if let Some(capacity) = &mut hello.vm_host {
        capacity.vmm = clip(&capacity.vmm, MAX_AGENT_STRING_BYTES);
        capacity.labels.truncate(MAX_LABELS);
        for label in &mut capacity.labels {
            *label = clip(label, MAX_AGENT_STRING_BYTES);
        }
    }
    Ok(())
}

pub fn progress(progress: &mut Progress) {
    progress.message = clip(&progress.message, MAX_REASON_BYTES);
}

/// Clips the texts; a `current_system` that is no store path is dropped.
pub fn result(result: &mut ActivationResult) {
    result.reason = clip(&result.reason, MAX_REASON_BYTES);
    result.reboot_reason = clip(&result.reboot_reason, MAX_AGENT_STRING_BYTES);
    result.output_tail = clip(&result.output_tail, MAX_OUTPUT_TAIL_BYTES);
    if result.output.len() > MAX_ACTIVATION_LOG_BYTES {
        // Its start and its end, like the agent's own log.
        result.output = BoundedOutput::of(&result.output, MAX_ACTIVATION_LOG_BYTES).render();
    }
    if system(&result.current_system).is_err() {
        result.current_system.clear();
    }
}

/// A heartbeat's system, if it is a store path (empty: unchanged).
pub fn heartbeat_system(current_system: String) -> String {
    if system(&current_system).is_ok() {
        current_system
    } else {
        String::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests {
    use super::*;

    const CLOSURE: &str = "/nix/store/0c5mfs2ar4ixwh4z6fmgy8lbh4zn6hsa-nixos-system-worker-1";

    #[test]
    fn a_hello_must_name_store_paths_and_is_clipped() {
        let mut good = Hello {
            current_system: CLOSURE.into(),
            agent_version: "v".repeat(10_000),
            ..Default::default()
        };
        hello(&mut good).unwrap();
        assert!(good.agent_version.len() <= MAX_AGENT_STRING_BYTES);
        let mut bad = Hello {
            current_system: format!("{CLOSURE}\u{1b}[1A\u{1b}[2K"),
            ..Default::default()
        };
        let err = hello(&mut bad).unwrap_err();
        assert!(err.starts_with("Hello.current_system: "), "{err}");
        let mut huge = Hello {
            booted_system: "x".repeat(4_000_000),
            ..Default::default()
        };
        assert!(hello(&mut huge).is_err());
    }

    #[test]
    fn results_and_progress_are_clipped() {
        let mut r = ActivationResult {
            reason: "r".repeat(1 << 20),
            output_tail: "o".repeat(1 << 20),
            output: "first\n".to_owned() + &"line\n".repeat(1 << 20) + "last",
            current_system: "/tmp/evil".into(),
            ..Default::default()
        };
        result(&mut r);
        assert!(r.reason.len() <= MAX_REASON_BYTES);
        assert!(r.output_tail.len() <= MAX_OUTPUT_TAIL_BYTES);
        assert!(
            r.output.len() <= MAX_ACTIVATION_LOG_BYTES,
            "{}",
            r.output.len()
        );
        assert!(r.output.starts_with("first\n") && r.output.ends_with("\nlast"));
        assert!(r.current_system.is_empty());
        let mut p = Progress {
            message: "m".repeat(1 << 20),
            ..Default::default()
        };
        progress(&mut p);
        assert!(p.message.len() <= MAX_REASON_BYTES);
        assert_eq!(heartbeat_system("junk".into()), "");
        assert_eq!(heartbeat_system(CLOSURE.into()), CLOSURE);
    }
}
