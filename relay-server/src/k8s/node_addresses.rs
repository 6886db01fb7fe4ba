//! Which of an edge Node's addresses the relay takes as the edge's.
//!
//! A node's kubelet writes its own Node's `status.addresses`, so on an
//! edge they are the edge's word, and a compromised edge could list any
//! address. Taken as claims, they become routes: the relay node captures
//! them (its host processes' traffic too), route agents point other cloud
//! nodes' traffic at the relay, and CONNECTs to them go to the edge. An
//! edge listing `127.0.0.1` or `169.254.169.254` would receive the relay
//! node's loopback or instance-metadata traffic; one listing a cloud pod's
//! or another edge's pod's address, their traffic; one listing a public
//! address, the cloud's traffic to it. So an edge's address is taken only
//! when it could be the edge's own: a unicast address outside the cloud
//! (`tunnel_routes`, cloud Nodes' pod CIDRs and addresses) and outside
//! every other Node's pod CIDR, and inside `kubernetes.edge_address_ranges`
//! (by default the private and shared IPv4 ranges edge LANs use; an IPv6
//! address, while no IPv6 range is listed, inside the unique local
//! `fc00::/7`: see [`family_ranges`]). Cloud Nodes' addresses
//! are kept as they are (bar non-unicast ones): they are never routed to an
//! edge. Static mode's `[nodes]` table is the operator's word and is not
//! vetted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use relay_kube::NodeClaims;
use relay_protocol::Cidr;

/// An address of a Node not taken, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Refused {
    pub(crate) node: String,
    pub(crate) ip: IpAddr,
    pub(crate) why: String,
}

/// Each Node's addresses (`InternalIP`s then `ExternalIP`s, in order) that
/// are taken, and those refused. `cloud` says whether a Node is in the
/// cloud; `cloud_ranges` are `tunnel_routes`; `edge_ranges` is
/// `kubernetes.edge_address_ranges` (see [`family_ranges`]).
pub(crate) fn vet(
    claims: &BTreeMap<String, NodeClaims>,
    cloud: impl Fn(&NodeClaims) -> bool,
    cloud_ranges: &[Cidr],
    edge_ranges: &[Cidr],
) -> (BTreeMap<String, Vec<IpAddr>>, Vec<Refused>) {
    let is_cloud: BTreeMap<&str, bool> =
        claims.iter().map(|(n, c)| (n.as_str(), cloud(c))).collect();
    // Indexed once per call: it runs on every Node change, and a scan of
    // every Node per address would cost 10,000² at 10,000 Nodes.
    let cloud_addresses: HashSet<IpAddr> = claims
        .iter()
        .filter(|(n, _)| is_cloud[n.as_str()])
        .flat_map(|(_, c)| addresses(c))
        .collect();
    let pods = PodIndex::new(claims);
    let mut kept = BTreeMap::new();
    let mut refused = Vec::new();
    for (name, c) in claims {
        let mut mine = Vec::new();
        for ip in addresses(c) {
            let why = if crate::policy::forbidden(ip) && !listed_as_local(ip, edge_ranges) {
                Some("not a unicast address a node can have".to_string())
            } else if is_cloud[name.as_str()] {
                None
            } else if let Some(r) = cloud_ranges.iter().find(|r| r.contains(&ip)) {
                Some(format!("inside tunnel_routes ({r}), the cloud's"))
            } else if cloud_addresses.contains(&ip) {
                Some("a cloud node's address".to_string())
            } else if let Some((other, p)) = pods.owner(ip, name) {
                let whose = if is_cloud[other] { "cloud" } else { "edge" };
                Some(format!("inside {whose} node {other}'s pod CIDR {p}"))
            } else if outside(ip, edge_ranges) {
                Some(outside_reason(ip.is_ipv4(), edge_ranges))
            } else {
                None
            };
            match why {
                Some(why) => refused.push(Refused {
                    node: name.clone(),
                    ip,
                    why,
                }),
                None if !mine.contains(&ip) => mine.push(ip),
                None => {}
            }
        }
        kept.insert(name.clone(), mine);
    }
    (kept, refused)
}

/// A Node's addresses as its kubelet lists them: `InternalIP`s, then
/// `ExternalIP`s, IPv4-mapped ones as IPv4.
pub(crate) fn addresses(c: &NodeClaims) -> Vec<IpAddr> {
    c.internal_ips
        .iter()
        .chain(&c.external_ips)
        .map(IpAddr::to_canonical)
        .collect()
}

/// Every Node's pod CIDRs by prefix length, so finding the pod CIDRs
/// containing an address costs one probe per distinct length.
struct PodIndex<'a> {
    by_len: BTreeMap<u8, HashMap<Cidr, Vec<&'a str>>>,
}

