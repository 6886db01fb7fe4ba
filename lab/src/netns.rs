//! A network-namespace lab: a small Kubernetes-like cluster with a cloud
//! side and two NAT-ed edge sites, built from namespaces, veths, bridges
//! and nftables on one Linux machine (root required).
//!
//! ```text
//!  cpod1 ─ [relay]──┐ cloud LAN 10.0.0.0/24        WAN 198.18.0.0/24
//!  cpod2 ─ [cloud2]─┼─ (bridge in `switch`)   [relay] ── (bridge in `wan`)
//!      [apiserver]──┘                                  ├─ [nat1] ─ [edge1] ─ epod1
//!                                                      └─ [nat2] ─ [edge2] ─ epod2
//! ```
//!
//! | role        | addresses                                   | routes                                    |
//! |-------------|---------------------------------------------|-------------------------------------------|
//! | `relay`     | lan0 10.0.0.1, wan0 198.18.0.1, cni0 10.244.1.1 | 10.244.2.0/24 via 10.0.0.2; default via 198.18.0.254 |
//! | `cloud2`    | lan0 10.0.0.2, cni0 10.244.2.1              | 10.244.1.0/24 via 10.0.0.1; edge pod CIDRs and edge LANs via 10.0.0.1; default via 10.0.0.1 |
//! | `apiserver` | lan0 10.0.0.3                               | cloud pod CIDRs via their nodes; edge pod CIDRs and edge LANs via 10.0.0.1; default via 10.0.0.1 |
//! | `wan`       | br0 198.18.0.254 (the upstream gateway)     | cloud LAN and pod CIDRs via 198.18.0.1 (for ICMP errors only; forwards nothing) |
//! | `cpod1`     | eth0 10.244.1.2                             | default via 10.244.1.1                    |
//! | `cpod2`     | eth0 10.244.2.2                             | default via 10.244.2.1                    |
//! | `nat{i}`    | wan0 198.18.0.1{i}, lan0 192.168.{i}.1      | 10.244.{6+i}.0/24 via 192.168.{i}.10; default via 198.18.0.254; masquerade out of wan0; no inbound |
//! | `edge{i}`   | eth0 192.168.{i}.10, cni0 10.244.{6+i}.1    | default via 192.168.{i}.1                 |
//! | `epod{i}`   | eth0 10.244.{6+i}.5                         | default via 10.244.{6+i}.1                |
//!
//! `switch` only holds a bridge; `wan` holds the WAN bridge and, on it, the
//! upstream gateway every node's default route ends at: it forwards
//! nothing, and answers what it cannot route with an ICMP "network
//! unreachable" at once, as the lab's fail-fast cells expect (it has routes
//! back to the cloud's ranges via the relay node for those errors alone). Every router (`relay`,
//! `cloud2`, `nat{i}`, `edge{i}`, `wan`) forwards. Edge hosts reach nothing
//! but the WAN (through their NAT), so anything cloud-side must later go
//! through the tunnel; `cloud2` and `apiserver` send edge traffic to the
//! relay node, as a route agent would, and the relay node has no route for
//! it yet (its default route leads to the gateway, which refuses it).
//!
//! Every node (`relay`, `cloud2`, `apiserver`, `edge{i}`) has a default
//! route, as real nodes do, and runs a model of kube-proxy in its root
//! namespace ([`NetnsLab::sync_services`]): table `ip kube-proxy`, NAT
//! chains on prerouting (pod traffic) and output (host processes) at
//! priority -100 (dstnat), DNAT from each ClusterIP:port to its endpoints.
//! Pods have no kube-proxy of their own: their traffic meets it on their
//! node's prerouting hook, as with the real one.
//!
//! With [`LabOptions::repeated_lans`] ([`NetnsLab::with_options`]) both
//! sites use the same LAN, as shops and towers do: `192.168.1.0/24`, both
//! edge hosts `192.168.1.10`, both NATs `192.168.1.1` on their LAN side
//! (their WAN addresses stay distinct). The lab's methods
//! ([`NetnsLab::edge_host_ip`], [`NetnsLab::nat_lan_ip`],
//! [`NetnsLab::edge_lan_cidr`]) answer for the topology it was built
//! with; the free functions of the same names describe the default one.
//! [`LabOptions::relay_hosts`] and [`LabOptions::sites`] add relay hosts
//! (`relay2`, `relay3`) and a third site (`nat3`, `edge3`, `epod3`): see
//! `netns/hosts.rs`.
//!
//! Interfaces are created directly inside their namespaces, so their names
//! (`lan0`, `eth0`, ...) only need to be unique per namespace and parallel
//! labs never collide; nothing is created in, or changed in, the root
//! namespace. Dropping [`NetnsLab`] deletes every namespace it made, which
//! also removes their veths, bridges and nftables tables, including during
//! a panic's unwinding.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;
use relay_protocol::Cidr;

