//! Reconnect delays: capped exponential backoff with full jitter, so a
//! thousand edges cut off together do not come back in lock-step.

use std::time::Duration;

use rand::Rng;

/// Backoff parameters.
#[derive(Debug, Clone)]
pub struct BackoffConfig {
    /// Cap of the first delay.
    pub initial: Duration,
    /// Largest cap.
    pub max: Duration,
    /// A session that stayed up this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            // 8 s, not the customary 30 s: during a relay restart edges'
            // caps climb to the maximum, and after it an edge waits up to
            // one cap before trying again. With 8 s a fleet is back within
            // about 10 s, and 1,000 edges spread over 8 s are ~125
            // handshakes/s, which admission control absorbs.
            max: Duration::from_secs(8),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    failures: u32,
}

impl Backoff {
    /// Fresh state.
    pub fn new(cfg: BackoffConfig) -> Self {
        Backoff { cfg, failures: 0 }
    }

    /// The current cap: `initial * 2^failures`, at most `max`.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.cfg.initial.saturating_mul(factor).min(self.cfg.max)
    }

    /// The next delay: uniform in `[cap/10, cap]` ("full jitter", with a
    /// small floor so a flapping link never turns into a busy loop).
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let lo = cap / 10;
        let span = (cap - lo).as_micros() as u64;
        lo + Duration::from_micros(rng.random_range(0..=span))
    }

    /// Back to the first step (after a stable session).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The configuration.
    pub fn config(&self) -> &BackoffConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grows_caps_jitters_and_resets() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut caps = Vec::new();
        for _ in 0..12 {
            let cap = b.cap();
            let d = b.next_delay(&mut rng);
            assert!(
                d <= cap && d >= cap / 10,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 10
            );
            caps.push(cap);
        }
        assert_eq!(caps[0], Duration::from_millis(500));
        assert_eq!(caps[1], Duration::from_secs(1));
        assert_eq!(*caps.last().unwrap(), Duration::from_secs(8));
        // Jitter: 200 draws at the cap are not all alike.
        let draws: std::collections::HashSet<_> =
            (0..200).map(|_| b.next_delay(&mut rng)).collect();
        assert!(draws.len() > 150);
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(500));
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(
            b.cap(),
            Duration::from_secs(8),
            "no overflow after many failures"
        );
    }
}
