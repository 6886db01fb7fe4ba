//! One registered session, run until it ends: streams the relay opens,
//! the control stream (pings, route and service updates, replica sets,
//! GOAWAY), liveness, and the moves to a new connection (a QUIC probe
//! from the TCP fallback, a renewed certificate).

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use relay_protocol::codec::{self, decode_control, write_frame, Incoming};
use relay_protocol::{close_code, Cidr, Control};
use relay_transport::grant::StreamGrant;
use relay_transport::udp::FlowTable;
use relay_transport::{BiStream, TunnelConn};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn, Instrument};

use crate::client::{EdgeState, EdgeStats};
use crate::config::{EdgeConfig, TransportMode};
use crate::dial::{connect_noting, AttemptError, Connected, Dialer};
use crate::identity::{Credentials, IdentityError};
use crate::liveness::{Liveness, StallProbe, Tick, DEAD_AFTER_KEEPALIVES, STALL_CHECK};
use crate::serve::{serve_stream, ServedRoutes, ServedSet};
use crate::services::EdgeServices;

mod moves;

use moves::{failed_move, finish_move, move_noted, MoveDrain};
pub(crate) use moves::{ProbeBackoff, Retired};

/// A certificate already due for renewal when a session starts is renewed
/// at a point drawn within this.
const DUE_SPREAD: Duration = Duration::from_secs(120);
/// About this long (drawn from 0.75 to 1.25 of it) after a failed
/// renewal, the next try.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// Why a session's loop ended.
pub(crate) enum SessionEnd {
    /// The session is gone; reconnect after backoff.
    Lost(String),
    /// A new session replaced this one (a QUIC probe from the TCP
    /// fallback, a renewed certificate); run it now. With the old
    /// session's control stream when the move was planned with the relay
    /// ([`Control::Moving`]): the old connection then drains (see
    /// `retire` in `client/reconnect.rs`).
    Upgrade(Box<Connected>, Option<Retired>),
}

/// Least time between two reports of the LAN overlaps to the relay.
const LAN_REPORT_GAP: std::time::Duration = std::time::Duration::from_secs(10);

/// What the reconnect loop tells [`run_session`], and what it learns back
/// besides how the session ended.
#[derive(Debug)]
pub(crate) struct SessionIo {
    /// In: how long the QUIC probe waits on the TCP fallback (see
    /// `crate::client::QuicStrikes`).
    pub(crate) probe_interval: Duration,
    /// Out: the relay said it is draining (GOAWAY): a restart or a rolling
    /// update, so the caller reconnects at a short pace (see `backoff`).
    pub(crate) went_away: bool,
    /// Out: the edge's own liveness check gave the path up.
    pub(crate) path_dead: bool,
}

