//! Edge configuration: the TOML file form and the runtime [`EdgeConfig`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_protocol::Cidr;
use relay_transport::capture::{CaptureConfig, CaptureFile};
use relay_transport::{QuicFile, QuicTuning, TlsMaterial};
use serde::Deserialize;

use crate::backoff::BackoffConfig;

/// Which transport the client dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC, falling back to TLS over TCP when QUIC cannot complete a
    /// handshake quickly, and moving back to QUIC when it works again.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP with yamux only.
    Tcp,
}

/// Everything the edge client needs, loaded and validated.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// This node's name; must match the client certificate.
    pub node: String,
    /// Relay address, `host:port` (resolved again on every attempt, so a
    /// relay Service IP change is followed; while the name does not
    /// resolve, the addresses it had are dialled).
    pub relay: String,
    /// Name the relay certificate must carry.
    pub server_name: String,
    /// Who this edge is to the relay: a certificate it was given, or one
    /// it obtains with a service-account token.
    pub identity: Identity,
    /// Where `identity`'s files are, to read them again when they change
    /// (`None` for a config built by code).
    pub tls_files: Option<EdgeTlsFiles>,
    /// Prefixes served (pod CIDRs, host addresses). Streams to anything
    /// else are refused with `Denied`.
    pub routes: Vec<Cidr>,
    /// The node's primary address (target of `CONNECT <node>:<port>`).
    pub primary_addr: Option<IpAddr>,
    /// When non-empty, only these destination ports are served.
    pub allowed_ports: Vec<u16>,
    /// Bound on dialing a local target.
    pub dial_timeout: Duration,
    /// Bound on connecting to the relay and completing the hello.
    pub handshake_timeout: Duration,
    /// Transport to dial.
    pub transport: TransportMode,
    /// In `Auto`, how long QUIC gets before falling back to TCP.
    pub quic_fallback_after: Duration,
    /// In `Auto` on the TCP fallback, how often to try QUIC again.
    pub quic_probe_interval: Duration,
    /// The TCP fallback's maximum segment size (`None`: the kernel's, from
    /// path-MTU discovery); see [`relay_transport::tcp::DEFAULT_FALLBACK_MSS`].
    pub tcp_fallback_mss: Option<u32>,
    /// The relay's TCP fallback port, where it differs from the QUIC one
    /// (`None`: `relay`'s port). Applies to every relay address dialled,
    /// advertised replicas' too, and to the proxy's CONNECT target.
    pub tcp_fallback_port: Option<u16>,
    /// The HTTP proxy the TCP fallback goes through (a site whose only way
    /// out is a forward proxy); QUIC never does.
    pub tcp_proxy: Option<relay_transport::proxy::HttpProxy>,
    /// QUIC transport settings.
    pub quic: QuicTuning,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// A UDP flow silent this long ends.
    pub udp_idle: Duration,
    /// Most UDP flows open at once.
    pub max_udp_flows: usize,
    /// Most relay replicas this edge holds a session to at once when the
    /// relay advertises a replica set (one session per replica); replicas
    /// past the cap are ignored, logged.
    pub max_relays: usize,
    /// When set, traffic from this node towards the relay's tunnel routes
    /// (cloud ranges, other edges) is captured and sent through the tunnel
    /// (nftables redirect + policy routing; needs CAP_NET_ADMIN).
    pub capture: Option<CaptureConfig>,
    /// When set, the node-local resolver runs (see [`crate::dns`]).
    pub dns: Option<crate::dns::DnsConfig>,
    /// Where the status endpoint (`/healthz`, `/readyz`, `/metrics`)
    /// listens; `None`: nowhere (see `status`).
    pub status_listen: Option<SocketAddr>,
    /// Where capture's last routes and ClusterIP table are saved, so a
    /// restart while the relay is unreachable captures (and serves local
    /// Service endpoints) as before; `None`: not saved. Needs `capture`.
    pub capture_state_file: Option<PathBuf>,
    /// Where the relay's addresses are saved as its name last resolved, so
    /// a restart while DNS is down still dials the relay (see
    /// `relay_addrs.rs`); `None`: not saved.
    pub relay_addrs_file: Option<PathBuf>,
    /// Runtime worker threads of the `edge-client` binary (0: one per
    /// CPU); the library runs on its caller's runtime and ignores it. See
    /// [`DEFAULT_WORKER_THREADS`].
    pub worker_threads: usize,
    /// This node runs kube-proxy (or a replacement that programs
    /// ClusterIPs in the kernel): Services whose endpoints are all on this
    /// node are left to it. `false` (a node without one): capture takes
    /// those too and the edge dials the local endpoint itself.
    pub kube_proxy: bool,
    /// With `capture`: traffic to the tunnel's IPv6 prefixes (capture
    /// takes IPv4 only) is refused and counted instead of leaving by the
    /// node's default route (`capture.refuse_ipv6`, default true).
    pub capture_refuse_ipv6: bool,
}

