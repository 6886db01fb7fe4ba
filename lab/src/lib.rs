//! Test and demo harness: a relay and edge clients on loopback with a
//! development PKI generated on the fly, plus the small clients and
//! services tests need (CONNECT client, HTTP page server, echo server,
//! admin API client). Used by the integration tests in `tests/`, by the
//! local demo and by the load tester, so all three exercise the same
//! production code paths with real sockets, real QUIC and real TLS.
//!
//! Loopback gives us many addresses: every edge "lives" at its own
//! `127.0.0.x`, so edges' routes never overlap and each edge's services
//! bind to its own address.

pub mod bulk;
pub mod client_loop;
pub mod cluster;
pub mod edges;
pub mod netns;
pub mod procfs;
pub mod rathole;
pub mod replicas;
pub mod route_agent;
pub mod scenario;
pub mod sources;
pub mod tempdir;
pub mod traffic;

pub use tempdir::TempDir;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Once;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_protocol::Cidr;
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The last `n` lines of `text` (a log), for error messages.
///
/// A log ending in a backtrace (`RUST_BACKTRACE` is set in CI) shows the
/// lines before it: the error or panic message, not stack frames.
pub fn last_lines(text: &str, n: usize) -> String {
    let text = match text.rfind("tack backtrace:") {
        Some(i)
            if text[i..]
                .lines()
                .skip(1)
                .all(|l| l.is_empty() || l.starts_with(' ')) =>
        {
            text[..i].rfind('\n').map_or(text, |j| &text[..j])
        }
        _ => text,
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback address whose port is free for UDP and TCP and lies below
/// the kernel's ephemeral range (32768 and up by default), for a relay a
/// test restarts on the same address. A port the kernel handed out (`:0`)
/// goes back to the ephemeral pool when the first relay closes, and an
/// outgoing connection of a test running beside it can take it before the
/// restart binds it again ("Address already in use", seen once in CI); no
/// outgoing connection is ever given a port from below the range.
pub fn restartable_loopback_addr() -> Result<SocketAddr> {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in 20000..32000 after 200 tries")
}

/// The value of one series in a Prometheus text body, unlabelled
/// (`relay_udp_flows`) or with its labels written out
/// (`relay_udp_dropped_total{reason="oversize"}`); `None` if absent.
pub fn metric_sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `kubernetes.edge_address_ranges` for a one-host lab whose Nodes'
/// addresses are loopback addresses (`127.0.0.x`): a relay takes an edge
/// Node's loopback address only when a loopback range is listed, which no
/// real cluster does (its kubelet writes the Node's addresses, and a
/// loopback one would capture the relay node's own traffic).
pub fn loopback_node_ranges() -> Vec<relay_protocol::Cidr> {
    vec![relay_protocol::Cidr::new([127, 0, 0, 0].into(), 8).expect("a valid prefix")]
}

/// Installs a tracing subscriber once (honours `RUST_LOG`, default warn)
/// and the process-wide rustls provider.
pub fn init() {
    init_with("warn");
}

/// [`init`], logging by `default` (an `EnvFilter` directive) when
/// `RUST_LOG` is not set: a suite whose failures need a module's info
/// lines to be read (captured per test, shown only for a failing one).
/// The first call in a test binary decides.
pub fn init_with(default: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        relay_transport::tls::install_default_provider();
    });
}

/// The loopback address of simulated edge number `i` (0-based): `127.0.0.(i+2)`
/// for the first 250, then `127.0.x.y` beyond.
pub fn edge_ip(i: usize) -> IpAddr {
    let n = i as u32 + 2;
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        (n / 250) as u8,
        (n % 250) as u8 + if n >= 250 { 1 } else { 0 },
    ))
}

/// The conventional node name of simulated edge `i`.
pub fn edge_name(i: usize) -> String {
    format!("edge-{i}")
}

/// A relay config on loopback allowing each listed node its `/32`.
pub fn relay_config(pki: &DevPki, edges: usize) -> Result<RelayConfig> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    for i in 0..edges {
        cfg.nodes.insert(edge_name(i), vec![Cidr::host(edge_ip(i))]);
    }
    Ok(cfg)
}

/// An edge config for edge `i` serving its `/32`, dialing `relay`.
pub fn edge_config(pki: &DevPki, i: usize, relay: SocketAddr) -> Result<EdgeConfig> {
    let name = edge_name(i);
    let mut cfg = EdgeConfig::new(
        &name,
        relay.to_string(),
        "localhost",
        pki.node_material(&name)?,
    );
    cfg.routes = vec![Cidr::host(edge_ip(i))];
    cfg.primary_addr = Some(edge_ip(i));
    Ok(cfg)
}

/// A relay and `n` connected edges, with a PKI covering them.
pub struct Lab {
    /// The certificates.
    pub pki: DevPki,
    /// The running relay.
    pub relay: Relay,
    /// Edge clients, index = edge number.
    pub edges: Vec<EdgeClient>,
}

