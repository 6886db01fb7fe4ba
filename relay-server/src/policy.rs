//! The one authorisation seam: every way into the tunnel (HTTP CONNECT,
//! TCP and UDP captured on the relay node, streams and flows edges open)
//! asks [`Policy::authorize`] whether `origin → target` is allowed, and
//! gets either the verdict or a typed [`Denied`] saying why not.
//!
//! The rules, in the order they are checked:
//! 1. IPv4-mapped IPv6 targets (`::ffff:10.0.0.1`) are judged as the IPv4
//!    address they carry, so no rule can be stepped around by spelling.
//! 2. Cloud origins reach edges (any session's routes, which the edge
//!    checks again against what it serves). A CONNECT client (the
//!    apiserver's egress selector sends it all of its node and pod
//!    traffic) also reaches the cloud itself, dialled by the relay: the
//!    cloud ranges (`tunnel_routes`, and the cloud Nodes' own pod ranges:
//!    see [`cloud_nodes`]) and the addresses and pod CIDRs of cloud Nodes
//!    (their kubelets), never an address an edge node claims
//!    (an edge without a session fails at once, as before) and with rule
//!    6's address checks. Captured traffic reaches edges only: the relay
//!    is not a general proxy into the cloud.
//! 3. An edge never reaches its own routes through the relay.
//! 4. An edge reaches another edge only when the two share a community
//!    (`[communities]` in relay.toml). Without one, edges are isolated
//!    from each other: a compromised shop node must not reach every site.
//! 5. An endpoint the relay picked for a Service (any client, Kubernetes
//!    semantics: any pod may reach any Service) goes to the edge that
//!    serves it, or is dialled by the relay, communities notwithstanding;
//!    rule 6's address checks still apply to what the relay dials.
//! 6. What the relay would dial itself for an edge is never an
//!    unspecified, loopback, link-local, multicast or broadcast address,
//!    nor one of the relay's own listeners (tunnel, CONNECT, admin,
//!    capture) on any of its addresses; and it is inside the cloud ranges:
//!    `tunnel_routes`, or a cloud Node's own pod range ([`cloud_nodes`]:
//!    Kubernetes mode, followed without a restart, never one an edge
//!    serves).
//!
//! Routing (which session serves a prefix) is the registry's business; the
//! caller passes the owner it found, so the table below is pure and unit
//! tested as a table.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use relay_protocol::{Cidr, StreamReply, StreamStatus};

pub use crate::directory::Claim;

pub mod cloud_nodes;
mod communities;
#[cfg(test)]
mod tests;
pub use communities::Communities;

/// The ranges edges send through the tunnel and may reach in the cloud:
/// `tunnel_routes` and the cloud Nodes' own pod ranges. Replaced whole
/// when it changes, so route feeds tell a change by pointer
/// ([`crate::routefeed::RouteFeed::poll`]).
pub type CloudRanges = Arc<BTreeSet<Cidr>>;

/// Where a connection or flow comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A cloud client: HTTP CONNECT (kube-apiserver, operators).
    Connect,
    /// A cloud client whose packets were captured on the relay node.
    Captured,
    /// A stream or flow opened by the edge of this node.
    Edge(&'a str),
    /// An endpoint the relay picked for a ClusterIP or Service name (the
    /// client, cloud or edge, asked for the Service, not the endpoint).
    Service,
}

impl Origin<'_> {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Connect => "connect",
            Origin::Captured => "captured",
            Origin::Edge(_) => "edge",
            Origin::Service => "service",
        }
    }
}

/// Transport protocol of the flow being authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP connection.
    Tcp,
    /// A UDP flow.
    Udp,
}

/// What the policy allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Through the session of the edge that serves the target.
    ToEdge,
    /// Dialled by the relay itself (a cloud target, for an edge).
    ToCloud,
}

/// Why a flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenyReason {
    /// Loopback, link-local, unspecified, multicast or broadcast.
    ForbiddenAddress,
    /// One of the relay's own listeners.
    RelayItself,
    /// The asking edge serves the target itself.
    OwnRoute,
    /// Edge to edge without a shared community.
    NoCommunity,
    /// Outside the cloud ranges edges may reach (`tunnel_routes` and the
    /// cloud Nodes' own pod ranges).
    OutsideCloudRanges,
    /// No edge serves the target (cloud clients reach only edges).
    NoRoute,
}

impl DenyReason {
    /// Every reason, in metric order.
    pub const ALL: [DenyReason; 6] = [
        DenyReason::ForbiddenAddress,
        DenyReason::RelayItself,
        DenyReason::OwnRoute,
        DenyReason::NoCommunity,
        DenyReason::OutsideCloudRanges,
        DenyReason::NoRoute,
    ];

