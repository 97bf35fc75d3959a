//! The blueprint's health checks: `sh -c <command>`, retried every interval
//! until it exits 0 or the check's time runs out.

use std::time::Duration;

use procurator_core::nix::{RunError, run_captured};
use procurator_proto::v1::HealthCheck;
use tokio::process::Command;
use tokio::time::Instant;

/// Used when the blueprint gives no timeout (0).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries never come faster than this, whatever the blueprint says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// One check as the agent runs it (and as the journal keeps it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub command: String,
    /// From the first attempt's start to the end of the last one.
    pub timeout: Duration,
    /// From the end of one attempt to the start of the next.
    pub interval: Duration,
}

impl Check {
    pub fn from_proto(check: &HealthCheck) -> Self {
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        Self {
            command: check.command.clone(),
            timeout: if check.timeout_secs == 0 {
                DEFAULT_TIMEOUT
            } else {
                secs(check.timeout_secs)
            },
            interval: secs(check.interval_secs).max(MIN_INTERVAL),
        }
    }
}

/// A check that never passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// One line: which check, how often it was tried, how the last attempt ended.
    pub reason: String,
    /// The last attempt's output.
    pub tail: String,
}

/// One attempt at a check, as `run_check` tells of it.
#[derive(Debug)]
pub struct Attempt<'a> {
    pub n: u32,
    pub passed: bool,
    /// How it ended, e.g. `exit status: 1`.
    pub how: &'a str,
    /// Its whole output, bounded.
    pub output: &'a str,
}

/// Runs `check` until it passes (`Ok(attempts)`) or its time is up.
/// `on_attempt` hears about each attempt, the passing one too.
pub async fn run_check(
    check: &Check,
    tail_lines: usize,
    mut on_attempt: impl FnMut(&Attempt<'_>),
) -> Result<u32, CheckFailure> {
    let deadline = Instant::now() + check.timeout;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut command = Command::new("sh");
        command.arg("-c").arg(&check.command);
        let (how, tail, output, passed) =
            match run_captured(command, Some(remaining), tail_lines).await {
                Ok(out) => {
                    let passed = out.success();
                    (out.status.to_string(), out.tail, out.output, passed)
                }
                Err(RunError::TimedOut { tail, output, .. }) => (
                    "still running when the time was up".to_owned(),
                    tail,
                    output,
                    false,
                ),
                // `sh` itself is missing: retrying cannot help.
                Err(e @ (RunError::Spawn { .. } | RunError::Wait { .. })) => {
                    return Err(failure(check, attempt, &e.to_string(), String::new()));
                }
            };
        on_attempt(&Attempt {
            n: attempt,
            passed,
            how: &how,
            output: &output,
        });
        if passed {
            return Ok(attempt);
        }
        if Instant::now() + check.interval >= deadline {
            return Err(failure(check, attempt, &how, tail));
        }
        tokio::time::sleep(check.interval).await;
    }
}

fn failure(check: &Check, attempts: u32, how: &str, tail: String) -> CheckFailure {
    let tries = if attempts == 1 {
        "1 attempt".to_owned()
    } else {
        format!("{attempts} attempts")
    };
    CheckFailure {
        reason: format!(
            "health check `{}` did not pass within {}s ({tries}; last: {how})",
            check.command,
            check.timeout.as_secs_f64()
        ),
        tail,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn check(command: &str, timeout_ms: u64, interval_ms: u64) -> Check {
        Check {
            command: command.into(),
            timeout: Duration::from_millis(timeout_ms),
            interval: Duration::from_millis(interval_ms),
        }
    }

    #[tokio::test]
    async fn a_passing_check_passes_at_once() {
        let attempts = run_check(&check("true", 5000, 50), 5, |_| {})
            .await
            .unwrap();
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn a_check_is_retried_until_it_passes() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("n");
        // Fails twice, then passes: counts its attempts in a file.
        let script = format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo attempt $n; [ $n -ge 3 ]",
            c = counter.display()
        );
        let mut attempts_seen = Vec::new();
        let attempts = run_check(&check(&script, 10_000, 20), 5, |a| {
            attempts_seen.push((a.n, a.passed, a.how.to_owned(), a.output.to_owned()))
        })
        .await
        .unwrap();
        assert_eq!(attempts, 3);
        let status = |code| format!("exit status: {code}");
        assert_eq!(
            attempts_seen,
            vec![
                (1, false, status(1), "attempt 1".to_owned()),
                (2, false, status(1), "attempt 2".to_owned()),
                (3, true, status(0), "attempt 3".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_check_gives_up_after_its_timeout_with_the_last_output() {
        let started = Instant::now();
        let mut seen = 0;
        let failure = run_check(&check("echo nope; exit 7", 300, 50), 5, |_| seen += 1)
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        assert!(seen >= 2, "{seen}");
        assert_eq!(failure.tail, "nope");
        assert!(
            failure
                .reason
                .starts_with("health check `echo nope; exit 7` did not pass within 0.3s ("),
            "{}",
            failure.reason
        );
        assert!(
            failure.reason.ends_with("attempts; last: exit status: 7)"),
            "{}",
            failure.reason
        );
    }

    #[tokio::test]
    async fn a_hanging_attempt_is_bounded_by_the_time_left() {
        let started = Instant::now();
        let failure = run_check(&check("echo started; sleep 30", 300, 50), 5, |_| {})
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(
            failure
                .reason
                .contains("1 attempt; last: still running when the time was up"),
            "{}",
            failure.reason
        );
        assert_eq!(failure.tail, "started");
    }

    #[test]
    fn blueprint_values_get_sane_floors() {
        let c = Check::from_proto(&HealthCheck {
            command: "x".into(),
            timeout_secs: 0,
            interval_secs: 0,
        });
        assert_eq!((c.timeout, c.interval), (DEFAULT_TIMEOUT, MIN_INTERVAL));
        let c = Check::from_proto(&HealthCheck {
            command: "x".into(),
            timeout_secs: 60,
            interval_secs: 10,
        });
        assert_eq!(
            (c.timeout, c.interval),
            (Duration::from_secs(60), Duration::from_secs(10))
        );
    }
}
