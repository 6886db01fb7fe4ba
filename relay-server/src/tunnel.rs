//! The stream paths shared by every ingress: find the session for a
//! destination, open and account a stream on it, and serve the two
//! ingresses that are not HTTP: transparently captured TCP connections and
//! streams opened by edges (edge → cloud, edge → edge through the relay).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::codec::write_frame;
use relay_protocol::{Cidr, ServiceKey, StreamOpen, StreamReply, StreamStatus, Target, L4};
use relay_transport::capture::Capture;
use relay_transport::conn::{accept_bounded, finish_with, read_stream_open};
use relay_transport::splice::{dial_tcp, splice, splice_tunnels};
use relay_transport::BiStream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::policy::{canonical, Claim, Origin, Proto, Verdict};
use crate::server::Shared;
use crate::services::Backend;
use crate::session::{SessionHandle, StreamGuard};

/// Where an authorised flow goes.
pub(crate) enum Route {
    /// Through the session of the edge that serves the target.
    Edge(Arc<SessionHandle>),
    /// Dialled by the relay (a cloud target an edge asked for).
    Cloud,
}

/// Finds who serves `target` and asks the policy whether `origin` may
/// reach it: the one path every ingress takes. Returns the canonical
/// target (IPv4-mapped IPv6 unwrapped) with the route, or the refusal,
/// counted by origin and reason.
pub(crate) fn route(
    shared: &Shared,
    origin: Origin<'_>,
    target: SocketAddr,
    proto: Proto,
) -> Result<(Route, SocketAddr), StreamReply> {
    let target = canonical(target);
    let owner = shared.registry.lookup(target.ip());
    decide(shared, origin, target, proto, owner).map(|r| (r, target))
}

/// [`route`], with a ClusterIP port first resolved to one of its
/// endpoints (see [`crate::services`]): the relay picks it (endpoints on
/// node `prefer` first) and the policy judges the endpoint as a Service's
/// ([`Origin::Service`]). A node port is resolved the same way where the
/// node it reached would have served it (see [`node_port_of`]). A Service
/// with no usable endpoint is refused at once; anything else goes to
/// [`route`] unchanged.
pub(crate) fn route_any(
    shared: &Shared,
    origin: Origin<'_>,
    target: SocketAddr,
    proto: Proto,
    prefer: Option<&str>,
) -> Result<(Route, SocketAddr), StreamReply> {
    let snap = shared.services.snapshot();
    let target = canonical(target);
    if let Some(b) = snap.backends(target, proto) {
        return route_backend(shared, b, prefer, proto, &target);
    }
    match snap.node_port(target.port(), proto) {
        Some(b) => match node_port_of(shared, origin, target) {
            Some(NodePortAt::Asker) => route_backend(shared, b, prefer, proto, &target),
            Some(NodePortAt::Edge(node)) => route_backend(shared, b, Some(&node), proto, &target),
            None => route(shared, origin, target, proto),
        },
        None => route(shared, origin, target, proto),
    }
}

/// Whose node port `target` (whose port is one) is.
enum NodePortAt {
    /// The asker's own: the relay node's, captured on one of its own
    /// addresses; or an edge's, captured on its own addresses and asked
    /// for as `0.0.0.0:nodePort` (`ServiceKey::node_port`).
    Asker,
    /// Edge node `node`'s, asked for at its primary address (a cloud
    /// client dialling an edge node's NodePort, as a load balancer's
    /// health check does): resolved here, that node's endpoints first, as
    /// its kube-proxy would take it. The edge could not do it itself: its
    /// own socket to its own address would be DNATed by its kube-proxy to
    /// an endpoint it may not reach.
    Edge(String),
}

/// See [`NodePortAt`]; `None`: `target` is not a node port's address (a
/// pod's port that happens to be in the node port range).
fn node_port_of(shared: &Shared, origin: Origin<'_>, target: SocketAddr) -> Option<NodePortAt> {
    let asked_as_node_port = ServiceKey {
        vip: target,
        udp: false,
    }
    .is_node_port();
    match origin {
        Origin::Edge(_) if asked_as_node_port => return Some(NodePortAt::Asker),
        // The bind test costs a syscall, and only for a node port.
        Origin::Captured if crate::policy::is_local_address(target.ip()) => {
            return Some(NodePortAt::Asker)
        }
        _ => {}
    }
    let owner = shared.registry.lookup(target.ip())?;
    (owner.primary_addr() == Some(target.ip())).then(|| NodePortAt::Edge(owner.node.clone()))
}

