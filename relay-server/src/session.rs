//! One edge session: its handle (what the relay knows and counts about
//! it), the control-stream actor, and opening tunnel streams towards the
//! edge. The handshake that creates it is in [`crate::handshake`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use relay_protocol::codec::{self, decode_control, write_frame, Incoming};
use relay_protocol::{
    capability, close_code, Cidr, ClientHello, Control, StreamOpen, StreamReply, StreamStatus,
};
use relay_transport::grant::StreamGrant;
use relay_transport::{BiStream, Direction, Meter, SendHalf, TunnelConn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::handshake::Claim;
use crate::liveness::{control_check, first_tick, ControlCheck};
use crate::registry::RouteOwner;
use crate::routefeed::{FeedUpdate, RouteFeed};
use crate::server::Shared;

/// Control messages queued towards one edge; small, since only the relay's
/// own bookkeeping (GOAWAY, route updates) produces them.
const CONTROL_QUEUE: usize = 16;

/// [`SessionHandle`]'s `reported` once the session has ended.
const ENDED: u64 = u64::MAX;

/// How long an edge's [`Control::Moving`] holds: it dials its next
/// session as soon as the relay answered, and gives up on that attempt
/// well within this (a renewal's bootstrap and dial).
const MOVE_MARK: Duration = Duration::from_secs(120);

/// Longest a planned move's old session drains (unless
/// `limits.drain_grace` is longer): an hour, not the certificate's
/// remaining life (4 hours at the default 12-hour lifetime). A drained
/// session holds a whole session's memory (its connection, ~46 KiB idle)
/// beside its successor's, and what still runs an hour after the move is
/// the tail of long-lived streams (a forgotten `kubectl logs -f`, a
/// port-forward), which the edge's next renewal would cut anyway; an
/// hour covers the streams a move used to reset (see "Planned moves" in
/// docs/architecture.md).
const MOVE_GRACE_MAX: Duration = Duration::from_secs(3600);

/// A live, registered edge session.
pub struct SessionHandle {
    /// Node name, bound to the client certificate.
    pub node: String,
    /// Random id for logs and the admin API.
    pub session_id: u64,
    /// Relay-wide increasing number; higher is newer.
    pub generation: u64,
    /// Prefixes the edge advertised in its hello (empty: the relay decides
    /// from the directory; the routed prefixes are the registry's).
    pub advertised: Vec<Cidr>,
    /// The primary address the edge advertised, if any.
    pub advertised_primary: Option<IpAddr>,
    /// The node's primary address (for `CONNECT <node>:<port>`); follows
    /// the directory.
    primary_addr: std::sync::RwLock<Option<IpAddr>>,
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
    /// What the relay's silence sweep last saw (QUIC sessions).
    pub(crate) heard: crate::liveness::Heard,
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
    /// Tunnel routes the edge reported as overlapping its LANs
    /// ([`Control::LanOverlaps`]; at most [`Control::MAX_LAN_OVERLAPS`]).
    pub lan_overlaps: std::sync::Mutex<Vec<Cidr>>,
    draining: AtomicBool,
    /// Until when (in [`SessionHandle::age_ms`]) the edge's last
    /// [`Control::Moving`] holds; 0 for none.
    moving_until_ms: AtomicU64,
    /// The session of this node a planned move left draining (see
    /// [`supersede`]): at most one per node, closed when the next session
    /// supersedes this one, or when this one ends without being
    /// superseded ([`SessionHandle::close_predecessor`]). Weak, so an
    /// ended session is not kept.
    predecessor: std::sync::Mutex<std::sync::Weak<SessionHandle>>,
    /// Woken when `open_streams` drops to 0 (see [`StreamGuard`]): a
    /// draining session closes then, without polling the count.
    streams_done: tokio::sync::Notify,
    /// The relay's `relay_sessions_draining` gauge.
    draining_gauge: Arc<AtomicU64>,
    cancel: CancellationToken,
    /// The first reason [`SessionHandle::kick`] was given.
    kicked: std::sync::OnceLock<String>,
    /// A digest of the status message last reported for the session (see
    /// [`SessionHandle::report_status`]; a digest, not the text, to keep
    /// idle sessions small), [`ENDED`] once the session has ended. Locked
    /// while reporting, so a report and the session's end never cross: a
    /// directory walk that reaches an ended session must not write its
    /// Node back to ready after the end wrote it down.
    reported: std::sync::Mutex<u64>,
    /// Boxed: a channel allocates its first block of 32 slots up front,
    /// which for an unboxed `Control` is 2.3 KiB per idle session.
    control_tx: mpsc::Sender<Box<Control>>,
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
}

impl SessionHandle {
    /// A session for an accepted hello (not registered yet).
    pub(crate) fn new(
        hello: &ClientHello,
        claim: &Claim,
        conn: &TunnelConn,
        shared: &Shared,
        generation: u64,
    ) -> (Arc<Self>, ControlRx) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let handle = Arc::new(SessionHandle {
            node: hello.node.clone(),
            // 53 bits: JSON consumers (jq, JavaScript) hold integers as doubles.
            session_id: rand::random::<u64>() >> 11,
            generation,
            advertised: hello.routes.clone(),
            advertised_primary: hello.primary_addr,
            primary_addr: std::sync::RwLock::new(claim.primary),
            agent: hello.agent.clone(),
            fallbacks: hello.fallbacks,
            capabilities: hello.capabilities,
            conn: conn.clone(),
            connected_at: SystemTime::now(),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            heard: Default::default(),
            lan_overlaps: Default::default(),
            open_streams: AtomicU64::new(0),
            streams_total: AtomicU64::new(0),
            bytes_to_edge: AtomicU64::new(0),
            bytes_from_edge: AtomicU64::new(0),
            flows: relay_transport::udp::FlowTable::new(
                0,
                shared.cfg.limits.max_udp_flows_per_session,
                hello.capabilities & capability::UDP_STREAM_PAYLOADS != 0,
                shared.udp.clone(),
            ),
            draining: AtomicBool::new(false),
            moving_until_ms: AtomicU64::new(0),
            predecessor: Default::default(),
            streams_done: tokio::sync::Notify::new(),
            draining_gauge: shared.metrics.sessions_draining.clone(),
            cancel: shared.shutdown.child_token(),
            kicked: std::sync::OnceLock::new(),
            reported: std::sync::Mutex::new(0),
            control_tx,
        });
        (handle, control_rx)
    }

    /// The session as its Node condition describes it now.
    pub(crate) fn status_info(&self, shared: &Shared) -> crate::status::SessionInfo {
        let routes = shared.registry.routes_of(&self.node);
        let dir = shared.directory.as_ref();
        crate::status::SessionInfo {
            transport: self.conn.kind().as_str(),
            relay_id: shared.cfg.relay_id.clone(),
            since: self.connected_at,
            remote: self.conn.remote_addr(),
            ambiguous: crate::directory::ambiguous_of(dir, &self.node),
            refused: crate::directory::refused_of(dir, &self.node),
            refused_ranges: crate::directory::refused_ranges_of(dir, &self.node),
            not_captured: crate::status::not_captured(&routes, shared.cfg.capture.is_some()),
        }
    }

    /// Reports the session to the status sink: as `up` the first time,
    /// later only when its description changed (the directory refused an
    /// address or a CNI range after the session came up, say), as
    /// `changed`, so the Node condition follows without an Event per
    /// directory change.
    ///
    /// Nothing once the session has ended ([`SessionHandle::report_end`])
    /// or while a newer session of the node holds the registry (a walk
    /// that took its list before the newer one came): the node's condition
    /// is the newer session's to write.
    pub(crate) fn report_status(&self, shared: &Shared) {
        use std::hash::{Hash, Hasher};
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let current = shared
            .registry
            .get(&self.node)
            .is_some_and(|s| s.generation == self.generation);
        if *reported == ENDED || !current {
            return;
        }
        let info = self.status_info(shared);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        info.message().hash(&mut h);
        // Never 0 ("not reported yet") nor ENDED.
        let digest = h.finish().clamp(1, ENDED - 1);
        let before = std::mem::replace(&mut *reported, digest);
        // The sink only queues: holding the lock across it is cheap.
        match before {
            0 => shared.status.up(&self.node, &info),
            d if d != digest => shared.status.changed(&self.node, &info),
            _ => {}
        }
    }

    /// Ends the session's reports: `end` (its removal from the registry
    /// and the `down` report) runs under the same lock as
    /// [`SessionHandle::report_status`], and no report follows it.
    pub(crate) fn report_end<R>(&self, end: impl FnOnce() -> R) -> R {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        *reported = ENDED;
        end()
    }

    /// The node's own address for `CONNECT <node>:<port>`.
    pub fn primary_addr(&self) -> Option<IpAddr> {
        *self.primary_addr.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the edge understands `capability` (bits it announced).
    pub fn has(&self, capability: u32) -> bool {
        self.capabilities & capability == capability
    }

    /// Updates what the session serves after a directory change: the
    /// registry's routes, the primary address, and (if it understands it)
    /// the edge, which accepts streams only to what it serves.
    pub fn serve(&self, shared: &Shared, claim: &Claim) -> Result<bool, String> {
        let changed = shared
            .registry
            .set_routes(&self.node, self.generation, claim.served.clone())
            .map_err(|e| e.message)?;
        let old = std::mem::replace(
            &mut *self.primary_addr.write().unwrap_or_else(|e| e.into_inner()),
            claim.primary,
        );
        if (changed || old != claim.primary) && self.has(capability::SERVED_ROUTES) {
            let msg = Control::ServedRoutes {
                routes: claim.served.clone(),
                primary_addr: claim.primary,
            };
            if self.control_tx.try_send(Box::new(msg)).is_err() {
                // The edge would refuse streams to new routes: make it
                // reconnect and learn them in its hello.
                self.kick(
                    close_code::KICKED,
                    "served routes changed; control queue full",
                );
            }
        }
        Ok(changed || old != claim.primary)
    }

    /// Time since the edge was last heard from: a message on the control
    /// stream, or (QUIC edges with [`capability::QUIC_LIVENESS`], which
    /// send control messages only every
    /// [`relay_protocol::QUIC_CONTROL_PING`]) any datagram, as seen by
    /// the relay's silence sweep ([`crate::liveness`], every second at the
    /// defaults).
    pub fn last_seen_ago(&self) -> Duration {
        let seen = Duration::from_millis(self.last_seen_ms.load(Relaxed));
        self.started.elapsed().saturating_sub(seen)
    }

    /// Milliseconds since the session started.
    pub(crate) fn age_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks the edge as heard from now.
    pub(crate) fn touch(&self) {
        self.last_seen_ms.store(self.age_ms(), Relaxed);
    }

    /// Why the session was kicked (the first reason given), or that the
    /// relay closed it (shutting down).
    fn kicked_why(&self) -> String {
        self.kicked
            .get()
            .cloned()
            .unwrap_or_else(|| "closed by relay".to_string())
    }

    /// Whether the session is draining (no new streams).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Closes the session now; in-flight streams are reset. `reason` goes
    /// to the edge, the log and the node's status.
    pub fn kick(&self, code: u32, reason: &str) {
        let _ = self.kicked.set(reason.to_string());
        self.cancel.cancel();
        self.conn.close(code, reason);
    }

    /// The edge said its next session is a planned move (see [`supersede`]).
    fn mark_moving(&self) {
        let until = self.age_ms().saturating_add(MOVE_MARK.as_millis() as u64);
        self.moving_until_ms.store(until, Relaxed);
    }

    /// Whether the edge's [`Control::Moving`] holds now; clears it.
    fn take_moving(&self) -> bool {
        let until = self.moving_until_ms.swap(0, Relaxed);
        until != 0 && self.age_ms() <= until
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
        if self.control_tx.try_send(Box::new(msg)).is_err() {
            debug!(node = %self.node, "control queue full; edge learns of the drain from the close");
        }
        let me = self.clone();
        me.draining_gauge.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            // Woken when the last stream ends (`StreamGuard`'s drop stores
            // a permit if nobody waits, so an end between the check and
            // the wait is not missed), not by polling: a planned move's
            // drain may last an hour, thousands of them at once.
            let closed = loop {
                if me.open_streams.load(Relaxed) == 0 {
                    break false;
                }
                tokio::select! {
                    _ = me.conn.closed() => break true,
                    _ = tokio::time::sleep_until(deadline) => break false,
                    _ = me.streams_done.notified() => {}
                }
            };
            me.draining_gauge.fetch_sub(1, Relaxed);
            if !closed {
                me.kick(close_code::GOING_AWAY, "drained");
            }
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

impl SessionHandle {
    /// This session ends (or its registration is withdrawn) without a
    /// newer one having superseded it: the session a planned move left
    /// draining for it closes now (GOING_AWAY). Either the move failed
    /// after the relay registered this session (its hello reply lost or
    /// late, the edge's time limit fired and it dropped this
    /// connection): the edge is still on the drained session, which gets
    /// no new streams and is out of the registry, so the node would be
    /// unreachable until that session's streams end or its grace does;
    /// closed, the edge reconnects in about a second. Or this session
    /// died later: the edge reconnects anyway, and the drained one,
    /// tied to no registered session, would otherwise escape the one
    /// drain per node (a later move would start a second).
    pub(crate) fn close_predecessor(&self) {
        let p = std::mem::take(&mut *self.predecessor.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(p) = p.upgrade() {
            if p.kicked.get().is_none() {
                info!(node = %p.node, gen = p.generation, successor = self.generation, open_streams = p.open_streams.load(Relaxed), "the session a move left draining closes: its successor ended");
                p.kick(
                    close_code::GOING_AWAY,
                    "the session it moved to ended; reconnect",
                );
            }
        }
    }
}

/// `old`, the node's session until `new` registered, makes way for it.
/// A planned move (the edge said [`Control::Moving`] on `old`: a renewed
/// certificate, a QUIC probe from the TCP fallback) drains `old`: the
/// registry routes new streams to `new` already, and `old`'s streams run
/// to their end, until its certificate expires (at least
/// `limits.drain_grace`, else at most an hour, see [`MOVE_GRACE_MAX`]). Any
/// other supersede (an edge restarted, a dead path) closes `old` at once.
/// Either way a session an earlier move left draining closes now, as it
/// does when `new` ends without being superseded
/// ([`SessionHandle::close_predecessor`]): at most one session of a node
/// drains.
pub(crate) fn supersede(old: &Arc<SessionHandle>, new: &SessionHandle, shared: &Shared) {
    let earlier = std::mem::take(&mut *old.predecessor.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(p) = earlier.upgrade() {
        info!(node = %p.node, gen = p.generation, "a session still draining from an earlier move closed");
        p.kick(close_code::SUPERSEDED, "superseded while draining");
    }
    if old.take_moving() {
        let grace = move_grace(&old.conn, shared.cfg.limits.drain_grace);
        info!(node = %old.node, old_gen = old.generation, new_gen = new.generation, ?grace, open_streams = old.open_streams.load(Relaxed), "session moved; the old one drains");
        *new.predecessor.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(old);
        old.drain(grace, "moved to a newer session of this node");
    } else {
        info!(node = %old.node, old_gen = old.generation, new_gen = new.generation, "session superseded");
        old.kick(close_code::SUPERSEDED, "superseded by a newer session");
    }
}

/// How long a session left by a planned move may drain: until the
/// certificate it was opened with expires, at most [`MOVE_GRACE_MAX`],
/// and at least `floor` (`limits.drain_grace`; alone when the certificate
/// cannot be read).
fn move_grace(conn: &TunnelConn, floor: Duration) -> Duration {
    let left = conn.peer_certs().first().and_then(|leaf| {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let end = cert.validity().not_after.timestamp();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs();
        u64::try_from(end.saturating_sub(i64::try_from(now).ok()?))
            .ok()
            .map(Duration::from_secs)
    });
    left.unwrap_or_default().min(MOVE_GRACE_MAX).max(floor)
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
        if self.session.open_streams.fetch_sub(1, Relaxed) == 1 {
            // The last one: a draining session may close now (see
            // `SessionHandle::drain`).
            self.session.streams_done.notify_one();
        }
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
    // deltas got no routes in its hello: its first full set goes now.
    let mut changes = shared.registry.subscribe();
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    let mut update_due = !feed.is_legacy();
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
    handle.report_end(|| {
        if shared.registry.remove(&handle.node, handle.generation) && !leaving {
            shared.status.down(&handle.node, &why);
        }
    });
    // Not superseded (a supersede took it): see `close_predecessor`.
    handle.close_predecessor();
    info!(reason = %why, open_streams = handle.open_streams.load(Relaxed), "session down");
}