impl<'a> PodIndex<'a> {
    fn new(claims: &'a BTreeMap<String, NodeClaims>) -> Self {
        let mut by_len: BTreeMap<u8, HashMap<Cidr, Vec<&'a str>>> = BTreeMap::new();
        for (n, c) in claims {
            // IPAM prefixes are vetted before (k8s/ipam_prefixes.rs).
            for p in c.pod_cidrs.iter().chain(&c.ipam_cidrs) {
                by_len
                    .entry(p.prefix_len())
                    .or_default()
                    .entry(*p)
                    .or_default()
                    .push(n.as_str());
            }
        }
        PodIndex { by_len }
    }

    /// A Node other than `me` whose pod CIDR contains `ip`, with that CIDR.
    fn owner(&self, ip: IpAddr, me: &str) -> Option<(&'a str, Cidr)> {
        self.by_len.iter().find_map(|(len, table)| {
            let c = Cidr::containing(ip, *len)?;
            let other = table.get(&c)?.iter().find(|n| **n != me)?;
            Some((*other, c))
        })
    }
}

/// Whether `ip` is outside the edge ranges of its family (see
/// [`family_ranges`]).
fn outside(ip: IpAddr, edge_ranges: &[Cidr]) -> bool {
    family_ranges(ip.is_ipv4(), edge_ranges).is_some_and(|f| !f.iter().any(|r| r.contains(&ip)))
}

/// The ranges an edge's address (or pod range) of the IPv4 (`v4`) or IPv6
/// family must fall in: the ranges of that family `edge_ranges` lists.
/// When it lists none, IPv4 is not restricted (the default list is
/// IPv4's private and shared ranges, and an operator who lists only IPv6
/// ranges restricts only IPv6), and IPv6 is held to the unique local
/// addresses `fc00::/7`, IPv6's counterpart of the private ranges. That
/// IPv6 default lives here, not in the default list, because an
/// operator's list replaces the default whole: a list written for a
/// site's IPv4 LANs (as most are, the labs' `127.0.0.0/8` too) would leave
/// IPv6 unvetted, and any global IPv6 address an edge's kubelet wrote (a
/// compromised edge writes its own Node's status) would be taken as the
/// edge's, with CONNECTs and Service endpoints there sent to it.
pub(crate) fn family_ranges(v4: bool, edge_ranges: &[Cidr]) -> Option<Vec<Cidr>> {
    let family: Vec<Cidr> = edge_ranges
        .iter()
        .filter(|r| r.addr().is_ipv4() == v4)
        .copied()
        .collect();
    match (family.is_empty(), v4) {
        (false, _) => Some(family),
        (true, true) => None,
        (true, false) => Some(
            Cidr::new(
                std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0).into(),
                7,
            )
            .into_iter()
            .collect(),
        ),
    }
}

/// Why an address or range of the IPv4 (`v4`) or IPv6 family is refused
/// for being outside [`family_ranges`]: the listed ranges, or the IPv6
/// default, named as such so that an operator sees which list to extend.
pub(crate) fn outside_reason(v4: bool, edge_ranges: &[Cidr]) -> String {
    if !v4 && !edge_ranges.iter().any(|r| r.addr().is_ipv6()) {
        "outside fc00::/7, the IPv6 default while kubernetes.edge_address_ranges lists no IPv6 range"
            .to_string()
    } else {
        "outside kubernetes.edge_address_ranges".to_string()
    }
}

