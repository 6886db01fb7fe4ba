//! How the relay decides an edge is gone: a relay-wide silence sweep, and
//! the checks and tick phase each session's keep-alive tick uses.
//!
//! QUIC's idle timeout alone lets a dead edge's session (and its routes)
//! outlive `quic.idle_timeout` by half of it: the relay's keep-alive
//! backstop, sent half an idle timeout into the edge's silence, restarts
//! QUIC's idle timer (RFC 9000 §10.1: the first ack-eliciting packet sent
//! after a receipt does), so the connection ends up to 1.5 ×
//! `idle_timeout` after the edge's last packet. One relay-wide task reads
//! every QUIC session's count of received datagrams each [`period`] and
//! closes a session whose count has not moved for `idle_timeout` (or
//! longer, on a path whose round trip QUIC's own timer would allow for).
//! QUIC's timer stays as the backstop; this only ends a session sooner.
//!
//! An edge that told the relay its keep-alive interval
//! ([`relay_protocol::Control::Keepalive`]) is given two of its intervals
//! instead, when that is shorter: such an edge sends a packet at least once
//! an interval while its path works (QUIC's PING when nothing arrived, else
//! its acknowledgements), so two intervals of silence are a dead path. This
//! is what notices a path dead only upstream within the edge's 3 ×
//! keep-alive bound (the edge still hears the relay and sees nothing wrong;
//! the relay's CONNECTION_CLOSE, travelling the direction that works, tells
//! it, with [`close_code::SILENT`] so the edge counts a dead path): two
//! intervals, plus at most two sweeps.
//!
//! On the TCP fallback (where yamux has no idle timeout of its own) the
//! count is of bytes received, with the same limits: an edge sends a
//! control ping every keep-alive, so bytes arrive at least that often on
//! a working path, and while they arrive the path lives even when the
//! pings themselves are queued behind an upload on a slow, deep-buffered
//! uplink (a sudden upload can delay them by longer than `idle_timeout`).
//!
//! The same sweep ends a session whose QUIC edge lacks
//! [`relay_protocol::capability::QUIC_LIVENESS`] (it talks on its control
//! stream every keep-alive) once nothing came on it for `idle_timeout`. A
//! `QUIC_LIVENESS` edge's control stream, and a TCP edge's, are checked
//! at a slower pace by the session's tick (`control_check`): there a
//! silent control stream with a live path is a wedged session task, not a
//! dead path.
//!
//! The same sweep closes a session whose client certificate is past its
//! notAfter (read once when the session started, so a comparison per
//! session; see `session::cert_check`): TLS checked it only at
//! the handshake.
//!
//! One task for all sessions rather than a timer per session: at 10,000
//! sessions a sweep is 10,000 reads of a counter behind quinn's connection
//! lock, one wake-up a second at the defaults, yielding to the runtime
//! every 128 sessions so the data path is not held behind it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::{capability, close_code, DEAD_AFTER_KEEPALIVES};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::server::Shared;
use crate::session::SessionHandle;

/// Each arrival after a gap shorter than [`Heard::peak_gap`] takes this
/// fraction (its inverse) off it.
const PEAK_DECAY: u64 = 8;

/// Sessions swept between two yields to the runtime.
const SWEEP_CHUNK: usize = 128;

