//! The edge's liveness check: is the path to the relay still there?
//!
//! **On the TCP fallback** the check is a ping on the control stream every
//! keep-alive interval, and the path is declared dead when a ping has gone
//! unanswered for [`DEAD_AFTER_KEEPALIVES`] intervals while nothing else
//! arrived either, or when nothing at all (no byte) has arrived for that
//! long. While bytes keep arriving (the relay's window updates during an
//! upload, its own pings, data), a ping's answer queued behind the upload
//! on a slow, deep-buffered uplink is given as long as on QUIC (below).
//!
//! **On QUIC** the check is what arrives: QUIC's own keep-alive PING leaves
//! whenever nothing arrived for an interval, and the relay's ACK of it is a
//! datagram received, so a live path delivers something every interval
//! plus a round trip (quinn restarts its keep-alive timer on each packet
//! *received*, so on an idle session arrivals are spaced interval + round
//! trip). The path is declared dead when nothing at all has arrived for
//! `quic_silence_limit`: [`DEAD_AFTER_KEEPALIVES`] intervals (less a
//! tenth), or one interval plus twelve round trips when that is longer.
//! Twelve round trips stand in for three probe timeouts (RFC 9002: a
//! probe timeout is the smoothed round trip plus four times its variation,
//! which quinn does not expose), as in the relay's own silence limit
//! (`relay-server/src/liveness.rs`). Without that allowance an idle
//! session died whenever its round trip exceeded about one interval: a
//! site backup filling an LTE or DSL uplink's queue (8 to 12 s of queue are
//! real) delays the ACK of every keep-alive PING by that much. A PING and
//! its ACK are two small packets; a control ping, its pong and the ACK of
//! the pong are three larger ones, so this is what keeps an idle edge's
//! metered uplink cheap (see `docs/benchmarks.md`, idle bytes). The control
//! stream is still pinged, every [`relay_protocol::QUIC_CONTROL_PING`]:
//! that checks the relay's session task and not only its QUIC stack, and
//! measures the control round trip operators see.
//!
//! The round trip is quinn's smoothed estimate, which learns a new delay
//! from the ACKs that carry it: on an idle session whose round trip jumps
//! at once from short to beyond about an interval, the first keep-alive
//! cycle after the jump is not told from a dead path (nothing can tell
//! them apart until that first ACK arrives), and the session survives it
//! only when the ACK comes back before the verdict's tick. Once one ACK of
//! the longer delay has arrived (a queue that deepens over a few cycles,
//! or a jump of less than about an interval first), the allowance covers
//! it.
//!
//! Why not "one late pong is fatal" (the old rule): on a slow uplink with a
//! deep queue (a 2 Mbit/s DSL line under a bulk upload) a pong can take
//! seconds, longer than one keep-alive, while the path is perfectly alive.
//! Why still bounded: a dead path (a NAT that rebound and dropped the
//! relay's reset, a cable pulled) must be noticed well before the idle
//! timeout. The bound, both ways: the last thing that arrived before the
//! path died is seen by the next tick, at most one interval later, and the
//! path is declared dead two intervals after that at the latest, so **a
//! dead path is declared within 3 × keep-alive** on TCP, and on QUIC while
//! twelve round trips are under 0.9 of an interval (the round trip under
//! 0.6 s at the default 8 s keep-alive). On QUIC with a longer round trip,
//! within **3 × keep-alive + 12 × the round trip estimated before the path
//! died**: a dead path acknowledges nothing, so the estimate does not grow
//! after it died (both sooner when QUIC's idle timeout is shorter: QUIC
//! closes the connection itself then).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use relay_protocol::DEAD_AFTER_KEEPALIVES;

/// The most pings in flight kept for matching pongs, whatever the
/// keep-alive (see [`Liveness::max_outstanding`]): a bound on memory for
/// an absurdly short keep-alive.
const MAX_OUTSTANDING: usize = 4096;

/// How often [`StallProbe`] looks at what arrived.
pub(crate) const STALL_CHECK: Duration = Duration::from_secs(1);

/// Datagrams in one [`STALL_CHECK`] period that make a flow of data, not
/// the trickle of an idle session (a keep-alive ACK, a pong).
const STALL_BURST: u64 = 3;

