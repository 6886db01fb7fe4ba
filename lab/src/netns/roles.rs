//! The lab's addresses and roles: the cloud LAN, WAN and pod constants,
//! the per-site address functions of the default topology, [`Role`] (what
//! each namespace plays) and [`NsRef`] (what names a namespace).
//!
//! They are pure data, kept apart from the code that builds the
//! namespaces so tests and helpers can name hosts and ranges without
//! reading through the plumbing. A lab built with [`LabOptions`] answers
//! for its own topology ([`NetnsLab::edge_host_ip`] and friends); the free
//! functions here describe the default one.

use std::fmt;
use std::net::Ipv4Addr;

use relay_protocol::Cidr;

use super::{relay_host_lan_ip, NetnsLab};
// Named by the docs only.
#[cfg(doc)]
use super::LabOptions;

/// The relay node's cloud-LAN address (cloud-1).
pub const RELAY_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The second cloud node's LAN address.
pub const CLOUD2_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The apiserver host's LAN address.
pub const APISERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// The cloud LAN.
pub const CLOUD_LAN: &str = "10.0.0.0/24";
/// The relay node's public (WAN) address: the one edges dial.
pub const RELAY_WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The WAN.
pub const WAN: &str = "198.18.0.0/24";
/// The upstream gateway on the WAN (in the `wan` namespace): the end of
/// the relay node's and the NATs' default routes.
pub const WAN_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The pod on the relay node.
pub const CPOD1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The relay node's pod gateway (its `cni0`).
pub const CPOD1_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The relay node's pod CIDR.
pub const CPOD1_CIDR: &str = "10.244.1.0/24";
/// The pod on cloud2.
pub const CPOD2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// cloud2's pod gateway (its `cni0`).
pub const CPOD2_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// cloud2's pod CIDR.
pub const CPOD2_CIDR: &str = "10.244.2.0/24";
/// The edge sites of the default topology, numbered as in role and
/// address names (a lab's own: [`NetnsLab::sites`]).
pub const SITES: [u8; 2] = [1, 2];

/// NAT `site`'s public (WAN) address: `198.18.0.1{site}`.
pub fn nat_wan_ip(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + site)
}

/// NAT `site`'s LAN address, the edge host's gateway: `192.168.{site}.1`
/// (default topology; see [`NetnsLab::nat_lan_ip`]).
pub fn nat_lan_ip(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, site, 1)
}

/// Edge host `site`'s address: `192.168.{site}.10` (default topology; see
/// [`NetnsLab::edge_host_ip`]).
pub fn edge_host_ip(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, site, 10)
}

/// Edge site `site`'s LAN (the edge host's node network):
/// `192.168.{site}.0/24` (default topology; see [`NetnsLab::edge_lan_cidr`]).
pub fn edge_lan_cidr(site: u8) -> Cidr {
    cidr24(Ipv4Addr::new(192, 168, site, 0))
}

/// Edge pod `site`'s address: `10.244.{6+site}.5`.
pub fn edge_pod_ip(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 6 + site, 5)
}

/// Edge host `site`'s pod gateway (its `cni0`): `10.244.{6+site}.1`.
pub fn edge_pod_gw(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 6 + site, 1)
}

/// Edge host `site`'s pod CIDR: `10.244.{6+site}.0/24`.
pub fn edge_pod_cidr(site: u8) -> Cidr {
    cidr24(Ipv4Addr::new(10, 244, 6 + site, 0))
}

pub(super) fn cidr24(net: Ipv4Addr) -> Cidr {
    // A /24 is valid for every IPv4 address; `Cidr::new` only rejects
    // prefixes longer than the address.
    Cidr::new(net.into(), 24).expect("/24 is a valid IPv4 prefix")
}

