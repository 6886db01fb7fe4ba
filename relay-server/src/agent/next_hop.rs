//! Where the single-relay agent's routes point: the target given on the
//! command line ([`Toward`]), the next hop resolved from it every poll
//! ([`NextHop`]; for `--via-pod-network`, copied from the route the CNI
//! holds toward the relay node's pods), and the address probed for a pod
//! range ([`pod_network_probe`]).
//!
//! Apart from the loop because this is where the agent reads the CNI's
//! routes: what it copies and what it refuses (the default route, a local
//! or blackhole route, multipath) is decided from `ip` output alone, and
//! tested so.

use std::fmt::Write;
use std::net::IpAddr;

use relay_protocol::Cidr;

use super::ip;

/// Where the agent sends edge prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// `<prefix> via <addr>`, out of whichever interface reaches `addr`
    /// (`--via`): the relay node's address on a network that delivers
    /// any destination to its MAC.
    Via(IpAddr),
    /// The route this node has for `addr`, an address in the relay node's
    /// pod range (`--via-pod-network`): same gateway, device and `onlink`
    /// flag, looked up again every poll (`ip route get fibmatch`).
    PodNetwork(IpAddr),
}

/// A route's next hop: what the agent installs, or reads back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Gateway (`via`); `None`: a device route.
    pub via: Option<IpAddr>,
    /// Output device (`dev`); `None`: the kernel picks it from `via`.
    pub dev: Option<String>,
    /// The gateway is reachable on `dev` without a connected route (as
    /// overlay CNIs install their tunnel routes).
    pub onlink: bool,
}

impl NextHop {
    /// Reads the next hop from the words of an `ip route` line (the
    /// prefix and anything unrelated are skipped).
    pub fn parse(words: &[&str]) -> NextHop {
        let mut hop = NextHop::default();
        let mut i = 0;
        while i < words.len() {
            match words[i] {
                "via" => {
                    // `via inet6 fe80::1` for an IPv6 gateway of an IPv4
                    // route (BGP unnumbered).
                    let mut a = words.get(i + 1).copied();
                    if matches!(a, Some("inet" | "inet6")) {
                        i += 1;
                        a = words.get(i + 1).copied();
                    }
                    hop.via = a.and_then(|a| a.parse().ok());
                    i += 1;
                }
                "dev" => {
                    hop.dev = words.get(i + 1).map(|d| d.to_string());
                    i += 1;
                }
                "onlink" => hop.onlink = true,
                _ => {}
            }
            i += 1;
        }
        hop
    }

    /// The next hop of the route `ip -4 route get fibmatch` printed: the
    /// one this node uses toward the relay node's pods. Refuses what
    /// would send edge traffic anywhere but to that node: the default
    /// route (no route for the pod range here), a local or unreachable
    /// type (an address of this node, a blackhole), multipath.
    pub fn from_fibmatch(out: &str) -> anyhow::Result<NextHop> {
        let line = out.lines().next().unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(!words.is_empty(), "no route");
        anyhow::ensure!(
            !out.lines()
                .skip(1)
                .any(|l| l.trim_start().starts_with("nexthop")),
            "a multipath route ({line:?}): not supported"
        );
        match words[0] {
            "default" | "0.0.0.0/0" => anyhow::bail!(
                "only the default route ({line:?}): this node has no route to the relay node's \
                 pod range; check the address given to --via-pod-network"
            ),
            "local" | "broadcast" | "anycast" | "multicast" => anyhow::bail!(
                "an address of this node ({line:?}): the agent belongs on the other nodes"
            ),
            "unreachable" | "blackhole" | "prohibit" | "throw" | "nat" => {
                anyhow::bail!("not a forwarding route ({line:?})")
            }
            _ => {}
        }
        let hop = NextHop::parse(&words[1..]);
        anyhow::ensure!(hop.dev.is_some(), "no device in {line:?}");
        Ok(hop)
    }

    /// `via X dev D onlink`, as `ip route replace` takes it.
    pub(super) fn args(&self) -> String {
        let mut a = String::new();
        match self.via {
            Some(IpAddr::V6(v)) => {
                let _ = write!(a, " via inet6 {v}");
            }
            Some(v) => {
                let _ = write!(a, " via {v}");
            }
            None => {}
        }
        if let Some(d) = &self.dev {
            let _ = write!(a, " dev {d}");
        }
        if self.onlink {
            a += " onlink";
        }
        a
    }

    /// Whether an installed route's next hop `have` is what `self` asks
    /// for; a device `self` leaves to the kernel is not compared.
    pub(super) fn satisfied_by(&self, have: &NextHop) -> bool {
        self.via == have.via
            && self.onlink == have.onlink
            && (self.dev.is_none() || self.dev == have.dev)
    }
}

/// The address probed for `--via-pod-network`'s prefix: its first host
/// address (the network address itself may be an address of the CNI's
/// own device, as Flannel's VTEPs are).
pub fn pod_network_probe(c: Cidr) -> IpAddr {
    match c.addr() {
        IpAddr::V4(a) if c.prefix_len() < 31 => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) if c.prefix_len() < 127 => IpAddr::V6((u128::from(a) + 1).into()),
        a => a,
    }
}

/// The next hop to install now.
pub(super) async fn resolve(toward: Toward) -> anyhow::Result<NextHop> {
    match toward {
        Toward::Via(v) => Ok(NextHop {
            via: Some(v),
            ..NextHop::default()
        }),
        Toward::PodNetwork(a) => {
            let out = ip(&["-4", "route", "get", "fibmatch", &a.to_string()], None).await?;
            NextHop::from_fibmatch(&out).map_err(|e| e.context(format!("route to {a}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::c;

    #[test]
    fn the_cnis_route_to_the_relay_nodes_pods_is_copied_or_refused() {
        // Flannel VXLAN, Calico IPIP, a host-gw route.
        let h =
            NextHop::from_fibmatch("10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink \n").unwrap();
        assert_eq!(h.args(), " via 10.244.1.0 dev flannel.1 onlink");
        let h = NextHop::from_fibmatch("10.244.1.0/26 via 10.0.0.1 dev tunl0 proto bird onlink \n")
            .unwrap();
        assert_eq!(h.args(), " via 10.0.0.1 dev tunl0 onlink");
        let h = NextHop::from_fibmatch("10.244.1.0/24 via 10.0.0.1 dev eth0 \n").unwrap();
        assert_eq!(h.args(), " via 10.0.0.1 dev eth0");
        let h = NextHop::from_fibmatch("10.244.1.0/24 dev wg0 scope link \n").unwrap();
        assert_eq!(h.args(), " dev wg0");
        for (out, why) in [
            ("default via 10.0.0.254 dev eth0 \n", "default route"),
            (
                "local 10.244.1.0 dev flannel.1 proto kernel scope host src 10.244.1.0 \n",
                "this node",
            ),
            ("blackhole 10.244.1.0/24 proto bird \n", "forwarding"),
            (
                "10.244.1.0/24 proto bird \n\tnexthop via 10.0.0.1 dev eth0 weight 1 \n\tnexthop via 10.0.0.9 dev eth0 weight 1 \n",
                "multipath",
            ),
        ] {
            let e = NextHop::from_fibmatch(out).unwrap_err().to_string();
            assert!(e.contains(why), "{out:?}: {e}");
        }
        assert_eq!(
            pod_network_probe(c("10.244.1.0/24")).to_string(),
            "10.244.1.1"
        );
        assert_eq!(pod_network_probe(c("10.244.1.7")).to_string(), "10.244.1.7");
    }
}
