//! Services with edge endpoints: which ClusterIP ports the relay node
//! captures, how the relay picks an endpoint for a ClusterIP, and what
//! each edge is told (its `Control::ServiceDelta` feed, in
//! [`crate::service_feed`]).
//!
//! Why the relay picks endpoints itself: kube-proxy DNATs a ClusterIP to
//! one endpoint in the same NAT hook where capture would redirect it, and
//! a connection gets one NAT binding per hook. So capture runs first (on
//! the relay node, for ClusterIP ports with an endpoint on an edge, its
//! session live or not; on each edge, for ports with an endpoint off that
//! edge), the original destination stays the ClusterIP:port, and the relay resolves
//! it from the Service table: kube-proxy's own choice made one hop later,
//! where the edge endpoints are reachable. The relay never dials a
//! ClusterIP for a client: its own sockets bypass capture, and the relay
//! node's kube-proxy would DNAT them to an edge pod address the relay's
//! main table cannot route.
//!
//! Endpoint choice: among the usable endpoints (ready, else serving and
//! terminating, as kube-proxy) that the asking node would use by their
//! topology hints ([`crate::topology`]), those on the asking edge's own
//! node first (same site: a Service whose endpoints are on the asking
//! edge never crosses to another site), otherwise all of them, in round
//! robin; with `sessionAffinity: ClientIP`, one per client ([`pick`]);
//! for a node-local port (`internalTrafficPolicy: Local`, or a node port with
//! `externalTrafficPolicy: Local`), only the asking node's own (see
//! docs/architecture.md, "Services with edge endpoints").

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use relay_protocol::{Cidr, ServiceKey};
use relay_transport::capture::{Proto as CaptureProto, RangedSet, ServiceSet};
use tokio::sync::watch;

use crate::policy::Proto;

/// One usable endpoint of a ClusterIP port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `IP:targetPort`.
    pub addr: SocketAddr,
    /// The endpoint's `nodeName`, when the EndpointSlice says.
    pub node: Option<Arc<str>>,
    /// Its topology hints, when it is ready and has any (see
    /// [`crate::topology`]).
    pub hints: Option<Arc<crate::topology::Hints>>,
}

/// Every ClusterIP port (TCP and UDP) with its usable endpoints, as one
/// immutable snapshot: lookups never wait for the watch that rebuilds it.
#[derive(Debug, Clone, Default)]
pub struct ServiceSnapshot {
    /// ClusterIP port → usable endpoints (possibly none: the Service
    /// exists and is refused fast).
    pub ports: BTreeMap<ServiceKey, Arc<[Backend]>>,
    /// `(nodePort, udp)` → usable IPv4 endpoints: what the relay node's own
    /// addresses take on a node port.
    pub node_ports: BTreeMap<(u16, bool), Arc<[Backend]>>,
    /// UDP ClusterIP, external and node ports (the last as
    /// [`ServiceKey::node_port`]) → the addresses of all their serving
    /// endpoints, sorted, usable or not: a UDP flow keeps its endpoint
    /// while it is listed here, as kube-proxy's conntrack cleanup keeps
    /// flows to a terminating pod still serving (see
    /// `tunnel_udp::endpoint_gone`). Empty in static mode, where `ports`
    /// alone decides.
    pub udp_serving: BTreeMap<ServiceKey, Arc<[IpAddr]>>,
    /// The entries of `ports` that are a Service's external or
    /// load-balancer IPs, not ClusterIPs: open to any client, as a node
    /// port is (captured ahead of the source check).
    pub external: BTreeSet<ServiceKey>,
    /// The ClusterIP ports of `internalTrafficPolicy: Local` Services and
    /// the node ports (as [`ServiceKey::node_port`]) of
    /// `externalTrafficPolicy: Local` ones: each node's own endpoints serve
    /// them, so no node captures them (its kube-proxy serves or drops
    /// them; an edge without kube-proxy dials its own) and the relay
    /// resolves them only to the asking node's endpoints.
    pub node_local: BTreeSet<ServiceKey>,
    /// The ports (ClusterIP, external and node ports, the last as
    /// [`ServiceKey::node_port`]) of `sessionAffinity: ClientIP` Services:
    /// a client's connections keep to one endpoint (see [`pick`]).
    pub sticky: BTreeSet<ServiceKey>,
    /// The load-balancer IP ports of Services with
    /// `loadBalancerSourceRanges` (of the address's family): only clients
    /// inside these prefixes may reach them, as kube-proxy's firewall has
    /// it (see [`relay_capture_set`] and [`Self::source_allowed`]).
    pub source_ranges: BTreeMap<ServiceKey, Arc<[Cidr]>>,
    /// Every Service's DNS names, for edges' resolvers (empty in static
    /// mode). Shared: each session keeps a pointer to the one it sent.
    pub names: Arc<relay_protocol::NameTable>,
    /// The cluster's DNS domain the names live in.
    pub cluster_domain: Arc<str>,
    /// Which ports this snapshot and the ones before it changed (see
    /// [`crate::service_feed::Changes`]).
    pub changes: Arc<crate::service_feed::Changes>,
}