/// How often the sweep runs for an idle timeout: a 24th of it (1 s at the
/// default 24 s), so a silent edge's session ends at most two periods
/// after `idle_timeout` of silence; never more often than every 50 ms.
pub fn period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 24).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// How long a session may go without a datagram before the sweep ends
/// it: `expected` ([`expected_silence`]), or more on a long path. QUIC's
/// own idle timer waits at least three probe timeouts (RFC 9000 §10.1),
/// and a probe timeout is the smoothed round trip plus four times its
/// variation plus the ACK delay; quinn does not expose the variation, so
/// twelve round trips stand in for three probe timeouts (the variation
/// taken as up to half the round trip, with room to spare).
///
/// An edge that told its keep-alive `told` gets that interval on top of
/// the twelve round trips, as the edge allows itself
/// (`quic_silence_limit` in edge-client): on an idle session its QUIC PING
/// leaves an interval after the last packet it received from us, and that
/// packet (our acknowledgement of its previous PING) reached it a round
/// trip after that PING left; so its packets arrive here an interval plus
/// a round trip apart. Our own round-trip estimate is stale on an idle
/// session, though (we send almost nothing it could be measured on: it
/// read 323 to 446 ms in the lab while the edge measured 7 s), so for such
/// an edge the round trip is taken as the longer of that estimate and the
/// longest recent gap between its packets less an interval (`peak_gap`,
/// see [`Heard::spacing`]). Without this, an idle edge behind a site
/// upload filling its uplink's queue (round trips of 3 to 8 s at a 3 s
/// keep-alive, or beyond 8 s at the default 8 s) was closed as a dead
/// path while the edge, which measures its round trip on every PING, saw
/// nothing wrong. A dead path is still declared within the largest of two
/// intervals and an interval plus twelve of those round trips, both
/// frozen when it died (nothing arrives to lengthen the gap, nothing
/// acknowledges to update the estimate).
pub fn silence_limit(
    expected: Duration,
    told: Option<Duration>,
    rtt: Duration,
    peak_gap: Duration,
) -> Duration {
    let Some(k) = told.map(|k| k.min(expected)) else {
        return expected.max(rtt.saturating_mul(12));
    };
    let rtt = rtt.max(peak_gap.saturating_sub(k));
    expected.max(k.saturating_add(rtt.saturating_mul(12)))
}

/// How long a QUIC session may go without a datagram before it counts as
/// silent (then [`silence_limit`] allows for a long path): the idle
/// timeout, or two of the edge's keep-alive intervals if it told them and
/// that is shorter.
pub fn expected_silence(idle_timeout: Duration, edge_keepalive: Option<Duration>) -> Duration {
    edge_keepalive.map_or(idle_timeout, |k| {
        idle_timeout.min(k.saturating_mul(DEAD_AFTER_KEEPALIVES))
    })
}

/// How long session `s` may go unheard before the sweep closes it, as
/// the sweep applies it now: [`expected_silence`], longer on a long path
/// ([`silence_limit`]); unheard is no datagram on QUIC, no byte on the TCP
/// fallback.
pub fn session_limit(s: &SessionHandle, idle_timeout: Duration) -> Duration {
    let told = s.heard.edge_keepalive();
    silence_limit(
        expected_silence(idle_timeout, told),
        told,
        s.conn.rtt(),
        quic_spacing(s, idle_timeout),
    )
}

/// The packet spacing [`silence_limit`] may take a round trip from, for
/// session `s`: [`Heard::spacing`] on QUIC, at most an interval plus a
/// twelfth of `idle_timeout` (so that it never lengthens the limit past
/// an interval plus the idle timeout: each gap a session survives raises
/// the next limit, and a dead path freezes the last one); zero on the TCP
/// fallback, where the edge's control pings every interval are what
/// arrives, yamux has no idle timer of its own behind this one, and the
/// limit stays two intervals.
fn quic_spacing(s: &SessionHandle, idle_timeout: Duration) -> Duration {
    bounded_spacing(
        s.conn.kind() == relay_transport::TransportKind::Quic,
        s.heard.spacing(idle_timeout),
        s.heard.edge_keepalive(),
        idle_timeout,
    )
}

/// [`quic_spacing`]'s rule: `spacing` on QUIC, at most the interval `told`
/// (else the idle timeout) plus a twelfth of `idle_timeout`; zero on TCP.
fn bounded_spacing(
    quic: bool,
    spacing: Duration,
    told: Option<Duration>,
    idle_timeout: Duration,
) -> Duration {
    if !quic {
        return Duration::ZERO;
    }
    let k = told.unwrap_or(idle_timeout);
    spacing.min(k.saturating_add(idle_timeout / 12))
}

