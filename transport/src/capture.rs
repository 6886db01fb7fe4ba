//! Capture of traffic towards a set of IPv4 prefixes, with nftables NAT
//! redirection and policy routing, in a table and a routing table of our
//! own.
//!
//! What gets installed (names and numbers from [`CaptureConfig`]):
//! ```text
//! table inet <nft_table> {
//!   set dst4  { type ipv4_addr; flags interval; }   # the captured prefixes
//!   set skip4 { type ipv4_addr; flags interval; }   # never captured (own routes)
//!   set src4  { type ipv4_addr; flags interval; }   # sources allowed in prerouting
//!   counter src_refused {}                          # flows from other sources
//!   chain pre_nat { type nat hook prerouting priority -110;   # before kube-proxy
//!     ip daddr @skip4 return
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svcskip4 return
//!     ip daddr @dst4 ip saddr != @src4 counter name src_refused return
//!     ip daddr @dst4 meta l4proto { tcp, udp } dnat ip to <redirect_address>:<port> }
//!   chain out_nat { type nat hook output priority -110;
//!     meta mark <own_mark> return
//!     ip daddr @skip4 return
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svcskip4 return
//!     ip daddr @dst4 meta l4proto { tcp, udp } dnat ip to <redirect_address>:<port> }
//!   set svc4 { type ipv4_addr . inet_proto . inet_service; }  # captured ClusterIP ports
//!   set svcskip4 { type ipv4_addr . inet_proto . inet_service; }  # ClusterIP ports left to kube-proxy
//!   set np4 { type inet_proto . inet_service; }   # captured node ports, IPv4 only as the listeners
//!   set npaddr4 { type ipv4_addr; flags interval; }  # the addresses node ports are taken on
//!                                  # (capture.node_port_addresses; default 0.0.0.0/0)
//!   set svcext4 { type ipv4_addr . inet_proto . inet_service; }  # captured external IP ports (relay)
//!   chain svc_ranged { }           # load-balancer IP ports with loadBalancerSourceRanges (relay), once
//!                                  # there are some (see Capture::apply_open_services):
//!     # set svcextsrc4 { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval; }
//!     # meta l4proto { tcp, udp } ip saddr . ip daddr . meta l4proto . th dport @svcextsrc4 dnat ip to <redirect_address>:<port>
//!   chain svc_pre { type nat hook prerouting priority -150;  # before kube-proxy (-100)
//!     meta nfproto ipv4 fib daddr type local ip daddr @npaddr4 meta l4proto { tcp, udp } meta l4proto . th dport @np4 dnat ip to <redirect_address>:<port>
//!     jump svc_ranged
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svcext4 dnat ip to <redirect_address>:<port>
//!     ip saddr != @src4 return
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svc4 dnat ip to <redirect_address>:<port> }   # and its nftables mode (-110)
//!   chain svc_out { type nat hook output priority -150;
//!     meta mark <own_mark> return
//!     meta nfproto ipv4 fib daddr type local ip daddr @npaddr4 meta l4proto { tcp, udp } meta l4proto . th dport @np4 dnat ip to <redirect_address>:<port>
//!     jump svc_ranged
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svcext4 dnat ip to <redirect_address>:<port>
//!     meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @svc4 dnat ip to <redirect_address>:<port> }
//!   chain guard { type filter hook input priority filter;
//!     th dport <port> ct status dnat accept      # only redirected traffic
//!     th dport <port> drop }                     # reaches the listeners
//!   chain unnated { type filter hook output priority filter;
//!     ip saddr <redirect_address> udp sport <port> ct state new drop }  # a captured UDP reply whose entry is gone
//!   # with preserve_source(_served) only (dials from the client's address, see install_kept_sources):
//!   chain src_pre { type filter hook prerouting priority mangle;
//!     ct direction reply ct mark & <own_mark> == <own_mark> meta mark set <reply_mark> }
//!   chain src_out { type route hook output priority mangle;
//!     meta mark <own_mark> fib saddr type != local ct mark set ct mark | <own_mark>
//!     ct direction reply ct mark & <own_mark> == <own_mark> meta mark set <reply_mark> }
//!   # with refuse_ipv6 (an edge's; see capture/refuse6.rs): IPv6 tunnel prefixes refused, not leaked
//!   set dst6 { type ipv6_addr; flags interval; }   # the IPv6 prefixes asked for (none captured)
//!   set skip6 { type ipv6_addr; flags interval; }  # never refused: served, connected subnets,
//!                                                  # main-table routes but the default, peers
//!   # <never>: loopback, link-local, multicast, NAT64's prefixes (refuse6::NEVER)
//!   set src6 { type ipv6_addr; flags interval; }   # forwarded sources refused (IPv6 of src4's list)
//!   counter v6_refused {}                          # packets refused (Capture::refused_ipv6)
//!   chain v6_fwd { type filter hook forward priority filter;
//!     ip6 daddr { <never> } return
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp counter name v6_refused reject with tcp reset
//!     ip6 daddr @dst6 ip6 saddr @src6 counter name v6_refused reject with icmpx admin-prohibited }
//!   chain v6_out { type filter hook output priority filter;
//!     meta mark <own_mark> return
//!     ip6 daddr { <never> } return
//!     ip6 daddr @skip6 return
//!     ip6 daddr @dst6 meta l4proto tcp counter name v6_refused reject with tcp reset
//!     ip6 daddr @dst6 counter name v6_refused reject with icmpx admin-prohibited }
//! }
//! ip rule  fwmark <reply_mark> lookup <route_table> pref <rule_pref - 1> # replies to them
//! ip rule  fwmark <own_mark> lookup main      pref <rule_pref - 1>   # our own sockets bypass
//! ip rule  iif lo lookup <route_table> suppress_prefixlength 0 pref <rule_pref>  # the one capture rule
//! ip route local <prefix> dev lo src 127.0.0.1 table <route_table>   # the captured addresses, as
//!                                  # prefixes, but skipped prefixes and captured peers (below)
//! ip route local default dev lo src 127.0.0.1 table <route_table>    # for the reply mark only
//! ip addr <redirect_address>/32 dev lo scope host label lo:edge_relay  # where captured traffic is sent
//! ```
//! The policy rules are a fixed few, whatever the number of prefixes: the
//! kernel walks them as a list on every route lookup without a cached
//! route (a host process's unconnected send, the source check of every
//! forwarded packet's flow), and capture once had one rule per captured,
//! skipped and peer prefix: ~20,000 on a relay with 10,000 edges, where
//! an unconnected UDP send took 122 µs instead of 3.7 µs (measured in a
//! namespace with 10,000 such rules). Per-prefix work is in the routing
//! table, a longest-prefix-match trie.
//! Why a capture address of our own and not nft's `redirect`: `redirect`
//! in prerouting rewrites the destination to the first IPv4 address of the
//! interface the packet came in on, and drops the packet when that
//! interface has none. Calico and Cilium wire pods with routed veths whose
//! host side has no address (the pod's gateway is answered by proxy ARP),
//! so every captured pod connection was dropped there, edge and relay node
//! alike. An address on `lo` is local whichever way a packet arrives; host
//! scope keeps the kernel from picking it as a source for anything else.
//! Why NAT and not TPROXY: on Kubernetes nodes `bridge-nf-call-iptables`
//! is 1 (kubeadm requires it), so traffic from pods behind a bridge runs the
//! IP prerouting hooks at bridge level, and the kernel drops the socket
//! TPROXY assigned there before the packet reaches the IP stack: captured
//! pod traffic would vanish. Redirection is conntrack NAT, which survives
//! that path (kube-proxy depends on it); the original destination comes
//! back from conntrack (see [`crate::conntrack`]), and replies are un-NATed
//! by the kernel.
//!
//! Locally generated packets (hostNetwork processes) need a route before
//! the output NAT hook sees them; the capture rule gives them capture's
//! routing table, whose `local` routes name a real local source
//! (`127.0.0.1`), since a source equal to the foreign destination fails
//! with ENETUNREACH. The rule matches `iif lo` (locally generated) only:
//! forwarded traffic that is captured was already redirected to a local
//! address in prerouting, and forwarded traffic that is not (a source
//! outside `src4`) must be routed as if capture were not there, not
//! delivered locally. A lookup the table has no route for (an address not
//! captured) goes on to the next rules, as if the rule were not there;
//! `suppress_prefixlength 0` makes the table's `local default`, there for
//! the reply mark (see `install_kept_sources`), count as no route for
//! this rule, so the whole table can serve both.
//!
//! The routes are the captured addresses less the skipped prefixes and
//! the captured peers, cut into the fewest prefixes (`capture_routes`):
//! a skipped `/26` inside a captured `/24` leaves two routes, a `/26` and
//! a `/25`. Not `throw` routes over `local` ones: a `throw` would end the
//! reply mark's lookup too (a reply to a kept client inside a skipped
//! prefix, or at a peer's address, must still be delivered here), and a
//! captured prefix inside a skipped one would win over it (the longest
//! prefix does), where the per-prefix rules let the skip win.
//!
//! **Peers inside captured prefixes.** The kernel checks the source of
//! every packet it receives by looking up the route back to it as if
//! from `lo` (`fib_validate_source`; with policy rules installed it always
//! does, whatever `rp_filter` says), so the `iif lo` rules above answer
//! that lookup too: for a source inside a captured prefix the answer is
//! the local route, and the packet is dropped as a martian. Traffic that
//! capture carries never arrives from such a source, but the tunnel's own
//! connection can: an edge dialling the relay at an address inside a
//! tunnel route (the relay node's own subnet listed as a cloud range, a
//! relay on a public address reached over a VPN), or a relay whose edge
//! arrives without NAT (a private APN, a site VPN), its node address both
//! claimed and the session's source. Every packet of that connection was
//! dropped the moment the routes were installed, and the session never
//! came back. So [`Capture::apply`] takes the tunnel's peers: each one
//! inside a captured prefix is cut out of the capture routes (a hole of
//! one address, so the lookup goes on to the main table), which answers
//! the source check with the main table's route (the one the connection
//! uses). It is a routing hole only, not a skip: host processes
//! connecting to that address are still captured (the output NAT hook
//! redirects them; the main table only has to have a route, which it has,
//! the peer being reachable).
//!
//! Sources ([`Capture::apply_sources`]): only forwarded traffic from the
//! prefixes in `src4` is captured (on an edge: its pod CIDRs and addresses,
//! so a LAN device that routes through the node does not reach the cloud;
//! on the relay node: the cloud ranges, so a host that routes edge prefixes
//! to the relay's public address does not reach the edges). Host processes
//! (the output hook) are the node itself and are captured whatever their
//! source. A refused flow's first packet is counted in the `src_refused`
//! counter ([`Capture::refused_sources`]); NAT chains see only first packets.
//!
//! ClusterIP ports ([`Capture::apply_services`]) are captured by exact
//! `address . protocol . port`, in chains at priority -150: kube-proxy
//! DNATs ClusterIPs in the same hooks at -100 (and its nftables mode has
//! filter chains at -110), and a connection gets one NAT binding per hook,
//! so whatever NATs first wins. Redirected first, the original destination
//! the listener recovers is the ClusterIP:port itself; redirected after
//! kube-proxy it would be one endpoint, chosen on the wrong node. Host
//! processes need a route to the ClusterIP for the output hook to run at
//! all; every Kubernetes node has one (default route or service CIDR).
//!
//! `svcskip4` holds ClusterIP ports whose endpoints are all on this node
//! (an edge's own Services): a service range captured as a prefix would
//! otherwise send them through the tunnel and back, while the node's own
//! kube-proxy reaches them locally. Each also gets a bypass rule
//! (`to <ip>/32 ipproto <p> dport <port> lookup main`, at `rule_pref - 1`)
//! so host processes route it by the main table, not the capture route
//! (an edge's own Services: a few, not one per edge).
//!
//! [`Capture::teardown`] removes everything but the capture address on
//! `lo`, which connections and flows captured before the exit still need
//! (see `remove_on_exit`), and [`Capture::install`] first removes whatever
//! a previous run left, the address included: every rule at `rule_pref`
//! and `rule_pref - 1` and every route of `route_table`, so the
//! per-prefix rules an older version left go at the first start after an
//! upgrade (one batch; 10,000 took 0.2 s). A clean exit
//! ([`Capture::stop`]) leaves the address and, for `hold_after_exit`,
//! filter rules that refuse what was captured, in a table of their own
//! (put in place with the capture table's removal, in one transaction):
//! the next run (a rollout's new pod) removes them once its first
//! [`Capture::apply`] has captured again, not at install, and they stop
//! refusing on their own if none comes (the set's elements time out; the
//! empty table stays).

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::io::AsyncWriteExt;

