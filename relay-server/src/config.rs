//! Configuration: the file/CLI form ([`FileConfig`], TOML) and the runtime
//! form the library takes ([`RelayConfig`]). `FileConfig::load` validates
//! and names the offending field in every error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_protocol::Cidr;
use relay_transport::capture::{CaptureConfig, CaptureFile};

use crate::config_kube::check_kubernetes;
pub use crate::config_kube::{
    BootstrapFile, BootstrapSettings, KubeSettings, KubernetesFile, DEFAULT_CERT_LIFETIME,
};
pub use crate::config_tls::{RelayTlsFiles, TlsFiles, TlsReload};
use relay_transport::reload::TlsPaths;
use relay_transport::{QuicFile, QuicTuning, TlsMaterial};
use serde::Deserialize;

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; call only where it is compared or sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MASKED")
    }
}

/// Bounds on every wait and queue of the relay.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshake + hello + registration must finish within this.
    pub handshake_timeout: Duration,
    /// How long the relay waits for an edge to answer a stream open
    /// (the edge's own dial timeout should be shorter, to report precisely).
    pub stream_open_timeout: Duration,
    /// A CONNECT request header must arrive within this; so must an admin
    /// API request head.
    pub connect_header_timeout: Duration,
    /// Largest CONNECT request header accepted, in bytes.
    pub connect_max_header_bytes: usize,
    /// Most sessions (distinct nodes) at once.
    pub max_sessions: usize,
    /// Most handshakes in progress at once; more are refused at once.
    pub max_concurrent_handshakes: usize,
    /// Most CONNECT client connections at once; more get 503.
    pub max_connect_connections: usize,
    /// How long draining sessions get for in-flight streams on shutdown.
    pub drain_grace: Duration,
    /// Bound on dialing a cloud target for an edge.
    pub dial_timeout: Duration,
    /// A UDP flow silent this long ends.
    pub udp_idle_timeout: Duration,
    /// Most UDP flows open at once on one session.
    pub max_udp_flows_per_session: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            stream_open_timeout: Duration::from_secs(15),
            connect_header_timeout: Duration::from_secs(10),
            connect_max_header_bytes: 8 * 1024,
            max_sessions: 10_000,
            max_concurrent_handshakes: 256,
            max_connect_connections: 16_384,
            drain_grace: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(5),
            udp_idle_timeout: Duration::from_secs(60),
            max_udp_flows_per_session: 1024,
        }
    }
}

