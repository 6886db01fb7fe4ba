//! The cloud Nodes' own pod ranges as cloud ranges (Kubernetes mode).
//!
//! `tunnel_routes` is read at start; a cloud worker added later (cluster
//! autoscaler, `kubeadm join`) gets a pod CIDR nobody listed. The
//! directory already knows which Nodes are in the cloud (`is_cloud` in
//! `k8s.rs`: never with evidence of an edge); their pod CIDRs and vetted
//! IPAM prefixes join the cloud ranges here, so edges may reach them
//! (rule 6 of the policy) and are sent them as tunnel routes
//! ([`crate::routefeed`]), without a restart.
//!
//! What joins is bounded, so that no Node can widen what edges reach
//! beyond its own pods: node addresses stay out (the nodes' subnet is what
//! `tunnel_routes` lists), a prefix wider than [`MIN_V4_LEN`] /
//! [`MIN_V6_LEN`] stays out (no node's pods need a /15; a default route
//! would make the relay every edge's way out), a prefix inside a
//! configured range is left to it, and a prefix that overlaps a route an
//! edge session serves stays out while that edge serves it: the edge's
//! claim wins (its pods are there, not the cloud's).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use relay_protocol::Cidr;

/// Shortest IPv4 prefix of a cloud Node's that joins the cloud ranges.
pub const MIN_V4_LEN: u8 = 16;
/// Shortest IPv6 prefix of a cloud Node's that joins the cloud ranges.
pub const MIN_V6_LEN: u8 = 48;

/// Why a cloud Node's prefix did not join the cloud ranges.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum LeftOut {
    /// Wider than [`MIN_V4_LEN`] / [`MIN_V6_LEN`].
    TooWide,
    /// It overlaps `.0`, which the session of edge node `.1` serves.
    EdgeServes(Cidr, String),
}

/// The outcome of [`vet`]: the prefixes that join, and those left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// Joining the cloud ranges, sorted.
    pub kept: Vec<Cidr>,
    /// Left out, with why.
    pub left_out: BTreeSet<(Cidr, LeftOut)>,
}

/// Picks which of the cloud Nodes' prefixes (`candidates`, as
/// `Directory::cloud_prefixes` gives them: pod ranges and host prefixes)
/// join the cloud ranges: pod ranges only, not inside a `configured` range
/// already, not too wide, and overlapping no route an edge serves
/// (`served(prefix)` names one, and its node).
pub fn vet(
    candidates: &[Cidr],
    configured: &[Cidr],
    served: impl Fn(&Cidr) -> Option<(Cidr, String)>,
) -> Vetted {
    let mut out = Vetted::default();
    for c in candidates {
        if c.is_host() || configured.iter().any(|r| r.contains_cidr(c)) {
            continue;
        }
        let min = match c.addr() {
            IpAddr::V4(_) => MIN_V4_LEN,
            IpAddr::V6(_) => MIN_V6_LEN,
        };
        if c.prefix_len() < min {
            out.left_out.insert((*c, LeftOut::TooWide));
        } else if let Some((have, node)) = served(c) {
            out.left_out.insert((*c, LeftOut::EdgeServes(have, node)));
        } else {
            out.kept.push(*c);
        }
    }
    out.kept.sort_unstable();
    out.kept.dedup();
    out
}

/// The joined prefixes by length, so that asking whether an address is
/// in one costs a probe per length present (a handful), not a scan.
#[derive(Debug, Default)]
pub struct PrefixSet {
    by_len: BTreeMap<u8, HashSet<Cidr>>,
}

impl PrefixSet {
    /// The set of `prefixes`.
    pub fn new(prefixes: &[Cidr]) -> Self {
        let mut by_len: BTreeMap<u8, HashSet<Cidr>> = BTreeMap::new();
        for c in prefixes {
            by_len.entry(c.prefix_len()).or_default().insert(*c);
        }
        PrefixSet { by_len }
    }

    /// Whether some prefix of the set contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.by_len
            .iter()
            .any(|(len, set)| Cidr::containing(ip, *len).is_some_and(|c| set.contains(&c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn only_bounded_pod_ranges_no_edge_serves_join() {
        let candidates = [
            c("10.0.0.7/32"),    // a node address: its subnet is configured
            c("10.244.0.0/24"),  // inside a configured range already
            c("10.245.3.0/24"),  // a new worker's pod CIDR: joins
            c("10.246.0.0/26"),  // an IPAM block: joins
            c("10.0.0.0/8"),     // too wide
            c("fd00:1:2::/64"),  // IPv6 pod range: joins
            c("fd00::/32"),      // too wide
            c("192.168.5.0/24"), // an edge serves 192.168.5.10/32
        ];
        let configured = [c("10.244.0.0/16"), c("10.96.0.0/12")];
        let v = vet(&candidates, &configured, |p| {
            p.contains_cidr(&c("192.168.5.10/32"))
                .then(|| (c("192.168.5.10/32"), "shop-1".to_string()))
        });
        assert_eq!(
            v.kept,
            vec![c("10.245.3.0/24"), c("10.246.0.0/26"), c("fd00:1:2::/64")]
        );
        let left: Vec<_> = v.left_out.iter().cloned().collect();
        assert_eq!(
            left,
            vec![
                (c("10.0.0.0/8"), LeftOut::TooWide),
                (
                    c("192.168.5.0/24"),
                    LeftOut::EdgeServes(c("192.168.5.10/32"), "shop-1".into())
                ),
                (c("fd00::/32"), LeftOut::TooWide),
            ]
        );
    }

    #[test]
    fn the_set_answers_by_longest_and_shortest_length_alike() {
        let s = PrefixSet::new(&[c("10.245.3.0/24"), c("10.246.0.0/26"), c("fd00:1:2::/64")]);
        for (ip, want) in [
            ("10.245.3.9", true),
            ("10.245.4.9", false),
            ("10.246.0.63", true),
            ("10.246.0.64", false),
            ("fd00:1:2::5", true),
            ("fd00:1:3::5", false),
        ] {
            assert_eq!(s.contains(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
