//! Building blocks of the end-to-end tests in the network-namespace lab
//! ([`crate::netns`]): background tasks in namespaces ([`Running`],
//! [`launch`]), services that name their host, the relay and edge
//! configurations of the lab (in-process, or the real `relay-server` binary
//! as a child process: [`RelayProcess`]), clients that report what they
//! reached, admin API calls, and a result [`Table`].
//!
//! Shared by `tests/matrix.rs` (the seed matrix) and `tests/faults.rs`
//! (fault injection), so both start the same relay and edges and talk to
//! them the same way.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_protocol::Cidr;
use relay_server::admin::SessionRow;
use relay_server::{Relay, RelayConfig};
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;
use tokio::net::{TcpStream, UdpSocket};

use crate::netns::{self, NetnsLab, Role};

/// Port of the HTTP page every [`services`] host serves.
pub const HTTP: u16 = 80;
/// Port of the "kubelet" page (also HTTP, naming `<host>-kubelet`).
pub const KUBELET: u16 = 10250;
/// Port of the UDP responder of [`services`].
pub const DNS: u16 = 53;
/// Port of the TCP echo service of [`echo_service`].
pub const ECHO: u16 = 7;
/// The relay's CONNECT ingress port (on [`netns::RELAY_LAN_IP`]).
pub const CONNECT_PORT: u16 = 8131;
/// The relay's admin API port (on [`netns::RELAY_LAN_IP`]).
pub const ADMIN_PORT: u16 = 9090;
/// The relay's QUIC port (on every address of the relay node).
pub const QUIC_PORT: u16 = 8443;
/// The admin API's bearer token in the lab.
pub const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";
/// How long [`launch`] waits for a task to report readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `ip:port`.
pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A background task in a namespace that runs until told to stop.
/// Dropping it stops it too.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops the task and returns how it ended.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.join().map_err(|_| anyhow!("thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Starts `start` in `ns`; it reports readiness through `ready` once, then
/// runs until stopped. Waits (at most [`READY_TIMEOUT`]) for readiness.
pub fn launch<F, Fut>(lab: &NetnsLab, ns: Role, what: &str, start: F) -> Result<Running>
where
    F: FnOnce(mpsc::Sender<Result<()>>, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let err_tx = ready_tx.clone();
    let join = lab.spawn_in(ns, move || async move {
        let r = start(ready_tx, stop_rx).await;
        if let Err(e) = &r {
            let _ = err_tx.send(Err(anyhow!("{e:#}")));
        }
        r
    });
    let running = Running {
        stop: Some(stop_tx),
        join: Some(join),
    };
    match ready_rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(e.context(format!("starting {what}"))),
        Err(_) => bail!("{what} not ready within {READY_TIMEOUT:?}"),
    }
}

/// HTTP pages on :80 (and :10250, the "kubelet") and a UDP responder on
/// :53, all naming `name`.
pub fn services(lab: &NetnsLab, ns: Role, name: &'static str) -> Result<Running> {
    launch(lab, ns, name, move |ready, stop| async move {
        let (_, h1) = crate::spawn_http(sa(Ipv4Addr::UNSPECIFIED, HTTP), name).await?;
        let (_, h2) = crate::spawn_http(
            sa(Ipv4Addr::UNSPECIFIED, KUBELET),
            &format!("{name}-kubelet"),
        )
        .await?;
        let udp = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, DNS)).await?;
        let h3 = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from).await;
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        for h in [h1, h2, h3] {
            h.abort();
        }
        Ok(())
    })
}

/// A TCP echo service on :[`ECHO`] (see [`crate::spawn_echo`]).
pub fn echo_service(lab: &NetnsLab, ns: Role) -> Result<Running> {
    launch(lab, ns, "echo", move |ready, stop| async move {
        let (_, h) = crate::spawn_echo(sa(Ipv4Addr::UNSPECIFIED, ECHO)).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        h.abort();
        Ok(())
    })
}

/// A development PKI for the lab: relay name `relay.lab`, nodes `edge1`
/// and `edge2`.
pub fn lab_pki() -> Result<DevPki> {
    Ok(DevPki::generate(&["relay.lab"], &["edge1", "edge2"])?)
}

