//! `[dns]` in edge.toml and the resolver's runtime [`DnsConfig`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The node-local address NodeLocal DNSCache uses; kubelet's `clusterDNS`
/// on edge nodes points here.
pub const DEFAULT_LISTEN: &str = "169.254.20.10:53";

/// The resolver as it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP address to answer on (node-local).
    pub listen: SocketAddr,
    /// The cluster DNS (kube-dns Service address), reached through the
    /// tunnel while the cloud is up: everything not answered locally goes
    /// there.
    pub upstream: SocketAddr,
    /// The cluster domain; `None` takes the relay's (`cluster.local` until
    /// it says).
    pub cluster_domain: Option<String>,
    /// Where the table is kept across restarts.
    pub state_file: PathBuf,
    /// Bound on one forwarded query.
    pub forward_timeout: Duration,
    /// Most forwarded queries in flight.
    pub max_forwards: usize,
    /// How often an address that could not be bound is tried again
    /// (see [`crate::dns::Resolver::spawn`]).
    pub bind_retry: Duration,
}

impl DnsConfig {
    /// Defaults around an upstream and a state file (listening on
    /// [`DEFAULT_LISTEN`]).
    pub fn new(upstream: SocketAddr, state_file: PathBuf) -> DnsConfig {
        DnsConfig {
            listen: SocketAddr::from(([169, 254, 20, 10], 53)),
            upstream,
            cluster_domain: None,
            state_file,
            forward_timeout: Duration::from_secs(2),
            max_forwards: 256,
            bind_retry: Duration::from_secs(10),
        }
    }
}

/// `[dns]` in edge.toml.
#[derive(Debug, Default, Deserialize)]
pub struct DnsFile {
    /// Run the resolver (default false).
    #[serde(default)]
    pub enabled: bool,
    /// See [`DnsConfig::listen`] (default [`DEFAULT_LISTEN`]).
    pub listen: Option<SocketAddr>,
    /// Allow a `listen` address that is neither loopback nor link-local
    /// (the resolver would then answer the network; default false).
    #[serde(default)]
    pub allow_any_listen: bool,
    /// See [`DnsConfig::upstream`]; required when enabled.
    pub upstream: Option<SocketAddr>,
    /// See [`DnsConfig::cluster_domain`].
    pub cluster_domain: Option<String>,
    /// See [`DnsConfig::state_file`] (default
    /// `/var/lib/edge-relay/dns-names.json`).
    pub state_file: Option<PathBuf>,
    /// See [`DnsConfig::forward_timeout`] (default 2s).
    #[serde(default, with = "humantime_serde")]
    pub forward_timeout: Option<Duration>,
    /// See [`DnsConfig::max_forwards`] (default 256).
    pub max_forwards: Option<usize>,
}

/// Whether `ip` is only reachable from this node: loopback or link-local
/// (NodeLocal DNSCache's 169.254.20.10 is link-local).
fn node_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    }
}

