//! Which of the pod prefixes a CNI's IPAM gives an edge node the relay
//! takes as the edge's.
//!
//! A Node's `spec.podCIDRs` are written by kube-controller-manager where
//! it allocates them; where it does not (Calico's and Cilium's own IPAM),
//! they are empty, and the API lets anyone who may update the Node set
//! them once, to anything: an edge's kubelet may update its own Node, and
//! the NodeRestriction admission plugin does not guard the field. So an
//! edge Node's pod CIDRs are always checked on their own (no wider than a
//! /16 or /48, clear of the special ranges and `tunnel_routes`, inside
//! `kubernetes.edge_address_ranges`: nothing kube-controller-manager
//! gives), and where most edge Nodes have none (the allocator is not
//! running) also against the others: taken only when no wider than a
//! /16 (/48), clear of the special ranges, `tunnel_routes`, cloud Nodes'
//! ranges and other Nodes' IPAM prefixes and addresses, and inside
//! `kubernetes.edge_address_ranges`. A compromised edge that wrote a
//! victim's Calico block, or `0.0.0.0/0`, as its pod CIDR took the
//! victim's (and every site's) traffic: the vetting below refused the
//! victim's block for overlapping it. The prefixes from Calico's BlockAffinities and
//! Cilium's CiliumNodes ([`relay_kube::IpamDirectory`]) are written by the
//! CNI's agents, which run on every node with the right to write any
//! node's objects: on an edge they are the edge's word, as its Node
//! addresses are ([`super::node_addresses`]). Taken, a prefix becomes a
//! route (captured on the relay node, pointed at the relay by route agents,
//! reached by CONNECT), so a compromised edge writing a block over a cloud
//! range, another node's pods or a public range would receive their
//! traffic. So an edge's IPAM prefix is taken only when it overlaps no
//! range a node cannot have (loopback, link-local, multicast, reserved;
//! unless such a range is listed in `kubernetes.edge_address_ranges`, as
//! the one-host labs do), no `tunnel_routes` range, no cloud Node's
//! address, no other Node's pod CIDR and no other Node's IPAM prefix (two
//! nodes' overlapping blocks are both refused: neither is sure), and lies
//! inside `kubernetes.edge_address_ranges` (the private and shared IPv4
//! ranges by default, where IP pools are; an IPv6 prefix, while no IPv6
//! range is listed, inside the unique local `fc00::/7`). Cloud Nodes' IPAM
//! prefixes are kept as they are: they are never routed to an edge.

use std::collections::BTreeMap;
use std::net::IpAddr;

use relay_kube::NodeClaims;
use relay_protocol::Cidr;

/// An IPAM prefix of a Node not taken, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Refused {
    pub(crate) node: String,
    pub(crate) prefix: Cidr,
    pub(crate) why: String,
}

/// What a range in the index is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    PodCidr,
    Ipam,
    Address,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::PodCidr => "pod CIDR",
            What::Ipam => "IPAM prefix",
            What::Address => "address",
        }
    }
}

/// Ranges no node's pods can have.
const SPECIAL: [&str; 9] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/3",
    "::/127",
    "::ffff:0:0/96",
    "fe80::/10",
    "ff00::/8",
    "64:ff9b::/96",
];

/// Every Node's ranges (pod CIDRs, IPAM prefixes, cloud Nodes' addresses),
/// sorted by address, so those overlapping a prefix are found by one
/// binary search (those inside it) and one probe per length (those
/// containing it).
struct Index<'a> {
    sorted: Vec<(Cidr, &'a str, What)>,
    lens: Vec<u8>,
}

