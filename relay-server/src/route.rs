//! Where a stream or flow goes, and whether it may: the one path every
//! ingress takes (CONNECT, captured TCP and UDP, streams edges open). Finds
//! the session serving a destination, resolves a ClusterIP or node port to
//! one of its endpoints, and asks the policy.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_protocol::{ServiceKey, StreamReply, StreamStatus};

use crate::policy::{canonical, Claim, Origin, Proto, Verdict};
use crate::server::Shared;
use crate::services::Backend;
use crate::session::SessionHandle;

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
/// [`route`] unchanged. `client`, the address the connection or flow
/// comes from when known, keeps it to one endpoint of a
/// `sessionAffinity: ClientIP` Service.
pub(crate) fn route_any(
    shared: &Shared,
    origin: Origin<'_>,
    target: SocketAddr,
    proto: Proto,
    prefer: Option<&str>,
    client: Option<std::net::IpAddr>,
) -> Result<(Route, SocketAddr), StreamReply> {
    let snap = shared.services.snapshot();
    let target = canonical(target);
    let udp = proto == Proto::Udp;
    let sticky = |key: ServiceKey| {
        client
            .filter(|_| snap.sticky.contains(&key))
            .map(crate::services::sticky_turn)
    };
    if let Some(b) = snap.backends(target, proto) {
        let key = ServiceKey { vip: target, udp };
        if !snap.source_allowed(&key, client) {
            shared.metrics.service_pick("source_range");
            return Err(StreamReply::fail(
                StreamStatus::Refused,
                format!(
                    "service {target} is a load balancer's address with loadBalancerSourceRanges, and the client {} is outside them",
                    client.map_or_else(String::new, |c| c.to_string())
                ),
            ));
        }
        if snap.node_local.contains(&key) {
            return route_node_local(shared, b, prefer, sticky(key), proto, &target);
        }
        return route_hinted(shared, b, prefer, sticky(key), proto, &target);
    }
    let np_key = ServiceKey::node_port(target.port(), udp);
    let sticky = sticky(np_key);
    // `externalTrafficPolicy: Local`: only the reached node's own
    // endpoints serve it (no node captures these; asked anyway, the relay
    // answers with that node's, or refuses).
    let local = snap.node_local.contains(&np_key);
    match snap.node_port(target.port(), proto) {
        Some(b) => match node_port_of(shared, origin, target) {
            Some(NodePortAt::Asker) if local => {
                route_node_local(shared, b, prefer, sticky, proto, &target)
            }
            Some(NodePortAt::Asker) => route_hinted(shared, b, prefer, sticky, proto, &target),
            // The relay node's: its own endpoints for a node-local port,
            // its topology otherwise (`None` is the relay's node), whichever
            // node asked.
            Some(NodePortAt::Relay) if local => {
                let (here, _) = placed(shared, None);
                route_node_local(shared, b, here, sticky, proto, &target)
            }
            Some(NodePortAt::Relay) => route_hinted(shared, b, None, sticky, proto, &target),
            Some(NodePortAt::Edge(node)) if local => {
                route_node_local(shared, b, Some(&node), sticky, proto, &target)
            }
            Some(NodePortAt::Edge(node)) => {
                route_hinted(shared, b, Some(&node), sticky, proto, &target)
            }
            None => route(shared, origin, target, proto),
        },
        None => route(shared, origin, target, proto),
    }
}

/// [`route_backend`] for a cluster-wide port: among the endpoints node
/// `prefer`'s kube-proxy would use by their topology hints (see
/// [`crate::topology`]; `None` is the relay's own node,
/// `kubernetes.node_name`, whose capture and CONNECTs ask without one).
/// When the tunnel reaches none of those (every one on an edge without a
/// live session) the others serve, counted (`topology_unreachable`), as
/// kube-proxy falls back when no endpoint is hinted for the zone: a site
/// whose own endpoints are cut off keeps the Service. Node-local ports
/// never get here: kube-proxy applies no hints to them.
fn route_hinted(
    shared: &Shared,
    backends: &[Backend],
    prefer: Option<&str>,
    sticky: Option<u64>,
    proto: Proto,
    service: &SocketAddr,
) -> Result<(Route, SocketAddr), StreamReply> {
    if crate::topology::hinted(backends) {
        let (node, zone) = placed(shared, prefer);
        let near = crate::topology::for_node(backends, node, zone.as_deref());
        if near.len() < backends.len() {
            if near.iter().any(|b| reachable(shared, b).is_some()) {
                return route_backend(shared, &near, prefer, sticky, proto, service);
            }
            shared.metrics.service_pick("topology_unreachable");
        }
    }
    route_backend(shared, backends, prefer, sticky, proto, service)
}

