//! A session's handle: what the relay knows and counts about a live edge
//! session (its claim, routes, streams, drain and move state), shared by
//! the registry, the admin API and the data paths; and the guard each
//! tunnel stream holds on it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_protocol::{
    capability, close_code, Cidr, ClientHello, Control, StreamOpen, StreamReply, StreamStatus,
};
use relay_transport::{BiStream, Direction, Meter, TunnelConn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::ControlRx;
use crate::handshake::Claim;
use crate::registry::RouteOwner;
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
    /// The client certificate's notAfter (Unix seconds), read once at the
    /// start: the liveness sweep closes the session past it
    /// (`super::cert_check`). `None`: not readable (never for a session,
    /// whose certificate named its node).
    pub(crate) cert_not_after: Option<i64>,
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
    /// What the edge last reported about its own capture
    /// ([`Control::CaptureStatus`]); `None` from an edge without capture
    /// or one that does not report it (see [`SessionHandle::note_capture`]).
    capture: std::sync::Mutex<Option<crate::status::EdgeCapture>>,
    draining: AtomicBool,
    /// When the drain began and with which grace (see
    /// [`SessionHandle::drain_started`]).
    drain_started: std::sync::OnceLock<(SystemTime, Instant, Duration)>,
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
    /// Cancelled when the session is kicked (its actor then ends).
    pub(super) cancel: CancellationToken,
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
            cert_not_after: super::cert_check::not_after_of(conn),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            heard: Default::default(),
            lan_overlaps: Default::default(),
            capture: Default::default(),
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
            drain_started: std::sync::OnceLock::new(),
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
            capture_failing: self.capture().and_then(|c| c.failing()),
        }
    }

    /// What the edge last reported about its capture (`None`: nothing).
    pub fn capture(&self) -> Option<crate::status::EdgeCapture> {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the edge reports its capture is not installed (counted in
    /// `relay_edges_capture_failing`).
    pub fn capture_failing(&self) -> bool {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| !c.installed)
    }

    /// Takes the edge's capture report; returns what it replaces when it
    /// changed anything (the caller then logs and reports the session's
    /// status: one Node condition write per change, none for a repeat).
    pub(crate) fn note_capture(
        &self,
        now: crate::status::EdgeCapture,
    ) -> Option<Option<crate::status::EdgeCapture>> {
        let mut held = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref() == Some(&now) {
            return None;
        }
        Some(held.replace(now))
    }

    /// Reports the session to the status sink: as `up` the first time,
    /// later only when its description changed (the directory refused an
    /// address or a CNI range after the session came up, say), as
    /// `changed`, so the Node condition follows without an Event per
    /// directory change. Each report carries the session's generation
    /// ([`StatusSink::report`](crate::status::StatusSink::report)).
    ///
    /// Nothing once the session has ended ([`SessionHandle::report_end`])
    /// or while a newer session of the node holds the registry (a walk
    /// that took its list before the newer one came): the node's condition
    /// is the newer session's to write.
    pub(crate) fn report_status(&self, shared: &Shared) {
        let info = || self.status_info(shared);
        self.report_to(&shared.registry, &*shared.status, info, false);
    }

    /// [`SessionHandle::report_status`] with the registry that says
    /// whether the session is current, the sink, and the session's
    /// description (asked only when something is reported) given.
    ///
    /// With `again`, reports the session again, as `changed` even though
    /// its description did not change (as `up` if it never reported): the
    /// sink may not have written what it said before. Its replica did not
    /// write its node then (`replicas::DesignatedStatus` dropped the
    /// report) and does now, or its Node says `False` while it is live
    /// (see `k8s/stale_conditions.rs`).
    pub(crate) fn report_to(
        &self,
        registry: &crate::registry::Registry<SessionHandle>,
        sink: &dyn crate::status::StatusSink,
        info: impl FnOnce() -> crate::status::SessionInfo,
        again: bool,
    ) {
        use crate::status::Report;
        use std::hash::{Hash, Hasher};
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let current = registry
            .get(&self.node)
            .is_some_and(|s| s.generation == self.generation);
        if *reported == ENDED || !current {
            return;
        }
        let info = info();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        info.message().hash(&mut h);
        // Never 0 ("not reported yet") nor ENDED.
        let digest = h.finish().clamp(1, ENDED - 1);
        let before = std::mem::replace(&mut *reported, digest);
        // The sink only queues: holding the lock across it is cheap.
        let report = match before {
            0 => Report::Up(&info),
            d if d != digest || again => Report::Changed(&info),
            _ => return,
        };
        sink.report(&self.node, self.generation, report);
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
    pub(super) fn kicked_why(&self) -> String {
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
    pub(super) fn mark_moving(&self) {
        let until = self.age_ms().saturating_add(MOVE_MARK.as_millis() as u64);
        self.moving_until_ms.store(until, Relaxed);
    }

    /// Whether the edge's [`Control::Moving`] holds now; clears it.
    fn take_moving(&self) -> bool {
        let until = self.moving_until_ms.swap(0, Relaxed);
        until != 0 && self.age_ms() <= until
    }

    /// When the session began draining (wall clock), how long ago (the
    /// monotonic clock: a stepped wall clock does not change it) and with
    /// which grace, if it is draining (the admin API says so to a second
    /// drain request).
    pub fn drain_started(&self) -> Option<(SystemTime, Duration, Duration)> {
        self.drain_started
            .get()
            .map(|(at, since, grace)| (*at, since.elapsed(), *grace))
    }

    /// Stops new streams, tells the edge (GOAWAY), lets in-flight streams
    /// finish for up to `grace`, then closes. Returns false, changing
    /// nothing, when the session was draining already (its first grace
    /// holds).
    pub fn drain(self: &Arc<Self>, grace: Duration, reason: &str) -> bool {
        if self.draining.swap(true, Relaxed) {
            return false;
        }
        let _ = self
            .drain_started
            .set((SystemTime::now(), Instant::now(), grace));
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
        true
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
    /// The session a planned move left draining for this one, while it
    /// is open (see [`supersede`]): out of the registry, still carrying
    /// streams on its certificate (`super::cert_check` verifies it again).
    pub(crate) fn draining_predecessor(&self) -> Option<Arc<SessionHandle>> {
        self.predecessor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

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
        let grace = move_grace(old.cert_not_after, shared.cfg.limits.drain_grace);
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
/// cannot be read). `not_after` is the session's own
/// ([`SessionHandle::cert_not_after`], read once when it was created).
fn move_grace(not_after: Option<i64>, floor: Duration) -> Duration {
    let left = not_after.and_then(|end| {
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
