//! The messages of the protocol.
//!
//! Sequence (see `docs/architecture.md` for diagrams):
//! 1. The edge opens the transport connection and its first bidirectional
//!    stream, the *control stream*, and sends a [`ClientHello`].
//! 2. The relay answers with a [`HelloReply`]: accepted with a
//!    [`ServerHello`], or rejected with a typed [`Rejection`].
//! 3. Both sides then exchange [`Control`] messages on the control stream.
//! 4. For every tunnelled connection the relay opens a new bidirectional
//!    stream, sends a [`StreamOpen`], and the edge answers with a
//!    [`StreamReply`]; after an `Ok` reply the stream carries raw bytes.
//!
//! Field order is wire order. How the format grows without a version bump
//! (old and new builds in one cluster during a rollout):
//! - a new message kind is a new [`Control`] variant at the end; it is sent
//!   only to a peer whose capability bits say it understands it, and a
//!   receiver ignores (and counts) variants it does not know;
//! - a new field goes at the end of a message; older receivers ignore the
//!   bytes after the fields they know, newer receivers read them with
//!   [`crate::codec::decode_with_rest`] when present;
//! - everything else (reordering, changing a type) needs a new
//!   [`crate::PROTOCOL_VERSION`].

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::Cidr;

/// Capability bits announced in the handshake (a `u32` bit set).
pub mod capability {
    /// Can carry TCP streams (every build can).
    pub const TCP_STREAMS: u32 = 1 << 0;
    /// Can carry UDP flows as datagrams.
    pub const UDP_DATAGRAMS: u32 = 1 << 1;
    /// Understands [`Control::RouteDelta`](super::Control::RouteDelta): the
    /// relay sends route changes in bounded chunks instead of whole lists,
    /// so any number of routes fits (an edge without it gets whole lists).
    pub const ROUTE_DELTAS: u32 = 1 << 2;
    /// Ignores control messages it does not know and bytes after the fields
    /// it knows (instead of closing the session). A peer may send newer
    /// messages or fields only to a peer that announced this bit.
    pub const EXTENSIBLE: u32 = 1 << 3;
    /// The relay appends a [`ServerHelloExt`](super::ServerHelloExt) to its
    /// accepting hello and sends [`Control::ServedRoutes`](super::Control::ServedRoutes):
    /// the relay, not the edge's own config, says what the edge serves (in
    /// Kubernetes, from its Node object).
    pub const SERVED_ROUTES: u32 = 1 << 4;
    /// Understands [`Control::ServiceDelta`](super::Control::ServiceDelta):
    /// the relay tells the edge which ClusterIP ports to capture ahead of
    /// its kube-proxy and which of their endpoints are on the edge itself.
    pub const SERVICES: u32 = 1 << 5;
    /// Understands [`Control::Replicas`](super::Control::Replicas): the
    /// relay tells the edge every replica it should hold a session to, and
    /// the edge keeps one session per replica. A relay sends it only to
    /// edges with this bit; an edge without it keeps one session.
    pub const REPLICAS: u32 = 1 << 6;
    /// Understands [`Control::ServiceNames`](super::Control::ServiceNames):
    /// the edge runs a node-local resolver and wants the cluster's Service
    /// names. An edge announces it only when its resolver is on.
    pub const SERVICE_NAMES: u32 = 1 << 7;
    /// On QUIC, the edge checks the path by what it receives and keeps it
    /// warm with QUIC's own PINGs (two small packets per keep-alive, where
    /// a ping and pong on the control stream cost three larger ones), and
    /// pings on the control stream only every
    /// [`QUIC_CONTROL_PING`](crate::QUIC_CONTROL_PING). A relay then does
    /// not ping it at keep-alive pace, nor take a quieter control stream
    /// for a lost edge (see `docs/architecture.md`, "Liveness").
    pub const QUIC_LIVENESS: u32 = 1 << 8;
    /// Carries a UDP payload too large for one datagram on its flow's
    /// stream ([`crate::datagram::encode_stream_payload`]), as IP
    /// fragmentation would carry it on the real network. Sent only to a
    /// peer with this bit; an older peer reads and ignores bytes on a
    /// flow's stream, so towards it such payloads are dropped and counted
    /// as before.
    pub const UDP_STREAM_PAYLOADS: u32 = 1 << 9;
    /// Understands node ports in its [`Control::ServiceDelta`](super::Control::ServiceDelta)
    /// table (a [`ServiceKey`](super::ServiceKey) at [`ServiceKey::node_port`](super::ServiceKey::node_port)),
    /// and the relay resolves a stream to such an address: the edge
    /// captures the cluster's NodePorts on its own addresses, as it
    /// captures ClusterIPs. A relay sends them only to edges with this bit.
    pub const NODE_PORTS: u32 = 1 << 10;
    /// The relay understands [`Control::Keepalive`](super::Control::Keepalive)
    /// and then ends a [`QUIC_LIVENESS`] session silent for two of the
    /// edge's keep-alive intervals, instead of its whole idle timeout. An
    /// edge sends the message only to a relay with this bit.
    pub const EDGE_KEEPALIVE: u32 = 1 << 11;
    /// The relay understands [`Control::LanOverlaps`](super::Control::LanOverlaps)
    /// and shows the routes in its admin API. An edge sends the message only
    /// to a relay with this bit.
    pub const LAN_OVERLAPS: u32 = 1 << 12;
    /// The relay understands [`Control::Moving`](super::Control::Moving):
    /// when the next session of the node registers (a renewed certificate,
    /// the QUIC probe from the TCP fallback) it drains the session the
    /// edge sent it on, so that session's streams run to their end,
    /// instead of closing it. An edge sends the message only to a relay
    /// with this bit.
    pub const MOVES: u32 = 1 << 13;
    /// The relay understands [`Control::CaptureStatus`](super::Control::CaptureStatus)
    /// and shows whether the edge's capture is installed (admin API,
    /// metrics, the Node condition). An edge sends the message only to a
    /// relay with this bit.
    pub const CAPTURE_STATUS: u32 = 1 << 14;
    /// Every bit this build understands.
    pub const ALL: u32 = TCP_STREAMS
        | UDP_DATAGRAMS
        | ROUTE_DELTAS
        | EXTENSIBLE
        | SERVED_ROUTES
        | SERVICES
        | REPLICAS
        | SERVICE_NAMES
        | QUIC_LIVENESS
        | UDP_STREAM_PAYLOADS
        | NODE_PORTS
        | EDGE_KEEPALIVE
        | LAN_OVERLAPS
        | MOVES
        | CAPTURE_STATUS;
}

