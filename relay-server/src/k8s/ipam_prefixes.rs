//! Which of the pod prefixes a CNI's IPAM gives an edge node the relay
//! takes as the edge's.
//!
//! A Node's `spec.podCIDRs` are written by kube-controller-manager, and are
//! taken as they are. The prefixes from Calico's BlockAffinities and
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
//! nodes' overlapping blocks are both refused: neither is sure), and, for
//! IPv4, lies inside `kubernetes.edge_address_ranges` (the private and
//! shared ranges by default, where IP pools are). Cloud Nodes' IPAM
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
/// `edge_ranges` is `kubernetes.edge_address_ranges` (it restricts a
/// family only when it lists a range of that family).
pub(crate) fn vet(
    claims: &BTreeMap<String, NodeClaims>,
    cloud: impl Fn(&NodeClaims) -> bool,
    cloud_ranges: &[Cidr],
    edge_ranges: &[Cidr],
) -> (BTreeMap<String, NodeClaims>, Vec<Refused>) {
    let is_cloud: BTreeMap<&str, bool> =
        claims.iter().map(|(n, c)| (n.as_str(), cloud(c))).collect();
    let mut out = claims.clone();
    let mut refused = Vec::new();
    if claims.values().all(|c| c.ipam_cidrs.is_empty()) {
        return (out, refused);
    }
    let mut entries = Vec::new();
    for (n, c) in claims {
        entries.extend(c.pod_cidrs.iter().map(|p| (*p, n.as_str(), What::PodCidr)));
        entries.extend(c.ipam_cidrs.iter().map(|p| (*p, n.as_str(), What::Ipam)));
        if is_cloud[n.as_str()] {
            entries.extend(
                super::node_addresses::addresses(c)
                    .into_iter()
                    .map(|ip| (Cidr::host(ip), n.as_str(), What::Address)),
            );
        }
    }
    let index = Index::new(entries);
    let special: Vec<Cidr> = SPECIAL.iter().filter_map(|s| s.parse().ok()).collect();
    for (name, c) in claims {
        if is_cloud[name.as_str()] || c.ipam_cidrs.is_empty() {
            continue;
        }
        let mut mine = Vec::new();
        for p in &c.ipam_cidrs {
            let why = if let Some(s) = special.iter().find(|s| s.overlaps(p)) {
                (!listed_as_local(p, edge_ranges))
                    .then(|| format!("overlaps {s}, where no node's pods are"))
            } else {
                None
            };
            let why = why.or_else(|| {
                if let Some(r) = cloud_ranges.iter().find(|r| r.overlaps(p)) {
                    Some(format!("overlaps tunnel_routes ({r}), the cloud's"))
                } else if let Some((q, other, what)) =
                    index.overlapping(*p).find(|(_, other, _)| *other != name)
                {
                    let whose = if is_cloud[*other] { "cloud" } else { "edge" };
                    Some(format!(
                        "overlaps {whose} node {other}'s {} {q}",
                        what.name()
                    ))
                } else if outside(p, edge_ranges) {
                    Some("outside kubernetes.edge_address_ranges".to_string())
                } else {
                    None
                }
            });
            match why {
                Some(why) => refused.push(Refused {
                    node: name.clone(),
                    prefix: *p,
                    why,
                }),
                None if !mine.contains(p) => mine.push(*p),
                None => {}
            }
        }
        if let Some(c) = out.get_mut(name) {
            c.ipam_cidrs = mine;
        }
    }
    (out, refused)
}

/// Whether `edge_ranges` restricts `p`'s family and `p` is not inside one
/// of its ranges.
fn outside(p: &Cidr, edge_ranges: &[Cidr]) -> bool {
    let v4 = p.addr().is_ipv4();
    let mut family = edge_ranges
        .iter()
        .filter(|r| r.addr().is_ipv4() == v4)
        .peekable();
    family.peek().is_some() && !family.any(|r| r.contains_cidr(p))
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
                            "fd00:70:1::/122",    // its own (no IPv6 edge range)
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
        assert!(why("edge-1 127.0.0.0/26").contains("127.0.0.0/8"));
        assert!(why("edge-1 169.254.169.192/26").contains("169.254.0.0/16"));
        assert!(why("edge-1 8.8.8.0/26").contains("edge_address_ranges"));
        assert!(why("edge-1 0.0.0.0/0").contains("0.0.0.0/8"));
        assert_eq!(refused.len(), 10, "{refused:?}");
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
}
