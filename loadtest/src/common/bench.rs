//! One benchmark's setup: the dev PKI, the relay and edge config files,
//! starting the relay and edges as processes, and their admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, edge_name};
use relay_transport::devcerts::DevPki;

use super::*;

/// Where edge `i`'s status endpoint is asked to listen: its own loopback
/// address, a port the kernel picks (benchmarks run side by side, so no
/// fixed port); [`listening_on`] finds the port.
fn edge_status_listen(i: usize) -> SocketAddr {
    SocketAddr::new(edge_ip(i), 0)
}

/// The TCP address process `pid` listens on at `ip` (its sockets in
/// `/proc/<pid>/fd` matched with `/proc/<pid>/net/tcp`'s listeners), if
/// any: where an edge process's status endpoint ended up.
pub(crate) fn listening_on(pid: u32, ip: std::net::IpAddr) -> Option<SocketAddr> {
    let std::net::IpAddr::V4(v4) = ip else {
        return None;
    };
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| {
            let l = std::fs::read_link(e.ok()?.path()).ok()?;
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    // The kernel prints an IPv4 address as the hex of its in-memory
    // (network order) u32, read as a little-endian number.
    let want = format!("{:08X}", u32::from_le_bytes(v4.octets()));
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (addr, port) = f.get(1)?.split_once(':')?;
        let listening = f.get(3) == Some(&"0A");
        (listening && addr == want && inodes.contains(*f.get(9)?))
            .then(|| Some(SocketAddr::new(ip, u16::from_str_radix(port, 16).ok()?)))?
    })
}

/// Installs the rustls provider and a tracing subscriber on stderr at
/// `error` (or `RUST_LOG`), so the in-process edges' reconnect warnings
/// never mix with the result tables on stdout.
fn init_quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        relay_transport::tls::install_default_provider();
    });
}

/// The PKI, config files and the binaries for one benchmark run.
pub(crate) struct Bench {
    /// Scratch directory (certificates, configs, logs).
    pub(crate) dir: TempDir,
    /// How children are started.
    pub(crate) bins: Binaries,
    /// Number of nodes in the PKI and the relay config.
    pub(crate) nodes: usize,
    /// Lines added to the relay config's `[limits]` (`key = value\n`).
    pub(crate) relay_limits: String,
    /// Top-level lines added to every edge config (`key = value\n`).
    pub(crate) edge_top: String,
    /// A bearer token the relay's admin API then requires
    /// (`admin.token_file`); each [`RelayProc`] started carries it.
    pub(crate) admin_token: Option<String>,
    /// The relay's `[kubernetes]` section (`--kube`: [`BenchCluster`]),
    /// which replaces its `[nodes]` table.
    pub(crate) kube_section: Option<String>,
    pki: DevPki,
}

/// A relay's admin API: where it listens and the bearer it requires.
#[derive(Clone, Debug)]
pub(crate) struct AdminApi {
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// The bearer token to send (`None`: the relay has none).
    pub(crate) bearer: Option<Arc<str>>,
}

impl AdminApi {
    /// `GET path`: status and body.
    pub(crate) async fn get(&self, path: &str) -> Result<(u16, String)> {
        relay_lab::admin_get(self.addr, path, self.bearer.as_deref()).await
    }

    /// The `/metrics` body.
    pub(crate) async fn metrics(&self) -> Result<String> {
        let (code, body) = self.get("/metrics").await?;
        ensure!(code == 200, "GET /metrics: {code}");
        Ok(body)
    }

    /// The sessions the relay lists.
    pub(crate) async fn sessions(&self) -> Result<Vec<relay_server::admin::SessionRow>> {
        relay_lab::sessions_as(self.addr, self.bearer.as_deref()).await
    }
}