/// Whether session `s` is judged by what arrives (QUIC datagrams, TCP
/// bytes) and its control stream only at the slow pace of
/// `control_check`: a QUIC edge with `QUIC_LIVENESS`, and every TCP
/// edge. Otherwise (an older QUIC edge) a control message must come every
/// `idle_timeout`.
pub fn judged_by_arrivals(s: &SessionHandle) -> bool {
    s.conn.kind() != relay_transport::TransportKind::Quic || s.has(capability::QUIC_LIVENESS)
}

/// What the sweep remembers of one session: the count of arrivals
/// (QUIC datagrams, TCP bytes) it last saw and when it saw it change, and
/// the edge's keep-alive interval if it told it.
#[derive(Debug, Default)]
pub struct Heard {
    datagrams: AtomicU64,
    /// Milliseconds since the session started.
    changed_ms: AtomicU64,
    /// The edge's keep-alive interval in milliseconds; 0 until it tells.
    keepalive_ms: AtomicU32,
    /// See [`Heard::peak_gap`], in milliseconds.
    peak_gap_ms: AtomicU64,
}

impl Heard {
    /// Records the interval an edge told in its
    /// [`relay_protocol::Control::Keepalive`]; 0 is not an interval and
    /// leaves the session on the idle timeout.
    pub fn tell_keepalive(&self, interval_ms: u32) {
        self.keepalive_ms.store(interval_ms, Relaxed);
    }