/// The lab relay's configuration: QUIC on :8443 everywhere, CONNECT and
/// the admin API (with [`ADMIN_TOKEN`]) on the cloud LAN, each edge allowed
/// its pod CIDR and host address, the cloud ranges as tunnel routes, and
/// capture on.
pub fn relay_config(pki: &DevPki) -> Result<RelayConfig> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.quic_listen = sa(Ipv4Addr::UNSPECIFIED, QUIC_PORT);
    cfg.connect_listen = Some(sa(netns::RELAY_LAN_IP, CONNECT_PORT));
    // On the cloud LAN, with a token: the route agent on cloud2 reads it.
    cfg.admin_listen = Some(sa(netns::RELAY_LAN_IP, ADMIN_PORT));
    cfg.admin_token = Some(relay_server::Secret::new(ADMIN_TOKEN));
    // Plaintext CONNECT and admin API on the LAN: the lab's cloud LAN is a
    // private namespace network, and its tests speak plain HTTP to both.
    // A real deployment uses [connect_tls] and admin TLS (refused otherwise).
    cfg.allow_insecure_connect = true;
    cfg.allow_insecure_admin = true;
    for site in netns::SITES {
        cfg.nodes.insert(
            format!("edge{site}"),
            vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(netns::edge_host_ip(site))),
            ],
        );
    }
    cfg.tunnel_routes = [
        netns::CPOD1_CIDR,
        netns::CPOD2_CIDR,
        netns::SERVICE_CIDR,
        netns::CLOUD_LAN,
    ]
    .iter()
    .map(|c| c.parse::<Cidr>())
    .collect::<Result<_, _>>()?;
    // The seed matrix's edge↔edge cells: both sites in one community
    // (without it the policy isolates edges from each other).
    cfg.communities.insert(
        "sites".into(),
        netns::SITES.iter().map(|s| format!("edge{s}")).collect(),
    );
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

/// [`relay_config`] for the topology `lab` was built with: each edge's
/// `[nodes]` entry names its host address there (with repeated LANs, the
/// same one for both sites, which the relay then treats as ambiguous).
pub fn relay_config_in(lab: &NetnsLab, pki: &DevPki) -> Result<RelayConfig> {
    let mut cfg = relay_config(pki)?;
    for site in lab.sites() {
        cfg.nodes.insert(
            format!("edge{site}"),
            vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(lab.edge_host_ip(site))),
            ],
        );
    }
    Ok(cfg)
}

/// Edge `site`'s configuration: dials the relay's WAN address, serves its
/// pod CIDR and host address, capture on (default topology; a lab built
/// with other options: [`edge_config_in`]).
pub fn edge_config(pki: &DevPki, site: u8) -> Result<EdgeConfig> {
    edge_config_host(pki, site, netns::edge_host_ip(site))
}

/// [`edge_config`] for the topology `lab` was built with (its edge host
/// addresses: with repeated LANs, the same one for both sites).
pub fn edge_config_in(lab: &NetnsLab, pki: &DevPki, site: u8) -> Result<EdgeConfig> {
    edge_config_host(pki, site, lab.edge_host_ip(site))
}