/// Notices data from the relay stopping dead while streams are open, and
/// says when to send the relay something at once (a control ping).
///
/// Why: after a NAT rebinding the relay's packets go to the old mapping and
/// are lost. An edge that is sending (an upload, an echo) retransmits
/// through the new mapping within milliseconds and the relay moves the
/// connection to it; an edge that is only receiving (a download from the
/// cloud: it sends nothing but ACKs, which answer what arrives) stays
/// silent until QUIC's keep-alive PING, up to a whole keep-alive interval
/// (8 s) later, and the transfer stalls that long. A probe sent when a
/// flow stops dead ends the stall within two checks. One probe per stop: an
/// idle stream, or a pause in a transfer, costs at most one ping, and an
/// idle session none.
#[derive(Debug, Default)]
pub(crate) struct StallProbe {
    /// Datagrams received as of the last check.
    last: Option<u64>,
    /// The last period carried a flow.
    flowing: bool,
}

impl StallProbe {
    /// Called every [`STALL_CHECK`] with the datagrams received so far and
    /// whether streams or flows are open; `true`: send a probe now.
    pub(crate) fn check(&mut self, received: u64, busy: bool) -> bool {
        let delta = self.last.map_or(0, |l| received.saturating_sub(l));
        self.last = Some(received);
        let was_flowing = std::mem::replace(&mut self.flowing, delta >= STALL_BURST);
        was_flowing && delta == 0 && busy
    }
}

/// How long nothing may arrive on a QUIC session with keep-alive
/// `keepalive` and round-trip estimate `rtt` before its path is declared
/// dead: [`DEAD_AFTER_KEEPALIVES`] intervals less a tenth (see
/// `Liveness::dead_after`), or, when longer, one interval plus twelve
/// round trips. Why the round trip: on an idle session quinn's keep-alive
/// PING leaves an interval after the last packet received and its ACK
/// comes back a round trip later, so arrivals are spaced interval + round
/// trip; twelve round trips (three probe timeouts, as the relay counts
/// them) leave room for a round trip still growing beyond the smoothed
/// estimate (a queue filling). Twelve round trips at the verdict's tick,
/// never more: the estimate is updated by acknowledgements, which a dead
/// path does not deliver, so it does not grow once the path is dead and
/// the verdict stays bounded (see the module docs).
pub(crate) fn quic_silence_limit(keepalive: Duration, rtt: Duration) -> Duration {
    Liveness::dead_after(keepalive).max(keepalive.saturating_add(rtt.saturating_mul(12)))
}

/// Ping bookkeeping of one session.
#[derive(Debug)]
pub(crate) struct Liveness {
    keepalive: Duration,
    /// A control ping goes every this many ticks: every tick on TCP, every
    /// [`relay_protocol::QUIC_CONTROL_PING`] on QUIC.
    ping_every: u64,
    /// Ticks so far.
    ticks: u64,
    /// Pings sent and not answered yet, oldest first.
    outstanding: VecDeque<(u64, Instant)>,
    /// When the oldest ping not answered yet was sent, kept when
    /// the list's bound drops it from `outstanding` (a control stream
    /// that never answers must still be noticed).
    unanswered_since: Option<Instant>,
    /// What had arrived (datagrams on QUIC, bytes on TCP) as of the last
    /// change, and the tick that saw it change.
    received: Option<(u64, Instant)>,
    /// QUIC: nothing arriving is judged by [`quic_silence_limit`], which
    /// allows for the round trip. TCP: by two intervals, the relay's pings
    /// (every interval, down a path an uplink's queue does not delay)
    /// being what arrives on an idle session.
    rtt_allowance: bool,
}

/// What a keep-alive tick decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Send a ping with this nonce.
    Ping(u64),
    /// Nothing to send (QUIC, between control pings).
    Quiet,
    /// The path is dead.
    Dead(Dead),
}

/// Why the path was declared dead, and for how long it had been so.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dead {
    /// The oldest control ping has been unanswered this long.
    Unanswered(Duration),
    /// QUIC: no datagram at all has arrived for this long.
    NothingReceived(Duration),
}

