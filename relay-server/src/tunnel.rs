//! The stream paths shared by every ingress: open and account a stream on
//! the session `route` found, and serve the two ingresses that
//! are not HTTP: transparently captured TCP connections and streams opened
//! by edges (edge → cloud, edge → edge through the relay; their UDP flows
//! in `tunnel_udp`); and keep the relay node's capture in step.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::codec::write_frame;
use relay_protocol::{Cidr, StreamOpen, StreamReply, StreamStatus, Target, L4};
use relay_transport::capture::Capture;
use relay_transport::conn::{accept_bounded, finish_with, read_stream_open};
use relay_transport::splice::{dial_tcp, splice, splice_tunnels};
use relay_transport::BiStream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::policy::{canonical, Origin, Proto};
use crate::server::Shared;
use crate::services::Backend;
use crate::session::{SessionHandle, StreamGuard};

pub(crate) use crate::route::{decide, route_any, route_backend, Route};

/// Opens a stream to `target` on `session`, accounted by the returned
/// guard, and counts the outcome.
pub(crate) async fn open_on(
    shared: &Arc<Shared>,
    session: Arc<SessionHandle>,
    target: SocketAddr,
    source: Option<SocketAddr>,
) -> Result<(BiStream, StreamGuard), StreamReply> {
    let guard = StreamGuard::new(session, shared.clone());
    let open = StreamOpen {
        target: Target::Addr(target),
        source,
        l4: L4::Tcp,
    };
    match guard
        .session()
        .open_stream(&open, shared.cfg.limits.stream_open_timeout)
        .await
    {
        Ok(bi) => {
            shared.metrics.stream_outcome(StreamStatus::Ok);
            Ok((bi, guard))
        }
        Err(reply) => {
            shared.metrics.stream_outcome(reply.status);
            Err(reply)
        }
    }
}

/// Accepts transparently captured TCP connections: the accepted socket's
/// local address is where the client meant to go. Failures are answered
/// with a TCP reset (there is no protocol to carry a reason); the reason is
/// logged and counted.
pub(crate) async fn serve_transparent(
    l: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    // Keep-alive and no Nagle for every captured connection, set once
    // (accepted sockets inherit them).
    relay_transport::splice::tune_listener(&l);
    loop {
        let accepted = accept_bounded(&stop, "transparent", &l, &shared.capture_bound).await;
        let Some((sock, peer, permit)) = accepted else {
            return "transparent";
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(dst) = relay_transport::conntrack::original_dst_tcp(&sock) else {
                return;
            };
            match route_any(
                &shared,
                Origin::Captured,
                dst,
                Proto::Tcp,
                None,
                Some(peer.ip()),
            ) {
                Ok((Route::Edge(session), to)) => {
                    match open_on(&shared, session, to, Some(peer)).await {
                        Ok((bi, guard)) => {
                            let span = tracing::debug_span!("stream", node = %guard.session().node, %dst, %to, src = %peer);
                            let out = splice(sock, &[], bi, &guard).instrument(span).await;
                            debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "captured stream closed");
                        }
                        Err(reply) => refuse_captured(sock, peer, dst, &reply),
                    }
                }
                // A Service's cloud endpoint: dialled from here, past
                // capture and past the relay node's kube-proxy.
                Ok((Route::Cloud, to)) => match dial_direct(&shared, to).await {
                    Ok(tcp) => {
                        let out = relay_transport::splice::splice_local(sock, &[], tcp).await;
                        debug!(%dst, %to, up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "captured service connection closed");
                    }
                    Err(reply) => refuse_captured(sock, peer, dst, &reply),
                },
                Err(reply) => {
                    shared.metrics.stream_outcome(reply.status);
                    refuse_captured(sock, peer, dst, &reply)
                }
            }
        });
    }
}

/// Dials `to` from the relay (past capture: our mark), for a Service's
/// cloud endpoint; counts the outcome.
pub(crate) async fn dial_direct(
    shared: &Shared,
    to: SocketAddr,
) -> Result<tokio::net::TcpStream, StreamReply> {
    let mark = shared.cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
    let r = dial_tcp(to, None, shared.cfg.limits.dial_timeout, mark).await;
    shared.metrics.stream_outcome(match &r {
        Ok(_) => StreamStatus::Ok,
        Err(reply) => reply.status,
    });
    r
}

/// Answers a captured connection that cannot be served with a TCP reset
/// (there is no protocol to carry a reason) and logs why.
fn refuse_captured(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    reply: &StreamReply,
) {
    // Sampled (the count stays in the stream metrics): a pod retrying
    // against an offline edge would otherwise log at its retry rate. Policy
    // denials are sampled apart, so a flood of one never hides the other.
    if reply.status == StreamStatus::Denied {
        relay_transport::sampled!(info, "captured connection denied by policy", %peer, %dst, msg = %reply.message);
    } else {
        relay_transport::sampled!(info, "captured connection refused", %peer, %dst, reason = reply.status.as_str(), msg = %reply.message);
    }
    let _ = sock.set_zero_linger();
}