pub use crate::capture_config::{CaptureConfig, CaptureFile};
use tokio::process::Command;
use tracing::{debug, warn};
mod bypass;
mod park;
mod refuse6;
pub use refuse6::routed_ipv6;
mod repair;
mod services;
#[cfg(test)]
mod tests;
pub use services::{
    conntrack_delete_args, is_local_address, ranged_services_script, services_script,
    socket_lb_suspected, warn_if_socket_lb, RangedSet, ServiceSet,
};

/// A capture command failed.
#[derive(Debug, thiserror::Error)]
#[error("{cmd}: {msg}")]
pub struct CaptureError {
    /// The command line (or script name) that failed.
    pub cmd: String,
    /// Its error output.
    pub msg: String,
}

/// Runs a command (no shell) with a 10 s bound, feeding `stdin`; returns
/// its standard output, or fails with its standard error. Shared by every
/// piece that drives `nft` and `ip` (capture here, the route agent).
pub async fn command(
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CaptureError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let fail = |msg: String| CaptureError {
        cmd: cmd.clone(),
        msg,
    };
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| fail("timed out after 10s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

async fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<(), CaptureError> {
    command(prog, args, stdin).await.map(|_| ())
}

async fn output(prog: &str, args: &[&str]) -> Result<String, CaptureError> {
    command(prog, args, None).await
}

/// Transport protocol of a captured service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The nftables / conntrack name.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Installed capture state; [`Capture::apply`] moves it to a new prefix
/// set, [`Capture::apply_services`] to a new set of service ports.
#[derive(Debug)]
pub struct Capture {
    cfg: CaptureConfig,
    installed: BTreeSet<Cidr>,
    skipped: BTreeSet<Cidr>,
    /// The prefixes with a `local` route in the routing table: the
    /// addresses of `installed` minus those of `skipped` and of the peers
    /// inside `installed` (see `capture_routes`).
    routes: BTreeSet<Cidr>,
    services: BTreeSet<(SocketAddr, Proto)>,
    local_services: BTreeSet<(SocketAddr, Proto)>,
    /// External and load-balancer IP ports, taken from any source.
    open_services: BTreeSet<(SocketAddr, Proto)>,
    /// Load-balancer IP ports taken only from their source ranges.
    ranged_services: RangedSet,
    /// Whether the kernel and nft took the source-range set (intervals in
    /// a concatenated key need Linux 5.6 and nft 0.9.4): `None` until the
    /// first such port asks for it.
    ranged_support: Option<bool>,
    node_ports: BTreeSet<(u16, Proto)>,
    /// `None` until [`Capture::apply_sources`]: every source.
    sources: Option<BTreeSet<Cidr>>,
    /// Whether [`Capture::install`] put it on the node (false for
    /// [`Capture::uninstalled`] until a [`Capture::repair`] succeeds).
    on_node: bool,
    /// Whether a previous run's held refusals (see `capture/park.rs`) may
    /// still be on the node: true until the first [`Capture::apply`]
    /// succeeds, which removes them.
    held_pending: bool,
    /// Deletes the conntrack entries of flows that went past capture
    /// (see `capture/bypass.rs`), off the apply path.
    sweeper: bypass::Sweeper,
    /// The IPv6 prefixes asked for and not captured (warned once per set).
    ignored6: crate::log_sample::OncePerSet<Cidr>,
    /// Their refusal, for [`CaptureConfig::refuse_ipv6`] (see
    /// `capture/refuse6.rs`).
    refuse6: refuse6::Refusal6,
}

impl Capture {
    /// Removes leftovers of a previous run, then installs the table, the
    /// bypass and capture rules and the local default route, with no
    /// prefix captured yet. A
    /// failure removes what it had put in place (a table redirecting to
    /// an address not on `lo` would drop what it caught).
    pub async fn install(cfg: CaptureConfig) -> Result<Capture, CaptureError> {
        match Capture::install_once(cfg.clone()).await {
            Ok(c) => Ok(c),
            Err(e) => {
                remove_all(&cfg).await;
                Err(e)
            }
        }
    }

    /// A capture that is not on the node (its install failed: a kernel
    /// without NAT chains in an `inet` table, before Linux 5.2, or nft
    /// missing): the owner keeps running without it, and
    /// [`Capture::repair`] installs it when it can. Its `apply*` calls
    /// fail until then.
    pub fn uninstalled(cfg: CaptureConfig) -> Capture {
        Capture {
            on_node: false,
            ..Capture::empty(cfg)
        }
    }

    /// Whether capture is on the node (see [`Capture::uninstalled`]).
    pub fn is_installed(&self) -> bool {
        self.on_node
    }

    fn empty(cfg: CaptureConfig) -> Capture {
        Capture {
            cfg,
            installed: BTreeSet::new(),
            skipped: BTreeSet::new(),
            routes: BTreeSet::new(),
            services: BTreeSet::new(),
            local_services: BTreeSet::new(),
            open_services: BTreeSet::new(),
            ranged_services: RangedSet::new(),
            ranged_support: None,
            node_ports: BTreeSet::new(),
            sources: None,
            on_node: true,
            held_pending: true,
            sweeper: bypass::Sweeper::default(),
            ignored6: Default::default(),
            refuse6: Default::default(),
        }
    }

    async fn install_once(cfg: CaptureConfig) -> Result<Capture, CaptureError> {
        if cfg.own_mark & crate::capture_config::KUBE_PROXY_MARK_BITS != 0 {
            warn!(
                mark = format_args!("{:#x}", cfg.own_mark),
                "capture.mark has kube-proxy's masquerade/drop bits ({:#x}): on a kube-proxy node our own sockets' packets are masqueraded (or dropped); the default is {:#x}",
                crate::capture_config::KUBE_PROXY_MARK_BITS,
                crate::capture_config::DEFAULT_MARK
            );
        }
        remove_all(&cfg).await;
        let t = &cfg.nft_table;
        let (mark, p, a) = (cfg.own_mark, cfg.port, cfg.redirect_address);
        let npaddr = node_port_address_elements(&cfg);
        let script = format!(
            "table inet {t} {{\n\
             set dst4 {{ type ipv4_addr; flags interval; }}\n\
             set skip4 {{ type ipv4_addr; flags interval; }}\n\
             set svc4 {{ type ipv4_addr . inet_proto . inet_service; }}\n\
             set svcskip4 {{ type ipv4_addr . inet_proto . inet_service; }}\n\
             set src4 {{ type ipv4_addr; flags interval; elements = {{ 0.0.0.0/0 }} }}\n\
             counter src_refused {{ }}\n\
             chain pre_nat {{ type nat hook prerouting priority -110; policy accept;\n\
             ip daddr @skip4 return\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svcskip4 return\n\
             ip daddr @dst4 ip saddr != @src4 counter name src_refused return\n\
             ip daddr @dst4 meta l4proto {{ tcp, udp }} dnat ip to {a}:{p}\n\
             }}\n\
             chain out_nat {{ type nat hook output priority -110; policy accept;\n\
             meta mark {mark:#x} return\n\
             ip daddr @skip4 return\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svcskip4 return\n\
             ip daddr @dst4 meta l4proto {{ tcp, udp }} dnat ip to {a}:{p}\n\
             }}\n\
             set np4 {{ type inet_proto . inet_service; }}\n\
             set npaddr4 {{ type ipv4_addr; flags interval; elements = {{ {npaddr} }} }}\n\
             set svcext4 {{ type ipv4_addr . inet_proto . inet_service; }}\n\
             chain svc_ranged {{\n\
             }}\n\
             chain svc_pre {{ type nat hook prerouting priority -150; policy accept;\n\
             meta nfproto ipv4 fib daddr type local ip daddr @npaddr4 meta l4proto {{ tcp, udp }} meta l4proto . th dport @np4 dnat ip to {a}:{p}\n\
             jump svc_ranged\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svcext4 dnat ip to {a}:{p}\n\
             ip saddr != @src4 return\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svc4 dnat ip to {a}:{p}\n\
             }}\n\
             chain svc_out {{ type nat hook output priority -150; policy accept;\n\
             meta mark {mark:#x} return\n\
             meta nfproto ipv4 fib daddr type local ip daddr @npaddr4 meta l4proto {{ tcp, udp }} meta l4proto . th dport @np4 dnat ip to {a}:{p}\n\
             jump svc_ranged\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svcext4 dnat ip to {a}:{p}\n\
             meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @svc4 dnat ip to {a}:{p}\n\
             }}\n\
             chain guard {{ type filter hook input priority filter; policy accept;\n\
             meta l4proto {{ tcp, udp }} th dport {p} ct status dnat accept\n\
             meta l4proto {{ tcp, udp }} th dport {p} drop\n\
             }}\n\
             chain unnated {{ type filter hook output priority filter; policy accept;\n\
             ip saddr {a} udp sport {p} ct state new drop\n\
             }}\n}}\n"
        );
        run("nft", &["-f", "-"], Some(&script)).await?;
        let here = format!("{a}/32");
        run(
            "ip",
            &[
                "-4",
                "addr",
                "replace",
                &here,
                "dev",
                "lo",
                "scope",
                "host",
                "label",
                ADDRESS_LABEL,
            ],
            None,
        )
        .await?;
        if cfg.keeps_sources() {
            install_kept_sources(&cfg).await?;
        }
        let table = cfg.route_table.to_string();
        let mark = format!("{:#x}", cfg.own_mark);
        let (pref, bypass) = (cfg.rule_pref.to_string(), (cfg.rule_pref - 1).to_string());
        run(
            "ip",
            &[
                "-4", "rule", "add", "fwmark", &mark, "lookup", "main", "pref", &bypass,
            ],
            None,
        )
        .await?;
        // The one capture rule, whatever the number of prefixes (see the
        // module docs); `suppress_prefixlength 0` ignores the table's
        // `local default`, which is there for the reply mark only.
        run(
            "ip",
            &[
                "-4",
                "rule",
                "add",
                "iif",
                "lo",
                "lookup",
                &table,
                "suppress_prefixlength",
                "0",
                "pref",
                &pref,
            ],
            None,
        )
        .await?;
        let local = [
            "-4",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "src",
            "127.0.0.1",
            "table",
            &table,
        ];
        run("ip", &local, None).await?;
        let mut cap = Capture::empty(cfg);
        // Last, and never a failure of the install (see capture/refuse6.rs).
        if cap.cfg.refuse_ipv6 {
            cap.refuse6.installed = refuse6::install(&cap.cfg).await;
        }
        Ok(cap)
    }

    /// The configuration in force.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// The prefixes captured now.
    pub fn installed(&self) -> &BTreeSet<Cidr> {
        &self.installed
    }

    /// Captures exactly `want`.
    ///
    /// The nft sets are rewritten whole in one transaction (`flush` + `add`
    /// in a single `nft -f`, so there is no instant with an empty set):
    /// interval sets refuse overlapping elements, and a cluster range such
    /// as `10.244.0.0/16` legitimately overlaps per-node `/24`s, so the set
    /// gets the minimal cover of `want`. The routing table's `local`
    /// routes (`capture_routes`) are changed by difference in one
    /// `ip -batch`, however many there are; the policy rules stay as
    /// [`Capture::install`] left them.
    ///
    /// `skip` lists prefixes never to capture even inside a captured one
    /// (an edge's own pod CIDR inside the cluster range it sends to the
    /// relay): they return early in nft and are left out of the routes.
    ///
    /// `peers` are the addresses the tunnel's own connections come from
    /// (the relay, for an edge; edges' source addresses, for the relay):
    /// those inside a captured prefix are left out of the routes too, so
    /// that their packets pass the kernel's source check (see the module
    /// docs).
    pub async fn apply(
        &mut self,
        want: &BTreeSet<Cidr>,
        skip: &BTreeSet<Cidr>,
        peers: &BTreeSet<IpAddr>,
    ) -> Result<(), CaptureError> {
        // IPv4 only: the listeners are IPv4. An IPv6 prefix is reported,
        // not half-captured, and refused with `refuse_ipv6` (an edge's).
        let v4 = |set: &BTreeSet<Cidr>| -> BTreeSet<Cidr> {
            set.iter().filter(|c| c.addr().is_ipv4()).copied().collect()
        };
        let (want4, skip4) = (v4(want), v4(skip));
        let want6: BTreeSet<Cidr> = want.difference(&want4).copied().collect();
        if let Some(prefixes) = self.ignored6.changed(&want6) {
            warn!(
                ignored = want6.len(),
                %prefixes,
                refused = self.refuse6.installed,
                "IPv6 prefixes are not captured"
            );
        }
        self.apply_refused6(&want6, skip, peers).await;
        let routes = capture_routes(&want4, &bypassed_prefixes(&want4, &skip4, peers));
        if want4 == self.installed && skip4 == self.skipped && routes == self.routes {
            self.release_held().await;
            return Ok(());
        }
        if want4 != self.installed || skip4 != self.skipped {
            let t = &self.cfg.nft_table;
            let nft = rewrite_set(t, "dst4", &want4) + &rewrite_set(t, "skip4", &skip4);
            run("nft", &["-f", "-"], Some(&nft)).await?;
        }
        let batch = route_batch(self.cfg.route_table, &self.routes, &routes);
        // `-force` applies every line even if one fails (a route already
        // gone); the sets above decide what is caught, so a failed line is
        // logged, not retried forever.
        if !batch.is_empty() {
            if let Err(e) = run("ip", &["-4", "-force", "-batch", "-"], Some(&batch)).await {
                warn!(error = %e, "some capture routes did not apply");
            }
        }
        debug!(
            prefixes = want4.len(),
            skipped = skip4.len(),
            routes = routes.len(),
            "capture updated"
        );
        // Flows that began while these addresses were not captured would
        // keep going past capture (NAT sees a flow's first packet only):
        // deleted by a task of their own, so that this update (and the
        // captured set the caller publishes after it) does not wait.
        let added = bypass::newly_captured(&want4, &skip4, &self.installed, &self.skipped);
        self.sweeper.queue(added);
        self.installed = want4;
        self.skipped = skip4;
        self.routes = routes;
        self.release_held().await;
        Ok(())
    }

    /// Captures forwarded traffic only from `sources` (IPv4 prefixes; IPv6
    /// ones are left out, and an empty set captures no forwarded traffic).
    /// Until the first call every source is allowed. Host processes' own
    /// traffic is not affected (see the module docs). The set is rewritten
    /// whole in one transaction.
    pub async fn apply_sources(&mut self, sources: &BTreeSet<Cidr>) -> Result<(), CaptureError> {
        // With `refuse_ipv6`, the IPv6 ones are the refusal's (src6).
        self.apply_sources6(sources).await;
        let v4: BTreeSet<Cidr> = sources
            .iter()
            .filter(|c| c.addr().is_ipv4())
            .copied()
            .collect();
        if self.sources.as_ref() == Some(&v4) {
            return Ok(());
        }
        let nft = rewrite_set(&self.cfg.nft_table, "src4", &v4);
        run("nft", &["-f", "-"], Some(&nft)).await?;
        debug!(sources = v4.len(), "capture sources updated");
        self.sources = Some(v4);
        Ok(())
    }

    /// Flows (first packets) that reached a captured prefix from a source
    /// outside [`Capture::apply_sources`]'s set and were left uncaptured.
    pub async fn refused_sources(&self) -> Result<u64, CaptureError> {
        let t = &self.cfg.nft_table;
        let out = output("nft", &["list", "counter", "inet", t, "src_refused"]).await?;
        Ok(parse_counter_packets(&out).unwrap_or(0))
    }

    /// Removes what capture installed, at once (see also
    /// [`Capture::stop`]), but the capture address on `lo` (see
    /// `remove_on_exit`).
    pub async fn teardown(self) {
        remove_on_exit(&self.cfg).await;
    }
}

/// Removes our table, the capture address, our rules and our routing
/// table's routes; every step is allowed to find nothing (see
/// [`remove_routing`]).
async fn remove_all(cfg: &CaptureConfig) {
    let _ = run("nft", &["delete", "table", "inet", &cfg.nft_table], None).await;
    let here = format!("{}/32", cfg.redirect_address);
    let _ = run("ip", &["-4", "addr", "del", &here, "dev", "lo"], None).await;
    // And any capture address an earlier run added under another
    // `redirect_address` (kept after its exit, see `remove_on_exit`),
    // found by its label: left, the node would keep answering that
    // address itself.
    let _ = run(
        "ip",
        &["-4", "addr", "flush", "dev", "lo", "label", ADDRESS_LABEL],
        None,
    )
    .await;
    remove_routing(cfg).await;
}

/// The label capture's address carries on `lo` (`ip addr show label`), so
/// a start finds an earlier run's address whatever its config said.
const ADDRESS_LABEL: &str = "lo:edge_relay";

/// What an exiting process removes: everything but the capture address on
/// `lo`, which the next start removes and adds again. Captured
/// connections and flows outlive the table: their conntrack entries still
/// send their packets to that address. With it gone the kernel could not
/// route from it, so this process's sockets could never send their FIN
/// or reset (the client hung for its retry limit, ~15 minutes, or for
/// ever reading), and the flows' packets were forwarded by the default
/// route, past the held refusals (the filter hooks see them already
/// rewritten to the capture address, which those do not list). Kept, the
/// packets reach a local port with
/// no listener once the process is gone: refused at once (TCP reset, ICMP
/// port unreachable). An uninstalled client leaves the address behind (a
/// host-scoped `/32`, harmless; deploy/README.md says how to remove it).
async fn remove_on_exit(cfg: &CaptureConfig) {
    let _ = run("nft", &["delete", "table", "inet", &cfg.nft_table], None).await;
    remove_routing(cfg).await;
}

/// Removes our rules and our routing table's routes. Rules are found by
/// priority (ours are at `rule_pref` and `rule_pref - 1`) and deleted in
/// one batch per family.
async fn remove_routing(cfg: &CaptureConfig) {
    let table = cfg.route_table.to_string();
    let ours = [cfg.rule_pref.to_string(), (cfg.rule_pref - 1).to_string()];
    for fam in ["-4", "-6"] {
        let listing = match output("ip", &[fam, "rule", "show"]).await {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "listing rules");
                continue;
            }
        };
        let mut batch = String::new();
        for line in listing.lines() {
            // "7100:\tfrom all to 10.244.7.0/24 lookup 7100"
            let Some((pref, rest)) = line.split_once(':') else {
                continue;
            };
            if ours.iter().any(|p| p == pref.trim()) {
                let _ = writeln!(batch, "rule del pref {} {}", pref.trim(), rest.trim());
            }
        }
        if !batch.is_empty() {
            let _ = run("ip", &[fam, "-force", "-batch", "-"], Some(&batch)).await;
        }
        let _ = run("ip", &[fam, "route", "flush", "table", &table], None).await;
    }
}

