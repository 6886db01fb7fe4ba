//! Capture of ClusterIP ports, external IP ports and node ports
//! ([`Capture::apply_services`], [`Capture::apply_open_services`],
//! [`Capture::apply_node_ports`]): the `svc4`/`svcskip4`/`svcext4`/`np4` sets, the
//! per-port bypass rules, the deletion of stale UDP conntrack entries, and
//! the socket-LB check. Separate from prefix capture (`capture.rs`), which
//! installs the table these sets live in; see the module docs there for
//! why services are captured ahead of kube-proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::SocketAddr;

use tracing::{debug, warn};

use relay_protocol::Cidr;

use super::{command, run, Capture, CaptureError, Proto};

/// A set of ClusterIP ports.
pub type ServiceSet = BTreeSet<(SocketAddr, Proto)>;

/// Load-balancer IP ports each taken only from the source prefixes listed
/// with it (a Service's `loadBalancerSourceRanges`).
pub type RangedSet = BTreeMap<(SocketAddr, Proto), BTreeSet<Cidr>>;

impl Capture {
    /// The service ports captured now.
    pub fn services(&self) -> &BTreeSet<(SocketAddr, Proto)> {
        &self.services
    }

    /// Captures exactly the ClusterIP ports `want` (IPv4; IPv6 entries are
    /// reported and left out), in prerouting and output ahead of kube-proxy
    /// (see the module docs), redirected to the capture port so the
    /// original destination is the ClusterIP:port; and exempts the ports
    /// in `local` from prefix capture (they stay with the node's own
    /// kube-proxy).
    ///
    /// Both sets are rewritten whole in one transaction. Then the UDP
    /// conntrack entries the change makes stale are deleted: a UDP "flow"
    /// keeps the NAT binding of its first packet for as long as packets
    /// keep coming, so a resolver's socket that reached an endpoint through
    /// kube-proxy's DNAT would never be captured (and one captured before a
    /// removal would keep going to the capture port). TCP connections keep
    /// their binding to their end, which is right for them. A failed
    /// `conntrack -D` (usually: no such entry) is logged, not an error.
    pub async fn apply_services(
        &mut self,
        want: &ServiceSet,
        local: &ServiceSet,
    ) -> Result<(), CaptureError> {
        let v4 = |set: &ServiceSet| -> ServiceSet {
            set.iter().filter(|(a, _)| a.is_ipv4()).copied().collect()
        };
        let (want4, local4) = (v4(want), v4(local));
        if want4.len() < want.len() {
            warn!(
                ignored = want.len() - want4.len(),
                "IPv6 service ports are not captured"
            );
        }
        if want4 == self.services && local4 == self.local_services {
            return Ok(());
        }
        // Host processes route before the output hook: a port left to
        // kube-proxy inside a captured prefix must use the main table, or
        // its packets leave with the capture route's 127.0.0.1 source
        // after kube-proxy's DNAT (dropped: a connect hangs, a send fails
        // with EINVAL). So a port never sits in `svcskip4` without its
        // bypass rule: rules are added before the sets change and removed
        // after (a rule without the set entry only routes by the main
        // table, which capture's output chains handle as well).
        let bypass = self.cfg.rule_pref - 1;
        let rules = |op: &str, set: &mut dyn Iterator<Item = &(SocketAddr, Proto)>| {
            set.map(|(a, p)| {
                format!(
                    "rule {op} to {}/32 ipproto {} dport {} lookup main pref {bypass}\n",
                    a.ip(),
                    p.as_str(),
                    a.port()
                )
            })
            .collect::<String>()
        };
        let added = rules("add", &mut local4.difference(&self.local_services));
        let removed = rules("del", &mut self.local_services.difference(&local4));
        batch_rules(&added).await;
        let t = &self.cfg.nft_table;
        let mut nft = services_script(t, "svc4", &want4);
        nft.push_str(&services_script(t, "svcskip4", &local4));
        run("nft", &["-f", "-"], Some(&nft)).await?;
        batch_rules(&removed).await;
        let stale: BTreeSet<(SocketAddr, Proto)> = want4
            .symmetric_difference(&self.services)
            .chain(local4.symmetric_difference(&self.local_services))
            .filter(|(_, p)| *p == Proto::Udp)
            .copied()
            .collect();
        self.services = want4;
        self.local_services = local4;
        delete_stale_udp(stale).await;
        debug!(
            services = self.services.len(),
            local = self.local_services.len(),
            "service capture updated"
        );
        Ok(())
    }