/// Serves a stream an edge opened: to another edge (hairpin through its
/// session) or to a cloud target inside the configured cloud ranges;
/// anything else is refused with a reason.
pub(crate) async fn serve_edge_stream(
    mut bi: BiStream,
    origin: Arc<SessionHandle>,
    shared: Arc<Shared>,
) {
    let Some(mut open) = read_stream_open(&mut bi, shared.cfg.limits.handshake_timeout).await
    else {
        return;
    };
    let claimed = open.source;
    open.source = vouched_source(&shared, &origin, claimed);
    let span = tracing::info_span!("edge_stream", from = %origin.node, dst = %open.target, src = ?claimed, vouched = open.source.is_some());
    if let L4::Udp { flow } = open.l4 {
        return crate::tunnel_udp::serve_edge_flow(bi, origin, shared, open, flow)
            .instrument(span)
            .await;
    }
    async move {
        let target = match open.target {
            Target::Addr(sa) => sa,
            Target::Name { .. } => {
                let reply = StreamReply::fail(StreamStatus::Denied, "the relay does not resolve names for edges yet");
                return refuse(&mut bi, &shared, reply).await;
            }
        };
        let client = affinity_client(&origin, open.source);
        let (other, target) = match route_any(&shared, Origin::Edge(&origin.node), target, Proto::Tcp, Some(&origin.node), client) {
            Ok(r) => r,
            Err(reply) => return refuse(&mut bi, &shared, reply).await,
        };
        if let Route::Edge(other) = other {
            // Edge to edge: open on the target's session, pass its answer back.
            match open_on(&shared, other, target, open.source).await {
                Ok((peer, guard)) => {
                    if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
                        return;
                    }
                    let out = splice_tunnels(bi, peer, &guard).await;
                    debug!(to_target = out.to_tunnel, from_target = out.from_tunnel, reset = ?out.reset, "hairpin closed");
                }
                Err(reply) => finish_with(&mut bi, &reply).await,
            }
            return;
        }
        let guard = StreamGuard::new(origin.clone(), shared.clone());
        let capture = shared.cfg.capture.as_ref();
        let mark = capture.map(|c| c.own_mark).unwrap_or(0);
        let from = capture.and_then(|c| c.keep_source(open.source, target, false));
        match dial_tcp(target, from, shared.cfg.limits.dial_timeout, mark).await {
            Ok(tcp) => {
                shared.metrics.stream_outcome(StreamStatus::Ok);
                if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
                    return;
                }
                let out = splice(tcp, &[], bi, &guard).await;
                debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "edge stream closed");
            }
            Err(reply) => {
                shared.metrics.stream_outcome(reply.status);
                finish_with(&mut bi, &reply).await;
            }
        }
    }
    .instrument(span)
    .await
}

pub(crate) async fn refuse(bi: &mut BiStream, shared: &Shared, reply: StreamReply) {
    shared.metrics.stream_outcome(reply.status);
    // Denials apart from the rest: a compromised edge scanning must not
    // hide behind (or be hidden by) refusals for an offline edge.
    if reply.status == StreamStatus::Denied {
        relay_transport::sampled!(info, "edge stream denied by policy", msg = %reply.message);
    } else {
        relay_transport::sampled!(info, "edge stream refused", reason = reply.status.as_str(), msg = %reply.message);
    }
    finish_with(bi, &reply).await;
}

