//! Edge-side capture: traffic from this node's pods and host processes to
//! the relay's tunnel routes (cloud ranges, other edges' routes) is caught
//! by an nftables redirect and sent through the tunnel as streams the edge opens.
//!
//! The capture follows the sessions: the routes come from the hellos and
//! from `RouteUpdate`s, the union of what every connected session's relay
//! lists, and each captured connection or UDP flow goes on a session whose
//! relay lists its destination (the primary first; see
//! `supervisor::sessions`), so a peer edge one replica withdrew while
//! another serves it stays captured and reachable. While reconnecting, the
//! last routes stay installed and captured connections are reset at once,
//! so pod traffic fails fast instead of leaking out of the default route;
//! with `capture_state_file` also from the start of a process restarted
//! while the relay is away (`crate::capture_state`).

use std::collections::BTreeSet;
use std::sync::Arc;

use relay_protocol::{Cidr, StreamOpen, Target, L4};
use relay_transport::capture::Capture;
use relay_transport::conn::{accept_bounded, AcceptBound};
use relay_transport::splice::{dial_tcp, splice};
use relay_transport::udp::{FlowLimits, Pick, PickConn, Picked, RedirectUdp};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::capture_state::{Routes, SavedCapture};
use crate::client::{CaptureReport, EdgeStats};
use crate::config::EdgeConfig;
use crate::serve::Served;
use crate::services::{EdgeServices, Resolved};
use crate::supervisor::sessions::Sessions;
use std::sync::atomic::Ordering::Relaxed;

mod hedge;
mod refused6;
#[cfg(test)]
mod site_routes_tests;

/// How often capture looks at the node's interface addresses again (and
/// its IPv6 routes: `subnets::Lans`).
const LAN_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// What capture needs from start-up: the installed kernel state and the
/// two listeners.
pub(crate) struct Parts {
    pub(crate) cap: Capture,
    /// Why `cap` is not on the node ([`Capture::uninstalled`]), if so.
    pub(crate) install_error: Option<String>,
    pub(crate) tcp: TcpListener,
    pub(crate) udp: RedirectUdp,
    /// What the previous run saved (`capture_state_file`): its routes are
    /// applied until a session gives its own.
    pub(crate) saved: Option<SavedCapture>,
}

/// The routes capture works from after the sessions changed: `union`, the
/// tunnel routes of every connected session whose set is complete, once
/// one is; until then (and between sessions, `served` being `None`) the
/// routes it had. Either way with what the primary session says this
/// edge serves (`served`).
fn next_routes(
    routes: Option<Routes>,
    served: Option<&[Cidr]>,
    union: Option<&[Cidr]>,
) -> Option<Routes> {
    let Some(served) = served else {
        return routes;
    };
    match union {
        Some(tunnel) => Some(Routes {
            tunnel: tunnel.to_vec(),
            served: served.to_vec(),
        }),
        None => routes.map(|r| Routes {
            tunnel: r.tunnel,
            served: served.to_vec(),
        }),
    }
}

