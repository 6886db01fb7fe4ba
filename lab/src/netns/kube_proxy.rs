//! The lab's model of kube-proxy: the Services it programs
//! ([`KubeService`]), the `ip kube-proxy` nftables table it generates
//! ([`kube_proxy_ruleset`], a pure function of them) and
//! [`NetnsLab::sync_services`], which loads it on every node and then, when
//! a UDP Service's endpoints changed, runs kube-proxy's conntrack cleanup
//! ([`NetnsLab::clean_stale_udp`], matching with [`stale_udp_entries`]).
//!
//! Kept apart from the topology: it is the only part of the lab that
//! models a Kubernetes component rather than the network under it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{anyhow, bail, Context, Result};

use super::{NetnsLab, Role};

/// The service (ClusterIP) range tests use with [`NetnsLab::sync_services`].
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Transport protocol of a ClusterIP service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// The nodes that run kube-proxy (in their root namespaces) in the default
/// topology: both cloud nodes, the apiserver host and both edge hosts (a
/// lab's own, extra relay hosts and edge hosts included:
/// [`NetnsLab::kube_proxy_nodes`]).
pub const KUBE_PROXY_NODES: [Role; 5] = [
    Role::Relay,
    Role::Cloud2,
    Role::Apiserver,
    Role::Edge1,
    Role::Edge2,
];

/// Which kube-proxy the lab models. Both DNAT in NAT chains at priority
/// -100 (dstnat) on prerouting and output, in the node's root namespace,
/// and reject new connections to a service port without endpoints (filter
/// forward and output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxyMode {
    /// `--proxy-mode=iptables` (iptables-nft): `KUBE-SERVICES` jumped to
    /// from nat `PREROUTING` and `OUTPUT`, both at -100.
    Iptables,
    /// `--proxy-mode=nftables`: the same, plus its filter chains at
    /// dstnat-10 (-110, `filter-prerouting-pre-dnat` and
    /// `filter-output-pre-dnat`, where it drops what
    /// loadBalancerSourceRanges forbid) that run before any DNAT.
    Nftables,
}

/// One ClusterIP port as kube-proxy programs it: what a Service and its
/// EndpointSlices resolve to (the ClusterIP and Service port, and the
/// usable endpoints' addresses with the target port matched by port name;
/// see relay-kube's `ServiceDirectory`, which computes the same view).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeService {
    /// `namespace/name:portname`, for rule comments.
    pub name: String,
    /// The Service's ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// The port's protocol.
    pub proto: Proto,
    /// Endpoint `IP:targetPort`s; one is picked per connection at random
    /// (`numgen random`), as kube-proxy does. Empty: no endpoints, new
    /// connections are rejected.
    pub endpoints: Vec<SocketAddrV4>,
    /// `nodePort`: every node's own addresses take connections on it too
    /// (`fib daddr type local`), as kube-proxy programs NodePorts.
    pub node_port: Option<u16>,
    /// `internalTrafficPolicy: Local`, with the node of each endpoint (in
    /// `endpoints`' order): each node's kube-proxy sends the ClusterIP to
    /// its own endpoints only, and drops it when it has none.
    pub local_only: Option<Vec<String>>,
}

impl KubeService {
    /// A service port with endpoints.
    pub fn new(
        name: &str,
        cluster_ip: SocketAddr,
        proto: Proto,
        endpoints: &[SocketAddr],
    ) -> Result<KubeService> {
        let SocketAddr::V4(vip) = cluster_ip else {
            bail!("the lab is IPv4 only: {cluster_ip}");
        };
        let endpoints = endpoints
            .iter()
            .map(|e| match e {
                SocketAddr::V4(e) => Ok(*e),
                SocketAddr::V6(_) => Err(anyhow!("the lab is IPv4 only: {e}")),
            })
            .collect::<Result<_>>()?;
        Ok(KubeService {
            name: name.to_string(),
            cluster_ip: *vip.ip(),
            port: vip.port(),
            proto,
            endpoints,
            node_port: None,
            local_only: None,
        })
    }

    /// The same, also on `nodePort` of every node address.
    pub fn with_node_port(mut self, node_port: u16) -> KubeService {
        self.node_port = Some(node_port);
        self
    }
}