impl std::fmt::Display for Dead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dead::Unanswered(age) => {
                write!(
                    f,
                    "no answer to a control ping for {:.1}s",
                    age.as_secs_f64()
                )
            }
            Dead::NothingReceived(age) => {
                write!(
                    f,
                    "nothing received from the relay for {:.1}s",
                    age.as_secs_f64()
                )
            }
        }
    }
}

impl Liveness {
    /// The TCP fallback's check: a control ping every tick.
    pub(crate) fn new(keepalive: Duration) -> Self {
        Liveness {
            keepalive,
            ping_every: 1,
            ticks: 0,
            outstanding: VecDeque::new(),
            unanswered_since: None,
            received: None,
            rtt_allowance: false,
        }
    }

    /// QUIC's check: what arrives, and a control ping every
    /// [`relay_protocol::QUIC_CONTROL_PING`] (every tick if the keep-alive
    /// is longer than that).
    pub(crate) fn quic(keepalive: Duration) -> Self {
        let every = relay_protocol::QUIC_CONTROL_PING.as_millis() / keepalive.as_millis().max(1);
        Liveness {
            ping_every: u64::try_from(every).unwrap_or(u64::MAX).max(1),
            rtt_allowance: true,
            ..Liveness::new(keepalive)
        }
    }

    /// Pings kept in flight for matching pongs: every ping the longest
    /// wait for an answer can span (a control ping's on QUIC, also given
    /// on TCP while bytes arrive), so a pong arriving within it always
    /// finds its ping (and answers the older ones); a pong for a ping
    /// dropped from the list would be unknown and, on a path that answers
    /// late but steadily, the oldest unanswered ping would never clear.
    fn max_outstanding(&self) -> usize {
        let longest = Self::dead_after(self.keepalive.max(relay_protocol::QUIC_CONTROL_PING));
        let interval = self
            .keepalive
            .saturating_mul(self.ping_every.try_into().unwrap_or(u32::MAX));
        let n = longest.as_millis() / interval.as_millis().max(1) + 2;
        usize::try_from(n)
            .unwrap_or(MAX_OUTSTANDING)
            .min(MAX_OUTSTANDING)
    }

    /// How long `interval` may pass without an answer. A tenth of an
    /// interval less than the round number, so a tick firing a little
    /// early (timer granularity) still decides at the intended tick, not
    /// one later.
    fn dead_after(interval: Duration) -> Duration {
        interval * DEAD_AFTER_KEEPALIVES - interval / 10
    }