mod hosts;
mod options;
pub use hosts::relay_host_lan_ip;
pub use options::LabOptions;

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
/// The service (ClusterIP) range tests use with [`NetnsLab::sync_services`].
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
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

fn cidr24(net: Ipv4Addr) -> Cidr {
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
        })
    }

    /// The same, also on `nodePort` of every node address.
    pub fn with_node_port(mut self, node_port: u16) -> KubeService {
        self.node_port = Some(node_port);
        self
    }
}

/// The whole `ip kube-proxy` table for `services` (pure): deletes and
/// recreates it in one transaction. Each endpoint gets a chain that DNATs
/// to it; each service port a rule in `services` that picks one endpoint
/// chain with `numgen random mod N vmap` (kube-proxy's nftables mode does
/// the same; its iptables mode uses `statistic --mode random`).
pub fn kube_proxy_ruleset(mode: KubeProxyMode, services: &[KubeService]) -> Result<String> {
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
        let mut vmap = Vec::new();
        for (j, ep) in svc.endpoints.iter().enumerate() {
            let _ = writeln!(
                chains,
                "  chain endpoint-{i}-{j} {{\n    meta l4proto {p} dnat to {}:{} comment \"{}\"\n  }}",
                ep.ip(),
                ep.port(),
                svc.name
            );
            vmap.push(format!("{j} : jump endpoint-{i}-{j}"));
        }
        let vmap = format!(
            "numgen random mod {} vmap {{ {} }} comment \"{}\"",
            svc.endpoints.len(),
            vmap.join(", "),
            svc.name
        );
        let _ = writeln!(services_chain, "    {m} {vmap}");
        if let Some(np) = svc.node_port {
            let _ = writeln!(
                services_chain,
                "    fib daddr type local {p} dport {np} {vmap}"
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

/// Why the lab cannot run here.
#[derive(Clone, Debug)]
pub struct Skip {
    /// Human-readable reason.
    pub reason: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns lab unavailable: {}", self.reason)
    }
}

/// Checks that this process can build a lab (root, `ip netns`, `nft`,
/// `conntrack`). Returns `Some(Skip)` after a loud message on stderr when
/// it cannot, so the caller returns early; panics instead when
/// `REQUIRE_LAB=1` or `CI=true` is set, because there a skipped lab test
/// would hide a broken environment.
pub fn require_root() -> Option<Skip> {
    let reason = probe().err()?;
    let strict = std::env::var("REQUIRE_LAB").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    let skip = Skip {
        reason: format!("{reason:#}"),
    };
    if strict {
        panic!("{skip} (REQUIRE_LAB=1 or CI=true: not skipping)");
    }
    eprintln!("\n!!!!!!!! SKIPPING netns lab test: {skip}\n!!!!!!!! (run as root with iproute2, nftables and conntrack; set REQUIRE_LAB=1 to make this a failure)\n");
    Some(skip)
}

fn probe() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("not running as root");
    }
    for tool in [["nft", "--version"], ["conntrack", "--version"]] {
        run(Command::new(tool[0]).arg(tool[1]), &tool.join(" "))?;
    }
    // A real create/delete: `ip` may exist while /var/run/netns is not
    // writable or the kernel lacks netns support.
    let name = format!("rlprobe{}x{}", std::process::id(), next_id());
    run(
        Command::new("ip").args(["netns", "add", &name]),
        &format!("ip netns add {name}"),
    )?;
    run(
        Command::new("ip").args(["netns", "del", &name]),
        &format!("ip netns del {name}"),
    )?;
    Ok(())
}

fn next_id() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd`, returning stdout; on failure the error names `what` and
/// carries stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Default bound for [`NetnsLab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The lab: the namespaces of the module docs (thirteen by default).
/// Dropping it deletes them all.
pub struct NetnsLab {
    tag: String,
    names: Vec<String>,
    /// Namespaces that exist and must be deleted on drop, in creation order.
    created: Vec<String>,
    build_time: Duration,
    opts: LabOptions,
}