/// The whole `ip kube-proxy` table for `services` on node `node` (pure;
/// the node matters only to `internalTrafficPolicy: Local` Services):
/// deletes and recreates it in one transaction. Each endpoint gets a chain that DNATs
/// to it; each service port a rule in `services` that picks one endpoint
/// chain with `numgen random mod N vmap` (kube-proxy's nftables mode does
/// the same; its iptables mode uses `statistic --mode random`).
pub fn kube_proxy_ruleset(
    mode: KubeProxyMode,
    services: &[KubeService],
    node: &str,
) -> Result<String> {
    use std::fmt::Write as _;
    // Regular chains first, so every jump names a chain already defined.
    let mut chains = String::new();
    let mut services_chain = String::new();
    let mut no_endpoints = String::new();
    for (i, svc) in services.iter().enumerate() {
        if svc.name.contains('"') {
            bail!("service name {:?} contains a quote", svc.name);
        }
        let p = svc.proto.nft();
        let m = format!("ip daddr {} {p} dport {}", svc.cluster_ip, svc.port);
        if svc.endpoints.is_empty() {
            let _ = writeln!(
                no_endpoints,
                "    {m} reject comment \"{} has no endpoints\"",
                svc.name
            );
            continue;
        }
        // One chain per endpoint; a vmap over some of them.
        for (j, ep) in svc.endpoints.iter().enumerate() {
            let _ = writeln!(
                chains,
                "  chain endpoint-{i}-{j} {{\n    meta l4proto {p} dnat to {}:{} comment \"{}\"\n  }}",
                ep.ip(),
                ep.port(),
                svc.name
            );
        }
        let vmap = |picks: &[usize]| {
            let arms: Vec<String> = picks
                .iter()
                .enumerate()
                .map(|(k, j)| format!("{k} : jump endpoint-{i}-{j}"))
                .collect();
            format!(
                "numgen random mod {} vmap {{ {} }} comment \"{}\"",
                picks.len(),
                arms.join(", "),
                svc.name
            )
        };
        let all: Vec<usize> = (0..svc.endpoints.len()).collect();
        // internalTrafficPolicy governs the ClusterIP only; node ports
        // follow externalTrafficPolicy (Cluster here: every endpoint).
        let cluster: Vec<usize> = match &svc.local_only {
            Some(nodes) => all
                .iter()
                .copied()
                .filter(|&j| nodes.get(j).is_some_and(|n| n == node))
                .collect(),
            None => all.clone(),
        };
        if cluster.is_empty() {
            // kube-proxy drops (not rejects) what no local endpoint serves.
            let _ = writeln!(
                no_endpoints,
                "    {m} drop comment \"{} has no local endpoints\"",
                svc.name
            );
        } else {
            let _ = writeln!(services_chain, "    {m} {}", vmap(&cluster));
        }
        if let Some(np) = svc.node_port {
            let _ = writeln!(
                services_chain,
                "    fib daddr type local {p} dport {np} {}",
                vmap(&all)
            );
        }
    }
    let _ = write!(chains, "  chain services {{\n{services_chain}  }}\n");
    let _ = write!(chains, "  chain no-endpoints {{\n{no_endpoints}  }}\n");
    let base = |name: &str, kind: &str, hook: &str, prio: i32, rule: &str| {
        format!(
            "  chain {name} {{\n    type {kind} hook {hook} priority {prio}; policy accept;\n    {rule}\n  }}\n"
        )
    };
    // kube-proxy's DNAT for pods (prerouting) and host processes (output).
    chains += &base("nat-prerouting", "nat", "prerouting", -100, "jump services");
    chains += &base("nat-output", "nat", "output", -100, "jump services");
    // Connections to a service port without endpoints are rejected (no
    // DNAT happened, so the destination is still the ClusterIP).
    chains += &base(
        "filter-forward",
        "filter",
        "forward",
        -110,
        "ct state new jump no-endpoints",
    );
    chains += &base(
        "filter-output",
        "filter",
        "output",
        -110,
        "ct state new jump no-endpoints",
    );
    // Masquerade whatever carries kube-proxy's masquerade bit (0x4000; its
    // service chains set it for traffic needing SNAT, e.g. hairpin),
    // clearing the bit: both modes do this in postrouting (iptables mode's
    // KUBE-POSTROUTING, nftables mode's `masquerading`). A component whose
    // own firewall mark has that bit gets its packets masqueraded here.
    chains += "  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    masquerade fully-random\n  }\n";
    chains += &base(
        "nat-postrouting",
        "nat",
        "postrouting",
        100,
        "jump masquerading",
    );
    if mode == KubeProxyMode::Nftables {
        // nftables mode's pre-DNAT chains (loadBalancerSourceRanges
        // drops; the lab has no LoadBalancer Services, so they are empty).
        chains += "  chain firewall-check {\n  }\n";
        chains += &base(
            "filter-prerouting-pre-dnat",
            "filter",
            "prerouting",
            -110,
            "ct state new jump firewall-check",
        );
        chains += &base(
            "filter-output-pre-dnat",
            "filter",
            "output",
            -110,
            "ct state new jump firewall-check",
        );
    }
    Ok(format!(
        "table ip kube-proxy {{}}\ndelete table ip kube-proxy\ntable ip kube-proxy {{\n{chains}}}\n"
    ))
}

