//! What capture installs, named and numbered ([`CaptureConfig`]), and the
//! `[capture]` section of both sides' config files ([`CaptureFile`]).

use std::collections::BTreeSet;

use relay_protocol::Cidr;

/// Names and numbers of what capture installs.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// nftables table name (family `inet`).
    pub nft_table: String,
    /// Routing table holding the `local default dev lo` route.
    pub route_table: u32,
    /// Priority of the per-prefix rules; the own-socket bypass uses one less.
    pub rule_pref: u32,
    /// Port of the transparent listeners (TCP and UDP), on loopback.
    pub port: u16,
    /// Firewall mark of our own sockets, which must never be captured.
    pub own_mark: u32,
    /// Sources whose forwarded traffic may be captured (`capture.sources`);
    /// `None`: the side's default (the relay: its `tunnel_routes`; the
    /// edge: nothing beyond what it serves, which it always allows). Host
    /// processes' own traffic is captured whatever its source.
    pub sources: Option<BTreeSet<Cidr>>,
    /// Captured TCP connections served at once; more are reset at once and
    /// counted (each holds a task, a socket and a tunnel stream).
    pub max_connections: usize,
    /// Edge: captured UDP flows open at once (see
    /// `udp::FlowLimits::max_flows`); keep it below the relay's
    /// `quic.max_streams`. The relay bounds its flows per session instead.
    pub max_udp_flows: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            nft_table: "edge_relay".into(),
            route_table: 7100,
            rule_pref: 7100,
            port: 15001,
            own_mark: 0x7100,
            sources: None,
            max_connections: 16_384,
            max_udp_flows: 128,
        }
    }
}

/// The `[capture]` section of either side's config file.
#[derive(Debug, serde::Deserialize, Default)]
pub struct CaptureFile {
    /// Install capture (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Transparent listener port on loopback (default 15001).
    pub port: Option<u16>,
    /// nftables table name (default `edge_relay`).
    pub nft_table: Option<String>,
    /// Routing table id (default 7100).
    pub route_table: Option<u32>,
    /// Policy rule priority (default 7100; the bypass rules use one less).
    pub rule_pref: Option<u32>,
    /// Firewall mark of our own sockets (default 0x7100).
    pub mark: Option<u32>,
    /// Sources whose forwarded traffic may be captured (IPv4 prefixes;
    /// default: see [`CaptureConfig::sources`]).
    pub sources: Option<Vec<Cidr>>,
    /// Captured TCP connections at once (default 16384).
    pub max_connections: Option<usize>,
    /// Edge only: captured UDP flows at once (default 128).
    pub max_udp_flows: Option<usize>,
}

impl CaptureFile {
    /// The capture config if enabled; errors are `(field, message)` with
    /// the field relative to `[capture]`.
    pub fn resolve(&self) -> Result<Option<CaptureConfig>, (&'static str, String)> {
        if !self.enabled {
            return Ok(None);
        }
        let d = CaptureConfig::default();
        let c = CaptureConfig {
            nft_table: self.nft_table.clone().unwrap_or(d.nft_table),
            route_table: self.route_table.unwrap_or(d.route_table),
            rule_pref: self.rule_pref.unwrap_or(d.rule_pref),
            port: self.port.unwrap_or(d.port),
            own_mark: self.mark.unwrap_or(d.own_mark),
            sources: self.sources.as_ref().map(|s| s.iter().copied().collect()),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_udp_flows: self.max_udp_flows.unwrap_or(d.max_udp_flows),
        };
        if c.max_udp_flows == 0 {
            return Err(("max_udp_flows", "must not be 0".into()));
        }
        if c.max_connections == 0 {
            return Err(("max_connections", "must not be 0".into()));
        }
        if let Some(v6) = c.sources.iter().flatten().find(|s| !s.addr().is_ipv4()) {
            return Err(("sources", format!("{v6}: capture is IPv4 only")));
        }
        if c.port == 0 {
            return Err(("port", "must not be 0".into()));
        }
        if c.nft_table.is_empty()
            || !c
                .nft_table
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        {
            return Err(("nft_table", "letters, digits and _ only".into()));
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
        for (bad, field) in [
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
        ] {
            assert_eq!(bad.resolve().unwrap_err().0, field);
        }
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
