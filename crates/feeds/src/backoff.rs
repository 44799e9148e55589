//! Reconnect delays for upstream connectors: exponential growth with full jitter.
//!
//! After the `n`th consecutive failure the delay is drawn uniformly from `[0, min(max,
//! initial · 2ⁿ)]` ("full jitter", as in the AWS architecture note on backoff). The jitter
//! matters more than the growth: when an upstream restarts, every gateway that lost it
//! reconnects at a different moment instead of all at once. A connection that stayed up for
//! a while proves the upstream healthy again, so [`Backoff::reset`] starts the series over.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Consecutive failures since the last reset.
    failures: u32,
}

impl Backoff {
    /// A series starting at `initial` and capped at `max` (both at least 1 ms).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), failures: 0 }
    }

    /// The ceiling of the next delay: `min(max, initial · 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        // Past 2^20 the product exceeds any sane `max`; capping the exponent avoids overflow.
        let factor = 1u32 << self.failures.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    /// Consecutive failures recorded since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets past failures: the next delay is drawn from `[0, initial]` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_capped_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings = [100, 200, 400, 800, 1_600, 2_000, 2_000];
        for ceiling in ceilings {
            assert_eq!(b.ceiling(), Duration::from_millis(ceiling));
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(ceiling), "{d:?} above {ceiling} ms");
        }
        assert_eq!(b.failures(), 7);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 10, "50 draws gave only {} distinct delays", seen.len());
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        for _ in 0..1_000 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
