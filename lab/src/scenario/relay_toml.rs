//! The configuration files of the real binaries, for tests that run them
//! as processes: [`relay_toml`], a [`RelayConfig`] written back as the
//! `relay.toml` the `relay-server` binary reads ([`super::RelayProcess`],
//! the interop tests), so a test runs the binary with the configuration
//! it built in code; [`edge_toml`], a lab edge's `edge-client` file.
//!
//! It writes only the keys the lab sets, and some only when they differ
//! from the default, so the previous release (interop) can read it too.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use relay_server::RelayConfig;

use super::{EDGE_STATUS, QUIC_PORT};
use crate::netns::{self, NetnsLab};

/// `relay.toml` text equivalent to `cfg` (listen addresses, nodes, tunnel
/// routes, QUIC tuning, drain grace, capture on or off, `[kubernetes]`,
/// `[replicas]`), with certificates in `certs` (as written by
/// [`DevPki::write_to`](relay_transport::devcerts::DevPki::write_to)) and
/// the admin token in `token_file`.
pub fn relay_toml(cfg: &RelayConfig, certs: &Path, token_file: Option<&Path>) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut t = format!(
        "relay_id = {:?}\ntunnel_routes = {:?}\n\n[listen]\nquic = \"{}\"\n",
        cfg.relay_id,
        cfg.tunnel_routes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        cfg.quic_listen
    );
    if let Some(a) = cfg.connect_listen {
        let _ = writeln!(t, "connect = \"{a}\"");
    }
    if let Some(a) = cfg.admin_listen {
        let _ = writeln!(t, "admin = \"{a}\"");
    }
    // Only when set: the previous release (interop) knows neither key.
    if cfg.allow_insecure_connect {
        t.push_str("allow_insecure_connect = true\n");
    }
    if cfg.allow_insecure_admin {
        t.push_str("allow_insecure_admin = true\n");
    }
    let _ = write!(
        t,
        "\n[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n",
        q(&certs.join("relay.pem")),
        q(&certs.join("relay-key.pem")),
        q(&certs.join("ca.pem"))
    );
    // admin.tls only where it differs from the default (on off loopback),
    // again for the previous release; when on it reuses the relay's
    // certificate.
    let admin_tls_default = cfg.admin_listen.is_some_and(|a| !a.ip().is_loopback());
    if token_file.is_some() || cfg.admin_tls.is_some() != admin_tls_default {
        t.push_str("\n[admin]\n");
    }
    if cfg.admin_tls.is_some() != admin_tls_default {
        let _ = writeln!(t, "tls = {}", cfg.admin_tls.is_some());
    }
    if let Some(f) = token_file {
        let _ = writeln!(t, "token_file = {}", q(f));
    }
    let _ = write!(
        t,
        "\n[quic]\nkeepalive = \"{}\"\nidle_timeout = \"{}\"\nmax_streams = {}\nstream_window = {}\n",
        ms(cfg.quic.keepalive),
        ms(cfg.quic.idle_timeout),
        cfg.quic.max_bidi_streams,
        cfg.quic.stream_window
    );
    let _ = writeln!(
        t,
        "\n[limits]\ndrain_grace = \"{}\"",
        ms(cfg.limits.drain_grace)
    );
    // The UDP limits only when set (the lab's defaults are the relay's).
    let d = relay_server::Limits::default();
    if cfg.limits.udp_idle_timeout != d.udp_idle_timeout {
        let _ = writeln!(
            t,
            "udp_idle_timeout = \"{}\"",
            ms(cfg.limits.udp_idle_timeout)
        );
    }
    if cfg.limits.max_udp_flows_per_session != d.max_udp_flows_per_session {
        let _ = writeln!(
            t,
            "max_udp_flows_per_session = {}",
            cfg.limits.max_udp_flows_per_session
        );
    }
    let _ = write!(
        t,
        "\n[capture]\nenabled = {}\n\n[nodes]\n",
        cfg.capture.is_some()
    );
    let mut nodes: Vec<_> = cfg.nodes.iter().collect();
    nodes.sort();
    for (node, prefixes) in nodes {
        let p: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
        let _ = writeln!(t, "{node:?} = {p:?}");
    }
    let mut communities: Vec<_> = cfg.communities.iter().collect();
    communities.sort();
    if !communities.is_empty() {
        t.push_str("\n[communities]\n");
    }
    for (name, members) in communities {
        let _ = writeln!(t, "{name:?} = {members:?}");
    }
    if let Some(k) = &cfg.kubernetes {
        t.push_str(&kubernetes_toml(k));
    }
    if let Some(r) = &cfg.replicas {
        t.push_str(&replicas_toml(r));
    }
    t
}