impl fmt::Debug for NetnsLab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsLab")
            .field("tag", &self.tag)
            .field("created", &self.created)
            .finish()
    }
}

impl NetnsLab {
    /// Builds the whole topology with the default prefix `rl`.
    pub fn new() -> Result<NetnsLab> {
        NetnsLab::with_prefix("rl")
    }

    /// Builds the whole topology; namespaces are named
    /// `{prefix}{pid}x{n}-{role}` where `n` counts labs in this process.
    /// On error, whatever was already created is deleted.
    pub fn with_prefix(prefix: &str) -> Result<NetnsLab> {
        NetnsLab::with_prefix_and_options(prefix, LabOptions::default())
    }

    /// Builds the topology `opts` describes, with the default prefix `rl`.
    pub fn with_options(opts: LabOptions) -> Result<NetnsLab> {
        NetnsLab::with_prefix_and_options("rl", opts)
    }

    /// [`NetnsLab::with_prefix`] with `opts`.
    pub fn with_prefix_and_options(prefix: &str, opts: LabOptions) -> Result<NetnsLab> {
        let start = Instant::now();
        let tag = format!("{prefix}{}x{}", std::process::id(), next_id());
        opts.check()?;
        // A name for every role, built or not, so `ns` can index by
        // discriminant; only the roles `opts` asks for are created.
        let names = Role::ALL
            .iter()
            .chain(&Role::EXTRA)
            .map(|r| format!("{tag}-{}", r.as_str()))
            .collect();
        let mut lab = NetnsLab {
            tag,
            names,
            created: Vec::new(),
            build_time: Duration::ZERO,
            opts,
        };
        // On `?` the partially built lab is dropped, which deletes what
        // exists so far.
        lab.build()?;
        lab.build_time = start.elapsed();
        Ok(lab)
    }

    /// The namespace name of `role`.
    pub fn ns(&self, role: Role) -> &str {
        // `names` is built from `Role::ALL` in declaration order, so the
        // discriminant is the index.
        &self.names[role as usize]
    }

    /// The unique part shared by this lab's namespace names.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// All namespace names of this lab (of the roles it was built with).
    pub fn namespaces(&self) -> Vec<String> {
        self.roles()
            .into_iter()
            .map(|r| self.ns(r).to_string())
            .collect()
    }

