//! One edge session: its control-stream actor (control messages both
//! ways, route updates, pings, streams the edge opens). Its handle (what
//! the relay knows and counts about it, and opening tunnel streams towards
//! the edge) is in `session/handle.rs`; the handshake that creates it is in
//! [`crate::handshake`].

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use relay_protocol::codec::{self, decode_control, write_frame, Incoming};
use relay_protocol::{capability, close_code, Control};
use relay_transport::grant::StreamGrant;
use relay_transport::{BiStream, SendHalf};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::liveness::{control_check, first_tick, ControlCheck};
use crate::routefeed::{FeedUpdate, RouteFeed};
use crate::server::Shared;

pub(crate) mod cert_check;
mod handle;
#[cfg(test)]
pub(crate) mod tests;

pub(crate) use handle::supersede;
pub use handle::{SessionHandle, StreamGuard};

/// Control messages queued for the edge by the relay's own bookkeeping.
pub(crate) type ControlRx = mpsc::Receiver<Box<Control>>;
/// What a session's actor runs on: the control stream, the queue of
/// relay-side control messages, and the edge's route feed.
pub(crate) type ControlParts = (BiStream, ControlRx, RouteFeed);

/// Which other edges' routes `node` is told about and may reach.
pub(crate) fn visible<'a>(shared: &'a Shared, node: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |other| shared.policy.edges_may_talk(node, other)
}

/// Logs and counts a whole route list cut to fit an older edge's frame.
pub(crate) fn note_cut(shared: &Shared, feed: &RouteFeed) {
    if feed.was_cut() {
        shared.metrics.route_lists_cut.fetch_add(1, Relaxed);
        warn!(
            max = crate::routefeed::LEGACY_MAX_ROUTES,
            "route list cut to fit one frame: this edge predates route deltas; upgrade it"
        );
    }
}

/// Writes control frames in order, each bounded by `limit`.
async fn write_all(send: &mut SendHalf, frames: &[Control], limit: Duration) -> Result<(), String> {
    for f in frames {
        match tokio::time::timeout(limit, write_frame(send, f)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("control write: {e}")),
            Err(_) => return Err("control write timed out".to_string()),
        }
    }
    Ok(())
}