/// The prefixes left out of the capture routes: every skipped prefix, and
/// each IPv4 peer inside a captured prefix (as a `/32`; one outside needs
/// nothing). A peer in IPv4-mapped form (`::ffff:a.b.c.d`, how a relay
/// listening on `[::]` sees IPv4 edges) is its IPv4 address. Containment
/// is looked up by prefix length (33 set lookups per peer), not by
/// scanning the captured prefixes: a relay has as many peers as sessions.
fn bypassed_prefixes(
    want4: &BTreeSet<Cidr>,
    skip4: &BTreeSet<Cidr>,
    peers: &BTreeSet<IpAddr>,
) -> BTreeSet<Cidr> {
    let captured = |p: &IpAddr| {
        (0..=32).any(|len| Cidr::containing(*p, len).is_some_and(|c| want4.contains(&c)))
    };
    let peers = peers
        .iter()
        .map(|p| p.to_canonical())
        .filter(|p| p.is_ipv4() && captured(p))
        .map(Cidr::host);
    skip4.iter().copied().chain(peers).collect()
}

/// The prefixes routed `local` in capture's routing table: the addresses
/// of `want4` but those of `bypassed`, as the fewest prefixes. Holes are
/// cut out rather than marked with `throw` routes: a `throw` would also
/// end the reply-mark lookup (a kept-source dial's reply to a client
/// inside a skipped prefix, or to a peer, must still be delivered here by
/// the table's `local default`), and it could not exempt a captured
/// prefix that lies inside a skipped one (the longer prefix wins). A
/// captured `/24` with a peer inside becomes 8 prefixes; disjoint
/// captured prefixes stay one route each, adjacent ones merge.
fn capture_routes(want4: &BTreeSet<Cidr>, bypassed: &BTreeSet<Cidr>) -> BTreeSet<Cidr> {
    bypass::Ranges::of(want4)
        .minus(&bypass::Ranges::of(bypassed))
        .prefixes()
        .into_iter()
        .collect()
}