impl ServiceSnapshot {
    /// The endpoints of `vip` over `proto`, if it is a ClusterIP port.
    pub fn backends(&self, vip: SocketAddr, proto: Proto) -> Option<&Arc<[Backend]>> {
        self.ports.get(&ServiceKey {
            vip,
            udp: proto == Proto::Udp,
        })
    }
}

impl ServiceSnapshot {
    /// Whether `client` may reach `key`: always, unless the port is a
    /// load-balancer IP's with source ranges and `client` is outside them.
    /// Without a client address (the relay's captured UDP, which its
    /// capture already took only from those ranges; a CONNECT from a
    /// process on the relay's node, over the unix socket or loopback) it is
    /// not checked here.
    pub fn source_allowed(&self, key: &ServiceKey, client: Option<IpAddr>) -> bool {
        match (self.source_ranges.get(key), client) {
            (Some(r), Some(c)) => r.iter().any(|x| x.contains(&c)),
            _ => true,
        }
    }

    /// The endpoints behind node port `port` over `proto`, if it is one.
    pub fn node_port(&self, port: u16, proto: Proto) -> Option<&Arc<[Backend]>> {
        self.node_ports.get(&(port, proto == Proto::Udp))
    }
}

/// Whether `name` has the form of a Service's cluster DNS name,
/// `svc.ns.svc` or `svc.ns.svc.<cluster domain>` (`domain`; a trailing
/// dot allowed): what kube-apiserver dials webhooks and aggregated APIs
/// by. Such a name is a Service's before any node's, and never an edge's
/// (an edge's kubelet writes its own Node's names).
pub fn is_service_name(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.');
    let mut labels = name.splitn(4, '.');
    let (Some(_), Some(_), Some(svc)) = (labels.next(), labels.next(), labels.next()) else {
        return false;
    };
    svc.eq_ignore_ascii_case("svc")
        && labels.next().is_none_or(|rest| {
            !domain.is_empty() && rest.eq_ignore_ascii_case(domain.trim_end_matches('.'))
        })
}

/// What a Service name resolves to for `CONNECT name:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameLookup {
    /// The name is not a Service (maybe a node name).
    NotAService,
    /// A Service, but it cannot take this connection (no such TCP port, an
    /// ExternalName Service); the message says which.
    Refused(String),
    /// The usable endpoints of the Service's TCP port.
    Backends(Vec<Backend>),
}

