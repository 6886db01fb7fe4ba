//! Reconnect delays: capped exponential backoff with full jitter, so a
//! thousand edges cut off together do not come back in lock-step; a
//! short fixed pace for a while after the relay said it was draining; and
//! a longer cap once the relay has been unreachable for a long time.

use std::time::{Duration, Instant};

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
    /// After a session the relay ended because it was draining (a restart,
    /// a rolling update): for this long, failed attempts are retried at the
    /// drain pace, uniform in [`initial`/10, 2 × `initial`], instead of
    /// after a growing delay. Zero turns it off.
    ///
    /// Why: a relay that restarts is gone for a second or two, and an edge
    /// that met the gap (a refusal from the draining relay, an Initial
    /// lost while nothing listened) would otherwise wait 1, 2, then 4 s
    /// between attempts and come back seconds after the new relay was
    /// ready. The pace stays jittered, and a refusal with a reason in the
    /// hello reply still grows the backoff and honours its retry-after (a
    /// QUIC-level refusal carries no reason, so it is paced too).
    ///
    /// [`initial`]: BackoffConfig::initial
    pub after_drain: Duration,
    /// After this long without a session (attempts failing since the last
    /// one ended), the cap is [`long_max`] instead of `max`. Zero turns it
    /// off.
    ///
    /// Why: each attempt costs bytes on the uplink (a QUIC attempt's
    /// Initials, about five of 1,228 bytes, then the TCP fallback's SYNs),
    /// about 6 KB; at the 8 s cap a relay unreachable for a day cost an
    /// edge 30 MB (measured, docs/benchmarks.md), paid on metered cellular
    /// data by every edge of the fleet. At a 60 s cap it was 12 MB, and an
    /// edge comes back at most a minute after a long outage ends; outages shorter than this (a
    /// restart, a rolling update, a network blip) keep the short cap.
    ///
    /// [`long_max`]: BackoffConfig::long_max
    pub long_after: Duration,
    /// The cap after [`long_after`](BackoffConfig::long_after) without a
    /// session; not below `max`.
    pub long_max: Duration,
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
            // A process restart or a pod rescheduled on a warm node; a
            // longer outage is met by the ordinary backoff afterwards.
            after_drain: Duration::from_secs(10),
            long_after: Duration::from_secs(600),
            long_max: Duration::from_secs(60),
        }
    }
}

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    failures: u32,
    /// Until when the drain pace applies (see [`BackoffConfig::after_drain`]).
    drain_pace_until: Option<Instant>,
    /// The first delay after a drain notice is the backoff's first step,
    /// whatever the failures before the session (a replica behind the same
    /// address, or the restarted relay, may answer at once); the pace takes
    /// the failures after it.
    drain_first: bool,
    /// Since when attempts have failed without a session between them
    /// (see [`BackoffConfig::long_after`]).
    failing_since: Option<Instant>,
}

impl Backoff {
    /// Fresh state.
    pub fn new(cfg: BackoffConfig) -> Self {
        Backoff {
            cfg,
            failures: 0,
            drain_pace_until: None,
            drain_first: false,
            failing_since: None,
        }
    }

    /// A session was established: the relay is reachable again, so a
    /// long outage (and its longer cap) is over, whether or not the
    /// session lasts long enough to [`reset`](Backoff::reset) the backoff.
    pub fn connected(&mut self) {
        self.failing_since = None;
    }

    /// The relay ended the session because it was draining: attempts
    /// until `now + after_drain` are paced, not backed off.
    pub fn relay_drained(&mut self, now: Instant) {
        self.drain_pace_until = now.checked_add(self.cfg.after_drain);
        self.drain_first = true;
    }

    /// Whether the drain pace applies at `now`.
    pub fn drain_pace(&self, now: Instant) -> bool {
        self.drain_pace_until.is_some_and(|t| now < t)
    }