    /// The edge's keep-alive interval, if it told one.
    pub fn edge_keepalive(&self) -> Option<Duration> {
        match self.keepalive_ms.load(Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    /// Takes the session's current count at `now_ms` (milliseconds since it
    /// started); returns how long the count has not moved, in
    /// milliseconds. A change is dated at the sweep that saw it, never
    /// earlier than the datagram that made it, so silence is never
    /// overstated.
    pub fn observe(&self, datagrams: u64, now_ms: u64) -> u64 {
        if self.datagrams.swap(datagrams, Relaxed) != datagrams {
            let gap = now_ms.saturating_sub(self.changed_ms.swap(now_ms, Relaxed));
            let peak = self.peak_gap_ms.load(Relaxed);
            self.peak_gap_ms
                .store(gap.max(peak - peak / PEAK_DECAY), Relaxed);
            return 0;
        }
        now_ms.saturating_sub(self.changed_ms.load(Relaxed))
    }

    /// The longest gap between two arrivals lately, as the sweep saw them
    /// (to a sweep period): a longer gap replaces it at once, and each
    /// arrival after a shorter one takes an eighth off it, so a busy
    /// session's (arrivals every sweep) is back to a sweep period within a
    /// minute, and an idle one's follows its pace (see [`silence_limit`]).
    pub fn peak_gap(&self) -> Duration {
        Duration::from_millis(self.peak_gap_ms.load(Relaxed))
    }

    /// [`Heard::peak_gap`] less one sweep [`period`] for `idle_timeout`:
    /// the gap is dated by the sweeps that saw its ends, so it may read up
    /// to a period longer than it was, and [`silence_limit`] multiplies
    /// what it is over an interval by twelve (one second over at the
    /// defaults would add twelve to a dead path's verdict).
    pub fn spacing(&self, idle_timeout: Duration) -> Duration {
        self.peak_gap().saturating_sub(period(idle_timeout))
    }

    /// Counts silence from `now_ms` on: after a stall of the relay itself,
    /// whose own silence is not the edge's.
    pub fn restart(&self, now_ms: u64) {
        self.changed_ms.store(now_ms, Relaxed);
    }
}

/// Sweeps until `stop`: see the module docs. Returns its name, as the
/// relay's other long-running tasks do.
pub(crate) async fn watch(shared: Arc<Shared>, stop: CancellationToken) -> &'static str {
    let idle = shared.cfg.quic.idle_timeout;
    let every = period(idle);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return "liveness",
            _ = tick.tick() => {}
        }
        let gap = last.elapsed();
        last = tokio::time::Instant::now();
        if late(gap, every) {
            // This process stalled (a paused container, a host out of
            // CPU): so did quinn, and packets edges sent meanwhile may not
            // be counted yet, or were dropped by a full socket buffer.
            // Closing now would tell every edge its path died (a strike
            // each, and two move the fleet to TCP): silence counts again
            // from now.
            warn!(late_by = ?gap.saturating_sub(every), "liveness sweep late: silence counted again from now");
            for s in shared.registry.sessions_unsorted().iter() {
                s.heard.restart(s.age_ms());
                // And for sessions judged by their control messages.
                s.touch();
            }
            continue;
        }
        // One clock read per sweep for the certificates' expiry.
        let now = crate::session::cert_check::unix_now();
        for (i, s) in shared.registry.sessions_unsorted().iter().enumerate() {
            if !crate::session::cert_check::close_if_expired(&shared, s, now) {
                sweep_one(&shared, s, idle);
            }
            // Thousands of sessions in one go would hold this worker for
            // milliseconds; the data path's tasks get a turn in between.
            if i % SWEEP_CHUNK == SWEEP_CHUNK - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Whether a sweep `gap` after the last one, for sweeps every `every`,
/// follows a stall of this process.
fn late(gap: Duration, every: Duration) -> bool {
    gap > every * 2
}

fn sweep_one(shared: &Shared, s: &SessionHandle, idle: Duration) {
    // Datagrams on QUIC, bytes on the TCP fallback.
    let arrivals = s.conn.arrivals();
    // A QUIC edge with QUIC liveness talks on its control stream only
    // every couple of minutes, and a TCP edge's control messages may
    // queue behind its uploads (the session's tick watches the control
    // stream of both); an older QUIC edge sends a control message at
    // least every keep-alive.
    let lean = judged_by_arrivals(s);
    let quiet = Duration::from_millis(s.heard.observe(arrivals, s.age_ms()));
    if quiet.is_zero() && lean {
        // For operators ("last seen").
        s.touch();
    }
    let told = s.heard.edge_keepalive();
    if let Some((code, why)) =
        packet_silence(quiet, idle, told, quic_spacing(s, idle), || s.conn.rtt())
    {
        return close(shared, s, code, why);
    }
    if !lean {
        let quiet = s.last_seen_ago();
        if quiet > idle {
            let why = format!(
                "idle timeout: no control message from the edge for {:.1}s",
                quiet.as_secs_f64()
            );
            // Packets may still come (the edge's session task wedged, not
            // its path): not `SILENT`, which would count as a dead path.
            close(shared, s, close_code::PROTOCOL, why);
        }
    }
}

/// Whether a QUIC session that has sent no packet for `quiet` is silent
/// past its limit (see [`expected_silence`], [`silence_limit`]; `rtt` is
/// read only for a session already quiet that long): the close code and
/// the reason to close it with, else `None`. The code is
/// [`close_code::SILENT`], so the edge, which may still hear us on a path
/// dead only upstream, counts the session as lost to a dead path.
fn packet_silence(
    quiet: Duration,
    idle: Duration,
    told: Option<Duration>,
    peak_gap: Duration,
    rtt: impl FnOnce() -> Duration,
) -> Option<(u32, String)> {
    let expected = expected_silence(idle, told);
    if quiet <= expected {
        return None;
    }
    let rtt = rtt();
    if quiet <= silence_limit(expected, told, rtt, peak_gap) {
        return None;
    }
    let secs = quiet.as_secs_f64();
    let ms = rtt.as_millis();
    let gap = peak_gap.as_secs_f64();
    // Say which limit it was: operators compare it with their configs
    // (the edge logs it too, from the close).
    let why = match told {
        Some(k) if expected < idle => format!(
            "path dead: nothing heard from the edge for {secs:.1}s \
             ({DEAD_AFTER_KEEPALIVES} of its {k:?} keep-alives; round trip {ms} ms, \
             packet spacing {gap:.1}s)"
        ),
        _ => {
            format!("idle timeout: nothing heard from the edge for {secs:.1}s (round trip {ms} ms)")
        }
    };
    Some((close_code::SILENT, why))
}

fn close(shared: &Shared, s: &SessionHandle, code: u32, why: String) {
    shared.metrics.sessions_silent.fetch_add(1, Relaxed);
    info!(node = %s.node, reason = %why, "closing a silent session");
    s.kick(code, &why);
}

/// What a keep-alive tick does about the control stream of a session
/// [`judged_by_arrivals`], quiet for so long (a TCP edge is pinged every
/// keep-alive regardless; only `Wedged` applies to it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ControlCheck {
    /// Within the edge's own ping interval (and half of one to spare).
    Fine,
    /// Its ping is half an interval late: ping it (its pong counts).
    Ping,
    /// Three intervals without a message: its session task is wedged
    /// while its QUIC stack still answers.
    Wedged,
}

pub(crate) fn control_check(quiet: Duration) -> ControlCheck {
    if quiet > relay_protocol::QUIC_CONTROL_SILENCE_LIMIT {
        ControlCheck::Wedged
    } else if quiet >= relay_protocol::QUIC_CONTROL_PING.mul_f64(1.5) {
        ControlCheck::Ping
    } else {
        ControlCheck::Fine
    }
}

/// When a session's first keep-alive tick fires: a uniformly random point
/// in the second half of the first interval and the first half of the
/// next, so the periodic work of sessions that registered together (a
/// relay restart brings a thousand edges back within seconds) is spread
/// over the whole interval instead of arriving in one burst every
/// interval, which delays every other task on the runtime (the data path
/// among them). The first tick is never earlier than half an interval:
/// the session has just been seen.
pub(crate) fn first_tick(keepalive: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + keepalive.mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::{QUIC_CONTROL_PING as P, QUIC_CONTROL_SILENCE_LIMIT as LIMIT};

    /// A round more than two periods after the last one follows a stall
    /// of this process, and closes nothing; an ordinary one does.
    #[test]
    fn a_sweep_after_a_stall_of_the_relay_is_late() {
        let every = Duration::from_secs(4);
        assert!(!late(Duration::from_millis(4_010), every));
        assert!(!late(Duration::from_secs(8), every));
        assert!(late(Duration::from_secs(20), every));
        // After a stall, silence counts from the restart.
        let h = Heard::default();
        assert_eq!(h.observe(5, 1_000), 0);
        h.restart(30_000);
        assert_eq!(h.observe(5, 31_000), 1_000);
    }

    #[test]
    fn silence_is_counted_from_the_sweep_that_last_saw_the_count_move() {
        let h = Heard::default();
        assert_eq!(h.observe(5, 1_000), 0, "first sight is a change");
        assert_eq!(h.observe(5, 1_700), 700);
        assert_eq!(h.observe(6, 2_000), 0);
        assert_eq!(h.observe(6, 26_001), 24_001);
        // A clock that reads earlier (never here) is no silence.
        assert_eq!(h.observe(6, 1_000), 0);
    }

    #[test]
    fn the_limit_is_the_idle_timeout_unless_the_round_trip_asks_for_more() {
        let idle = Duration::from_secs(24);
        assert_eq!(
            silence_limit(idle, None, Duration::from_millis(40), Duration::ZERO),
            idle
        );
        assert_eq!(
            silence_limit(idle, None, Duration::from_secs(2), Duration::ZERO),
            idle
        );
        assert_eq!(
            silence_limit(idle, None, Duration::from_secs(3), Duration::ZERO),
            Duration::from_secs(36)
        );
    }

    #[test]
    fn an_edge_that_told_its_keepalive_gets_two_intervals_within_the_idle_timeout() {
        let idle = Duration::from_secs(24);
        let s = Duration::from_secs;
        assert_eq!(expected_silence(idle, None), idle);
        assert_eq!(expected_silence(idle, Some(s(8))), s(16));
        assert_eq!(expected_silence(idle, Some(s(12))), idle);
        assert_eq!(expected_silence(idle, Some(s(20))), idle, "never longer");
        // A long path gets its twelve round trips, after the interval
        // the edge waits before each PING.
        assert_eq!(
            silence_limit(expected_silence(idle, Some(s(8))), Some(s(8)), s(2), s(0)),
            s(32)
        );
        assert_eq!(
            silence_limit(expected_silence(idle, Some(s(3))), Some(s(3)), s(1), s(0)),
            s(15)
        );
        // A short one still gets two intervals.
        assert_eq!(
            silence_limit(expected_silence(idle, Some(s(3))), Some(s(3)), s(0), s(0)),
            s(6)
        );
        let h = Heard::default();
        assert_eq!(h.edge_keepalive(), None);
        h.tell_keepalive(8_000);
        assert_eq!(h.edge_keepalive(), Some(s(8)));
        h.tell_keepalive(0);
        assert_eq!(h.edge_keepalive(), None, "0 is no interval");
    }

    /// A session without packets past its limit is closed with `SILENT`
    /// (the edge counts a dead path), with the reason naming the limit;
    /// the round trip is read only once the session is that quiet.
    #[test]
    fn packet_silence_closes_with_the_silent_code() {
        let s = Duration::from_secs;
        let idle = s(24);
        let unread = || -> Duration { panic!("round trip read for a session not quiet") };
        assert_eq!(packet_silence(s(16), idle, Some(s(8)), s(0), unread), None);
        let (code, why) = packet_silence(s(17), idle, Some(s(8)), s(0), || s(0)).unwrap();
        assert_eq!(code, close_code::SILENT);
        assert!(
            why.starts_with("path dead: nothing heard from the edge for 17.0s"),
            "{why}"
        );
        let (code, why) = packet_silence(s(25), idle, None, s(0), || s(0)).unwrap();
        assert_eq!(code, close_code::SILENT);
        assert!(why.starts_with("idle timeout"), "{why}");
        // A long path's twelve round trips still count.
        assert_eq!(packet_silence(s(25), idle, None, s(0), || s(3)), None);
        // An edge's PINGs an interval plus a round trip apart (3 s, 1 s):
        // not silent at 10 s, silent past 15 s, naming the round trip.
        assert_eq!(packet_silence(s(10), idle, Some(s(3)), s(0), || s(1)), None);
        let (_, why) = packet_silence(s(16), idle, Some(s(3)), s(0), || s(1)).unwrap();
        assert!(why.contains("round trip 1000 ms"), "{why}");
        // With a stale round trip (ours, on an idle session), the gaps
        // its packets came with: 5 s apart lately as the sweeps saw them,
        // 4 s less a sweep period, at a 3 s interval: a round trip of 1 s,
        // so not silent until 3 + 12 × 1 = 15 s.
        let slow = Heard::default();
        for (n, at) in [(1, 1_000), (2, 6_000), (3, 11_000)] {
            slow.observe(n, at);
        }
        assert_eq!(slow.peak_gap(), s(5));
        let gap = slow.spacing(idle);
        assert_eq!(packet_silence(s(15), idle, Some(s(3)), gap, || s(0)), None);
        let (_, why) = packet_silence(s(16), idle, Some(s(3)), gap, || s(0)).unwrap();
        assert!(why.contains("packet spacing 4.0s"), "{why}");
        // An edge that never told its interval is on the idle timeout,
        // gaps or not.
        assert!(packet_silence(s(25), idle, None, s(20), || s(0)).is_some());
    }

    /// A long gap is taken at once; shorter ones after it take an eighth
    /// off each, so a session busy again is back near a sweep period
    /// within a minute of arrivals.
    #[test]
    fn the_peak_gap_rises_at_once_and_decays_by_arrivals() {
        let h = Heard::default();
        h.observe(1, 500);
        h.observe(2, 9_500);
        assert_eq!(h.peak_gap(), Duration::from_millis(9_000));
        h.observe(3, 10_500);
        assert_eq!(h.peak_gap(), Duration::from_millis(7_875));
        for i in 0..40 {
            h.observe(4 + i, 11_500 + i * 1_000);
        }
        assert_eq!(h.peak_gap(), Duration::from_millis(1_000));
        // No arrival: the peak stays what it was (a dead path's limit
        // does not grow).
        h.observe(44, 60_000);
        assert_eq!(h.peak_gap(), Duration::from_millis(9_500));
        h.observe(44, 90_000);
        assert_eq!(h.peak_gap(), Duration::from_millis(9_500));
        // Less a sweep period (1 s at a 24 s idle timeout): an edge whose
        // 8 s PINGs read 9 s apart at the sweeps still gets 2 K, not
        // twelve times the second the sweeps added.
        let s = Duration::from_secs;
        let idle = s(24);
        let at_defaults = Heard::default();
        at_defaults.observe(1, 1_000);
        at_defaults.observe(2, 10_000);
        assert_eq!(at_defaults.spacing(idle), s(8));
        let limit = silence_limit(s(16), Some(s(8)), Duration::ZERO, at_defaults.spacing(idle));
        assert_eq!(limit, s(16));
    }

    /// The spacing counts on QUIC only, and never lengthens the limit
    /// past an interval plus the idle timeout, however long the gaps a
    /// session survived (each raises the next limit).
    #[test]
    fn the_spacing_counts_on_quic_only_and_within_the_idle_timeout() {
        let s = Duration::from_secs;
        let idle = s(24);
        assert_eq!(bounded_spacing(false, s(15), Some(s(8)), idle), s(0));
        assert_eq!(bounded_spacing(true, s(9), Some(s(8)), idle), s(9));
        let capped = bounded_spacing(true, s(600), Some(s(8)), idle);
        assert_eq!(capped, s(10));
        assert_eq!(silence_limit(s(16), Some(s(8)), s(0), capped), s(32));
        // On TCP the limit stays two intervals, whatever the gaps.
        let tcp = bounded_spacing(false, s(600), Some(s(8)), idle);
        assert_eq!(silence_limit(s(16), Some(s(8)), s(0), tcp), s(16));
    }

    #[test]
    fn the_sweep_is_a_24th_of_the_idle_timeout_within_50_ms_and_1_s() {
        assert_eq!(period(Duration::from_secs(24)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(120)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(3)), Duration::from_millis(125));
        assert_eq!(
            period(Duration::from_millis(600)),
            Duration::from_millis(50)
        );
    }

    /// A lean edge's control stream: quiet within its own ping interval
    /// and half of one is fine; then the relay pings it, and for more than
    /// a whole interval (its pong has time to come back, even over a
    /// congested uplink) before the session is given up.
    #[test]
    fn a_quiet_control_stream_is_pinged_long_before_it_is_given_up() {
        let ms = Duration::from_millis(1);
        assert_eq!(control_check(Duration::ZERO), ControlCheck::Fine);
        assert_eq!(control_check(P), ControlCheck::Fine);
        assert_eq!(control_check(P.mul_f64(1.5) - ms), ControlCheck::Fine);
        assert_eq!(control_check(P.mul_f64(1.5)), ControlCheck::Ping);
        assert_eq!(control_check(LIMIT), ControlCheck::Ping);
        assert_eq!(control_check(LIMIT + ms), ControlCheck::Wedged);
        assert!(LIMIT - P.mul_f64(1.5) > P, "too little time for a pong");
    }
}
