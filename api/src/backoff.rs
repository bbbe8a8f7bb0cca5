//! Retry delays: exponential with a cap and "full jitter" (AWS Architecture Blog,
//! "Exponential Backoff and Jitter"): after the n-th failure in a row (n = 0 for the
//! first) the delay is drawn uniformly from `[0, min(cap, base * 2^n)]`, so clients that
//! failed together do not retry in step. A success resets the count.
//!
//! One implementation for every retry loop (registry sources, the agent's control
//! connection and renewals) and for the deterministic schedule of the agent's endpoint
//! ejection ([`bound`]). Not a library: the `backoff` crate is unmaintained, and
//! `backon`'s jitter adds a random amount to the delay instead of drawing the whole
//! delay (it is not full jitter).

use std::time::Duration;

/// `min(cap, base * 2^n)`: the largest delay after the n-th failure in a row (0-based).
pub fn bound(base: Duration, cap: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// A number in `[0, 1]` that differs between calls and processes. Jitter needs no more
/// than this: std's randomly keyed SipHash over a counter, no random-number crate.
pub fn unit_random() -> f64 {
    use std::hash::BuildHasher as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let n = DRAWS.fetch_add(1, Ordering::Relaxed);
    let bits = std::collections::hash_map::RandomState::new().hash_one(n);
    // 53 random bits → [0, 1]
    (bits >> 11) as f64 / ((1u64 << 53) - 1) as f64
}

/// Exponential backoff with full jitter between 0 and `min(cap, base * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff whose first bound is `base` (at most `cap`), doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// Forgets the failures in a row: the next bound is `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The bound the next delay is drawn below.
    pub fn current_bound(&self) -> Duration {
        bound(self.base, self.cap, self.failures)
    }

    /// The delay before the next attempt, drawn uniformly from `[0, bound]`; the bound
    /// doubles (up to the cap) for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(unit_random())
    }

    /// [`Self::next_delay`] with the random draw `r` in `[0, 1]` given (tests).
    pub fn next_delay_with(&mut self, r: f64) -> Duration {
        let b = self.current_bound();
        self.failures = self.failures.saturating_add(1);
        b.mul_f64(r.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bound_doubles_from_base_and_stops_at_the_cap() {
        let b: Vec<_> = (0..6).map(|n| bound(100 * MS, 1000 * MS, n)).collect();
        assert_eq!(b, [100, 200, 400, 800, 1000, 1000].map(|m| m * MS));
        // No overflow far out.
        assert_eq!(bound(100 * MS, 30_000 * MS, 200), 30_000 * MS);
        assert_eq!(bound(Duration::MAX, 5 * MS, 3), 5 * MS);
        // A base above the cap is capped from the first failure.
        assert_eq!(bound(900 * MS, 500 * MS, 0), 500 * MS);
    }

    #[test]
    fn delays_are_full_jitter_below_the_growing_bound_and_reset() {
        let mut b = Backoff::new(100 * MS, 350 * MS);
        // The extremes of the draw: 0 and the bound itself.
        assert_eq!(b.next_delay_with(0.0), Duration::ZERO);
        assert_eq!(b.next_delay_with(1.0), 200 * MS);
        assert_eq!(b.next_delay_with(0.5), 175 * MS);
        assert_eq!(b.current_bound(), 350 * MS);
        b.reset();
        assert_eq!(b.current_bound(), 100 * MS);
        // Real draws stay within [0, bound].
        for _ in 0..50 {
            let bound = b.current_bound();
            let d = b.next_delay();
            assert!(d <= bound, "{d:?} above {bound:?}");
        }
    }

    #[test]
    fn draws_spread_over_the_whole_range() {
        // Full jitter, not "half the bound plus jitter": many draws below one bound have
        // a mean near half of it and reach both ends.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let draws: Vec<f64> = (0..400).map(|_| b.next_delay().as_secs_f64()).collect();
        let mean = draws.iter().sum::<f64>() / 400.0;
        assert!((0.35..0.65).contains(&mean), "mean {mean}");
        assert!(draws.iter().any(|d| *d < 0.25), "no draw below a quarter");
        assert!(
            draws.iter().any(|d| *d > 0.75),
            "no draw above three quarters"
        );
    }
}