/// Runs one session until it ends (see [`SessionIo`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_session(
    conn: &TunnelConn,
    flows: &Arc<FlowTable>,
    control: BiStream,
    cfg: &Arc<EdgeConfig>,
    served: &Arc<ServedSet>,
    services: &EdgeServices,
    creds: &Arc<Credentials>,
    stats: &Arc<EdgeStats>,
    cancel: &CancellationToken,
    state: &watch::Sender<EdgeState>,
    dns: Option<&crate::dns::Resolver>,
    relay_caps: u32,
    io: &mut SessionIo,
) -> SessionEnd {
    let BiStream { mut send, recv } = control;
    // A relay that can use it learns our keep-alive: on QUIC it then ends
    // the session after two intervals without a packet from us, which is
    // how a path dead only upstream is noticed (we still hear the relay).
    if relay_caps & relay_protocol::capability::EDGE_KEEPALIVE != 0 {
        let interval_ms = u32::try_from(cfg.quic.keepalive.as_millis()).unwrap_or(u32::MAX);
        let told = Control::Keepalive { interval_ms };
        if let Err(end) = send_control(conn, &mut send, &told, cfg).await {
            return end;
        }
    }
    // The tunnel routes our LANs shadow (capture's plan), for a relay that
    // shows them: the current set first if there is one, then each change.
    let mut lan_report = relay_caps & relay_protocol::capability::LAN_OVERLAPS != 0;
    let mut overlaps = stats.lan_overlaps.subscribe();
    if lan_report && !overlaps.borrow().is_empty() {
        overlaps.mark_changed();
    }
    // At most one report per LAN_REPORT_GAP: other edges' host routes
    // overlap a LAN range many sites reuse, so each edge joining or
    // leaving changes the set on every such site; changes in between are
    // folded into the next report (the watch keeps the latest).
    let report_gate = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(report_gate);
    let mut gated = false;
    // Whether capture is on the node, for a relay that shows it (to the
    // operator who cannot see this node's metrics): the current state
    // first, then each change capture publishes (installed or failed, not
    // every retry: see `CaptureReport::due`). Nothing without capture.
    let mut capture_report = relay_caps & relay_protocol::capability::CAPTURE_STATUS != 0;
    let mut capture = stats.capture_report.subscribe();
    if capture_report && capture.borrow().is_some() {
        capture.mark_changed();
    }
    // Service names for the resolver, put together per session.
    let mut names = dns.map(crate::dns::Resolver::batch);
    let mut frames = codec::control_reader(recv);
    // Tunnel routes being assembled from RouteDelta frames; published to
    // the state (and so to capture) only when a batch is complete, so the
    // kernel never sees half of a large update.
    let mut routes: std::collections::BTreeSet<Cidr> = match &*state.borrow() {
        EdgeState::Connected { tunnel_routes, .. } => tunnel_routes.iter().copied().collect(),
        _ => Default::default(),
    };
    // On TCP the relay pings every keep-alive interval, and a relay silent
    // for the idle timeout is gone (yamux has no idle timeout of its own;
    // on QUIC the connection's does this).
    let mut last_heard = Instant::now();
    // The path check (see `liveness`): on TCP our control pings, on QUIC
    // what arrives, with a control ping every `QUIC_CONTROL_PING`. Either
    // way a dead path is noticed within 3 × keep-alive, while a late answer
    // on a congested uplink costs nothing.
    let mut liveness = match conn.kind() {
        relay_transport::TransportKind::Quic => Liveness::quic(cfg.quic.keepalive),
        relay_transport::TransportKind::Tcp => Liveness::new(cfg.quic.keepalive),
    };
    let mut rtt_logged: Option<Instant> = None;
    // QUIC: a flow from the relay that stops dead is probed at once (see
    // StallProbe); on TCP the control pings above find a rebinding.
    let quic = conn.kind() == relay_transport::TransportKind::Quic;
    let mut stall = StallProbe::default();
    let mut stall_tick = tokio::time::interval(STALL_CHECK);
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The relay's stream credit starts small and grows with use (see
    // relay_transport::grant).
    let mut grant = StreamGrant::new(conn, cfg.quic.max_bidi_streams);
    let mut svc_batch = crate::services::Batch::default();
    // The first ping at a random point of the first interval, not at once:
    // edges that connected together (after a relay restart, a thousand
    // within seconds) then ping spread over the interval, not in one burst
    // the relay answers while its data path waits. The dead-path bound is
    // unchanged: later pings still leave every interval.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.quic.keepalive.mul_f64(rand::random::<f64>()),
        cfg.quic.keepalive,
    );
    // A tick delayed (a busy runtime) must not fire a burst of pings that
    // would then all count as in flight.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // On the TCP fallback in auto mode, keep trying QUIC in the background.
    let probing =
        cfg.transport == TransportMode::Auto && conn.kind() == relay_transport::TransportKind::Tcp;
    // Each failed probe doubles the wait for the next: on a path that
    // blocks UDP every probe sends a handshake's worth of full-size QUIC
    // Initials for nothing, which at a fixed minute was ~12 MB a day per
    // replica on a metered uplink. A new session starts from the base.
    let mut probe_wait = ProbeBackoff::new(
        io.probe_interval,
        cfg.quic_probe_interval
            .saturating_mul(crate::client::QuicStrikes::MAX_PROBE_FACTOR),
    );
    let mut probe_at = tokio::time::Instant::now() + probe_wait.jittered(&mut rand::rng());
    // Owned: dropping it (the session ends, the client shuts down) aborts
    // the probe, so a probe can never outlive its session and register a
    // QUIC session that supersedes a newer one (or appears after shutdown).
    let mut probe: Option<AbortOnDropHandle<Result<Connected, AttemptError>>> = None;
    // Certificate renewal (bootstrap identity): at its renewal point (drawn
    // between 0.6 and 0.8 of the certificate's life) a new one is obtained and the session moves to a
    // new connection that uses it; owned like the probe.
    // One already due (the session came back after an outage longer
    // than the rest of its life before renewal, as every edge's did) is
    // renewed within the next two minutes, at a point drawn for this
    // session, not at once: a fleet coming back together spreads its
    // TokenReviews and session moves.
    let mut renew_at = creds.renew_at(cfg).map(|t| {
        tokio::time::Instant::now()
            + t.duration_since(std::time::SystemTime::now())
                .unwrap_or_else(|_| DUE_SPREAD.mul_f64(rand::random::<f64>()))
    });
    let mut renewal: Option<AbortOnDropHandle<Result<Connected, AttemptError>>> = None;
    // A certificate given by hand is renewed by whoever writes its files
    // (cert-manager): checked every [`GIVEN_FILES_CHECK`], a new one moves
    // the session to it the way a renewal does (planned, streams drained),
    // long before the relay would close the session at the old one's
    // notAfter.
    let mut given_seen = creds.given_changes(cfg);
    let mut given_check = tokio::time::interval_at(
        tokio::time::Instant::now() + GIVEN_FILES_CHECK,
        GIVEN_FILES_CHECK,
    );
    // Planned moves (renewal, probe): a relay that knows them is told
    // first (`Control::Moving`) and drains this session instead of
    // closing it when the new one registers, so streams in flight here
    // (kubectl logs -f, exec, port-forwards) are not cut. The move dials
    // once the relay answered with the nonce (bounded).
    let moves = relay_caps & relay_protocol::capability::MOVES != 0;
    let (move_ack, _) = watch::channel(0u64);
    let ack_wait = cfg.handshake_timeout;
    let mut goaway_grace: Option<u32> = None;
    // Whether a GOAWAY is the drain of a move that failed (see
    // `MoveDrain`), with the pending move's "hello sent" flags.
    let mut move_drain = MoveDrain::default();
    let probe_hello = Arc::new(AtomicBool::new(false));
    let renewal_hello = Arc::new(AtomicBool::new(false));
    loop {
        let reply = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                conn.close(close_code::NORMAL, "edge shutting down");
                return SessionEnd::Lost("shutdown".into());
            }
            why = conn.closed() => {
                return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, why).await;
            }
            bi = conn.accept_bi() => match bi {
                Ok(bi) => {
                    let f = (conn.clone(), flows.clone());
                    let open = grant.accepted();
                    // Boxed: the task holds a pointer rather than the
                    // stream's whole state machine, which tokio copies
                    // while spawning and finishing a task.
                    let serve = Box::pin(serve_stream(bi, f, cfg.clone(), served.clone(), stats.clone()));
                    tokio::spawn(open.serving(serve).in_current_span());
                    continue;
                }
                Err(e) => {
                    return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, e.to_string()).await;
                }
            },
            f = frames.next() => match f {
                Some(Ok(bytes)) => {
                    last_heard = Instant::now();
                    let msg = match decode_control(&bytes) {
                        Ok(Incoming::Known { msg, .. }) => msg,
                        Ok(Incoming::Unknown { variant }) => {
                            // A newer relay's message: ignore it, so rolling
                            // upgrades never cost a session.
                            stats.control_unknown.fetch_add(1, Relaxed);
                            debug!(variant, "ignoring unknown control message");
                            continue;
                        }
                        Err(e) => {
                            conn.close(close_code::PROTOCOL, "bad control frame");
                            return SessionEnd::Lost(format!("bad control frame: {e}"));
                        }
                    };
                    match msg {
                        Control::Ping { nonce } => Control::Pong { nonce },
                        Control::Pong { nonce } => {
                            let late = liveness.in_flight() > 1;
                            if let Some(rtt) = liveness.pong(nonce, Instant::now()) {
                                note_rtt(stats, rtt, late, &mut rtt_logged);
                            }
                            continue;
                        }
                        Control::RouteUpdate { tunnel_routes } => {
                            routes = tunnel_routes.iter().copied().collect();
                            publish_routes(state, tunnel_routes);
                            continue;
                        }
                        Control::RouteDelta { reset, add, remove, complete } => {
                            if reset {
                                routes.clear();
                            }
                            for c in &remove {
                                routes.remove(c);
                            }
                            routes.extend(add);
                            if complete {
                                publish_routes(state, routes.iter().copied().collect());
                            }
                            continue;
                        }
                        Control::ServedRoutes { routes, primary_addr } => {
                            info!(?routes, ?primary_addr, "relay changed what this edge serves");
                            served.set(ServedRoutes { routes: routes.clone(), primary: primary_addr });
                            state.send_modify(|s| {
                                if let EdgeState::Connected { served_routes, .. } = s {
                                    *served_routes = routes;
                                }
                            });
                            continue;
                        }
                        Control::Replicas { replicas } => {
                            // The supervisor reads it from the state and
                            // keeps one session per replica.
                            debug!(?replicas, "relay replica set");
                            state.send_modify(|s| {
                                if let EdgeState::Connected { replicas: r, .. } = s {
                                    *r = Some(replicas);
                                }
                            });
                            continue;
                        }
                        msg @ Control::ServiceDelta { .. } => {
                            svc_batch.apply(&msg, services);
                            continue;
                        }
                        Control::ServiceNames { reset, cluster_domain, upsert, remove, complete } => {
                            if let Some(n) = names.as_mut() {
                                n.frame(reset, cluster_domain, upsert, remove, complete);
                            }
                            continue;
                        }
                        Control::Moving { nonce } => {
                            move_ack.send_replace(nonce);
                            continue;
                        }
                        Control::GoAway { reason, grace_ms } => {
                            // The relay stops opening streams and closes when
                            // the in-flight ones are done; we reconnect then.
                            info!(%reason, grace_ms, "relay sent GOAWAY");
                            io.went_away = true;
                            state.send_modify(|s| {
                                if let EdgeState::Connected { draining, .. } = s {
                                    *draining = true;
                                }
                            });
                            goaway_grace = Some(grace_ms);
                            // Maybe the drain for a move whose hello is
                            // out (its outcome decides), or late for one
                            // that failed with its hello out: the relay
                            // registered its session, which then ended
                            // (see `MoveDrain`, `failed_move`).
                            let pending = (probe.is_some() || renewal.is_some()).then(|| {
                                (probe.is_some() && probe_hello.load(Acquire))
                                    || (renewal.is_some() && renewal_hello.load(Acquire))
                            });
                            if moves && move_drain.goaway(pending, Instant::now()) {
                                return failed_move(conn, "the relay drains this session after a move that failed");
                            }
                            continue;
                        }
                        _ => continue,
                    }
                }
                Some(Err(e)) => {
                    conn.close(close_code::PROTOCOL, "bad control frame");
                    return SessionEnd::Lost(format!("control stream: {e}"));
                }
                None => {
                    let why = "relay closed the control stream".to_string();
                    return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, why).await;
                }
            },
            () = &mut report_gate, if gated => {
                gated = false;
                continue;
            }
            r = overlaps.changed(), if lan_report && !gated => {
                if r.is_err() {
                    // No sender any more (cannot happen while the stats
                    // live): stop asking rather than spin.
                    lan_report = false;
                    continue;
                }
                let mut routes = overlaps.borrow_and_update().clone();
                routes.truncate(Control::MAX_LAN_OVERLAPS);
                report_gate.as_mut().reset(tokio::time::Instant::now() + LAN_REPORT_GAP);
                gated = true;
                Control::LanOverlaps { routes }
            }
            r = capture.changed(), if capture_report => {
                if r.is_err() {
                    capture_report = false;
                    continue;
                }
                let Some(now) = capture.borrow_and_update().clone() else { continue };
                Control::capture_status(now.installed, &now.error)
            }
            _ = tick.tick() => {
                let received = conn.datagrams_received();
                if received.is_some() {
                    let us = u64::try_from(conn.rtt().as_micros()).unwrap_or(u64::MAX);
                    stats.path_rtt_us.store(us, Relaxed);
                    stats.path_rtt_max_us.fetch_max(us, Relaxed);
                }
                if received.is_none() && last_heard.elapsed() > cfg.quic.idle_timeout {
                    conn.close(close_code::PROTOCOL, "relay silent");
                    stats.paths_dead.fetch_add(1, Relaxed);
                    io.path_dead = true;
                    return SessionEnd::Lost(format!("nothing from the relay for {:.1}s", last_heard.elapsed().as_secs_f64()));
                }
                // The edge pings too: after a NAT rebinding an idle TCP
                // session would otherwise send nothing until its idle
                // timeout, while the relay's pings die at the NAT. Our ping
                // leaves through the new mapping, the relay's kernel resets
                // the unknown connection, and we reconnect in seconds.
                // (On QUIC, QUIC's keep-alive does this, and a rebinding is
                // just a new path to the relay.)
                match liveness.tick(Instant::now(), rand::random(), Some(conn.arrivals()), conn.rtt()) {
                    Tick::Ping(nonce) => Control::Ping { nonce },
                    Tick::Quiet => continue,
                    Tick::Dead(dead) => {
                        conn.close(close_code::PROTOCOL, "path dead");
                        stats.paths_dead.fetch_add(1, Relaxed);
                        io.path_dead = true;
                        return SessionEnd::Lost(format!("{dead} (control pings in flight: {})", liveness.in_flight()));
                    }
                }
            }
            _ = stall_tick.tick(), if quic => {
                let busy = stats.open_streams.load(Relaxed) > 0
                    || stats.udp.flows_open.load(Relaxed) > 0;
                match conn.datagrams_received() {
                    Some(n) if stall.check(n, busy) => {
                        stats.stall_probes.fetch_add(1, Relaxed);
                        debug!("data from the relay stopped with streams open; probing the path");
                        // Its pong matches no tracked ping and is ignored:
                        // what counts is that it leaves now.
                        Control::Ping { nonce: rand::random() }
                    }
                    _ => continue,
                }
            }
            _ = given_check.tick(), if given_seen.is_some() => {
                let now = creds.given_changes(cfg);
                if now != given_seen && renewal.is_none() {
                    info!("certificate files hold a new certificate; moving the session to it");
                    given_seen = now;
                    renew_at = Some(tokio::time::Instant::now());
                }
                continue;
            }
            _ = sleep_until_some(renew_at), if renew_at.is_some() && renewal.is_none() => {
                let (cfg, stats, creds) = (cfg.clone(), stats.clone(), creds.clone());
                let quic_worked = conn.kind() == relay_transport::TransportKind::Quic;
                // The renewal (one handshake) and the new session's dial
                // (itself bounded per address by a handshake timeout, plus
                // the TCP fallback's) both fit, so an address that does not
                // answer is passed over before the limit cuts the attempt.
                // Plus the wait for the relay's answer to the move.
                let limit = cfg.handshake_timeout * 3 + cfg.quic_fallback_after + ack_wait;
                let nonce = rand::random::<u64>() | 1;
                let ack = moves.then(|| move_ack.subscribe());
                renewal_hello.store(false, Release);
                let hello_sent = renewal_hello.clone();
                renewal = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    let work = async {
                        let dialer = Dialer { cfg: &cfg, stats: &stats, mode: cfg.transport, quic_worked, probe: false };
                        creds.renew(&cfg, &dialer).await.map_err(|e| match e {
                            IdentityError::Refused(r) => AttemptError::Rejected(r),
                            IdentityError::Failed(m) => AttemptError::Failed(m),
                        })?;
                        move_noted(ack, nonce, ack_wait).await;
                        connect_noting(&cfg, &stats, cfg.transport, &creds, quic_worked, false, &hello_sent).await
                    };
                    tokio::time::timeout(limit, work)
                        .await
                        .unwrap_or_else(|_| Err(AttemptError::Failed(format!("no renewed session within {limit:?}"))))
                })));
                if !moves {
                    continue;
                }
                Control::Moving { nonce }
            }
            r = async {
                match renewal.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if renewal.is_some() => {
                renewal = None;
                match r {
                    Ok(Ok(c)) => {
                        info!("certificate renewed; moving the session to it");
                        return SessionEnd::Upgrade(Box::new(c), Some(Retired { grace_ms: goaway_grace, send, frames }));
                    }
                    Ok(Err(e)) if moves && move_drain.failed(
                        renewal_hello.load(Acquire),
                        matches!(e, AttemptError::Rejected(_)),
                        Instant::now(),
                    ) => {
                        return failed_move(conn, &format!("the move to a renewed certificate failed after the relay moved the node: {e:?}"));
                    }
                    Ok(Err(e)) => {
                        // The current certificate is still valid: try again
                        // in a minute, until it is not.
                        // About a minute, drawn: edges refused together
                        // (the apiserver's TokenReview budget spent) do
                        // not all come back in the same second.
                        let wait = RENEW_RETRY.mul_f64(rand::random_range(0.75..1.25));
                        warn!(error = ?e, "certificate renewal failed; retrying in {}s", wait.as_secs());
                        renew_at = Some(tokio::time::Instant::now() + wait);
                    }
                    Err(e) => {
                        if moves && move_drain.failed(renewal_hello.load(Acquire), false, Instant::now()) {
                            return failed_move(conn, "the move to a renewed certificate failed after the relay moved the node");
                        }
                        warn!(error = %e, "certificate renewal task failed");
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(probe_at), if probing && probe.is_none() => {
                let (cfg, stats, creds) = (cfg.clone(), stats.clone(), creds.clone());
                // A full QUIC session: registering it supersedes this one on
                // the relay, in one step, so the routes never go away.
                // Bounded like any attempt, so a probe into a black hole
                // ends and the next one can start.
                // A probe (last `true`): its failures never move the
                // relay's address turn (see `Dialer::probe`).
                // Twice the handshake timeout: the probe may walk several
                // addresses (their QUIC attempts together take at most one
                // handshake timeout, see `Dialer::probe_each`), then says
                // hello.
                // Plus the wait for the relay's answer to the move.
                let limit = cfg.handshake_timeout.saturating_mul(2) + ack_wait;
                let nonce = rand::random::<u64>() | 1;
                let ack = moves.then(|| move_ack.subscribe());
                probe_hello.store(false, Release);
                let hello_sent = probe_hello.clone();
                probe = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    let work = async {
                        move_noted(ack, nonce, ack_wait).await;
                        connect_noting(&cfg, &stats, TransportMode::Quic, &creds, false, true, &hello_sent).await
                    };
                    tokio::time::timeout(limit, work)
                        .await
                        .unwrap_or_else(|_| Err(AttemptError::Failed(format!("no QUIC session within {limit:?}"))))
                })));
                if !moves {
                    continue;
                }
                Control::Moving { nonce }
            }
            r = async {
                match probe.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if probe.is_some() => {
                probe = None;
                if moves && !matches!(r, Ok(Ok(_))) {
                    let refused = matches!(r, Ok(Err(AttemptError::Rejected(_))));
                    let sent = probe_hello.load(Acquire);
                    if move_drain.failed(sent, refused, Instant::now()) {
                        return failed_move(conn, "the QUIC probe's move failed after the relay moved the node");
                    }
                }
                match r {
                    Ok(Ok(c)) => return SessionEnd::Upgrade(Box::new(c), Some(Retired { grace_ms: goaway_grace, send, frames })),
                    Ok(Err(AttemptError::Failed(e))) => debug!(error = %e, "QUIC probe failed; staying on TCP"),
                    Ok(Err(AttemptError::Rejected(r))) => debug!(reason = r.reason.as_str(), "QUIC probe rejected"),
                    Err(e) => debug!(error = %e, "QUIC probe task failed"),
                }
                probe_wait.failed();
                probe_at = tokio::time::Instant::now() + probe_wait.jittered(&mut rand::rng());
                debug!(after = ?probe_wait.wait(), "next QUIC probe");
                continue;
            }
        };
        if let Err(end) = send_control(conn, &mut send, &reply, cfg).await {
            return end;
        }
    }
}