/// Runs the transparent listener and keeps the capture in step with the
/// sessions' tunnel routes until `cancel`, then removes the capture.
pub(crate) async fn run(
    Parts {
        mut cap,
        install_error,
        tcp: listener,
        udp,
        saved,
    }: Parts,
    cfg: Arc<EdgeConfig>,
    sessions: watch::Receiver<Arc<Sessions>>,
    services: Arc<EdgeServices>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
) {
    // The tunnel's IPv6 routes are refused rather than left to the
    // default route (capture is IPv4 only): see `subnets`. Unless the
    // site routes IPv6 to the cloud by itself (`capture.refuse_ipv6`).
    if cfg.capture_refuse_ipv6 {
        cap.refuse_ipv6().await;
    }
    let (mut refused6, mut first_pass) = (refused6::Refused6::default(), true);
    let current = sessions.clone();
    let mut changes = sessions.clone();
    let mut relay_addrs = stats.relay_addrs_saved.subscribe();
    // UDP to a ClusterIP with an endpoint on this edge goes to that
    // endpoint, as TCP does (no hairpin through the relay, and it works
    // while the relay is away); everything else to the relay (a ClusterIP
    // included: the relay picks the endpoint), on a session whose relay
    // lists the target (picked once per flow).
    let local = services.clone();
    let pick: Arc<PickConn> = Arc::new(move |dst| {
        let target = match local.resolve(dst, true) {
            Resolved::Local(ep) => {
                local.local_picks.fetch_add(1, Relaxed);
                debug!(%dst, %ep, "udp flow to a local service endpoint");
                return Some(Pick::Local(ep, local.local_gone(dst, true, ep)));
            }
            Resolved::Relay(target) => target,
        };
        let now = current.borrow().clone();
        now.for_destination(target.ip()).map(|live| {
            Pick::Tunnel(Picked {
                conn: live.conn.clone(),
                flows: live.flows.clone(),
                target,
                stale: relay_transport::udp::never_stale(),
            })
        })
    });
    let limits = FlowLimits {
        open_timeout: cfg.handshake_timeout + cfg.dial_timeout,
        idle: cfg.udp_idle,
        mark: cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0),
        max_flows: cfg.capture.as_ref().map_or(128, |c| c.max_udp_flows),
    };
    let udp = relay_transport::udp::serve_transparent_udp(
        udp,
        pick,
        limits,
        stats.udp.clone(),
        cancel.clone(),
    );
    tokio::spawn(udp.in_current_span());
    let accept = accept_loop(
        listener,
        cfg.clone(),
        sessions,
        services.clone(),
        stats.clone(),
        cancel.clone(),
    );
    tokio::pin!(accept);
    let mut table = services.subscribe();
    // The routes capture works from: the session's, and between sessions
    // the last session's (kept, so pod traffic to the tunnel routes fails
    // fast instead of leaving by the default route); at start, those saved
    // by the previous run (`capture_state_file`).
    let mut routes: Option<Routes> = saved.and_then(|s| s.routes);
    // What capture knows, for the saver (at most once a second, and the
    // last one when capture stops).
    let (save_tx, save_rx) = tokio::sync::watch::channel(None);
    // What the last snapshot was made from (the table by identity: each
    // complete batch publishes a new one), so a pass that changed neither
    // copies nothing.
    let mut saved_from: Option<(Arc<crate::services::ServiceTable>, Option<Routes>)> = None;
    let saver = cfg.capture_state_file.clone().map(|path| {
        tokio::spawn(
            relay_transport::saved::saver_every(
                path,
                save_rx,
                crate::capture_state::save,
                "capture state",
                relay_transport::saved::ON_FLASH,
                cancel.clone(),
            )
            .in_current_span(),
        )
    });
    // The node's LANs (and IPv6 routes) capture leaves alone.
    let mut site = crate::subnets::Lans::default();
    let mut overlapping = BTreeSet::new();
    // Far ends of this run's connections and the proxy's addresses (see
    // `tunnel_peers`): kept after a connection ends, since the routes are.
    let mut far_ends: BTreeSet<std::net::IpAddr> = BTreeSet::new();
    // Whether `tcp_proxy`'s name was looked up yet (then again only on the
    // tick: a resolver that fails must not hold up every pass by its bound).
    let mut proxy_looked_up = false;
    // Interface addresses change without telling us; look again now and
    // then (the capture calls below do nothing when nothing changed).
    let mut lans = tokio::time::interval(LAN_RECHECK);
    lans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticked = false;
    // The last install's error while capture is not on the node (the
    // start's, then the repairs'): logged at start already.
    let mut repair_error: Option<String> = install_error;
    // When the relay's report (`stats.capture_report`) was last changed.
    let mut reported_at: Option<std::time::Instant> = None;
    loop {
        // On the tick, also whether something else on the node removed
        // capture (see `Capture::repair`); the calls below refill it.
        let tick = std::mem::take(&mut ticked);
        if tick {
            // Before a repair, which would start the counter from 0.
            refused6.read(&cap, &stats).await;
            match cap.repair().await {
                // Said once per distinct error, not every 10 s.
                Err(e) if repair_error.as_deref() != Some(e.to_string().as_str()) => {
                    warn!(error = %e, "installing capture again failed; will retry");
                    repair_error = Some(e.to_string());
                }
                Err(_) => {}
                Ok(repaired) => {
                    if repaired {
                        stats.capture_repairs.fetch_add(1, Relaxed);
                        refused6.reinstalled();
                    }
                    repair_error = None;
                }
            }
        }
        let now_table = table.borrow_and_update().clone();
        let sets = crate::services::capture_sets(&now_table, cfg.kube_proxy);
        if let Err(e) = cap.apply_services(&sets.want, &sets.local).await {
            warn!(error = %e, "updating service capture failed; will retry on the next change");
        }
        if let Err(e) = cap.apply_node_ports(&sets.node_ports).await {
            warn!(error = %e, "updating node port capture failed; will retry on the next change");
        }
        let now_sessions = changes.borrow_and_update().clone();
        routes = next_routes(routes, now_sessions.served(), now_sessions.tunnel_routes());
        let unchanged = saved_from
            .as_ref()
            .is_some_and(|(t, r)| Arc::ptr_eq(t, &now_table) && *r == routes);
        if !unchanged {
            let snapshot = SavedCapture::of(routes.as_ref(), &now_table);
            if save_tx.borrow().as_deref() != Some(&snapshot) {
                save_tx.send_replace(Some(Arc::new(snapshot)));
            }
            saved_from = Some((now_table.clone(), routes.clone()));
        }
        if let Some(Routes {
            tunnel: routes,
            served,
        }) = routes.clone()
        {
            // Read again on every pass: a DHCP lease or a new interface
            // moves the LAN; the IPv6 routes (for the refusal) on the
            // first pass and the tick. On failure the last known stay
            // exempt.
            site.recheck(tick, cfg.capture_refuse_ipv6).await;
            let lans = site.all();
            // What we serve and the LANs we sit on are never captured,
            // even inside a wider tunnel route (a cluster CIDR containing
            // this node's pod CIDR; a cloud range containing the site LAN
            // that other sites reuse), nor, for IPv6, what the node's own
            // routes take elsewhere than the default route: see `subnets`.
            let plan = crate::subnets::plan(routes, served.iter().copied(), &lans);
            if plan.overlapping != overlapping {
                // Warned once when the LAN starts shadowing routes; later
                // changes (other edges' host routes coming and going on a
                // LAN range many sites reuse) only at debug level.
                if !plan.overlapping.is_empty() && overlapping.is_empty() {
                    warn!(
                        routes = ?plan.overlapping,
                        lans = ?lans,
                        "tunnel routes overlap this node's LAN (or, for IPv6, a route of its own); the LAN is reached locally, never through the relay"
                    );
                } else {
                    debug!(
                        count = plan.overlapping.len(),
                        "tunnel routes overlapping this node's LAN changed"
                    );
                }
                overlapping = plan.overlapping.clone();
                stats
                    .lan_overlaps
                    .send_replace(overlapping.iter().copied().collect());
            }
            // Only what this node serves (its pods, its addresses) and the
            // configured extra sources are captured when forwarded: a LAN
            // device routing through the node must not reach the cloud.
            let mut sources: BTreeSet<Cidr> = served.into_iter().collect();
            sources.extend(cfg.capture.iter().flat_map(|c| c.sources.iter().flatten()));
            // A proxy's addresses are peers too (its answers must pass the
            // source check before any connection through it exists): looked
            // up on the first pass and on the tick; kept over a failed one.
            if far_ends.len() >= MAX_FAR_ENDS {
                // Only a relay behind ever-new addresses gets here: start
                // again from the live connection's and the proxy's.
                far_ends.clear();
            }
            if let Some(proxy) = cfg.tcp_proxy.as_ref().filter(|_| !proxy_looked_up || tick) {
                proxy_looked_up = true;
                let lookup = tokio::net::lookup_host(proxy.authority.as_str());
                if let Ok(Ok(addrs)) = tokio::time::timeout(PROXY_LOOKUP, lookup).await {
                    far_ends.extend(addrs.map(|a| a.ip()));
                }
            }
            far_ends.extend(now_sessions.conns().map(|c| c.remote_addr().ip()));
            let peers = tunnel_peers(&stats, &far_ends);
            let applied = match cap.apply_sources(&sources).await {
                Ok(()) => cap.apply(&plan.want, &plan.skip, &peers).await,
                Err(e) => Err(e),
            };
            if let Err(e) = applied {
                warn!(error = %e, "updating capture failed; will retry on the next change");
            }
        }
        // After the pass, so 1 means in place with what it captures.
        let installed = cap.is_installed();
        if std::mem::take(&mut first_pass) {
            // Then on the tick.
            refused6.read(&cap, &stats).await;
        }
        stats.capture_installed.store(u64::from(installed), Relaxed);
        // And the relay is told (by each session), when it changed.
        let report = CaptureReport {
            installed,
            error: match (installed, &repair_error) {
                (true, _) => String::new(),
                (false, Some(e)) => e.clone(),
                (false, None) => "capture is not installed".to_string(),
            },
        };
        let now = std::time::Instant::now();
        if report.due(stats.capture_report.borrow().as_ref(), reported_at, now) {
            if !installed {
                debug!(error = %report.error, "telling the relay capture is not installed");
            }
            stats.capture_report.send_replace(Some(report));
            reported_at = Some(now);
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = &mut accept => break,
            r = changes.changed() => if r.is_err() { break },
            r = table.changed() => if r.is_err() { break },
            // The relay's addresses are peers (see `tunnel_peers`): a name
            // that resolves anew, a connection through a proxy.
            r = relay_addrs.changed() => if r.is_err() { break },
            _ = lans.tick() => ticked = true,
        }
    }
    // Refusing what was captured for a while (`hold_after_exit`): the
    // next process (a rollout's new pod) may take minutes to come.
    cap.stop().await;
    // The saver stops with `cancel` after its last write (bounded: one
    // small file).
    if let Some(t) = saver {
        if tokio::time::timeout(std::time::Duration::from_secs(5), t)
            .await
            .is_err()
        {
            warn!("saving the capture state did not finish within 5s");
        }
    }
}

