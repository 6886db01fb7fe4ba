//! One edge session: the handshake, the control-stream actor, and opening
//! tunnel streams towards the edge.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use relay_protocol::codec::{
    self, decode, decode_control, peek_version, read_frame_bytes, write_frame, Incoming,
};
use relay_protocol::{
    capability, close_code, Cidr, ClientHello, Control, FrameError, HelloReply, RejectReason,
    Rejection, ServerHello, StreamOpen, StreamReply, StreamStatus, PROTOCOL_VERSION,
};
use relay_transport::tls::cert_names_node;
use relay_transport::{BiStream, Direction, Meter, SendHalf, TunnelConn};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::registry::RouteOwner;
use crate::routefeed::{FeedUpdate, RouteFeed};
use crate::server::Shared;

/// Control messages queued towards one edge; small, since only the relay's
/// own bookkeeping (GOAWAY, route updates) produces them.
const CONTROL_QUEUE: usize = 16;

/// A live, registered edge session.
pub struct SessionHandle {
    /// Node name, bound to the client certificate.
    pub node: String,
    /// Random id for logs and the admin API.
    pub session_id: u64,
    /// Relay-wide increasing number; higher is newer.
    pub generation: u64,
    /// Prefixes the edge serves.
    pub routes: Vec<Cidr>,
    /// The node's primary address (for `CONNECT <node>:<port>`).
    pub primary_addr: Option<IpAddr>,
    /// The edge's software version string.
    pub agent: String,
    /// How many times the edge fell back from QUIC to TCP (its own count).
    pub fallbacks: u32,
    /// Capability bits the edge announced.
    pub capabilities: u32,
    /// The transport connection.
    pub conn: TunnelConn,
    /// Wall-clock time the session was registered.
    pub connected_at: SystemTime,
    started: Instant,
    last_seen_ms: AtomicU64,
    /// Streams open right now.
    pub open_streams: AtomicU64,
    /// Streams opened since the session started.
    pub streams_total: AtomicU64,
    /// Payload bytes sent to the edge.
    pub bytes_to_edge: AtomicU64,
    /// Payload bytes received from the edge.
    pub bytes_from_edge: AtomicU64,
    /// UDP flows on this session.
    pub flows: Arc<relay_transport::udp::FlowTable>,
    draining: AtomicBool,
    cancel: CancellationToken,
    control_tx: mpsc::Sender<Control>,
}

impl RouteOwner for SessionHandle {
    fn node(&self) -> &str {
        &self.node
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn session_id(&self) -> u64 {
        self.session_id
    }
    fn routes(&self) -> &[Cidr] {
        &self.routes
    }
}

impl SessionHandle {
    /// Time since the edge last sent anything on the control stream.
    pub fn last_seen_ago(&self) -> Duration {
        let seen = Duration::from_millis(self.last_seen_ms.load(Relaxed));
        self.started.elapsed().saturating_sub(seen)
    }

    fn touch(&self) {
        self.last_seen_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Whether the session is draining (no new streams).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Closes the session now; in-flight streams are reset.
    pub fn kick(&self, code: u32, reason: &str) {
        self.cancel.cancel();
        self.conn.close(code, reason);
    }

    /// Stops new streams, tells the edge (GOAWAY), lets in-flight streams
    /// finish for up to `grace`, then closes.
    pub fn drain(self: &Arc<Self>, grace: Duration, reason: &str) {
        if self.draining.swap(true, Relaxed) {
            return;
        }
        let msg = Control::GoAway {
            reason: reason.to_string(),
            grace_ms: grace.as_millis().min(u32::MAX as u128) as u32,
        };
        if self.control_tx.try_send(msg).is_err() {
            debug!(node = %self.node, "control queue full; edge learns of the drain from the close");
        }
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + grace;
            while me.open_streams.load(Relaxed) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            me.kick(close_code::GOING_AWAY, "drained");
        });
    }

    /// Opens a stream to the edge, sends the header and waits (at most
    /// `timeout`) for the edge's reply. On success the stream is ready for
    /// raw bytes; on failure the reply says why.
    pub async fn open_stream(
        &self,
        open: &StreamOpen,
        timeout: Duration,
    ) -> Result<BiStream, StreamReply> {
        if self.is_draining() {
            return Err(StreamReply::fail(
                StreamStatus::NoRoute,
                format!("session of node {} is draining", self.node),
            ));
        }
        relay_transport::conn::open_stream(&self.conn, open, timeout)
            .await
            .map_err(|mut r| {
                r.message = format!("node {}: {}", self.node, r.message);
                r
            })
    }
}

