//! What capture installs, named and numbered ([`CaptureConfig`]), and the
//! `[capture]` section of both sides' config files ([`CaptureFile`]).

use std::collections::BTreeSet;

use relay_protocol::Cidr;

/// Names and numbers of what capture installs.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// nftables table name (family `inet`).
    pub nft_table: String,
    /// Routing table holding capture's local routes: one per captured
    /// prefix (skips and peers cut out) and the `local default dev lo`
    /// replies with a kept source are delivered by.
    pub route_table: u32,
    /// Priority of capture's one `iif lo` rule (a constant number of rules
    /// whatever the number of prefixes); the mark rules use one less.
    pub rule_pref: u32,
    /// Port of the transparent listeners (TCP and UDP), on every address.
    pub port: u16,
    /// The address captured connections are translated to
    /// (`capture.redirect_address`, with [`CaptureConfig::port`]): added to
    /// `lo` with host scope while capture runs, so it is local on every
    /// node, whatever the interface a packet arrives on. nft's `redirect`
    /// takes the receiving interface's first address instead, and drops
    /// what arrives on one without an address: the host side of every pod
    /// veth under Calico (and Cilium), which route pods without a bridge.
    /// Host scope keeps the kernel from choosing it as anybody's source.
    pub redirect_address: std::net::Ipv4Addr,
    /// Firewall mark of our own sockets, which must never be captured.
    pub own_mark: u32,
    /// Sources whose forwarded traffic may be captured (`capture.sources`);
    /// `None`: the side's default (the relay: its `tunnel_routes` and, in
    /// Kubernetes mode, the cloud Nodes' own prefixes; the edge: nothing
    /// beyond what it serves, which it always allows). Host
    /// processes' own traffic is captured whatever its source.
    pub sources: Option<BTreeSet<Cidr>>,
    /// The node's addresses node ports are captured on
    /// (`capture.node_port_addresses`, IPv4 prefixes); `None`: every
    /// address of the node, as kube-proxy's iptables mode by default. Set
    /// it as kube-proxy's `--nodeport-addresses` is (its nftables mode
    /// takes the node's primary addresses only, and never `127.0.0.1`).
    pub node_port_addresses: Option<BTreeSet<Cidr>>,
    /// Captured TCP connections served at once; more are reset at once and
    /// counted (each holds a task, a socket and a tunnel stream).
    pub max_connections: usize,
    /// Edge: captured UDP flows open at once (see
    /// `udp::FlowLimits::max_flows`); keep it below the relay's
    /// `quic.max_streams`. The relay bounds its flows per session instead.
    pub max_udp_flows: usize,
    /// Targets dialled from the original client's address rather than this
    /// host's (`capture.preserve_source`, IPv4 prefixes; empty: none). Only
    /// for targets that answer through this host (its own pods and its own
    /// addresses): their replies to the foreign address are delivered to
    /// the dialling socket by the `src_pre`/`src_out` chains and the
    /// reply-mark rule (see [`crate::capture`]).
    pub preserve_source: Vec<Cidr>,
    /// Edge only (`capture.preserve_source_served`): every target the edge
    /// serves is dialled from the client's address, as if its served
    /// prefixes were listed in `preserve_source`. One setting for a whole
    /// DaemonSet, whose nodes each have their own pod CIDR; in Kubernetes
    /// mode an edge serves its pod CIDRs and its own addresses, which all
    /// answer through it.
    pub preserve_served: bool,
    /// Edge only: how long traffic to the captured prefixes is still
    /// refused after a clean exit (`capture.hold_after_exit`; zero:
    /// everything is removed at once). See
    /// [`crate::capture::Capture::stop`]. The relay removes its capture at
    /// once: with replicas, the route agents move its prefixes to another
    /// replica, which host processes on its node must then reach.
    pub hold_after_exit: std::time::Duration,
    /// Edge only, not a file setting: refuse traffic to the IPv6 prefixes
    /// capture is asked for (it captures IPv4 only) rather than let it
    /// leave by the default route. Turned on by
    /// [`crate::capture::Capture::refuse_ipv6`]; see `capture/refuse6.rs`.
    pub refuse_ipv6: bool,
}