fn valid_domain(d: &str) -> bool {
    let d = d.trim_end_matches('.');
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl DnsFile {
    /// Validates: `None` when disabled; errors as `(field, message)`.
    pub fn resolve(&self) -> Result<Option<DnsConfig>, (&'static str, String)> {
        if !self.enabled {
            return Ok(None);
        }
        let upstream = self.upstream.ok_or((
            "upstream",
            "required with enabled = true: the cluster DNS address, e.g. \"10.96.0.10:53\"".into(),
        ))?;
        let mut cfg = DnsConfig::new(
            upstream,
            self.state_file
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/lib/edge-relay/dns-names.json")),
        );
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        if !node_local(cfg.listen.ip()) && !self.allow_any_listen {
            return Err((
                "listen",
                format!(
                    "{} is reachable from the network; use a loopback or link-local address \
                     (default {DEFAULT_LISTEN}), or set allow_any_listen = true",
                    cfg.listen
                ),
            ));
        }
        if upstream.port() == 0 || upstream.ip().is_unspecified() {
            return Err((
                "upstream",
                format!("{upstream} is not an address to send to"),
            ));
        }
        if upstream == cfg.listen {
            return Err((
                "upstream",
                "is the resolver itself (a forwarding loop)".into(),
            ));
        }
        if let Some(d) = &self.cluster_domain {
            if !valid_domain(d) {
                return Err(("cluster_domain", format!("{d:?} is not a DNS domain")));
            }
            cfg.cluster_domain = Some(d.trim_end_matches('.').to_ascii_lowercase());
        }
        if let Some(t) = self.forward_timeout {
            if t.is_zero() || t > Duration::from_secs(30) {
                return Err(("forward_timeout", "must be between 1ms and 30s".into()));
            }
            cfg.forward_timeout = t;
        }
        if let Some(n) = self.max_forwards {
            if n == 0 || n > 65536 {
                return Err(("max_forwards", "must be between 1 and 65536".into()));
            }
            cfg.max_forwards = n;
        }
        Ok(Some(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<DnsConfig>, (&'static str, String)> {
        toml::from_str::<DnsFile>(s).unwrap().resolve()
    }

    #[test]
    fn off_by_default_and_node_local_when_on() {
        assert_eq!(parse("").unwrap(), None);
        let c = parse("enabled = true\nupstream = \"10.96.0.10:53\"")
            .unwrap()
            .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.cluster_domain, None);
        assert_eq!(parse("enabled = true").unwrap_err().0, "upstream");
        for bad in ["0.0.0.0:53", "192.168.1.10:53", "[::]:53"] {
            let e = parse(&format!(
                "enabled = true\nupstream = \"10.96.0.10:53\"\nlisten = \"{bad}\""
            ))
            .unwrap_err();
            assert_eq!(e.0, "listen", "{bad}");
            assert!(e.1.contains("allow_any_listen"), "{}", e.1);
        }
        let ok = parse("enabled = true\nupstream = \"10.96.0.10:53\"\nlisten = \"0.0.0.0:53\"\nallow_any_listen = true");
        assert!(ok.unwrap().is_some());
        for good in ["127.0.0.1:5353", "[::1]:53", "[fe80::1]:53"] {
            assert!(
                parse(&format!(
                    "enabled = true\nupstream = \"10.96.0.10:53\"\nlisten = \"{good}\""
                ))
                .is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = "enabled = true\nupstream = \"10.96.0.10:53\"\n";
        for (extra, field) in [
            ("cluster_domain = \"a..b\"", "cluster_domain"),
            ("cluster_domain = \"\"", "cluster_domain"),
            ("forward_timeout = \"0s\"", "forward_timeout"),
            ("forward_timeout = \"1m\"", "forward_timeout"),
            ("max_forwards = 0", "max_forwards"),
            (
                "listen = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:53\"",
                "upstream",
            ),
        ] {
            let text = if extra.contains("upstream") {
                format!("enabled = true\n{extra}")
            } else {
                format!("{base}{extra}")
            };
            assert_eq!(parse(&text).unwrap_err().0, field, "{extra}");
        }
        assert!(relay_transport::config_file::parse::<DnsFile>(
            "enabled = true\nsurprise = 1",
            |_| None
        )
        .is_err());
        let c = parse(&format!("{base}cluster_domain = \"Corp.Example.\""))
            .unwrap()
            .unwrap();
        assert_eq!(c.cluster_domain.as_deref(), Some("corp.example"));
    }

    #[test]
    fn edge_toml_carries_the_section_and_errors_name_dns_fields() {
        let base = "node = \"edge-1\"\nrelay = \"relay.example:8443\"\n[tls]\ncert = \"/nonexistent/c\"\nkey = \"k\"\nrelay_ca = \"ca\"\n";
        let f = crate::config::FileConfig::parse(&format!(
            "{base}[dns]\nenabled = true\nupstream = \"10.96.0.10:53\"\nlisten = \"10.0.0.1:53\"\n"
        ))
        .unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "dns.listen");
    }
}