    /// Stable label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::ForbiddenAddress => "forbidden_address",
            DenyReason::RelayItself => "relay_itself",
            DenyReason::OwnRoute => "own_route",
            DenyReason::NoCommunity => "no_community",
            DenyReason::OutsideCloudRanges => "outside_cloud_ranges",
            DenyReason::NoRoute => "no_route",
        }
    }
}

/// A refusal with its reason and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Machine-readable reason.
    pub reason: DenyReason,
    /// What was refused and why.
    pub message: String,
}

impl Denied {
    fn new(reason: DenyReason, message: String) -> Self {
        Denied { reason, message }
    }

    /// The stream reply that carries this refusal to the asking side
    /// (`NoRoute` for a target nobody serves, `Denied` for the rest). The
    /// message starts with the reason where the status does not name it
    /// already (`denied` → `no_community: …`); every reader prints the
    /// status before the message (CONNECT's `502 Bad Gateway: no_route:
    /// no edge session serves …`, the logs' `reason=`), so a `no_route`
    /// reason stays out of the message: it would show twice.
    pub fn reply(&self) -> StreamReply {
        let status = match self.reason {
            DenyReason::NoRoute => StreamStatus::NoRoute,
            _ => StreamStatus::Denied,
        };
        let message = if self.reason.as_str() == status.as_str() {
            self.message.clone()
        } else {
            format!("{}: {}", self.reason.as_str(), self.message)
        };
        StreamReply::fail(status, message)
    }
}

/// The target as the policy judges it: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(target: SocketAddr) -> SocketAddr {
    match target.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), target.port()),
            None => target,
        },
        IpAddr::V4(_) => target,
    }
}

/// Whether `ip` is no unicast address a peer can have: never a target,
/// never a node's address (see [`relay_transport::addr::is_special`]).
pub(crate) fn forbidden(ip: IpAddr) -> bool {
    relay_transport::addr::is_special(ip)
}

/// Whether `ip` is an address of this host (see
/// [`relay_transport::capture::is_local_address`]). Asked only for a
/// target whose port is one of the relay's listener ports, or a node port,
/// so the cost (one syscall) is rare.
pub(crate) use relay_transport::capture::is_local_address;

/// The relay's authorisation policy.
#[derive(Debug)]
pub struct Policy {
    /// `tunnel_routes`.
    cloud: Vec<Cidr>,
    /// The cloud Nodes' own pod ranges that joined the cloud ranges (see
    /// [`cloud_nodes`]).
    cloud_nodes: RwLock<cloud_nodes::PrefixSet>,
    /// `cloud` and the joined prefixes, as edges are sent them.
    ranges: RwLock<CloudRanges>,
    /// The prefixes last left out (logged once each) and the last joined.
    last_vet: Mutex<cloud_nodes::Vetted>,
    /// Whether CONNECT reaches the cloud (rule 2); see
    /// [`Policy::set_connect_cloud`].
    connect_cloud: bool,
    communities: Communities,
    /// Node → communities from its Node labels (Kubernetes mode).
    labels: RwLock<HashMap<String, BTreeSet<String>>>,
    /// Bumped whenever `labels` changes: route feeds resync (what each
    /// edge may see changed without any route changing).
    epoch: std::sync::atomic::AtomicU64,
    /// The relay's bound listeners; set once they are bound.
    own: RwLock<Vec<SocketAddr>>,
}