/// A ClusterIP port of an `internalTrafficPolicy: Local` Service (or a
/// node port of an `externalTrafficPolicy: Local` one): only endpoints on
/// the asking node `prefer` may serve it, as that node's kube-proxy would
/// have it (it drops the traffic when it has none).
/// Asked without a node (a CONNECT to a ClusterIP; the relay node's
/// capture leaves these ports to its own kube-proxy), it is refused; the
/// relay node's own node ports are asked with its name
/// (`kubernetes.node_name`).
fn route_node_local(
    shared: &Shared,
    backends: &[Backend],
    prefer: Option<&str>,
    sticky: Option<u64>,
    proto: Proto,
    service: &SocketAddr,
) -> Result<(Route, SocketAddr), StreamReply> {
    let own: Vec<Backend> = backends
        .iter()
        .filter(|b| prefer.is_some() && b.node.as_deref() == prefer)
        .cloned()
        .collect();
    if own.is_empty() {
        shared.metrics.service_pick("no_endpoints");
        return Err(StreamReply::fail(
            StreamStatus::Refused,
            format!(
                "service {service} is node-local (internalTrafficPolicy Local, or a node port with externalTrafficPolicy Local) and has no ready endpoint on {}",
                prefer.map_or(
                    "the asking node (none: ask from a node)".to_string(),
                    |n| format!("node {n}")
                )
            ),
        ));
    }
    route_backend(shared, &own, prefer, sticky, proto, service)
}

/// Whose node port `target` (whose port is one) is.
enum NodePortAt {
    /// An edge's own, captured on its own addresses and asked for as
    /// `0.0.0.0:nodePort` (`ServiceKey::node_port`).
    Asker,
    /// The relay node's: one of its own addresses, whoever asks (its own
    /// capture, an edge's pod or host, a CONNECT client). Resolved here as
    /// the relay node's kube-proxy would, by its topology, never dialled:
    /// the relay's own marked socket skips its capture, so that
    /// kube-proxy would DNAT it to any endpoint, an edge pod included,
    /// which the main table then sends out the default route.
    Relay,
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
        // The bind test costs a syscall, and only for a node port. The
        // relay node's capture takes loopback node ports too (`fib daddr
        // type local`), as its kube-proxy does; anyone else asking for a
        // loopback or unspecified address is left to the policy, which
        // refuses it.
        Origin::Captured if crate::policy::is_local_address(target.ip()) => {
            return Some(NodePortAt::Relay)
        }
        Origin::Captured => {}
        _ if !crate::policy::forbidden(target.ip())
            && crate::policy::is_local_address(target.ip()) =>
        {
            return Some(NodePortAt::Relay)
        }
        _ => {}
    }
    let owner = shared.registry.lookup(target.ip())?;
    (owner.primary_addr() == Some(target.ip())).then(|| NodePortAt::Edge(owner.node.clone()))
}

/// Whether `target` is a node port of the relay node's own (one of its
/// addresses, a port in the Service snapshot's node ports), which
/// [`route_any`] resolves as the relay node's kube-proxy would
/// ([`NodePortAt::Relay`]): what `CONNECT <relay-node-name>:<nodePort>`
/// must take too, rather than be dialled.
pub(crate) fn relay_node_port(shared: &Shared, target: SocketAddr) -> bool {
    let ip = target.ip();
    shared
        .services
        .snapshot()
        .node_port(target.port(), Proto::Tcp)
        .is_some()
        && !crate::policy::forbidden(ip)
        && crate::policy::is_local_address(ip)
}

/// Picks one of a Service's endpoints (those on node `prefer` first; the
/// same for one client with `sticky`, see [`crate::services::pick`]) and
/// routes to it as [`Origin::Service`]; no endpoint is a fast refusal.
/// Counted either way.
pub(crate) fn route_backend(
    shared: &Shared,
    backends: &[crate::services::Backend],
    prefer: Option<&str>,
    sticky: Option<u64>,
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
    // Who serves an endpoint (its session, else who claims it), found
    // once: `pick` hands it back with the endpoint.
    let usable = |b: &Backend| reachable(shared, b);
    let Some((b, (owner, claim))) = crate::services::pick(backends, prefer, sticky, usable) else {
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
    let routed = judge(shared, Origin::Service, target, proto, owner, &claim)?;
    shared.metrics.service_pick(match routed {
        Route::Edge(_) => "edge",
        Route::Cloud => "cloud",
    });
    Ok((routed, target))
}

/// Node `node` (`None`: the relay's own, `kubernetes.node_name`) with its
/// zone, as topology hints see them.
pub(crate) fn placed<'a>(
    shared: &'a Shared,
    node: Option<&'a str>,
) -> (Option<&'a str>, Option<Arc<str>>) {
    let node = node.or(shared
        .cfg
        .kubernetes
        .as_ref()
        .and_then(|k| k.node_name.as_deref()));
    let zone = node.and_then(|n| match shared.directory.lookup(n) {
        crate::directory::Lookup::Known(e) => e.zone.clone(),
        _ => None,
    });
    (node, zone)
}

