//! Exponential backoff with full jitter, so a restarted control plane is not
//! hit by every agent at the same instant.

use std::time::Duration;

use rand::Rng;

/// The first retry waits up to this long.
pub const BASE: Duration = Duration::from_millis(500);
/// The agent's default cap on the wait between attempts.
pub const DEFAULT_CAP: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// From dialling to the control plane's `Welcome`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle session sends a heartbeat this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// A refusal that dialling again will not fix, only an operator can (a new
/// certificate, an upgraded agent): retry with [`Backoff::terminal_delay`].
pub fn refusal_is_terminal(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::Unimplemented
    )
}

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The most the next delay can be: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay drawn uniformly from `[0, ceiling]`; the ceiling doubles.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        uniform(rng, Duration::ZERO, ceiling)
    }

    /// For errors only an operator can fix: retry slowly, at the cap
    /// (jittered in its upper half).
    pub fn terminal_delay(&mut self, rng: &mut impl Rng) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        uniform(rng, self.cap / 2, self.cap)
    }

    /// After a connection that stayed up: start over from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn uniform(rng: &mut impl Rng, low: Duration, high: Duration) -> Duration {
    let low = u64::try_from(low.as_micros()).unwrap_or(u64::MAX);
    let high = u64::try_from(high.as_micros()).unwrap_or(u64::MAX).max(low);
    Duration::from_micros(rng.random_range(low..=high))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(BASE, Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        // Many failures later, nothing overflows.
        for _ in 0..100 {
            assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(30));
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), BASE);
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                Backoff {
                    base: BASE,
                    cap: Duration::from_secs(30),
                    attempt: 3,
                }
                .next_delay(&mut rng)
            })
            .collect();
        let ceiling = Duration::from_secs(4);
        assert!(delays.iter().all(|d| *d <= ceiling));
        // Full jitter: both ends of [0, 4s] are reached, not just around 4s.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(3600)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 900);
    }

    #[test]
    fn terminal_errors_wait_near_the_cap() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut backoff = Backoff::new(BASE, Duration::from_secs(30));
        for _ in 0..200 {
            let d = backoff.terminal_delay(&mut rng);
            assert!(
                d >= Duration::from_secs(15) && d <= Duration::from_secs(30),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_cap_below_the_base_is_raised_to_it() {
        let backoff = Backoff::new(BASE, Duration::ZERO);
        assert_eq!(backoff.ceiling(), BASE);
    }
}