/// The `ip -batch` lines moving capture's routing table `table` from the
/// `old` routes to the `new` ones: additions first, so that an address
/// whose route changes shape (a hole cut or closed, prefixes merged) is
/// never without one; `replace`, so that one already there (a repair, a
/// line that failed before) is no error.
fn route_batch(table: u32, old: &BTreeSet<Cidr>, new: &BTreeSet<Cidr>) -> String {
    let mut batch = String::new();
    for c in new.difference(old) {
        let _ = writeln!(
            batch,
            "route replace local {c} dev lo src 127.0.0.1 table {table}"
        );
    }
    for c in old.difference(new) {
        let _ = writeln!(batch, "route del local {c} dev lo table {table}");
    }
    batch
}

/// The nft lines that make set `set` of table `table` hold exactly `items`
/// (as their minimal cover: interval sets refuse overlapping elements),
/// for one `nft -f` transaction.
fn rewrite_set(table: &str, set: &str, items: &BTreeSet<Cidr>) -> String {
    let mut nft = format!("flush set inet {table} {set}\n");
    if let Some(list) = cover_list(items) {
        let _ = writeln!(nft, "add element inet {table} {set} {{ {list} }}");
    }
    nft
}

/// `items`' minimal cover as an nft element list (`a, b`), `None` when
/// empty.
fn cover_list(items: &BTreeSet<Cidr>) -> Option<String> {
    let cover: Vec<String> = minimal_cover(items).iter().map(|c| c.to_string()).collect();
    (!cover.is_empty()).then(|| cover.join(", "))
}

