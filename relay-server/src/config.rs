//! Configuration: the file/CLI form ([`FileConfig`], TOML) and the runtime
//! form the library takes ([`RelayConfig`]). `FileConfig::load` validates
//! and names the offending field in every error.
//!
//! By concern: this file holds the runtime form ([`RelayConfig`],
//! [`Limits`], [`Secret`]) and the error type; `config/file.rs` the file
//! form and its loading, `config/validate.rs` the rules both are held to
//! ([`RelayConfig::validate`]); the `[kubernetes]`/`[bootstrap]` and
//! `[tls]` sections live in `config_kube.rs` and `config_tls.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use relay_protocol::Cidr;
use relay_transport::capture::CaptureConfig;

pub use crate::config_kube::{
    BootstrapFile, BootstrapSettings, KubeSettings, KubernetesFile, DEFAULT_CERT_LIFETIME,
};
pub use crate::config_tls::{RelayTlsFiles, TlsFiles, TlsReload};
use relay_transport::reload::TlsPaths;
use relay_transport::{QuicTuning, TlsMaterial};

mod file;
#[cfg(test)]
mod tests;
mod validate;
pub use file::{AdminFile, FileConfig, LimitsFile, ListenFile};
pub use validate::MAX_DURATION;

/// A secret string whose `Debug` never shows it.
///
/// One made with [`Secret::from_file`] (the route agent's `--token-file`)
/// also knows its file: [`Secret::current`] gives the file's token as it
/// is now, so a Secret rotated in place reaches every holder of a clone
/// (the multipath agent's pollers share one) without a restart.
#[derive(Clone)]
pub struct Secret {
    value: String,
    file: Option<std::sync::Arc<crate::token_reload::TokenFile>>,
}

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret {
            value: s.into(),
            file: None,
        }
    }

    /// The token in file `path` (trailing whitespace dropped), read again
    /// from it when the file changes: see [`Secret::current`].
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let (file, value) = crate::token_reload::TokenFile::open(path)?;
        Ok(Secret {
            value,
            file: Some(file),
        })
    }

    /// The secret itself; call only where it is compared or sent. For one
    /// read from a file: as read when this value was made (see
    /// [`Secret::current`]).
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The secret to send now: this one, or for one read from a file, the
    /// file's token as it is now (read again when the file's metadata
    /// changed since the last read; a file that cannot be read or is empty
    /// keeps the token read before, logged).
    pub fn current(&self) -> Secret {
        match &self.file {
            None => self.clone(),
            Some(f) => Secret {
                value: f.current(),
                file: Some(f.clone()),
            },
        }
    }

    /// After a refusal (401): the file read again whatever its metadata
    /// says, and its token if it differs from this one; `None` when there
    /// is no file or it holds the same token.
    pub fn reread(&self) -> Option<Secret> {
        let f = self.file.as_ref()?;
        let value = f.reread();
        (value != self.value).then(|| Secret {
            value,
            file: Some(f.clone()),
        })
    }
}

#[cfg(test)]
impl Secret {
    /// The file it is read from, for tests that fake what its metadata
    /// shows.
    pub(crate) fn file_for_tests(&self) -> Option<&crate::token_reload::TokenFile> {
        self.file.as_deref()
    }
}