/// Where the relay's Service table comes from: the cluster's Services and
/// EndpointSlices in Kubernetes mode, nothing in static mode.
pub trait ServiceSource: Send + Sync {
    /// The current snapshot.
    fn snapshot(&self) -> Arc<ServiceSnapshot>;
    /// Changes whenever the snapshot is replaced.
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSnapshot>>;
    /// `svc.ns.svc.<domain>`, `svc.ns.svc` or `svc.ns`, port `port`.
    fn by_name(&self, host: &str, port: u16) -> NameLookup;
    /// Whether the first lists have been loaded (readiness).
    fn is_synced(&self) -> bool;
    /// Why loading fails, if it does (the last watch error), for `/readyz`.
    fn last_error(&self) -> Option<String> {
        None
    }
    /// Watch errors since start (each retried with backoff), for
    /// `/metrics`.
    fn watch_errors(&self) -> u64 {
        0
    }
    /// When the cache the table comes from was written, while it comes
    /// from one rather than from the source itself.
    fn cached_since(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// Static mode: no Services (ClusterIPs are not resolved by the relay).
pub struct NoServices(watch::Sender<Arc<ServiceSnapshot>>);

impl Default for NoServices {
    fn default() -> Self {
        NoServices(watch::channel(Arc::default()).0)
    }
}

impl ServiceSource for NoServices {
    fn snapshot(&self) -> Arc<ServiceSnapshot> {
        self.0.borrow().clone()
    }
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSnapshot>> {
        self.0.subscribe()
    }
    fn by_name(&self, _host: &str, _port: u16) -> NameLookup {
        NameLookup::NotAService
    }
    fn is_synced(&self) -> bool {
        true
    }
}

/// Picks an endpoint `usable` accepts (the relay can reach it now), with
/// what `usable` found out about it (so the caller does not ask again):
/// those on node `prefer` when there are any, else all of them, one drawn
/// at random for each connection or flow, as kube-proxy does (iptables'
/// `statistic mode random`, nftables' `numgen random`). Not a counter: one
/// counter shared by every Service made each Service's turn follow the
/// client's pattern of calls (a pod resolving a name, then connecting,
/// took every other turn, and always the same endpoint of two), and one
/// counter per Service would be state to keep per port. `None` when none
/// is usable. While the endpoint drawn is usable, that is the one ask;
/// otherwise the usable ones are listed and one of them is drawn, so the
/// endpoint after an unusable one gets no more than its share. With `sticky` (the client's key from
/// [`sticky_turn`], for `sessionAffinity: ClientIP`) the usable endpoint
/// scoring highest for that client is taken instead (rendezvous hashing):
/// the same client gets the same endpoint while it stays usable, and an
/// endpoint added takes over only its share of the clients (kube-proxy
/// keeps a timed table of recent clients instead; this needs no state).
pub fn pick<'a, T>(
    backends: &'a [Backend],
    prefer: Option<&str>,
    sticky: Option<u64>,
    usable: impl Fn(&Backend) -> Option<T>,
) -> Option<(&'a Backend, T)> {
    if let Some(client) = sticky {
        // The usable endpoint scoring highest, in one pass that asks
        // `usable` only of an endpoint scoring above the best so far
        // (about ln n asks, not n: a Service may have thousands).
        let best = |of: &mut dyn Iterator<Item = &'a Backend>| {
            let mut top: Option<(u64, &'a Backend, T)> = None;
            for b in of {
                let score = affinity_score(client, b.addr);
                if top.as_ref().is_some_and(|(s, _, _)| *s >= score) {
                    continue;
                }
                if let Some(t) = usable(b) {
                    top = Some((score, b, t));
                }
            }
            top.map(|(_, b, t)| (b, t))
        };
        if let Some(n) = prefer {
            let mut local = backends.iter().filter(|b| b.node.as_deref() == Some(n));
            if let Some(picked) = best(&mut local) {
                return Some(picked);
            }
        }
        return best(&mut backends.iter());
    }
    let i = rand::random::<u32>() as usize;
    let one_of = |mut ok: Vec<(&'a Backend, T)>| {
        let n = ok.len();
        (n > 0).then(|| ok.swap_remove(i % n))
    };
    let with = |b: &'a Backend| usable(b).map(|t| (b, t));
    if let Some(n) = prefer {
        let local = backends
            .iter()
            .filter(|b| b.node.as_deref() == Some(n))
            .filter_map(with)
            .collect();
        if let Some(picked) = one_of(local) {
            return Some(picked);
        }
    }
    let first = backends.get(i % backends.len().max(1))?;
    if let Some(picked) = with(first) {
        return Some(picked);
    }
    one_of(backends.iter().filter_map(with).collect())
}

/// The key [`pick`] scores endpoints with for `client` of a
/// `sessionAffinity: ClientIP` Service: FNV-1a of its address, a hash
/// fixed by its definition, so every relay replica and every build picks
/// alike.
pub fn sticky_turn(client: std::net::IpAddr) -> u64 {
    fnv1a(FNV_OFFSET, SocketAddr::new(client, 0))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Endpoint `ep`'s score for the client whose key is `client`: FNV-1a
/// carried on over the endpoint's address, then mixed (splitmix64's
/// finaliser): FNV-1a alone leaves the last bytes, the same port for every
/// endpoint, to decide, and some endpoints then won 2 to 3 times their
/// share of clients.
fn affinity_score(client: u64, ep: SocketAddr) -> u64 {
    let mut z = fnv1a(client, ep);
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a (64-bit), starting from `seed`, of an address's octets (IPv4
/// in its own 4-byte form) and port.
fn fnv1a(seed: u64, a: SocketAddr) -> u64 {
    let step = |h: u64, b: &u8| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    let h = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().iter().fold(seed, step),
        std::net::IpAddr::V6(ip) => ip.octets().iter().fold(seed, step),
    };
    a.port().to_be_bytes().iter().fold(h, step)
}

/// What the relay node captures of Services' addresses (see
/// [`relay_capture_set`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RelayCapture {
    /// ClusterIP ports (and external IPs of `externalTrafficPolicy:
    /// Local` Services), taken from the capture sources only.
    pub cluster: ServiceSet,
    /// External and load-balancer IP ports taken from any source.
    pub open: ServiceSet,
    /// Load-balancer IP ports taken only from the prefixes listed with
    /// each: its `loadBalancerSourceRanges` (within the capture sources
    /// for an `externalTrafficPolicy: Local` Service). Clients elsewhere
    /// are left to kube-proxy, whose firewall drops them.
    pub ranged: RangedSet,
}

/// The ClusterIP ports the relay node captures: those with an endpoint
/// that `served` says is behind an edge (kube-proxy on the relay node
/// could not reach it; the relay's caller counts an edge whose session
/// is down too, see `route::behind_edge`), among those the relay node
/// (`here`: its name and zone) would use by their topology hints (see
/// [`crate::topology`]). Ports whose endpoints are all in the cloud, or
/// whose hints keep the relay node's clients on cloud endpoints, stay with
/// kube-proxy. `sources` are the capture sources (the cloud's ranges)
/// that [`RelayCapture::cluster`] is taken from.
pub fn relay_capture_set(
    snap: &ServiceSnapshot,
    served: impl Fn(&Backend) -> bool,
    sources: &BTreeSet<Cidr>,
    here: (Option<&str>, Option<&str>),
) -> RelayCapture {
    let mut out = RelayCapture::default();
    for (k, b) in &snap.ports {
        let near = crate::topology::for_node(b, here.0, here.1);
        if !near.iter().any(&served) || snap.node_local.contains(k) {
            continue;
        }
        let at = (k.vip, capture_proto(k.udp));
        let open = snap.external.contains(k);
        match snap.source_ranges.get(k) {
            Some(ranges) => {
                let from: BTreeSet<Cidr> = if open {
                    ranges.iter().copied().collect()
                } else {
                    intersection(ranges, sources)
                };
                if !from.is_empty() {
                    out.ranged.insert(at, from);
                }
            }
            None if open => {
                out.open.insert(at);
            }
            None => {
                out.cluster.insert(at);
            }
        }
    }
    out
}

/// The prefixes inside both `a` and `b` (of two prefixes that overlap,
/// one holds the other: the smaller is what they share).
fn intersection(a: &[Cidr], b: &BTreeSet<Cidr>) -> BTreeSet<Cidr> {
    a.iter()
        .flat_map(|x| {
            b.iter()
                .filter(|y| x.overlaps(y))
                .map(|y| if x.contains_cidr(y) { *y } else { *x })
        })
        .collect()
}

/// The node ports the relay node captures: those with an endpoint behind
/// an edge (`served`) among those the relay node (`here`) would use by
/// their topology hints (both as for [`relay_capture_set`]).
pub fn relay_node_port_set(
    snap: &ServiceSnapshot,
    served: impl Fn(&Backend) -> bool,
    here: (Option<&str>, Option<&str>),
) -> BTreeSet<(u16, CaptureProto)> {
    snap.node_ports
        .iter()
        .filter(|((port, udp), _)| {
            !snap
                .node_local
                .contains(&ServiceKey::node_port(*port, *udp))
        })
        .filter(|(_, b)| {
            crate::topology::for_node(b, here.0, here.1)
                .iter()
                .any(&served)
        })
        .map(|((port, udp), _)| (*port, capture_proto(*udp)))
        .collect()
}

fn capture_proto(udp: bool) -> CaptureProto {
    if udp {
        CaptureProto::Udp
    } else {
        CaptureProto::Tcp
    }
}

/// The relay node's capture set and each ClusterIP's keys, for logs.
pub fn describe(set: &BTreeSet<(SocketAddr, CaptureProto)>) -> Vec<String> {
    set.iter()
        .map(|(a, p)| format!("{a}/{}", p.as_str()))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An endpoint on `node`.
    pub(crate) fn b(addr: &str, node: &str) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            node: Some(Arc::from(node)),
            hints: None,
        }
    }

    /// A ClusterIP port.
    pub(crate) fn key(vip: &str, udp: bool) -> ServiceKey {
        ServiceKey {
            vip: vip.parse().unwrap(),
            udp,
        }
    }

    /// A load balancer's port with source ranges is captured from those
    /// ranges only (open: from anywhere inside them; of an
    /// `externalTrafficPolicy: Local` Service: only where they meet the
    /// capture sources), never from any source; and a client outside them
    /// is refused where the relay knows it.
    #[test]
    fn load_balancer_ports_are_captured_only_from_their_source_ranges() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let (open_lb, local_lb, plain) = (
            key("198.51.100.9:443", false),
            key("198.51.100.10:443", false),
            key("203.0.113.7:80", false),
        );
        let mut s = snap(&[
            (open_lb, vec![b("10.244.7.5:443", "edge1")]),
            (local_lb, vec![b("10.244.7.6:443", "edge1")]),
            (plain, vec![b("10.244.7.7:80", "edge1")]),
        ]);
        s.external.extend([open_lb, plain]);
        s.source_ranges.insert(
            open_lb,
            Arc::from([cidr("192.0.2.0/24"), cidr("10.0.0.0/8")]),
        );
        s.source_ranges.insert(
            local_lb,
            Arc::from([cidr("10.0.0.0/8"), cidr("192.0.2.0/24")]),
        );
        let sources: BTreeSet<Cidr> = [cidr("10.244.0.0/16"), cidr("172.16.0.0/12")].into();
        let set = relay_capture_set(&s, |_| true, &sources, (None, None));
        assert_eq!(set.open, [(plain.vip, CaptureProto::Tcp)].into());
        assert!(set.cluster.is_empty(), "{:?}", set.cluster);
        assert_eq!(
            set.ranged,
            [
                (
                    (open_lb.vip, CaptureProto::Tcp),
                    [cidr("10.0.0.0/8"), cidr("192.0.2.0/24")].into()
                ),
                (
                    (local_lb.vip, CaptureProto::Tcp),
                    [cidr("10.244.0.0/16")].into()
                ),
            ]
            .into()
        );
        let ip = |a: &str| Some(a.parse::<IpAddr>().unwrap());
        assert!(s.source_allowed(&open_lb, ip("192.0.2.77")));
        assert!(!s.source_allowed(&open_lb, ip("198.18.0.11")));
        assert!(s.source_allowed(&plain, ip("198.18.0.11")));
        assert!(
            s.source_allowed(&open_lb, None),
            "not known: the capture checked"
        );
    }

    /// A snapshot of these ports and nothing else.
    pub(crate) fn snap(entries: &[(ServiceKey, Vec<Backend>)]) -> ServiceSnapshot {
        ServiceSnapshot {
            ports: entries
                .iter()
                .map(|(k, v)| (*k, Arc::from(v.clone())))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn pick_prefers_the_asking_node_then_spreads() {
        let all = [
            b("10.244.7.5:80", "edge1"),
            b("10.244.8.5:80", "edge2"),
            b("10.244.1.2:80", "cloud1"),
        ];
        let any = |_: &Backend| Some(());
        for _ in 0..10 {
            assert_eq!(
                pick(&all, Some("edge2"), None, any).unwrap().0.addr,
                all[1].addr
            );
        }
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            seen.insert(pick(&all, Some("edge9"), None, any).unwrap().0.addr);
            seen.insert(pick(&all, None, None, any).unwrap().0.addr);
        }
        assert_eq!(seen.len(), 3, "every endpoint is reached");
        assert!(pick(&[], Some("edge1"), None, any).is_none());
    }

    /// Two Services picked in turn (a pod resolving a name through a
    /// captured kube-dns, then connecting to the Service): each reaches
    /// both of its endpoints. With one counter shared by every Service,
    /// each took every other turn and always the same endpoint.
    #[test]
    fn services_picked_in_turn_each_reach_every_endpoint() {
        let dns = [b("10.244.1.10:53", "cloud1"), b("10.244.2.10:53", "cloud2")];
        let web = [b("10.244.7.5:80", "edge1"), b("10.244.1.2:80", "cloud1")];
        let any = |_: &Backend| Some(());
        let (mut dns_seen, mut web_seen) = (BTreeSet::new(), BTreeSet::new());
        for _ in 0..40 {
            dns_seen.insert(pick(&dns, None, None, any).unwrap().0.addr);
            web_seen.insert(pick(&web, None, None, any).unwrap().0.addr);
        }
        assert_eq!(dns_seen.len(), 2, "{dns_seen:?}");
        assert_eq!(web_seen.len(), 2, "{web_seen:?}");
    }

    /// Endpoints the relay cannot reach now (on an edge with no session)
    /// are passed over, the asking node's own included; when none is
    /// usable there is no pick.
    #[test]
    fn pick_passes_over_unusable_endpoints() {
        let all = [
            b("10.244.7.5:80", "edge1"),
            b("10.244.8.5:80", "edge2"),
            b("10.244.1.2:80", "cloud1"),
        ];
        let not_edge1 = |b: &Backend| (b.node.as_deref() != Some("edge1")).then_some(());
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            seen.insert(pick(&all, None, None, not_edge1).unwrap().0.addr);
            seen.insert(pick(&all, Some("edge1"), None, not_edge1).unwrap().0.addr);
        }
        assert_eq!(
            seen,
            BTreeSet::from([all[1].addr, all[2].addr]),
            "every usable endpoint is reached, the unusable one never"
        );
        assert!(pick(&all, None, None, |_| None::<()>).is_none());
        // An even share for each usable endpoint, not a double one for
        // the endpoint after the unusable one.
        let four = [
            b("10.244.7.5:80", "edge1"),
            b("10.244.7.6:80", "edge1"),
            b("10.244.1.2:80", "cloud1"),
            b("10.244.1.3:80", "cloud1"),
        ];
        let mut counts = BTreeMap::new();
        for _ in 0..400 {
            *counts
                .entry(pick(&four, None, None, not_edge1).unwrap().0.addr)
                .or_insert(0) += 1;
        }
        let (lo, hi) = (counts.values().min(), counts.values().max());
        assert!(
            counts.len() == 2 && hi.unwrap() - lo.unwrap() <= 100,
            "uneven: {counts:?}"
        );
    }

    /// `sessionAffinity: ClientIP`: one client, one endpoint, whatever
    /// the random picks do meanwhile; clients spread over the endpoints;
    /// an unusable endpoint moves only its own clients.
    #[test]
    fn a_sticky_client_keeps_its_endpoint() {
        let all = [
            b("10.244.7.5:80", "edge1"),
            b("10.244.8.5:80", "edge2"),
            b("10.244.7.6:80", "edge1"),
        ];
        let any = |_: &Backend| Some(());
        let turn = |last: u8| sticky_turn(std::net::IpAddr::from([10, 244, 1, last]));
        let mut spread = BTreeSet::new();
        for last in 1..=40 {
            let first = pick(&all, None, Some(turn(last)), any).unwrap().0.addr;
            for _ in 0..5 {
                // Random picks in between do not move it.
                let _ = pick(&all, None, None, any);
                assert_eq!(
                    pick(&all, None, Some(turn(last)), any).unwrap().0.addr,
                    first
                );
            }
            spread.insert(first);
        }
        assert_eq!(spread.len(), 3, "40 clients over 3 endpoints: {spread:?}");
        // Fixed by definition (FNV-1a), not by the toolchain's hasher.
        assert_eq!(
            turn(7),
            0xbf83_1a0e_ea7a_abf3,
            "FNV-1a of 10.244.1.7, port 0"
        );
        // An endpoint added takes over about its share of clients (a
        // quarter here), not most of them.
        let four = [
            all[0].clone(),
            all[1].clone(),
            all[2].clone(),
            b("10.244.8.6:80", "edge2"),
        ];
        let moved = (0..200u8)
            .filter(|&c| {
                pick(&all, None, Some(turn(c)), any).unwrap().0.addr
                    != pick(&four, None, Some(turn(c)), any).unwrap().0.addr
            })
            .count();
        assert!((20..=80).contains(&moved), "{moved} of 200 clients moved");
        // Clients spread evenly: 2,000 pods over 10 endpoints with
        // consecutive addresses (one port), each within 30 % of its share.
        let ten: Vec<Backend> = (1..=10)
            .map(|i| b(&format!("10.244.7.{i}:8080"), "edge1"))
            .collect();
        let mut counts = BTreeMap::new();
        for c in 0..2000u32 {
            let client = std::net::IpAddr::from([10, 244, (c / 250) as u8, (c % 250) as u8 + 1]);
            let e = pick(&ten, None, Some(sticky_turn(client)), any)
                .unwrap()
                .0
                .addr;
            *counts.entry(e).or_insert(0u32) += 1;
        }
        assert!(
            counts.len() == 10 && counts.values().all(|&n| (140..=260).contains(&n)),
            "{counts:?}"
        );
        // Without edge2's endpoint, a client of another keeps its own.
        let not_edge2 = |b: &Backend| (b.node.as_deref() != Some("edge2")).then_some(());
        for last in 1..=40 {
            let was = pick(&all, None, Some(turn(last)), any).unwrap().0.addr;
            let now = pick(&all, None, Some(turn(last)), not_edge2)
                .unwrap()
                .0
                .addr;
            assert_ne!(now, all[1].addr);
            if was != all[1].addr {
                assert_eq!(now, was, "client {last} moved");
            }
        }
    }

    #[test]
    fn relay_captures_ports_with_served_endpoints_only() {
        let s = snap(&[
            (
                key("10.96.0.20:80", false),
                vec![b("10.244.7.5:80", "edge1")],
            ),
            (
                key("10.96.0.10:80", false),
                vec![b("10.244.1.2:80", "cloud1")],
            ),
            (
                key("10.96.0.30:53", true),
                vec![b("10.244.1.2:53", "cloud1"), b("10.244.8.5:53", "edge2")],
            ),
            (key("10.96.0.40:80", false), vec![]),
            // The first Service's external IP.
            (
                key("203.0.113.9:80", false),
                vec![b("10.244.7.5:80", "edge1")],
            ),
        ]);
        let mut s = s;
        s.external.insert(key("203.0.113.9:80", false));
        let served = |b: &Backend| b.node.as_deref().is_some_and(|n| n.starts_with("edge"));
        let RelayCapture {
            cluster: set, open, ..
        } = relay_capture_set(&s, served, &BTreeSet::new(), (None, None));
        assert_eq!(
            describe(&set),
            ["10.96.0.20:80/tcp", "10.96.0.30:53/udp"],
            "cloud-only and endpoint-less ports stay with kube-proxy"
        );
        assert_eq!(describe(&open), ["203.0.113.9:80/tcp"], "external, apart");
    }
}
