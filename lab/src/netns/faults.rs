//! Faults the lab injects on an edge site: UDP, or everything the edge
//! sends, dropped at its NAT; the NAT's mappings forgotten or rebound to
//! another address; the edge host's uplink down and up again.
//!
//! They act on the NAT's `ip natlab` table (its `faults` and `postrouting`
//! chains, see `hosts.rs`) and on the edge host's `eth0`; kept apart from
//! the plumbing that builds the topology, which they only change.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use super::{nat_wan_ip, NetnsLab, Role, WAN};

impl NetnsLab {
    /// Fault: NAT `site` drops all forwarded UDP to and from the WAN (QUIC
    /// blocked, TCP still passes).
    pub fn block_udp(&self, site: u8) -> Result<()> {
        let nat = Role::nat(site)?;
        self.nft(
            nat,
            "add rule ip natlab faults oifname \"wan0\" meta l4proto udp drop\n\
             add rule ip natlab faults iifname \"wan0\" meta l4proto udp drop\n",
        )
    }

    /// Fault: NAT `site` drops everything its edge sends to the WAN; what
    /// comes back for existing flows still arrives (a path dead only
    /// upstream, as an uplink whose transmit side has failed).
    pub fn drop_upstream(&self, site: u8) -> Result<()> {
        self.nft(
            Role::nat(site)?,
            "add rule ip natlab faults oifname \"wan0\" drop\n",
        )
    }

    /// Undoes [`NetnsLab::block_udp`] and [`NetnsLab::drop_upstream`].
    pub fn clear_nat_faults(&self, site: u8) -> Result<()> {
        self.nft(Role::nat(site)?, "flush chain ip natlab faults\n")
    }

    /// Fault: NAT `site` forgets every mapping, so the next packet of an
    /// existing flow gets a fresh one (same address, port usually kept).
    pub fn flush_conntrack(&self, site: u8) -> Result<()> {
        self.exec(Role::nat(site)?, &["conntrack", "-F"]).map(drop)
    }

    /// Fault: NAT rebinding. NAT `site` starts translating to `new_ip` (a
    /// free address in 198.18.0.0/24, added to its WAN interface) and
    /// forgets existing mappings, so the relay sees the edge's flows from a
    /// new address. Passing [`nat_wan_ip`]`(site)` restores plain
    /// masquerade.
    pub fn change_masquerade_addr(&self, site: u8, new_ip: Ipv4Addr) -> Result<()> {
        let nat = Role::nat(site)?;
        let o = new_ip.octets();
        if o[..3] != [198, 18, 0] {
            bail!("masquerade address {new_ip} is not on the WAN {WAN}");
        }
        let action = if new_ip == nat_wan_ip(site) {
            "masquerade".to_string()
        } else {
            self.ip(nat, &format!("addr replace {new_ip}/24 dev wan0"))?;
            format!("snat to {new_ip}")
        };
        self.nft(
            nat,
            &format!(
                "flush chain ip natlab postrouting\n\
                 add rule ip natlab postrouting oifname \"wan0\" {action}\n"
            ),
        )?;
        self.flush_conntrack(site)
    }

    /// Fault: edge host `site`'s uplink (its `eth0`) goes down; its
    /// sockets see "network unreachable".
    pub fn link_down(&self, site: u8) -> Result<()> {
        self.ip(Role::edge(site)?, "link set eth0 down").map(drop)
    }

    /// Undoes [`NetnsLab::link_down`], restoring the default route the
    /// kernel removed with the link.
    pub fn link_up(&self, site: u8) -> Result<()> {
        let edge = Role::edge(site)?;
        self.ip(edge, "link set eth0 up")?;
        self.ip(
            edge,
            &format!("route replace default via {}", self.nat_lan_ip(site)),
        )
        .map(drop)
    }
}