/// Default of [`CaptureConfig::hold_after_exit`]: off, so a process that
/// exits leaves nothing behind unless asked to. The shipped edge configs
/// set 10 minutes: longer than a DaemonSet rollout's image pull over a slow
/// uplink, short enough that a removed install stops refusing on its own.
pub const DEFAULT_HOLD_AFTER_EXIT: std::time::Duration = std::time::Duration::ZERO;

impl CaptureConfig {
    /// Whether any dial may keep a client's address (the kept-source chains
    /// are needed).
    pub fn keeps_sources(&self) -> bool {
        self.preserve_served || !self.preserve_source.is_empty()
    }

    /// The address a dial to `target` binds to: the original client's,
    /// when the target is inside `preserve_source` (or `served`, a target
    /// this edge serves, with `preserve_served`) and the client's address
    /// is one a target can answer (IPv4, or IPv4-mapped, unicast, not
    /// loopback or link-local); `None` otherwise (the host's own address).
    pub fn keep_source(
        &self,
        source: Option<std::net::SocketAddr>,
        target: std::net::SocketAddr,
        served: bool,
    ) -> Option<std::net::IpAddr> {
        let src = match source?.ip() {
            std::net::IpAddr::V4(a) => a,
            // A dual-stack listener's view of an IPv4 client.
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped()?,
        };
        let answerable = !(src.is_loopback()
            || src.is_unspecified()
            || src.is_link_local()
            || src.is_multicast()
            || src.is_broadcast());
        let listed = (served && self.preserve_served)
            || self
                .preserve_source
                .iter()
                .any(|c| c.contains(&target.ip()));
        (answerable && target.is_ipv4() && listed).then_some(std::net::IpAddr::V4(src))
    }

    /// The firewall mark that routes replies to a kept-source dial to this
    /// host ([`CaptureConfig::own_mark`] with its lowest bit flipped: a
    /// different value, so the own-socket bypass rule never matches it).
    pub fn reply_mark(&self) -> u32 {
        self.own_mark ^ 1
    }
}

/// The default firewall mark of our own sockets. Clear of the bits other
/// node components test: kube-proxy masquerades whatever carries 0x4000
/// and drops what carries 0x8000 (both its modes), Calico keeps to
/// 0xffff0000 by default, Cilium's magic values sit in 0x0f00. (It was
/// 0x7100, which has kube-proxy's masquerade bit: every packet of our own
/// sockets was masqueraded on kube-proxy nodes, harmless while they came
/// from the host's own address, fatal to a kept client address.)
pub const DEFAULT_MARK: u32 = 0x1070;

/// Default of [`CaptureConfig::redirect_address`]: link-local, clear of
/// the ones node software takes (Calico's pod gateway 169.254.1.1,
/// NodeLocal DNSCache's 169.254.20.10, the clouds' 169.254.169.x).
pub const DEFAULT_REDIRECT_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 70, 1);

/// kube-proxy's firewall-mark bits: 0x4000 has the packet masqueraded on
/// its way out, 0x8000 has it dropped.
pub const KUBE_PROXY_MARK_BITS: u32 = 0x4000 | 0x8000;

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            nft_table: "edge_relay".into(),
            route_table: 7100,
            rule_pref: 7100,
            port: 15001,
            redirect_address: DEFAULT_REDIRECT_ADDRESS,
            own_mark: DEFAULT_MARK,
            sources: None,
            node_port_addresses: None,
            max_connections: 16_384,
            max_udp_flows: 128,
            preserve_source: Vec::new(),
            preserve_served: false,
            hold_after_exit: DEFAULT_HOLD_AFTER_EXIT,
            refuse_ipv6: false,
        }
    }
}

