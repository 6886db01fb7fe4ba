//! The parts of the lab that [`LabOptions`] may repeat: edge sites (a NAT,
//! an edge host behind it, a pod on the edge host) and relay hosts (cloud
//! nodes on both the cloud LAN and the WAN, as the relay node is).
//!
//! | role      | addresses                                        | routes |
//! |-----------|--------------------------------------------------|--------|
//! | `relay{i}` (i = 2, 3) | lan0 10.0.0.1{i}, wan0 198.18.0.{i} | 10.244.1.0/24 via 10.0.0.1; 10.244.2.0/24 via 10.0.0.2; default via 198.18.0.254 |
//! | `nat3`    | wan0 198.18.0.13, lan0 192.168.3.1               | 10.244.9.0/24 via 192.168.3.10; default via 198.18.0.254 |
//! | `edge3`   | eth0 192.168.3.10, cni0 10.244.9.1               | default via 192.168.3.1 |
//! | `epod3`   | eth0 10.244.9.5                                  | default via 10.244.9.1 |
//!
//! A relay host is what a cloud node running a relay replica is: the cloud
//! LAN (flannel host-gw routes to the pod CIDRs of the other nodes), a
//! public address on the WAN (the one edges dial, `198.18.0.{i}` as
//! [`crate::replicas::wan`] numbers replicas), a default route to the
//! upstream gateway, forwarding on, and kube-proxy. It has no pods: none
//! of the tests needs one there. The edge pod CIDR of site 3 follows the
//! others' numbering (`10.244.{6+site}.0/24`); tests that invent a Node
//! with that CIDR do so in the default topology only, where it is free.
//!
//! Every namespace here is listed by [`NetnsLab::roles`] only when built,
//! so the lab's drop deletes exactly those.

use std::net::Ipv4Addr;

use anyhow::Result;

use super::{
    edge_pod_cidr, edge_pod_gw, edge_pod_ip, nat_wan_ip, LabOptions, NetnsLab, Role, CLOUD2_LAN_IP,
    CPOD1_CIDR, CPOD2_CIDR, KUBE_PROXY_NODES, RELAY_LAN_IP, WAN_GW,
};

/// Relay host `i`'s (1-based) cloud-LAN address: the relay node's
/// (10.0.0.1) for 1, `10.0.0.1{i}` for the others (10.0.0.2 and .3 are
/// cloud2 and the apiserver host).
pub fn relay_host_lan_ip(i: u8) -> Ipv4Addr {
    if i == 1 {
        RELAY_LAN_IP
    } else {
        Ipv4Addr::new(10, 0, 0, 10 + i)
    }
}

impl Role {
    /// The NAT of edge site `site` (1 to 3).
    pub fn nat(site: u8) -> Result<Role> {
        Role::of_site(site, [Role::Nat1, Role::Nat2, Role::Nat3])
    }

    /// The edge host of site `site` (1 to 3).
    pub fn edge(site: u8) -> Result<Role> {
        Role::of_site(site, [Role::Edge1, Role::Edge2, Role::Edge3])
    }

    /// The edge pod of site `site` (1 to 3).
    pub fn epod(site: u8) -> Result<Role> {
        Role::of_site(site, [Role::Epod1, Role::Epod2, Role::Epod3])
    }

    fn of_site(site: u8, roles: [Role; 3]) -> Result<Role> {
        match site {
            1..=3 => Ok(roles[usize::from(site - 1)]),
            _ => anyhow::bail!("no edge site {site} (sites are 1 to 3)"),
        }
    }
}

impl LabOptions {
    /// Fails on values the lab cannot build.
    pub(super) fn check(&self) -> Result<()> {
        anyhow::ensure!(
            (1..=3).contains(&self.relay_hosts),
            "relay_hosts = {}: the lab has 1 to 3 relay hosts",
            self.relay_hosts
        );
        anyhow::ensure!(
            (2..=3).contains(&self.sites),
            "sites = {}: the lab has 2 or 3 edge sites",
            self.sites
        );
        anyhow::ensure!(
            !(self.repeated_lans && self.sites > 2),
            "repeated_lans is a two-site topology"
        );
        Ok(())
    }
}

impl NetnsLab {
    /// The edge sites of this lab (`1..=sites`).
    pub fn sites(&self) -> Vec<u8> {
        (1..=self.opts.sites).collect()
    }

    /// The relay hosts of this lab: [`Role::Relay`], then `relay2` and
    /// `relay3` when built.
    pub fn relay_hosts(&self) -> Vec<Role> {
        [Role::Relay, Role::Relay2, Role::Relay3][..usize::from(self.opts.relay_hosts)].to_vec()
    }

    /// Every role this lab has, in creation order: [`Role::ALL`], then the
    /// options' extra roles.
    pub fn roles(&self) -> Vec<Role> {
        let mut v = Role::ALL.to_vec();
        v.extend(self.relay_hosts().into_iter().skip(1));
        if self.opts.sites > 2 {
            v.extend([Role::Nat3, Role::Edge3, Role::Epod3]);
        }
        v
    }

    /// The nodes of this lab that run kube-proxy: [`KUBE_PROXY_NODES`],
    /// the extra relay hosts and edge host 3 when built.
    pub fn kube_proxy_nodes(&self) -> Vec<Role> {
        let mut v = KUBE_PROXY_NODES.to_vec();
        v.extend(self.relay_hosts().into_iter().skip(1));
        if self.opts.sites > 2 {
            v.push(Role::Edge3);
        }
        v
    }