/// Default of [`EdgeConfig::worker_threads`]: one. An edge node is small
/// and busy with its own pods; one worker moves several Gbit/s, above any
/// site uplink, at less CPU per byte and per connection than two (no task
/// hand-offs and wake-ups between threads: edge CPU per GiB -11 to -22 %,
/// per new connection -23 %, see docs/benchmarks.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;

impl EdgeConfig {
    /// A config with defaults for everything but identity and routes.
    pub fn new(
        node: impl Into<String>,
        relay: impl Into<String>,
        server_name: impl Into<String>,
        tls: TlsMaterial,
    ) -> Self {
        EdgeConfig {
            node: node.into(),
            relay: relay.into(),
            server_name: server_name.into(),
            identity: Identity::Static(tls),
            tls_files: None,
            routes: Vec::new(),
            primary_addr: None,
            allowed_ports: Vec::new(),
            dial_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            transport: TransportMode::Auto,
            quic_fallback_after: Duration::from_secs(3),
            quic_probe_interval: Duration::from_secs(60),
            tcp_fallback_mss: Some(relay_transport::tcp::DEFAULT_FALLBACK_MSS),
            tcp_fallback_port: None,
            tcp_proxy: None,
            quic: QuicTuning::default(),
            backoff: BackoffConfig::default(),
            udp_idle: Duration::from_secs(60),
            max_udp_flows: 1024,
            max_relays: DEFAULT_MAX_RELAYS,
            capture: None,
            dns: None,
            status_listen: None,
            capture_state_file: None,
            relay_addrs_file: None,
            worker_threads: DEFAULT_WORKER_THREADS,
            kube_proxy: true,
            capture_refuse_ipv6: true,
        }
    }
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {field}: {message}")]
pub struct ConfigError {
    /// Field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
pub struct TlsFile {
    /// Node certificate (PEM), SAN = node name; leave out with `[bootstrap]`.
    pub cert: Option<PathBuf>,
    /// Node key (PEM); leave out with `[bootstrap]`.
    pub key: Option<PathBuf>,
    /// CA that signed the relay certificate (PEM); nothing else is trusted.
    pub relay_ca: PathBuf,
}

/// How the edge proves its node name to the relay.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A node certificate given to the edge (made by hand or by your CA),
    /// with the pinned relay CA.
    Static(TlsMaterial),
    /// Node certificates obtained from the relay with the pod's projected
    /// service-account token (Kubernetes), renewed before they expire.
    Bootstrap(BootstrapConfig),
}

/// The files the edge's TLS material came from, read again when they
/// change (see `identity`).
#[derive(Debug, Clone)]
pub struct EdgeTlsFiles {
    /// `tls.cert` (a certificate given by hand).
    pub cert: Option<PathBuf>,
    /// `tls.key`.
    pub key: Option<PathBuf>,
    /// `tls.relay_ca`.
    pub relay_ca: PathBuf,
}

/// `[bootstrap]` as the client runs it.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// The projected service-account token (audience `edge-relay`); read
    /// afresh for every request, since the kubelet rotates it.
    pub token_file: PathBuf,
    /// Where the issued certificate and its key are kept across restarts.
    pub state_dir: PathBuf,
    /// The pinned relay CA.
    pub relay_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// `[bootstrap]` in edge.toml.
#[derive(Debug, Deserialize)]
pub struct BootstrapFile {
    /// See [`BootstrapConfig::token_file`].
    pub token_file: PathBuf,
    /// See [`BootstrapConfig::state_dir`] (default `/var/lib/edge-relay`).
    pub state_dir: Option<PathBuf>,
}

/// `[timeouts]`.
#[derive(Debug, Default, Deserialize)]
pub struct TimeoutsFile {
    /// Dialing a local target (default 5s).
    #[serde(default, with = "humantime_serde")]
    pub dial: Option<Duration>,
    /// Connecting + hello (default 10s).
    #[serde(default, with = "humantime_serde")]
    pub handshake: Option<Duration>,
    /// A UDP flow silent this long ends (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub udp_idle: Option<Duration>,
    /// In auto mode, QUIC's time to complete a handshake before the
    /// client falls back to TCP (default 3s).
    #[serde(default, with = "humantime_serde")]
    pub quic_fallback: Option<Duration>,
    /// In auto mode on TCP, how often QUIC is tried again (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub quic_probe: Option<Duration>,
}

/// `[backoff]`.
#[derive(Debug, Default, Deserialize)]
pub struct BackoffFile {
    /// First delay cap (default 500ms).
    #[serde(default, with = "humantime_serde")]
    pub initial: Option<Duration>,
    /// Largest delay cap (default 8s).
    #[serde(default, with = "humantime_serde")]
    pub max: Option<Duration>,
    /// Uptime that resets the backoff (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub reset_after: Option<Duration>,
    /// How long after a relay's drain notice attempts are paced instead of
    /// backed off (default 10s; `0s` turns it off).
    #[serde(default, with = "humantime_serde")]
    pub after_drain: Option<Duration>,
    /// Time without a session after which the cap is `long_max` (default
    /// 10m; `0s` turns it off).
    #[serde(default, with = "humantime_serde")]
    pub long_after: Option<Duration>,
    /// The cap after `long_after` without a session (default 60s, or `max`
    /// when that is longer; from `max` to 1h).
    #[serde(default, with = "humantime_serde")]
    pub long_max: Option<Duration>,
}

/// The edge client's TOML configuration file.
#[derive(Debug, Deserialize)]
pub struct FileConfig {
    /// The config format version the file was written for (default: this
    /// build's). A newer one makes unknown keys warnings instead of errors
    /// (see `relay_transport::config_file`).
    pub config_version: Option<u32>,
    /// Node name. May be left out of the file when `--node` /
    /// `EDGE_NODE_NAME` gives it (one file for every edge).
    #[serde(default)]
    pub node: String,
    /// Relay `host:port`.
    pub relay: String,
    /// TLS name of the relay (default: the host part of `relay`).
    pub server_name: Option<String>,
    /// Prefixes served.
    #[serde(default)]
    pub routes: Vec<Cidr>,
    /// Primary node address.
    pub primary_addr: Option<IpAddr>,
    /// Destination ports served (empty: all).
    #[serde(default)]
    pub allowed_ports: Vec<u16>,
    /// `auto` (default), `quic` or `tcp`.
    #[serde(default)]
    pub transport: TransportMode,
    /// The TCP fallback's maximum segment size: default 1220 (works through
    /// small-MTU links that send no ICMP), 0 = the kernel's (path-MTU
    /// discovery), else 536 to 9000.
    pub tcp_fallback_mss: Option<u32>,
    /// The relay's TCP fallback port, when not `relay`'s (the relay's
    /// `listen.tcp_fallback_port`).
    pub tcp_fallback_port: Option<u16>,
    /// `http://[user:password@]host[:port]`: the TCP fallback goes through
    /// this HTTP proxy. Absent: `https_proxy` / `HTTPS_PROXY` from the
    /// environment unless `no_proxy` / `NO_PROXY` lists the relay's host;
    /// `""`: never a proxy.
    pub tcp_proxy: Option<String>,
    /// Certificates.
    pub tls: TlsFile,
    /// Certificates from the relay in exchange for a service-account token.
    pub bootstrap: Option<BootstrapFile>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// Reconnect backoff.
    #[serde(default)]
    pub backoff: BackoffFile,
    /// QUIC settings.
    #[serde(default)]
    pub quic: QuicFile,
    /// Capture of traffic towards the tunnel routes.
    #[serde(default)]
    pub capture: CaptureFile,
    /// The node-local resolver.
    #[serde(default)]
    pub dns: crate::dns::DnsFile,
    /// Most relay replicas to hold a session to (default 8, at most 64).
    pub max_relays: Option<usize>,
    /// Where the status endpoint listens (plain HTTP; default: nowhere).
    pub status_listen: Option<SocketAddr>,
    /// Lets `status_listen` be an address other than loopback.
    #[serde(default)]
    pub allow_insecure_status: bool,
    /// Where capture's last routes and ClusterIP table are saved (default:
    /// not saved).
    pub capture_state_file: Option<PathBuf>,
    /// Where the relay's last resolved addresses are saved (default: not
    /// saved).
    pub relay_addrs_file: Option<PathBuf>,
    /// Runtime worker threads (default 1; 0: one per CPU, or
    /// `TOKIO_WORKER_THREADS`).
    pub worker_threads: Option<usize>,
    /// Whether this node runs kube-proxy (default true).
    pub kube_proxy: Option<bool>,
}

/// Default of [`EdgeConfig::max_relays`]: each replica costs an idle
/// session (keep-alives on a metered uplink), and a handful is what a
/// cluster runs.
pub const DEFAULT_MAX_RELAYS: usize = 8;

/// The host part of `host:port` / `[v6]:port`.
fn host_of(relay: &str) -> Option<&str> {
    let (host, port) = relay.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// `worker_threads` from the file (see [`DEFAULT_WORKER_THREADS`]).
fn worker_threads(v: Option<usize>) -> Result<usize, ConfigError> {
    match v {
        None => Ok(DEFAULT_WORKER_THREADS),
        Some(n @ 0..=256) => Ok(n),
        Some(_) => Err(err(
            "worker_threads",
            "must be between 0 (one per CPU) and 256",
        )),
    }
}

/// `tcp_proxy` from the file, else from the environment (see
/// [`FileConfig::tcp_proxy`]); errors name the field or the variable.
fn tcp_proxy(
    v: Option<&str>,
    relay_host: &str,
) -> Result<Option<relay_transport::proxy::HttpProxy>, ConfigError> {
    use relay_transport::proxy::HttpProxy;
    match v.map(str::trim) {
        Some("") => Ok(None),
        Some(url) => HttpProxy::parse(url)
            .map(Some)
            .map_err(|m| err("tcp_proxy", m)),
        // One the environment names but that cannot be used is ignored
        // with a warning, not fatal: an edge that never needed a proxy
        // must not stop starting because of a variable meant for others.
        None => Ok(match HttpProxy::from_env(relay_host) {
            Some(Ok(p)) => Some(p),
            Some(Err(m)) => {
                tracing::warn!(problem = %m, "https_proxy from the environment not usable; the TCP fallback goes direct (set tcp_proxy to choose)");
                None
            }
            None => None,
        }),
    }
}

/// `tcp_fallback_mss` from the file (see
/// [`relay_transport::tcp::fallback_mss_setting`]).
fn fallback_mss(v: Option<u32>) -> Result<Option<u32>, ConfigError> {
    relay_transport::tcp::fallback_mss_setting(v).map_err(|m| err("tcp_fallback_mss", m))
}

/// `status_listen` from the file: loopback, or anywhere when the file says
/// so (the endpoint is plain HTTP and answers anyone who reaches it).
fn status_listen(
    addr: Option<SocketAddr>,
    allow_insecure: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !allow_insecure => Err(err(
            "status_listen",
            format!(
                "{a} is not a loopback address: the status endpoint is plain HTTP without \
                 authentication; set allow_insecure_status = true to serve it there"
            ),
        )),
        a => Ok(a),
    }
}

fn nonzero(field: &str, d: Option<Duration>, default: Duration) -> Result<Duration, ConfigError> {
    match d {
        Some(d) if d.is_zero() => Err(err(field, "must be greater than zero")),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

impl FileConfig {
    /// Reads, parses, validates, and loads the certificates.
    pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| err(path.display().to_string(), e))?;
        Self::parse(&text)?.into_runtime()
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        relay_transport::config_file::parse(text, |f: &Self| f.config_version)
            .map(|p| p.value)
            .map_err(|e| err("file", e))
    }

    /// Validates and loads what the file points at.
    pub fn into_runtime(self) -> Result<EdgeConfig, ConfigError> {
        if self.node.is_empty() || self.node.len() > 253 {
            return Err(err(
                "node",
                "must be 1 to 253 characters (set `node` in the file, or --node / EDGE_NODE_NAME)",
            ));
        }
        let host = host_of(&self.relay).ok_or_else(|| err("relay", "must be host:port"))?;
        let server_name = self.server_name.clone().unwrap_or_else(|| host.to_string());
        let proxy = tcp_proxy(self.tcp_proxy.as_deref(), host)?;
        if let Some(p) = self.primary_addr {
            if !self.routes.iter().any(|r| r.contains(&p)) {
                return Err(err(
                    "primary_addr",
                    format!("{p} is not inside any of `routes`"),
                ));
            }
        }
        if self.allowed_ports.contains(&0) {
            return Err(err("allowed_ports", "port 0 is not a port"));
        }
        let status_listen = status_listen(self.status_listen, self.allow_insecure_status)?;
        let quic = self
            .quic
            .resolve(QuicTuning::default())
            .map_err(|(f, m)| err(format!("quic.{f}"), m))?;
        let capture = self
            .capture
            .resolve()
            .map_err(|(f, m)| err(format!("capture.{f}"), m))?;
        let capture_state_file = match (&self.capture_state_file, &capture) {
            (Some(_), None) => {
                return Err(err(
                    "capture_state_file",
                    "needs capture.enabled = true (it keeps what capture last knew)",
                ))
            }
            (Some(p), _) if p.as_os_str().is_empty() => {
                return Err(err("capture_state_file", "must not be empty"))
            }
            (p, _) => p.clone(),
        };
        if self
            .relay_addrs_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(err("relay_addrs_file", "must not be empty"));
        }
        let dns = self
            .dns
            .resolve()
            .map_err(|(f, m)| err(format!("dns.{f}"), m))?;
        let d = BackoffConfig::default();
        let backoff = BackoffConfig {
            initial: nonzero("backoff.initial", self.backoff.initial, d.initial)?,
            max: nonzero("backoff.max", self.backoff.max, d.max)?,
            reset_after: nonzero(
                "backoff.reset_after",
                self.backoff.reset_after,
                d.reset_after,
            )?,
            after_drain: self.backoff.after_drain.unwrap_or(d.after_drain),
            long_after: self.backoff.long_after.unwrap_or(d.long_after),
            // Not below `max`: a file raising `max` past the default long
            // cap keeps its own cap throughout.
            long_max: match self.backoff.long_max {
                Some(l) => l,
                None => d.long_max.max(self.backoff.max.unwrap_or(d.max)),
            },
        };
        if backoff.long_max < backoff.max || backoff.long_max > Duration::from_secs(3600) {
            return Err(err(
                "backoff.long_max",
                "from backoff.max to 1h: past an hour an edge would stay away long after its relay came back",
            ));
        }
        if backoff.after_drain > Duration::from_secs(300) {
            return Err(err(
                "backoff.after_drain",
                "at most 300s: a longer pace keeps a fleet hammering a relay that is gone",
            ));
        }
        if backoff.initial > backoff.max {
            return Err(err("backoff.initial", "must not exceed backoff.max"));
        }
        let identity = match (&self.bootstrap, &self.tls.cert, &self.tls.key) {
            (None, Some(cert), Some(key)) => Identity::Static(
                TlsMaterial::from_files(cert, key, &self.tls.relay_ca)
                    .map_err(|e| err("tls", e))?,
            ),
            (None, _, _) => return Err(err(
                "tls",
                "set tls.cert and tls.key, or [bootstrap] token_file to obtain them from the relay",
            )),
            (Some(b), None, None) => {
                let ca = std::fs::read(&self.tls.relay_ca).map_err(|e| {
                    err(
                        "tls.relay_ca",
                        format!("{}: {e}", self.tls.relay_ca.display()),
                    )
                })?;
                Identity::Bootstrap(BootstrapConfig {
                    token_file: b.token_file.clone(),
                    state_dir: b
                        .state_dir
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("/var/lib/edge-relay")),
                    relay_ca: relay_transport::tls::certs_from_pem(&ca, "tls.relay_ca")
                        .map_err(|e| err("tls.relay_ca", e))?,
                })
            }
            (Some(_), _, _) => return Err(err(
                "bootstrap",
                "with [bootstrap] the relay issues the certificate: remove tls.cert and tls.key",
            )),
        };
        Ok(EdgeConfig {
            dial_timeout: nonzero("timeouts.dial", self.timeouts.dial, Duration::from_secs(5))?,
            handshake_timeout: nonzero(
                "timeouts.handshake",
                self.timeouts.handshake,
                Duration::from_secs(10),
            )?,
            node: self.node,
            relay: self.relay,
            server_name,
            identity,
            tls_files: Some(EdgeTlsFiles {
                cert: self.tls.cert.clone(),
                key: self.tls.key.clone(),
                relay_ca: self.tls.relay_ca.clone(),
            }),
            routes: self.routes,
            primary_addr: self.primary_addr,
            allowed_ports: self.allowed_ports,
            quic,
            backoff,
            transport: self.transport,
            quic_fallback_after: nonzero(
                "timeouts.quic_fallback",
                self.timeouts.quic_fallback,
                Duration::from_secs(3),
            )?,
            quic_probe_interval: nonzero(
                "timeouts.quic_probe",
                self.timeouts.quic_probe,
                Duration::from_secs(60),
            )?,
            tcp_fallback_mss: fallback_mss(self.tcp_fallback_mss)?,
            tcp_fallback_port: match self.tcp_fallback_port {
                Some(0) => return Err(err("tcp_fallback_port", "must be 1 to 65535")),
                p => p,
            },
            tcp_proxy: proxy,
            udp_idle: nonzero(
                "timeouts.udp_idle",
                self.timeouts.udp_idle,
                Duration::from_secs(60),
            )?,
            max_udp_flows: 1024,
            max_relays: match self.max_relays {
                None => DEFAULT_MAX_RELAYS,
                Some(n @ 1..=64) => n,
                Some(_) => return Err(err("max_relays", "must be between 1 and 64")),
            },
            worker_threads: worker_threads(self.worker_threads)?,
            kube_proxy: self.kube_proxy.unwrap_or(true),
            capture_refuse_ipv6: self.capture.refuse_ipv6.unwrap_or(true),
            capture,
            dns,
            status_listen,
            capture_state_file,
            relay_addrs_file: self.relay_addrs_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "node = \"edge-1\"\nrelay = \"relay.example:8443\"\n[tls]\ncert = \"/nonexistent/c\"\nkey = \"k\"\nrelay_ca = \"ca\"\n";

    #[test]
    fn errors_name_the_field() {
        let f = FileConfig::parse(&format!(
            "routes = [\"10.0.0.0/24\"]\nprimary_addr = \"10.0.1.1\"\n{BASE}"
        ))
        .unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "primary_addr");
        let f = FileConfig::parse(&BASE.replace("relay.example:8443", "relay.example")).unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "relay");
        let f = FileConfig::parse(BASE).unwrap();
        let e = f.into_runtime().unwrap_err();
        assert_eq!(e.field, "tls");
        assert!(e.to_string().contains("/nonexistent/c"), "{e}");
        let e = FileConfig::parse(&format!("{BASE}surprise = 1\n")).unwrap_err();
        assert!(e.to_string().contains("surprise"), "{e}");
        let f = FileConfig::parse(&format!("{BASE}[quic]\nkeepalive = \"1m\"\n")).unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "quic.keepalive");
        let f = FileConfig::parse(&format!("{BASE}[backoff]\nafter_drain = \"10m\"\n")).unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "backoff.after_drain");
        for bad in [
            "long_max = \"1s\"",
            "long_max = \"2h\"",
            "max = \"2m\"\nlong_max = \"1m\"",
        ] {
            let f = FileConfig::parse(&format!("{BASE}[backoff]\n{bad}\n")).unwrap();
            assert_eq!(
                f.into_runtime().unwrap_err().field,
                "backoff.long_max",
                "{bad}"
            );
        }
        // A longer `max` alone raises the default long cap with it.
        let f = FileConfig::parse(&format!("{BASE}[backoff]\nmax = \"2m\"\n")).unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "tls");
        // The capture state without capture, or nowhere.
        let f = FileConfig::parse(&format!("capture_state_file = \"/x.json\"\n{BASE}")).unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "capture_state_file");
        let f = FileConfig::parse(&format!(
            "capture_state_file = \"\"\n{BASE}[capture]\nenabled = true\n"
        ))
        .unwrap();
        assert_eq!(f.into_runtime().unwrap_err().field, "capture_state_file");
    }

    /// `capture.refuse_ipv6`: on by default (the tunnel's IPv6 prefixes
    /// are refused, not left to the default route), off when written so.
    #[test]
    fn capture_refuses_ipv6_unless_told_not_to() {
        relay_transport::tls::install_default_provider();
        let dir = std::env::temp_dir().join(format!("edge-refuse6-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"])
            .unwrap()
            .write_to(&dir)
            .unwrap();
        let base = format!(
            "node = \"edge-a\"\nrelay = \"relay.test:8443\"\n[tls]\ncert = \"{d}/edge-a.pem\"\nkey = \"{d}/edge-a-key.pem\"\nrelay_ca = \"{d}/ca.pem\"\n[capture]\nenabled = true\n",
            d = dir.display()
        );
        let refuses = |extra: &str| {
            let cfg = FileConfig::parse(&format!("{base}{extra}"))
                .unwrap()
                .into_runtime()
                .unwrap();
            assert!(cfg.capture.is_some());
            cfg.capture_refuse_ipv6
        };
        assert!(refuses(""));
        assert!(refuses("refuse_ipv6 = true\n"));
        assert!(!refuses("refuse_ipv6 = false\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `tcp_proxy`: a URL, `""` for none (whatever the environment), and
    /// errors that name the field and never echo a password. (Absent, it
    /// comes from `https_proxy`: not tested here, where changing the
    /// process environment would race other tests.)
    #[test]
    fn tcp_proxy_is_a_url_or_empty() {
        let f =
            FileConfig::parse(&format!("tcp_proxy = \"http://u:pw@p.site:8080\"\n{BASE}")).unwrap();
        let p = tcp_proxy(f.tcp_proxy.as_deref(), "relay.example")
            .unwrap()
            .unwrap();
        assert_eq!(p.authority, "p.site:8080");
        assert_eq!(p.to_string(), "http://***@p.site:8080");
        assert!(tcp_proxy(Some(""), "relay.example").unwrap().is_none());
        let e = tcp_proxy(Some("socks5://u:pw@p:1"), "relay.example").unwrap_err();
        assert_eq!(e.field, "tcp_proxy");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn tcp_fallback_mss_defaults_to_a_small_mtu_safe_size() {
        let f = FileConfig::parse(BASE).unwrap();
        assert_eq!(fallback_mss(f.tcp_fallback_mss).unwrap(), Some(1220));
        let f = FileConfig::parse(&format!("tcp_fallback_mss = 0\n{BASE}")).unwrap();
        assert_eq!(fallback_mss(f.tcp_fallback_mss).unwrap(), None);
        let f = FileConfig::parse(&format!("tcp_fallback_mss = 1400\n{BASE}")).unwrap();
        assert_eq!(fallback_mss(f.tcp_fallback_mss).unwrap(), Some(1400));
        let e = fallback_mss(Some(100)).unwrap_err();
        assert_eq!(e.field, "tcp_fallback_mss");
        assert!(e.to_string().contains("536 to 9000"), "{e}");
    }

    #[test]
    fn one_worker_thread_unless_the_file_says_otherwise() {
        let f = FileConfig::parse(BASE).unwrap();
        assert_eq!(worker_threads(f.worker_threads).unwrap(), 1);
        let f = FileConfig::parse(&format!("worker_threads = 0\n{BASE}")).unwrap();
        assert_eq!(worker_threads(f.worker_threads).unwrap(), 0, "one per CPU");
        let f = FileConfig::parse(&format!("worker_threads = 4\n{BASE}")).unwrap();
        assert_eq!(worker_threads(f.worker_threads).unwrap(), 4);
        let e = worker_threads(Some(1000)).unwrap_err();
        assert_eq!(e.field, "worker_threads");
        assert!(e.to_string().contains("0 (one per CPU) and 256"), "{e}");
    }

    #[test]
    fn status_listen_is_loopback_unless_allowed() {
        let f = FileConfig::parse(BASE).unwrap();
        assert_eq!(status_listen(f.status_listen, false).unwrap(), None);
        let f = FileConfig::parse(&format!("status_listen = \"127.0.0.1:9469\"\n{BASE}")).unwrap();
        let local = status_listen(f.status_listen, f.allow_insecure_status).unwrap();
        assert_eq!(local, Some("127.0.0.1:9469".parse().unwrap()));
        let open = format!("status_listen = \"0.0.0.0:9469\"\n{BASE}");
        let f = FileConfig::parse(&open).unwrap();
        let e = f.into_runtime().unwrap_err();
        assert_eq!(e.field, "status_listen");
        assert!(e.to_string().contains("allow_insecure_status"), "{e}");
        let f = FileConfig::parse(&format!("allow_insecure_status = true\n{open}")).unwrap();
        let any = status_listen(f.status_listen, f.allow_insecure_status).unwrap();
        assert_eq!(any, Some("0.0.0.0:9469".parse().unwrap()));
    }

    #[test]
    fn node_may_come_from_the_command_line_alone() {
        // One file for every edge: no `node`, the caller sets it (--node /
        // EDGE_NODE_NAME from the downward API) before into_runtime.
        let shared = BASE.replace("node = \"edge-1\"\n", "");
        let f = FileConfig::parse(&shared).unwrap();
        assert_eq!(f.node, "");
        let e = f.into_runtime().unwrap_err();
        assert_eq!(e.field, "node");
        assert!(e.to_string().contains("EDGE_NODE_NAME"), "{e}");
        let mut f = FileConfig::parse(&shared).unwrap();
        f.node = "edge-7".into();
        // Past `node`: the next check is the (absent) certificate.
        assert_eq!(f.into_runtime().unwrap_err().field, "tls");
    }

    #[test]
    fn server_name_defaults_to_relay_host() {
        assert_eq!(host_of("relay.example:8443"), Some("relay.example"));
        assert_eq!(host_of("[::1]:8443"), Some("::1"));
        assert_eq!(host_of("relay"), None);
        assert_eq!(host_of(":8443"), None);
    }
}
