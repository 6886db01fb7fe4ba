//! The edge's liveness check on the control stream: a ping every
//! keep-alive interval, and a path declared dead only when a ping has gone
//! unanswered for [`DEAD_AFTER_KEEPALIVES`] intervals.
//!
//! Why not "one late pong is fatal" (the old rule): on a slow uplink with a
//! deep queue (a 2 Mbit/s DSL line under a bulk upload) a pong can take
//! seconds, longer than one keep-alive, while the path is perfectly alive.
//! Why still bounded: a dead path (a NAT that rebound and dropped the
//! relay's reset, a cable pulled) must be noticed well before the idle
//! timeout. The bound: the first ping sent after the path died leaves at
//! most one interval after the death, and is declared lost two intervals
//! later at the latest, so **a dead path is declared within
//! 3 × keep-alive**.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A ping unanswered for this many keep-alive intervals means the path is
/// dead (so one or two pings may be late, or lost, without cost).
pub const DEAD_AFTER_KEEPALIVES: u32 = 2;

/// Pings in flight kept for matching pongs; beyond this the oldest is
/// dropped from the list (it is older than the dead bound by then anyway).
const MAX_OUTSTANDING: usize = 8;

/// Ping bookkeeping of one session.
#[derive(Debug)]
pub(crate) struct Liveness {
    keepalive: Duration,
    /// Pings sent and not answered yet, oldest first.
    outstanding: VecDeque<(u64, Instant)>,
}

/// What a keep-alive tick decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Send a ping with this nonce.
    Ping(u64),
    /// The oldest ping has been unanswered this long: the path is dead.
    Dead(Duration),
}

impl Liveness {
    pub(crate) fn new(keepalive: Duration) -> Self {
        Liveness {
            keepalive,
            outstanding: VecDeque::new(),
        }
    }

    /// How long a ping may stay unanswered. A tenth of an interval less
    /// than the round number, so a tick firing a little early (timer
    /// granularity) still decides at the intended tick, not one later.
    fn dead_after(&self) -> Duration {
        self.keepalive * DEAD_AFTER_KEEPALIVES - self.keepalive / 10
    }

    /// Called every keep-alive interval: either a new ping to send, or the
    /// verdict that the path is dead.
    pub(crate) fn tick(&mut self, now: Instant, nonce: u64) -> Tick {
        if let Some(&(_, sent)) = self.outstanding.front() {
            let age = now.saturating_duration_since(sent);
            if age >= self.dead_after() {
                return Tick::Dead(age);
            }
        }
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((nonce, now));
        Tick::Ping(nonce)
    }

    /// A pong arrived: returns the round-trip time of the ping it answers
    /// (`None` for a nonce we did not send or no longer track). Pongs come
    /// in order on the control stream, so it also answers every older ping.
    pub(crate) fn pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        let i = self.outstanding.iter().position(|&(n, _)| n == nonce)?;
        let sent = self.outstanding[i].1;
        self.outstanding.drain(..=i);
        Some(now.saturating_duration_since(sent))
    }

    /// Pings sent and not answered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Duration = Duration::from_secs(5);

    #[test]
    fn a_pong_later_than_one_interval_is_tolerated_and_measured() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        assert_eq!(l.tick(t0, 1), Tick::Ping(1));
        // The old rule dropped the session here: ping 1 unanswered at the
        // next tick.
        assert_eq!(l.tick(t0 + K, 2), Tick::Ping(2));
        assert_eq!(l.in_flight(), 2);
        // Ping 1's pong arrives 7.5 s after it was sent (deep queue).
        let rtt = l.pong(1, t0 + K + K / 2).unwrap();
        assert_eq!(rtt, K + K / 2);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(l.tick(t0 + 2 * K, 3), Tick::Ping(3));
        // Ping 3 answers ping 2 too (in order).
        assert_eq!(l.pong(3, t0 + 2 * K + K / 4), Some(K / 4));
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.pong(99, t0 + 3 * K), None, "unknown nonce");
    }

    #[test]
    fn a_dead_path_is_declared_within_three_intervals() {
        // The path dies at every offset within an interval; ticks are at
        // multiples of K; pongs come back after 100 ms while alive.
        for step in 0..20u32 {
            let start = Instant::now();
            let death = start + K * 3 + K * step / 20;
            let mut l = Liveness::new(K);
            let mut nonce = 0;
            let mut declared = None;
            for i in 0..20u32 {
                let now = start + K * i;
                nonce += 1;
                match l.tick(now, nonce) {
                    Tick::Ping(n) => {
                        let back = now + Duration::from_millis(100);
                        if back < death {
                            assert!(l.pong(n, back).is_some());
                        }
                    }
                    Tick::Dead(age) => {
                        assert!(age >= K * 2 - K / 10, "declared after {age:?}");
                        declared = Some(now);
                        break;
                    }
                }
            }
            let at = declared.expect("never declared dead");
            assert!(at > death, "declared before the path died");
            let took = at - death;
            assert!(
                took <= 3 * K,
                "offset {step}/20: declared {took:?} after death"
            );
        }
    }

    #[test]
    fn early_ticks_still_decide_on_time() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        l.tick(t0, 1);
        l.tick(t0 + K, 2);
        // The second tick after the lost ping fires 1 ms early.
        let at = t0 + 2 * K - Duration::from_millis(1);
        assert!(matches!(l.tick(at, 3), Tick::Dead(_)));
    }
}