/// The packet count of an `nft list counter` listing
/// (`... packets 3 bytes 180 ...`).
pub fn parse_counter_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

/// The elements of the `npaddr4` set: the addresses node ports are taken
/// on (`capture.node_port_addresses`, merged: nft refuses overlapping
/// intervals), or every address (`0.0.0.0/0`) by default.
pub fn node_port_address_elements(cfg: &CaptureConfig) -> String {
    cfg.node_port_addresses
        .as_ref()
        .and_then(cover_list)
        .unwrap_or_else(|| "0.0.0.0/0".to_string())
}

/// The prefixes of `set` not contained in another prefix of `set`,
/// shortest first. Each prefix's shorter containing prefixes are looked
/// up in the set by length (at most 32 lookups for IPv4), not by scanning
/// what was kept: that was quadratic, and rewriting the sets of a relay
/// with 10,000 prefixes spent a second in it (a debug build) on every
/// update.
pub fn minimal_cover(set: &BTreeSet<Cidr>) -> Vec<Cidr> {
    let mut by_len: Vec<Cidr> = set
        .iter()
        .filter(|c| {
            !(0..c.prefix_len())
                .any(|len| Cidr::containing(c.addr(), len).is_some_and(|p| set.contains(&p)))
        })
        .copied()
        .collect();
    by_len.sort_by_key(|c| c.prefix_len());
    by_len
}

