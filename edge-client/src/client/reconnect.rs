//! One relay's reconnect loop: dial, run the session, retire the
//! connection a session moved away from, back off, again.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_protocol::{close_code, EDGE_FLOW_BIT};
use relay_transport::udp::FlowTable;
use relay_transport::TunnelConn;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{EdgeState, EdgeStats};
use crate::backoff::Backoff;
use crate::config::{EdgeConfig, TransportMode};
use crate::dial::{connect, AttemptError, Connected};
use crate::identity::Credentials;
use crate::serve::{ServedRoutes, ServedSet};
use crate::services::EdgeServices;
use crate::session::{run_session, SessionEnd, SessionIo};

/// Counts one session QUIC carries in [`EdgeStats::quic_sessions_live`]
/// while it lives.
struct QuicLive<'a>(&'a EdgeStats);

impl<'a> QuicLive<'a> {
    fn new(stats: &'a EdgeStats) -> Self {
        stats.quic_sessions_live.fetch_add(1, Relaxed);
        QuicLive(stats)
    }
}

impl Drop for QuicLive<'_> {
    fn drop(&mut self) {
        self.0.quic_sessions_live.fetch_sub(1, Relaxed);
    }
}

/// The current session's connection, for streams the edge opens.
pub(crate) type ConnWatch = watch::Receiver<Option<(TunnelConn, Arc<FlowTable>)>>;

/// Whether a QUIC session was lost to a dead path: the edge's own liveness
/// check gave it up (`own_check`), or the relay closed it for hearing
/// nothing from us ([`close_code::SILENT`]). The second is a path dead
/// only upstream (a policer dropping our UDP after the handshake): the
/// relay's packets still arrive, so our own check sees nothing wrong, and
/// counted as an ordinary close it would have the edge reconnect on QUIC
/// and lose the session again a dead-path bound later, for ever.
pub(crate) fn path_died(own_check: bool, peer_close: Option<u32>) -> bool {
    own_check || peer_close == Some(close_code::SILENT)
}

/// The QUIC sessions lost to a dead path (see [`path_died`]) in the
/// current run of such losses. A middlebox that lets each new UDP flow
/// through and drops it after a while (a DPI box classifying QUIC, a UDP
/// volume cap, a firewall's session lifetime) would otherwise have an
/// `auto` edge flap for ever: every new attempt's handshake succeeds, the
/// session dies a dead-path bound later, and again. After
/// [`QuicStrikes::PREFER_TCP`] such losses the edge dials TCP first (an
/// attempt after a failed TCP-first one is QUIC-first again, so a relay
/// reachable only over QUIC is still reached), and its QUIC probe waits
/// twice as long after each further one (at most
/// [`QuicStrikes::MAX_PROBE_FACTOR`] times). A run lasts while each loss
/// comes within the memory of the one before (an hour, or twice the
/// probe's longest wait if that is longer, so that a path that keeps
/// cutting QUIC keeps the probe at its longest wait), and ends when none
/// has come for that long. Losses count by when they happened, not by how
/// long the session lasted: a flow cut after 6 minutes strikes as surely
/// as one cut after 20 s (a rule that cleared the count after any
/// 5-minute session let that edge flap every 6 minutes for ever). Counted
/// per reconnect loop (per relay replica), each path being its own.
#[derive(Debug)]
pub(crate) struct QuicStrikes {
    /// The losses of the current run: how many (at most [`Self::KEPT`])
    /// and when the last one was.
    run: u64,
    last: Option<Instant>,
    /// How long after its last loss a run ends.
    memory: Duration,
}

impl QuicStrikes {
    /// Losses in a run from which an `auto` edge dials TCP first.
    pub(crate) const PREFER_TCP: u64 = 2;
    /// The shortest memory: two real outages in a morning do not keep an
    /// edge off QUIC all day (and on TCP its probe moves it back to QUIC
    /// meanwhile, without resetting streams).
    pub(crate) const MEMORY: Duration = Duration::from_secs(3600);
    /// Losses counted at most: past `PREFER_TCP` + log2 of the probe's cap
    /// more change nothing.
    const KEPT: u64 = 16;
    /// The QUIC probe's interval grows at most this many times, for
    /// strikes and failed probes together (see `session::moves::ProbeBackoff`):
    /// 32 minutes at the default 60 s.
    pub(crate) const MAX_PROBE_FACTOR: u32 = 32;