/// Counts one open stream for the session and the relay; decrements on
/// drop, so a stream is accounted for however its task ends.
pub struct StreamGuard {
    session: Arc<SessionHandle>,
    shared: Arc<Shared>,
}

impl StreamGuard {
    /// Starts accounting a stream on `session`.
    pub fn new(session: Arc<SessionHandle>, shared: Arc<Shared>) -> Self {
        session.open_streams.fetch_add(1, Relaxed);
        session.streams_total.fetch_add(1, Relaxed);
        shared.metrics.streams_open.fetch_add(1, Relaxed);
        StreamGuard { session, shared }
    }

    /// The session this stream belongs to.
    pub fn session(&self) -> &Arc<SessionHandle> {
        &self.session
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.session.open_streams.fetch_sub(1, Relaxed);
        self.shared.metrics.streams_open.fetch_sub(1, Relaxed);
    }
}

impl Meter for StreamGuard {
    fn add(&self, dir: Direction, bytes: u64) {
        let (s, m) = match dir {
            Direction::ToTunnel => (
                &self.session.bytes_to_edge,
                &self.shared.metrics.bytes_to_edge,
            ),
            Direction::FromTunnel => (
                &self.session.bytes_from_edge,
                &self.shared.metrics.bytes_from_edge,
            ),
        };
        s.fetch_add(bytes, Relaxed);
        m.fetch_add(bytes, Relaxed);
    }
}

