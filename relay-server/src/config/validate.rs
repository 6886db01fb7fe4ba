//! The rules a [`RelayConfig`] is held to, whether it came from a file or
//! was built by code: values in range ([`check_values`], run on a file's
//! values before any certificate is loaded so the bad value is reported
//! first), Kubernetes and bootstrap prerequisites, and no unprotected
//! exposure of the tunnels or the admin API ([`check_exposure`]).
//!
//! Apart from the section structs so the rules read in one place, and so
//! `FileConfig::into_runtime` and [`RelayConfig::validate`] share them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use relay_protocol::Cidr;
use relay_transport::QuicTuning;

use super::{err, ConfigError, Limits, RelayConfig};
use crate::config_kube::check_kubernetes;

impl RelayConfig {
    /// Checks every value, naming the offending field. [`Relay::spawn`]
    /// calls it, so a config built by code is held to the same rules as a
    /// file (a zero keep-alive would otherwise panic in a timer later).
    ///
    /// [`Relay::spawn`]: crate::Relay::spawn
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_values(&self.quic, &self.limits, &self.nodes, &self.communities)?;
        check_kubernetes(self.kubernetes.as_ref(), &self.nodes)?;
        match self.tcp_fallback_mss {
            // The file's 0 (the kernel's choice) is `None` here.
            Some(m) if !relay_transport::tcp::FALLBACK_MSS_RANGE.contains(&m) => {
                return Err(err(
                    "listen.tcp_fallback_mss",
                    format!("{m} must be 536 to 9000 (None: the kernel's choice)"),
                ));
            }
            _ => {}
        }
        if self.bootstrap.is_some() && self.kubernetes.is_none() {
            return Err(err(
                "bootstrap",
                "certificate bootstrap verifies tokens with the Kubernetes API: enable [kubernetes]",
            ));
        }
        if let Some(r) = &self.replicas {
            crate::replicas::check_id("relay_id", &self.relay_id)
                .map_err(|e| err("relay_id", e.message))?;
            if matches!(r.source, crate::replicas::ReplicaSource::Leases(_))
                && self.kubernetes.is_none()
            {
                return Err(err(
                    "replicas.lease_namespace",
                    "Leases are read through the Kubernetes API: enable [kubernetes], or list peers",
                ));
            }
        }
        warn_shared_connect_ca(self);
        check_exposure(self)
    }
}

/// Warns when the CONNECT listener trusts the edges' CA
/// (`connect_tls.client_ca` holding a certificate of `tls.client_ca`):
/// every edge's certificate is then a CONNECT client, and a compromised
/// edge may open tunnels to every other edge and every cloud port through
/// it. A warning, not a refusal: a one-CA lab or demo does it on purpose.
fn warn_shared_connect_ca(c: &RelayConfig) {
    if connect_trusts_edges(c) {
        tracing::warn!(
            "connect_tls.client_ca trusts the CA that signs edge certificates (tls.client_ca): \
             every edge certificate can open CONNECT tunnels to every edge and cloud port; \
             give kube-apiserver's client certificate a CA of its own"
        );
    }
}

/// Whether `connect_tls.client_ca` holds a CA of `tls.client_ca`.
fn connect_trusts_edges(c: &RelayConfig) -> bool {
    c.connect_tls.as_ref().is_some_and(|connect| {
        c.tls
            .ca
            .iter()
            .any(|ca| crate::tls_reload::trusts(&connect.ca, ca))
    })
}

/// Whether an address is reachable only from this host. `0.0.0.0` and
/// `::` are every address, not loopback.
pub(super) fn is_loopback(a: &SocketAddr) -> bool {
    a.ip().is_loopback()
}