/// Writes one control message, bounded: on a path that died silently (a
/// NAT that rebound and dropped the relay's reset) a write on the TCP
/// fallback can block. It fails once nothing has arrived from the relay
/// for two keep-alive intervals while it waits (the allowance of an
/// unanswered ping), so a write started by a tick still fails within
/// 3 × keep-alive of the path's death. While the relay's bytes keep
/// arriving the path lives and the write waits, as long as an unanswered
/// ping may (2 × [`relay_protocol::QUIC_CONTROL_PING`]): on the fallback
/// a control message still waits for the bytes ahead of it in the socket
/// and the modem's queue (the streams' budget inside yamux keeps the
/// rest short), which on a slow, deep-buffered uplink can take longer
/// than two keep-alives.
async fn send_control(
    conn: &TunnelConn,
    send: &mut relay_transport::SendHalf,
    msg: &Control,
    cfg: &EdgeConfig,
) -> Result<(), SessionEnd> {
    let keepalive = cfg.quic.keepalive;
    let write = write_frame(send, msg);
    tokio::pin!(write);
    let started = Instant::now();
    let mut seen = conn.arrivals();
    let mut heard = started;
    loop {
        match tokio::time::timeout(keepalive / 4, &mut write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => return Err(SessionEnd::Lost(format!("control write: {e}"))),
            Err(_) => {
                let now = conn.arrivals();
                if now != seen {
                    seen = now;
                    heard = Instant::now();
                }
                if let Some(why) = write_stuck(started.elapsed(), heard.elapsed(), keepalive) {
                    conn.close(close_code::PROTOCOL, "control write stuck");
                    return Err(SessionEnd::Lost(why));
                }
            }
        }
    }
}