/// The first message of a session, sent by the edge on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Protocol version the edge speaks; must stay the first field so that
    /// any future relay can read it (see [`crate::codec::peek_version`]).
    pub version: u16,
    /// Kubernetes node name; must match the client certificate's name.
    pub node: String,
    /// The prefixes this edge serves: pod CIDRs and host addresses.
    pub routes: Vec<Cidr>,
    /// The node's primary address, used when a target names the node
    /// (`CONNECT edge-1:10250`). Must lie inside `routes`.
    pub primary_addr: Option<IpAddr>,
    /// Bit set from [`capability`].
    pub capabilities: u32,
    /// Free-form software version of the edge, shown to operators.
    pub agent: String,
    /// How many times this edge fell back from QUIC to TLS over TCP since
    /// it started (shown by the relay's admin API).
    pub fallbacks: u32,
}

/// The relay's answer to a [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The session is registered; its routes are live.
    Accepted(ServerHello),
    /// The session was refused; the connection closes after this message.
    Rejected(Rejection),
}

/// Session parameters chosen by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// Unique id of this session (random, for logs and the admin API).
    pub session_id: u64,
    /// Increases with every session the relay accepts, so a stale session
    /// of a node can never replace a fresher one.
    pub generation: u64,
    /// Which relay replica accepted the session.
    pub relay_id: String,
    /// Keep-alive interval the relay uses, in milliseconds.
    pub keepalive_ms: u32,
    /// Idle timeout after which a silent session is dropped, in milliseconds.
    pub idle_timeout_ms: u32,
    /// Prefixes the edge should send back through the tunnel (cloud pod and
    /// service ranges, other edges' routes).
    pub tunnel_routes: Vec<Cidr>,
    /// Capability bits the relay supports.
    pub capabilities: u32,
}

