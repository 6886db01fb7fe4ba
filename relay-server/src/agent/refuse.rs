//! The filter that keeps an agent from taking over this node's own
//! traffic: an edge prefix holding one of this node's addresses or a next
//! hop is refused ([`refuse_prefixes`]), every poll ([`Refusals`], which
//! warns and counts), and a killed run's routes it would refuse are
//! removed at start ([`remove_refused_leftovers`]).
//!
//! Apart from the loop because both agents, the single-relay one and the
//! multipath one ([`crate::multipath`]), run every poll's prefixes
//! through it: behind a rule ahead of `main` ([`RouteTable`]), such a
//! prefix would send this node's traffic for its own subnet to the relay.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use relay_protocol::Cidr;
use tracing::{info, warn};

use super::status::AgentStatus;
use super::{ip, parse_routes, show_table, RouteTable};

/// This node's IPv4 interface addresses, except kube-proxy's ClusterIPs
/// ([`relay_transport::node_addrs::node_ipv4_addresses`]).
pub(crate) fn own_addrs() -> anyhow::Result<Vec<IpAddr>> {
    let own = relay_transport::node_addrs::node_ipv4_addresses()
        .map_err(|e| anyhow::anyhow!("listing this node's addresses (getifaddrs): {e}"))?;
    Ok(own.into_iter().map(IpAddr::from).collect())
}

/// Splits `want` into the prefixes safe to route and those refused, each
/// with the first address of `keep` it contains. `keep` is what must not
/// be sent to the relay: this node's own addresses and the next hops the
/// routes go through (a route for a prefix holding its own gateway would
/// resolve that gateway through itself).
///
/// This node's own addresses are matched by the `local` table, whose rule
/// (priority 0) comes before ours, so their own traffic stays anyway; what
/// refusing a prefix holding one protects is the rest of the subnet it
/// covers: this node's neighbours (the apiserver, the relay node among
/// them), which `main`'s connected route reaches and our rule ahead of
/// `main` would send to the relay whatever the prefix lengths.
///
/// Not quadratic: for each address of `keep`, one set lookup per prefix
/// length present in `want` (at most 33 for IPv4), whatever the number
/// of prefixes.
pub fn refuse_prefixes(
    want: &BTreeSet<Cidr>,
    keep: &[IpAddr],
) -> (BTreeSet<Cidr>, BTreeMap<Cidr, IpAddr>) {
    let lens: BTreeSet<u8> = want.iter().map(Cidr::prefix_len).collect();
    let mut refused = BTreeMap::new();
    for a in keep {
        for len in &lens {
            // `None`: longer than the address (an IPv6 prefix length).
            if let Some(c) = Cidr::containing(*a, *len) {
                if want.contains(&c) {
                    refused.entry(c).or_insert(*a);
                }
            }
        }
    }
    let ok = want
        .iter()
        .filter(|c| !refused.contains_key(*c))
        .copied()
        .collect();
    (ok, refused)
}

/// At start, before the first poll: removes the routes of protocol
/// `proto` that a previous run (killed, so it did not remove them on
/// exit) left in `table` and that [`refuse_prefixes`] would refuse, with
/// this node's addresses and `hops` (the next hops) to keep; nothing else.
/// Such a route, behind the rule the previous run also left, could send
/// this node's traffic to the relay node (the admin API included), and
/// so keep the poll that would remove it from ever succeeding. The other
/// leftovers stay, as does the rule: while the relay is unreachable they
/// keep sending edge traffic to the relay node, as the routes of a
/// running agent do; the first successful poll brings them in step.
pub(crate) async fn remove_refused_leftovers(table: RouteTable, proto: u8, hops: &[IpAddr]) {
    let removed = async {
        let have = parse_routes(&show_table(table.table, proto).await?);
        if have.is_empty() {
            return anyhow::Ok(BTreeMap::new());
        }
        let mut keep = own_addrs()?;
        keep.extend(hops);
        let (_, refused) = refuse_prefixes(&have.keys().copied().collect(), &keep);
        let batch: String = refused
            .keys()
            .map(|c| format!("route del {c} proto {proto} table {}\n", table.table))
            .collect();
        if !batch.is_empty() {
            ip(&["-4", "-force", "-batch", "-"], Some(&batch)).await?;
        }
        Ok(refused)
    };
    match removed.await {
        Ok(refused) => {
            for (c, a) in refused {
                info!(prefix = %c, contains = %a, table = table.table, "removed a previous run's route holding this node's own address or a next hop");
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "removing a previous run's routes that hold this node's addresses failed")
        }
    }
}