    /// The delay before the next attempt after a lost session or a failed
    /// attempt (`explicit_refusal`: the relay refused with a reason): the
    /// drain pace while it applies (the backoff does not grow meanwhile;
    /// right after the notice, the backoff's first step); else
    /// [`Backoff::next_delay`].
    pub fn delay_after_failure(
        &mut self,
        now: Instant,
        explicit_refusal: bool,
        rng: &mut impl Rng,
    ) -> Duration {
        let first = std::mem::take(&mut self.drain_first);
        let since = *self.failing_since.get_or_insert(now);
        if explicit_refusal || !self.drain_pace(now) {
            let long = !self.cfg.long_after.is_zero()
                && now.saturating_duration_since(since) >= self.cfg.long_after;
            let delay = self.next_delay(rng);
            if !long {
                return delay;
            }
            // The long cap, with the same full jitter.
            let cap = self.cfg.long_max.max(self.cfg.max);
            let lo = cap / 10;
            let span = u64::try_from((cap - lo).as_micros()).unwrap_or(u64::MAX);
            return lo + Duration::from_micros(rng.random_range(0..=span));
        }
        let lo = self.cfg.initial / 10;
        let hi = if first {
            self.cfg.initial
        } else {
            self.cfg.initial.saturating_mul(2)
        };
        let span = u64::try_from(hi.saturating_sub(lo).as_micros()).unwrap_or(u64::MAX);
        lo + Duration::from_micros(rng.random_range(0..=span))
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

    /// Back to the first step (after a stable session). The drain pace,
    /// if any, stays: a session that comes up and is drained again at
    /// once is the next restart, not a stable session.
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

    /// After a drain notice, failures are retried at the pace without the
    /// cap growing, an explicit refusal still grows it, and once the window
    /// is over the backoff takes up where it was.
    #[test]
    fn after_a_drain_failures_are_paced_for_the_window_only() {
        let cfg = BackoffConfig::default();
        let (initial, window) = (cfg.initial, cfg.after_drain);
        let mut b = Backoff::new(cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let t0 = Instant::now();
        assert!(!b.drain_pace(t0), "no pace before any drain");
        b.next_delay(&mut rng);
        let cap_before = b.cap();
        assert_eq!(cap_before, initial * 2);

        b.relay_drained(t0);
        let during = t0 + window / 2;
        let d = b.delay_after_failure(during, false, &mut rng);
        assert!(
            d >= initial / 10 && d <= initial,
            "right after the notice: the backoff's first step, {d:?}"
        );
        for _ in 0..500 {
            let d = b.delay_after_failure(during, false, &mut rng);
            assert!(d >= initial / 10 && d <= initial * 2, "{d:?} off the pace");
        }
        assert_eq!(b.cap(), cap_before, "the pace does not grow the backoff");

        let d = b.delay_after_failure(during, true, &mut rng);
        assert!(d <= cap_before, "a refusal backs off from the current cap");
        assert_eq!(b.cap(), cap_before * 2, "and grows it");

        let after = t0 + window;
        assert!(!b.drain_pace(after), "the window is over");
        b.delay_after_failure(after, false, &mut rng);
        assert_eq!(b.cap(), cap_before * 4, "backoff again after the window");

        let mut off = Backoff::new(BackoffConfig {
            after_drain: Duration::ZERO,
            ..BackoffConfig::default()
        });
        off.relay_drained(t0);
        assert!(!off.drain_pace(t0), "zero turns the pace off");
    }

    /// Past `long_after` of failures without a session, delays reach the
    /// long cap (and spread over it); a session ends the long outage.
    #[test]
    fn a_long_outage_backs_off_further_until_a_session() {
        let cfg = BackoffConfig::default();
        let (max, long_after, long_max) = (cfg.max, cfg.long_after, cfg.long_max);
        let mut b = Backoff::new(cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        for i in 0..100 {
            let d = b.delay_after_failure(t0 + long_after * i / 200, false, &mut rng);
            assert!(d <= max, "before {long_after:?}: {d:?}");
        }
        let late = t0 + long_after;
        let ds: Vec<Duration> = (0..200)
            .map(|_| b.delay_after_failure(late, false, &mut rng))
            .collect();
        assert!(
            ds.iter().all(|d| *d >= long_max / 10 && *d <= long_max),
            "{ds:?}"
        );
        assert!(
            ds.iter().any(|d| *d > max * 2),
            "never past the short cap: {ds:?}"
        );
        // The relay answered: the next outage starts short again.
        b.connected();
        let d = b.delay_after_failure(late, false, &mut rng);
        assert!(d <= max, "after a session: {d:?}");
        // Zero turns it off.
        let mut off = Backoff::new(BackoffConfig {
            long_after: Duration::ZERO,
            ..BackoffConfig::default()
        });
        off.delay_after_failure(t0, false, &mut rng);
        let d = off.delay_after_failure(t0 + Duration::from_secs(86_400), false, &mut rng);
        assert!(d <= max, "off: {d:?}");
    }

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