/// Picks one of a Service's endpoints (those on node `prefer` first) and
/// routes to it as [`Origin::Service`]; no endpoint is a fast refusal.
/// Counted either way.
pub(crate) fn route_backend(
    shared: &Shared,
    backends: &[crate::services::Backend],
    prefer: Option<&str>,
    proto: Proto,
    service: &dyn std::fmt::Display,
) -> Result<(Route, SocketAddr), StreamReply> {
    if backends.is_empty() {
        shared.metrics.service_pick("no_endpoints");
        return Err(StreamReply::fail(
            StreamStatus::Refused,
            format!("service {service} has no ready endpoint"),
        ));
    }
    // An endpoint on an edge with no live session stays Ready while that
    // edge's kubelet still reaches the apiserver (the tunnel is down, the
    // node is not): pass over it rather than fail one pick in N.
    let usable = |b: &Backend| {
        endpoint_session(shared, b).is_some()
            || !matches!(
                shared.directory.claim(canonical(b.addr).ip()),
                Claim::Edge(_)
            )
    };
    let Some(b) = crate::services::pick(backends, prefer, usable) else {
        shared.metrics.service_pick("edges_offline");
        let mut nodes: Vec<&str> = backends.iter().filter_map(|b| b.node.as_deref()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes.truncate(8);
        return Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!(
                "service {service}: every endpoint is on an edge node with no live session ({})",
                nodes.join(", ")
            ),
        ));
    };
    let target = canonical(b.addr);
    let routed = decide(
        shared,
        Origin::Service,
        target,
        proto,
        endpoint_session(shared, b),
    )?;
    shared.metrics.service_pick(match routed {
        Route::Edge(_) => "edge",
        Route::Cloud => "cloud",
    });
    Ok((routed, target))
}

/// The live session that serves a Service endpoint: its node's, when the
/// EndpointSlice names a node with a session (this also reaches a
/// host-network endpoint whose address several sites' LANs repeat, which
/// is never routed by address), else the session routing its address.
pub(crate) fn endpoint_session(shared: &Shared, b: &Backend) -> Option<Arc<SessionHandle>> {
    b.node
        .as_deref()
        .and_then(|n| shared.registry.get(n))
        .or_else(|| shared.registry.lookup(canonical(b.addr).ip()))
}

