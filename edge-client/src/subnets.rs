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
//!
//! The same holds for IPv6, which capture does not capture but refuses
//! (`relay_transport::capture::Capture::refuse_ipv6`): the plan's IPv6
//! prefixes are refused, its IPv6 skips (served prefixes, connected IPv6
//! subnets) are not, so a site's IPv6 LAN inside a cloud IPv6 range is
//! still reached on the LAN.
//!
//! For IPv6 only, the destinations of the main routing table's routes
//! other than the default one count as LANs too ([`Lans`]): the refusal
//! is of what would leave by the default route, and such a route takes
//! it elsewhere (the site router's route to another VLAN, where another
//! edge's IPv6 Node address is a tunnel route here; a site VPN's subnet;
//! a router advertisement's on-link `/64` for a DHCPv6 address, itself a
//! `/128` its interface lists). So they are left alone as before the
//! refusal, and a tunnel route they shadow is named as an overlap. IPv4
//! is not changed by them: capture takes IPv4 inside such routes as ever.

use std::collections::BTreeSet;
use std::net::IpAddr;

use relay_protocol::Cidr;
use tracing::{debug, warn};

/// What the node's own networking reaches without the tunnel, kept
/// between the edge's capture passes: its connected subnets (read on
/// every pass) and, while the IPv6 refusal is asked for, the main
/// routing table's IPv6 routes other than the default one (read on the
/// first pass and on each 10 s recheck: `ip`, a process). On a failed
/// read the last known ones stay.
#[derive(Debug, Default)]
pub(crate) struct Lans {
    /// [`connected_subnets`].
    connected: BTreeSet<Cidr>,
    /// `relay_transport::capture::routed_ipv6`.
    routed6: BTreeSet<Cidr>,
    /// Whether `routed6` was read (or tried) yet.
    routes_read: bool,
    /// Whether the last read of `routed6` failed (warned once per run of
    /// failures).
    routes_failing: bool,
}

impl Lans {
    /// Reads the interface subnets again, and the IPv6 routes too on the
    /// first call and when `tick` (the 10 s recheck), when `refuse6` (the
    /// edge's `capture.refuse_ipv6`: they matter to the refusal only).
    pub(crate) async fn recheck(&mut self, tick: bool, refuse6: bool) {
        match connected_subnets() {
            Ok(now) => self.connected = now,
            Err(e) => {
                warn!(error = %e, "cannot list interface addresses; keeping the last known LANs")
            }
        }
        if !refuse6 || (self.routes_read && !tick) {
            return;
        }
        self.routes_read = true;
        match relay_transport::capture::routed_ipv6().await {
            Ok(now) => {
                self.routed6 = now;
                self.routes_failing = false;
            }
            Err(e) if !std::mem::replace(&mut self.routes_failing, true) => {
                warn!(error = %e, "cannot list the IPv6 routes; keeping the last known ones")
            }
            Err(e) => debug!(error = %e, "cannot list the IPv6 routes"),
        }
    }

    /// The LANs for [`plan`]: the connected subnets, the routed IPv6
    /// prefixes and, with them, the carrier's NAT64 prefix once
    /// discovered (`crate::nat64::known_prefix`: the well-known ones are
    /// never refused anyway).
    pub(crate) fn all(&self) -> BTreeSet<Cidr> {
        let nat64 = self.routes_read.then(crate::nat64::known_prefix).flatten();
        self.connected
            .union(&self.routed6)
            .copied()
            .chain(nat64)
            .collect()
    }
}

/// The capture an edge installs: the prefixes sent to the relay and the
/// prefixes exempt from capture even inside a captured one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CapturePlan {
    /// Captured prefixes (the IPv6 ones refused: see the module docs).
    pub(crate) want: BTreeSet<Cidr>,
    /// Never captured (nor refused): what the node serves and its
    /// connected subnets (and, IPv6 only, its routed prefixes: [`Lans`]).
    pub(crate) skip: BTreeSet<Cidr>,
    /// Tunnel routes that overlap a connected subnet (or an IPv6 route of
    /// the node's, [`Lans`]) other than a served one (left out, or with
    /// the subnet exempt inside them): worth a log
    /// line, since that part of the cloud's range is unreachable from this
    /// node.
    pub(crate) overlapping: BTreeSet<Cidr>,
}

/// Plans the capture from the relay's tunnel routes, what this node serves
/// and its LANs ([`Lans::all`]: its connected subnets, and its IPv6
/// routes). A tunnel route inside a served prefix or a LAN is not
/// captured (nor refused) at all; one that contains them is captured
/// (refused, for IPv6) with them exempt.
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