/// The `[capture]` section of either side's config file.
#[derive(Debug, serde::Deserialize, Default)]
pub struct CaptureFile {
    /// Install capture (default false).
    #[serde(default)]
    pub enabled: bool,
    /// The capture listeners' port (default 15001; see
    /// [`CaptureConfig::port`]).
    pub port: Option<u16>,
    /// See [`CaptureConfig::redirect_address`] (default 169.254.70.1).
    pub redirect_address: Option<std::net::Ipv4Addr>,
    /// nftables table name (default `edge_relay`).
    pub nft_table: Option<String>,
    /// Routing table id (default 7100).
    pub route_table: Option<u32>,
    /// Policy rule priority (default 7100; the mark rules use one less).
    pub rule_pref: Option<u32>,
    /// Firewall mark of our own sockets (default [`DEFAULT_MARK`]).
    pub mark: Option<u32>,
    /// Sources whose forwarded traffic may be captured (IPv4 prefixes;
    /// default: see [`CaptureConfig::sources`]).
    pub sources: Option<Vec<Cidr>>,
    /// Node addresses node ports are captured on (IPv4 prefixes; default:
    /// every address; see [`CaptureConfig::node_port_addresses`]).
    pub node_port_addresses: Option<Vec<Cidr>>,
    /// Captured TCP connections at once (default 16384).
    pub max_connections: Option<usize>,
    /// Edge only: captured UDP flows at once (default 128).
    pub max_udp_flows: Option<usize>,
    /// Targets dialled from the original client's address (IPv4 prefixes;
    /// default none; see [`CaptureConfig::preserve_source`]).
    pub preserve_source: Option<Vec<Cidr>>,
    /// Edge only: every served target sees the client's address (default
    /// false; see [`CaptureConfig::preserve_served`]).
    pub preserve_source_served: Option<bool>,
    /// Edge only: see [`CaptureConfig::hold_after_exit`] (default
    /// [`DEFAULT_HOLD_AFTER_EXIT`]; at most a day).
    #[serde(default, with = "humantime_serde")]
    pub hold_after_exit: Option<std::time::Duration>,
    /// Edge only: refuse traffic to the tunnel's IPv6 prefixes, which
    /// capture does not take, rather than let it leave by the node's
    /// default route (default true; see `capture/refuse6.rs`). `false`
    /// for a dual-stack site whose IPv6 reaches the cloud's IPv6 ranges
    /// by a route of its own. Read by the edge's config, not by
    /// [`CaptureFile::resolve`]: the relay never refuses.
    pub refuse_ipv6: Option<bool>,
}