/// The session's actor: control messages both ways, route updates, pings,
/// streams the edge opens; until the connection ends.
pub(crate) async fn run_session(
    handle: Arc<SessionHandle>,
    (control, mut control_rx, mut feed): ControlParts,
    shared: Arc<Shared>,
) {
    let routes = shared.registry.routes_of(&handle.node);
    info!(remote = %handle.conn.remote_addr(), ?routes, "session up");
    handle.report_status(&shared);
    // Ends by itself when the connection closes.
    tokio::spawn(relay_transport::udp::pump_datagrams(
        handle.conn.clone(),
        handle.flows.clone(),
    ));
    handle.touch();
    let BiStream { mut send, recv } = control;
    let mut frames = codec::control_reader(recv);
    // The relay pings every keep-alive interval when the edge has been
    // silent: on QUIC this measures "last seen" for operators (QUIC
    // keep-alives hold the NAT binding); on the TCP fallback it is also the
    // liveness check yamux lacks, and keeps the NAT binding of an idle TCP
    // connection warm. See the tick arm for why a pinging edge is not
    // pinged back, what changes for an edge that checks the path with
    // QUIC's own PINGs (`lean`), and `first_tick` for the phase.
    let keepalive = shared.cfg.quic.keepalive;
    let quic = handle.conn.kind() == relay_transport::TransportKind::Quic;
    // A QUIC edge that checks the path with QUIC's own PINGs and pings the
    // control stream every `QUIC_CONTROL_PING` (see the tick arm).
    let lean = quic && handle.has(capability::QUIC_LIVENESS);
    // Whose control stream is held to `control_check`'s slow bound (the
    // sweep watches their path by what arrives): `lean` edges, and TCP
    // edges, whose messages may queue behind their uploads.
    let slow_control = crate::liveness::judged_by_arrivals(&handle);
    let mut last_control = Instant::now();
    let mut ping = tokio::time::interval_at(first_tick(keepalive), keepalive);
    // A runtime held up must not answer with a burst of pings.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let write_timeout = shared.cfg.limits.handshake_timeout;
    // Route updates: the registry says "something changed"; we wait a
    // moment so a burst of sessions coming or going costs one update, then
    // send what changed for this edge (see RouteFeed). An edge with route
    // deltas got no routes in its hello: its first full set goes now. An
    // older edge got its whole list in the hello, but the feed looks once
    // more now all the same: the receiver below counts every change made
    // before it as seen, and a peer that registered between the hello's
    // list and here would otherwise reach this edge only with the next
    // unrelated change. Nothing goes when nothing changed (the feed's
    // journal cursor says so).
    let mut changes = shared.registry.subscribe();
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    let mut update_due = true;
    // The edge's ClusterIP table (edges that understand it): the whole
    // table first, then what changed, a moment after each change.
    let wants_services = handle.capabilities & capability::SERVICES != 0;
    // Node ports in that table, for edges that capture them.
    let node_ports = handle.has(capability::NODE_PORTS);
    let mut svc_feed = crate::service_feed::ServiceFeed::default();
    // Its resolver's name table, the same way (edges running `[dns]`).
    let wants_names = handle.capabilities & capability::SERVICE_NAMES != 0;
    let mut names_feed = relay_protocol::NamesFeed::default();
    let mut svc_changes = shared.services.subscribe();
    let svc_settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(svc_settle);
    let mut svc_due = wants_services || wants_names;
    // The replica set, for edges that follow it (one session per replica).
    // The first set goes now; later ones whenever it changes.
    let mut replicas = shared.replicas.clone();
    let mut follows_replicas = handle.has(capability::REPLICAS);
    if follows_replicas {
        let set = replicas.borrow_and_update().clone();
        if !set.is_empty() {
            let msg = Control::Replicas { replicas: set };
            if let Err(why) = write_all(&mut send, &[msg], write_timeout).await {
                warn!(reason = %why, "sending the replica set failed");
            }
        }
    }
    // The edge's stream credit starts small and grows with use (see
    // relay_transport::grant).
    let mut grant = StreamGrant::new(&handle.conn, shared.cfg.quic.max_bidi_streams);
    let why = loop {
        let out = tokio::select! {
            biased;
            _ = handle.cancel.cancelled() => break handle.kicked_why(),
            why = handle.conn.closed() => break why,
            Some(msg) = control_rx.recv() => vec![*msg],
            bi = handle.conn.accept_bi() => match bi {
                Ok(bi) => {
                    let span = tracing::Span::current();
                    let open = grant.accepted();
                    let serve = crate::tunnel::serve_edge_stream(bi, handle.clone(), shared.clone());
                    tokio::spawn(open.serving(serve).instrument(span));
                    continue;
                }
                Err(e) => break e.to_string(),
            },
            // A draining session (a planned move left it) gets no more
            // routes, Services or replica sets: its successor does.
            r = replicas.changed(), if follows_replicas && !handle.is_draining() => {
                if r.is_err() {
                    follows_replicas = false;
                    continue;
                }
                let set = replicas.borrow_and_update().clone();
                // Never an empty set (as for the first): no edge should
                // drop its sessions on it, older ones included.
                if set.is_empty() {
                    continue;
                }
                vec![Control::Replicas { replicas: set }]
            }
            r = changes.changed(), if !update_due && !handle.is_draining() => {
                if r.is_err() {
                    break "relay stopping".to_string();
                }
                update_due = true;
                settle.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(100));
                continue;
            }
            _ = &mut settle, if update_due => {
                update_due = false;
                let cloud = shared.policy.cloud_ranges();
                feed.at_epoch(shared.policy.epoch());
                match feed.poll(&shared.registry, cloud, visible(&shared, &handle.node)) {
                    FeedUpdate::None => continue,
                    FeedUpdate::Send(frames) => {
                        note_cut(&shared, &feed);
                        frames
                    }
                }
            }
            r = svc_changes.changed(), if (wants_services || wants_names) && !svc_due && !handle.is_draining() => {
                if r.is_err() {
                    break "relay stopping".to_string();
                }
                svc_due = true;
                svc_settle.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(100));
                continue;
            }
            _ = &mut svc_settle, if svc_due => {
                if !shared.services.is_synced() {
                    // An empty table before the first list would make the
                    // edge drop what it captures now: wait for the list.
                    svc_settle.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(250));
                    continue;
                }
                svc_due = false;
                let snap = svc_changes.borrow_and_update().clone();
                let mut frames = Vec::new();
                if wants_services {
                    let zone = crate::route::placed(&shared, Some(&handle.node)).1;
                    let at = (handle.node.as_str(), zone.as_deref());
                    frames.extend(svc_feed.poll(&snap, at, node_ports).unwrap_or_default());
                }
                // Static mode has no names to give: say nothing rather
                // than an empty table that would wipe a saved one.
                if wants_names && !snap.cluster_domain.is_empty() {
                    frames.extend(names_feed.frames(&snap.names, &snap.cluster_domain));
                }
                if frames.is_empty() {
                    continue;
                }
                frames
            }
            f = frames.next() => match f {
                Some(Ok(bytes)) => {
                    handle.touch();
                    last_control = Instant::now();
                    match decode_control(&bytes) {
                        Ok(Incoming::Known { msg: Control::Ping { nonce }, .. }) => vec![Control::Pong { nonce }],
                        Ok(Incoming::Known { msg: Control::Pong { .. }, .. }) => continue,
                        Ok(Incoming::Known { msg: Control::Keepalive { interval_ms }, .. }) => {
                            // The silence sweep holds this edge to it.
                            debug!(interval_ms, "edge keep-alive");
                            handle.heard.tell_keepalive(interval_ms);
                            continue
                        }
                        Ok(Incoming::Known { msg: Control::Moving { nonce }, .. }) => {
                            // The edge's next session is a planned move:
                            // this one will drain, not close (`supersede`).
                            info!("edge announces a planned move to a new session");
                            handle.mark_moving();
                            vec![Control::Moving { nonce }]
                        }
                        Ok(Incoming::Known { msg: Control::LanOverlaps { mut routes }, .. }) => {
                            // Shown in the admin API; logged only when
                            // the set changes, so a repeating edge cannot
                            // flood the log.
                            routes.truncate(Control::MAX_LAN_OVERLAPS);
                            let mut held = handle.lan_overlaps.lock().unwrap_or_else(|e| e.into_inner());
                            if *held != routes {
                                if !routes.is_empty() && held.is_empty() {
                                    info!(routes = ?routes, "edge reports tunnel routes that overlap its LAN (reached there locally, never through the relay)");
                                } else {
                                    debug!(count = routes.len(), "edge's LAN overlaps changed");
                                }
                                *held = routes;
                            }
                            continue
                        }
                        Ok(Incoming::Known { msg: Control::CaptureStatus { installed, error }, .. }) => {
                            // Shown in the admin API, the metrics and the
                            // Node condition; a repeat changes nothing and
                            // writes nothing.
                            let now = crate::status::EdgeCapture::reported(installed, &error);
                            let Some(before) = handle.note_capture(now.clone()) else { continue };
                            let was_failing = before.as_ref().is_some_and(|c| !c.installed);
                            match now.failing() {
                                Some(error) if !was_failing => warn!(%error, "edge reports its capture is not installed: its pods do not reach the cloud through the tunnel"),
                                Some(error) => debug!(%error, "edge's capture error changed"),
                                None if was_failing => info!("edge reports its capture installed"),
                                None => debug!("edge reports its capture installed"),
                            }
                            handle.report_status(&shared);
                            continue
                        }
                        Ok(Incoming::Known { msg, .. }) => { debug!(?msg, "ignoring control message"); continue }
                        Ok(Incoming::Unknown { variant }) => {
                            // A newer edge's message: ignore it, so rolling
                            // upgrades never cost a session.
                            shared.metrics.control_unknown.fetch_add(1, Relaxed);
                            debug!(variant, "ignoring unknown control message");
                            continue
                        }
                        Err(e) => {
                            warn!(error = %e, "bad control frame; closing session");
                            handle.conn.close(close_code::PROTOCOL, "bad control frame");
                            break format!("protocol error: {e}");
                        }
                    }
                }
                Some(Err(e)) => {
                    handle.conn.close(close_code::PROTOCOL, "bad control frame");
                    break format!("control stream: {e}");
                }
                None => {
                    handle.conn.close(close_code::NORMAL, "control stream closed");
                    break "edge closed its control stream".to_string();
                }
            },
            _ = ping.tick() => {
                let quiet = last_control.elapsed();
                let check = control_check(quiet);
                if slow_control && check == ControlCheck::Wedged {
                    // The edge's session task stopped talking while its
                    // path (QUIC's PINGs, the TCP bytes) still works.
                    handle.conn.close(close_code::PROTOCOL, "control stream silent");
                    break format!("control stream silent for {quiet:?}");
                }
                if lean {
                    // The relay's silence sweep watches the path (the
                    // edge's PINGs keep it busy) and keeps "last seen"
                    // current for operators (`crate::liveness`). The
                    // control stream is checked at the edge's pace: a
                    // ping of ours only when its own is half an interval
                    // late, and a session whose edge stopped talking on it
                    // (its session task wedged while its QUIC stack
                    // answers) is closed (above).
                    if check == ControlCheck::Fine {
                        continue;
                    }
                    vec![Control::Ping { nonce: rand::random() }]
                } else {
                    // A silent edge is closed by the relay's silence sweep
                    // (`crate::liveness`), on both transports.
                    let ago = handle.last_seen_ago();
                    // On QUIC, an edge that pings (every keep-alive, see the
                    // edge's liveness) already shows it is there, and QUIC
                    // checks the path itself: a ping of ours would only double
                    // the control traffic of every idle session (relay CPU at
                    // 1,000 edges, an edge's metered bytes). An edge silent for
                    // 1.5 intervals (an older one, or one in trouble) is pinged
                    // as before. On TCP our ping is what finds a stale
                    // connection after a NAT rebinding (the NAT resets it), so
                    // it always goes.
                    if quic && ago < keepalive + keepalive / 2 {
                        continue;
                    }
                    vec![Control::Ping { nonce: rand::random() }]
                }
            }
        };
        if let Err(why) = write_all(&mut send, &out, write_timeout).await {
            break why;
        }
    };
    // A superseded session finds a newer generation here and leaves it be
    // (and leaves the node's condition to the newer session).
    // A replica shutting down (rolling update) does not mark its edges
    // down: they hold sessions to the other replicas.
    let leaving = shared.is_shutting_down() && shared.cfg.replicas.is_some();
    // The `down` carries the generation: a newer session of the node may
    // have registered and reported `up` since the removal (this task
    // preempted in between), and the sink keeps the newer report.
    handle.report_end(|| {
        if shared.registry.remove(&handle.node, handle.generation) && !leaving {
            let down = crate::status::Report::Down(&why);
            shared.status.report(&handle.node, handle.generation, down);
        }
    });
    // Not superseded (a supersede took it): see `close_predecessor`.
    handle.close_predecessor();
    info!(reason = %why, open_streams = handle.open_streams.load(Relaxed), "session down");
}