    /// Captures exactly the ports `want` of Services' external and
    /// load-balancer IPs (IPv4), ahead of kube-proxy as ClusterIP ports
    /// are, but from any source, as node ports are: such an address is
    /// the Service's door for clients outside the cluster; and the ports
    /// of `ranged` only from the source prefixes listed with each (a
    /// Service's `loadBalancerSourceRanges`: traffic from elsewhere is
    /// left to kube-proxy, whose firewall drops it). Both sets change in
    /// one transaction. Where the kernel cannot hold the source-range set
    /// (before Linux 5.6), ranged ports are not captured at all: left to
    /// kube-proxy, never opened to every source. Stale UDP conntrack
    /// entries are deleted as for [`Capture::apply_services`].
    pub async fn apply_open_services(
        &mut self,
        want: &ServiceSet,
        ranged: &RangedSet,
    ) -> Result<(), CaptureError> {
        let want4: ServiceSet = want.iter().filter(|(a, _)| a.is_ipv4()).copied().collect();
        let mut ranged4: RangedSet = ranged
            .iter()
            .filter(|((a, _), _)| a.is_ipv4())
            .map(|(k, r)| {
                (
                    *k,
                    r.iter().filter(|c| c.addr().is_ipv4()).copied().collect(),
                )
            })
            .collect();
        if !ranged4.is_empty() && !self.ranged_ready().await {
            // Not captured at all: kube-proxy keeps them, firewall
            // included (fails closed, never open to every source).
            ranged4.clear();
        }
        if want4 == self.open_services && ranged4 == self.ranged_services {
            return Ok(());
        }
        let t = &self.cfg.nft_table;
        let mut nft = services_script(t, "svcext4", &want4);
        if self.ranged_support == Some(true) {
            nft.push_str(&ranged_services_script(t, "svcextsrc4", &ranged4));
        }
        run("nft", &["-f", "-"], Some(&nft)).await?;
        let ranged_keys = |r: &RangedSet| -> ServiceSet { r.keys().copied().collect() };
        let stale: BTreeSet<(SocketAddr, Proto)> = want4
            .symmetric_difference(&self.open_services)
            .chain(ranged_keys(&ranged4).symmetric_difference(&ranged_keys(&self.ranged_services)))
            .filter(|(_, p)| *p == Proto::Udp)
            .copied()
            .collect();
        self.open_services = want4;
        self.ranged_services = ranged4;
        delete_stale_udp(stale).await;
        debug!(
            open_services = self.open_services.len(),
            ranged_services = self.ranged_services.len(),
            "external service capture updated"
        );
        Ok(())
    }