impl CaptureFile {
    /// The capture config if enabled; errors are `(field, message)` with
    /// the field relative to `[capture]`.
    pub fn resolve(&self) -> Result<Option<CaptureConfig>, (&'static str, String)> {
        if !self.enabled {
            if self.preserve_source_served == Some(true) {
                return Err((
                    "preserve_source_served",
                    "needs capture (enabled = true): its rules carry the replies".into(),
                ));
            }
            if self.preserve_source.as_ref().is_some_and(|p| !p.is_empty()) {
                return Err((
                    "preserve_source",
                    "needs capture (enabled = true): its rules carry the replies".into(),
                ));
            }
            return Ok(None);
        }
        let d = CaptureConfig::default();
        let c = CaptureConfig {
            nft_table: self.nft_table.clone().unwrap_or(d.nft_table),
            route_table: self.route_table.unwrap_or(d.route_table),
            rule_pref: self.rule_pref.unwrap_or(d.rule_pref),
            port: self.port.unwrap_or(d.port),
            redirect_address: self.redirect_address.unwrap_or(d.redirect_address),
            own_mark: self.mark.unwrap_or(d.own_mark),
            sources: self.sources.as_ref().map(|s| s.iter().copied().collect()),
            node_port_addresses: self
                .node_port_addresses
                .as_ref()
                .map(|s| s.iter().copied().collect()),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_udp_flows: self.max_udp_flows.unwrap_or(d.max_udp_flows),
            preserve_source: self.preserve_source.clone().unwrap_or_default(),
            preserve_served: self.preserve_source_served.unwrap_or(false),
            hold_after_exit: self.hold_after_exit.unwrap_or(d.hold_after_exit),
            refuse_ipv6: d.refuse_ipv6,
        };
        if c.hold_after_exit > std::time::Duration::from_secs(24 * 3600) {
            return Err(("hold_after_exit", "at most 24h".into()));
        }
        if c.max_udp_flows == 0 {
            return Err(("max_udp_flows", "must not be 0".into()));
        }
        if c.max_connections == 0 {
            return Err(("max_connections", "must not be 0".into()));
        }
        if let Some(v6) = c.sources.iter().flatten().find(|s| !s.addr().is_ipv4()) {
            return Err(("sources", format!("{v6}: capture is IPv4 only")));
        }
        if let Some(a) = &c.node_port_addresses {
            if a.is_empty() {
                return Err((
                    "node_port_addresses",
                    "list at least one prefix (leave it out for every address of the node)".into(),
                ));
            }
            if let Some(v6) = a.iter().find(|s| !s.addr().is_ipv4()) {
                return Err((
                    "node_port_addresses",
                    format!("{v6}: node ports are captured over IPv4 only"),
                ));
            }
        }
        if let Some(v6) = c.preserve_source.iter().find(|s| !s.addr().is_ipv4()) {
            return Err(("preserve_source", format!("{v6}: capture is IPv4 only")));
        }
        if c.port == 0 {
            return Err(("port", "must not be 0".into()));
        }
        let a = c.redirect_address;
        if a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
            return Err((
                "redirect_address",
                "a unicast address that is not loopback (packets from other interfaces may not reach 127/8); a link-local one such as the default 169.254.70.1 is best".into(),
            ));
        }
        // At most 64: the held table's name adds `_held` (see
        // `capture/park.rs`) and nft refuses names past 255 bytes.
        if c.nft_table.is_empty()
            || c.nft_table.len() > 64
            || !c
                .nft_table
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        {
            return Err(("nft_table", "1 to 64 letters, digits and _".into()));
        }
        if [0, 253, 254, 255].contains(&c.route_table) {
            return Err((
                "route_table",
                "0, 253, 254, 255 are the kernel's tables".into(),
            ));
        }
        if c.rule_pref < 2 || c.rule_pref >= 32766 {
            return Err((
                "rule_pref",
                "must be between 2 and 32765 (before the main table)".into(),
            ));
        }
        if c.own_mark == 0 {
            return Err(("mark", "must not be 0".into()));
        }
        if c.keeps_sources() && c.own_mark & KUBE_PROXY_MARK_BITS != 0 {
            return Err((
                "mark",
                format!(
                    "{:#x} has kube-proxy's bits ({KUBE_PROXY_MARK_BITS:#x}): it would \
                     masquerade (or drop) what preserve_source dials; the default is {DEFAULT_MARK:#x}",
                    c.own_mark
                ),
            ));
        }
        Ok(Some(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_section_validates_and_names_fields() {
        assert!(
            CaptureFile::default().resolve().unwrap().is_none(),
            "off by default"
        );
        let on = CaptureFile {
            enabled: true,
            ..Default::default()
        };
        let c = on.resolve().unwrap().unwrap();
        assert_eq!((c.port, c.route_table), (15001, 7100));
        assert_eq!(c.redirect_address, DEFAULT_REDIRECT_ADDRESS);
        for (bad, field) in [
            (
                CaptureFile {
                    enabled: true,
                    redirect_address: Some(std::net::Ipv4Addr::LOCALHOST),
                    ..Default::default()
                },
                "redirect_address",
            ),
            (
                CaptureFile {
                    enabled: true,
                    port: Some(0),
                    ..Default::default()
                },
                "port",
            ),
            (
                CaptureFile {
                    enabled: true,
                    route_table: Some(254),
                    ..Default::default()
                },
                "route_table",
            ),
            (
                CaptureFile {
                    enabled: true,
                    nft_table: Some("x y".into()),
                    ..Default::default()
                },
                "nft_table",
            ),
            (
                CaptureFile {
                    enabled: true,
                    rule_pref: Some(40000),
                    ..Default::default()
                },
                "rule_pref",
            ),
            (
                CaptureFile {
                    enabled: true,
                    hold_after_exit: Some(std::time::Duration::from_secs(2 * 24 * 3600)),
                    ..Default::default()
                },
                "hold_after_exit",
            ),
        ] {
            assert_eq!(bad.resolve().unwrap_err().0, field);
        }
    }

    #[test]
    fn a_kept_source_is_an_answerable_client_of_a_listed_target() {
        let c = CaptureFile {
            enabled: true,
            preserve_source: Some(vec!["10.244.5.0/24".parse().unwrap()]),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .unwrap();
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let pod = sa("10.244.5.7:80");
        let client = sa("10.244.1.9:40000");
        assert_eq!(c.keep_source(Some(client), pod, false), Some(client.ip()));
        let mapped = Some(sa("[::ffff:10.244.1.9]:40000"));
        assert_eq!(c.keep_source(mapped, pod, false), Some(client.ip()));
        for (source, target) in [
            (Some(client), sa("10.244.6.7:80")), // target not listed
            (None, pod),                         // no client address known
            (Some(sa("127.0.0.1:5000")), pod),   // loopback (a local CONNECT)
            (Some(sa("169.254.1.1:5000")), pod), // link-local
            (Some(sa("[fd00::1]:5000")), pod),   // another family
            (Some(sa("0.0.0.0:5000")), pod),     // unspecified
            (Some(sa("224.0.0.1:5000")), pod),   // multicast
        ] {
            assert_eq!(
                c.keep_source(source, target, false),
                None,
                "{source:?} → {target}"
            );
        }
        assert_ne!(c.reply_mark(), c.own_mark);
        // Served targets: kept only with preserve_source_served.
        let other = sa("10.244.6.7:80");
        assert_eq!(c.keep_source(Some(client), other, true), None);
        let served = CaptureFile {
            enabled: true,
            preserve_source_served: Some(true),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert!(served.keeps_sources());
        assert_eq!(
            served.keep_source(Some(client), other, true),
            Some(client.ip())
        );
        assert_eq!(served.keep_source(Some(client), other, false), None);
        let loopback = Some(sa("127.0.0.1:5000"));
        assert_eq!(served.keep_source(loopback, other, true), None);
        let served_off = CaptureFile {
            preserve_source_served: Some(true),
            ..Default::default()
        };
        assert_eq!(
            served_off.resolve().unwrap_err().0,
            "preserve_source_served"
        );
        let kube_mark = CaptureFile {
            enabled: true,
            preserve_source_served: Some(true),
            mark: Some(0x7100),
            ..Default::default()
        };
        assert_eq!(kube_mark.resolve().unwrap_err().0, "mark");
        let off = CaptureFile {
            preserve_source: Some(vec!["10.244.5.0/24".parse().unwrap()]),
            ..Default::default()
        };
        assert_eq!(off.resolve().unwrap_err().0, "preserve_source");
        let v6 = CaptureFile {
            enabled: true,
            preserve_source: Some(vec!["fd00::/64".parse().unwrap()]),
            ..Default::default()
        };
        assert_eq!(v6.resolve().unwrap_err().0, "preserve_source");
    }

    /// `node_port_addresses`: IPv4 prefixes, at least one when set.
    #[test]
    fn node_port_addresses_are_ipv4_prefixes_and_not_empty() {
        let with = |s: &[&str]| CaptureFile {
            enabled: true,
            node_port_addresses: Some(s.iter().map(|c| c.parse().unwrap()).collect()),
            ..Default::default()
        };
        let c = with(&["10.0.0.0/24"]).resolve().unwrap().unwrap();
        assert_eq!(c.node_port_addresses.unwrap().len(), 1);
        for bad in [&[][..], &["fd00::/64"][..]] {
            assert_eq!(with(bad).resolve().unwrap_err().0, "node_port_addresses");
        }
        let default = CaptureFile {
            enabled: true,
            ..Default::default()
        };
        assert!(default
            .resolve()
            .unwrap()
            .unwrap()
            .node_port_addresses
            .is_none());
    }

    #[test]
    fn sources_are_ipv4_prefixes() {
        let with = |s: &[&str]| CaptureFile {
            enabled: true,
            sources: Some(s.iter().map(|c| c.parse().unwrap()).collect()),
            ..Default::default()
        };
        let c = with(&["10.244.0.0/16", "10.0.0.0/24"])
            .resolve()
            .unwrap()
            .unwrap();
        assert_eq!(c.sources.unwrap().len(), 2);
        assert_eq!(
            with(&[]).resolve().unwrap().unwrap().sources,
            Some(BTreeSet::new())
        );
        let (field, msg) = with(&["fd00::/64"]).resolve().unwrap_err();
        assert_eq!(field, "sources");
        assert!(msg.contains("IPv4"), "{msg}");
        assert_eq!(
            CaptureFile {
                enabled: true,
                ..Default::default()
            }
            .resolve()
            .unwrap()
            .unwrap()
            .sources,
            None
        );
    }
}