/// Why a handshake ended without a session.
enum HandshakeError {
    /// Typed refusal, sent to the edge.
    Rejected(RejectReason, String),
    /// Nothing could be sent (timeout, transport failure).
    Failed(&'static str, String),
}

fn reject(reason: RejectReason, msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Rejected(reason, msg.into())
}

/// Validates a hello against identity and policy; returns it on success.
fn check_hello(
    shared: &Shared,
    conn: &TunnelConn,
    body: &[u8],
) -> Result<ClientHello, HandshakeError> {
    let hello: ClientHello = match decode(body) {
        Ok(h) => h,
        Err(e) => {
            return Err(match peek_version(body) {
                Some(v) if v != PROTOCOL_VERSION => reject(
                    RejectReason::UnsupportedVersion,
                    format!(
                        "protocol version {v} not supported; this relay speaks {PROTOCOL_VERSION}"
                    ),
                ),
                _ => reject(RejectReason::Malformed, format!("undecodable hello: {e}")),
            })
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(reject(
            RejectReason::UnsupportedVersion,
            format!(
                "protocol version {} not supported; this relay speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    let certs = conn.peer_certs();
    let named = certs
        .first()
        .is_some_and(|leaf| cert_names_node(leaf, &hello.node));
    if !named {
        return Err(reject(
            RejectReason::IdentityMismatch,
            format!("client certificate does not name node {:?}", hello.node),
        ));
    }
    let allowed = shared.cfg.nodes.get(&hello.node);
    for r in &hello.routes {
        if !allowed.is_some_and(|a| a.iter().any(|a| a.contains_cidr(r))) {
            return Err(reject(
                RejectReason::RouteNotAllowed,
                format!(
                    "node {} may not serve {r} (relay config [nodes])",
                    hello.node
                ),
            ));
        }
    }
    if let Some(p) = hello.primary_addr {
        if !hello.routes.iter().any(|r| r.contains(&p)) {
            return Err(reject(
                RejectReason::Malformed,
                format!("primary address {p} is not inside the advertised routes"),
            ));
        }
    }
    if shared.is_shutting_down() {
        return Err(reject(RejectReason::ShuttingDown, "relay is shutting down"));
    }
    Ok(hello)
}

/// Runs the handshake on a fresh connection and, if accepted, the session
/// until it ends. Every step is bounded by the handshake timeout.
pub(crate) async fn serve_connection(
    conn: TunnelConn,
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let remote = conn.remote_addr();
    let hs_timeout = shared.cfg.limits.handshake_timeout;
    let result = tokio::time::timeout(hs_timeout, handshake(&conn, &shared)).await;
    // The handshake is over either way: free the slot before a rejected edge
    // gets its grace period or an accepted one runs for days.
    drop(permit);
    let (handle, control) = match result {
        Ok(Ok(v)) => v,
        Ok(Err((HandshakeError::Rejected(reason, msg), send))) => {
            shared.metrics.reject(reason);
            info!(%remote, reason = reason.as_str(), %msg, "handshake rejected");
            if let Some(mut send) = send {
                let reply = HelloReply::Rejected(Rejection {
                    reason,
                    message: msg,
                    relay_version: PROTOCOL_VERSION,
                    retry_after_ms: reason.is_transient().then_some(1000),
                });
                // Give the edge a bounded moment to read the reason before
                // the close discards anything still in flight.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = write_frame(&mut send, &reply).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
                    conn.closed().await
                })
                .await;
            }
            conn.close(close_code::REJECTED, reason.as_str());
            return;
        }
        Ok(Err((HandshakeError::Failed(kind, msg), _))) => {
            shared.metrics.handshake_failed(kind);
            debug!(%remote, kind, %msg, "handshake failed");
            conn.close(close_code::PROTOCOL, kind);
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failed("timeout");
            debug!(%remote, "handshake timed out");
            conn.close(close_code::PROTOCOL, "handshake timeout");
            return;
        }
    };
    let span = tracing::info_span!("session", node = %handle.node, session = handle.session_id, gen = handle.generation);
    run_session(handle, control, shared).instrument(span).await;
}

type ControlRx = mpsc::Receiver<Control>;
type ControlParts = (BiStream, ControlRx, RouteFeed);

/// Which other edges' routes `node` is told about and may reach.
fn visible<'a>(shared: &'a Shared, node: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |other| shared.policy.edges_may_talk(node, other)
}

#[allow(clippy::type_complexity)]
async fn handshake(
    conn: &TunnelConn,
    shared: &Arc<Shared>,
) -> Result<(Arc<SessionHandle>, ControlParts), (HandshakeError, Option<SendHalf>)> {
    let mut control = conn
        .accept_bi()
        .await
        .map_err(|e| (HandshakeError::Failed("protocol", e.to_string()), None))?;
    // Pings, pongs and route updates go ahead of bulk data in our send
    // buffers (a pong queued behind a download looks like a dead path).
    control
        .send
        .set_priority(relay_transport::conn::CONTROL_PRIORITY);
    let body = match read_frame_bytes(&mut control.recv, codec::MAX_FRAME_LEN).await {
        Ok(b) => b,
        Err(e @ FrameError::TooLarge { .. }) => {
            return Err((
                reject(RejectReason::Malformed, e.to_string()),
                Some(control.send),
            ));
        }
        Err(e) => return Err((HandshakeError::Failed("protocol", e.to_string()), None)),
    };
    let hello = match check_hello(shared, conn, &body) {
        Ok(h) => h,
        Err(e) => return Err((e, Some(control.send))),
    };
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let generation = shared.next_generation();
    let handle = Arc::new(SessionHandle {
        node: hello.node.clone(),
        // 53 bits: JSON consumers (jq, JavaScript) hold integers as doubles.
        session_id: rand::random::<u64>() >> 11,
        generation,
        routes: hello.routes.clone(),
        primary_addr: hello.primary_addr,
        agent: hello.agent.clone(),
        fallbacks: hello.fallbacks,
        capabilities: hello.capabilities,
        conn: conn.clone(),
        connected_at: SystemTime::now(),
        started: Instant::now(),
        last_seen_ms: AtomicU64::new(0),
        open_streams: AtomicU64::new(0),
        streams_total: AtomicU64::new(0),
        bytes_to_edge: AtomicU64::new(0),
        bytes_from_edge: AtomicU64::new(0),
        flows: relay_transport::udp::FlowTable::new(
            0,
            shared.cfg.limits.max_udp_flows_per_session,
            shared.udp.clone(),
        ),
        draining: AtomicBool::new(false),
        cancel: shared.shutdown.child_token(),
        control_tx,
    });
    match shared
        .registry
        .register(handle.clone(), shared.cfg.limits.max_sessions)
    {
        Ok(Some(old)) => {
            info!(node = %old.node, old_gen = old.generation, new_gen = generation, "session superseded");
            old.kick(close_code::SUPERSEDED, "superseded by a newer session");
        }
        Ok(None) => {}
        Err(e) => return Err((reject(e.reason, e.message), Some(control.send))),
    }
    let mut feed = RouteFeed::new(&hello.node, hello.capabilities);
    let cloud = shared.policy.cloud_ranges();
    let tunnel_routes = feed.hello_routes(&shared.registry, cloud, visible(shared, &hello.node));
    note_cut(shared, &feed);
    let reply = HelloReply::Accepted(ServerHello {
        session_id: handle.session_id,
        generation,
        relay_id: shared.cfg.relay_id.clone(),
        keepalive_ms: shared.cfg.quic.keepalive.as_millis() as u32,
        idle_timeout_ms: shared.cfg.quic.idle_timeout.as_millis() as u32,
        tunnel_routes,
        capabilities: capability::ALL,
    });
    if let Err(e) = write_frame(&mut control.send, &reply).await {
        shared.registry.remove(&handle.node, generation);
        return Err((HandshakeError::Failed("protocol", e.to_string()), None));
    }
    shared.metrics.sessions_accepted.fetch_add(1, Relaxed);
    Ok((handle, (control, control_rx, feed)))
}

/// Logs and counts a whole route list cut to fit an older edge's frame.
fn note_cut(shared: &Shared, feed: &RouteFeed) {
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

async fn run_session(
    handle: Arc<SessionHandle>,
    (control, mut control_rx, mut feed): ControlParts,
    shared: Arc<Shared>,
) {
    info!(remote = %handle.conn.remote_addr(), routes = ?handle.routes, "session up");
    // Ends by itself when the connection closes.
    tokio::spawn(relay_transport::udp::pump_datagrams(
        handle.conn.clone(),
        handle.flows.clone(),
    ));
    handle.touch();
    let BiStream { mut send, recv } = control;
    let mut frames = FramedRead::new(recv, codec::frame_codec());
    // The relay pings every keep-alive interval: on QUIC this measures "last
    // seen" for operators (QUIC keep-alives hold the NAT binding); on the
    // TCP fallback it is also the liveness check yamux lacks, and keeps the
    // NAT binding of an idle TCP connection warm.
    let mut ping = tokio::time::interval(shared.cfg.quic.keepalive);
    ping.tick().await;
    let write_timeout = shared.cfg.limits.handshake_timeout;
    // Route updates: the registry says "something changed"; we wait a
    // moment so a burst of sessions coming or going costs one update, then
    // send what changed for this edge (see RouteFeed). An edge with route
    // deltas got no routes in its hello: its first full set goes now.
    let mut changes = shared.registry.subscribe();
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    let mut update_due = !feed.is_legacy();
    let why = loop {
        let out = tokio::select! {
            biased;
            _ = handle.cancel.cancelled() => break "closed by relay".to_string(),
            why = handle.conn.closed() => break why,
            Some(msg) = control_rx.recv() => vec![msg],
            bi = handle.conn.accept_bi() => match bi {
                Ok(bi) => {
                    let span = tracing::Span::current();
                    tokio::spawn(crate::tunnel::serve_edge_stream(bi, handle.clone(), shared.clone()).instrument(span));
                    continue;
                }
                Err(e) => break e.to_string(),
            },
            r = changes.changed(), if !update_due => {
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
                match feed.poll(&shared.registry, cloud, visible(&shared, &handle.node)) {
                    FeedUpdate::None => continue,
                    FeedUpdate::Send(frames) => {
                        note_cut(&shared, &feed);
                        frames
                    }
                }
            }
            f = frames.next() => match f {
                Some(Ok(bytes)) => {
                    handle.touch();
                    match decode_control(&bytes) {
                        Ok(Incoming::Known { msg: Control::Ping { nonce }, .. }) => vec![Control::Pong { nonce }],
                        Ok(Incoming::Known { msg: Control::Pong { .. }, .. }) => continue,
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
                // QUIC has its own idle timeout; yamux has none, so a
                // silent edge is detected here, for both transports.
                if handle.last_seen_ago() > shared.cfg.quic.idle_timeout {
                    handle.conn.close(close_code::PROTOCOL, "idle timeout");
                    break "idle timeout: no control message from the edge".to_string();
                }
                vec![Control::Ping { nonce: rand::random() }]
            }
        };
        if let Err(why) = write_all(&mut send, &out, write_timeout).await {
            break why;
        }
    };
    // A superseded session finds a newer generation here and leaves it be.
    shared.registry.remove(&handle.node, handle.generation);
    info!(reason = %why, open_streams = handle.open_streams.load(Relaxed), "session down");
}