/// What dials from a client's address need ([`CaptureConfig::preserve_source`]):
/// the kernel lets this process use `IP_TRANSPARENT` (else start fails,
/// naming the field), the connections of our sockets bound to a foreign
/// address carry our mark in conntrack (`src_out`, original direction;
/// `fib saddr type != local` tells them from our other sockets), their
/// replies, forwarded (`src_pre`) or answered by a host process
/// (`src_out`, a route hook, so the output route is looked up again), get
/// the reply mark, and the reply mark looks up the table whose only route
/// is `local default dev lo`, so the foreign destination is delivered here.
async fn install_kept_sources(cfg: &CaptureConfig) -> Result<(), CaptureError> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| s.set_ip_transparent_v4(true));
    if let Err(e) = probe {
        return Err(CaptureError {
            cmd: "capture.preserve_source".into(),
            msg: format!("IP_TRANSPARENT: {e} (needs CAP_NET_ADMIN)"),
        });
    }
    let (t, own, reply) = (&cfg.nft_table, cfg.own_mark, cfg.reply_mark());
    let script = format!(
        "table inet {t} {{\n\
         chain src_pre {{ type filter hook prerouting priority mangle; policy accept;\n\
         ct direction reply ct mark & {own:#x} == {own:#x} meta mark set {reply:#x}\n\
         }}\n\
         chain src_out {{ type route hook output priority mangle; policy accept;\n\
         meta mark {own:#x} fib saddr type != local ct mark set ct mark | {own:#x}\n\
         ct direction reply ct mark & {own:#x} == {own:#x} meta mark set {reply:#x}\n\
         }}\n}}\n"
    );
    run("nft", &["-f", "-"], Some(&script)).await?;
    let pref = (cfg.rule_pref - 1).to_string();
    let (reply, table) = (format!("{reply:#x}"), cfg.route_table.to_string());
    let rule = [
        "-4", "rule", "add", "fwmark", &reply, "lookup", &table, "pref", &pref,
    ];
    run("ip", &rule, None).await?;
    Ok(())
}