/// Whether a control write that has waited `waited`, with nothing from
/// the relay for `quiet`, is stuck on a dead path (see [`send_control`]):
/// the reason, else `None`.
fn write_stuck(waited: Duration, quiet: Duration, keepalive: Duration) -> Option<String> {
    let limit = keepalive * DEAD_AFTER_KEEPALIVES;
    let longest = limit.max(relay_protocol::QUIC_CONTROL_PING * DEAD_AFTER_KEEPALIVES);
    if quiet >= limit {
        Some(format!(
            "control write not done within {waited:.1?}, nothing received for {quiet:.1?}"
        ))
    } else if waited >= longest {
        Some(format!(
            "control write not done within {waited:.1?} while the relay's bytes arrived"
        ))
    } else {
        None
    }
}

/// How often a session whose certificate was given by hand (files) checks
/// whether the files hold a new one.
const GIVEN_FILES_CHECK: Duration = Duration::from_secs(10);

/// How often a healthy control RTT is logged at info (every pong is at
/// debug). Once an hour: a QUIC edge pongs every 2 minutes and a TCP one
/// every keep-alive, and a line per pong was the only info line a healthy
/// edge wrote (30 to 56 an hour, millions a day across a fleet).
const RTT_LOG_EVERY: Duration = Duration::from_secs(3600);