    /// Called every keep-alive interval with what arrived so far
    /// ([`relay_transport::TunnelConn::arrivals`]: datagrams on QUIC, bytes
    /// on TCP; `None`: not known) and the path's round-trip estimate
    /// ([`relay_transport::TunnelConn::rtt`]; used on QUIC only): a ping to
    /// send, nothing, or the verdict that the path is dead.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        nonce: u64,
        received: Option<u64>,
        rtt: Duration,
    ) -> Tick {
        if let Some(n) = received {
            let at = match self.received {
                Some((last, at)) if last == n => at,
                _ => {
                    self.received = Some((n, now));
                    now
                }
            };
            let age = now.saturating_duration_since(at);
            let limit = match self.rtt_allowance {
                true => quic_silence_limit(self.keepalive, rtt),
                false => Self::dead_after(self.keepalive),
            };
            if age >= limit {
                return Tick::Dead(Dead::NothingReceived(age));
            }
        }
        if let Some(sent) = self.unanswered_since {
            let age = now.saturating_duration_since(sent);
            let mut interval = self
                .keepalive
                .saturating_mul(self.ping_every.try_into().unwrap_or(u32::MAX));
            // Something arrived after that ping left: the path lives, and
            // its answer waits behind data (a deep uplink queue under an
            // upload on the TCP fallback: 8 s and more). Given as long as a
            // control ping on QUIC, which checks the relay's session task
            // and not the path.
            if self.received.is_some_and(|(_, at)| at > sent) {
                interval = interval.max(relay_protocol::QUIC_CONTROL_PING);
            }
            if age >= Self::dead_after(interval) {
                return Tick::Dead(Dead::Unanswered(age));
            }
        }
        let due = self.ticks.is_multiple_of(self.ping_every);
        self.ticks += 1;
        if !due {
            return Tick::Quiet;
        }
        if self.outstanding.len() >= self.max_outstanding() {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((nonce, now));
        self.unanswered_since.get_or_insert(now);
        Tick::Ping(nonce)
    }

    /// A pong arrived: returns the round-trip time of the ping it answers
    /// (`None` for a nonce we did not send or no longer track). Pongs come
    /// in order on the control stream, so it also answers every older ping.
    pub(crate) fn pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        let i = self.outstanding.iter().position(|&(n, _)| n == nonce)?;
        let sent = self.outstanding[i].1;
        self.outstanding.drain(..=i);
        // In order: every older ping is answered too.
        self.unanswered_since = self.outstanding.front().map(|&(_, t)| t);
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

    #[test]
    fn a_flow_that_stops_dead_is_probed_once_and_idle_never() {
        let mut p = StallProbe::default();
        // An idle session: keep-alive ACKs, a pong now and then.
        let mut n = 100;
        assert!(!p.check(n, true), "first look");
        for step in [0, 1, 0, 0, 2, 0, 1, 0] {
            n += step;
            assert!(!p.check(n, true), "idle trickle probed");
        }
        // A download, then nothing at all (a rebinding): one probe.
        for _ in 0..5 {
            n += 800;
            assert!(!p.check(n, true));
        }
        assert!(p.check(n, true), "the stop is probed");
        assert!(!p.check(n, true), "once");
        assert!(!p.check(n, true), "once");
        // Flowing again (the relay moved to the new mapping), then a stop
        // with nothing open (the transfer ended): no probe.
        n += 500;
        assert!(!p.check(n, true));
        assert!(!p.check(n, false), "nothing open, nothing to probe for");
        // A slowing flow (a trickle after a burst) is not a stop.
        n += 500;
        assert!(!p.check(n, true));
        n += 1;
        assert!(!p.check(n, true), "a trickle still arrives");
        assert!(
            !p.check(n, true),
            "and after it, the flow had already ended"
        );
    }

    const K: Duration = Duration::from_secs(5);

    #[test]
    fn a_pong_later_than_one_interval_is_tolerated_and_measured() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        assert_eq!(l.tick(t0, 1, None, Duration::ZERO), Tick::Ping(1));
        // The old rule dropped the session here: ping 1 unanswered at the
        // next tick.
        assert_eq!(l.tick(t0 + K, 2, None, Duration::ZERO), Tick::Ping(2));
        assert_eq!(l.in_flight(), 2);
        // Ping 1's pong arrives 7.5 s after it was sent (deep queue).
        let rtt = l.pong(1, t0 + K + K / 2).unwrap();
        assert_eq!(rtt, K + K / 2);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(l.tick(t0 + 2 * K, 3, None, Duration::ZERO), Tick::Ping(3));
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
                match l.tick(now, nonce, None, Duration::ZERO) {
                    Tick::Ping(n) => {
                        let back = now + Duration::from_millis(100);
                        if back < death {
                            assert!(l.pong(n, back).is_some());
                        }
                    }
                    Tick::Dead(Dead::Unanswered(age)) => {
                        assert!(age >= K * 2 - K / 10, "declared after {age:?}");
                        declared = Some(now);
                        break;
                    }
                    other => panic!("{other:?} on TCP"),
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

    /// TCP fallback under an upload on a deep-buffered uplink: no pong for
    /// many intervals, but bytes from the relay (its window updates, its
    /// pings) keep arriving. The path lives: no verdict while they do, one
    /// within three intervals once nothing arrives, and one at the QUIC
    /// bound if bytes arrive but the control stream never answers.
    #[test]
    fn pongs_queued_behind_an_upload_are_waited_for_while_bytes_arrive() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        let mut bytes = 1000u64;
        for i in 0..10u32 {
            bytes += 300;
            assert!(
                matches!(
                    l.tick(t0 + K * i, u64::from(i), Some(bytes), Duration::ZERO),
                    Tick::Ping(_)
                ),
                "tick {i}: bytes arriving, pongs late"
            );
        }
        // The pongs come (8 s late), then bytes stop altogether.
        assert!(l.pong(9, t0 + K * 9 + Duration::from_secs(8)).is_some());
        let stop = t0 + K * 10;
        let mut declared = None;
        for i in 10..20u32 {
            let now = t0 + K * i;
            if let Tick::Dead(d) = l.tick(now, u64::from(i), Some(bytes), Duration::ZERO) {
                declared = Some((now, d));
                break;
            }
        }
        let (at, _) = declared.expect("never declared dead");
        assert!(
            at - stop <= 3 * K,
            "declared {:?} after the stop",
            at - stop
        );

        // Bytes arrive but the control stream never answers: the verdict
        // comes at QUIC's control bound, not at two intervals.
        let mut l = Liveness::new(K);
        let mut verdict = None;
        for i in 0..200u32 {
            bytes += 300;
            let now = t0 + K * i;
            if let Tick::Dead(d) = l.tick(now, u64::from(i), Some(bytes), Duration::ZERO) {
                verdict = Some((now - t0, d));
                break;
            }
        }
        let (after, d) = verdict.expect("a control stream that never answers is dead");
        assert!(matches!(d, Dead::Unanswered(_)), "{d:?}");
        let bound = relay_protocol::QUIC_CONTROL_PING * DEAD_AFTER_KEEPALIVES;
        // Less a tenth of an interval (see `dead_after`), to the next tick.
        let at_least = bound - relay_protocol::QUIC_CONTROL_PING / 10;
        assert!(after >= at_least && after <= bound + K, "after {after:?}");
    }

    /// Pongs that come back steadily later than many keep-alives (a deep
    /// queue on the TCP fallback: 25 s at a 3 s keep-alive, more pings in
    /// flight than a short list would keep) each find their ping: the
    /// round trip is measured and the session never declared dead.
    #[test]
    fn pongs_later_than_many_keepalives_still_match_and_clear() {
        let k = Duration::from_secs(3);
        let late = Duration::from_secs(25);
        let t0 = Instant::now();
        let mut l = Liveness::new(k);
        let mut bytes = 0u64;
        let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut matched = 0;
        for i in 0..200u32 {
            let now = t0 + k * i;
            while let Some(&(n, at)) = sent.front() {
                if at + late > now {
                    break;
                }
                sent.pop_front();
                assert_eq!(l.pong(n, at + late), Some(late), "ping {n}");
                matched += 1;
            }
            bytes += 500;
            match l.tick(now, u64::from(i), Some(bytes), Duration::ZERO) {
                Tick::Ping(n) => sent.push_back((n, now)),
                other => panic!("tick {i} ({:?} in): {other:?}", now - t0),
            }
        }
        assert!(matched > 180, "{matched} pongs matched");
    }

    #[test]
    fn early_ticks_still_decide_on_time() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        l.tick(t0, 1, None, Duration::ZERO);
        l.tick(t0 + K, 2, None, Duration::ZERO);
        // The second tick after the lost ping fires 1 ms early.
        let at = t0 + 2 * K - Duration::from_millis(1);
        assert!(matches!(l.tick(at, 3, None, Duration::ZERO), Tick::Dead(_)));
    }

    /// QUIC: a live path delivers a datagram every interval plus a round
    /// trip (the edge's keep-alive PING leaves an interval after the last
    /// arrival; the ACK comes back 100 ms later). Whatever the moment the
    /// path dies, and whatever the ticks' phase, it is declared dead within
    /// three intervals, never before it died, and never while alive.
    #[test]
    fn quic_a_dead_path_is_declared_within_three_intervals() {
        let rtt = Duration::from_millis(100);
        for phase in 0..10u32 {
            for step in 0..20u32 {
                let start = Instant::now();
                let death = start + K * 5 + K * step / 20;
                let mut l = Liveness::quic(K);
                // Datagrams received by each instant (arrivals every
                // K + rtt from `start`, until the path dies).
                let arrivals: Vec<Instant> = (0..)
                    .map(|i| start + (K + rtt) * i)
                    .take_while(|&t| t < death)
                    .collect();
                let received = |now: Instant| arrivals.iter().filter(|&&t| t <= now).count() as u64;
                let mut declared = None;
                for i in 0..30u32 {
                    let now = start + K * phase / 10 + K * i;
                    match l.tick(now, u64::from(i), Some(received(now)), rtt) {
                        Tick::Dead(Dead::NothingReceived(_)) => {
                            declared = Some(now);
                            break;
                        }
                        Tick::Dead(other) => panic!("{other}"),
                        Tick::Ping(_) | Tick::Quiet => {}
                    }
                }
                let at = declared.expect("never declared dead");
                assert!(
                    at > death,
                    "phase {phase}, offset {step}: declared while alive"
                );
                assert!(
                    at - death <= 3 * K,
                    "phase {phase}, offset {step}: {:?} after death",
                    at - death
                );
            }
        }
    }

    /// The QUIC silence limit as a function: two intervals (less a tenth)
    /// on a short path, one interval plus twelve round trips on a long
    /// one; always longer than the spacing of an idle live session's
    /// arrivals (interval + round trip).
    #[test]
    fn quic_silence_limit_allows_for_the_round_trip() {
        let s = Duration::from_secs_f64;
        let table = [
            // (keep-alive, round trip, limit)
            (s(8.0), s(0.1), s(15.2)),
            (s(8.0), s(9.0), s(116.0)),
            (s(8.0), s(12.0), s(152.0)),
            (s(3.0), s(4.0), s(51.0)),
        ];
        for (k, rtt, want) in table {
            let got = quic_silence_limit(k, rtt);
            assert_eq!(got, want, "K {k:?}, RTT {rtt:?}");
            assert!(
                got > k + rtt,
                "K {k:?}, RTT {rtt:?}: an idle live path's spacing"
            );
        }
        // Where the round trip starts to count: twelve of them past 0.9 K.
        assert_eq!(quic_silence_limit(s(8.0), s(0.6)), s(15.2));
        assert_eq!(quic_silence_limit(s(8.0), s(0.7)), s(16.4));
    }

    /// Ticks every `k` from `start + phase` until a verdict (at most
    /// `ticks`), on a QUIC session whose datagrams arrive at `arrivals`
    /// and whose round-trip estimate is `rtt` (control pings answered a
    /// round trip later while the path lives): when the path was declared
    /// dead, if it was.
    fn quic_verdict(
        k: Duration,
        rtt: Duration,
        start: Instant,
        phase: Duration,
        arrivals: &[Instant],
        ticks: u32,
    ) -> Option<Instant> {
        let mut l = Liveness::quic(k);
        let received = |now: Instant| arrivals.iter().filter(|&&t| t <= now).count() as u64;
        for i in 0..ticks {
            let now = start + phase + k * i;
            match l.tick(now, u64::from(i), Some(received(now)), rtt) {
                Tick::Dead(Dead::NothingReceived(_)) => return Some(now),
                Tick::Dead(other) => panic!("{other}"),
                Tick::Ping(n) => {
                    if arrivals.last().is_some_and(|&last| now + rtt <= last) {
                        assert!(l.pong(n, now + rtt).is_some());
                    }
                }
                Tick::Quiet => {}
            }
        }
        None
    }

    /// An idle QUIC session on a long round trip (an uplink queue filled
    /// by traffic outside the tunnel): arrivals every interval + round
    /// trip, the round trip up to 1.5 intervals. It lives at every tick
    /// phase (the old limit, two intervals whatever the round trip, ended
    /// it), and once the path dies it is declared dead within
    /// 3 × keep-alive + 12 × the round trip, never before it died.
    #[test]
    fn quic_an_idle_session_on_a_long_round_trip_lives_and_its_death_is_bounded() {
        let s = Duration::from_secs_f64;
        for (k, rtt) in [
            (s(8.0), s(0.1)),
            (s(8.0), s(9.0)),
            (s(8.0), s(12.0)),
            (s(3.0), s(4.0)),
        ] {
            let bound = if rtt * 12 <= k * 9 / 10 {
                k * 3
            } else {
                k * 3 + rtt * 12
            };
            for phase in 0..8u32 {
                let phase = k * phase / 8;
                let start = Instant::now();
                // Alive throughout: 40 keep-alive cycles.
                let alive: Vec<Instant> = (0..40).map(|i| start + (k + rtt) * i).collect();
                let ticks = u32::try_from(((k + rtt) * 40).as_millis() / k.as_millis()).unwrap();
                assert_eq!(
                    quic_verdict(k, rtt, start, phase, &alive, ticks),
                    None,
                    "K {k:?}, RTT {rtt:?}, phase {phase:?}: declared dead while alive"
                );
                // Dies after 5 cycles.
                let death = start + (k + rtt) * 5 + rtt / 2;
                let until: Vec<Instant> = alive.iter().copied().filter(|&t| t < death).collect();
                let at = quic_verdict(k, rtt, start, phase, &until, 200)
                    .unwrap_or_else(|| panic!("K {k:?}, RTT {rtt:?}: never declared dead"));
                assert!(at > death, "K {k:?}, RTT {rtt:?}: declared before death");
                assert!(
                    at - death <= bound,
                    "K {k:?}, RTT {rtt:?}, phase {phase:?}: {:?} after death, bound {bound:?}",
                    at - death
                );
            }
        }
    }

    /// The TCP fallback keeps two intervals whatever the round trip it is
    /// given: what arrives there on an idle session is the relay's pings,
    /// every interval, which an uplink's queue does not delay.
    #[test]
    fn tcp_nothing_received_ignores_the_round_trip() {
        let t0 = Instant::now();
        let mut l = Liveness::new(K);
        let long = Duration::from_secs(30);
        assert!(matches!(l.tick(t0, 1, Some(7), long), Tick::Ping(1)));
        assert!(l.pong(1, t0 + Duration::from_millis(100)).is_some());
        assert!(matches!(l.tick(t0 + K, 2, Some(7), long), Tick::Ping(2)));
        assert!(matches!(
            l.tick(t0 + 2 * K, 3, Some(7), long),
            Tick::Dead(Dead::NothingReceived(_))
        ));
    }

    /// QUIC: control pings go every `QUIC_CONTROL_PING` (every 24th tick
    /// at 5 s), the ticks between send nothing, a pong may be late by more
    /// than that interval while datagrams keep arriving, and a ping
    /// unanswered for two intervals ends the session.
    #[test]
    fn quic_control_pings_go_every_interval_and_may_be_late() {
        let n = (relay_protocol::QUIC_CONTROL_PING.as_secs() / K.as_secs()) as u32;
        let t0 = Instant::now();
        let mut l = Liveness::quic(K);
        let mut pings = Vec::new();
        let mut dead = None;
        for i in 0..5 * n {
            let now = t0 + K * i;
            if i == n + n / 2 {
                // Ping 0's pong, 1.5 intervals late: tolerated, measured.
                assert_eq!(l.pong(0, now), Some(K * i));
            }
            match l.tick(now, u64::from(i), Some(u64::from(i)), Duration::ZERO) {
                Tick::Ping(p) => pings.push(p),
                Tick::Quiet => {}
                Tick::Dead(d) => {
                    dead = Some((i, d));
                    break;
                }
            }
        }
        assert_eq!(pings, [0, u64::from(n), u64::from(2 * n)]);
        // Ping n unanswered for two intervals (less the tenth) while
        // datagrams keep arriving: the relay's session task is stuck
        // although its QUIC stack answers.
        let (at, d) = dead.expect("never declared dead");
        let Dead::Unanswered(age) = d else {
            panic!("{d}")
        };
        assert_eq!(age, K * (at - n));
        let limit = relay_protocol::QUIC_CONTROL_PING * 2;
        assert!(age >= limit - limit / 20 && age < limit, "{age:?}");
        // A keep-alive longer than the interval pings at every tick.
        let k = relay_protocol::QUIC_CONTROL_PING + K;
        let mut slow = Liveness::quic(k);
        assert_eq!(slow.tick(t0, 1, Some(1), Duration::ZERO), Tick::Ping(1));
        assert_eq!(slow.tick(t0 + k, 2, Some(2), Duration::ZERO), Tick::Ping(2));
    }
}