/// [`refuse_prefixes`] for an agent's loop: warns once per refused prefix
/// (again only if it was accepted in between) and records how many the
/// poll refused in `status`.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    warned: BTreeSet<Cidr>,
}

impl Refusals {
    /// The prefixes of `want` that contain none of `keep`.
    pub(crate) fn filter(
        &mut self,
        want: &BTreeSet<Cidr>,
        keep: &[IpAddr],
        status: &AgentStatus,
    ) -> BTreeSet<Cidr> {
        let (ok, refused) = refuse_prefixes(want, keep);
        for (c, a) in &refused {
            if !self.warned.contains(c) {
                warn!(prefix = %c, contains = %a, "refusing to route an edge prefix holding this node's own address or the next hop (it would take over this node's own traffic); fix the relay's [nodes] or the edge's routes");
            }
        }
        self.warned = refused.keys().copied().collect();
        status.refused(refused.len());
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::status;
    use crate::agent::tests::c;

    /// An edge prefix holding this node's address (its subnet, its
    /// neighbours) or the next hop is refused; another host's /32 is not.
    #[test]
    fn prefixes_holding_this_nodes_addresses_or_the_next_hop_are_refused() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // As `own_addrs` lists them: lo, eth0, flannel.1; not kube-proxy
        // IPVS's ClusterIPs (10.96.0.1 and .10 on kube-ipvs0).
        let own = [ip("127.0.0.1"), ip("10.0.3.17"), ip("10.244.3.0")];
        let via = ip("192.168.9.1");
        let keep: Vec<IpAddr> = own.iter().copied().chain([via]).collect();
        for (prefix, refused_for) in [
            // `[nodes]` listing the VPC's range: this node's own subnet.
            ("10.0.0.0/16", Some("10.0.3.17")),
            ("0.0.0.0/0", Some("127.0.0.1")),
            // The cluster's whole pod range, this node's block in it.
            ("10.244.0.0/16", Some("10.244.3.0")),
            // The next hop inside.
            ("192.168.0.0/16", Some("192.168.9.1")),
            ("192.168.9.1/32", Some("192.168.9.1")),
            // A neighbour's /32, an edge's pod block: fine.
            ("10.0.3.18/32", None),
            ("10.245.7.0/24", None),
            // The service range, whose ClusterIPs kube-ipvs0 holds: the
            // `local` table answers for those whatever our rule routes.
            ("10.96.0.0/12", None),
        ] {
            let want = BTreeSet::from([c(prefix)]);
            let (ok, refused) = refuse_prefixes(&want, &keep);
            match refused_for {
                Some(a) => {
                    assert!(ok.is_empty(), "{prefix} accepted");
                    assert_eq!(refused.get(&c(prefix)), Some(&ip(a)), "{prefix}");
                }
                None => {
                    assert_eq!(ok, want, "{prefix} refused");
                    assert!(refused.is_empty());
                }
            }
        }
        // The filter counts what it refused, every poll.
        let status = status::AgentStatus::default();
        let mut r = Refusals::default();
        let want = BTreeSet::from([c("10.0.0.0/16"), c("10.245.7.0/24")]);
        assert_eq!(
            r.filter(&want, &keep, &status),
            BTreeSet::from([c("10.245.7.0/24")])
        );
        assert!(status
            .render()
            .contains("\nroute_agent_prefixes_refused 1\n"));
        r.filter(&BTreeSet::from([c("10.245.7.0/24")]), &keep, &status);
        assert!(status
            .render()
            .contains("\nroute_agent_prefixes_refused 0\n"));
    }

    /// The refusal's lookup by prefix length refuses what a scan of every
    /// prefix against every address does, naming the same (first) address.
    #[test]
    fn the_refusal_lookup_agrees_with_a_scan() {
        let mut x: u32 = 0x2545_f491;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        // Addresses and prefixes crowded into 10.0.0.0/20, so that many
        // prefixes hold several addresses.
        let keep: Vec<IpAddr> = (0..300)
            .map(|_| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (next() & 0xfff))))
            .chain(["192.0.2.1".parse().unwrap(), "::1".parse().unwrap()])
            .collect();
        let want: BTreeSet<Cidr> = (0..2000)
            .filter_map(|_| {
                let len = (next() % 33) as u8;
                let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (next() & 0xfff)));
                Cidr::containing(a, len)
            })
            .chain([c("2001:db8::/32")])
            .collect();
        let (ok, refused) = refuse_prefixes(&want, &keep);
        assert!(!ok.is_empty() && !refused.is_empty());
        for p in &want {
            let scan = keep.iter().find(|a| p.contains(a));
            assert_eq!(refused.get(p), scan, "{p}");
            assert_eq!(ok.contains(p), scan.is_none(), "{p}");
        }
    }
}