/// Fields appended after a [`HelloReply::Accepted`] in the same frame, for
/// edges that announced [`capability::SERVED_ROUTES`] (an older edge would
/// refuse bytes after the reply). Read with
/// [`crate::codec::decode_with_rest`]; grows by appending fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHelloExt {
    /// What this edge serves, as the relay routes it: the prefixes the
    /// relay sends to it. The edge accepts streams to these (and to
    /// `primary_addr`) and captures none of them.
    pub served_routes: Vec<Cidr>,
    /// The node's own address for `CONNECT <node>:<port>`; may be outside
    /// `served_routes` when another node shares it (repeated site LANs),
    /// in which case only by-name streams reach it.
    pub primary_addr: Option<IpAddr>,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The hello's version is not one the relay speaks.
    UnsupportedVersion,
    /// The hello's node name differs from the client certificate.
    IdentityMismatch,
    /// A claimed route is outside what this node may serve.
    RouteNotAllowed,
    /// A claimed route overlaps a route of another live node.
    RouteConflict,
    /// The relay is at its session or handshake limit; retry later.
    Overloaded,
    /// The hello could not be decoded or is inconsistent.
    Malformed,
    /// The relay is shutting down; try another replica.
    ShuttingDown,
    /// The relay knows no node of this name (no Node object in the
    /// cluster, or not in the relay's `[nodes]` table). Sent only to edges
    /// that announced [`capability::EXTENSIBLE`]; older edges get
    /// `RouteNotAllowed`, which they know.
    UnknownNode,
}

impl RejectReason {
    /// Stable lower-case label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::IdentityMismatch => "identity_mismatch",
            RejectReason::RouteNotAllowed => "route_not_allowed",
            RejectReason::RouteConflict => "route_conflict",
            RejectReason::Overloaded => "overloaded",
            RejectReason::Malformed => "malformed",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::UnknownNode => "unknown_node",
        }
    }

    /// Whether retrying the same hello can succeed without a config change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RejectReason::Overloaded | RejectReason::ShuttingDown | RejectReason::RouteConflict
        )
    }
}

/// A typed refusal of a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The machine-readable reason.
    pub reason: RejectReason,
    /// A human-readable explanation (which route, which name).
    pub message: String,
    /// The protocol version the relay speaks.
    pub relay_version: u16,
    /// Suggested wait before retrying, in milliseconds, if any.
    pub retry_after_ms: Option<u32>,
}

