//! The reconnect backoff every long-lived client of eastguard uses (the xDS stream, the SPIFFE
//! Workload API stream): exponential from a base, capped, each delay drawn at random from
//! `[d/2, d]` so that a fleet of sidecars that lost the same server does not come back in step.
//! The randomness is the operating system's (`ring`), not the clock.

use std::time::Duration;

/// Delays for successive attempts; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `base` is the first (uncapped) delay, `max` the largest; `max` below `base` is read as `base`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt, and one step further for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + random_unit() / 2.0)
    }

    /// Back to the first delay (the connection worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in `[0, 1]` from the system's random source (0.5 if it fails, which only narrows
/// the spread).
fn random_unit() -> f64 {
    let mut bytes = [0u8; 2];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
        Ok(()) => f64::from(u16::from_be_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_half_to_full_and_stop_at_the_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(base, max);
        for n in 0..40 {
            let ceiling = (base * 2u32.pow(n.min(16))).min(max);
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {n}: {d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= base);
    }

    #[test]
    fn delays_are_spread_not_in_step() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay());
        }
        assert!(seen.len() > 25, "only {} distinct delays of 50", seen.len());
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
    }
}