impl Lab {
    /// Starts a relay (customised by `tweak`) and `n` edges, and waits
    /// until every edge is registered.
    pub async fn start(n: usize, tweak: impl FnOnce(&mut RelayConfig)) -> Result<Lab> {
        init();
        let names: Vec<String> = (0..n).map(edge_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], &refs)?;
        let mut cfg = relay_config(&pki, n)?;
        tweak(&mut cfg);
        let relay = Relay::spawn(cfg).await?;
        let mut edges = Vec::new();
        for i in 0..n {
            edges.push(EdgeClient::spawn(edge_config(&pki, i, relay.quic_addr())?));
        }
        for (i, e) in edges.iter().enumerate() {
            e.wait_connected(Duration::from_secs(10))
                .await
                .with_context(|| format!("edge {i} did not connect: {:?}", e.state()))?;
        }
        Ok(Lab { pki, relay, edges })
    }

    /// The relay's CONNECT address.
    pub fn connect_addr(&self) -> SocketAddr {
        self.relay
            .connect_addr()
            .expect("lab relays have a CONNECT listener")
    }

    /// The relay's admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.relay
            .admin_addr()
            .expect("lab relays have an admin listener")
    }

    /// Stops edges and relay.
    pub async fn stop(self) {
        for e in self.edges {
            e.shutdown().await;
        }
        self.relay.shutdown(Duration::from_secs(1)).await;
    }
}

/// A CONNECT that the relay answered with something other than 200.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub code: u16,
    /// The whole status line.
    pub status_line: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CONNECT refused: {}", self.status_line)
    }
}

impl std::error::Error for Refused {}

/// Reads a response header byte by byte (so no payload byte is consumed)
/// and returns the status line and code.
async fn read_status(s: &mut TcpStream) -> Result<(u16, String)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("response header too large");
        }
        if s.read(&mut b).await? == 0 {
            bail!(
                "connection closed inside response header: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let line = text.lines().next().unwrap_or_default().to_string();
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    Ok((code, line))
}

/// Opens a tunnel through the relay's CONNECT ingress. `Err` holds a
/// [`Refused`] when the relay answered with an error status.
pub async fn connect_via(proxy: SocketAddr, authority: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let (code, status_line) = read_status(&mut s).await?;
    if code != 200 {
        return Err(Refused { code, status_line }.into());
    }
    Ok(s)
}

/// Sends a minimal HTTP/1.1 GET on `s` and returns `(status, body)`.
pub async fn http_get(
    s: TcpStream,
    host: &str,
    path: &str,
    bearer: Option<&str>,
) -> Result<(u16, String)> {
    http_request(s, "GET", host, path, bearer).await
}

/// Sends a minimal body-less HTTP/1.1 request (`method path`) on `s` and
/// returns `(status, body)`; the response must end within 10 s.
pub async fn http_request(
    mut s: TcpStream,
    method: &str,
    host: &str,
    path: &str,
    bearer: Option<&str>,
) -> Result<(u16, String)> {
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .context("HTTP response timed out")??;
    let text = String::from_utf8_lossy(&all).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no header end in response")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    Ok((code, body.to_string()))
}

/// `GET path` on the admin API.
pub async fn admin_get(
    admin: SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> Result<(u16, String)> {
    http_get(TcpStream::connect(admin).await?, "admin", path, bearer).await
}

/// Sends `method path` to the admin API and returns `(status, body)`.
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    let text = String::from_utf8_lossy(&all).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The admin API's session list.
pub async fn sessions(admin: SocketAddr) -> Result<Vec<relay_server::admin::SessionRow>> {
    sessions_as(admin, None).await
}

/// [`sessions`] from an admin API that requires a bearer token.
pub async fn sessions_as(
    admin: SocketAddr,
    bearer: Option<&str>,
) -> Result<Vec<relay_server::admin::SessionRow>> {
    let (code, body) = admin_get(admin, "/v1/sessions", bearer).await?;
    if code != 200 {
        bail!("GET /v1/sessions: {code} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The generation of `node`'s session on the relay whose admin API is at
/// `admin`, if it has one.
pub async fn session_generation(admin: SocketAddr, node: &str) -> Result<Option<u64>> {
    Ok(sessions(admin)
        .await?
        .into_iter()
        .find(|r| r.node == node)
        .map(|r| r.generation))
}

/// Polls `cond` every 50 ms for at most `limit`; how long it took (an
/// error past `limit`). The async twin of [`scenario::within`].
pub async fn within_async(
    limit: Duration,
    mut cond: impl AsyncFnMut() -> Result<bool>,
) -> Result<Duration> {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if cond().await? {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("not within {limit:?}")
}

/// A tiny HTTP server answering every request with a page naming `name`,
/// closing after each response. Stands in for "a service on the edge".
pub async fn spawn_http(addr: SocketAddr, name: &str) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let local = l.local_addr()?;
    let name = name.to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                // Bounded read of the request header.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let body = format!("hello from {name}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Served-By: {name}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((local, task))
}

/// An echo server: copies every byte back, and when the client half-closes
/// it finishes sending and half-closes too (so half-close is observable).
pub async fn spawn_echo(addr: SocketAddr) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let local = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    /// A process that ended with an error and its backtrace shows the
    /// error; a backtrace followed by more log lines (a task's panic, the
    /// process carrying on) leaves the tail as it is.
    #[test]
    fn last_lines_show_the_error_before_a_closing_backtrace() {
        let log = "starting\nError: bind quic on 127.0.0.1:4433: in use\n\nStack backtrace:\n   0: main\n             at src/main.rs:1\n";
        assert_eq!(
            super::last_lines(log, 2),
            "starting\nError: bind quic on 127.0.0.1:4433: in use"
        );
        let carried_on = "thread 'x' panicked\nstack backtrace:\n   0: f\nlater line\n";
        assert_eq!(super::last_lines(carried_on, 1), "later line");
    }
}