/// The policy half of [`route`], for callers that found the session by
/// other means (`CONNECT <node>:<port>`).
pub(crate) fn decide(
    shared: &Shared,
    origin: Origin<'_>,
    target: SocketAddr,
    proto: Proto,
    owner: Option<Arc<SessionHandle>>,
) -> Result<Route, StreamReply> {
    // Who claims the target matters only to a CONNECT or a Service
    // endpoint no session serves (see `Policy::authorize`): asked only then.
    let claim = match (origin, &owner) {
        (Origin::Connect | Origin::Service, None) => shared.directory.claim(target.ip()),
        _ => Claim::Nobody,
    };
    let verdict = shared.policy.authorize(
        origin,
        target,
        proto,
        owner.as_deref().map(|s| s.node.as_str()),
        &claim,
    );
    match (verdict, owner) {
        (Ok(Verdict::ToEdge), Some(s)) => Ok(Route::Edge(s)),
        (Ok(Verdict::ToCloud), _) => Ok(Route::Cloud),
        (Ok(Verdict::ToEdge), None) => Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!("no edge session serves {}", target.ip()),
        )),
        (Err(d), _) => {
            shared.metrics.denied(origin, d.reason);
            Err(d.reply())
        }
    }
}

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
            match route_any(&shared, Origin::Captured, dst, Proto::Tcp, None) {
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
    info!(%peer, %dst, reason = reply.status.as_str(), msg = %reply.message, "captured connection refused");
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
        return serve_edge_flow(bi, origin, shared, open, flow)
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
        let (other, target) = match route_any(&shared, Origin::Edge(&origin.node), target, Proto::Tcp, Some(&origin.node)) {
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

async fn refuse(bi: &mut BiStream, shared: &Shared, reply: StreamReply) {
    shared.metrics.stream_outcome(reply.status);
    info!(reason = reply.status.as_str(), msg = %reply.message, "edge stream refused");
    finish_with(bi, &reply).await;
}

/// Keeps the kernel's capture in step with the live sessions' routes and
/// the Services with endpoints behind them until `stop`, then removes it.
/// Bursts of changes (a reconnect storm, a rollout) are coalesced into one
/// update.
pub(crate) async fn sync_capture(mut cap: Capture, shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.registry.subscribe();
    let mut services = shared.services.subscribe();
    let mut nodes = shared.directory.subscribe();
    let none = BTreeSet::new();
    let configured = shared.cfg.capture.as_ref().and_then(|c| c.sources.clone());
    loop {
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
        let want: BTreeSet<Cidr> = shared.registry.routes().iter().map(|r| r.cidr).collect();
        let mut failed = match cap.apply_sources(&sources).await {
            Ok(()) => cap.apply(&want, &none).await.err(),
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
        let served = |b: &Backend| endpoint_session(&shared, b).is_some();
        let svc = crate::services::relay_capture_set(&snap, served);
        let node_ports = crate::services::relay_node_port_set(&snap, served);
        if let Err(e) = cap.apply_services(&svc, &BTreeSet::new()).await {
            failed = Some(e);
        } else if let Err(e) = cap.apply_node_ports(&node_ports).await {
            failed = Some(e);
        } else {
            debug!(ports = ?crate::services::describe(&svc), ?node_ports, "service capture");
        }
        let retry = match failed {
            Some(e) => {
                warn!(error = %e, "installing routes or service capture failed; retrying");
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
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cap.teardown().await;
    info!("relay routes removed");
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

/// Serves a UDP flow an edge opened: bridged to a flow on another edge's
/// session, or to a UDP socket towards a cloud target.
async fn serve_edge_flow(
    mut bi: BiStream,
    origin: Arc<SessionHandle>,
    shared: Arc<Shared>,
    open: StreamOpen,
    flow: u32,
) {
    let Target::Addr(target) = open.target else {
        let reply = StreamReply::fail(
            StreamStatus::Denied,
            "the relay does not resolve names for edges yet",
        );
        return refuse(&mut bi, &shared, reply).await;
    };
    let asked = target;
    let (other, target) = match route_any(
        &shared,
        Origin::Edge(&origin.node),
        target,
        Proto::Udp,
        Some(&origin.node),
    ) {
        Ok(r) => r,
        Err(reply) => return refuse(&mut bi, &shared, reply).await,
    };
    let stale = endpoint_gone(&shared, asked, target, Proto::Udp);
    let Some(a) = origin.flows.register(Some(flow)) else {
        let reply = StreamReply::fail(
            StreamStatus::Error,
            format!("flow {flow:#x} in use or flow limit reached"),
        );
        return refuse(&mut bi, &shared, reply).await;
    };
    let idle = shared.cfg.limits.udp_idle_timeout;
    if let Route::Edge(other) = other {
        let Some(b) = other.flows.register(None) else {
            let reply = StreamReply::fail(
                StreamStatus::Error,
                format!("node {} is at its flow limit", other.node),
            );
            return refuse(&mut bi, &shared, reply).await;
        };
        let fwd = StreamOpen {
            target: Target::Addr(target),
            source: open.source,
            l4: L4::Udp { flow: b.id },
        };
        match other
            .open_stream(&fwd, shared.cfg.limits.stream_open_timeout)
            .await
        {
            Ok(peer) => {
                shared.metrics.stream_outcome(StreamStatus::Ok);
                if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
                    return;
                }
                let udp = shared.udp.clone();
                relay_transport::udp::bridge_flows(
                    (bi, origin.conn.clone(), a),
                    (peer, other.conn.clone(), b),
                    idle,
                    stale,
                    udp,
                )
                .await;
            }
            Err(reply) => {
                shared.metrics.stream_outcome(reply.status);
                finish_with(&mut bi, &reply).await;
            }
        }
        return;
    }
    let capture = shared.cfg.capture.as_ref();
    let mark = capture.map(|c| c.own_mark).unwrap_or(0);
    let from = capture.and_then(|c| c.keep_source(open.source, target, false));
    match relay_transport::udp::connect_target(target, from, mark).await {
        Ok(sock) => {
            shared.metrics.stream_outcome(StreamStatus::Ok);
            if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
                return;
            }
            relay_transport::udp::serve_target(
                bi,
                origin.conn.clone(),
                a,
                sock,
                idle,
                stale,
                shared.udp.clone(),
            )
            .await;
        }
        Err(e) => {
            let reply = StreamReply::fail(StreamStatus::Unreachable, format!("udp {target}: {e}"));
            refuse(&mut bi, &shared, reply).await;
        }
    }
}

/// Resolves when `endpoint`, which [`route_any`] picked for the Service
/// address `asked` (a ClusterIP or node port), is no longer one of that
/// Service's endpoints (moved, removed, or the Service gone): a UDP flow
/// then ends, and the client's next datagram is picked again, as after
/// kube-proxy deletes a removed endpoint's conntrack entries. Never for a
/// target that was not resolved through a Service.
pub(crate) fn endpoint_gone(
    shared: &Shared,
    asked: SocketAddr,
    endpoint: SocketAddr,
    proto: Proto,
) -> relay_transport::udp::Stale {
    let asked = canonical(asked);
    if asked == endpoint {
        return relay_transport::udp::never_stale();
    }
    let listed = move |snap: &crate::services::ServiceSnapshot| {
        snap.backends(asked, proto)
            .or_else(|| snap.node_port(asked.port(), proto))
            .is_some_and(|b| b.iter().any(|b| canonical(b.addr) == endpoint))
    };
    let mut services = shared.services.subscribe();
    Box::pin(async move {
        // The snapshot may have changed between the pick and this
        // subscription: judged once at the start too.
        loop {
            if !listed(&services.borrow_and_update()) {
                return;
            }
            if services.changed().await.is_err() {
                break;
            }
        }
        std::future::pending().await
    })
}

/// Serves captured UDP: flows towards live sessions' routes.
pub(crate) async fn serve_transparent_udp(
    sock: relay_transport::udp::RedirectUdp,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    let picker = shared.clone();
    // Captured UDP goes to the edge serving the target, or, for a
    // Service's cloud endpoint, from the relay's own socket (as captured
    // TCP is dialled by the relay).
    let pick: Arc<relay_transport::udp::PickConn> =
        Arc::new(move |dst: SocketAddr| {
            match route_any(&picker, Origin::Captured, dst, Proto::Udp, None) {
                Ok((Route::Edge(s), target)) if !s.is_draining() => Some(
                    relay_transport::udp::Pick::Tunnel(relay_transport::udp::Picked {
                        conn: s.conn.clone(),
                        flows: s.flows.clone(),
                        target,
                        stale: endpoint_gone(&picker, dst, target, Proto::Udp),
                    }),
                ),
                Ok((Route::Cloud, target)) => Some(relay_transport::udp::Pick::Local(
                    target,
                    endpoint_gone(&picker, dst, target, Proto::Udp),
                )),
                _ => None,
            }
        });
    let limits = relay_transport::udp::FlowLimits {
        open_timeout: shared.cfg.limits.stream_open_timeout,
        idle: shared.cfg.limits.udp_idle_timeout,
        mark: shared.cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0),
        // Bounded per session by the flow table instead
        // (limits.max_udp_flows_per_session), far below the streams an edge
        // grants the relay (10,000 by default).
        max_flows: usize::MAX,
    };
    relay_transport::udp::serve_transparent_udp(sock, pick, limits, shared.udp.clone(), stop).await;
    "transparent udp"
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
}