    /// No losses yet, for a probe whose base interval is `probe`.
    pub(crate) fn new(probe: Duration) -> Self {
        let longest = probe.saturating_mul(Self::MAX_PROBE_FACTOR);
        QuicStrikes {
            run: 0,
            last: None,
            memory: Self::MEMORY.max(longest.saturating_mul(2)),
        }
    }

    /// Counts a QUIC session's end at `now`: `died`, lost to a dead path.
    pub(crate) fn session_ended(&mut self, now: Instant, died: bool) {
        if died {
            self.run = (self.count(now) + 1).min(Self::KEPT);
            self.last = Some(now);
        }
    }

    /// The losses that count at `now`: the run's, unless it has ended.
    pub(crate) fn count(&self, now: Instant) -> u64 {
        match self.last {
            Some(at) if now.saturating_duration_since(at) < self.memory => self.run,
            _ => 0,
        }
    }

    /// The transport to dial at `now`: `configured`, except `auto` with a
    /// count at [`Self::PREFER_TCP`] or above, which dials TCP (the probe
    /// tries QUIC from there).
    pub(crate) fn mode(&self, configured: TransportMode, now: Instant) -> TransportMode {
        if configured == TransportMode::Auto && self.count(now) >= Self::PREFER_TCP {
            TransportMode::Tcp
        } else {
            configured
        }
    }

    /// How long the QUIC probe waits on the TCP fallback: `interval`,
    /// doubled for each loss that counts at `now` from
    /// [`Self::PREFER_TCP`] on (at most [`Self::MAX_PROBE_FACTOR`] times).
    pub(crate) fn probe_interval(&self, interval: Duration, now: Instant) -> Duration {
        let over = self.count(now).saturating_sub(Self::PREFER_TCP - 1);
        let factor = 1u32
            .checked_shl(u32::try_from(over).unwrap_or(u32::MAX))
            .unwrap_or(u32::MAX)
            .min(Self::MAX_PROBE_FACTOR);
        interval.saturating_mul(factor)
    }
}

/// Publishes `s` unless it is the state already: watchers (capture, the
/// supervisor) wake only for a change.
pub(crate) fn set_state(tx: &watch::Sender<EdgeState>, s: EdgeState) {
    tx.send_if_modified(|cur| {
        let changed = *cur != s;
        *cur = s;
        changed
    });
}