/// The subnets of this node's interface addresses, IPv4 and IPv6:
/// `addr/len` with its host bits cleared. Loopback and link-local
/// addresses have no LAN neighbours the tunnel could confuse, and a `/32`
/// or `/128` (a cloud VM's address, a ClusterIP on `kube-ipvs0`, NodeLocal
/// DNSCache's `169.254.20.10`) has none at all, so they are left out.
/// IPv6 subnets are what capture's IPv6 refusal leaves alone (see the
/// module docs).
pub(crate) fn connected_subnets() -> std::io::Result<BTreeSet<Cidr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let (Some(addr), Some(mask)) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else {
            continue;
        };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            subnet_of(a.ip().into(), u32::from(m.ip()).leading_ones() as u8)
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            subnet_of(a.ip().into(), u128::from(m.ip()).leading_ones() as u8)
        } else {
            None
        };
        out.extend(net);
    }
    Ok(out)
}

/// `addr/len` as a network, or `None` when it names no LAN worth
/// exempting (see [`connected_subnets`]).
fn subnet_of(addr: IpAddr, len: u8) -> Option<Cidr> {
    let (no_lan, max) = match addr {
        IpAddr::V4(v4) => (v4.is_loopback() || v4.is_link_local(), 32),
        // Link-local (fe80::/10) and multicast have no neighbours to tell
        // from the cloud's; the refusal never refuses them anyway.
        IpAddr::V6(v6) => (
            v6.is_loopback() || v6.is_unicast_link_local() || v6.is_multicast(),
            128,
        ),
    };
    if no_lan || addr.is_unspecified() || len == 0 || len >= max {
        return None;
    }
    Cidr::containing(addr, len)
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
            ("fe80::1", 64),
            ("::1", 128),
            ("2001:db8::7", 128),
            ("ff02::1", 16),
            ("fd00::1", 0),
        ] {
            assert_eq!(subnet_of(ip(a), len), None, "{a}/{len}");
        }
        // IPv6 LANs too: what capture's IPv6 refusal leaves alone.
        assert_eq!(subnet_of(ip("fd00:5::1"), 64), Some(c("fd00:5::/64")));
        assert_eq!(
            subnet_of(ip("2001:db8:1:2:3::9"), 64),
            Some(c("2001:db8:1:2::/64"))
        );
    }

    /// A dual-stack edge: the IPv6 tunnel routes are planned as IPv4's
    /// (and refused, not captured): the node's IPv6 pod CIDR and IPv6 LAN
    /// inside a cloud range are exempt, a route inside the LAN is left
    /// out and named as an overlap.
    #[test]
    fn ipv6_routes_are_planned_as_ipv4_ones() {
        let lan = set(&["192.168.1.0/24", "fd00:5::/64", "fd00:44::/64"]);
        let p = plan(
            set(&[
                "10.244.1.0/24",
                "fd00:10:244::/56", // the cluster's IPv6 pod range
                "fd00::/16",        // a cloud range holding the site's LAN
                "fd00:5::20/128",   // another site's host inside our LAN
                "2001:db8:cafe::/48",
            ]),
            set(&["10.244.7.0/24", "fd00:44::/64"]),
            &lan,
        );
        assert_eq!(
            p.want,
            set(&[
                "10.244.1.0/24",
                "fd00:10:244::/56",
                "fd00::/16",
                "2001:db8:cafe::/48"
            ])
        );
        assert_eq!(
            p.skip,
            set(&[
                "10.244.7.0/24",
                "fd00:44::/64",
                "192.168.1.0/24",
                "fd00:5::/64"
            ])
        );
        assert_eq!(p.overlapping, set(&["fd00::/16", "fd00:5::20/128"]));
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

    /// In a network namespace of the test's own (a thread's, gone with
    /// it): an interface's IPv6 `/64` is listed, its link-local address
    /// and a `/128` are not, as IPv4's. Needs root: skipped without,
    /// a failure under `REQUIRE_LAB=1` or `CI=true`.
    #[test]
    fn ipv6_interface_subnets_are_listed() {
        if !nix::unistd::geteuid().is_root() {
            return relay_transport::test_netns::skip("the namespace test needs root");
        }
        let listed = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ns = |p: &str| std::fs::read_link(p).ok();
            let own = ns("/proc/thread-self/ns/net");
            assert!(
                own.is_some() && own != ns("/proc/1/ns/net"),
                "not a namespace of our own"
            );
            for cmd in [
                "link add d0 type veth peer name d1",
                "link set d1 up",
                "-6 addr add fd00:5::1/64 dev d0 nodad",
                "-6 addr add 2001:db8::7/128 dev d0 nodad",
                "addr add 192.168.1.10/24 dev d0",
                "link set d0 up",
            ] {
                let out = std::process::Command::new("ip")
                    .args(cmd.split(' '))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {cmd}: {out:?}");
            }
            connected_subnets().unwrap()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
        assert_eq!(listed, set(&["192.168.1.0/24", "fd00:5::/64"]));
    }

    #[test]
    fn this_hosts_interfaces_list_no_loopback() {
        let subnets = connected_subnets().unwrap();
        for local in ["127.0.0.1", "::1", "fe80::1"] {
            let a = local.parse().unwrap();
            assert!(subnets.iter().all(|s| !s.contains(&a)), "{local}");
        }
    }
}
