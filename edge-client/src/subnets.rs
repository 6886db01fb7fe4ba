//! What the edge's capture must leave alone: the node's own LANs.
//!
//! Shops and towers reuse one LAN range (`192.168.1.0/24`), and the cloud
//! may list a range that contains it among the tunnel routes (a VPC in
//! `192.168.0.0/16`), or another site may serve an address inside it. A
//! destination inside a subnet this node is directly connected to is a
//! neighbour on this site's LAN: the kernel reaches it on-link, and sending
//! it through the tunnel would land it at another site that happens to use
//! the same numbers, or nowhere. So an edge never captures a prefix inside
//! its connected subnets, and exempts those subnets inside wider captured
//! prefixes, as it does for the prefixes it serves itself.

use std::collections::BTreeSet;
use std::net::IpAddr;

use relay_protocol::Cidr;

/// The capture an edge installs: the prefixes sent to the relay and the
/// prefixes exempt from capture even inside a captured one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CapturePlan {
    /// Captured prefixes.
    pub(crate) want: BTreeSet<Cidr>,
    /// Never captured: what the node serves and its connected subnets.
    pub(crate) skip: BTreeSet<Cidr>,
    /// Tunnel routes that overlap a connected subnet other than a served
    /// one (left out, or with the subnet exempt inside them): worth a log
    /// line, since that part of the cloud's range is unreachable from this
    /// node.
    pub(crate) overlapping: BTreeSet<Cidr>,
}

/// Plans the capture from the relay's tunnel routes, what this node serves
/// and its connected subnets ([`connected_subnets`]). A tunnel route inside
/// a served prefix or a connected subnet is not captured at all; one that
/// contains them is captured with them exempt.
pub(crate) fn plan(
    tunnel_routes: impl IntoIterator<Item = Cidr>,
    served: impl IntoIterator<Item = Cidr>,
    connected: &BTreeSet<Cidr>,
) -> CapturePlan {
    let mut skip: BTreeSet<Cidr> = served.into_iter().collect();
    // The pod bridge is a connected subnet too, but it is served: a
    // cluster range around it is the normal case, not worth a warning.
    let lans: Vec<Cidr> = connected
        .iter()
        .filter(|c| !skip.iter().any(|s| s.contains_cidr(c)))
        .copied()
        .collect();
    skip.extend(lans.iter().copied());
    let mut want = BTreeSet::new();
    let mut overlapping = BTreeSet::new();
    for r in tunnel_routes {
        if lans
            .iter()
            .any(|c| c.contains_cidr(&r) || r.contains_cidr(c))
        {
            overlapping.insert(r);
        }
        if !skip.iter().any(|s| s.contains_cidr(&r)) {
            want.insert(r);
        }
    }
    CapturePlan {
        want,
        skip,
        overlapping,
    }
}

/// The subnets of this node's IPv4 interface addresses: `addr/len` with its
/// host bits cleared. Loopback and link-local addresses have no LAN
/// neighbours the tunnel could confuse, and a `/32` (a cloud VM's address,
/// a ClusterIP on `kube-ipvs0`, NodeLocal DNSCache's `169.254.20.10`) has
/// none at all, so they are left out. IPv6 is left out because capture is
/// IPv4 only.
pub(crate) fn connected_subnets() -> std::io::Result<BTreeSet<Cidr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let addr = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|a| a.ip());
        let mask = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map(|m| m.ip());
        if let (Some(addr), Some(mask)) = (addr, mask) {
            if let Some(net) = subnet_of(addr.into(), u32::from(mask).leading_ones() as u8) {
                out.insert(net);
            }
        }
    }
    Ok(out)
}

/// `addr/len` as a network, or `None` when it names no LAN worth
/// exempting (see [`connected_subnets`]).
fn subnet_of(addr: IpAddr, len: u8) -> Option<Cidr> {
    let IpAddr::V4(v4) = addr else {
        return None;
    };
    if v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || len == 0 || len >= 32 {
        return None;
    }
    let bits = u32::from(v4) & (u32::MAX << (32 - u32::from(len)));
    Cidr::new(IpAddr::V4(bits.into()), len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn set(v: &[&str]) -> BTreeSet<Cidr> {
        v.iter().map(|s| c(s)).collect()
    }

    #[test]
    fn interface_addresses_become_their_subnets() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(subnet_of(ip("192.168.1.10"), 24), Some(c("192.168.1.0/24")));
        assert_eq!(subnet_of(ip("10.244.7.1"), 24), Some(c("10.244.7.0/24")));
        // No neighbours: a single address, loopback, link-local, no mask.
        for (a, len) in [
            ("10.128.0.7", 32),
            ("127.0.0.1", 8),
            ("169.254.20.10", 16),
            ("192.168.1.10", 0),
            ("fd00::1", 64),
        ] {
            assert_eq!(subnet_of(ip(a), len), None, "{a}/{len}");
        }
    }

    #[test]
    fn routes_inside_the_lan_are_not_captured_and_wider_ones_exempt_it() {
        let lan = set(&["192.168.1.0/24", "10.244.7.0/24"]);
        let p = plan(
            set(&[
                "10.244.1.0/24",   // a cloud pod CIDR
                "10.244.8.0/24",   // the other site's pods
                "192.168.1.20/32", // another site's host, inside our LAN
                "192.168.1.0/24",  // a cloud range equal to our LAN
                "192.168.0.0/16",  // a cloud range containing our LAN
                "10.96.0.0/12",
            ]),
            set(&["10.244.7.0/24"]),
            &lan,
        );
        assert_eq!(
            p.want,
            set(&[
                "10.244.1.0/24",
                "10.244.8.0/24",
                "192.168.0.0/16",
                "10.96.0.0/12"
            ])
        );
        assert_eq!(p.skip, set(&["10.244.7.0/24", "192.168.1.0/24"]));
        assert_eq!(
            p.overlapping,
            set(&["192.168.1.20/32", "192.168.1.0/24", "192.168.0.0/16"])
        );
    }

    #[test]
    fn without_a_connected_overlap_the_plan_is_the_routes_minus_what_is_served() {
        let p = plan(
            set(&["10.244.0.0/16", "10.244.8.0/24", "192.168.2.10/32"]),
            set(&["10.244.7.0/24", "192.168.1.10/32"]),
            &set(&["192.168.1.0/24", "10.244.7.0/24"]),
        );
        // The cluster range stays captured with this node's pods exempt.
        assert_eq!(
            p.want,
            set(&["10.244.0.0/16", "10.244.8.0/24", "192.168.2.10/32"])
        );
        assert!(p.overlapping.is_empty());
    }

    #[test]
    fn this_hosts_interfaces_list_no_loopback() {
        let subnets = connected_subnets().unwrap();
        assert!(subnets
            .iter()
            .all(|s| !s.contains(&"127.0.0.1".parse().unwrap())));
    }
}