/// Each UDP Service port (by name) and its endpoints, as the last sync
/// programmed them: what decides whether a sync runs the conntrack
/// cleanup (kube-proxy's `ConntrackCleanupRequired`).
pub type UdpEndpoints = BTreeMap<String, BTreeSet<SocketAddrV4>>;

fn udp_endpoints(services: &[KubeService]) -> UdpEndpoints {
    services
        .iter()
        .filter(|s| s.proto == Proto::Udp)
        .map(|s| (s.name.clone(), s.endpoints.iter().copied().collect()))
        .collect()
}

/// One UDP conntrack entry's original tuple, as `conntrack -D` names it:
/// `(src, dst, sport, dport)`.
pub type UdpTuple = (Ipv4Addr, Ipv4Addr, u16, u16);

/// The entries of a `conntrack -L -p udp` listing that kube-proxy's
/// `CleanStaleEntries` (pkg/proxy/conntrack/cleanup.go) deletes for
/// `services`: for each UDP Service port with endpoints (one without is
/// skipped), the entries whose original destination is its ClusterIP:port
/// and whose reply source is not one of its endpoint IPs, and the entries
/// whose original destination port is its NodePort (any address) with
/// the same condition. Pure.
pub fn stale_udp_entries(listing: &str, services: &[KubeService]) -> Vec<UdpTuple> {
    let mut by_ip: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut by_node_port: BTreeMap<u16, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for s in services.iter().filter(|s| s.proto == Proto::Udp) {
        let ips: BTreeSet<Ipv4Addr> = s.endpoints.iter().map(|e| *e.ip()).collect();
        if ips.is_empty() {
            continue;
        }
        if let Some(np) = s.node_port {
            by_node_port.insert(np, ips.clone());
        }
        by_ip.insert((s.cluster_ip, s.port), ips);
    }
    let mut out = Vec::new();
    for line in listing.lines() {
        let mut f = line.split_whitespace();
        if f.next() != Some("udp") {
            continue;
        }
        // The first src/dst/sport/dport are the original tuple, the
        // second the reply tuple.
        let (mut ips, mut ports) = (Vec::new(), Vec::new());
        for kv in f {
            match kv.split_once('=') {
                Some(("src" | "dst", v)) => ips.extend(v.parse::<Ipv4Addr>()),
                Some(("sport" | "dport", v)) => ports.extend(v.parse::<u16>()),
                _ => {}
            }
        }
        let (&[osrc, odst, rsrc, _], &[osport, odport, ..]) = (&ips[..], &ports[..]) else {
            continue;
        };
        let stale = |eps: Option<&BTreeSet<Ipv4Addr>>| eps.is_some_and(|e| !e.contains(&rsrc));
        if stale(by_ip.get(&(odst, odport))) || stale(by_node_port.get(&odport)) {
            out.push((osrc, odst, osport, odport));
        }
    }
    out
}

impl NetnsLab {
    /// kube-proxy's view of the cluster, applied on every node
    /// ([`KUBE_PROXY_NODES`]): the `ip kube-proxy` table is replaced whole
    /// by [`kube_proxy_ruleset`]`(mode, services)` in one `nft -f`
    /// transaction per node, as kube-proxy regenerates its rules after
    /// every Service or EndpointSlice change (no instant without rules).
    /// Calling it with an empty list leaves empty chains, as kube-proxy
    /// runs with no Services. When the endpoints of a UDP Service port
    /// changed since the last sync (one added or removed too), each node
    /// then runs kube-proxy's conntrack cleanup
    /// ([`NetnsLab::clean_stale_udp`]), as kube-proxy does at the end of
    /// such a sync.
    pub fn sync_services(&self, mode: KubeProxyMode, services: &[KubeService]) -> Result<()> {
        for node in self.kube_proxy_nodes() {
            // Each node's Node object is named as its role.
            let script = kube_proxy_ruleset(mode, services, node.as_str())?;
            self.nft(node, &script)
                .with_context(|| format!("kube-proxy sync on {node}"))?;
        }
        let udp = udp_endpoints(services);
        let changed = {
            let mut last = self.kube_udp.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *last != udp;
            *last = udp;
            changed
        };
        if changed {
            for node in self.kube_proxy_nodes() {
                self.clean_stale_udp(node, services)
                    .with_context(|| format!("kube-proxy conntrack cleanup on {node}"))?;
            }
        }
        Ok(())
    }

