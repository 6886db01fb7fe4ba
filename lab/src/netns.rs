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
//! `netns/hosts.rs`. [`LabOptions::cloud_overlay`] makes the cloud LAN a
//! cloud's fabric (IPv4 delivered only between the hosts' own addresses)
//! and puts the cloud pods on a Flannel-style VXLAN overlay, in place of
//! the host-gw routes and the static edge routes of the table above: see
//! `netns/cloud_overlay.rs`. [`LabOptions::silent_wan`] makes the
//! upstream gateway drop what it cannot route without a word, as cloud
//! routers and carriers do, instead of answering "network unreachable".
//!
//! Interfaces are created directly inside their namespaces, so their names
//! (`lan0`, `eth0`, ...) only need to be unique per namespace and parallel
//! labs never collide; nothing is created in, or changed in, the root
//! namespace. Dropping [`NetnsLab`] deletes every namespace it made, which
//! also removes their veths, bridges and nftables tables, including during
//! a panic's unwinding.
//!
//! This file builds the topology (namespaces, veths, bridges, routes) and
//! tears it down; the rest lives beside it, by concern: `netns/roles.rs`
//! (addresses and [`Role`]s), `netns/exec.rs` (commands and tasks run
//! inside a namespace), `netns/kube_proxy.rs` (the kube-proxy model),
//! `netns/faults.rs` (faults injected at a site), `netns/hosts.rs` (the
//! sites and relay hosts [`LabOptions`] may add), `netns/cloud_overlay.rs`
//! (the cloud fabric and overlay) and `netns/options.rs`.

use std::fmt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

mod cloud_overlay;
mod exec;
mod faults;
mod hosts;
mod kube_proxy;
mod options;
mod roles;
pub use cloud_overlay::{Vtep, VTEPS, VTEP_DEV, VXLAN_PORT};
use exec::run;
pub use exec::EXEC_TIMEOUT;
pub use hosts::relay_host_lan_ip;
pub use kube_proxy::{
    kube_proxy_ruleset, stale_udp_entries, KubeProxyMode, KubeService, Proto, UdpEndpoints,
    UdpTuple, KUBE_PROXY_NODES, SERVICE_CIDR,
};
pub use options::LabOptions;
use roles::cidr24;
pub use roles::{
    edge_host_ip, edge_lan_cidr, edge_pod_cidr, edge_pod_gw, edge_pod_ip, nat_lan_ip, nat_wan_ip,
    NsRef, Role, APISERVER_IP, CLOUD2_LAN_IP, CLOUD_LAN, CPOD1_CIDR, CPOD1_GW, CPOD1_IP,
    CPOD2_CIDR, CPOD2_GW, CPOD2_IP, RELAY_LAN_IP, RELAY_WAN_IP, SITES, WAN, WAN_GW,
};

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

/// The lab: the namespaces of the module docs (thirteen by default).
/// Dropping it deletes them all.
pub struct NetnsLab {
    tag: String,
    names: Vec<String>,
    /// Namespaces that exist and must be deleted on drop, in creation order.
    created: Vec<String>,
    build_time: Duration,
    opts: LabOptions,
    /// The VXLAN encapsulators of [`LabOptions::cloud_overlay`].
    encapsulators: Vec<cloud_overlay::Encapsulator>,
    /// Each UDP Service port's endpoints at the last
    /// [`NetnsLab::sync_services`]: kube-proxy's conntrack cleanup runs
    /// after a sync that changes them.
    kube_udp: std::sync::Mutex<kube_proxy::UdpEndpoints>,
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
        opts.check_cloud_overlay()?;
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
            encapsulators: Vec::new(),
            kube_udp: Default::default(),
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
            // Strict reverse-path filtering, as RHEL-family nodes have by
            // default (Debian's and Ubuntu's systemd sets loose): a packet
            // whose source would not be routed back out of the interface
            // it came in on is dropped. `all` raises every interface to it.
            self.exec(role, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"])?;
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
        // would add for the edges on the nodes that do not run the relay;
        // or a cloud's fabric with a VXLAN overlay, and no edge routes.
        if self.opts.cloud_overlay {
            self.build_cloud_overlay()?;
        } else {
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
        if self.opts.silent_wan {
            // Silently, as a cloud's router or a carrier drops private
            // addresses it has no route for.
            self.ip(Wan, "route add blackhole default")?;
        }
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
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        // Threads first: each holds its node's TAP device and namespace.
        self.stop_encapsulators();
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