/// Whether `ip`, loopback or link-local, is inside a range of
/// `edge_ranges` that is itself loopback or link-local: listed on purpose
/// (a one-host lab whose nodes are loopback addresses), not by a wide
/// range such as `0.0.0.0/0`.
fn listed_as_local(ip: IpAddr, edge_ranges: &[Cidr]) -> bool {
    let local = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    };
    local(ip)
        && edge_ranges
            .iter()
            .any(|r| local(r.addr()) && r.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pods: &[&str], internal: &[&str], external: &[&str], edge: bool) -> NodeClaims {
        NodeClaims {
            pod_cidrs: pods.iter().map(|p| p.parse().unwrap()).collect(),
            internal_ips: internal.iter().map(|a| a.parse().unwrap()).collect(),
            external_ips: external.iter().map(|a| a.parse().unwrap()).collect(),
            edge,
            ..NodeClaims::default()
        }
    }

    /// An edge keeps LAN addresses only; the loopback, metadata, cloud,
    /// other nodes' pod and public addresses it lists are refused, each
    /// with its reason; a cloud node keeps its own, bar non-unicast ones.
    #[test]
    fn an_edge_keeps_only_addresses_that_could_be_its_own() {
        let mut all = BTreeMap::new();
        all.insert(
            "cloud-1".to_string(),
            claims(
                &["10.244.0.0/24"],
                &["10.0.0.5", "127.0.0.53"],
                &["203.0.113.9"],
                false,
            ),
        );
        all.insert(
            "edge-1".to_string(),
            claims(
                &["10.244.7.0/24"],
                &[
                    "192.168.1.10",
                    "127.0.0.1",
                    "169.254.169.254",
                    "10.96.0.1",
                    "10.0.0.5",
                    "10.244.0.9",
                    "10.244.8.3",
                    "8.8.8.8",
                    "::ffff:192.168.1.10",
                    "fd00::10",
                ],
                &["100.64.3.4", "203.0.113.9"],
                true,
            ),
        );
        all.insert(
            "edge-2".to_string(),
            claims(&["10.244.8.0/24"], &[], &[], true),
        );
        let cloud_ranges: Vec<Cidr> = vec!["10.96.0.0/12".parse().unwrap()];
        let edge_ranges = crate::config_kube::default_edge_address_ranges();
        let (kept, refused) = vet(&all, |c| !c.edge, &cloud_ranges, &edge_ranges);
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };
        assert_eq!(kept["cloud-1"], ips(&["10.0.0.5", "203.0.113.9"]));
        assert_eq!(
            kept["edge-1"],
            ips(&["192.168.1.10", "fd00::10", "100.64.3.4"]),
            "the mapped form is the same address"
        );
        let why = |node: &str, ip: &str| {
            refused
                .iter()
                .find(|r| r.node == node && r.ip == ip.parse::<IpAddr>().unwrap())
                .map(|r| r.why.clone())
                .unwrap_or_default()
        };
        assert!(why("cloud-1", "127.0.0.53").contains("unicast"));
        assert!(why("edge-1", "127.0.0.1").contains("unicast"));
        assert!(why("edge-1", "169.254.169.254").contains("unicast"));
        assert!(why("edge-1", "10.96.0.1").contains("tunnel_routes"));
        assert!(why("edge-1", "10.0.0.5").contains("cloud node's address"));
        assert!(why("edge-1", "10.244.0.9").contains("cloud node cloud-1's pod CIDR"));
        assert!(why("edge-1", "10.244.8.3").contains("edge node edge-2's pod CIDR"));
        assert!(why("edge-1", "8.8.8.8").contains("edge_address_ranges"));
        assert!(why("edge-1", "203.0.113.9").contains("cloud node's address"));
        assert_eq!(refused.len(), 9, "{refused:?}");
        // Ranges of one family restrict that family only.
        let v6_only: Vec<Cidr> = vec!["fd00::/8".parse().unwrap()];
        let (kept, _) = vet(&all, |c| !c.edge, &cloud_ranges, &v6_only);
        assert!(kept["edge-1"].contains(&"8.8.8.8".parse().unwrap()));
        // Loopback only when a loopback range is listed, not by 0.0.0.0/0.
        let loopback = "127.0.0.1".parse::<IpAddr>().unwrap();
        for (ranges, taken) in [("0.0.0.0/0", false), ("127.0.0.0/8", true)] {
            let listed: Vec<Cidr> = vec![ranges.parse().unwrap()];
            let (kept, _) = vet(&all, |c| !c.edge, &cloud_ranges, &listed);
            assert_eq!(kept["edge-1"].contains(&loopback), taken, "{ranges}");
        }
    }

    /// With no IPv6 range listed (the default, or a list of IPv4 ranges
    /// such as the labs'), an edge's global IPv6 address is refused and a
    /// unique local one (`fc00::/7`) taken; an operator who lists an IPv6
    /// prefix takes the addresses inside it, and only those.
    #[test]
    fn a_global_ipv6_address_needs_a_listed_range() {
        let mut all = BTreeMap::new();
        all.insert(
            "edge-1".to_string(),
            claims(
                &["10.244.7.0/24"],
                &["192.168.1.10", "2001:db8:ee::5", "fd00:aa::7"],
                &["2a00:1450::1"],
                true,
            ),
        );
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };
        let defaults = crate::config_kube::default_edge_address_ranges();
        let lab: Vec<Cidr> = vec!["127.0.0.0/8".parse().unwrap()];
        const DEFAULT_V6: &str = "outside fc00::/7, the IPv6 default while kubernetes.edge_address_ranges lists no IPv6 range";
        for ranges in [&defaults, &lab] {
            let (kept, refused) = vet(&all, |c| !c.edge, &[], ranges);
            let ipv4 = if ranges == &lab {
                vec![]
            } else {
                vec!["192.168.1.10"]
            };
            assert_eq!(
                kept["edge-1"],
                ips(&[ipv4.as_slice(), &["fd00:aa::7"]].concat()),
                "{ranges:?}"
            );
            let mut why: Vec<(IpAddr, &str)> =
                refused.iter().map(|r| (r.ip, r.why.as_str())).collect();
            why.retain(|(ip, _)| ip.is_ipv6());
            assert_eq!(
                why,
                [
                    (ips(&["2001:db8:ee::5"])[0], DEFAULT_V6),
                    (ips(&["2a00:1450::1"])[0], DEFAULT_V6),
                ],
                "{ranges:?}"
            );
        }
        let mut listed = defaults.clone();
        listed.push("2001:db8:ee::/48".parse().unwrap());
        let (kept, refused) = vet(&all, |c| !c.edge, &[], &listed);
        assert_eq!(kept["edge-1"], ips(&["192.168.1.10", "2001:db8:ee::5"]));
        let refused: Vec<IpAddr> = refused.iter().map(|r| r.ip).collect();
        assert_eq!(refused, ips(&["fd00:aa::7", "2a00:1450::1"]));
    }
}