/// Messages exchanged on the control stream after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Control {
    /// Liveness probe; the peer answers with `Pong` carrying the same nonce.
    Ping {
        /// Echoed back in the `Pong`.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The nonce of the `Ping` being answered.
        nonce: u64,
    },
    /// The prefixes the edge should send through the tunnel changed.
    RouteUpdate {
        /// The complete new list (not a delta), so a lost update heals.
        tunnel_routes: Vec<Cidr>,
    },
    /// The sender will open no new streams; in-flight ones may finish.
    GoAway {
        /// Why (shutdown, operator drain).
        reason: String,
        /// How long in-flight streams have before the connection closes.
        grace_ms: u32,
    },
    /// A change to the prefixes the edge sends through the tunnel, sent only
    /// to edges that announced [`capability::ROUTE_DELTAS`]. A session starts
    /// with an empty set; the relay sends the whole set as additions, then
    /// each change. `add.len() + remove.len()` is at most
    /// [`Control::MAX_ROUTES_PER_DELTA`], so a frame never outgrows
    /// [`crate::MAX_FRAME_LEN`] whatever the number of routes; a batch larger
    /// than that spans several frames and only its last has `complete` set.
    RouteDelta {
        /// Start from an empty set before applying this frame (the first
        /// frame of a full resync).
        reset: bool,
        /// Prefixes to add.
        add: Vec<Cidr>,
        /// Prefixes to remove.
        remove: Vec<Cidr>,
        /// The last frame of a batch: apply everything received so far.
        complete: bool,
    },
    /// What the edge serves changed (its Node's pod CIDRs or addresses);
    /// sent only to edges that announced [`capability::SERVED_ROUTES`].
    /// Replaces the [`ServerHelloExt`] values.
    ServedRoutes {
        /// The prefixes the relay now routes to this edge.
        routes: Vec<Cidr>,
        /// The node's own address (see [`ServerHelloExt::primary_addr`]).
        primary_addr: Option<IpAddr>,
    },
    /// A change to the edge's table of ClusterIP ports, sent only to edges
    /// that announced [`capability::SERVICES`]. Same batching as
    /// [`Control::RouteDelta`]: a session starts with an empty table, the
    /// first frame of a full resync has `reset`, a batch may span frames
    /// and only its last has `complete` (build them with
    /// [`Control::service_deltas`], which keeps every frame bounded).
    ServiceDelta {
        /// Start from an empty table before applying this frame.
        reset: bool,
        /// Ports added or changed (replacing the entry with the same key).
        upsert: Vec<ServicePort>,
        /// Ports removed.
        remove: Vec<ServiceKey>,
        /// The last frame of a batch: apply everything received so far.
        complete: bool,
    },
    /// The relay replicas this edge should hold one session to each, sent
    /// only to edges that announced [`capability::REPLICAS`]: once after the
    /// hello and again whenever the set changes. The list is complete (a
    /// lost or reordered message heals with the next one); an empty list
    /// means "no replica set: keep the one session you have".
    Replicas {
        /// Every live replica, this one included, in a stable order.
        replicas: Vec<Replica>,
    },
    /// A change to the edge resolver's table of Service names, sent only to
    /// edges that announced [`capability::SERVICE_NAMES`]. Same batching as
    /// [`Control::ServiceDelta`]: a session starts with an empty table, the
    /// first frame of a full resync has `reset`, only the last frame of a
    /// batch has `complete` (build them with [`Control::service_names`]).
    ServiceNames {
        /// Start from an empty table before applying this frame.
        reset: bool,
        /// The cluster's DNS domain (`cluster.local`), in every frame.
        cluster_domain: String,
        /// Services added or changed (replacing the entry with the same key).
        upsert: Vec<crate::names::ServiceName>,
        /// Services removed.
        remove: Vec<crate::names::ServiceNameKey>,
        /// The last frame of a batch: apply everything received so far.
        complete: bool,
    },
    /// The edge's keep-alive interval, sent once after the hello to a relay
    /// that announced [`capability::EDGE_KEEPALIVE`]. On QUIC such an edge
    /// sends a packet at least this often while its path works (QUIC's PING
    /// when nothing arrived for an interval, else the acknowledgements of
    /// what did), so two intervals without one mean the path is dead. The
    /// relay has to be the one to decide that for a path dead only
    /// upstream: the edge still hears the relay and sees nothing wrong.
    Keepalive {
        /// The interval, in milliseconds.
        interval_ms: u32,
    },
    /// The tunnel routes that overlap one of the edge's LANs, sent by the
    /// edge to a relay that announced [`capability::LAN_OVERLAPS`]: after
    /// the hello when there are any, and again whenever the set changes
    /// (the list is complete; empty means none). The LAN's part of such a
    /// route is reached on the LAN, never through the relay, so the
    /// operator should know which sites cannot reach which cloud ranges.
    LanOverlaps {
        /// The overlapping tunnel routes, at most
        /// [`Control::MAX_LAN_OVERLAPS`].
        routes: Vec<Cidr>,
    },
    /// A planned move (edge to a relay that announced
    /// [`capability::MOVES`]): the edge is about to open a new session of
    /// its node (a renewed certificate, a QUIC probe from the TCP
    /// fallback). When that session registers, the relay drains the
    /// session this came on (GOAWAY; its streams run to their end, bounded)
    /// instead of closing it, and answers with the same message (same
    /// nonce) once it has taken note, so the edge dials only then.
    Moving {
        /// Echoed back by the relay.
        nonce: u64,
    },
    /// Whether the edge's capture is on its node, sent by an edge whose
    /// capture is configured to a relay that announced
    /// [`capability::CAPTURE_STATUS`]: after the hello, and again when it
    /// is installed or fails (not on every retry of a failing install).
    /// While it is not installed the tunnel still carries the cloud's
    /// streams to the node, but the node's pods do not reach the cloud
    /// ranges: the relay is where an operator of many edges looks, so it
    /// is told. Build it with [`Control::capture_status`], which bounds
    /// the error.
    CaptureStatus {
        /// Capture is on the node.
        installed: bool,
        /// Why not (the failing command's error), at most
        /// [`Control::MAX_CAPTURE_ERROR`] bytes; empty while installed.
        error: String,
    },
}