impl<'a> Index<'a> {
    fn new(entries: Vec<(Cidr, &'a str, What)>) -> Self {
        let mut sorted = entries;
        sorted.sort_unstable_by_key(|a| a.0);
        let mut lens: Vec<u8> = sorted.iter().map(|(c, _, _)| c.prefix_len()).collect();
        lens.sort_unstable();
        lens.dedup();
        Index { sorted, lens }
    }

    /// Entries overlapping `p`.
    fn overlapping(&self, p: Cidr) -> impl Iterator<Item = &(Cidr, &'a str, What)> + '_ {
        // Those containing p (network address at or before p's): one
        // lookup per shorter-or-equal length.
        let containing = self
            .lens
            .iter()
            .filter(move |l| **l <= p.prefix_len())
            .filter_map(move |l| Cidr::containing(p.addr(), *l))
            .flat_map(|c| {
                let start = self.sorted.partition_point(|(q, _, _)| *q < c);
                self.sorted[start..]
                    .iter()
                    .take_while(move |(q, _, _)| *q == c)
            });
        // Those inside p: network addresses within p.
        let start = self.sorted.partition_point(|(q, _, _)| q.addr() < p.addr());
        let inside = self.sorted[start..]
            .iter()
            .take_while(move |(q, _, _)| p.contains(&q.addr()));
        containing.chain(inside)
    }
}

/// `claims` with each edge Node's `ipam_cidrs` cut to those taken, and the
/// ones refused. `cloud` says whether a Node is in the cloud (judged on
/// the claims as they came); `cloud_ranges` are `tunnel_routes`;
/// `edge_ranges` is `kubernetes.edge_address_ranges` (see
/// [`super::node_addresses::family_ranges`]).
pub(crate) fn vet(
    claims: &BTreeMap<String, NodeClaims>,
    cloud: impl Fn(&NodeClaims) -> bool,
    cloud_ranges: &[Cidr],
    edge_ranges: &[Cidr],
) -> (BTreeMap<String, NodeClaims>, Vec<Refused>) {
    let is_cloud: BTreeMap<&str, bool> =
        claims.iter().map(|(n, c)| (n.as_str(), cloud(c))).collect();
    let special: Vec<Cidr> = SPECIAL.iter().filter_map(|s| s.parse().ok()).collect();
    let mut out = claims.clone();
    let mut refused = Vec::new();
    // First what an edge's range is on its own (too wide, special, the
    // cloud's, public): such a range is refused and, being no node's,
    // counts against no other node's below (a forged `0.0.0.0/0` must not
    // cost every other node its ranges).
    // Pod CIDRs are kube-controller-manager's where it allocates them: to
    // every node, so most Nodes have one, and they cannot change once set.
    // Where most Nodes have none (the CNI's IPAM allocates), the few that
    // do were set by whoever may update that Node, and are vetted as IPAM
    // prefixes are. (A compromised edge cannot make most Nodes have one.)
    // Counted over the edges: a cloud allocator that gives cloud Nodes
    // their ranges and skips the others must not make an edge's forgery
    // look like the allocator's.
    let edges = claims.keys().filter(|n| !is_cloud[n.as_str()]);
    let (mut edge_count, mut with_pods) = (0usize, 0usize);
    for n in edges {
        edge_count += 1;
        with_pods += usize::from(!claims[n].pod_cidrs.is_empty());
    }
    let pods_vetted = with_pods * 2 <= edge_count;
    let mut plausible: BTreeMap<&str, (Vec<Cidr>, Vec<Cidr>)> = BTreeMap::new();
    for (name, c) in claims {
        if is_cloud[name.as_str()] {
            continue;
        }
        let mut alone = |ranges: &[Cidr], v6_default: bool| -> Vec<Cidr> {
            let mut ok = Vec::new();
            for p in ranges {
                match own_refusal(p, &special, cloud_ranges, edge_ranges, v6_default) {
                    Some(why) => refused.push(Refused {
                        node: name.clone(),
                        prefix: *p,
                        why,
                    }),
                    None if !ok.contains(p) => ok.push(*p),
                    None => {}
                }
            }
            ok
        };
        // On their own, always: kube-controller-manager never gives a node
        // a special range, the cloud's, or one wider than a /16. The IPv6
        // default range (`fc00::/7`, see `family_ranges`) is for what an
        // edge can write: its IPAM blocks, and pod CIDRs where the
        // allocator does not set them; the allocator's IPv6 pod CIDRs come
        // from the cluster's own (often global) range and were always
        // taken while no IPv6 range is listed.
        let pods = alone(&c.pod_cidrs, pods_vetted);
        let ipam = alone(&c.ipam_cidrs, true);
        plausible.insert(name.as_str(), (pods, ipam));
    }
    let mut entries = Vec::new();
    for (n, c) in claims {
        let (pods, ipam) = match plausible.get(n.as_str()) {
            Some((pods, ipam)) => (pods.as_slice(), ipam.as_slice()),
            None => (c.pod_cidrs.as_slice(), c.ipam_cidrs.as_slice()),
        };
        entries.extend(pods.iter().map(|p| (*p, n.as_str(), What::PodCidr)));
        entries.extend(ipam.iter().map(|p| (*p, n.as_str(), What::Ipam)));
        if is_cloud[n.as_str()] {
            entries.extend(
                super::node_addresses::addresses(c)
                    .into_iter()
                    .map(|ip| (Cidr::host(ip), n.as_str(), What::Address)),
            );
        }
    }
    let index = Index::new(entries);
    // Every Node's listed addresses, sorted, for the pod CIDRs below.
    let mut addresses: Vec<(IpAddr, &str)> = claims
        .iter()
        .flat_map(|(n, c)| {
            super::node_addresses::addresses(c)
                .into_iter()
                .map(move |ip| (ip, n.as_str()))
        })
        .collect();
    addresses.sort_unstable();
    for (name, (pods, ipam)) in &plausible {
        let mut refuse = |p: &Cidr, why: String| {
            refused.push(Refused {
                node: name.to_string(),
                prefix: *p,
                why,
            })
        };
        let mut kept_pods = Vec::new();
        for p in pods {
            let why = pods_vetted
                .then(|| pod_cidr_refusal(p, name, &index, &addresses, &is_cloud))
                .flatten();
            match why {
                Some(why) => refuse(p, why),
                None => kept_pods.push(*p),
            }
        }
        let mut kept_ipam = Vec::new();
        for p in ipam {
            match index.overlapping(*p).find(|(_, other, _)| other != name) {
                Some((q, other, what)) => {
                    let whose = if is_cloud[*other] { "cloud" } else { "edge" };
                    refuse(
                        p,
                        format!("overlaps {whose} node {other}'s {} {q}", what.name()),
                    );
                }
                None => kept_ipam.push(*p),
            }
        }
        if let Some(c) = out.get_mut(*name) {
            c.pod_cidrs = kept_pods;
            c.ipam_cidrs = kept_ipam;
        }
    }
    (out, refused)
}

/// Why an edge's pod range `p` is refused on its own, if so: wider than
/// any node's pod range, overlapping a range no node's pods can be in
/// (unless listed in `edge_ranges` on purpose), or `tunnel_routes`, or
/// outside `edge_ranges`.
fn own_refusal(
    p: &Cidr,
    special: &[Cidr],
    cloud_ranges: &[Cidr],
    edge_ranges: &[Cidr],
    v6_default: bool,
) -> Option<String> {
    let widest = if p.addr().is_ipv4() {
        WIDEST_POD_CIDR.0
    } else {
        WIDEST_POD_CIDR.1
    };
    if let Some(s) = special.iter().find(|s| s.overlaps(p)) {
        if !listed_as_local(p, edge_ranges) {
            return Some(format!("overlaps {s}, where no node's pods are"));
        }
    }
    if p.prefix_len() < widest {
        return Some(format!(
            "wider than /{widest}, which no node's pod range is"
        ));
    }
    if let Some(r) = cloud_ranges.iter().find(|r| r.overlaps(p)) {
        return Some(format!("overlaps tunnel_routes ({r}), the cloud's"));
    }
    outside(p, edge_ranges, v6_default)
        .then(|| super::node_addresses::outside_reason(p.addr().is_ipv4(), edge_ranges))
}

/// Narrowest a per-node pod range is taken as: kube-controller-manager
/// gives nodes /24s (IPv6 /64s) by default and no cluster gives one node
/// more than a /16 (/48).
const WIDEST_POD_CIDR: (u8, u8) = (16, 48);

/// Why edge node `name`'s pod CIDR `p` (plausible on its own) is not
/// taken, by what other Nodes say (see `vet`), if so: overlapping a cloud
/// Node's range or another Node's plausible IPAM prefix (neither is taken:
/// neither is sure), or holding another Node's address. Overlapping
/// another edge's pod CIDR is left to the registry (the node connected
/// first keeps it, the other is refused `route_conflict`).
fn pod_cidr_refusal(
    p: &Cidr,
    name: &str,
    index: &Index<'_>,
    addresses: &[(IpAddr, &str)],
    is_cloud: &BTreeMap<&str, bool>,
) -> Option<String> {
    if let Some((q, other, what)) = index
        .overlapping(*p)
        .find(|(_, other, what)| *other != name && (is_cloud[*other] || *what == What::Ipam))
    {
        let whose = if is_cloud[*other] { "cloud" } else { "edge" };
        return Some(format!(
            "overlaps {whose} node {other}'s {} {q}",
            what.name()
        ));
    }
    let start = addresses.partition_point(|(a, _)| *a < p.addr());
    addresses[start..]
        .iter()
        .take_while(|(a, _)| p.contains(a))
        .find(|(_, other)| *other != name)
        .map(|(a, other)| format!("holds node {other}'s address {a}"))
}

/// Whether `p` is not inside one of the edge ranges of its family (see
/// [`super::node_addresses::family_ranges`]: IPv6 ones held to `fc00::/7`
/// when no IPv6 range is listed, unless `v6_default` is off, when an
/// unlisted IPv6 is not restricted).
fn outside(p: &Cidr, edge_ranges: &[Cidr], v6_default: bool) -> bool {
    let v4 = p.addr().is_ipv4();
    if !v4 && !v6_default && !edge_ranges.iter().any(|r| r.addr().is_ipv6()) {
        return false;
    }
    super::node_addresses::family_ranges(v4, edge_ranges)
        .is_some_and(|f| !f.iter().any(|r| r.contains_cidr(p)))
}

/// Whether `p` is inside a range of `edge_ranges` that is itself loopback
/// or link-local (listed on purpose, as in the one-host labs).
fn listed_as_local(p: &Cidr, edge_ranges: &[Cidr]) -> bool {
    let local = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    };
    edge_ranges
        .iter()
        .any(|r| local(r.addr()) && r.contains_cidr(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn node(pods: &[&str], ipam: &[&str], addr: &str, edge: bool) -> NodeClaims {
        NodeClaims {
            pod_cidrs: cidrs(pods),
            ipam_cidrs: cidrs(ipam),
            internal_ips: vec![addr.parse().unwrap()],
            edge,
            ..NodeClaims::default()
        }
    }

    /// Node → the IPAM prefixes it keeps, as text.
    type Kept = BTreeMap<String, Vec<String>>;

    fn run(nodes: &[(&str, NodeClaims)], edge_ranges: &[&str]) -> (Kept, Vec<(String, String)>) {
        let claims: BTreeMap<String, NodeClaims> = nodes
            .iter()
            .map(|(n, c)| (n.to_string(), c.clone()))
            .collect();
        let tunnel = cidrs(&["10.244.0.0/16", "10.96.0.0/12"]);
        let (kept, refused) = vet(&claims, |c| !c.edge, &tunnel, &cidrs(edge_ranges));
        let kept = kept
            .into_iter()
            .map(|(n, c)| (n, c.ipam_cidrs.iter().map(ToString::to_string).collect()))
            .collect();
        let refused = refused
            .into_iter()
            .map(|r| (format!("{} {}", r.node, r.prefix), r.why))
            .collect();
        (kept, refused)
    }

    const PRIVATE: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

    /// An edge's block is taken when it is nobody else's and outside the
    /// cloud; one overlapping the cloud, another node's range, a special
    /// range or a public one is refused, naming why; a cloud node's blocks
    /// are kept as they are.
    #[test]
    fn an_edge_takes_only_blocks_that_can_be_its_own() {
        let (kept, refused) = run(
            &[
                (
                    "cloud-1",
                    node(
                        &["10.244.1.0/24"],
                        &["10.96.5.0/26", "10.70.9.0/26"],
                        "10.0.0.2",
                        false,
                    ),
                ),
                (
                    "edge-1",
                    node(
                        &[],
                        &[
                            "10.70.1.0/26",       // its own
                            "fd00:70:1::/122",    // its own (ULA: no IPv6 edge range)
                            "2001:db8:70::/122",  // global (no IPv6 edge range)
                            "10.244.1.0/26",      // inside tunnel_routes
                            "10.70.9.0/26",       // a cloud node's block
                            "10.0.0.0/30",        // contains a cloud node's address
                            "10.70.2.0/25",       // contains edge-2's block
                            "10.71.0.0/24",       // edge-2's pod CIDR
                            "127.0.0.0/26",       // loopback
                            "169.254.169.192/26", // metadata
                            "8.8.8.0/26",         // public
                            "0.0.0.0/0",          // everything
                        ],
                        "192.168.1.10",
                        true,
                    ),
                ),
                (
                    "edge-2",
                    node(&["10.71.0.0/24"], &["10.70.2.64/26"], "192.168.2.10", true),
                ),
            ],
            &PRIVATE,
        );
        assert_eq!(kept["cloud-1"], ["10.96.5.0/26", "10.70.9.0/26"]);
        assert_eq!(kept["edge-1"], ["10.70.1.0/26", "fd00:70:1::/122"]);
        // edge-2's block overlaps edge-1's 10.70.2.0/25: neither takes it.
        assert_eq!(kept["edge-2"], Vec::<String>::new());
        let why = |k: &str| {
            refused
                .iter()
                .find(|(p, _)| p == k)
                .map(|(_, w)| w.as_str())
                .unwrap_or_else(|| panic!("{k} not refused: {refused:?}"))
        };
        assert!(why("edge-1 10.244.1.0/26").contains("tunnel_routes"));
        assert!(why("edge-1 10.70.9.0/26").contains("cloud node cloud-1's IPAM prefix"));
        assert!(why("edge-1 10.0.0.0/30").contains("cloud node cloud-1's address 10.0.0.2/32"));
        assert!(why("edge-1 10.70.2.0/25").contains("edge node edge-2's IPAM prefix"));
        assert!(why("edge-2 10.70.2.64/26").contains("edge node edge-1's IPAM prefix"));
        assert!(why("edge-1 10.71.0.0/24").contains("edge node edge-2's pod CIDR"));
        // Half of the edges with a pod CIDR: it may be a forgery (a Node's
        // empty pod CIDRs may be set once, by anyone who may update it),
        // so it is vetted too, and it and the block over it are both
        // refused: neither is sure.
        assert!(why("edge-2 10.71.0.0/24").contains("edge node edge-1's IPAM prefix"));
        assert!(why("edge-1 127.0.0.0/26").contains("127.0.0.0/8"));
        assert!(why("edge-1 169.254.169.192/26").contains("169.254.0.0/16"));
        assert!(why("edge-1 8.8.8.0/26").contains("edge_address_ranges"));
        assert!(why("edge-1 2001:db8:70::/122").contains("edge_address_ranges"));
        assert!(why("edge-1 0.0.0.0/0").contains("0.0.0.0/8"));
        assert_eq!(refused.len(), 12, "{refused:?}");
    }

    /// With no IPv6 range listed, an edge's IPv6 block is taken inside
    /// `fc00::/7` only; a listed IPv6 range takes the place of that
    /// default.
    #[test]
    fn an_ipv6_block_outside_unique_local_needs_a_listed_range() {
        let edge = || {
            node(
                &[],
                &["2001:db8:70::/122", "fd00:70::/122"],
                "192.168.1.10",
                true,
            )
        };
        let (kept, refused) = run(&[("edge-1", edge())], &PRIVATE);
        assert_eq!(kept["edge-1"], ["fd00:70::/122"]);
        assert_eq!(
            refused,
            [(
                "edge-1 2001:db8:70::/122".to_string(),
                "outside fc00::/7, the IPv6 default while kubernetes.edge_address_ranges lists no IPv6 range".to_string()
            )]
        );
        let listed = [PRIVATE.as_slice(), &["2001:db8:70::/48"]].concat();
        let (kept, refused) = run(&[("edge-1", edge())], &listed);
        assert_eq!(kept["edge-1"], ["2001:db8:70::/122"]);
        assert_eq!(refused.len(), 1, "{refused:?}");
    }

    /// The allocator's IPv6 pod CIDRs (most edges have pod CIDRs:
    /// kube-controller-manager's, from the cluster's range, global or not)
    /// are taken while no IPv6 range is listed; where most edges have none
    /// (the CNI's IPAM allocates), one an edge's Node shows was written by
    /// whoever may update that Node and is held to `fc00::/7` as IPAM
    /// blocks are.
    #[test]
    fn an_allocators_global_ipv6_pod_cidr_is_taken() {
        let tunnel = cidrs(&["10.244.0.0/16", "10.96.0.0/12"]);
        let edge1 = || {
            node(
                &["10.70.1.0/24", "2001:db8:42:1::/64"],
                &[],
                "192.168.1.10",
                true,
            )
        };
        let mut claims: BTreeMap<String, NodeClaims> = BTreeMap::new();
        claims.insert("edge-1".into(), edge1());
        claims.insert(
            "edge-2".into(),
            node(
                &["10.70.2.0/24", "2001:db8:42:2::/64"],
                &[],
                "192.168.1.11",
                true,
            ),
        );
        let (kept, refused) = vet(&claims, |c| !c.edge, &tunnel, &cidrs(&PRIVATE));
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            kept["edge-1"].pod_cidrs,
            cidrs(&["10.70.1.0/24", "2001:db8:42:1::/64"])
        );
        // Two of three edges without pod CIDRs: edge-1's are vetted.
        claims.insert("edge-2".into(), node(&[], &[], "192.168.1.11", true));
        claims.insert("edge-3".into(), node(&[], &[], "192.168.1.12", true));
        let (kept, refused) = vet(&claims, |c| !c.edge, &tunnel, &cidrs(&PRIVATE));
        assert_eq!(kept["edge-1"].pod_cidrs, cidrs(&["10.70.1.0/24"]));
        let why: Vec<_> = refused
            .iter()
            .map(|r| (r.prefix.to_string(), r.why.as_str()))
            .collect();
        assert_eq!(why.len(), 1, "{why:?}");
        assert_eq!(why[0].0, "2001:db8:42:1::/64");
        assert!(why[0].1.contains("fc00::/7"), "{why:?}");
    }

    /// A loopback block is taken where a loopback range is listed (the
    /// one-host labs); with no IPAM prefixes at all nothing changes.
    #[test]
    fn listed_loopback_ranges_and_clusters_without_ipam() {
        let (kept, refused) = run(
            &[("edge-1", node(&[], &["127.1.5.0/26"], "127.0.0.2", true))],
            &["127.0.0.0/8"],
        );
        assert_eq!(kept["edge-1"], ["127.1.5.0/26"]);
        assert!(refused.is_empty());
        let (kept, refused) = run(
            &[("edge-1", node(&["10.70.1.0/24"], &[], "192.168.1.10", true))],
            &PRIVATE,
        );
        assert_eq!(kept["edge-1"], Vec::<String>::new());
        assert!(refused.is_empty());
    }

    /// On a cluster whose CNI allocates (most Nodes without a pod CIDR), a
    /// compromised edge writes its own Node's empty `spec.podCIDRs`
    /// (allowed once, and not guarded by NodeRestriction) over a victim's
    /// Calico block, over a whole private range, over everything, or over
    /// a range holding another node's address: each forged pod CIDR is
    /// refused, and no victim's range is handed to it (a block it overlaps
    /// is refused too: neither is sure). Where kube-controller-manager
    /// allocates (most Nodes have one, set once by it), pod CIDRs are
    /// taken as before.
    #[test]
    fn an_edge_pod_cidr_is_vetted_like_its_blocks() {
        let victim = node(&[], &["10.20.1.0/26"], "192.168.1.10", true);
        let cloud = node(&[], &["10.244.1.0/26"], "10.0.0.5", false);
        for (forged, why) in [
            (
                "10.20.1.0/26",
                "overlaps edge node shop1's IPAM prefix 10.20.1.0/26",
            ),
            ("10.0.0.0/8", "wider than /16, which no node's pod range is"),
            ("0.0.0.0/0", "overlaps 0.0.0.0/8, where no node's pods are"),
            (
                "10.32.0.0/12",
                "wider than /16, which no node's pod range is",
            ),
            ("192.168.1.0/24", "holds node shop1's address 192.168.1.10"),
            (
                "10.96.4.0/24",
                "overlaps tunnel_routes (10.96.0.0/12), the cloud's",
            ),
            (
                "127.0.0.0/24",
                "overlaps 127.0.0.0/8, where no node's pods are",
            ),
            ("203.0.113.0/24", "outside kubernetes.edge_address_ranges"),
        ] {
            let evil = node(&[forged], &[], "192.168.9.9", true);
            // Cloud Nodes given pod CIDRs by a cloud allocator that skips
            // the edges: they must not make the edge's forgery look like
            // the allocator's (the majority is counted over edges).
            let allocated = |i: u8| {
                let pods = format!("10.244.{}.0/24", i + 10);
                node(&[pods.as_str()], &[], &format!("10.0.0.{}", i + 10), false)
            };
            let claims: BTreeMap<String, NodeClaims> = [
                ("evil".to_string(), evil),
                ("shop1".to_string(), victim.clone()),
                ("cloud1".to_string(), cloud.clone()),
                ("cloud2".to_string(), allocated(2)),
                ("cloud3".to_string(), allocated(3)),
                ("cloud4".to_string(), allocated(4)),
            ]
            .into_iter()
            .collect();
            let tunnel = cidrs(&["10.96.0.0/12"]);
            let (kept, refused) = vet(&claims, |c| !c.edge, &tunnel, &cidrs(&PRIVATE));
            assert!(kept["evil"].pod_cidrs.is_empty(), "{forged} taken");
            let r = refused
                .iter()
                .find(|r| r.node == "evil")
                .unwrap_or_else(|| panic!("{forged}: not refused"));
            assert_eq!(r.why, why, "{forged}");
        }
        let honest = node(&["10.30.7.0/24"], &[], "192.168.9.9", true);
        let claims: BTreeMap<String, NodeClaims> = [
            ("edge".to_string(), honest),
            (
                "shop1".to_string(),
                node(&["10.30.8.0/24"], &[], "192.168.1.10", true),
            ),
            (
                "cloud1".to_string(),
                node(&["10.244.1.0/24"], &[], "10.0.0.5", false),
            ),
        ]
        .into_iter()
        .collect();
        let (kept, refused) = vet(
            &claims,
            |c| !c.edge,
            &cidrs(&["10.96.0.0/12"]),
            &cidrs(&PRIVATE),
        );
        assert_eq!(kept["edge"].pod_cidrs, cidrs(&["10.30.7.0/24"]));
        assert_eq!(kept["shop1"].pod_cidrs, cidrs(&["10.30.8.0/24"]));
        assert!(refused.is_empty(), "{refused:?}");
    }
}