fn edge_config_host(pki: &DevPki, site: u8, host: Ipv4Addr) -> Result<EdgeConfig> {
    let node = format!("edge{site}");
    let mut cfg = EdgeConfig::new(
        &node,
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        pki.node_material(&node)?,
    );
    let host = IpAddr::V4(host);
    cfg.routes = vec![netns::edge_pod_cidr(site), Cidr::host(host)];
    cfg.primary_addr = Some(host);
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

/// Runs the relay library with `cfg` in the relay node until stopped.
pub fn start_relay(lab: &NetnsLab, cfg: RelayConfig) -> Result<Running> {
    launch(lab, Role::Relay, "relay", move |ready, stop| async move {
        let relay = Relay::spawn(cfg).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        relay.shutdown(Duration::from_secs(2)).await;
        Ok(())
    })
}

/// Runs the edge client with `cfg` on edge host `site` until stopped;
/// ready once it is connected (at most 15 s).
pub fn start_edge(lab: &NetnsLab, site: u8, cfg: EdgeConfig) -> Result<Running> {
    let role = Role::edge(site)?;
    launch(
        lab,
        role,
        &format!("edge{site}"),
        move |ready, stop| async move {
            let edge = EdgeClient::start(cfg).await?;
            if edge.wait_connected(Duration::from_secs(15)).await.is_none() {
                bail!("edge did not connect: {:?}", edge.state());
            }
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            edge.shutdown().await;
            Ok(())
        },
    )
}

/// Polls `cond` every 50 ms for at most `limit`; returns the time it took.
pub fn within(limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond()? {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}

/// `method path` on the relay's admin API (with [`ADMIN_TOKEN`]), from
/// inside the relay node; returns `(status, body)`.
pub fn admin_call(
    lab: &NetnsLab,
    method: &'static str,
    path: impl Into<String>,
) -> Result<(u16, String)> {
    let path = path.into();
    lab.run_in(Role::Relay, Duration::from_secs(10), move || async move {
        let s = TcpStream::connect(sa(netns::RELAY_LAN_IP, ADMIN_PORT)).await?;
        crate::http_request(s, method, "admin", &path, Some(ADMIN_TOKEN)).await
    })
}

/// `GET path` on the relay's admin API; anything but 200 is an error.
pub fn admin(lab: &NetnsLab, path: &'static str) -> Result<String> {
    let (code, body) = admin_call(lab, "GET", path)?;
    anyhow::ensure!(code == 200, "{path}: HTTP {code}");
    Ok(body)
}

/// The relay's sessions (`GET /v1/sessions`).
pub fn sessions(lab: &NetnsLab) -> Result<Vec<SessionRow>> {
    Ok(serde_json::from_str(&admin(lab, "/v1/sessions")?)?)
}

/// One node's session (`GET /v1/sessions/{node}`), `None` if it has none.
pub fn session(lab: &NetnsLab, node: &str) -> Result<Option<SessionRow>> {
    match admin_call(lab, "GET", format!("/v1/sessions/{node}"))? {
        (200, body) => Ok(Some(serde_json::from_str(&body)?)),
        (404, _) => Ok(None),
        (code, body) => bail!("GET /v1/sessions/{node}: HTTP {code}: {body}"),
    }
}

/// The prefixes the relay node captures now (`nft list set inet
/// edge_relay dst4`); empty when the table does not exist.
pub fn captured_prefixes(lab: &NetnsLab) -> Result<String> {
    let tables = lab.exec(Role::Relay, &["nft", "list", "tables"])?;
    if !tables.contains("edge_relay") {
        return Ok(String::new());
    }
    lab.exec(
        Role::Relay,
        &["nft", "list", "set", "inet", "edge_relay", "dst4"],
    )
}

/// Fetches `/` from `target` over plain TCP from inside `ns`; returns the body.
pub fn http_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .context("connect timed out")??;
        let (code, body) = crate::http_get(s, &target.to_string(), "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// CONNECT through the relay's ingress from inside `ns`, then GET.
/// A refusal is an error holding a [`crate::Refused`].
pub fn connect_from(lab: &NetnsLab, ns: Role, authority: &'static str) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = crate::connect_via(sa(netns::RELAY_LAN_IP, CONNECT_PORT), authority).await?;
        let (code, body) = crate::http_get(s, authority, "/", None).await?;
        anyhow::ensure!(code == 200, "HTTP {code}");
        Ok(body.trim_end().to_string())
    })
}

/// One DNS-sized UDP query and its reply, from inside `ns`.
pub fn udp_from(lab: &NetnsLab, ns: Role, target: SocketAddr) -> Result<String> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        // A 48-byte query, the size of a small DNS question.
        let query = format!("q{:046}", rand::random::<u32>());
        let mut buf = [0u8; 512];
        // The first packet also sets the flow up; one retransmission, as a
        // DNS resolver would, and no more.
        for _ in 0..2 {
            s.send(query.as_bytes()).await?;
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await {
                let n = r?;
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let (name, echoed) = reply.split_once(':').context("bad reply")?;
                anyhow::ensure!(echoed == query, "reply to another query");
                return Ok(name.to_string());
            }
        }
        bail!("no UDP reply")
    })
}

/// Expects a connection attempt to fail (refused, unreachable or reset)
/// within `limit`; returns how long it took.
pub fn fails_fast(
    lab: &NetnsLab,
    ns: Role,
    target: SocketAddr,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    match http_from(lab, ns, target) {
        Ok(body) => bail!("reached {target} ({body})"),
        Err(_) if t.elapsed() <= limit => Ok(t.elapsed()),
        Err(e) => bail!("failed, but only after {:?}: {e:#}", t.elapsed()),
    }
}

