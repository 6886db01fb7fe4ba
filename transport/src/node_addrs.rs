//! This node's own IPv4 addresses, as capture (the UDP flows to node
//! ports) and the route agent (the prefixes it refuses to route) count
//! them: every interface's, except kube-proxy's IPVS device's.

use std::net::Ipv4Addr;

/// The interface kube-proxy's IPVS mode puts every ClusterIP on (one /32
/// each: thousands in a large cluster). Its addresses are not counted as
/// this node's ([`node_ipv4_addresses`]): they are the Services', answered
/// by the `local` table like the node's own but holding no subnet of
/// neighbours (what the route agent's refusal protects), and one
/// `conntrack` run each would hold up every capture update.
pub const KUBE_IPVS_DEVICE: &str = "kube-ipvs0";

/// This node's IPv4 interface addresses (`getifaddrs`: one netlink dump,
/// no process to run), except those on [`KUBE_IPVS_DEVICE`]; an error
/// when they cannot be listed.
pub fn node_ipv4_addresses() -> std::io::Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs()?.filter_map(|ifa| {
        let ip = ifa.address?.as_sockaddr_in()?.ip();
        Some((ifa.interface_name, ip))
    });
    Ok(without_kube_ipvs(addrs))
}

/// The addresses of `addrs` (interface name, address) on any interface
/// but [`KUBE_IPVS_DEVICE`], in their order.
fn without_kube_ipvs(addrs: impl IntoIterator<Item = (String, Ipv4Addr)>) -> Vec<Ipv4Addr> {
    addrs
        .into_iter()
        .filter(|(ifname, _)| ifname != KUBE_IPVS_DEVICE)
        .map(|(_, ip)| ip)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy IPVS's ClusterIPs are not among this node's addresses;
    /// every other interface's are, loopback included.
    #[test]
    fn kube_ipvs_addresses_are_not_this_nodes() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let listed = [
            ("lo", "127.0.0.1"),
            ("eth0", "10.0.3.17"),
            ("flannel.1", "10.244.3.0"),
            ("kube-ipvs0", "10.96.0.1"),
            ("kube-ipvs0", "10.96.0.10"),
            ("eth1", "198.18.0.1"),
        ]
        .map(|(ifname, a)| (ifname.to_string(), ip(a)));
        assert_eq!(
            without_kube_ipvs(listed),
            [
                ip("127.0.0.1"),
                ip("10.0.3.17"),
                ip("10.244.3.0"),
                ip("198.18.0.1")
            ]
        );
    }

    /// The listing works where the tests run (what it holds depends on
    /// the host).
    #[test]
    fn this_hosts_addresses_are_listed() {
        node_ipv4_addresses().unwrap();
    }
}