/// Everything the relay library needs, already loaded and validated.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// This replica's name, sent to edges and shown in logs.
    pub relay_id: String,
    /// UDP address of the QUIC endpoint edges dial.
    pub quic_listen: SocketAddr,
    /// Also accept the TLS+TCP+yamux fallback on the same address and port
    /// number (TCP), for edges whose networks block UDP.
    pub tcp_fallback: bool,
    /// Relay certificate and the CA that signs edge certificates.
    pub tls: TlsMaterial,
    /// Revoked edge certificates (`tls.crl`); empty: no revocation check.
    pub tls_crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// Files to reload `tls` and `tls_crls` from (on SIGHUP, on
    /// [`crate::Relay::reload_tls`], and when they change); `None` for a
    /// config built by code.
    pub tls_reload: Option<TlsReload>,
    /// QUIC transport settings.
    pub quic: QuicTuning,
    /// TCP address of the HTTP CONNECT ingress, if enabled.
    pub connect_listen: Option<SocketAddr>,
    /// When set, the CONNECT TCP ingress requires TLS with client
    /// certificates from this material's CA (the apiserver's egress cert).
    pub connect_tls: Option<TlsMaterial>,
    /// Files to reload `connect_tls` from (with the relay's `[tls]`, on
    /// SIGHUP and when they change); `None` for a config built by code.
    pub connect_tls_files: Option<TlsPaths>,
    /// Unix socket path of the HTTP CONNECT ingress, if enabled.
    pub connect_unix: Option<PathBuf>,
    /// Address of the admin API, if enabled (loopback by default).
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token required by the admin API's `/v1` and `/metrics`.
    pub admin_token: Option<Secret>,
    /// When set, the admin API is served over HTTPS (TLS 1.3, no client
    /// certificates: clients authenticate with the token) presenting this
    /// certificate. Required for an admin API off loopback.
    pub admin_tls: Option<TlsMaterial>,
    /// Files to reload `admin_tls` from (`admin.cert`/`admin.key`, or the
    /// relay's `[tls]` files when the admin API serves the relay's
    /// certificate); `None` for a config built by code.
    pub admin_tls_files: Option<TlsPaths>,
    /// Allow plaintext CONNECT (no [`RelayConfig::connect_tls`]) on a
    /// non-loopback address: whoever reaches it can open tunnels into
    /// every edge. Off by default; [`RelayConfig::validate`] refuses it.
    pub allow_insecure_connect: bool,
    /// Allow the admin API on a non-loopback address without TLS or
    /// without a token. Off by default; [`RelayConfig::validate`] refuses it.
    pub allow_insecure_admin: bool,
    /// Which prefixes each node may serve.
    pub nodes: HashMap<String, Vec<Cidr>>,
    /// Cloud prefixes edges send back through the tunnel; the relay dials
    /// targets inside them for edges, and nothing else.
    pub tunnel_routes: Vec<Cidr>,
    /// Edge-to-edge reachability: community name → member nodes (`"*"`
    /// for every node). Edges reach each other's routes only within a
    /// community; with none, edges are isolated from each other.
    pub communities: HashMap<String, Vec<String>>,
    /// In-cluster mode: Nodes decide claims (instead of `nodes`), and the
    /// relay writes the Node condition and Events.
    pub kubernetes: Option<KubeSettings>,
    /// Certificate bootstrap: edges with a service-account token but no
    /// certificate get a short-lived node certificate (needs `kubernetes`).
    pub bootstrap: Option<BootstrapSettings>,
    /// Bounds.
    pub limits: Limits,
    /// When set, the relay captures traffic to every live session's routes
    /// (nftables redirect + policy routing; needs CAP_NET_ADMIN).
    pub capture: Option<CaptureConfig>,
    /// Scale-out: this replica's dial address and where the others come
    /// from (see [`crate::replicas`]); `None`: edges keep one session.
    pub replicas: Option<crate::replicas::ReplicaSettings>,
}

impl RelayConfig {
    /// A config on loopback with ephemeral ports (tests, the demo).
    pub fn loopback(tls: TlsMaterial) -> Self {
        let lo = SocketAddr::from(([127, 0, 0, 1], 0));
        RelayConfig {
            relay_id: "relay-0".into(),
            quic_listen: lo,
            tcp_fallback: true,
            tls,
            tls_crls: Vec::new(),
            tls_reload: None,
            quic: QuicTuning::relay_default(),
            connect_listen: Some(lo),
            connect_tls: None,
            connect_tls_files: None,
            connect_unix: None,
            admin_listen: Some(lo),
            admin_token: None,
            admin_tls: None,
            admin_tls_files: None,
            allow_insecure_connect: false,
            allow_insecure_admin: false,
            nodes: HashMap::new(),
            tunnel_routes: Vec::new(),
            communities: HashMap::new(),
            kubernetes: None,
            bootstrap: None,
            limits: Limits::default(),
            capture: None,
            replicas: None,
        }
    }

    /// Checks every value, naming the offending field. [`Relay::spawn`]
    /// calls it, so a config built by code is held to the same rules as a
    /// file (a zero keep-alive would otherwise panic in a timer later).
    ///
    /// [`Relay::spawn`]: crate::Relay::spawn
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_values(&self.quic, &self.limits, &self.nodes, &self.communities)?;
        check_kubernetes(self.kubernetes.as_ref(), &self.nodes)?;
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
        check_exposure(self)
    }
}