impl Bench {
    /// Generates a PKI for `nodes` edges and writes it to a temp dir.
    pub(crate) fn new(nodes: usize) -> Result<Bench> {
        init_quiet();
        let dir = TempDir::new()?;
        let names: Vec<String> = (0..nodes).map(edge_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], &refs)?;
        pki.write_to(&dir.path().join("pki"))?;
        Ok(Bench {
            dir,
            bins: Binaries::locate()?,
            nodes,
            relay_limits: String::new(),
            edge_top: String::new(),
            admin_token: None,
            kube_section: None,
            pki,
        })
    }

    /// The in-memory PKI (for in-process edges).
    pub(crate) fn pki(&self) -> &DevPki {
        &self.pki
    }

    /// The PKI, to issue certificates for nodes the relay does not list.
    pub(crate) fn pki_mut(&mut self) -> &mut DevPki {
        &mut self.pki
    }

    fn pki_file(&self, name: &str) -> String {
        self.dir.path().join("pki").join(name).display().to_string()
    }

    /// Writes a relay config with the given listen addresses.
    ///
    /// `LOADTEST_MAX_UDP_PAYLOAD` (1200..=65527), when set, makes both
    /// sides start at and cap QUIC packets to that size (`[quic]
    /// max_udp_payload` and `initial_mtu`): for loopback, which carries
    /// 64 KiB packets, to show what packet size costs.
    fn write_relay_config(
        &self,
        name: &str,
        quic: SocketAddr,
        connect: SocketAddr,
        extra: &str,
    ) -> Result<PathBuf> {
        let mut t = String::new();
        let id = if name == "relay" { "bench-relay" } else { name };
        t.push_str(&format!("relay_id = \"{id}\"\n[listen]\n"));
        t.push_str(&format!(
            "quic = \"{quic}\"\nconnect = \"{connect}\"\nadmin = \"127.0.0.1:0\"\n"
        ));
        t.push_str(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            self.pki_file("relay.pem"),
            self.pki_file("relay-key.pem"),
            self.pki_file("ca.pem")
        ));
        if let Some(token) = &self.admin_token {
            let f = self.dir.path().join("admin-token");
            std::fs::write(&f, token)?;
            t.push_str(&format!("[admin]\ntoken_file = \"{}\"\n", f.display()));
        }
        if let Some(p) = max_udp_payload()? {
            t.push_str(&format!(
                "[quic]\nmax_udp_payload = {p}\ninitial_mtu = {p}\n"
            ));
        }
        // A short drain, so a restart (storm) does not wait 30 s for the
        // benchmark's own open streams.
        t.push_str("[limits]\ndrain_grace = \"1s\"\n");
        t.push_str(&self.relay_limits);
        match &self.kube_section {
            Some(k) => t.push_str(k),
            None => {
                t.push_str("[nodes]\n");
                for i in 0..self.nodes {
                    t.push_str(&format!("\"{}\" = [\"{}/32\"]\n", edge_name(i), edge_ip(i)));
                }
            }
        }
        t.push_str(extra);
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, t)?;
        Ok(p)
    }

    /// Starts the relay process on ephemeral ports and waits until ready.
    pub(crate) async fn start_relay(&self) -> Result<RelayProc> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        self.start_relay_at(any, any).await
    }

    /// Starts the relay process on the given QUIC / CONNECT addresses.
    pub(crate) async fn start_relay_at(
        &self,
        quic: SocketAddr,
        connect: SocketAddr,
    ) -> Result<RelayProc> {
        self.start_named_relay("relay", quic, connect, "").await
    }

    /// Starts relay process `name` (its relay_id, config, ready file and
    /// log named after it) with `extra` appended to its config.
    pub(crate) async fn start_named_relay(
        &self,
        name: &str,
        quic: SocketAddr,
        connect: SocketAddr,
        extra: &str,
    ) -> Result<RelayProc> {
        let cfg = self.write_relay_config(name, quic, connect, extra)?;
        let ready = self.dir.path().join(format!("{name}-ready.json"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.bins.relay_cmd();
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready);
        let log = format!("{name}.log");
        let mut child = ChildGuard::spawn(name, cmd, &self.dir.path().join(&log))?;
        let text = wait_file(&ready, &mut child, Duration::from_secs(20))
            .await
            .with_context(|| format!("relay log: {}", self.log_tail(&log)))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("ready file")?;
        let addr = |k: &str| -> Result<SocketAddr> {
            v[k].as_str()
                .with_context(|| format!("ready file has no {k}"))?
                .parse()
                .with_context(|| format!("ready file {k}"))
        };
        Ok(RelayProc {
            quic: addr("quic")?,
            connect: addr("connect")?,
            admin: AdminApi {
                addr: addr("admin")?,
                bearer: self.admin_token.as_deref().map(Arc::from),
            },
            child,
        })
    }

    /// Starts the bare-QUIC sink process (`quic-sink-process`) with the
    /// relay's certificate; returns it and its UDP address.
    pub(crate) async fn start_bare_sink(&self) -> Result<(ChildGuard, SocketAddr)> {
        let ready = self.dir.path().join("quic-sink-ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Binaries::self_cmd()?;
        cmd.arg("quic-sink-process")
            .arg("--pki")
            .arg(self.dir.path().join("pki"))
            .arg("--ready-file")
            .arg(&ready);
        let log = self.dir.path().join("quic-sink.log");
        let mut child = ChildGuard::spawn("quic-sink", cmd, &log)?;
        let text = wait_file(&ready, &mut child, Duration::from_secs(20))
            .await
            .with_context(|| format!("quic-sink log: {}", self.log_tail("quic-sink.log")))?;
        let addr = text.trim().parse().context("quic-sink ready file")?;
        Ok((child, addr))
    }

    /// Where the PKI files are.
    pub(crate) fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn log_tail(&self, name: &str) -> String {
        let t = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        relay_lab::last_lines(&t, 10)
    }

    /// Starts edge `i` as an `edge-client` process (its status endpoint on
    /// its loopback address: [`listening_on`]) and waits until the
    /// relay lists its session.
    /// `max_streams` overrides the edge's `[quic] max_streams` (how many
    /// streams the relay may have open to it).
    pub(crate) async fn start_edge(
        &self,
        i: usize,
        relay: &RelayProc,
        max_streams: Option<u32>,
    ) -> Result<ChildGuard> {
        let name = edge_name(i);
        let ip = edge_ip(i);
        let mut t = format!(
            "node = \"{name}\"\nrelay = \"{}\"\nserver_name = \"localhost\"\nroutes = [\"{ip}/32\"]\nprimary_addr = \"{ip}\"\nstatus_listen = \"{}\"\n{}[tls]\ncert = \"{}\"\nkey = \"{}\"\nrelay_ca = \"{}\"\n",
            relay.quic,
            edge_status_listen(i),
            self.edge_top,
            self.pki_file(&format!("{name}.pem")),
            self.pki_file(&format!("{name}-key.pem")),
            self.pki_file("ca.pem"),
        );
        let payload = max_udp_payload()?;
        if max_streams.is_some() || payload.is_some() {
            t.push_str("[quic]\n");
        }
        if let Some(m) = max_streams {
            t.push_str(&format!("max_streams = {m}\n"));
        }
        if let Some(p) = payload {
            t.push_str(&format!("max_udp_payload = {p}\ninitial_mtu = {p}\n"));
        }
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, t)?;
        let mut cmd = self.bins.edge_cmd();
        cmd.arg("--config").arg(&p);
        let log = format!("{name}.log");
        let mut child = ChildGuard::spawn(&name, cmd, &self.dir.path().join(&log))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            child.check_alive()?;
            if relay.admin.sessions().await?.iter().any(|s| s.node == name) {
                return Ok(child);
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not register within 15s: {}",
                self.log_tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running relay process.
pub(crate) struct RelayProc {
    /// QUIC (UDP) address edges dial.
    pub(crate) quic: SocketAddr,
    /// HTTP CONNECT address.
    pub(crate) connect: SocketAddr,
    /// Its admin API.
    pub(crate) admin: AdminApi,
    /// The process.
    pub(crate) child: ChildGuard,
}

impl RelayProc {
    /// Relay resident memory now.
    pub(crate) fn rss(&self) -> Result<u64> {
        rss_bytes(self.child.pid())
    }

    /// `relay_sessions` from `/metrics` (cheap to poll).
    pub(crate) async fn session_count(&self) -> Result<u64> {
        let body = self.admin.metrics().await?;
        body.lines()
            .find_map(|l| l.strip_prefix("relay_sessions "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .context("no relay_sessions in /metrics")
    }
}

impl RelayProc {
    /// Non-zero `relay_handshake_failures_total` series, as `reason=count`
    /// (shows handshakes refused by `limits.max_concurrent_handshakes`).
    pub(crate) async fn handshake_failures(&self) -> Result<String> {
        let body = self.admin.metrics().await?;
        let v: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("relay_handshake_failures_total{reason=\""))
            .filter_map(|l| {
                let (reason, rest) = l.split_once("\"}")?;
                let n: f64 = rest.trim().parse().ok()?;
                (n > 0.0).then(|| format!("{reason}={n}"))
            })
            .collect();
        Ok(if v.is_empty() {
            "none".into()
        } else {
            v.join(" ")
        })
    }
}

/// `LOADTEST_MAX_UDP_PAYLOAD`, validated (see `Bench::write_relay_config`).
fn max_udp_payload() -> Result<Option<u16>> {
    match std::env::var("LOADTEST_MAX_UDP_PAYLOAD") {
        Err(_) => Ok(None),
        Ok(v) => {
            let p: u16 = v
                .parse()
                .ok()
                .filter(|p| (1200..=65527).contains(p))
                .with_context(|| format!("LOADTEST_MAX_UDP_PAYLOAD={v:?}: want 1200 to 65527"))?;
            Ok(Some(p))
        }
    }
}