    /// kube-proxy's UDP conntrack cleanup on `node` for `services`: lists
    /// the UDP entries (`conntrack -L -p udp`) and deletes those
    /// [`stale_udp_entries`] picks, one `conntrack -D` each (an entry gone
    /// meanwhile is fine). Returns how many it deleted.
    pub fn clean_stale_udp(&self, node: Role, services: &[KubeService]) -> Result<usize> {
        let listing = self.exec(node, &["conntrack", "-L", "-p", "udp"])?;
        let stale = stale_udp_entries(&listing, services);
        let mut deleted = 0;
        for (src, dst, sport, dport) in stale {
            let (src, dst, sport, dport) = (
                src.to_string(),
                dst.to_string(),
                sport.to_string(),
                dport.to_string(),
            );
            let args = [
                "conntrack",
                "-D",
                "-p",
                "udp",
                "--orig-src",
                &src,
                "--orig-dst",
                &dst,
                "--sport",
                &sport,
                "--dport",
                &dport,
            ];
            if self.exec(node, &args).is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// The `ip kube-proxy` table of `node` as `nft list table` shows it.
    pub fn kube_proxy_rules(&self, node: Role) -> Result<String> {
        self.exec(node, &["nft", "list", "table", "ip", "kube-proxy"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cleanup deletes what `CleanStaleEntries` deletes: entries to a
    /// UDP Service's ClusterIP:port or NodePort whose reply source is not
    /// an endpoint (a captured flow's, replying from the capture
    /// address), not those answered by an endpoint, not other Services',
    /// and nothing for a Service without endpoints.
    #[test]
    fn the_conntrack_cleanup_matches_kube_proxys() {
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let dns = KubeService::new(
            "kube-system/dns:dns",
            sa("10.96.0.10:53"),
            Proto::Udp,
            &[sa("10.244.7.5:53")],
        )
        .unwrap()
        .with_node_port(30053);
        let empty = KubeService::new("d/empty:p", sa("10.96.0.11:53"), Proto::Udp, &[]).unwrap();
        let listing = "\
udp      17 29 src=10.244.1.2 dst=10.96.0.10 sport=4000 dport=53 src=169.254.70.1 dst=10.244.1.2 sport=15001 dport=4000 mark=0 use=1
udp      17 29 src=10.244.1.3 dst=10.96.0.10 sport=4001 dport=53 src=10.244.7.5 dst=10.244.1.3 sport=53 dport=4001 [ASSURED] mark=0 use=1
udp      17 29 src=10.244.1.4 dst=10.96.0.11 sport=4002 dport=53 src=169.254.70.1 dst=10.244.1.4 sport=15001 dport=4002 mark=0 use=1
udp      17 29 src=192.168.1.9 dst=10.1.0.2 sport=4003 dport=30053 src=10.244.9.9 dst=192.168.1.9 sport=53 dport=4003 mark=0 use=1
tcp      6 29 ESTABLISHED src=10.244.1.2 dst=10.96.0.10 sport=4000 dport=53 src=169.254.70.1 dst=10.244.1.2 sport=15001 dport=4000 mark=0 use=1
";
        let got = stale_udp_entries(listing, &[dns, empty]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            got,
            vec![
                (ip("10.244.1.2"), ip("10.96.0.10"), 4000, 53),
                (ip("192.168.1.9"), ip("10.1.0.2"), 4003, 30053),
            ]
        );
    }

    /// `internalTrafficPolicy: Local` narrows the ClusterIP to the node's
    /// own endpoints (dropped where there is none) and leaves the node
    /// port to every endpoint, as kube-proxy does.
    #[test]
    fn internal_traffic_policy_narrows_the_cluster_ip_only() {
        let eps: Vec<SocketAddr> = ["10.244.7.5:80", "10.244.8.5:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut svc = KubeService::new(
            "d/agent:p",
            "10.96.0.34:80".parse().unwrap(),
            Proto::Tcp,
            &eps,
        )
        .unwrap()
        .with_node_port(30080);
        svc.local_only = Some(vec!["edge1".into(), "edge2".into()]);
        let on =
            |node: &str| kube_proxy_ruleset(KubeProxyMode::Iptables, &[svc.clone()], node).unwrap();
        let edge1 = on("edge1");
        let rule = |t: &str, m: &str| {
            t.lines()
                .find(|l| l.contains(m))
                .unwrap_or_default()
                .to_string()
        };
        let cip = rule(&edge1, "ip daddr 10.96.0.34");
        assert!(
            cip.contains("mod 1 vmap { 0 : jump endpoint-0-0 }"),
            "{cip}"
        );
        let np = rule(&edge1, "dport 30080");
        assert!(np.contains("mod 2 vmap"), "{np}");
        let cloud = on("cloud2");
        assert!(
            rule(&cloud, "ip daddr 10.96.0.34").contains("drop"),
            "{cloud}"
        );
        assert!(
            rule(&cloud, "dport 30080").contains("mod 2 vmap"),
            "{cloud}"
        );
    }
}
