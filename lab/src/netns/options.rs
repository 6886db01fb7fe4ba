//! Topology options of the namespace lab, and the edge-site addresses as
//! the lab that was built with them has them.
//!
//! The default topology gives every site its own LAN (`192.168.{site}.0/24`).
//! Real shops and towers reuse one range, so two edge nodes often share a
//! host address; [`LabOptions::repeated_lans`] builds that world, where the
//! product must route neither twin by its shared address, reach both by
//! name, and keep each site's LAN traffic on the site.

use std::net::Ipv4Addr;

use relay_protocol::Cidr;

use super::{cidr24, edge_pod_cidr, NetnsLab};

/// How [`NetnsLab::with_options`] builds the lab. The default is the
/// topology of the module docs, which every other test relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabOptions {
    /// Both sites on the same LAN, `192.168.1.0/24`: edge hosts both
    /// `192.168.1.10`, NATs both `192.168.1.1` on their LAN side. Each
    /// site is still its own namespace pair behind its own NAT, whose WAN
    /// address stays distinct, so the two LANs are separate networks that
    /// happen to use the same numbers.
    pub repeated_lans: bool,
    /// Relay hosts, 1 to 3 (default 1: the relay node alone). More add
    /// `relay2` and `relay3`, cloud nodes on the cloud LAN and the WAN
    /// like the relay node (see `netns/hosts.rs`), so relay replicas can
    /// each run on a host of their own, with capture.
    pub relay_hosts: u8,
    /// Edge sites, 2 or 3 (default 2). Three add `nat3`, `edge3` and
    /// `epod3`, numbered as the other sites are.
    pub sites: u8,
    /// Pods wired as Calico (and Cilium) wire them: a routed veth whose
    /// node end has no address and answers ARP for the pod's gateway
    /// `169.254.1.1` by proxy ARP, a `/32` route per pod on the node, and
    /// no `cni0` bridge. Every packet from a pod then arrives on an
    /// interface without an IPv4 address. Default: the bridge of the
    /// module docs (flannel's and the bridge plugin's wiring).
    pub routed_pods: bool,
    /// The cloud LAN as a cloud's network (AWS, GCP, Azure): its switch
    /// delivers IPv4 only from and to the addresses of the hosts on it,
    /// and the cloud nodes reach each other's pods through a Flannel-style
    /// VXLAN overlay (`flannel.1`, routes `<pod CIDR> via <VTEP> dev
    /// flannel.1 onlink`) instead of host-gw routes; `cloud2` and the
    /// apiserver host get no routes to the edges (see
    /// `netns/cloud_overlay.rs`). One relay host only.
    pub cloud_overlay: bool,
    /// The upstream gateway drops what it cannot route, silently, as
    /// cloud VPC routers and carriers drop unroutable RFC 1918 traffic
    /// (a `blackhole` default route), instead of answering ICMP "network
    /// unreachable" at once. A connection that leaves by a default route
    /// then hangs through its SYN retries rather than failing fast.
    pub silent_wan: bool,
}

impl Default for LabOptions {
    /// The topology of the module docs.
    fn default() -> Self {
        LabOptions {
            repeated_lans: false,
            relay_hosts: 1,
            sites: 2,
            routed_pods: false,
            cloud_overlay: false,
            silent_wan: false,
        }
    }
}

impl LabOptions {
    /// Fails on combinations with [`LabOptions::cloud_overlay`] the lab
    /// does not build: its fabric and overlay know three cloud nodes.
    pub(super) fn check_cloud_overlay(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !(self.cloud_overlay && self.relay_hosts > 1),
            "cloud_overlay has one relay host (the fabric and the overlay know three cloud nodes)"
        );
        Ok(())
    }
}

impl NetnsLab {
    /// The options the lab was built with.
    pub fn options(&self) -> LabOptions {
        self.opts
    }

    /// The third octet of site `site`'s LAN: its own number, or `1` for
    /// every site when LANs are repeated.
    fn lan_octet(&self, site: u8) -> u8 {
        if self.opts.repeated_lans {
            1
        } else {
            site
        }
    }

    /// Edge host `site`'s address in this lab: `192.168.{site}.10`, or
    /// `192.168.1.10` for both sites with repeated LANs.
    pub fn edge_host_ip(&self, site: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.lan_octet(site), 10)
    }

    /// NAT `site`'s LAN address (the edge host's gateway) in this lab.
    pub fn nat_lan_ip(&self, site: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.lan_octet(site), 1)
    }

    /// Edge site `site`'s LAN in this lab.
    pub fn edge_lan_cidr(&self, site: u8) -> Cidr {
        cidr24(Ipv4Addr::new(192, 168, self.lan_octet(site), 0))
    }

    /// Every edge pod CIDR and edge LAN, each once (two sites with one LAN
    /// range give one entry): what cloud nodes route to the relay node.
    pub fn edge_ranges(&self) -> Vec<Cidr> {
        let mut v = Vec::new();
        for site in self.sites() {
            for net in [edge_pod_cidr(site), self.edge_lan_cidr(site)] {
                if !v.contains(&net) {
                    v.push(net);
                }
            }
        }
        v
    }
}
