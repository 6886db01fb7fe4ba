//! UDP through the relay: flows edges open (to another edge, or to a
//! cloud target from a socket of the relay's) and UDP captured on the
//! relay node; and when such a flow's Service endpoint goes stale.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_protocol::codec::write_frame;
use relay_protocol::{ServiceKey, StreamOpen, StreamReply, StreamStatus, Target, L4};
use relay_transport::conn::finish_with;
use relay_transport::BiStream;
use tokio_util::sync::CancellationToken;

use crate::endpoint_watch::WatchedPort;
use crate::policy::{canonical, Origin, Proto};
use crate::route::{route_any, Route};
use crate::server::Shared;
use crate::session::SessionHandle;
use crate::tunnel::refuse;

/// Serves a UDP flow an edge opened: bridged to a flow on another edge's
/// session, or to a UDP socket towards a cloud target.
pub(crate) async fn serve_edge_flow(
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
    let client = crate::tunnel::affinity_client(&origin, open.source);
    let (other, target) = match route_any(
        &shared,
        Origin::Edge(&origin.node),
        target,
        Proto::Udp,
        Some(&origin.node),
        client,
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
///
/// In Kubernetes mode an endpoint stays while its address is among the
/// port's serving ones ([`ServiceSnapshot::udp_serving`]), usable for new
/// flows or not: kube-proxy's cleanup keeps a flow to a pod that is
/// terminating but still serving (a rollout with ready pods elsewhere),
/// so cutting it here would end, say, a game or VoIP session the pod was
/// draining gracefully.
///
/// [`ServiceSnapshot::udp_serving`]: crate::services::ServiceSnapshot::udp_serving
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
    let udp = proto == Proto::Udp;
    let snap = shared.services.snapshot();
    let port = if snap.backends(asked, proto).is_some() {
        WatchedPort::Port(ServiceKey { vip: asked, udp })
    } else if snap.node_port(asked.port(), proto).is_some() {
        WatchedPort::NodePort(asked.port(), udp)
    } else {
        // The Service went away since the pick.
        return Box::pin(std::future::ready(()));
    };
    let listed = move |snap: &crate::services::ServiceSnapshot| {
        port.backends(snap)
            .is_some_and(|b| b.iter().any(|b| canonical(b.addr) == endpoint))
            || port
                .serving(snap)
                .is_some_and(|s| s.binary_search(&endpoint.ip()).is_ok())
    };
    // Woken only when this port's endpoints change (not by every new
    // snapshot of the cluster's Services).
    let mut changed = shared.endpoint_watch.subscribe(port);
    let services = shared.services.clone();
    Box::pin(async move {
        // The snapshot may have changed between the pick and this
        // subscription: judged once at the start too.
        loop {
            if !listed(&services.snapshot()) {
                return;
            }
            if changed.changed().await.is_err() {
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
    let pick: Arc<relay_transport::udp::PickConn> = Arc::new(move |dst: SocketAddr| {
        // The capture hands over the destination only: no affinity.
        match route_any(&picker, Origin::Captured, dst, Proto::Udp, None, None) {
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