/// One relay's reconnect loop: dial `cfg.relay`, run the session, back off,
/// again, until `cancel`. The supervisor runs one per replica.
///
/// Once `give_way` is set the loop dials no more: the next time its
/// session ends (or an attempt fails) it ends, publishing `Stopped`. The
/// supervisor sets it on the bootstrap loop before it starts the direct
/// session that will supersede it, so the bootstrap session, dialling the
/// configured address again, can never land on that replica and supersede
/// the direct session back (see `supervisor`). Set before the supersede
/// happens, it needs no close code from the relay (the TCP fallback
/// carries none).
// The session's shared parts, passed once at start; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    services: Arc<EdgeServices>,
    creds: Arc<Credentials>,
    state: watch::Sender<EdgeState>,
    conn_tx: watch::Sender<Option<(TunnelConn, Arc<FlowTable>)>>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
    dns: Option<crate::dns::Resolver>,
    give_way: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut backoff = Backoff::new(cfg.backoff.clone());
    let mut attempt = 0u32;
    // Why the last session ended or attempt failed (see EdgeState).
    let mut last: Option<String> = None;
    // Why the last session ended, kept through the failed attempts after
    // it (cleared by the next session): an attempt failing at once (no
    // route while the link is down) must not hide the cause from the
    // operator reading `/readyz`.
    let mut ended: Option<String> = None;
    // A session already established (a QUIC probe that succeeded while on
    // the TCP fallback): run it next, with no delay.
    let mut next: Option<Connected> = None;
    // Whether QUIC carried the last session (see Dialer::quic_worked).
    let mut quic_worked = false;
    // This loop's QUIC sessions lost to a dead path: per loop, as each
    // replica's path is its own.
    let mut strikes = QuicStrikes::new(cfg.quic_probe_interval);
    // A TCP-first attempt (see QuicStrikes) failed: the next one is the
    // configured mode again, QUIC first, so a relay reachable only over
    // QUIC (no TCP fallback, a UDP-only balancer) is not given up on.
    let mut tcp_first_failed = false;
    let attempt_limit = cfg.handshake_timeout * 3 + cfg.quic_fallback_after;
    loop {
        let mode = if tcp_first_failed {
            cfg.transport
        } else {
            strikes.mode(cfg.transport, Instant::now())
        };
        stats
            .quic_strikes
            .store(strikes.count(Instant::now()), Relaxed);
        let tcp_first = mode != cfg.transport;
        let result = match next.take() {
            Some(c) => Ok(c),
            // Set while this loop waited out its backoff (below).
            None if give_way.load(std::sync::atomic::Ordering::SeqCst) => {
                info!("a direct session took over; not dialling this address again");
                break;
            }
            None => {
                attempt = attempt.saturating_add(1);
                // Usually already so (published when the last one ended).
                set_state(
                    &state,
                    EdgeState::Connecting {
                        attempt,
                        last: last.clone(),
                    },
                );
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    // A certificate bootstrap may come first (its own
                    // connection and a token review), then QUIC (up to a
                    // handshake bound while another session proves UDP
                    // works, else two fallback timers), then TCP.
                    r = tokio::time::timeout(attempt_limit, connect(&cfg, &stats, mode, &creds, quic_worked, false)) => match r {
                        Ok(r) => r,
                        Err(_) => Err(AttemptError::Failed(format!("no session within {attempt_limit:?}"))),
                    },
                }
            }
        };
        let mut min_delay = Duration::ZERO;
        // The relay refused us with a reason: back off even after a drain.
        let mut refused = false;
        match result {
            Ok(Connected {
                endpoint,
                conn,
                hello,
                ext,
                control,
            }) => {
                attempt = 0;
                ended = None;
                tcp_first_failed = false;
                backoff.connected();
                quic_worked = conn.kind() == relay_transport::TransportKind::Quic;
                let _quic_live = quic_worked.then(|| QuicLive::new(&stats));
                stats.sessions.fetch_add(1, Relaxed);
                info!(
                    session = hello.session_id,
                    gen = hello.generation,
                    relay = %hello.relay_id,
                    remote = %conn.remote_addr(),
                    transport = conn.kind().as_str(),
                    "session up"
                );
                // A relay that decides claims says what we serve; with an
                // older relay, our config does.
                served.set(match ext {
                    Some(x) => ServedRoutes {
                        routes: x.served_routes,
                        primary: x.primary_addr,
                    },
                    None => ServedRoutes {
                        routes: cfg.routes.clone(),
                        primary: cfg.primary_addr,
                    },
                });
                state.send_replace(EdgeState::Connected {
                    session_id: hello.session_id,
                    generation: hello.generation,
                    relay_id: hello.relay_id.clone(),
                    tunnel_routes: hello.tunnel_routes.clone(),
                    // An older relay puts its whole list in the hello.
                    routes_complete: hello.capabilities & relay_protocol::capability::ROUTE_DELTAS
                        == 0,
                    served_routes: served.get().routes.clone(),
                    replicas: None,
                    draining: false,
                });
                let up = Instant::now();
                // Flows live and die with the session.
                let flows = FlowTable::new(
                    EDGE_FLOW_BIT,
                    cfg.max_udp_flows,
                    hello.capabilities & relay_protocol::capability::UDP_STREAM_PAYLOADS != 0,
                    stats.udp.clone(),
                );
                tokio::spawn(relay_transport::udp::pump_datagrams(
                    conn.clone(),
                    flows.clone(),
                ));
                conn_tx.send_replace(Some((conn.clone(), flows.clone())));
                let span = tracing::info_span!(
                    "session",
                    session = hello.session_id,
                    gen = hello.generation
                );
                let mut io = SessionIo {
                    probe_interval: strikes.probe_interval(cfg.quic_probe_interval, Instant::now()),
                    went_away: false,
                    path_dead: false,
                };
                let end = run_session(
                    &conn,
                    &flows,
                    control,
                    &cfg,
                    &served,
                    &services,
                    &creds,
                    &stats,
                    &cancel,
                    &state,
                    dns.as_ref(),
                    hello.capabilities,
                    &mut io,
                )
                .instrument(span)
                .await;
                conn_tx.send_replace(None);
                if up.elapsed() >= backoff.config().reset_after {
                    backoff.reset();
                }
                if quic_worked {
                    let died = path_died(io.path_dead, conn.peer_close_code());
                    let now = Instant::now();
                    strikes.session_ended(now, died);
                    stats.quic_strikes.store(strikes.count(now), Relaxed);
                    // A path that went dead is not a relay restarting (a
                    // restarted relay answers with a stateless reset, and
                    // one that restarts takes less than the dead-path
                    // bound): UDP may be blocked now, so one unanswered
                    // QUIC attempt is enough to fall back.
                    quic_worked = !died;
                }
                // Closed now unless the session moved (then `retire`
                // closes it when the old connection is done).
                let endpoint = match &end {
                    SessionEnd::Upgrade(..) => endpoint,
                    SessionEnd::Lost(_) => {
                        if let Some(ep) = endpoint {
                            ep.close(close_code::NORMAL.into(), b"");
                        }
                        None
                    }
                };
                if matches!(end, SessionEnd::Lost(_)) && conn.peer_close_code().is_some() {
                    stats.closed_by_relay.fetch_add(1, Relaxed);
                }
                match end {
                    SessionEnd::Upgrade(c, old) => {
                        info!(uptime = ?up.elapsed(), transport = c.conn.kind().as_str(), "moving the session to its new connection");
                        next = Some(*c);
                        // The old connection's streams finish on it (the
                        // relay drains it) rather than being cut here.
                        tokio::spawn(
                            retire(conn, endpoint, old, cfg.handshake_timeout, cancel.clone())
                                .in_current_span(),
                        );
                        continue;
                    }
                    // The relay is draining (a restart, a rolling update):
                    // it said so, or, if the GOAWAY was dropped (its control
                    // queue full), QUIC's close code says it; or it restarted
                    // without a word and its stateless reset says it is up.
                    SessionEnd::Lost(why)
                        if io.went_away
                            || conn.peer_close_code() == Some(close_code::GOING_AWAY)
                            || conn.was_reset() =>
                    {
                        info!(reason = %why, uptime = ?up.elapsed(), pace_for = ?backoff.config().after_drain, "session down: the relay is restarting; reconnecting at a short pace");
                        backoff.relay_drained(Instant::now());
                        last = Some(format!("session ended (relay restarting): {why}"));
                        ended = last.clone();
                    }
                    SessionEnd::Lost(why) => {
                        info!(reason = %why, uptime = ?up.elapsed(), "session down");
                        last = Some(format!("session ended: {why}"));
                        ended = last.clone();
                    }
                }
            }
            Err(AttemptError::Rejected(r)) => {
                warn!(reason = r.reason.as_str(), message = %r.message, "relay rejected the session");
                min_delay = Duration::from_millis(r.retry_after_ms.unwrap_or(0).into());
                refused = true;
                state.send_replace(EdgeState::Rejected {
                    reason: r.reason,
                    message: r.message,
                });
            }
            Err(AttemptError::Failed(e)) => {
                tcp_first_failed = tcp_first;
                warn!(error = %e, attempt, "cannot reach relay");
                last = Some(match &ended {
                    Some(why) => format!("cannot reach the relay: {e}; before that, {why}"),
                    None => format!("cannot reach the relay: {e}"),
                });
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        if give_way.load(std::sync::atomic::Ordering::SeqCst) {
            info!("a direct session took over; not dialling this address again");
            break;
        }
        // Not connected (any more): say so now, and why, not only when the
        // next attempt starts after the backoff (until then `/readyz` and
        // `edge_session_up` still showed the lost session, and the
        // supervisor could take it for the live one).
        if !refused {
            set_state(
                &state,
                EdgeState::Connecting {
                    attempt: attempt.saturating_add(1),
                    last: last.clone(),
                },
            );
        }
        let delay = backoff
            .delay_after_failure(Instant::now(), refused, &mut rand::rng())
            .max(min_delay);
        debug!(?delay, "reconnecting after delay");
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    state.send_replace(EdgeState::Stopped);
}

/// How long past the relay's drain grace a moved-from connection is kept
/// at most: the relay closes it when the grace ends; this only bounds a
/// relay that does not.
const RETIRE_MARGIN: Duration = Duration::from_secs(30);

/// Keeps a connection the session moved away from (a renewed
/// certificate, a QUIC probe from the TCP fallback) while its streams
/// finish, then closes it and its endpoint. The relay decides: for a move
/// the edge announced ([`relay_protocol::Control::Moving`]) it drains the
/// old session (GOAWAY with its grace) and closes it when its streams are
/// done or the grace has passed; here the old control stream is served
/// meanwhile (pings answered). Without a GOAWAY within `wait` (an older
/// relay closes the old session at once; the move was not announced; the
/// new session went elsewhere), it is closed now, as before. At shutdown
/// it is closed at once.
async fn retire(
    conn: TunnelConn,
    endpoint: Option<quinn::Endpoint>,
    old: Option<crate::session::Retired>,
    wait: Duration,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    use relay_protocol::codec::{decode_control, write_frame, Incoming};
    use relay_protocol::Control;
    let work = async {
        let Some(crate::session::Retired {
            grace_ms,
            mut send,
            mut frames,
        }) = old
        else {
            return;
        };
        // Until the relay says it drains: `wait`; then its grace and a margin.
        let mut draining = grace_ms.is_some();
        let mut until = tokio::time::Instant::now()
            + match grace_ms {
                Some(g) => Duration::from_millis(g.into()) + RETIRE_MARGIN,
                None => wait,
            };
        if draining {
            info!(grace = ?until.duration_since(tokio::time::Instant::now()), "the old session drains: its streams finish on it");
        }
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep_until(until) => {
                    if !draining {
                        debug!("the relay did not drain the old session; closing it");
                    }
                    return;
                }
                f = frames.next() => {
                    let Some(Ok(bytes)) = f else {
                        // The relay ended the control stream: it closes
                        // the connection next; wait for that (bounded).
                        tokio::select! {
                            _ = conn.closed() => {}
                            _ = tokio::time::sleep_until(until) => {}
                        }
                        return;
                    };
                    match decode_control(&bytes) {
                        Ok(Incoming::Known { msg: Control::GoAway { grace_ms, .. }, .. }) if !draining => {
                            draining = true;
                            let grace = Duration::from_millis(grace_ms.into());
                            info!(?grace, "the old session drains: its streams finish on it");
                            until = tokio::time::Instant::now() + grace + RETIRE_MARGIN;
                        }
                        Ok(Incoming::Known { msg: Control::Ping { nonce }, .. }) => {
                            let pong = Control::Pong { nonce };
                            if tokio::time::timeout(wait, write_frame(&mut send, &pong)).await.is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        () = work => {}
    }
    conn.close(close_code::NORMAL, "moved to a new session");
    if let Some(ep) = endpoint {
        ep.close(close_code::NORMAL.into(), b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay's close for silence (`SILENT`: a path dead only upstream)
    /// is a strike like the edge's own dead-path verdict: two such quick
    /// losses and the edge dials TCP first. Other closes by the relay (and
    /// an older relay's `PROTOCOL` for the same silence) are not.
    #[test]
    fn a_relay_silence_close_is_a_dead_path_strike() {
        assert!(path_died(false, Some(close_code::SILENT)));
        assert!(path_died(true, None));
        for other in [
            None,
            Some(close_code::NORMAL),
            Some(close_code::PROTOCOL),
            Some(close_code::GOING_AWAY),
            Some(close_code::KICKED),
        ] {
            assert!(!path_died(false, other), "{other:?}");
        }
        let mut s = QuicStrikes::new(Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..2 {
            s.session_ended(now, path_died(false, Some(close_code::SILENT)));
        }
        assert_eq!(s.mode(TransportMode::Auto, now), TransportMode::Tcp);
    }

    #[test]
    fn quic_strikes_prefer_tcp_after_two_losses_within_the_memory() {
        let mut s = QuicStrikes::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let probe = Duration::from_secs(60);
        s.session_ended(at(20), true);
        assert_eq!(s.mode(TransportMode::Auto, at(20)), TransportMode::Auto);
        assert_eq!(s.probe_interval(probe, at(20)), probe);
        // Ended some other way: no strike, none cleared.
        s.session_ended(at(40), false);
        assert_eq!(s.count(at(40)), 1);
        s.session_ended(at(60), true);
        assert_eq!(s.mode(TransportMode::Auto, at(60)), TransportMode::Tcp);
        // Only `auto` changes.
        assert_eq!(s.mode(TransportMode::Quic, at(60)), TransportMode::Quic);
        assert_eq!(s.probe_interval(probe, at(60)), probe * 2);
        s.session_ended(at(80), true);
        assert_eq!(s.probe_interval(probe, at(80)), probe * 4);
        for i in 0..100 {
            s.session_ended(at(100 + i), true);
        }
        assert_eq!(s.probe_interval(probe, at(200)), probe * 32, "capped");
        // The memory (twice the probe's longest wait: 64 minutes) after
        // the last loss, the run has ended.
        assert_eq!(s.memory, Duration::from_secs(2 * 32 * 60));
        assert_eq!(s.count(at(199) + s.memory - Duration::from_secs(1)), 16);
        let later = at(199) + s.memory;
        assert_eq!(s.count(later), 0);
        assert_eq!(s.mode(TransportMode::Auto, later), TransportMode::Auto);
        assert_eq!(s.probe_interval(probe, later), probe);
    }

    /// A path that cuts each QUIC flow after a while (a firewall's
    /// session lifetime of 6 minutes, a DPI box after 20 s), each probe
    /// getting a new flow through: the second loss sends the edge to TCP
    /// first, the probe's waits grow to the cap and stay there as long as
    /// the path keeps cutting (a count cleared by every session that
    /// lasted 5 minutes had the 6-minute edge flap every 6 minutes for
    /// ever; a count of the last hour's losses fell back from the cap);
    /// once QUIC lasts, the run ends.
    #[test]
    fn a_path_that_keeps_cutting_quic_keeps_the_probe_at_its_longest_wait() {
        let probe = Duration::from_secs(60);
        for lifetime in [Duration::from_secs(6 * 60), Duration::from_secs(20)] {
            let mut s = QuicStrikes::new(probe);
            let mut now = Instant::now();
            let mut waits = Vec::new();
            for _ in 0..12 {
                now += lifetime;
                s.session_ended(now, true);
                let wait = s.probe_interval(probe, now);
                waits.push(wait.as_secs() / 60);
                now += wait;
            }
            assert_eq!(s.mode(TransportMode::Auto, now), TransportMode::Tcp);
            assert_eq!(
                waits,
                [1, 2, 4, 8, 16, 32, 32, 32, 32, 32, 32, 32],
                "{lifetime:?}: probe waits in minutes"
            );
            // QUIC holds from the last probe on: the run ends.
            let later = now + s.memory;
            assert_eq!(s.count(later), 0);
            assert_eq!(s.mode(TransportMode::Auto, later), TransportMode::Auto);
        }
        // A longer configured probe lengthens the memory with it.
        let s = QuicStrikes::new(Duration::from_secs(300));
        assert_eq!(s.memory, Duration::from_secs(2 * 32 * 300));
    }
}