/// What each namespace of the lab plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The cloud LAN's switch (holds only bridge `br0`).
    Switch,
    /// Cloud node 1, where the relay runs: LAN, WAN and pod gateway.
    Relay,
    /// Cloud node 2.
    Cloud2,
    /// The apiserver host on the cloud LAN.
    Apiserver,
    /// A pod on the relay node.
    Cpod1,
    /// A pod on cloud2.
    Cpod2,
    /// The WAN (holds only bridge `br0`).
    Wan,
    /// Edge site 1's NAT router.
    Nat1,
    /// Edge site 2's NAT router.
    Nat2,
    /// Edge host 1 (behind nat1).
    Edge1,
    /// Edge host 2 (behind nat2).
    Edge2,
    /// A pod on edge host 1.
    Epod1,
    /// A pod on edge host 2.
    Epod2,
    /// A second relay host on the cloud LAN ([`LabOptions::relay_hosts`]).
    Relay2,
    /// A third relay host on the cloud LAN ([`LabOptions::relay_hosts`]).
    Relay3,
    /// Edge site 3's NAT router ([`LabOptions::sites`]).
    Nat3,
    /// Edge host 3 (behind nat3).
    Edge3,
    /// A pod on edge host 3.
    Epod3,
}

impl Role {
    /// Every role of the default topology, in creation order (the roles
    /// [`LabOptions`] may add: [`Role::EXTRA`]).
    pub const ALL: [Role; 13] = [
        Role::Switch,
        Role::Relay,
        Role::Cloud2,
        Role::Apiserver,
        Role::Cpod1,
        Role::Cpod2,
        Role::Wan,
        Role::Nat1,
        Role::Nat2,
        Role::Edge1,
        Role::Edge2,
        Role::Epod1,
        Role::Epod2,
    ];

    /// The roles built only when [`LabOptions`] asks for them, after
    /// [`Role::ALL`] (declaration order, so a role's discriminant is its
    /// index in `ALL` followed by `EXTRA`).
    pub const EXTRA: [Role; 5] = [
        Role::Relay2,
        Role::Relay3,
        Role::Nat3,
        Role::Edge3,
        Role::Epod3,
    ];

    /// The short name used as the namespace's suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Switch => "switch",
            Role::Relay => "relay",
            Role::Cloud2 => "cloud2",
            Role::Apiserver => "apiserver",
            Role::Cpod1 => "cpod1",
            Role::Cpod2 => "cpod2",
            Role::Wan => "wan",
            Role::Nat1 => "nat1",
            Role::Nat2 => "nat2",
            Role::Edge1 => "edge1",
            Role::Edge2 => "edge2",
            Role::Epod1 => "epod1",
            Role::Epod2 => "epod2",
            Role::Relay2 => "relay2",
            Role::Relay3 => "relay3",
            Role::Nat3 => "nat3",
            Role::Edge3 => "edge3",
            Role::Epod3 => "epod3",
        }
    }

    /// The role's main address: the one other hosts would dial (the LAN
    /// address for cloud nodes), or `None` for the pure-L2 `switch` and
    /// `wan`. Edge hosts' addresses are the default topology's (a lab with
    /// repeated LANs: [`NetnsLab::edge_host_ip`]).
    pub fn ip(self) -> Option<Ipv4Addr> {
        Some(match self {
            Role::Switch | Role::Wan => return None,
            Role::Relay => RELAY_LAN_IP,
            Role::Cloud2 => CLOUD2_LAN_IP,
            Role::Apiserver => APISERVER_IP,
            Role::Cpod1 => CPOD1_IP,
            Role::Cpod2 => CPOD2_IP,
            Role::Nat1 => nat_wan_ip(1),
            Role::Nat2 => nat_wan_ip(2),
            Role::Edge1 => edge_host_ip(1),
            Role::Edge2 => edge_host_ip(2),
            Role::Epod1 => edge_pod_ip(1),
            Role::Epod2 => edge_pod_ip(2),
            Role::Relay2 => relay_host_lan_ip(2),
            Role::Relay3 => relay_host_lan_ip(3),
            Role::Nat3 => nat_wan_ip(3),
            Role::Edge3 => edge_host_ip(3),
            Role::Epod3 => edge_pod_ip(3),
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something naming a namespace: a lab [`Role`] or a namespace name.
pub trait NsRef {
    /// The namespace's name (as in `ip netns list`).
    fn ns_name<'a>(&'a self, lab: &'a NetnsLab) -> &'a str;
}

impl NsRef for Role {
    fn ns_name<'a>(&'a self, lab: &'a NetnsLab) -> &'a str {
        lab.ns(*self)
    }
}

impl NsRef for &str {
    fn ns_name<'a>(&'a self, _lab: &'a NetnsLab) -> &'a str {
        self
    }
}

impl NsRef for String {
    fn ns_name<'a>(&'a self, _lab: &'a NetnsLab) -> &'a str {
        self
    }
}