/// One row of a [`Table`].
#[derive(Debug, Clone)]
pub struct Row {
    /// The cells, the last one being the result.
    pub cells: Vec<String>,
    /// Whether the row passed.
    pub ok: bool,
}

/// A result table rendered as Markdown-like text: every column padded but
/// the last (the result).
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<String>,
    /// The rows so far.
    pub rows: Vec<Row>,
}

impl Table {
    /// An empty table with these column names (the last is the result).
    pub fn new(columns: &[&str]) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row: `lead` (every column but the result), then `result`.
    pub fn push(&mut self, lead: &[&str], result: String, ok: bool) {
        let mut cells: Vec<String> = lead.iter().map(|c| c.to_string()).collect();
        cells.push(result);
        self.rows.push(Row { cells, ok });
    }

    /// Adds a row that passes when `got` names the host `expect` (as
    /// `expect` or `hello from expect`).
    pub fn check(&mut self, lead: &[&str], expect: &str, got: Result<String>) {
        let (result, ok) = match got {
            Ok(who) if who.strip_prefix("hello from ").unwrap_or(&who) == expect => {
                (format!("ok ({who})"), true)
            }
            Ok(who) => (format!("WRONG HOST: {who}, expected {expect}"), false),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.push(lead, result, ok);
    }

    /// Adds a row that passes when `got` is `Ok`, showing its text.
    pub fn note(&mut self, lead: &[&str], got: Result<String>) {
        let (result, ok) = match got {
            Ok(s) => (format!("ok ({s})"), true),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.push(lead, result, ok);
    }

    /// How many rows passed.
    pub fn passed(&self) -> usize {
        self.rows.iter().filter(|r| r.ok).count()
    }

    /// The first cell of every failed row.
    pub fn failed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.cells.first().map(String::as_str).unwrap_or(""))
            .collect()
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let lead = self.columns.len().saturating_sub(1);
        let widths: Vec<usize> = (0..lead)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.cells.get(i).map_or(0, String::len))
                    .max()
                    .unwrap_or(4)
                    .max(4)
                    .max(self.columns[i].len())
            })
            .collect();
        let mut out = String::new();
        let last = self.columns.last().map(String::as_str).unwrap_or("");
        for (name, w) in self.columns.iter().zip(&widths) {
            let _ = write!(out, "| {name:w$} ");
        }
        let _ = writeln!(out, "| {last}");
        for w in &widths {
            let _ = write!(out, "|{}", "-".repeat(w + 2));
        }
        out += "|--------\n";
        for r in &self.rows {
            for (c, w) in r.cells.iter().zip(&widths) {
                let _ = write!(out, "| {c:w$} ");
            }
            let _ = writeln!(out, "| {}", r.cells.get(lead).map_or("", String::as_str));
        }
        out
    }

    /// Renders the table followed by `footer`, prints it, writes it to
    /// `target/<file>` of the workspace (best effort) and returns it.
    pub fn publish(&self, file: &str, footer: &str) -> String {
        let summary = format!("{}\n{footer}\n", self.render());
        println!("\n{summary}");
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(file);
        let _ = std::fs::write(out, &summary);
        summary
    }
}

/// The `relay-server` binary built next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/relay-server`).
/// `cargo test --workspace` builds it (relay-server has integration tests).
pub fn relay_server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("no target directory above {}", exe.display()))?;
    let bin = profile_dir.join("relay-server");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .with_context(|| {
            format!(
                "relay-server binary not found at {} (build it first: `cargo build -p relay-server`, \
                 or run `cargo test --workspace`, which builds it for relay-server's CLI tests)",
                bin.display()
            )
        })?;
    // `cargo test -p relay-lab` alone does not rebuild the binary: refuse
    // to test an old one.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["relay-server/src", "transport/src", "protocol/src"] {
        if let Some((file, t)) = newest_source(&root.join(dir)) {
            if t > built {
                bail!(
                    "{} is older than {} (run `cargo build -p relay-server`)",
                    bin.display(),
                    file.display()
                );
            }
        }
    }
    Ok(bin)
}

/// The most recently modified `.rs` file below `dir`, if any (best effort;
/// bounded depth).
fn newest_source(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 8 {
                todo.push((p, depth + 1));
            } else if p.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                        newest = Some((p, t));
                    }
                }
            }
        }
    }
    newest
}