impl Policy {
    /// A policy from the cloud ranges edges may reach and the communities.
    pub fn new(cloud: Vec<Cidr>, communities: Communities) -> Self {
        Policy {
            ranges: RwLock::new(Arc::new(cloud.iter().copied().collect())),
            cloud,
            cloud_nodes: RwLock::default(),
            last_vet: Mutex::default(),
            connect_cloud: true,
            communities,
            labels: RwLock::default(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            own: RwLock::default(),
        }
    }

    /// Whether a CONNECT no edge session serves may be dialled by the relay
    /// in the cloud (rule 2; `listen.connect_cloud`, on by default). Off,
    /// CONNECT reaches edges only.
    pub fn set_connect_cloud(&mut self, on: bool) {
        self.connect_cloud = on;
    }

    /// Records a listener of the relay's own, never a tunnel target.
    pub fn add_own_listener(&self, addr: SocketAddr) {
        self.own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(canonical(addr));
    }

    /// Whether edge `viewer` may reach routes served by edge `owner`; also
    /// decides which other edges' routes `viewer` is told about.
    pub fn edges_may_talk(&self, viewer: &str, owner: &str) -> bool {
        let labels = self.labels.read().unwrap_or_else(|e| e.into_inner());
        viewer != owner && self.communities.share_with(viewer, owner, &labels)
    }

    /// Replaces the communities taken from Node labels; returns whether
    /// they changed (then [`Policy::epoch`] moved on).
    pub fn set_label_communities(&self, labels: HashMap<String, BTreeSet<String>>) -> bool {
        let mut cur = self.labels.write().unwrap_or_else(|e| e.into_inner());
        if *cur == labels {
            return false;
        }
        *cur = labels;
        self.epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Changes whenever edge-to-edge visibility may have changed without a
    /// route changing (label communities).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cloud ranges edges may reach and are sent as tunnel routes:
    /// `tunnel_routes` and the cloud Nodes' pod ranges that joined them.
    pub fn cloud_ranges(&self) -> CloudRanges {
        self.ranges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configured cloud ranges (`tunnel_routes`) alone.
    pub fn configured_ranges(&self) -> &[Cidr] {
        &self.cloud
    }

    /// Whether `ip` is inside the cloud ranges (configured or joined).
    fn in_cloud(&self, ip: IpAddr) -> bool {
        self.cloud.iter().any(|c| c.contains(&ip))
            || self
                .cloud_nodes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(ip)
    }

    /// Makes the cloud Nodes' prefixes (`candidates`, as
    /// `Directory::cloud_prefixes` gives them) the joined part of the
    /// cloud ranges, as [`cloud_nodes::vet`] picks them (`served(prefix)`
    /// names a route an edge session serves that overlaps it, and the
    /// edge). Each prefix left out is logged once (again only if it
    /// joined in between); what joined and left, in one line per change.
    /// Returns whether the cloud ranges changed (route feeds must then
    /// look again: the caller pokes the registry).
    pub fn set_cloud_nodes(
        &self,
        candidates: &[Cidr],
        served: impl Fn(&Cidr) -> Option<(Cidr, String)>,
    ) -> bool {
        let vetted = cloud_nodes::vet(candidates, &self.cloud, served);
        let mut last = self.last_vet.lock().unwrap_or_else(|e| e.into_inner());
        for (prefix, why) in vetted.left_out.difference(&last.left_out) {
            match why {
                cloud_nodes::LeftOut::TooWide => tracing::warn!(
                    %prefix,
                    "a cloud Node's pod range is wider than /{} (IPv4) or /{} (IPv6): not joined to the cloud ranges; list it in tunnel_routes if edges must reach it",
                    cloud_nodes::MIN_V4_LEN,
                    cloud_nodes::MIN_V6_LEN,
                ),
                cloud_nodes::LeftOut::EdgeServes(have, node) => tracing::warn!(
                    %prefix,
                    edge_route = %have,
                    %node,
                    "a cloud Node's pod range overlaps a route an edge serves: the edge's claim wins; the range is not a cloud range (edges are not sent it, the relay dials nothing in it for them) while the edge serves that route"
                ),
            }
        }
        if last.kept == vetted.kept {
            *last = vetted;
            return false;
        }
        // One line per change, not per prefix: a relist of a large cluster
        // changes them all at once. Both lists are sorted (`vet`).
        let joined: Vec<&Cidr> = (vetted.kept.iter())
            .filter(|c| last.kept.binary_search(c).is_err())
            .collect();
        let gone: Vec<&Cidr> = (last.kept.iter())
            .filter(|c| vetted.kept.binary_search(c).is_err())
            .collect();
        tracing::info!(
            joined = joined.len(),
            gone = gone.len(),
            total = vetted.kept.len(),
            first_joined = ?joined.first(),
            first_gone = ?gone.first(),
            "cloud Nodes' pod ranges in the cloud ranges changed; edges' routes follow"
        );
        let mut ranges: BTreeSet<Cidr> = self.cloud.iter().copied().collect();
        ranges.extend(vetted.kept.iter().copied());
        *self.cloud_nodes.write().unwrap_or_else(|e| e.into_inner()) =
            cloud_nodes::PrefixSet::new(&vetted.kept);
        *self.ranges.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ranges);
        *last = vetted;
        true
    }

    /// Why the relay must not dial `target` itself, whoever asks: its
    /// host's special addresses and its own listeners.
    fn dial_refused(&self, target: SocketAddr) -> Option<Denied> {
        let ip = target.ip();
        if forbidden(ip) {
            Some(Denied::new(
                DenyReason::ForbiddenAddress,
                format!("{ip} is a loopback, link-local, unspecified, multicast or broadcast address (or an IPv6 form of one)"),
            ))
        } else if self.is_relay_itself(target) {
            Some(Denied::new(
                DenyReason::RelayItself,
                format!("{target} is one of the relay's own listeners"),
            ))
        } else {
            None
        }
    }

    /// A CONNECT no session serves: dialled by the relay when the target
    /// is in the cloud (rule 2), else refused as unrouted.
    fn connect_to_cloud(&self, target: SocketAddr, claim: &Claim) -> Result<Verdict, Denied> {
        let ip = target.ip();
        match claim {
            Claim::Edge(node) => Err(Denied::new(
                DenyReason::NoRoute,
                format!("{ip} belongs to edge node {node}, and no edge session routes it (not connected, or an address several nodes share: reach the node by name)"),
            )),
            _ if !self.connect_cloud => Err(Denied::new(
                DenyReason::NoRoute,
                format!("no edge session serves {ip} (CONNECT reaches edges only: listen.connect_cloud = false)"),
            )),
            Claim::Nobody if !self.in_cloud(ip) => Err(Denied::new(
                DenyReason::NoRoute,
                format!("no edge session serves {ip}, and it is neither in the cloud ranges (tunnel_routes, cloud Nodes' pod ranges) nor a cloud node's"),
            )),
            Claim::Nobody | Claim::Cloud => match self.dial_refused(target) {
                Some(d) => Err(d),
                None => Ok(Verdict::ToCloud),
            },
        }
    }

    fn is_relay_itself(&self, target: SocketAddr) -> bool {
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        own.iter().any(|l| {
            l.port() == target.port()
                && (l.ip() == target.ip()
                    || (l.ip().is_unspecified() && is_local_address(target.ip())))
        })
    }

    /// Decides `origin → target`. `owner` is the node whose session serves
    /// the target (the registry's longest-prefix answer), if any; `claim`
    /// is who the node directory says claims the target (asked only for a
    /// CONNECT or a Service endpoint no session serves); `target` must
    /// already be [`canonical`].
    pub fn authorize(
        &self,
        origin: Origin<'_>,
        target: SocketAddr,
        _proto: Proto,
        owner: Option<&str>,
        claim: &Claim,
    ) -> Result<Verdict, Denied> {
        let ip = target.ip();
        match (origin, owner) {
            (Origin::Connect | Origin::Captured | Origin::Service, Some(_)) => Ok(Verdict::ToEdge),
            (Origin::Connect, None) => self.connect_to_cloud(target, claim),
            (Origin::Captured, None) => Err(Denied::new(
                DenyReason::NoRoute,
                format!("no edge session serves {ip}"),
            )),
            (Origin::Edge(me), Some(owner)) if me == owner => Err(Denied::new(
                DenyReason::OwnRoute,
                format!("{target} is served by node {me} itself"),
            )),
            (Origin::Edge(me), Some(owner)) => {
                if self.edges_may_talk(me, owner) {
                    Ok(Verdict::ToEdge)
                } else {
                    Err(Denied::new(
                        DenyReason::NoCommunity,
                        format!("nodes {me} and {owner} share no community ([communities] in relay.toml, or node-restriction.kubernetes.io/edge-relay-community-<name> Node labels)"),
                    ))
                }
            }
            // A Service's endpoint (named by the cluster's EndpointSlices,
            // not by the client): a cloud one is dialled by the relay; one
            // on an edge no session serves now never is, since its address
            // means nothing in the cloud network (or another host).
            (Origin::Service, None) => match claim {
                Claim::Edge(node) => Err(Denied::new(
                    DenyReason::NoRoute,
                    format!("endpoint {target} is on edge node {node}, which has no live session"),
                )),
                _ => self.dial_refused(target).map_or(Ok(Verdict::ToCloud), Err),
            },
            // The relay would dial this itself: never its own host's
            // special addresses or listeners, only the cloud ranges
            // (configured, or a cloud Node's own pod range), and
            // never an address an edge claims (an edge offline, or one of
            // a LAN several sites share): in the cloud network it means
            // another host, or none.
            (Origin::Edge(_), None) => match self.dial_refused(target) {
                Some(d) => Err(d),
                None if matches!(claim, Claim::Edge(_)) => Err(Denied::new(
                    DenyReason::NoRoute,
                    format!("{ip} belongs to an edge node with no live session routing it"),
                )),
                None if self.in_cloud(ip) => Ok(Verdict::ToCloud),
                None => Err(Denied::new(
                    DenyReason::OutsideCloudRanges,
                    format!(
                        "{target} is outside the cloud ranges this relay serves (tunnel_routes, and cloud Nodes' pod ranges)"
                    ),
                )),
            },
        }
    }
}