/// Bound on looking up `tcp_proxy`'s name for [`tunnel_peers`].
const PROXY_LOOKUP: std::time::Duration = std::time::Duration::from_secs(1);

/// Most far ends kept for [`tunnel_peers`] (relay replicas and proxies).
const MAX_FAR_ENDS: usize = 64;

/// Where the tunnel's own packets come from: every address this run
/// resolved a relay name to, those the previous run saved
/// (`relay_addrs_file`), and `far_ends` (the far ends of this run's
/// connections, and `tcp_proxy`'s addresses). Capture lets their packets
/// pass the kernel's source check when a tunnel route covers them (the
/// relay node's subnet listed as a cloud range, a relay or proxy reached
/// over a VPN): otherwise every packet from the relay is dropped once the
/// routes are installed, and the session is lost for good, the routes
/// staying between sessions (see `relay_transport::capture`).
fn tunnel_peers(
    stats: &EdgeStats,
    far_ends: &BTreeSet<std::net::IpAddr>,
) -> BTreeSet<std::net::IpAddr> {
    let lock =
        |m: &std::sync::Mutex<std::collections::HashMap<String, Vec<std::net::SocketAddr>>>| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .flatten()
                .map(|a| a.ip())
                .collect::<Vec<_>>()
        };
    let mut peers: BTreeSet<std::net::IpAddr> =
        lock(&stats.relay_addrs_known).into_iter().collect();
    peers.extend(lock(&stats.relay_addrs_loaded));
    peers.extend(far_ends);
    peers
}

