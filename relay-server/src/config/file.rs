//! The file form of the configuration: [`FileConfig`] and its sections
//! (`[listen]`, `[limits]`, `[admin]`; the others live with what they
//! configure), parsed from TOML, and [`FileConfig::into_runtime`], which
//! applies the defaults, loads the files the config points at (TLS
//! material, the admin token) and yields a validated [`RelayConfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_protocol::Cidr;
use relay_transport::capture::CaptureFile;
use relay_transport::reload::TlsPaths;
use relay_transport::{QuicFile, QuicTuning, TlsMaterial};
use serde::Deserialize;

use super::validate::{check_exposure, check_values, is_loopback};
use super::{
    err, BootstrapFile, ConfigError, KubernetesFile, Limits, RelayConfig, RelayTlsFiles, Secret,
    TlsFiles,
};
use crate::config_kube::check_kubernetes;

/// `[listen]`.
#[derive(Debug, Deserialize)]
pub struct ListenFile {
    /// UDP address for QUIC.
    #[serde(default = "default_quic")]
    pub quic: SocketAddr,
    /// Accept the TLS+TCP fallback on the same address (TCP).
    #[serde(default = "yes")]
    pub tcp_fallback: bool,
    /// See [`RelayConfig::tcp_fallback_port`].
    pub tcp_fallback_port: Option<u16>,
    /// See [`RelayConfig::tcp_fallback_mss`]: default 1220, 0 = the
    /// kernel's, else 536 to 9000.
    pub tcp_fallback_mss: Option<u32>,
    /// TCP address for HTTP CONNECT.
    pub connect: Option<SocketAddr>,
    /// Unix socket for HTTP CONNECT.
    pub connect_unix: Option<PathBuf>,
    /// TCP address for the admin API.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// TCP address of the probe listener (`/healthz`, `/readyz`; plain
    /// HTTP, loopback only). Default: [`crate::health::DEFAULT_ADDR`].
    pub health: Option<SocketAddr>,
    /// See [`RelayConfig::allow_insecure_connect`].
    #[serde(default)]
    pub allow_insecure_connect: bool,
    /// See [`RelayConfig::allow_insecure_admin`].
    #[serde(default)]
    pub allow_insecure_admin: bool,
    /// See [`RelayConfig::connect_cloud`].
    #[serde(default = "yes")]
    pub connect_cloud: bool,
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
    /// File holding the bearer token (trailing newline ignored); read
    /// again when it changes and on SIGHUP (`crate::token_reload`).
    pub token_file: Option<PathBuf>,
    /// File holding a read-only bearer token (trailing newline ignored):
    /// `GET` on `/v1` and `/metrics` only. Needs `token_file`. Read again
    /// as `token_file` is.
    pub read_token_file: Option<PathBuf>,
    /// How long a token replaced by a rotation (or a read token whose
    /// file was removed) is still accepted, with the access it had:
    /// kubelets on different nodes see an updated Secret up to a minute or
    /// more apart. Default 3m; `0s`: refused at once; at most 1h.
    #[serde(default, with = "humantime_serde")]
    pub token_grace: Option<Duration>,
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
    /// Replica name (default: `relay-0`; `--relay-id` / `RELAY_ID`
    /// override it).
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
    /// See [`RelayConfig::hold_offline_routes`].
    #[serde(default)]
    pub hold_offline_routes: bool,
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
        let admin_token = read_token(self.admin.token_file.as_deref(), "admin.token_file")?;
        // A read token named but absent (its Secret, optional in the
        // manifests, not created yet: an upgrade that skipped the step)
        // starts the relay without one, loudly: its holders (route
        // agents, Prometheus) then get 401, where refusing to start would
        // take every edge's tunnel down with them.
        let admin_read_token = match &self.admin.read_token_file {
            Some(p) if !p.exists() => {
                tracing::warn!(path = %p.display(), "admin.read_token_file does not exist: no read-only token, so route agents and scrapes that present one get 401 until it is created (the relay reads it when it appears, within tls.reload_interval, or on SIGHUP)");
                None
            }
            p => read_token(p.as_deref(), "admin.read_token_file")?,
        };
        let token_grace = self
            .admin
            .token_grace
            .unwrap_or(crate::token_reload::DEFAULT_GRACE);
        if token_grace > crate::token_reload::MAX_GRACE {
            return Err(err(
                "admin.token_grace",
                "at most 1h (a token rotated out, a leaked one say, must stop working soon)",
            ));
        }
        let (tls, tls_crls, tls_reload) = self.tls.load()?;
        // Re-read when they change, with the TLS files' poll and SIGHUP
        // (a rotated Secret without a restart: see `token_reload`).
        let admin_token_files = self.admin.token_file.clone().map(|full| {
            crate::token_reload::AdminTokens::new(
                full,
                self.admin.read_token_file.clone(),
                tls_reload
                    .as_ref()
                    .map_or(crate::config_tls::DEFAULT_RELOAD_INTERVAL, |r| r.interval),
                token_grace,
                crate::token_reload::Tokens {
                    full: admin_token.clone(),
                    read: admin_read_token.clone(),
                },
            )
        });
        let (connect_tls, connect_tls_crls) = match &self.connect_tls {
            Some(t) => {
                let (m, crls) = t.load("connect_tls")?;
                (Some(m), crls)
            }
            None => (None, Vec::new()),
        };
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
            tcp_fallback_port: match self.listen.tcp_fallback_port {
                // A code-built config may ask for an ephemeral port (tests
                // read it back); edges could never be told one.
                Some(0) => {
                    return Err(err(
                        "listen.tcp_fallback_port",
                        "must be 1 to 65535 (edges are told it with their tcp_fallback_port)",
                    ))
                }
                p => p,
            },
            tcp_fallback_mss: relay_transport::tcp::fallback_mss_setting(
                self.listen.tcp_fallback_mss,
            )
            .map_err(|m| err("listen.tcp_fallback_mss", m))?,
            tls,
            tls_crls,
            tls_reload,
            quic,
            connect_listen: self.listen.connect,
            connect_tls,
            connect_tls_crls,
            connect_tls_files: self.connect_tls.as_ref().map(TlsFiles::paths),
            connect_unix: self.listen.connect_unix,
            admin_listen: self.listen.admin,
            health_listen: Some(self.listen.health.unwrap_or(crate::health::DEFAULT_ADDR)),
            health_listen_defaulted: self.listen.health.is_none(),
            admin_token,
            admin_read_token,
            admin_token_files,
            admin_tls,
            admin_tls_files,
            allow_insecure_connect: self.listen.allow_insecure_connect,
            connect_cloud: self.listen.connect_cloud,
            allow_insecure_admin: self.listen.allow_insecure_admin,
            nodes: self.nodes,
            tunnel_routes: self.tunnel_routes,
            hold_offline_routes: self.hold_offline_routes,
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

/// The admin API token in file `path` (`field` names it in errors):
/// trailing newlines ignored, at least 16 characters (the rule reloads
/// hold it to as well: `token_reload::read_admin_token`).
fn read_token(path: Option<&Path>, field: &str) -> Result<Option<Secret>, ConfigError> {
    let Some(p) = path else {
        return Ok(None);
    };
    crate::token_reload::read_admin_token(p)
        .map(Some)
        .map_err(|e| err(field, e))
}