/// `relay.toml` text equivalent to `cfg` (listen addresses, nodes, tunnel
/// routes, QUIC tuning, drain grace, capture on or off, `[kubernetes]`,
/// `[replicas]`), with certificates
/// in `certs` (as written by [`DevPki::write_to`]) and the admin token in
/// `token_file`.
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
    let _ = write!(
        t,
        "\n[limits]\ndrain_grace = \"{}\"\n\n[capture]\nenabled = {}\n\n[nodes]\n",
        ms(cfg.limits.drain_grace),
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

/// The real `relay-server` binary running in the relay node's namespace
/// (`ip netns exec <ns> relay-server --config .. --ready-file ..`), with its
/// configuration, certificates, token and log in a private directory.
/// Dropping it kills the process (SIGKILL) and removes the directory.
pub struct RelayProcess {
    bin: PathBuf,
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RelayProcess {
    /// Writes `cfg` (see [`relay_toml`]), the PKI's files and the admin
    /// token into a fresh directory, starts the binary and waits (bounded)
    /// for its ready file.
    pub fn start(lab: &NetnsLab, bin: &Path, pki: &DevPki, cfg: &RelayConfig) -> Result<Self> {
        Self::start_named(lab, "relay", bin, pki, cfg)
    }

    /// [`RelayProcess::start`] with its own directory `<lab tag>-<name>`,
    /// for several relays (replicas) in one lab.
    pub fn start_named(
        lab: &NetnsLab,
        name: &str,
        bin: &Path,
        pki: &DevPki,
        cfg: &RelayConfig,
    ) -> Result<Self> {
        Self::start_on(lab, Role::Relay, name, bin, pki, cfg)
    }

    /// [`RelayProcess::start_named`] on relay host `host` (see
    /// [`NetnsLab::relay_hosts`]).
    pub fn start_on(
        lab: &NetnsLab,
        host: Role,
        name: &str,
        bin: &Path,
        pki: &DevPki,
        cfg: &RelayConfig,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-{name}", lab.tag()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let certs = dir.join("certs");
        pki.write_to(&certs)
            .with_context(|| format!("writing certificates to {}", certs.display()))?;
        let token = dir.join("admin-token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n"))?;
        std::fs::write(
            dir.join("relay.toml"),
            relay_toml(cfg, &certs, Some(&token)),
        )?;
        let mut p = RelayProcess {
            bin: bin.to_path_buf(),
            ns: lab.ns(host).to_string(),
            dir,
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    /// The configuration file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("relay.toml")
    }

    /// The process id of the running relay, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The relay's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// Starts the binary (again) and waits up to 20 s for its ready file.
    /// The log is appended to, so a restart keeps the previous run's lines.
    pub fn spawn(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("relay-server is already running");
        }
        let t = Instant::now();
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .arg("--config")
            .arg(self.config_path())
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        // `ip netns exec` execs the program itself: the child is the relay.
        self.child = Some(child);
        while t.elapsed() < READY_TIMEOUT {
            if ready.exists() {
                return Ok(t.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "relay-server exited ({status}) before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "relay-server not ready within {READY_TIMEOUT:?}:\n{}",
            self.log()
        )
    }

    /// Stops the process with SIGTERM (the relay drains: GOAWAY, in-flight
    /// streams finish within its `drain_grace`) and waits up to `limit`
    /// for it to exit; SIGKILL after that. Returns how long it took.
    pub fn terminate(&mut self, limit: Duration) -> Result<Duration> {
        let mut c = self.child.take().context("relay-server is not running")?;
        let t = Instant::now();
        // kill(1) rather than a signal API: the workspace's nix is built
        // without its signal feature.
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .context("SIGTERM relay-server")?;
        anyhow::ensure!(st.success(), "kill -TERM {}: {st}", c.id());
        while t.elapsed() < limit {
            if c.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait()?;
        bail!("relay-server did not exit within {limit:?} of SIGTERM (killed)")
    }

    /// Kills the process with SIGKILL (no cleanup of any kind runs) and
    /// reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        let mut c = self.child.take().context("relay-server is not running")?;
        // `Child::kill` sends SIGKILL on Unix.
        c.kill().context("SIGKILL relay-server")?;
        c.wait().context("reaping relay-server")?;
        Ok(())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
