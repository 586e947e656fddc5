//! Backoff, the one schedule outboxd waits by. How long an event waits after a failed
//! attempt is a pure function of the attempt count and a jitter value passed in
//! ([`backoff_delay`]), so the persisted schedule is tested without a clock or a random
//! source. Loops that try again in process (the listener's reconnects, a failed claim, an
//! outcome write while the database is away, a partition ATTACH that waited for a lock)
//! use the same schedule through [`Backoff`].

use std::time::Duration;

/// Exponential backoff with "equal jitter": attempt `n` (1-based, as counted at claim)
/// waits between half and all of `base * 2^(n-1)`, capped at `max`. The ranges of
/// consecutive attempts touch but do not overlap, so delays never shrink as attempts grow,
/// while the random half spreads out events that failed together. At the cap the delay
/// is `max`.
/// `jitter` is in `[0, 1)`.
pub fn backoff_delay(attempts: i32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempts.clamp(1, 64) - 1;
    let full = base.as_secs_f64() * 2f64.powi(exponent);
    let jitter = jitter.clamp(0.0, 1.0);
    // Capped after the jitter, so the last uncapped delays stay below the capped ones.
    Duration::from_secs_f64((full / 2.0 + full / 2.0 * jitter).min(max.as_secs_f64()))
}

/// The delay before the next attempt: the backoff, or a destination's own earliest time
/// (e.g. a `Retry-After`) when that is later, never more than `max`.
pub fn next_attempt_delay(
    backoff: Duration,
    not_before: Option<Duration>,
    max: Duration,
) -> Duration {
    backoff.max(not_before.unwrap_or_default()).min(max)
}

/// A jitter value from the thread's random source.
pub fn random_jitter() -> f64 {
    rand::random::<f64>()
}

/// A run of failures of one in-process loop: each failure in a row waits longer
/// ([`backoff_delay`] with random jitter), a success starts over.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: i32,
}

impl Backoff {
    /// The first failure waits between `min / 2` and `min`; the wait doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// One more failure in a row: how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        backoff_delay(self.failures, self.min, self.max, random_jitter())
    }

    /// A success: the next failure waits the shortest time again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> i32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn delays_double_and_stay_within_jitter_bounds() {
        let cases = [
            (1, 0.5, 1.0),
            (2, 1.0, 2.0),
            (3, 2.0, 4.0),
            (4, 4.0, 8.0),
            (9, 128.0, 256.0),
        ];
        for (attempts, low, high) in cases {
            assert_eq!(
                backoff_delay(attempts, BASE, MAX, 0.0).as_secs_f64(),
                low,
                "attempt {attempts}"
            );
            let top = backoff_delay(attempts, BASE, MAX, 0.999_999).as_secs_f64();
            assert!(top < high && top > high * 0.99, "attempt {attempts}: {top}");
        }
    }

    #[test]
    fn delays_never_shrink_whatever_the_jitter() {
        for attempts in 1..30 {
            let worst_next = backoff_delay(attempts + 1, BASE, MAX, 0.0);
            let best_this = backoff_delay(attempts, BASE, MAX, 0.999_999);
            assert!(worst_next >= best_this, "attempt {attempts}");
        }
    }

    #[test]
    fn delays_are_capped() {
        assert_eq!(backoff_delay(50, BASE, MAX, 0.0), MAX);
        assert!(backoff_delay(1000, BASE, MAX, 0.999) <= MAX);
        assert!(backoff_delay(i32::MAX, BASE, MAX, 1.0) <= MAX);
        assert_eq!(backoff_delay(0, BASE, MAX, 0.0), Duration::from_millis(500));
    }

    #[test]
    fn a_destinations_earliest_time_wins_up_to_the_cap() {
        let b = Duration::from_secs(1);
        assert_eq!(next_attempt_delay(b, None, MAX), b);
        assert_eq!(
            next_attempt_delay(b, Some(Duration::from_secs(2)), MAX),
            Duration::from_secs(2)
        );
        assert_eq!(
            next_attempt_delay(b, Some(Duration::from_secs(900)), MAX),
            MAX
        );
    }

    #[test]
    fn a_run_of_failures_waits_longer_and_a_success_starts_over() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.failed();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let second = backoff.failed();
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
        for _ in 0..20 {
            assert!(backoff.failed() <= Duration::from_secs(1));
        }
        assert_eq!(backoff.failures(), 22);
        backoff.succeeded();
        assert!(backoff.failed() <= Duration::from_millis(100));
    }

    mod properties {
        use super::super::backoff_delay;
        use proptest::prelude::*;
        use std::time::Duration;

        proptest! {
            #[test]
            fn delays_stay_within_the_cap_and_never_shrink(
                attempts in 1i32..200,
                jitter_a in 0.0f64..1.0,
                jitter_b in 0.0f64..1.0,
                base_ms in 1u64..5_000,
                cap_factor in 1u64..1_000,
            ) {
                let base = Duration::from_millis(base_ms);
                let max = base * cap_factor as u32;
                let this = backoff_delay(attempts, base, max, jitter_a);
                let next = backoff_delay(attempts + 1, base, max, jitter_b);
                prop_assert!(this <= max && next <= max);
                prop_assert!(next >= this || next == max, "{:?} then {:?}", this, next);
                prop_assert!(this >= (base / 2).min(max));
            }
        }
    }
}