/// Equal when the values are (whatever file either came from).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for Secret {}

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
    /// Most handshakes in progress at once; up to four times as many more
    /// wait for one to finish (each at most `handshake_timeout`), and
    /// beyond that they are refused at once.
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
    /// Also accept the TLS+TCP+yamux fallback on the same address (TCP),
    /// for edges whose networks block UDP.
    pub tcp_fallback: bool,
    /// The fallback's TCP port (`None`: the QUIC port's number, so one
    /// Service port serves both). A site that lets out TCP 443 only needs
    /// the fallback there while QUIC keeps another port; edges are told
    /// with their own `tcp_fallback_port`.
    pub tcp_fallback_port: Option<u16>,
    /// The maximum segment size set on the fallback listener (`None`: the
    /// kernel's): it is the MSS the relay announces, and Linux also clamps
    /// what the relay sends to it, so it bounds both directions of every
    /// fallback connection, also those of edges that set none themselves
    /// (older builds, `tcp_fallback_mss = 0`); see
    /// [`relay_transport::tcp::DEFAULT_FALLBACK_MSS`].
    pub tcp_fallback_mss: Option<u32>,
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
    /// Revoked client certificates of the CONNECT listener
    /// (`connect_tls.crl`); empty: no revocation check.
    pub connect_tls_crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// Files to reload `connect_tls` and `connect_tls_crls` from (with the relay's `[tls]`, on
    /// SIGHUP and when they change); `None` for a config built by code.
    pub connect_tls_files: Option<TlsPaths>,
    /// Unix socket path of the HTTP CONNECT ingress, if enabled.
    pub connect_unix: Option<PathBuf>,
    /// Address of the admin API, if enabled (loopback by default).
    pub admin_listen: Option<SocketAddr>,
    /// Address of the probe listener (`/healthz` and `/readyz` only, plain
    /// HTTP, see [`crate::health`]), if enabled; must be loopback.
    pub health_listen: Option<SocketAddr>,
    /// `health_listen` is the file's default, not a setting: if that
    /// address is taken the relay logs it and starts without the probe
    /// listener (as before it had one), where a configured address that
    /// cannot be bound stops the start.
    pub health_listen_defaulted: bool,
    /// Bearer token required by the admin API's `/v1` and `/metrics`:
    /// full access, closing and draining sessions included.
    pub admin_token: Option<Secret>,
    /// A second bearer token, read-only (`admin.read_token_file`): accepted
    /// for `GET` on `/v1` and `/metrics` only, refused (403) for closing or
    /// draining a session. For Prometheus and the route agents, so a
    /// cloud node's copy cannot disconnect edges. Needs `admin_token`.
    pub admin_read_token: Option<Secret>,
    /// The files `admin_token` and `admin_read_token` were read from, and
    /// the tokens they hold now: looked at again every
    /// `tls.reload_interval` and on SIGHUP, and what the admin API checks
    /// (see [`crate::token_reload`]); `admin_token` and `admin_read_token`
    /// stay the tokens the relay started with. `None` for a config built
    /// by code: those two are then the tokens, fixed. Clones of the config
    /// share the tokens held (read from the same files anyway).
    pub admin_token_files: Option<crate::token_reload::AdminTokens>,
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
    /// CONNECT clients also reach the cloud, dialled by the relay: cloud
    /// Nodes' addresses and pod CIDRs and `tunnel_routes` (what the
    /// apiserver's egress selector needs for cloud kubelets). On by
    /// default; off, CONNECT reaches edges only.
    pub connect_cloud: bool,
    /// Allow the admin API on a non-loopback address without TLS or
    /// without a token. Off by default; [`RelayConfig::validate`] refuses it.
    pub allow_insecure_admin: bool,
    /// Which prefixes each node may serve.
    pub nodes: HashMap<String, Vec<Cidr>>,
    /// Cloud prefixes edges send back through the tunnel; the relay dials
    /// targets inside them for edges, and nothing else.
    pub tunnel_routes: Vec<Cidr>,
    /// Keep an offline edge's prefixes claimed: still captured here,
    /// still routed here by route agents and still in other edges' tunnel
    /// routes, so connections to its pods are refused at once instead of
    /// following the default route (where cloud routers and carriers drop
    /// them silently: a connect hangs for minutes). Off by default: an
    /// edge's routes go with its session.
    pub hold_offline_routes: bool,
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
            tcp_fallback_port: None,
            tcp_fallback_mss: Some(relay_transport::tcp::DEFAULT_FALLBACK_MSS),
            tls,
            tls_crls: Vec::new(),
            tls_reload: None,
            quic: QuicTuning::relay_default(),
            connect_listen: Some(lo),
            connect_tls: None,
            connect_tls_crls: Vec::new(),
            connect_tls_files: None,
            connect_unix: None,
            admin_listen: Some(lo),
            health_listen: Some(lo),
            health_listen_defaulted: false,
            admin_token: None,
            admin_read_token: None,
            admin_token_files: None,
            admin_tls: None,
            admin_tls_files: None,
            allow_insecure_connect: false,
            connect_cloud: true,
            allow_insecure_admin: false,
            nodes: HashMap::new(),
            tunnel_routes: Vec::new(),
            hold_offline_routes: false,
            communities: HashMap::new(),
            kubernetes: None,
            bootstrap: None,
            limits: Limits::default(),
            capture: None,
            replicas: None,
        }
    }
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
