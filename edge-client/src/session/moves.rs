//! Moving a session to a new connection (a QUIC probe from the TCP
//! fallback, a renewed certificate): the old control stream kept while it
//! drains, the move announced and confirmed, a failed move told from an
//! ordinary drain, and how often the QUIC probe tries.

use std::time::{Duration, Instant};

use relay_protocol::close_code;
use relay_transport::TunnelConn;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::warn;

use super::SessionEnd;
use crate::dial::{AttemptError, Connected};

/// The control stream of a session the edge moved away from, kept so
/// that the relay's drain (GOAWAY, pings) is answered while the old
/// connection's streams finish.
pub(crate) struct Retired {
    /// The grace of a GOAWAY that came before the move was done (the
    /// relay's drain of this session, when the new one registered first).
    pub(crate) grace_ms: Option<u32>,
    pub(crate) send: relay_transport::SendHalf,
    pub(crate) frames: tokio_util::codec::FramedRead<
        relay_transport::RecvHalf,
        tokio_util::codec::LengthDelimitedCodec,
    >,
}

/// Waits (at most `limit`) until the relay has answered the move with
/// `nonce` (see [`Control::Moving`]); without `ack` (a relay that does
/// not know moves), at once. The move goes ahead either way: unanswered,
/// the relay closes the old session as it always did.
pub(super) async fn move_noted(ack: Option<watch::Receiver<u64>>, nonce: u64, limit: Duration) {
    if let Some(mut ack) = ack {
        let _ = tokio::time::timeout(limit, ack.wait_for(|n| *n == nonce)).await;
    }
}

/// The relay closed this session. When a move of ours is under way (a QUIC
/// probe from the TCP fallback, or a session with a renewed certificate),
/// that is usually the move itself: its new session registered and
/// superseded this one, and the relay closed this one before the move's
/// task read its answer. Let the move finish (bounded) rather than drop
/// it: dropping it would close the new session too, and the node's routes
/// would leave the relay until a reconnect after backoff.
pub(super) async fn finish_move(
    pending: [&mut Option<AbortOnDropHandle<Result<Connected, AttemptError>>>; 2],
    limit: Duration,
    why: String,
) -> SessionEnd {
    for p in pending {
        if let Some(p) = p.take() {
            if let Ok(Ok(Ok(c))) = tokio::time::timeout(limit, p).await {
                // The old connection is closed: nothing to drain.
                return SessionEnd::Upgrade(Box::new(c), None);
            }
        }
    }
    SessionEnd::Lost(why)
}

/// How long after a planned move failed (its hello sent) a GOAWAY on the
/// session is taken for the relay's drain of it (see [`MoveDrain`]): the
/// relay drains it when the move's session registers, well within the
/// move's time limit, and its GOAWAY may only trail the failure on a
/// congested uplink.
const LATE_GOAWAY: Duration = Duration::from_secs(120);

/// Tells the relay's drain of this session for a planned move of ours
/// that then failed (see [`failed_move`]) from any other GOAWAY (an
/// operator's drain, a relay shutting down in a rolling update), by what
/// this edge did, with nothing on the wire: the relay drains for a move
/// only when the move's new session registers, which it does only once
/// the hello arrived. So a GOAWAY is the move's when it comes while a
/// move whose hello is out is pending (and that move then fails), or
/// within [`LATE_GOAWAY`] after a move failed with its hello out. A move
/// that failed before its hello (a QUIC probe where UDP is blocked fails
/// every time, at the dial; a renewal whose certificate request failed),
/// or that the relay refused, registered nothing: a drain after it is an
/// ordinary one, and the session's streams get its grace (closing at
/// once would reset the `kubectl exec` and `logs -f` streams the grace
/// is there for).
#[derive(Debug, Default)]
pub(crate) struct MoveDrain {
    /// A GOAWAY came while the pending move's hello was out.
    goaway_during: bool,
    /// When a move last failed with its hello out.
    failed_after_hello: Option<Instant>,
}