/// Keeps the kernel's capture in step with the sessions' routes (live and
/// offline) and
/// the Services with endpoints behind them until `stop`, then removes it.
/// Bursts of changes (a reconnect storm, a rollout) are coalesced into one
/// update.
pub(crate) async fn sync_capture(mut cap: Capture, shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.registry.subscribe();
    let mut services = shared.services.subscribe();
    let mut nodes = shared.directory.subscribe();
    let none = BTreeSet::new();
    let configured = shared.cfg.capture.as_ref().and_then(|c| c.sources.clone());
    // Now and then, whether something else on the node removed capture
    // (see `Capture::repair`); the calls below refill it.
    let mut check = tokio::time::interval(Duration::from_secs(10));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut ticked = false;
    // Where each node's session came from last: an offline node whose
    // routes are held reconnects from there (see `peers` below).
    let mut last_peer: HashMap<String, IpAddr> = HashMap::new();
    loop {
        if std::mem::take(&mut ticked) {
            match cap.repair().await {
                Ok(true) => shared.metrics.capture_repaired(),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "installing capture again failed; will retry"),
            }
        }
        // Forwarded traffic is captured only from `capture.sources`,
        // before any prefix is captured: a host that routes edge prefixes
        // to this node from elsewhere (the WAN) must not reach the edges.
        // Unset: the cloud ranges edges may reach, and the cloud Nodes'
        // own prefixes, whose addresses are the source of their host
        // processes (an ingress controller on the host network) and of
        // what their kube-proxy masquerades (a NodePort reached there).
        let sources: BTreeSet<Cidr> = match &configured {
            Some(s) => s.clone(),
            None => shared
                .cfg
                .tunnel_routes
                .iter()
                .copied()
                .chain(shared.directory.cloud_prefixes())
                .collect(),
        };
        // Offline edges' routes too: a connection to such an edge's pod is
        // then reset at once (no session: `no_route`) rather than sent by
        // the default route, where it would hang (see
        // `registry/offline.rs`).
        let offline = shared.registry.offline_routes();
        let want: BTreeSet<Cidr> = (shared.registry.routes().into_iter())
            .chain(offline.iter().cloned())
            .map(|r| r.cidr)
            .collect();
        // The addresses edges' sessions come from: an edge that reaches
        // this node without NAT (a private APN, a site VPN) sends from the
        // node address it claims, which capture would otherwise make the
        // kernel drop as a martian (see `relay_transport::capture`), and
        // the session would die as soon as its routes were captured. Held
        // offline nodes keep theirs: they reconnect from it.
        let sessions = shared.registry.sessions_unsorted();
        let held: HashSet<&str> = offline.iter().map(|r| r.node.as_str()).collect();
        last_peer.retain(|node, _| held.contains(node.as_str()));
        for s in &sessions {
            last_peer.insert(s.node.clone(), s.conn.remote_addr().ip());
        }
        let peers: BTreeSet<IpAddr> = last_peer.values().copied().collect();
        let mut failed = match cap.apply_sources(&sources).await {
            Ok(()) => cap.apply(&want, &none, &peers).await.err(),
            Err(e) => Some(e),
        };
        {
            // What the admin API may report as routable here: all of it
            // once applied; after a failure, only what was installed before
            // and is still wanted.
            let mut captured = shared.captured.write().unwrap_or_else(|e| e.into_inner());
            let before = captured.take().unwrap_or_default();
            *captured = Some(if failed.is_none() {
                want
            } else {
                before.intersection(&want).copied().collect()
            });
        }
        let snap = services.borrow_and_update().clone();
        // An edge's endpoint counts with its session down too: captured,
        // the relay passes over it; left to kube-proxy, it would hang.
        // Only a known edge's (see `behind_edge`).
        let served = |b: &Backend| crate::route::behind_edge(&shared, b, &|n| held.contains(n));
        let (node, zone) = crate::route::placed(&shared, None);
        let set =
            crate::services::relay_capture_set(&snap, served, &sources, (node, zone.as_deref()));
        let svc = set.cluster;
        let node_ports =
            crate::services::relay_node_port_set(&snap, served, (node, zone.as_deref()));
        if let Err(e) = cap.apply_services(&svc, &BTreeSet::new()).await {
            failed = Some(e);
        } else if let Err(e) = cap.apply_open_services(&set.open, &set.ranged).await {
            failed = Some(e);
        } else if let Err(e) = cap.apply_node_ports(&node_ports).await {
            failed = Some(e);
        } else {
            debug!(ports = ?crate::services::describe(&svc), ?node_ports, "service capture");
        }
        // Retried every second while it fails: the line is sampled, the
        // count and the 0/1 gauge are on /metrics.
        shared.metrics.capture_applied(failed.is_none());
        shared.metrics.capture_health.applied(failed.as_ref());
        let retry = match failed {
            Some(e) => {
                relay_transport::sampled!(warn, "installing routes or service capture failed; retrying", error = %e);
                true
            }
            None => false,
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            r = changes.changed(), if !retry => if r.is_err() { break },
            r = services.changed(), if !retry => if r.is_err() { break },
            r = nodes.changed(), if !retry && configured.is_none() => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            _ = check.tick() => ticked = true,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cap.teardown().await;
    info!("relay routes removed");
}

/// Whom a stream or flow an edge opened counts as for `sessionAffinity:
/// ClientIP`: its vouched source address, else the edge node's own
/// address (an edge that does not say keeps all its clients to one
/// endpoint, as kube-proxy does for a node that masquerades them).
pub(crate) fn affinity_client(
    origin: &SessionHandle,
    vouched: Option<SocketAddr>,
) -> Option<std::net::IpAddr> {
    vouched.map(|s| s.ip()).or_else(|| origin.primary_addr())
}

/// The client address an edge gives for a stream it opened (an
/// IPv4-mapped one in its IPv4 form), if the relay routes that address to
/// this same edge; else `None`. Only a vouched
/// address is passed on to another edge or used as the source of a dial
/// (`capture.preserve_source`): an edge speaks for its own pods and host,
/// never for addresses of the cloud or of other sites.
fn vouched_source(
    shared: &Shared,
    origin: &SessionHandle,
    claimed: Option<SocketAddr>,
) -> Option<SocketAddr> {
    vouched_by(&shared.registry, &origin.node, claimed)
}

/// [`vouched_source`] against any registry.
fn vouched_by<S: crate::registry::RouteOwner>(
    registry: &crate::registry::Registry<S>,
    node: &str,
    claimed: Option<SocketAddr>,
) -> Option<SocketAddr> {
    let source = canonical(claimed?);
    let owner = registry.lookup(source.ip())?;
    (owner.node() == node).then_some(source)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::vouched_by;
    use crate::registry::testing::{reg, Fake};
    use crate::registry::Registry;

    /// An edge speaks for the addresses routed to it, and for no others:
    /// not another edge's, not the cloud's, not an IPv4-mapped form of
    /// someone else's.
    #[test]
    fn an_edge_is_vouched_for_only_inside_its_own_routes() {
        let r = Registry::default();
        for (node, gen, cidr) in [
            ("edge-a", 1, "10.244.7.0/24"),
            ("edge-b", 2, "10.244.8.0/24"),
        ] {
            let f = Arc::new(Fake {
                node: node.into(),
                generation: gen,
                routes: vec![cidr.parse().unwrap()],
            });
            reg(&r, f, 10).unwrap();
        }
        let sa = |s: &str| Some(s.parse().unwrap());
        assert_eq!(
            vouched_by(&r, "edge-a", sa("10.244.7.5:4000")),
            sa("10.244.7.5:4000")
        );
        assert_eq!(
            vouched_by(&r, "edge-a", sa("[::ffff:10.244.7.5]:4000")),
            sa("10.244.7.5:4000"),
            "in its IPv4 form"
        );
        for claim in [
            "10.244.8.5:4000",          // edge-b's pod
            "[::ffff:10.244.8.5]:4000", // the same, IPv4-mapped
            "10.0.0.3:4000",            // the apiserver (no edge's)
            "127.0.0.1:4000",
        ] {
            assert_eq!(vouched_by(&r, "edge-a", sa(claim)), None, "{claim}");
        }
        assert_eq!(vouched_by(&r, "edge-a", None), None);
    }

    /// docs/bad-input.md row 117: a cloud pod retrying every 10 ms against
    /// a pod on an offline edge. Each of its 2,001 connections in 20 s is
    /// reset at once through the real `refuse_captured`, and the log gets
    /// three lines, not 2,001: the first at once, then one per 10 s saying
    /// how many it stands for. (The paused clock makes the 10 ms steps
    /// exact; the sampler reads tokio's clock for this.)
    #[tokio::test(start_paused = true)]
    async fn an_outage_with_a_pod_retrying_every_10_ms_logs_a_line_per_window() {
        use relay_protocol::{StreamReply, StreamStatus};
        use tokio::io::AsyncReadExt;

        let (out, _guard) = relay_transport::test_log::Captured::start();

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let dst: std::net::SocketAddr = "10.244.8.5:8080".parse().unwrap();
        let reply = StreamReply::fail(StreamStatus::NoRoute, "no edge session serves 10.244.8.5");
        for i in 0..2_001 {
            let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(at), l.accept());
            let (mut client, (sock, peer)) = (client.unwrap(), accepted.unwrap());
            super::refuse_captured(sock, peer, dst, &reply);
            let r = client.read(&mut [0u8; 1]).await;
            assert_eq!(
                r.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "attempt {i} is reset at once"
            );
            tokio::time::advance(std::time::Duration::from_millis(10)).await;
        }

        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines.iter().all(|l| l.contains("INFO")
                && l.contains("relay_server::tunnel")
                && l.contains("captured connection refused")
                && l.contains("dst=10.244.8.5:8080")
                && l.contains("peer=127.0.0.1:")
                && l.contains("reason=\"no_route\"")),
            "{text}"
        );
        assert!(!lines[0].contains("more like it"), "{text}");
        for l in &lines[1..] {
            assert!(
                l.contains("captured connection refused (and 999 more like it in the last 10 s)"),
                "{text}"
            );
            assert!(l.contains("suppressed=999"), "{text}");
        }
    }
}