    /// How long [`NetnsLab::new`] took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    fn build(&mut self) -> Result<()> {
        for role in self.roles() {
            let name = self.ns(role).to_string();
            run(
                Command::new("ip").args(["netns", "add", &name]),
                &format!("ip netns add {name}"),
            )?;
            self.created.push(name);
        }
        for role in self.roles() {
            self.ip(role, "link set lo up")?;
        }
        use Role::*;
        // L2 segments.
        for (role, br) in [
            (Switch, "br0"),
            (Wan, "br0"),
            (Relay, "cni0"),
            (Cloud2, "cni0"),
        ] {
            self.bridge(role, br)?;
        }
        // Cloud LAN.
        for (role, port, ip) in [
            (Relay, "relay", RELAY_LAN_IP),
            (Cloud2, "cloud2", CLOUD2_LAN_IP),
            (Apiserver, "apisrv", APISERVER_IP),
        ] {
            self.veth(role, "lan0", Switch, port, Some("br0"))?;
            self.ip(role, &format!("addr add {ip}/24 dev lan0"))?;
        }
        // WAN.
        self.veth(Relay, "wan0", Wan, "relay", Some("br0"))?;
        self.ip(Relay, &format!("addr add {RELAY_WAN_IP}/24 dev wan0"))?;
        // Pods: a veth whose node end is a port of the node's cni0 bridge,
        // so more pods could join the same segment later.
        for (node, pod, gw, ip) in [
            (Relay, Cpod1, CPOD1_GW, CPOD1_IP),
            (Cloud2, Cpod2, CPOD2_GW, CPOD2_IP),
        ] {
            self.pod(node, pod, gw, ip)?;
        }
        // Cloud routing, flannel host-gw style, plus what a route agent
        // would add for the edges on the nodes that do not run the relay.
        self.ip(
            Relay,
            &format!("route add {CPOD2_CIDR} via {CLOUD2_LAN_IP}"),
        )?;
        self.ip(
            Cloud2,
            &format!("route add {CPOD1_CIDR} via {RELAY_LAN_IP}"),
        )?;
        self.ip(
            Apiserver,
            &format!("route add {CPOD1_CIDR} via {RELAY_LAN_IP}"),
        )?;
        self.ip(
            Apiserver,
            &format!("route add {CPOD2_CIDR} via {CLOUD2_LAN_IP}"),
        )?;
        for role in [Cloud2, Apiserver] {
            for net in self.edge_ranges() {
                self.ip(role, &format!("route add {net} via {RELAY_LAN_IP}"))?;
            }
        }
        // Edge sites, and the relay hosts beyond the first.
        for site in self.sites() {
            self.build_site(site)?;
        }
        for i in 2..=self.opts.relay_hosts {
            self.build_relay_host(i)?;
        }
        // The upstream gateway and every default route: nodes have one in
        // real clusters, and kube-proxy's output DNAT relies on it (the
        // route lookup happens before the output hook).
        self.ip(Wan, &format!("addr add {WAN_GW}/24 dev br0"))?;
        // The gateway forwards nothing (an Internet router would not carry
        // private addresses anywhere), but answers "network unreachable"
        // for what it cannot route, which needs routes back to the cloud's
        // private ranges for the ICMP errors alone.
        for net in [CLOUD_LAN, CPOD1_CIDR, CPOD2_CIDR] {
            self.ip(Wan, &format!("route add {net} via {RELAY_WAN_IP}"))?;
        }
        self.nft(
            Wan,
            // By destination: the WAN's bridged frames run this hook too
            // (br_netfilter), with br0 as their interface, but never go to
            // the cloud's private ranges; routed packets only can.
            &format!(
                "table ip gateway {{\n\
                   chain forward {{\n\
                     type filter hook forward priority filter; policy accept;\n\
                     ip daddr {{ {CLOUD_LAN}, {CPOD1_CIDR}, {CPOD2_CIDR} }} drop\n\
                   }}\n\
                 }}\n"
            ),
        )?;
        self.ip(Relay, &format!("route add default via {WAN_GW}"))?;
        for role in [Cloud2, Apiserver] {
            self.ip(role, &format!("route add default via {RELAY_LAN_IP}"))?;
        }
        for role in [Relay, Cloud2, Wan] {
            self.exec(role, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        // kube-proxy on every node, with no Services yet.
        self.sync_services(KubeProxyMode::Iptables, &[])?;
        Ok(())
    }

    /// `ip -n NS <args>` (args split on spaces).
    pub(crate) fn ip(&self, ns: impl NsRef, args: &str) -> Result<String> {
        let ns = ns.ns_name(self);
        run(
            Command::new("ip").arg("-n").arg(ns).args(args.split(' ')),
            &format!("ip -n {ns} {args}"),
        )
    }

    /// A veth pair created inside `a` with its peer moved straight into
    /// `b`, both up; the `b` end optionally enslaved to bridge `master`.
    pub(crate) fn veth(
        &self,
        a: Role,
        a_if: &str,
        b: Role,
        b_if: &str,
        master: Option<&str>,
    ) -> Result<()> {
        let b_ns = self.ns(b).to_string();
        self.ip(
            a,
            &format!("link add {a_if} type veth peer name {b_if} netns {b_ns}"),
        )?;
        if let Some(br) = master {
            self.ip(b, &format!("link set {b_if} master {br}"))?;
        }
        self.ip(a, &format!("link set {a_if} up"))?;
        self.ip(b, &format!("link set {b_if} up"))?;
        Ok(())
    }

    /// Loads an nftables script (`nft -f -`) inside `ns`.
    pub fn nft(&self, ns: impl NsRef, script: &str) -> Result<()> {
        let ns = ns.ns_name(self);
        let what = format!("ip netns exec {ns} nft -f - <<'{}'", script.trim());
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())
            .with_context(|| format!("writing script to `{what}`"))?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for `{what}`"))?;
        if !out.status.success() {
            bail!(
                "`{what}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `args` inside `ns` (`ip netns exec`), bounded by
    /// [`EXEC_TIMEOUT`]; returns stdout, or an error with stderr.
    pub fn exec(&self, ns: impl NsRef, args: &[&str]) -> Result<String> {
        self.exec_timeout(ns, args, EXEC_TIMEOUT)
    }

    /// Like [`NetnsLab::exec`], killing the command after `limit`.
    pub fn exec_timeout(&self, ns: impl NsRef, args: &[&str], limit: Duration) -> Result<String> {
        let ns = ns.ns_name(self);
        let what = format!("ip netns exec {ns} {}", args.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        // Readers on their own threads so a chatty command cannot block on
        // a full pipe while we wait for it.
        let out_rx = drain(child.stdout.take());
        let err_rx = drain(child.stderr.take());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for `{what}`"))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`{what}` timed out after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // A background grandchild may keep a pipe open; do not wait for it
        // beyond the deadline (plus a little slack for the final read).
        let grace = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
        let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
        if !status.success() {
            bail!("`{what}` failed ({status}): {}", stderr.trim());
        }
        Ok(stdout)
    }

    /// Starts a thread that enters `ns`'s network namespace, builds a
    /// current-thread tokio runtime there and runs `f()` to completion.
    /// Sockets the future opens live in that namespace (so do threads the
    /// runtime spawns, e.g. for `spawn_blocking`, since new threads inherit
    /// their creator's namespace). The thread keeps the namespace alive
    /// until it exits, even if the lab is dropped first.
    pub fn spawn_in<F, Fut, T>(&self, ns: impl NsRef, f: F) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        self.spawn_inner(ns.ns_name(self), None, f)
    }

    /// Runs `f()` inside `ns` (as [`NetnsLab::spawn_in`]) and waits for it,
    /// failing if it takes longer than `limit` or panics.
    pub fn run_in<F, Fut, T>(&self, ns: impl NsRef, limit: Duration, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let name = ns.ns_name(self).to_string();
        self.spawn_inner(&name, Some(limit), f)
            .join()
            .map_err(|p| anyhow!("task in {name} panicked: {}", panic_text(&p)))?
    }

    fn spawn_inner<F, Fut, T>(
        &self,
        name: &str,
        limit: Option<Duration>,
        f: F,
    ) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
        T: Send + 'static,
    {
        // Open the handle now: the caller learns about a missing namespace
        // through the result, and a lab dropped right after this call does
        // not race the thread's start.
        let path = format!("/var/run/netns/{name}");
        let handle = File::open(&path).with_context(|| format!("open {path}"));
        let name = name.to_string();
        std::thread::spawn(move || {
            let fd = handle?;
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({path}, CLONE_NEWNET)"))?;
            drop(fd);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| format!("tokio runtime in {name}"))?;
            rt.block_on(async move {
                match limit {
                    None => f().await,
                    Some(limit) => tokio::time::timeout(limit, f())
                        .await
                        .map_err(|_| anyhow!("task in {name} timed out after {limit:?}"))?,
                }
            })
        })
    }

    /// kube-proxy's view of the cluster, applied on every node
    /// ([`KUBE_PROXY_NODES`]): the `ip kube-proxy` table is replaced whole
    /// by [`kube_proxy_ruleset`]`(mode, services)` in one `nft -f`
    /// transaction per node, as kube-proxy regenerates its rules after
    /// every Service or EndpointSlice change (no instant without rules).
    /// Calling it with an empty list leaves empty chains, as kube-proxy
    /// runs with no Services.
    pub fn sync_services(&self, mode: KubeProxyMode, services: &[KubeService]) -> Result<()> {
        let script = kube_proxy_ruleset(mode, services)?;
        for node in self.kube_proxy_nodes() {
            self.nft(node, &script)
                .with_context(|| format!("kube-proxy sync on {node}"))?;
        }
        Ok(())
    }

    /// The `ip kube-proxy` table of `node` as `nft list table` shows it.
    pub fn kube_proxy_rules(&self, node: Role) -> Result<String> {
        self.exec(node, &["nft", "list", "table", "ip", "kube-proxy"])
    }

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

    /// Undoes [`NetnsLab::block_udp`].
    pub fn unblock_udp(&self, site: u8) -> Result<()> {
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

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut p) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veths (and their peers),
        // bridges and nftables tables; nothing else was created.
        for name in self.created.iter().rev() {
            if let Err(e) = run(
                Command::new("ip").args(["netns", "del", name]),
                &format!("ip netns del {name}"),
            ) {
                eprintln!("netns lab cleanup: {e:#}");
            }
        }
        self.created.clear();
    }
}