impl MoveDrain {
    /// A GOAWAY came at `now`; `pending` is whether a move is under way
    /// and, if so, whether its hello was sent. True: it is the drain of a
    /// move that already failed, close the session now.
    pub(crate) fn goaway(&mut self, pending: Option<bool>, now: Instant) -> bool {
        if pending == Some(true) {
            // Maybe the move's: its outcome decides.
            self.goaway_during = true;
            return false;
        }
        self.failed_after_hello
            .is_some_and(|t| now.saturating_duration_since(t) < LATE_GOAWAY)
    }

    /// The pending move failed at `now`: `hello_sent`, its attempt got
    /// as far as sending its hello; `refused`, the relay answered it
    /// with a rejection (which it gives before registering, never
    /// after). True: the relay drains this session for it (its GOAWAY
    /// came meanwhile), close the session now.
    pub(crate) fn failed(&mut self, hello_sent: bool, refused: bool, now: Instant) -> bool {
        if !hello_sent || refused {
            // Not the GOAWAY's move, if one came: the other move pending
            // (a probe and a renewal at once) had its hello out.
            return false;
        }
        if std::mem::take(&mut self.goaway_during) {
            return true;
        }
        self.failed_after_hello = Some(now);
        false
    }
}

/// A planned move ([`Control::Moving`]) failed after the relay registered
/// its new session (the hello reply lost or late, the move's time limit
/// fired and the new connection was dropped): the relay drains this
/// session (its GOAWAY came, as [`MoveDrain`] tells), so it takes no new
/// streams and the node is out of the relay's routes once the dropped
/// session ends there. Staying on it would leave the node unreachable
/// until its streams end or its grace does; close it and reconnect at once (`went_away` is set: the
/// drain pace, see `crate::backoff`). The relay closes it too when it
/// sees the new session end (`close_predecessor`); this does not wait
/// for that.
pub(super) fn failed_move(conn: &TunnelConn, why: &str) -> SessionEnd {
    warn!(reason = %why, "the planned move failed and the relay drains this session; reconnecting");
    conn.close(close_code::NORMAL, "move failed; reconnecting");
    SessionEnd::Lost(why.to_string())
}

/// How long the QUIC probe from the TCP fallback waits: the session's base
/// interval (`timeouts.quic_probe`, longer after QUIC strikes), doubled
/// after each failed probe, at most `cap`. Per session: a new session (a
/// successful probe's among them) starts from the base again.
#[derive(Debug)]
pub(crate) struct ProbeBackoff {
    wait: Duration,
    cap: Duration,
}