/// Prepares `sock` to dial from `source`, an address of another host (the
/// original client's, see [`CaptureConfig::keep_source`]): transparent,
/// bound to `source` with an ephemeral port. Needs the chains
/// [`Capture::install`] adds when `preserve_source` is set, or the replies
/// go elsewhere. Errors name the address.
pub fn bind_foreign(sock: socket2::SockRef<'_>, source: std::net::IpAddr) -> std::io::Result<()> {
    match source {
        std::net::IpAddr::V4(_) => sock.set_ip_transparent_v4(true),
        std::net::IpAddr::V6(_) => sock.set_ip_transparent_v6(true),
    }
    .and_then(|()| sock.bind(&std::net::SocketAddr::new(source, 0).into()))
    .map_err(|e| std::io::Error::new(e.kind(), format!("bind {source}: {e}")))
}

/// Marks a socket as ours so capture never catches its traffic (needs
/// CAP_NET_ADMIN; a no-op when `mark` is 0).
pub fn mark_socket(sock: socket2::SockRef<'_>, mark: u32) -> std::io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    sock.set_mark(mark)
}

/// The TCP listener for captured connections, on `0.0.0.0:port`: capture
/// translates the destination to the capture address
/// ([`CaptureConfig::redirect_address`]). The `guard` chain drops anything that reaches this port
/// without having been redirected, so nothing new is reachable from the
/// network. [`crate::conntrack::original_dst_tcp`] recovers where an
/// accepted connection was going.
pub fn capture_tcp_listener(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}