/// Refuses setups that expose the tunnels or the admin API to the network
/// without protection, unless explicitly allowed: a plaintext CONNECT
/// listener off loopback lets anyone who reaches it into every edge; an
/// admin API off loopback without a token lets anyone list and close
/// sessions (`DELETE /v1/sessions/..`), and without TLS its token crosses
/// the network in clear. The probe listener must be on loopback: no
/// setting allows more (see `crate::health`).
pub(super) fn check_exposure(c: &RelayConfig) -> Result<(), ConfigError> {
    if let Some(a) = c.connect_listen {
        if !is_loopback(&a) && c.connect_tls.is_none() && !c.allow_insecure_connect {
            return Err(err(
                "listen.connect",
                format!(
                    "plaintext CONNECT on {a} (not loopback) would let anyone who reaches it \
                     open tunnels into every edge: configure [connect_tls] (client \
                     certificates), use listen.connect_unix or a loopback address, or set \
                     listen.allow_insecure_connect = true"
                ),
            ));
        }
    }
    if let Some(a) = c.health_listen {
        if !is_loopback(&a) {
            return Err(err(
                "listen.health",
                format!(
                    "the probe listener on {a} (not loopback) would let anyone who reaches \
                     it take its few connection slots, which keep kubelet's probes answered \
                     while the admin API is busy: use a loopback address (kubelet reaches \
                     it with `host: 127.0.0.1` in a hostNetwork pod)"
                ),
            ));
        }
    }
    if let Some(read) = &c.admin_read_token {
        // Without a full token the admin API is open to anyone, and a
        // read token would restrict nothing; the same token twice would
        // make every holder of the read token a full one.
        match &c.admin_token {
            None => {
                return Err(err(
                    "admin.read_token_file",
                    "a read-only token needs admin.token_file too (without it the admin API \
                     asks for no token at all)",
                ))
            }
            Some(full)
                if crate::admin::same(full.expose().as_bytes(), read.expose().as_bytes()) =>
            {
                return Err(err(
                    "admin.read_token_file",
                    "the read-only token is the full token (admin.token_file): give it a \
                     token of its own",
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(m) = &c.admin_tls {
        m.server_config_without_client_auth(b"http/1.1")
            .map_err(|e| err("admin.tls", e))?;
    }
    if let Some(a) = c.admin_listen {
        if !is_loopback(&a) && !c.allow_insecure_admin {
            if c.admin_token.is_none() {
                return Err(err(
                    "admin.token_file",
                    format!(
                        "the admin API on {a} (not loopback) needs a token: anyone who \
                         reaches it could close sessions; set admin.token_file, listen on \
                         loopback, or set listen.allow_insecure_admin = true"
                    ),
                ));
            }
            if c.admin_tls.is_none() {
                return Err(err(
                    "admin.tls",
                    format!(
                        "the admin API on {a} (not loopback) must use TLS (its token would \
                         cross the network in clear): leave admin.tls on, or set \
                         listen.allow_insecure_admin = true"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The checks of [`RelayConfig::validate`], on the parts that need no
/// files loaded (so a file's bad value is reported before a missing
/// certificate).
pub(super) fn check_values(
    quic: &QuicTuning,
    l: &Limits,
    nodes: &HashMap<String, Vec<Cidr>>,
    communities: &HashMap<String, Vec<String>>,
) -> Result<(), ConfigError> {
    {
        quic.validate()
            .map_err(|(f, m)| err(format!("quic.{f}"), m))?;
        for (field, d) in [
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.stream_open_timeout", l.stream_open_timeout),
            ("limits.connect_header_timeout", l.connect_header_timeout),
            ("limits.dial_timeout", l.dial_timeout),
            ("limits.udp_idle_timeout", l.udp_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(err(field, "must be greater than zero"));
            }
            if d > MAX_DURATION {
                return Err(err(field, format!("must be at most {MAX_DURATION:?}")));
            }
        }
        if l.drain_grace > MAX_DURATION {
            return Err(err(
                "limits.drain_grace",
                format!("must be at most {MAX_DURATION:?}"),
            ));
        }
        for (field, n) in [
            ("limits.max_sessions", l.max_sessions),
            (
                "limits.max_concurrent_handshakes",
                l.max_concurrent_handshakes,
            ),
            ("limits.max_connect_connections", l.max_connect_connections),
            (
                "limits.max_udp_flows_per_session",
                l.max_udp_flows_per_session,
            ),
        ] {
            if n == 0 {
                return Err(err(field, "must be at least 1"));
            }
        }
        if !(256..=1024 * 1024).contains(&l.connect_max_header_bytes) {
            return Err(err(
                "limits.connect_max_header_bytes",
                "must be between 256 and 1048576",
            ));
        }
        for node in nodes.keys() {
            check_node_name(&format!("nodes.{node}"), node)?;
        }
        for (name, members) in communities {
            for m in members {
                if m != "*" {
                    check_node_name(&format!("communities.{name}"), m)?;
                }
            }
        }
        Ok(())
    }
}

/// Longest timeout or grace accepted anywhere: beyond it, an `Instant`
/// plus the value could overflow, and no operator means a day-long wait.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn check_node_name(field: &str, node: &str) -> Result<(), ConfigError> {
    if node.is_empty() || node.len() > 253 {
        return Err(err(field, "node names are 1 to 253 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CONNECT listener whose client CA is the edges' is noticed (and
    /// warned about at start); one with a CA of its own is not.
    #[test]
    fn a_connect_ca_shared_with_the_edges_is_noticed() {
        relay_transport::tls::install_default_provider();
        let edges = relay_transport::devcerts::DevPki::generate(&["relay"], &["edge-1"]).unwrap();
        let apiserver =
            relay_transport::devcerts::DevPki::generate(&["relay"], &["kube-apiserver"]).unwrap();
        let mut c = RelayConfig::loopback(edges.relay_material().unwrap());
        assert!(!connect_trusts_edges(&c), "no connect_tls");
        c.connect_tls = Some(apiserver.relay_material().unwrap());
        assert!(!connect_trusts_edges(&c), "a CA of its own");
        c.connect_tls = Some(edges.relay_material().unwrap());
        assert!(connect_trusts_edges(&c), "the edges' CA");
    }
}
