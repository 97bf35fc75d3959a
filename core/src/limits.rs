//! Every limit on what crosses a trust boundary, in one table (DESIGN.md
//! invariant 10). `procurator-ctl validate`, the control plane's Submit and
//! the agent all check deployment.json against these through
//! [`crate::DeploymentArtifact::from_json`]; docs/interfaces.md lists them.
//! Each count is checked before anything proportional to it is built.

/// deployment.json, in bytes: refused before it is parsed.
pub const MAX_ARTIFACT_BYTES: usize = 4 * 1024 * 1024;
/// Machines in one blueprint.
pub const MAX_MACHINES: usize = 20_000;
/// VM instances of one machine (`replicas`).
pub const MAX_REPLICAS: u32 = 1_024;
/// Rows of one deployment: machines and VM instances together.
pub const MAX_ROWS: usize = 50_000;
/// Waves of one rollout.
pub const MAX_WAVES: usize = 1_000;
/// Health checks of one machine.
pub const MAX_HEALTH_CHECKS: usize = 64;
/// One health check's command, in bytes.
pub const MAX_CHECK_COMMAND_BYTES: usize = 16 * 1024;
/// Labels of one machine (and selectors of one wave).
pub const MAX_LABELS: usize = 64;
/// Any other string of the artifact (role, addr, backend, sshUser, a label,
/// a wave's name), in bytes.
pub const MAX_STRING_BYTES: usize = 256;
/// One signed statement (crate::intent), in bytes.
pub const MAX_STATEMENT_BYTES: usize = 256 * 1024;

/// What an agent reports, in bytes, kept at most: versions, a VMM's name, a
/// VM host's labels.
pub const MAX_AGENT_STRING_BYTES: usize = 256;
/// A reason or progress message an agent reports.
pub const MAX_REASON_BYTES: usize = 4 * 1024;
/// The output tail of a failed command an agent reports.
pub const MAX_OUTPUT_TAIL_BYTES: usize = 16 * 1024;

/// The output one machine keeps of one deployment (every command it ran:
/// copy, switches, health checks, rollback) and sends with its result: its
/// start and end within this, the middle left out.
pub const MAX_ACTIVATION_LOG_BYTES: usize = 256 * 1024;
/// Deployments an agent keeps the output of, newest first.
pub const KEPT_ACTIVATION_LOGS: usize = 20;

/// `--on` selectors of one deployment.
pub const MAX_SELECTORS: usize = 64;

/// Rows of one page of a list RPC (`ListMachines`, `ListAgents`,
/// `ListRunning`) when the caller does not say, and at most.
pub const DEFAULT_PAGE_ROWS: u32 = 500;
pub const MAX_PAGE_ROWS: u32 = 1_000;
/// A page ends before its encoded rows pass this (it holds at least one),
/// well inside gRPC's default 4 MiB message limit.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// Rows a filtered list reads for one page at most: a pattern that matches
/// little returns a short page, with a token to go on, not a long scan.
pub const MAX_PAGE_SCAN_ROWS: usize = 10_000;
/// What a client accepts in one message: a page, with room for one row
/// near its largest.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// `text` cut to at most `max` bytes on a character boundary, with a marker
/// saying how much was cut; unchanged when it fits. Never longer than `max`:
/// when even the marker does not fit, the cut text is all there is room for.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let marker = format!(" … [{} bytes cut]", text.len());
    let (mut end, marker) = match max.checked_sub(marker.len()) {
        Some(room) => (room, marker.as_str()),
        None => (max, ""),
    };
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

/// Every limit, named as docs/interfaces.md names it, for `--help`-style
/// listings and the docs test.
pub const TABLE: [(&str, u64); 13] = [
    ("artifact bytes", MAX_ARTIFACT_BYTES as u64),
    ("machines per blueprint", MAX_MACHINES as u64),
    ("replicas per machine", MAX_REPLICAS as u64),
    (
        "rows (machines and VM instances) per deployment",
        MAX_ROWS as u64,
    ),
    ("waves per rollout", MAX_WAVES as u64),
    ("health checks per machine", MAX_HEALTH_CHECKS as u64),
    (
        "bytes per health-check command",
        MAX_CHECK_COMMAND_BYTES as u64,
    ),
    ("labels per machine or wave selector", MAX_LABELS as u64),
    ("bytes per other string", MAX_STRING_BYTES as u64),
    ("bytes per signed statement", MAX_STATEMENT_BYTES as u64),
    ("JSON nesting depth", 128),
    (
        "bytes of output per machine and deployment",
        MAX_ACTIVATION_LOG_BYTES as u64,
    ),
    (
        "deployments whose output an agent keeps",
        KEPT_ACTIVATION_LOGS as u64,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_whole_characters_and_says_so() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let cut = clip(&long, 64);
        assert!(cut.len() <= 64, "{}", cut.len());
        assert!(cut.ends_with(" … [200 bytes cut]"), "{cut}");
        assert!(cut.starts_with("éé"));
    }

    /// Found by the `names` fuzz target: a limit smaller than the marker
    /// gave the marker alone, longer than the limit.
    #[test]
    fn clipping_to_less_than_the_marker_stays_within_the_limit() {
        assert_eq!(clip("x", 0), "");
        assert_eq!(clip(&"x".repeat(300), 10), "x".repeat(10));
        assert_eq!(clip("éé", 3), "é");
    }
}