/// How often a degraded control RTT (a late pong, or one of at least
/// [`RTT_SLOW`]) is logged at info, so an operator sees a degraded uplink in
/// the edge's log without debug logging.
const RTT_LOG_DEGRADED_EVERY: Duration = Duration::from_secs(60);

/// A control round trip this long is a degraded uplink worth a line.
const RTT_SLOW: Duration = Duration::from_secs(1);

/// Whether a pong's round trip is logged at info: the first, then a healthy
/// one hourly and a degraded one (`late`, or `rtt` of at least
/// [`RTT_SLOW`]) once a minute; `since` is how long ago the last was.
fn rtt_at_info(rtt: Duration, late: bool, since: Option<Duration>) -> bool {
    let degraded = late || rtt >= RTT_SLOW;
    since.is_none_or(|s| s >= RTT_LOG_EVERY || (degraded && s >= RTT_LOG_DEGRADED_EVERY))
}

/// Records a measured control RTT in the stats, and logs it: at debug for
/// every pong, at info as [`rtt_at_info`] says.
fn note_rtt(stats: &EdgeStats, rtt: Duration, late: bool, logged: &mut Option<Instant>) {
    let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
    stats.control_rtt_us.store(us, Relaxed);
    stats.control_rtt_max_us.fetch_max(us, Relaxed);
    if late {
        stats.pongs_late.fetch_add(1, Relaxed);
    }
    let rtt_ms = rtt.as_secs_f64() * 1000.0;
    if rtt_at_info(rtt, late, logged.map(|t| t.elapsed())) {
        *logged = Some(Instant::now());
        info!(rtt_ms, late, "control channel round trip");
    } else {
        debug!(rtt_ms, late, "control channel round trip");
    }
}