/// One relay replica as an edge should reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Replica {
    /// The replica's id (its `relay_id`; unique among live replicas).
    pub id: String,
    /// Where edges dial this replica: `host:port` of its own address, not
    /// a load balancer's (a balancer hashing the UDP 5-tuple breaks QUIC
    /// connection migration, and the edge must reach each replica).
    pub addr: String,
}

/// A ClusterIP port: address, port and transport; or, with the IPv4
/// address `0.0.0.0` ([`ServiceKey::node_port`]), a node port, which every
/// address of every node takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// ClusterIP and Service port (`0.0.0.0:nodePort` for a node port).
    pub vip: SocketAddr,
    /// UDP when true, TCP otherwise.
    pub udp: bool,
}

impl ServiceKey {
    /// Node port `port`: in an edge's table (sent only to edges announcing
    /// [`capability::NODE_PORTS`]) and as the target of a stream an edge
    /// opens for a connection it captured on one of its own addresses
    /// (the relay picks one of the Service's endpoints).
    pub fn node_port(port: u16, udp: bool) -> ServiceKey {
        ServiceKey {
            vip: SocketAddr::from(([0, 0, 0, 0], port)),
            udp,
        }
    }

    /// Whether this is a node port ([`ServiceKey::node_port`]).
    pub fn is_node_port(&self) -> bool {
        self.vip.ip() == std::net::IpAddr::from([0, 0, 0, 0])
    }
}

/// One ClusterIP port as an edge needs it to decide, ahead of its own
/// kube-proxy, where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Which ClusterIP port.
    pub key: ServiceKey,
    /// Some usable endpoint is not on this edge: the edge captures the
    /// port (when it has no endpoint of its own to use, the connection goes
    /// to the relay, which picks an endpoint).
    pub remote: bool,
    /// Usable endpoints on this edge (`IP:targetPort`), at most
    /// [`ServicePort::MAX_LOCAL`]; the edge prefers them.
    pub local: Vec<SocketAddr>,
}

impl ServicePort {
    /// Most local endpoints listed per port (an EndpointSlice holds 100 by
    /// default; one node rarely runs more replicas of one Service).
    pub const MAX_LOCAL: usize = 64;
}

impl Control {
    /// Number of variants this build knows; a frame whose variant index is
    /// at or above it comes from a newer peer.
    pub const VARIANTS: u32 = 13;

    /// Most routes one [`Control::LanOverlaps`] carries (well inside a
    /// frame); a relay keeps no more than this per session either.
    pub const MAX_LAN_OVERLAPS: usize = 256;

    /// Most bytes of the error one [`Control::CaptureStatus`] carries: an
    /// `nft` or `ip` error line and the command, not a whole listing. A
    /// relay keeps no more per session, and puts it in a Node condition.
    pub const MAX_CAPTURE_ERROR: usize = 512;