/// `[kubernetes]` (in-cluster mode through a kubeconfig, e.g. the lab
/// cluster's: [`crate::cluster::Cluster::kubeconfig`]).
fn kubernetes_toml(k: &relay_server::config::KubeSettings) -> String {
    let mut t = String::from("\n[kubernetes]\nenabled = true\n");
    if let Some(p) = &k.kubeconfig {
        let _ = writeln!(t, "kubeconfig = {:?}", p.display().to_string());
    }
    if let Some(c) = &k.context {
        let _ = writeln!(t, "context = {c:?}");
    }
    let _ = write!(
        t,
        "node_status = {}\nevents = {}\nservices = {}\napi_timeout = \"{}ms\"\ncluster_domain = {:?}\n",
        k.node_status,
        k.events,
        k.services,
        k.api_timeout.as_millis(),
        k.cluster_domain
    );
    t
}

/// `[replicas]`: a static peer list, or Lease membership with its timings.
fn replicas_toml(r: &relay_server::replicas::ReplicaSettings) -> String {
    use relay_server::replicas::ReplicaSource;
    let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
    let mut t = format!("\n[replicas]\nadvertise = {:?}\n", r.advertise);
    match &r.source {
        ReplicaSource::Static(peers) => {
            for p in peers {
                let _ = write!(
                    t,
                    "\n[[replicas.peers]]\nid = {:?}\naddress = {:?}\n",
                    p.id, p.addr
                );
            }
        }
        ReplicaSource::Leases(l) => {
            let _ = write!(
                t,
                "lease_namespace = {:?}\nlease_duration = {}\nrenew_every = {}\nskew_margin = {}\ngc_after = {}\n",
                l.namespace,
                ms(l.lease_duration),
                ms(l.renew_every),
                ms(l.skew_margin),
                ms(l.gc_after)
            );
        }
    }
    t
}

/// `edge-client` configuration text for `lab`'s edge on `site`, as
/// `scenario::edge_config` builds it in code: the relay's WAN address,
/// the site's pod CIDR and host address, capture on, QUIC only (a failed
/// QUIC handshake fails the test rather than measuring the TCP fallback),
/// the status endpoint on [`EDGE_STATUS`](super::EDGE_STATUS) in the
/// edge's namespace; certificates in `certs` (as written by
/// [`DevPki::write_to`](relay_transport::devcerts::DevPki::write_to));
/// `extra` appended (sections of its own, e.g. `[timeouts]`).
pub fn edge_toml(lab: &NetnsLab, site: u8, certs: &Path, extra: &str) -> String {
    let p = |f: &str| format!("{:?}", certs.join(f).display().to_string());
    let node = format!("edge{site}");
    let host = lab.edge_host_ip(site);
    format!(
        "node = \"{node}\"\nrelay = \"{}:{QUIC_PORT}\"\nserver_name = \"relay.lab\"\n\
         routes = [\"{}\", \"{host}/32\"]\nprimary_addr = \"{host}\"\ntransport = \"quic\"\n\
         status_listen = \"{EDGE_STATUS}\"\n\n\
         [tls]\ncert = {}\nkey = {}\nrelay_ca = {}\n\n[capture]\nenabled = true\n{extra}",
        netns::RELAY_WAN_IP,
        netns::edge_pod_cidr(site),
        p(&format!("{node}.pem")),
        p(&format!("{node}-key.pem")),
        p("ca.pem"),
    )
}