    /// Adds the source-range set and its rule to `svc_ranged` the first
    /// time a port needs them, so that nodes which never have such a port
    /// (every edge) need no more of the kernel than the rest of capture;
    /// whether that worked, remembered (tried once).
    async fn ranged_ready(&mut self) -> bool {
        if let Some(ok) = self.ranged_support {
            return ok;
        }
        let (t, p, a) = (
            &self.cfg.nft_table,
            self.cfg.port,
            self.cfg.redirect_address,
        );
        let script = format!(
            "add set inet {t} svcextsrc4 {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval; }}\n\
             add rule inet {t} svc_ranged meta l4proto {{ tcp, udp }} ip saddr . ip daddr . meta l4proto . th dport @svcextsrc4 dnat ip to {a}:{p}\n"
        );
        let ok = match run("nft", &["-f", "-"], Some(&script)).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "load balancers with loadBalancerSourceRanges are left to kube-proxy: this kernel or nft cannot match a source range in a set (needs Linux 5.6 and nft 0.9.4)");
                false
            }
        };
        self.ranged_support = Some(ok);
        ok
    }

    /// Captures exactly the node ports `want` on this node's own IPv4
    /// addresses (`fib daddr type local`), ahead of kube-proxy's NodePort
    /// DNAT, from any source (a NodePort is open to whoever reaches the
    /// node: that is what the Service asks for). A node port reached over
    /// IPv6 stays with kube-proxy: the capture listeners are IPv4. Stale
    /// UDP conntrack entries are deleted as for [`Capture::apply_services`].
    pub async fn apply_node_ports(
        &mut self,
        want: &BTreeSet<(u16, Proto)>,
    ) -> Result<(), CaptureError> {
        if *want == self.node_ports {
            return Ok(());
        }
        let t = &self.cfg.nft_table;
        let mut nft = format!("flush set inet {t} np4\n");
        let elems: Vec<String> = want
            .iter()
            .map(|(port, p)| format!("{} . {port}", p.as_str()))
            .collect();
        if !elems.is_empty() {
            let _ = writeln!(nft, "add element inet {t} np4 {{ {} }}", elems.join(", "));
        }
        run("nft", &["-f", "-"], Some(&nft)).await?;
        let stale: Vec<u16> = want
            .symmetric_difference(&self.node_ports)
            .filter(|(_, p)| *p == Proto::Udp)
            .map(|(port, _)| *port)
            .collect();
        self.node_ports = want.clone();
        // Only the flows to this node's own addresses on those ports (what
        // the node-port rule matches): a flow forwarded through the node
        // to another host's port of the same number keeps its entry, and
        // with it its NAT binding.
        if !stale.is_empty() {
            // None listed (getifaddrs failed): no entry is deleted, and
            // stale flows age out as they would anyway.
            let local = crate::node_addrs::node_ipv4_addresses().unwrap_or_default();
            let entries = node_port_flows(&local, self.cfg.node_port_addresses.as_ref(), &stale);
            delete_stale_udp(entries).await;
        }
        debug!(
            node_ports = self.node_ports.len(),
            "node port capture updated"
        );
        Ok(())
    }
}

/// Whether `ip` is an address of this host: binding a socket to it only
/// works if it is (one syscall; what `fib daddr type local` asks the
/// kernel in the node-port capture rule).
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The UDP flows a change of node ports `ports` makes stale: to each of
/// this node's addresses (`local`, as [`node_ipv4_addresses`] lists them:
/// never kube-ipvs0's ClusterIPs) that node ports are captured on
/// (`taken`, `capture.node_port_addresses`; `None`: all), on each port.
///
/// [`node_ipv4_addresses`]: crate::node_addrs::node_ipv4_addresses
pub(crate) fn node_port_flows(
    local: &[std::net::Ipv4Addr],
    taken: Option<&BTreeSet<Cidr>>,
    ports: &[u16],
) -> BTreeSet<(SocketAddr, Proto)> {
    let addrs: BTreeSet<std::net::Ipv4Addr> = local
        .iter()
        .copied()
        .filter(|ip| taken.is_none_or(|t| t.iter().any(|c| c.contains(&(*ip).into()))))
        .collect();
    ports
        .iter()
        .flat_map(|port| {
            addrs
                .iter()
                .map(move |ip| (SocketAddr::new((*ip).into(), *port), Proto::Udp))
        })
        .collect()
}

/// Deletes the UDP conntrack entries whose original destination is one of
/// `stale` (a port whose capture changed); a failure (usually: no such
/// entry) is logged, not an error.
async fn delete_stale_udp(stale: BTreeSet<(SocketAddr, Proto)>) {
    for (addr, proto) in stale {
        // Not to be re-created for the flows still open (see
        // `udp_capture/keep.rs`): these flows must take their new way.
        crate::conntrack::note_capture_deletes(addr);
        let args = conntrack_delete_args(addr, proto);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = run("conntrack", &args, None).await {
            debug!(error = %e, %addr, "no stale conntrack entries deleted");
        }
    }
}

/// Applies `ip rule` lines in one `-force` batch (a line that fails, a
/// rule already there or already gone, is logged, not retried).
async fn batch_rules(rules: &str) {
    if rules.is_empty() {
        return;
    }
    if let Err(e) = run("ip", &["-4", "-force", "-batch", "-"], Some(rules)).await {
        warn!(error = %e, "some service bypass rules did not apply");
    }
}