    /// A bridge `br` in `role`, up.
    pub(super) fn bridge(&self, role: Role, br: &str) -> Result<()> {
        self.ip(role, &format!("link add {br} type bridge"))?;
        self.ip(role, &format!("link set {br} up"))?;
        Ok(())
    }

    /// A pod: a veth whose node end is a port of the node's `cni0` bridge
    /// (whose address is the pod's gateway), so more pods could join the
    /// same segment later.
    pub(super) fn pod(&self, node: Role, pod: Role, gw: Ipv4Addr, ip: Ipv4Addr) -> Result<()> {
        if self.opts.routed_pods {
            return self.routed_pod(node, pod, ip);
        }
        self.ip(node, &format!("addr add {gw}/24 dev cni0"))?;
        self.veth(pod, "eth0", node, "vpod", Some("cni0"))?;
        self.ip(pod, &format!("addr add {ip}/24 dev eth0"))?;
        self.ip(pod, &format!("route add default via {gw}"))?;
        Ok(())
    }

    /// A pod wired as Calico wires one ([`super::LabOptions::routed_pods`]):
    /// the node end of its veth has no address and proxy-ARPs for the
    /// pod's gateway, `169.254.1.1`, which exists nowhere.
    fn routed_pod(&self, node: Role, pod: Role, ip: Ipv4Addr) -> Result<()> {
        self.veth(pod, "eth0", node, "vpod", None)?;
        self.exec(node, &["sysctl", "-qw", "net.ipv4.conf.vpod.proxy_arp=1"])?;
        self.ip(node, &format!("route add {ip}/32 dev vpod"))?;
        self.ip(pod, &format!("addr add {ip}/32 dev eth0"))?;
        self.ip(pod, "route add 169.254.1.1 dev eth0 scope link")?;
        self.ip(pod, "route add default via 169.254.1.1 dev eth0")?;
        Ok(())
    }

    /// Edge site `site`: its NAT on the WAN, the edge host on the NAT's
    /// LAN, and a pod on the edge host.
    pub(super) fn build_site(&self, site: u8) -> Result<()> {
        let (nat, edge) = (Role::nat(site)?, Role::edge(site)?);
        self.veth(nat, "wan0", Role::Wan, nat.as_str(), Some("br0"))?;
        self.ip(nat, &format!("addr add {}/24 dev wan0", nat_wan_ip(site)))?;
        self.ip(nat, &format!("route add default via {WAN_GW}"))?;
        self.veth(edge, "eth0", nat, "lan0", None)?;
        let (gw, host) = (self.nat_lan_ip(site), self.edge_host_ip(site));
        self.ip(nat, &format!("addr add {gw}/24 dev lan0"))?;
        self.ip(edge, &format!("addr add {host}/24 dev eth0"))?;
        self.ip(edge, &format!("route add default via {gw}"))?;
        // The site router knows the pod CIDR behind the edge host (a
        // static route), so replies to edge pods find their way back after
        // de-masquerading.
        self.ip(
            nat,
            &format!("route add {} via {host}", edge_pod_cidr(site)),
        )?;
        self.nft(nat, &nat_ruleset())?;
        self.bridge(edge, "cni0")?;
        self.pod(
            edge,
            Role::epod(site)?,
            edge_pod_gw(site),
            edge_pod_ip(site),
        )?;
        for role in [nat, edge] {
            self.exec(role, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        Ok(())
    }

    /// Relay host `i` (2 or 3): on the cloud LAN and the WAN, routes to
    /// the cloud pod CIDRs, default route to the upstream gateway.
    pub(super) fn build_relay_host(&self, i: u8) -> Result<()> {
        let role = self.relay_hosts()[usize::from(i - 1)];
        let port = role.as_str();
        self.veth(role, "lan0", Role::Switch, port, Some("br0"))?;
        self.ip(
            role,
            &format!("addr add {}/24 dev lan0", relay_host_lan_ip(i)),
        )?;
        self.veth(role, "wan0", Role::Wan, port, Some("br0"))?;
        let wan = Ipv4Addr::new(198, 18, 0, i);
        self.ip(role, &format!("addr add {wan}/24 dev wan0"))?;
        self.ip(role, &format!("route add {CPOD1_CIDR} via {RELAY_LAN_IP}"))?;
        self.ip(role, &format!("route add {CPOD2_CIDR} via {CLOUD2_LAN_IP}"))?;
        self.ip(role, &format!("route add default via {WAN_GW}"))?;
        self.exec(role, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }
}

/// The edge NAT: masquerade out of the WAN, nothing new in from it. The
/// `faults` chain runs first so a UDP block also hits established flows.
pub(super) fn nat_ruleset() -> String {
    "table ip natlab {\n\
       chain faults {\n\
       }\n\
       chain forward {\n\
         type filter hook forward priority filter; policy accept;\n\
         jump faults\n\
         ct state established,related accept\n\
         iifname \"wan0\" drop\n\
       }\n\
       chain postrouting {\n\
         type nat hook postrouting priority srcnat;\n\
         oifname \"wan0\" masquerade\n\
       }\n\
     }\n"
    .to_string()
}