/// Sleeps until `at`; never, for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Makes a complete set of tunnel routes the session's (capture follows).
fn publish_routes(state: &watch::Sender<EdgeState>, routes: Vec<Cidr>) {
    state.send_modify(|s| {
        if let EdgeState::Connected {
            tunnel_routes,
            routes_complete,
            ..
        } = s
        {
            *tunnel_routes = routes;
            *routes_complete = true;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first round trip is logged at info, then a healthy one hourly
    /// and a degraded one (late, or 1 s and more) at most once a minute.
    #[test]
    fn control_round_trips_reach_info_first_hourly_or_when_degraded() {
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        assert!(rtt_at_info(ms(20), false, None));
        assert!(!rtt_at_info(ms(20), false, Some(s(120))), "a healthy pong");
        assert!(!rtt_at_info(ms(20), false, Some(s(3599))));
        assert!(rtt_at_info(ms(20), false, Some(s(3600))), "hourly");
        assert!(rtt_at_info(s(1), false, Some(s(60))), "slow");
        assert!(rtt_at_info(ms(20), true, Some(s(60))), "late");
        assert!(!rtt_at_info(s(4), true, Some(s(59))), "once a minute");
    }

    /// A control write waiting while nothing arrives fails after two
    /// keep-alives; while the relay's bytes arrive it waits as long as an
    /// unanswered ping may (2 × 2 min), then fails too.
    #[test]
    fn a_control_write_is_stuck_by_silence_or_by_the_long_bound() {
        let s = Duration::from_secs;
        let k = s(8);
        assert_eq!(write_stuck(s(15), s(15), k), None);
        assert!(write_stuck(s(16), s(16), k).is_some_and(|w| w.contains("nothing received")));
        // Bytes arriving: a minute behind uploads is not a dead path.
        assert_eq!(write_stuck(s(60), s(1), k), None);
        assert_eq!(write_stuck(s(239), s(1), k), None);
        assert!(write_stuck(s(240), s(1), k).is_some_and(|w| w.contains("bytes arrived")));
        // A keep-alive longer than the ping bound keeps its own limit.
        assert_eq!(write_stuck(s(299), s(298), s(150)), None);
        assert!(write_stuck(s(300), s(300), s(150)).is_some());
    }
}