impl ProbeBackoff {
    /// Starts at `base`, never beyond `cap` (nor below `base`).
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        ProbeBackoff {
            wait: base,
            cap: cap.max(base),
        }
    }

    /// How long until the next probe.
    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// The wait drawn for one probe: uniform in `[4/5 wait, wait]`. A
    /// relay outage puts a whole fleet on the TCP fallback within seconds;
    /// with one fixed wait every edge would probe QUIC in the same second,
    /// and again in step after each doubling, queueing behind the relay's
    /// handshake limit together (at the default minute, a fifth spreads
    /// them over 12 s). No wider: a doubled wait still draws more than the
    /// undoubled one, so the backoff stays a backoff.
    pub(crate) fn jittered(&self, rng: &mut impl rand::Rng) -> Duration {
        let lo = self.wait * 4 / 5;
        let span = u64::try_from((self.wait - lo).as_micros()).unwrap_or(u64::MAX);
        lo + Duration::from_micros(rng.random_range(0..=span))
    }

    /// A probe failed: the next one waits twice as long, up to the cap.
    pub(crate) fn failed(&mut self) {
        self.wait = self.wait.saturating_mul(2).min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QUIC probe that fails before its hello (UDP blocked: every probe
    /// fails at the dial), or a hello the relay refused, registered
    /// nothing: a drain that comes later (an operator's, a relay shutting
    /// down) or during the next such probe is an ordinary one, and the
    /// session stays for its grace, its streams running.
    #[test]
    fn a_move_that_failed_before_its_hello_does_not_close_a_later_drain() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut m = MoveDrain::default();
        // The probe failed at the dial; a shutdown GOAWAY 10 s later.
        assert!(!m.failed(false, false, t0));
        assert!(!m.goaway(None, t0 + s(10)));
        // A GOAWAY while the next probe dials (no hello yet), which then
        // fails before its hello too.
        assert!(!m.goaway(Some(false), t0 + s(20)));
        assert!(!m.failed(false, false, t0 + s(21)));
        assert!(!m.goaway(None, t0 + s(22)));
        // A hello the relay refused.
        assert!(!m.failed(true, true, t0 + s(30)));
        assert!(!m.goaway(None, t0 + s(31)));
        // A drain GOAWAY while a probe's hello is out, and that probe
        // refused: not the move's drain either.
        assert!(!m.goaway(Some(true), t0 + s(40)));
        assert!(!m.failed(true, true, t0 + s(41)));
        assert!(!m.goaway(None, t0 + s(42)));
    }

    /// A move that failed with its hello out may have been registered:
    /// the relay's GOAWAY for it, come while the move was pending or
    /// within 2 min after, closes the session at once (see
    /// [`failed_move`]); later, a GOAWAY is an ordinary drain again.
    #[test]
    fn a_move_that_failed_after_its_hello_closes_on_the_relays_drain() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // The GOAWAY came while the move's hello was out.
        let mut m = MoveDrain::default();
        assert!(!m.goaway(Some(true), t0));
        assert!(m.failed(true, false, t0 + s(5)));
        // The GOAWAY trails the failure.
        let mut m = MoveDrain::default();
        assert!(!m.failed(true, false, t0));
        assert!(m.goaway(None, t0 + s(3)));
        assert!(m.goaway(Some(false), t0 + s(60)));
        assert!(!m.goaway(None, t0 + s(121)));
        // A probe and a renewal pending at once: the GOAWAY came with the
        // renewal's hello out, the probe failed at its dial first.
        let mut m = MoveDrain::default();
        assert!(!m.goaway(Some(true), t0));
        assert!(!m.failed(false, false, t0 + s(1)));
        assert!(m.failed(true, false, t0 + s(2)));
    }

    /// Failed probes double the wait up to the cap (32 × the configured
    /// interval): on a path without UDP, ~45 probes a day instead of 1,440.
    /// A base already raised by QUIC strikes shares the same cap.
    #[test]
    fn failed_probes_back_off_to_the_cap() {
        let s = Duration::from_secs;
        let mut p = ProbeBackoff::new(s(60), s(60 * 32));
        let mut waits = vec![p.wait()];
        for _ in 0..7 {
            p.failed();
            waits.push(p.wait());
        }
        let want = [60, 120, 240, 480, 960, 1920, 1920, 1920].map(s);
        assert_eq!(waits, want);

        let mut p = ProbeBackoff::new(s(60 * 16), s(60 * 32));
        p.failed();
        p.failed();
        assert_eq!(p.wait(), s(60 * 32));
        // A cap below the base never shortens it.
        assert_eq!(ProbeBackoff::new(s(60), s(30)).wait(), s(60));
    }

    /// Each probe's wait is drawn in [4/5 wait, wait], so a fleet that
    /// fell back together does not probe together.
    #[test]
    fn probe_waits_are_spread() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let p = ProbeBackoff::new(Duration::from_secs(60), Duration::from_secs(600));
        let drawn: Vec<Duration> = (0..200).map(|_| p.jittered(&mut rng)).collect();
        assert!(drawn
            .iter()
            .all(|d| (Duration::from_secs(48)..=Duration::from_secs(60)).contains(d)));
        let (lo, hi) = (drawn.iter().min().unwrap(), drawn.iter().max().unwrap());
        assert!(*hi - *lo > Duration::from_secs(9), "spread {lo:?}..{hi:?}");
    }
}