    /// A [`Control::CaptureStatus`] with `error` cut to
    /// [`Control::MAX_CAPTURE_ERROR`] bytes (at a character boundary), and
    /// no error when `installed`.
    pub fn capture_status(installed: bool, error: &str) -> Control {
        let error = if installed {
            String::new()
        } else {
            truncate_str(error.trim(), Self::MAX_CAPTURE_ERROR).to_string()
        };
        Control::CaptureStatus { installed, error }
    }

    /// Byte budget of the entries in one [`Control::ServiceDelta`]: well
    /// inside [`crate::MAX_FRAME_LEN`] whatever the mix of entries.
    pub const SERVICE_DELTA_BUDGET: usize = 48 * 1024;

    /// Most replicas in one [`Control::Replicas`] (a frame's bound, far
    /// above any sane deployment; edges cap what they follow lower).
    pub const MAX_REPLICAS: usize = 256;

    /// Most prefixes (added plus removed) in one [`Control::RouteDelta`]:
    /// 2,048 IPv6 prefixes encode to about 37 KiB, well inside a frame.
    pub const MAX_ROUTES_PER_DELTA: usize = 2048;

    /// Splits a change into [`Control::RouteDelta`] frames of at most
    /// [`Control::MAX_ROUTES_PER_DELTA`] prefixes; the first carries
    /// `reset`, the last is `complete`. An empty change yields one empty,
    /// complete frame.
    pub fn route_deltas(reset: bool, add: Vec<Cidr>, remove: Vec<Cidr>) -> Vec<Control> {
        let n = Self::MAX_ROUTES_PER_DELTA;
        let mut out = Vec::new();
        let mut add = add.into_iter().peekable();
        let mut remove = remove.into_iter().peekable();
        loop {
            // Removals first: a prefix moving between owners is removed
            // before it is added again, never the other way round.
            let r: Vec<Cidr> = remove.by_ref().take(n).collect();
            let a: Vec<Cidr> = add.by_ref().take(n - r.len()).collect();
            let done = add.peek().is_none() && remove.peek().is_none();
            out.push(Control::RouteDelta {
                reset: reset && out.is_empty(),
                add: a,
                remove: r,
                complete: done,
            });
            if done {
                return out;
            }
        }
    }
}

impl Control {
    /// Splits a change of the service table into [`Control::ServiceDelta`]
    /// frames whose entries stay within [`Control::SERVICE_DELTA_BUDGET`]
    /// bytes (an entry's worst case is about 1.3 KiB: IPv6 with
    /// [`ServicePort::MAX_LOCAL`] endpoints, which are cut to that number
    /// here). Removals go first; the first frame carries `reset`, the last
    /// is `complete`; an empty change yields one empty, complete frame.
    pub fn service_deltas(
        reset: bool,
        upsert: Vec<ServicePort>,
        remove: Vec<ServiceKey>,
    ) -> Vec<Control> {
        // Worst-case encoded sizes: an address is at most 1 + 16 + 2 bytes,
        // each length prefix at most 9.
        const ADDR: usize = 19;
        const KEY: usize = ADDR + 1;
        let cost = |p: &ServicePort| KEY + 1 + 9 + p.local.len() * ADDR;
        let mut out = Vec::new();
        let mut upsert = upsert.into_iter().peekable();
        let mut remove = remove.into_iter().peekable();
        loop {
            let (mut r, mut u, mut used) = (Vec::new(), Vec::new(), 0usize);
            while used + KEY <= Self::SERVICE_DELTA_BUDGET {
                let Some(k) = remove.next() else { break };
                used += KEY;
                r.push(k);
            }
            while let Some(p) = upsert.peek() {
                let c = cost(p).min(KEY + 10 + ServicePort::MAX_LOCAL * ADDR);
                if used + c > Self::SERVICE_DELTA_BUDGET {
                    break;
                }
                let Some(mut p) = upsert.next() else { break };
                p.local.truncate(ServicePort::MAX_LOCAL);
                used += c;
                u.push(p);
            }
            let done = upsert.peek().is_none() && remove.peek().is_none();
            out.push(Control::ServiceDelta {
                reset: reset && out.is_empty(),
                upsert: u,
                remove: r,
                complete: done,
            });
            if done {
                return out;
            }
        }
    }