async fn accept_loop(
    l: TcpListener,
    cfg: Arc<EdgeConfig>,
    sessions: watch::Receiver<Arc<Sessions>>,
    services: Arc<EdgeServices>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
) {
    // Each captured connection holds a task, a socket and a stream: at most
    // `capture.max_connections` at once, more are reset and counted.
    let max = cfg.capture.as_ref().map_or(1, |c| c.max_connections);
    let bound = stats.capture_bound.get_or_init(|| AcceptBound::new(max));
    // Keep-alive and no Nagle for every captured connection, set once
    // (accepted sockets inherit them).
    relay_transport::splice::tune_listener(&l);
    loop {
        let Some((sock, peer, permit)) = accept_bounded(&cancel, "capture", &l, bound).await else {
            return;
        };
        // The sessions up now (an Arc's count, no copy); the one to use is
        // picked once the destination is known.
        let now = sessions.borrow().clone();
        let (cfg, stats, services) = (cfg.clone(), stats.clone(), services.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(dst) = relay_transport::conntrack::original_dst_tcp(&sock) else {
                return;
            };
            let target = match services.resolve(dst, false) {
                Resolved::Local(ep) => {
                    let span = tracing::debug_span!("service", %dst, %ep, src = %peer);
                    services.local_picks.fetch_add(1, Relaxed);
                    return local_service(sock, ep, cfg).instrument(span).await;
                }
                Resolved::Relay(target) => target,
            };
            let conn = now
                .for_destination_with_spare(target.ip())
                .map(|(l, spare)| (l.conn.clone(), spare.map(|s| s.conn.clone())));
            drop(now);
            let span = tracing::debug_span!("outbound", %dst, %target, src = %peer);
            outbound(sock, peer, target, conn, cfg, stats)
                .instrument(span)
                .await;
        });
    }
}

/// A captured ClusterIP connection with an endpoint on this edge: dialled
/// from here (our socket's mark keeps it out of capture; the address is a
/// local pod's, which kube-proxy leaves alone), never through the relay.
/// Works with the relay unreachable.
async fn local_service(sock: TcpStream, ep: std::net::SocketAddr, cfg: Arc<EdgeConfig>) {
    let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
    match dial_tcp(ep, None, cfg.dial_timeout, mark).await {
        Ok(tcp) => {
            // The relay's splice for a local peer: an endpoint's reset
            // reaches the client as a reset (not as a clean end that would
            // pass a truncated response off as whole), half-close is
            // carried, and an idle connection is bounded.
            let out = relay_transport::splice::splice_local(sock, &[], tcp).await;
            debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "local service connection closed");
        }
        Err(reply) => {
            relay_transport::sampled!(info, "local service endpoint refused", reason = reply.status.as_str(), msg = %reply.message);
            let _ = sock.set_zero_linger();
        }
    }
}