/// Whether the relay can reach endpoint `b` now, with who serves it: its
/// live session, else (no session) who claims it, unless that is an edge.
fn reachable(shared: &Shared, b: &Backend) -> Option<(Option<Arc<SessionHandle>>, Claim)> {
    match endpoint_session(shared, b) {
        Some(s) => Some((Some(s), Claim::Nobody)),
        None => match endpoint_claim(&*shared.directory, b) {
            Claim::Edge(_) => None,
            claim => Some((None, claim)),
        },
    }
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

/// Whether a Service endpoint is the tunnel's to carry, so the relay
/// node must capture its Service rather than leave it to its own
/// kube-proxy: a live session serves it, or its node (or address) is an
/// edge's whose session is down. The latter too, since the edge's Node
/// and endpoints stay Ready while its kubelet reaches the apiserver: left
/// to kube-proxy, some connections would go to the edge pod by the
/// default route and hang; captured, the relay's pick passes over the
/// endpoint ([`route_backend`]) and another serves, or the client is
/// refused at once. Only a node positively marked an edge counts
/// ([`Directory::marked_edge`](crate::directory::Directory::marked_edge)),
/// not one merely short of cloud evidence (which a CONNECT or an edge's
/// stream treats as an edge, failing closed): captured, a cloud worker
/// the directory cannot place would be passed over and its Service
/// refused, where the relay node's kube-proxy serves it. `held`: the
/// nodes whose session here ended with their routes held offline, edges
/// by that alone.
pub(crate) fn behind_edge(shared: &Shared, b: &Backend, held: &dyn Fn(&str) -> bool) -> bool {
    endpoint_session(shared, b).is_some() || edge_marked(&*shared.directory, b, held)
}

/// Whether Service endpoint `b` is claimed by a node positively marked an
/// edge, or one in `held` (see [`endpoint_claim`] and [`behind_edge`]).
fn edge_marked(
    dir: &dyn crate::directory::Directory,
    b: &Backend,
    held: &dyn Fn(&str) -> bool,
) -> bool {
    match endpoint_claim(dir, b) {
        Claim::Edge(node) => held(&node) || dir.marked_edge(&node),
        _ => false,
    }
}

/// Who claims a Service endpoint: its node's kind when the EndpointSlice
/// names a node the directory knows (a host-network endpoint on a cloud
/// node whose address an edge Node repeats is the cloud node's), else
/// whoever claims its address.
fn endpoint_claim(dir: &dyn crate::directory::Directory, b: &Backend) -> Claim {
    if let Some(node) = b.node.as_deref() {
        if let crate::directory::Lookup::Known(e) = dir.lookup(node) {
            return if e.cloud {
                Claim::Cloud
            } else {
                Claim::Edge(node.to_string())
            };
        }
    }
    dir.claim(canonical(b.addr).ip())
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
    // Who claims the target matters only to a CONNECT or an edge's stream
    // no session serves (see `Policy::authorize`): asked only then. A
    // Service endpoint's claim comes from its EndpointSlice
    // ([`route_backend`]).
    let claim = match (origin, &owner) {
        (Origin::Connect | Origin::Edge(_), None) => shared.directory.claim(target.ip()),
        _ => Claim::Nobody,
    };
    judge(shared, origin, target, proto, owner, &claim)
}

/// [`decide`] with the target's claim given; counts a refusal.
fn judge(
    shared: &Shared,
    origin: Origin<'_>,
    target: SocketAddr,
    proto: Proto,
    owner: Option<Arc<SessionHandle>>,
    claim: &Claim,
) -> Result<Route, StreamReply> {
    let verdict = shared.policy.authorize(
        origin,
        target,
        proto,
        owner.as_deref().map(|s| s.node.as_str()),
        claim,
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

#[cfg(test)]
mod endpoint_claims {
    use std::collections::{BTreeMap, HashMap};
    use std::net::IpAddr;
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::{edge_marked, endpoint_claim};
    use crate::directory::{build_entries, ClaimIndex, Directory, Lookup, NodeEntry, NodeSource};
    use crate::policy::Claim;
    use crate::services::Backend;

    /// Nodes as the Kubernetes directory would hold them.
    struct Dir {
        entries: HashMap<String, Arc<NodeEntry>>,
        claims: ClaimIndex,
        changes: watch::Sender<u64>,
        /// The Nodes labelled an edge or carrying the relay's condition.
        marked: Vec<&'static str>,
    }

    impl Dir {
        /// The directory of `sources`, with `marked` marked edges.
        fn new(sources: &BTreeMap<String, NodeSource>, marked: &[&'static str]) -> Self {
            let entries = build_entries(sources);
            Dir {
                claims: ClaimIndex::new(&entries),
                entries,
                changes: watch::channel(0).0,
                marked: marked.to_vec(),
            }
        }
    }

    /// Endpoint `addr` on `node` as its EndpointSlice names it.
    fn ep(addr: &str, node: Option<&str>) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            node: node.map(Arc::from),
            hints: None,
        }
    }

    impl Directory for Dir {
        fn lookup(&self, node: &str) -> Lookup {
            self.entries
                .get(node)
                .map_or(Lookup::Unknown, |e| Lookup::Known(e.clone()))
        }
        fn resolve_name(&self, _: &str) -> Option<String> {
            None
        }
        fn is_synced(&self) -> bool {
            true
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
        fn ambiguous(&self) -> Vec<(relay_protocol::Cidr, Vec<String>)> {
            Vec::new()
        }
        fn source(&self) -> &'static str {
            "test"
        }
        fn claim(&self, ip: IpAddr) -> Claim {
            self.claims.claim(ip)
        }
        fn marked_edge(&self, node: &str) -> bool {
            self.marked.contains(&node)
        }
    }

    /// A Service endpoint's claim comes from the node its EndpointSlice
    /// names: a host-network endpoint on a cloud node is the cloud's even
    /// where an edge Node repeats the address (by address alone the edge
    /// wins); without a known node, the address decides.
    #[test]
    fn an_endpoint_is_claimed_by_its_node_first() {
        let shared: IpAddr = "192.168.1.10".parse().unwrap();
        let sources = BTreeMap::from([
            (
                "cloud3".to_string(),
                NodeSource {
                    addresses: vec![shared],
                    cloud: true,
                    ..NodeSource::default()
                },
            ),
            (
                "shop1".to_string(),
                NodeSource {
                    prefixes: vec!["10.244.7.0/24".parse().unwrap()],
                    addresses: vec![shared],
                    ..NodeSource::default()
                },
            ),
        ]);
        let dir = Dir::new(&sources, &["shop1"]);
        let shop = Claim::Edge("shop1".into());
        for (b, want) in [
            (ep("192.168.1.10:80", Some("cloud3")), Claim::Cloud),
            (ep("192.168.1.10:80", Some("shop1")), shop.clone()),
            (ep("192.168.1.10:80", None), shop.clone()),
            (ep("192.168.1.10:80", Some("gone")), shop.clone()),
            (ep("10.244.7.5:80", None), shop.clone()),
            (ep("10.0.0.9:80", None), Claim::Nobody),
        ] {
            // The relay node captures a Service for a marked edge's
            // endpoint, session or not (`behind_edge`): never for a cloud
            // one or one nobody claims, which its kube-proxy reaches.
            let edge = matches!(want, Claim::Edge(_));
            assert_eq!(edge_marked(&dir, &b, &|_| false), edge, "{b:?}");
            assert_eq!(endpoint_claim(&dir, &b), want, "{b:?}");
        }
    }

    /// A Node with no cloud evidence counts as an edge for a CONNECT or an
    /// edge's stream (fail closed), but the relay node captures a Service
    /// for its endpoint (no session) only when it is positively marked an
    /// edge: a cloud worker the directory cannot place is left to the
    /// relay node's kube-proxy, not captured and then refused.
    #[test]
    fn only_a_marked_edge_without_a_session_is_captured() {
        let node = |pods: &str, addr: &str| NodeSource {
            prefixes: vec![pods.parse().unwrap()],
            addresses: vec![addr.parse().unwrap()],
            ..NodeSource::default()
        };
        let sources = BTreeMap::from([
            ("shop1".to_string(), node("10.244.7.0/24", "192.168.1.10")),
            ("worker9".to_string(), node("10.250.0.0/24", "172.16.0.9")),
        ]);
        let dir = Dir::new(&sources, &["shop1"]);
        for (b, claimed, captured) in [
            (ep("10.250.0.5:80", Some("worker9")), "worker9", false),
            (ep("10.250.0.5:80", None), "worker9", false),
            (ep("172.16.0.9:80", None), "worker9", false),
            (ep("10.244.7.5:80", Some("shop1")), "shop1", true),
            (ep("10.244.7.5:80", None), "shop1", true),
        ] {
            // CONNECT and authorisation: still an edge's (fail closed).
            assert_eq!(endpoint_claim(&dir, &b), Claim::Edge(claimed.into()));
            assert_eq!(edge_marked(&dir, &b, &|_| false), captured, "{b:?}");
            // A node whose session here ended (its routes held) is an
            // edge by that alone.
            assert!(edge_marked(&dir, &b, &|n| n == claimed), "{b:?}");
        }
    }
}