/// The `nft -f` script that makes service set `set` (`svc4` or
/// `svcskip4`) of table `inet <table>` hold exactly `services` (flush and
/// add in one transaction).
pub fn services_script(table: &str, set: &str, services: &ServiceSet) -> String {
    let elems = services
        .iter()
        .filter(|(a, _)| a.is_ipv4())
        .map(|(a, p)| format!("{} . {} . {}", a.ip(), p.as_str(), a.port()));
    set_script(table, set, elems)
}

/// The nft script replacing set `set` of `table` with `elems`.
fn set_script(table: &str, set: &str, elems: impl Iterator<Item = String>) -> String {
    let mut nft = format!("flush set inet {table} {set}\n");
    let elems: Vec<String> = elems.collect();
    if !elems.is_empty() {
        let _ = writeln!(
            nft,
            "add element inet {table} {set} {{ {} }}",
            elems.join(", ")
        );
    }
    nft
}

/// The nft script replacing set `set` of `table` with `ranged`'s IPv4
/// elements, one per source prefix of each port (`source . address .
/// protocol . port`) that no other of its prefixes holds (nft refuses an
/// interval overlapping another of the same key, which would fail the
/// whole update); a port listed with no prefix gets no element.
pub fn ranged_services_script(table: &str, set: &str, ranged: &RangedSet) -> String {
    let elems = ranged
        .iter()
        .filter(|((a, _), _)| a.is_ipv4())
        .flat_map(|((a, p), sources)| {
            let v4: BTreeSet<Cidr> = sources
                .iter()
                .filter(|c| c.addr().is_ipv4())
                .copied()
                .collect();
            super::minimal_cover(&v4)
                .into_iter()
                .map(move |c| format!("{c} . {} . {} . {}", a.ip(), p.as_str(), a.port()))
        });
    set_script(table, set, elems)
}

/// `conntrack` arguments deleting the entries whose original destination
/// is `addr` over `proto`.
pub fn conntrack_delete_args(addr: SocketAddr, proto: Proto) -> Vec<String> {
    vec![
        "-D".into(),
        "-p".into(),
        proto.as_str().into(),
        "--orig-dst".into(),
        addr.ip().to_string(),
        "--dport".into(),
        addr.port().to_string(),
    ]
}

/// Signs that a kube-proxy replacement balances Services at the socket
/// (Cilium's eBPF socket-LB): then ClusterIPs never reach nftables and
/// [`Capture::apply_services`] matches nothing (see docs/architecture.md,
/// "Services with edge endpoints"). Returns what was found, or `None`.
/// Looks at this network namespace's links and the BPF filesystem only
/// (not mounted in the manifests' pods, where the link is the sign);
/// decides nothing by itself.
pub async fn socket_lb_suspected() -> Option<String> {
    let mut signs = Vec::new();
    if command("ip", &["-o", "link", "show", "cilium_host"], None)
        .await
        .is_ok_and(|out| out.contains("cilium_host"))
    {
        signs.push("link cilium_host".to_string());
    }
    for map in SOCKET_LB_MAPS {
        if std::path::Path::new(map).exists() {
            signs.push(format!("pinned map {map}"));
        }
    }
    (!signs.is_empty()).then(|| signs.join(", "))
}

/// Logs, once at start, a warning naming [`socket_lb_suspected`]'s signs
/// when there are any: an operator reading why ClusterIPs with edge
/// endpoints are not captured on a Cilium node finds the reason in the
/// first lines of the log instead of in packet traces.
pub async fn warn_if_socket_lb() {
    if let Some(signs) = socket_lb_suspected().await {
        tracing::warn!(
            %signs,
            "Cilium seems to run on this node: where it replaces kube-proxy (socket-LB) ClusterIPs are rewritten before any packet exists, so Service-port capture matches nothing (pod and node addresses are still captured), and with its BPF host routing pod traffic bypasses nftables; see docs/architecture.md, kube-proxy replacements"
        );
    }
}

/// Cilium's pinned service maps (IPv4, IPv6), present when its load
/// balancer (socket-LB or per-packet) replaces kube-proxy.
const SOCKET_LB_MAPS: [&str; 2] = [
    "/sys/fs/bpf/tc/globals/cilium_lb4_services_v2",
    "/sys/fs/bpf/tc/globals/cilium_lb6_services_v2",
];