/// One captured connection: open a stream on `conn` (the session picked
/// for it, and a spare for when its path turns out silent: see [`hedge`])
/// for `dst` (its original destination, or the node port it reached), and
/// splice if the relay (or the far edge) accepts.
async fn outbound(
    sock: TcpStream,
    peer: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    conn: Option<(
        relay_transport::TunnelConn,
        Option<relay_transport::TunnelConn>,
    )>,
    cfg: Arc<EdgeConfig>,
    stats: Arc<EdgeStats>,
) {
    let Some((conn, spare)) = conn else {
        // Sampled: during an outage this fires at the pods' retry rate.
        relay_transport::sampled!(
            info,
            "no session to the relay; resetting captured connection"
        );
        let _ = sock.set_zero_linger();
        return;
    };
    let served = Served::new(stats.clone());
    let open = StreamOpen {
        target: Target::Addr(dst),
        source: Some(peer),
        l4: L4::Tcp,
    };
    // The relay may dial a cloud target or another edge; its own bounds are
    // shorter, this one only guards against a relay that never answers.
    let opened = hedge::open_hedged(
        &conn,
        spare.as_ref(),
        &open,
        cfg.handshake_timeout + cfg.dial_timeout,
        &stats.opens_hedged,
    )
    .await;
    match opened {
        Ok(bi) => {
            let out = splice(sock, &[], bi, &*stats).await;
            debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "outbound stream closed");
        }
        Err(reply) => {
            relay_transport::sampled!(info, "outbound connection refused", reason = reply.status.as_str(), msg = %reply.message);
            let _ = sock.set_zero_linger();
        }
    }
    drop(served);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured connection served by an endpoint on this node: the
    /// endpoint's reset (a crash mid-response) reaches the client as a
    /// reset. With `copy_bidirectional` the client saw a clean end, as if
    /// the truncated response were whole.
    #[tokio::test]
    async fn a_local_endpoints_reset_reaches_the_client_as_a_reset() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let cfg = Arc::new(EdgeConfig::new(
            "edge-a",
            "relay.test:8443",
            "relay.test",
            pki.node_material("edge-a").unwrap(),
        ));
        // The endpoint: reads the request's first bytes, then aborts.
        let ep = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep_addr = ep.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = ep.accept().await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\n").await.unwrap();
            s.set_zero_linger().unwrap();
        });
        // The captured side: what capture's listener would accept.
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let (sock, _) = front.accept().await.unwrap();
            local_service(sock, ep_addr, cfg).await;
        });
        let mut client = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        client.write_all(b"GET ").await.unwrap();
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the client's read ends");
        let e = r.expect_err("a reset, not a clean end after the partial response");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        tokio::time::timeout(Duration::from_secs(10), serve)
            .await
            .unwrap()
            .unwrap();
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// A new session's hello from a relay sending deltas carries no routes:
    /// capture keeps the ones it has (pod traffic to cloud ranges would
    /// otherwise leave by the default route until the first batch), and
    /// takes the sessions' once a set is complete, even an empty one.
    #[test]
    fn capture_keeps_its_routes_until_a_sessions_set_is_complete() {
        let old = Some(Routes {
            tunnel: cidrs(&["10.244.0.0/24", "10.96.0.0/12"]),
            served: cidrs(&["10.244.7.0/24"]),
        });
        // No session up.
        assert_eq!(next_routes(old.clone(), None, None), old);
        // A hello without routes.
        let served = cidrs(&["10.244.8.0/24"]);
        let hello = next_routes(old.clone(), Some(&served), None);
        assert_eq!(
            hello,
            Some(Routes {
                tunnel: cidrs(&["10.244.0.0/24", "10.96.0.0/12"]),
                served: cidrs(&["10.244.8.0/24"]),
            })
        );
        assert_eq!(next_routes(None, Some(&[]), None), None);
        let batch = cidrs(&["10.96.0.0/12"]);
        assert_eq!(
            next_routes(hello.clone(), Some(&served), Some(&batch)),
            Some(Routes {
                tunnel: cidrs(&["10.96.0.0/12"]),
                served: cidrs(&["10.244.8.0/24"]),
            })
        );
        assert_eq!(
            next_routes(hello, Some(&[]), Some(&[])),
            Some(Routes {
                tunnel: Vec::new(),
                served: Vec::new(),
            })
        );
    }
}