    /// Applies a [`Control::ServiceDelta`] to `table` (keyed by
    /// [`ServicePort::key`]); returns `Some(complete)`, or `None` (table
    /// untouched) for any other message.
    pub fn apply_service_delta(
        &self,
        table: &mut std::collections::BTreeMap<ServiceKey, ServicePort>,
    ) -> Option<bool> {
        let Control::ServiceDelta {
            reset,
            upsert,
            remove,
            complete,
        } = self
        else {
            return None;
        };
        if *reset {
            table.clear();
        }
        for k in remove {
            table.remove(k);
        }
        for p in upsert {
            table.insert(p.key, p.clone());
        }
        Some(*complete)
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The destination of a tunnelled connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A name and port, resolved by the receiving side.
    Name {
        /// Host or service name.
        host: String,
        /// Port number.
        port: u16,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Transport-layer protocol of a tunnelled flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum L4 {
    /// A TCP connection spliced onto the stream.
    Tcp,
    /// A UDP flow: payloads travel as datagrams tagged with `flow` (see
    /// [`crate::datagram`]); the stream stays open for the flow's lifetime
    /// and closing it ends the flow.
    Udp {
        /// Flow id chosen by the opener, unique among its open flows on this
        /// connection (relay-opened ids have the top bit clear, edge-opened
        /// ids have it set, so the two never collect the same id).
        flow: u32,
    },
}

/// Top bit of a flow id opened by the edge.
pub const EDGE_FLOW_BIT: u32 = 1 << 31;

/// The header that starts every data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Where to connect.
    pub target: Target,
    /// The original client address as the opening side saw it (for logs
    /// and policy; never used for routing).
    pub source: Option<SocketAddr>,
    /// TCP stream or UDP flow.
    pub l4: L4,
}

/// Outcome of a [`StreamOpen`], so the caller learns *why* a dial failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StreamStatus {
    /// Connected; raw bytes follow in both directions.
    Ok,
    /// The target actively refused the connection (TCP RST).
    Refused,
    /// No route to the target, or the network is unreachable.
    Unreachable,
    /// The dial did not complete within the timeout.
    Timeout,
    /// The target is outside what the receiving side serves or allows.
    Denied,
    /// The receiving side knows no route or session for the target.
    NoRoute,
    /// Any other failure; see the message.
    Error,
}

impl StreamStatus {
    /// Stable lower-case label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamStatus::Ok => "ok",
            StreamStatus::Refused => "refused",
            StreamStatus::Unreachable => "unreachable",
            StreamStatus::Timeout => "timeout",
            StreamStatus::Denied => "denied",
            StreamStatus::NoRoute => "no_route",
            StreamStatus::Error => "error",
        }
    }

    /// Every status, in wire order (for metrics initialisation).
    pub const ALL: [StreamStatus; 7] = [
        StreamStatus::Ok,
        StreamStatus::Refused,
        StreamStatus::Unreachable,
        StreamStatus::Timeout,
        StreamStatus::Denied,
        StreamStatus::NoRoute,
        StreamStatus::Error,
    ];
}

/// The answer to a [`StreamOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReply {
    /// Outcome.
    pub status: StreamStatus,
    /// Detail for humans (`connect 10.0.0.5:80: connection refused`).
    pub message: String,
}

impl StreamReply {
    /// A successful reply with no message.
    pub fn ok() -> Self {
        StreamReply {
            status: StreamStatus::Ok,
            message: String::new(),
        }
    }

    /// A failure with a reason.
    pub fn fail(status: StreamStatus, message: impl Into<String>) -> Self {
        StreamReply {
            status,
            message: message.into(),
        }
    }
}