/// Whether an address is reachable only from this host. `0.0.0.0` and
/// `::` are every address, not loopback.
fn is_loopback(a: &SocketAddr) -> bool {
    a.ip().is_loopback()
}

/// Refuses setups that expose the tunnels or the admin API to the network
/// without protection, unless explicitly allowed: a plaintext CONNECT
/// listener off loopback lets anyone who reaches it into every edge; an
/// admin API off loopback without a token lets anyone list and close
/// sessions (`DELETE /v1/sessions/..`), and without TLS its token crosses
/// the network in clear.
fn check_exposure(c: &RelayConfig) -> Result<(), ConfigError> {
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
fn check_values(
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

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {field}: {message}")]
pub struct ConfigError {
    /// Dotted path of the field (`tls.cert`, `nodes.edge-1`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn err(field: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// `[listen]`.
#[derive(Debug, Deserialize)]
pub struct ListenFile {
    /// UDP address for QUIC.
    #[serde(default = "default_quic")]
    pub quic: SocketAddr,
    /// Accept the TLS+TCP fallback on the same address and port (TCP).
    #[serde(default = "yes")]
    pub tcp_fallback: bool,
    /// TCP address for HTTP CONNECT.
    pub connect: Option<SocketAddr>,
    /// Unix socket for HTTP CONNECT.
    pub connect_unix: Option<PathBuf>,
    /// TCP address for the admin API.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// See [`RelayConfig::allow_insecure_connect`].
    #[serde(default)]
    pub allow_insecure_connect: bool,
    /// See [`RelayConfig::allow_insecure_admin`].
    #[serde(default)]
    pub allow_insecure_admin: bool,
}

fn yes() -> bool {
    true
}

fn default_quic() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}

/// `[limits]`.
#[derive(Debug, Deserialize, Default)]
pub struct LimitsFile {
    /// See [`Limits::handshake_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// See [`Limits::stream_open_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub stream_open_timeout: Option<Duration>,
    /// See [`Limits::connect_header_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub connect_header_timeout: Option<Duration>,
    /// See [`Limits::connect_max_header_bytes`].
    pub connect_max_header_bytes: Option<usize>,
    /// See [`Limits::max_sessions`].
    pub max_sessions: Option<usize>,
    /// See [`Limits::max_concurrent_handshakes`].
    pub max_concurrent_handshakes: Option<usize>,
    /// See [`Limits::max_connect_connections`].
    pub max_connect_connections: Option<usize>,
    /// See [`Limits::drain_grace`].
    #[serde(default, with = "humantime_serde")]
    pub drain_grace: Option<Duration>,
    /// See [`Limits::dial_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub dial_timeout: Option<Duration>,
    /// See [`Limits::udp_idle_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub udp_idle_timeout: Option<Duration>,
    /// See [`Limits::max_udp_flows_per_session`].
    pub max_udp_flows_per_session: Option<usize>,
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
pub struct AdminFile {
    /// File holding the bearer token (trailing newline ignored).
    pub token_file: Option<PathBuf>,
    /// Serve the admin API over HTTPS. Default: on when `listen.admin` is
    /// not a loopback address, off on loopback.
    pub tls: Option<bool>,
    /// Certificate chain (PEM) for the admin API's HTTPS; default: the
    /// relay's `tls.cert` (which must then name the address or name admin
    /// clients dial).
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (set both or neither).
    pub key: Option<PathBuf>,
}

/// The relay's TOML configuration file.
#[derive(Debug, Deserialize)]
pub struct FileConfig {
    /// The config format version the file was written for (default: this
    /// build's). A newer one makes unknown keys warnings instead of errors
    /// (see `relay_transport::config_file`).
    pub config_version: Option<u32>,
    /// Replica name (default: the host name, else `relay-0`).
    pub relay_id: Option<String>,
    /// Listening addresses.
    pub listen: ListenFile,
    /// Relay certificate, key, the CA of edge certificates, CRLs.
    pub tls: RelayTlsFiles,
    /// TLS for the CONNECT TCP listener (client certificates required).
    pub connect_tls: Option<TlsFiles>,
    /// Admin API settings.
    #[serde(default)]
    pub admin: AdminFile,
    /// QUIC settings.
    #[serde(default)]
    pub quic: QuicFile,
    /// Bounds.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Node name → prefixes that node may serve.
    #[serde(default)]
    pub nodes: HashMap<String, Vec<Cidr>>,
    /// Prefixes edges send back through the tunnel.
    #[serde(default)]
    pub tunnel_routes: Vec<Cidr>,
    /// Community name → member nodes (`"*"`: every node).
    #[serde(default)]
    pub communities: HashMap<String, Vec<String>>,
    /// In-cluster mode.
    #[serde(default)]
    pub kubernetes: KubernetesFile,
    /// Certificate bootstrap (needs `[kubernetes]`).
    pub bootstrap: Option<BootstrapFile>,
    /// Relay-installed routes.
    #[serde(default)]
    pub capture: CaptureFile,
    /// Scale-out: several replicas, every edge connected to each.
    #[serde(default)]
    pub replicas: crate::replicas::ReplicasFile,
}

impl FileConfig {
    /// Reads, parses and validates a config file, loading the TLS files.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| err(path.display().to_string(), e))?;
        Self::parse(&text)?.into_runtime()
    }

    /// Parses TOML text; errors name the line and field.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        relay_transport::config_file::parse(text, |f: &Self| f.config_version)
            .map(|p| p.value)
            .map_err(|e| err("file", e))
    }

    /// Validates and loads what the file points at.
    pub fn into_runtime(self) -> Result<RelayConfig, ConfigError> {
        let d = Limits::default();
        let l = &self.limits;
        // Defaults here; every value is checked by RelayConfig::validate.
        let limits = Limits {
            handshake_timeout: l.handshake_timeout.unwrap_or(d.handshake_timeout),
            stream_open_timeout: l.stream_open_timeout.unwrap_or(d.stream_open_timeout),
            connect_header_timeout: l.connect_header_timeout.unwrap_or(d.connect_header_timeout),
            connect_max_header_bytes: l
                .connect_max_header_bytes
                .unwrap_or(d.connect_max_header_bytes),
            max_sessions: l.max_sessions.unwrap_or(d.max_sessions),
            max_concurrent_handshakes: l
                .max_concurrent_handshakes
                .unwrap_or(d.max_concurrent_handshakes),
            max_connect_connections: l
                .max_connect_connections
                .unwrap_or(d.max_connect_connections),
            drain_grace: l.drain_grace.unwrap_or(d.drain_grace),
            dial_timeout: l.dial_timeout.unwrap_or(d.dial_timeout),
            udp_idle_timeout: l.udp_idle_timeout.unwrap_or(d.udp_idle_timeout),
            max_udp_flows_per_session: l
                .max_udp_flows_per_session
                .unwrap_or(d.max_udp_flows_per_session),
        };
        let capture = self
            .capture
            .resolve()
            .map_err(|(f, m)| err(format!("capture.{f}"), m))?;
        if self.capture.max_udp_flows.is_some() {
            return Err(err(
                "capture.max_udp_flows",
                "edge only (the relay bounds flows per session: limits.max_udp_flows_per_session)",
            ));
        }
        let quic = self
            .quic
            .resolve(QuicTuning::relay_default())
            .map_err(|(f, m)| err(format!("quic.{f}"), m))?;
        check_values(&quic, &limits, &self.nodes, &self.communities)?;
        let kubernetes = self.kubernetes.resolve();
        check_kubernetes(kubernetes.as_ref(), &self.nodes)?;
        if self.listen.connect.is_none() && self.listen.connect_unix.is_none() {
            tracing::warn!("no CONNECT listener configured (listen.connect / listen.connect_unix)");
        }
        if self.connect_tls.is_some() && self.listen.connect.is_none() {
            return Err(err(
                "connect_tls",
                "set listen.connect too (TLS applies to the TCP listener)",
            ));
        }
        let admin_token = match &self.admin.token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| err("admin.token_file", format!("{}: {e}", p.display())))?;
                let t = t.trim_end_matches(['\n', '\r']);
                if t.len() < 16 {
                    return Err(err(
                        "admin.token_file",
                        "token must be at least 16 characters",
                    ));
                }
                Some(Secret::new(t))
            }
        };
        let (tls, tls_crls, tls_reload) = self.tls.load()?;
        let admin_tls_on = match (self.admin.tls, self.listen.admin) {
            (Some(on), _) => on,
            (None, Some(a)) => !is_loopback(&a),
            (None, None) => false,
        };
        let admin_tls_files = match (&self.admin.cert, &self.admin.key) {
            (Some(cert), Some(key)) if admin_tls_on => Some(TlsPaths {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls.client_ca.clone(),
                crl: None,
            }),
            (None, None) if admin_tls_on => Some(TlsPaths {
                cert: self.tls.cert.clone(),
                key: self.tls.key.clone(),
                client_ca: self.tls.client_ca.clone(),
                crl: None,
            }),
            _ => None,
        };
        let admin_tls = match (&self.admin.cert, &self.admin.key) {
            (Some(_), _) | (_, Some(_)) if !admin_tls_on => {
                return Err(err(
                    "admin.cert",
                    "admin.cert/key given but admin.tls is off",
                ));
            }
            (Some(cert), Some(key)) => Some(
                TlsMaterial::from_files(cert, key, &self.tls.client_ca)
                    .map_err(|e| err("admin.cert", e))?,
            ),
            (Some(_), None) | (None, Some(_)) => {
                return Err(err("admin.cert", "set admin.cert and admin.key together"));
            }
            (None, None) if admin_tls_on => Some(tls.clone()),
            (None, None) => None,
        };
        let bootstrap = match &self.bootstrap {
            Some(_) if kubernetes.is_none() => {
                return Err(err(
                    "bootstrap",
                    "certificate bootstrap verifies tokens with the Kubernetes API: enable [kubernetes]",
                ))
            }
            Some(b) => Some(b.load(&tls.ca)?),
            None => None,
        };
        let relay_id = self.relay_id.unwrap_or_else(|| "relay-0".into());
        let replicas = self.replicas.resolve(&relay_id, kubernetes.is_some())?;
        let cfg = RelayConfig {
            relay_id,
            quic_listen: self.listen.quic,
            tcp_fallback: self.listen.tcp_fallback,
            tls,
            tls_crls,
            tls_reload,
            quic,
            connect_listen: self.listen.connect,
            connect_tls: self
                .connect_tls
                .as_ref()
                .map(|t| t.load("connect_tls"))
                .transpose()?,
            connect_tls_files: self.connect_tls.as_ref().map(|t| TlsPaths {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: t.client_ca.clone(),
                crl: None,
            }),
            connect_unix: self.listen.connect_unix,
            admin_listen: self.listen.admin,
            admin_token,
            admin_tls,
            admin_tls_files,
            allow_insecure_connect: self.listen.allow_insecure_connect,
            allow_insecure_admin: self.listen.allow_insecure_admin,
            nodes: self.nodes,
            tunnel_routes: self.tunnel_routes,
            communities: self.communities,
            bootstrap,
            kubernetes,
            limits,
            capture,
            replicas,
        };
        check_exposure(&cfg)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e = FileConfig::parse("[listen]\nquic = \"0.0.0.0:1\"\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = FileConfig::parse(
            "[listen]\n[tls]\ncert=\"a\"\nkey=\"b\"\nclient_ca=\"c\"\n[nodes]\nedge-1 = [\"10.0.0.1/24\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("host bits"), "{e}");
        let f = FileConfig::parse(
            "[listen]\n[tls]\ncert=\"/nonexistent/a\"\nkey=\"b\"\nclient_ca=\"c\"\n[limits]\nhandshake_timeout=\"0s\"\n",
        )
        .unwrap();
        let e = f.into_runtime().unwrap_err();
        assert_eq!(e.field, "limits.handshake_timeout");
        let f = FileConfig::parse(
            "[listen]\n[tls]\ncert=\"/nonexistent/a\"\nkey=\"b\"\nclient_ca=\"c\"\n",
        )
        .unwrap();
        let e = f.into_runtime().unwrap_err();
        assert_eq!(e.field, "tls");
        assert!(e.to_string().contains("/nonexistent/a"), "{e}");
    }

    /// Writes a dev PKI and a token into a fresh directory; returns the
    /// `[tls]` and `[admin] token_file` lines pointing at them.
    fn files() -> (PathBuf, String) {
        let dir = std::env::temp_dir().join(format!(
            "relay-config-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let pki = relay_transport::devcerts::DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        pki.write_to(&dir).unwrap();
        std::fs::write(dir.join("token"), "0123456789abcdef0123\n").unwrap();
        let d = dir.display();
        let tls = format!(
            "[tls]\ncert=\"{d}/relay.pem\"\nkey=\"{d}/relay-key.pem\"\nclient_ca=\"{d}/ca.pem\"\n"
        );
        (dir, tls)
    }

    fn load(listen: &str, tls: &str, admin: &str) -> Result<RelayConfig, ConfigError> {
        FileConfig::parse(&format!("[listen]\n{listen}\n{tls}[admin]\n{admin}\n"))?.into_runtime()
    }

    #[test]
    fn insecure_exposure_is_refused_unless_allowed() {
        relay_transport::tls::install_default_provider();
        let (dir, tls) = files();
        let token = format!("token_file = \"{}/token\"", dir.display());
        // Defaults: admin on loopback, plaintext, no token: fine.
        let c = load("", &tls, "").unwrap();
        assert!(c.admin_tls.is_none());
        // Plaintext CONNECT off loopback.
        let e = load("connect = \"0.0.0.0:8131\"", &tls, "").unwrap_err();
        assert_eq!(e.field, "listen.connect", "{e}");
        load("connect = \"127.0.0.1:8131\"", &tls, "").unwrap();
        load(
            "connect = \"0.0.0.0:8131\"\nallow_insecure_connect = true",
            &tls,
            "",
        )
        .unwrap();
        // Admin off loopback: a token is required ...
        let e = load("admin = \"0.0.0.0:9090\"", &tls, "").unwrap_err();
        assert_eq!(e.field, "admin.token_file", "{e}");
        // ... and TLS, which is then on by default (the relay's certificate).
        let c = load("admin = \"0.0.0.0:9090\"", &tls, &token).unwrap();
        assert!(c.admin_tls.is_some());
        let e = load(
            "admin = \"0.0.0.0:9090\"",
            &tls,
            &format!("{token}\ntls = false"),
        )
        .unwrap_err();
        assert_eq!(e.field, "admin.tls", "{e}");
        // Explicitly allowed.
        let c = load(
            "admin = \"0.0.0.0:9090\"\nallow_insecure_admin = true",
            &tls,
            "tls = false",
        )
        .unwrap();
        assert!(c.admin_tls.is_none() && c.admin_token.is_none());
        // Its own certificate; both halves or neither.
        let d = dir.display();
        let own = format!("{token}\ncert = \"{d}/edge-1.pem\"\nkey = \"{d}/edge-1-key.pem\"");
        load("admin = \"0.0.0.0:9090\"", &tls, &own).unwrap();
        let half = format!("{token}\ncert = \"{d}/edge-1.pem\"");
        let e = load("admin = \"0.0.0.0:9090\"", &tls, &half).unwrap_err();
        assert_eq!(e.field, "admin.cert", "{e}");
        // Built by code: the same rules.
        let mut c = load("", &tls, "").unwrap();
        c.admin_listen = Some(SocketAddr::from(([10, 0, 0, 1], 9090)));
        assert_eq!(c.validate().unwrap_err().field, "admin.token_file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "MASKED");
    }
}
