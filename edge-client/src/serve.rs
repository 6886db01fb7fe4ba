//! Serving the streams the relay opens: check the target is inside what
//! this edge serves, dial it (bounded), answer, splice; UDP flows alike.
//!
//! What the edge serves is its config's `routes` until the relay says
//! otherwise: a relay that decides claims (from the node's Node object, or
//! its `[nodes]` table) tells the edge in its hello and whenever they
//! change, and the edge then serves exactly that (see [`ServedSet`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use relay_protocol::codec::write_frame;
use relay_protocol::{Cidr, StreamReply, StreamStatus, Target, L4};
use relay_transport::conn::{finish_with, read_stream_open};
use relay_transport::splice::{dial_tcp, splice};
use relay_transport::udp::FlowTable;
use relay_transport::{BiStream, TunnelConn};
use tracing::{debug, Instrument};

use crate::client::EdgeStats;
use crate::config::EdgeConfig;

/// What this edge serves right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServedRoutes {
    /// Prefixes streams may target.
    pub routes: Vec<Cidr>,
    /// The node's own address: always servable (a by-name stream for a
    /// node whose address another site shares is not routed by address).
    pub primary: Option<IpAddr>,
}

/// The current [`ServedRoutes`], shared by the session and its streams.
#[derive(Debug, Default)]
pub struct ServedSet(RwLock<Arc<ServedRoutes>>);

impl ServedSet {
    /// Starts from the edge's own configuration.
    pub fn from_config(cfg: &EdgeConfig) -> Self {
        ServedSet(RwLock::new(Arc::new(ServedRoutes {
            routes: cfg.routes.clone(),
            primary: cfg.primary_addr,
        })))
    }

    /// The current set.
    pub fn get(&self) -> Arc<ServedRoutes> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the set (the relay said so).
    pub fn set(&self, s: ServedRoutes) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }
}

/// Accounts one served stream; decrements on drop however the task ends.
pub(crate) struct Served(Arc<EdgeStats>);

impl Served {
    pub(crate) fn new(stats: Arc<EdgeStats>) -> Self {
        stats.open_streams.fetch_add(1, Relaxed);
        stats.streams_total.fetch_add(1, Relaxed);
        Served(stats)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Relaxed);
    }
}

/// Checks a stream target against what this edge serves.
pub fn check_target(
    cfg: &EdgeConfig,
    served: &ServedRoutes,
    target: &Target,
) -> Result<SocketAddr, StreamReply> {
    let sa = match target {
        Target::Addr(sa) => *sa,
        Target::Name { host, port } => {
            return Err(StreamReply::fail(
                StreamStatus::Denied,
                format!("{host}:{port}: this edge does not resolve names"),
            ))
        }
    };
    let own = served.primary == Some(sa.ip());
    if !own && !served.routes.iter().any(|r| r.contains(&sa.ip())) {
        return Err(StreamReply::fail(
            StreamStatus::Denied,
            format!("{} is outside the routes node {} serves", sa.ip(), cfg.node),
        ));
    }
    if !cfg.allowed_ports.is_empty() && !cfg.allowed_ports.contains(&sa.port()) {
        return Err(StreamReply::fail(
            StreamStatus::Denied,
            format!("port {} is not allowed on node {}", sa.port(), cfg.node),
        ));
    }
    Ok(sa)
}

pub(crate) async fn serve_stream(
    mut bi: BiStream,
    (conn, flows): (TunnelConn, Arc<FlowTable>),
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    stats: Arc<EdgeStats>,
) {
    let guard = Served::new(stats.clone());
    let Some(open) = read_stream_open(&mut bi, cfg.handshake_timeout).await else {
        return;
    };
    let span = tracing::debug_span!("stream", dst = %open.target, src = ?open.source);
    async move {
        let target = match check_target(&cfg, &served.get(), &open.target) {
            Ok(t) => t,
            Err(reply) => {
                stats.denied.fetch_add(1, Relaxed);
                relay_transport::sampled!(info, "stream refused", reason = reply.status.as_str(), msg = %reply.message);
                finish_with(&mut bi, &reply).await;
                return;
            }
        };
        let capture = cfg.capture.as_ref();
        let mark = capture.map(|c| c.own_mark).unwrap_or(0);
        // The relay vouches for the client address it sends; the target is
        // one this edge serves (checked above).
        let from = capture.and_then(|c| c.keep_source(open.source, target, true));
        if let L4::Udp { flow } = open.l4 {
            let to = (target, from);
            return serve_flow(bi, conn, &flows, flow, to, mark, &cfg, &stats).await;
        }
        let tcp = match dial_tcp(target, from, cfg.dial_timeout, mark).await {
            Ok(t) => t,
            Err(reply) => {
                stats.dial_failures.fetch_add(1, Relaxed);
                debug!(reason = reply.status.as_str(), msg = %reply.message, "dial failed");
                finish_with(&mut bi, &reply).await;
                return;
            }
        };
        if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
            return;
        }
        let out = splice(tcp, &[], bi, &*stats).await;
        debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "stream closed");
        drop(guard);
    }
    .instrument(span)
    .await
}

/// The edge end of a relay-opened UDP flow: a socket connected to the
/// (already checked) target, datagrams both ways until idle or closed.
#[allow(clippy::too_many_arguments)]
async fn serve_flow(
    mut bi: BiStream,
    conn: TunnelConn,
    flows: &Arc<FlowTable>,
    flow: u32,
    (target, from): (SocketAddr, Option<IpAddr>),
    mark: u32,
    cfg: &EdgeConfig,
    stats: &Arc<EdgeStats>,
) {
    let Some(handle) = flows.register(Some(flow)) else {
        let reply = StreamReply::fail(
            StreamStatus::Error,
            format!("flow {flow:#x} in use or flow limit reached"),
        );
        return finish_with(&mut bi, &reply).await;
    };
    let sock = match relay_transport::udp::connect_target(target, from, mark).await {
        Ok(s) => s,
        Err(e) => {
            let reply = StreamReply::fail(StreamStatus::Unreachable, format!("udp {target}: {e}"));
            return finish_with(&mut bi, &reply).await;
        }
    };
    if write_frame(&mut bi.send, &StreamReply::ok()).await.is_err() {
        return;
    }
    relay_transport::udp::serve_target(
        bi,
        conn,
        handle,
        sock,
        cfg.udp_idle,
        relay_transport::udp::never_stale(),
        stats.udp.clone(),
    )
    .await;
}
