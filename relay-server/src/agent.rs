//! Route agent: runs on the *other* cloud nodes and keeps a route
//! `<edge prefix> via <relay node address>` for every prefix the relay
//! serves, adding and removing them as edge sessions come and go.
//!
//! It reads `GET /v1/routes` from the relay's admin API (over HTTPS when
//! given the CA of the admin API's certificate: the bearer token must not
//! cross the network in clear), and owns only
//! routes tagged with its own protocol number (`proto`, default 250), so it
//! never touches a route it did not install. On exit it removes them.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;

/// What the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's admin API address.
    pub admin: SocketAddr,
    /// Bearer token for the admin API, if it requires one.
    pub token: Option<Secret>,
    /// HTTPS to the admin API; `None`: plain HTTP (loopback, or explicitly
    /// allowed with `--allow-insecure-http`).
    pub tls: Option<AgentTls>,
    /// The relay node's address on this node's network: the next hop.
    pub via: IpAddr,
    /// How often to poll.
    pub interval: Duration,
    /// Route protocol number marking our routes (see `/etc/iproute2/rt_protos`).
    pub proto: u8,
}

/// How the agent verifies the admin API's certificate.
#[derive(Clone)]
pub struct AgentTls {
    /// Trusts only the CA file given (`--ca-file`).
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// The name (or IP) the admin API's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl AgentTls {
    /// HTTPS trusting only the CA certificates in `ca` (PEM), expecting
    /// `server_name` on the admin API's certificate.
    pub fn new(ca: &std::path::Path, server_name: &str) -> anyhow::Result<Self> {
        let config = relay_transport::tls::ca_only_client_config(ca, b"http/1.1")?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
        Ok(AgentTls {
            config: std::sync::Arc::new(config),
            server_name,
        })
    }
}

/// Fetches the relay's route table (IPv4 prefixes only).
pub async fn fetch(cfg: &AgentConfig) -> anyhow::Result<BTreeSet<Cidr>> {
    #[derive(serde::Deserialize)]
    struct Row {
        cidr: Cidr,
    }
    let get = async {
        let tcp = tokio::net::TcpStream::connect(cfg.admin).await?;
        match &cfg.tls {
            None => get_routes(tcp, cfg).await,
            Some(t) => {
                let s = tokio_rustls::TlsConnector::from(t.config.clone())
                    .connect(t.server_name.clone(), tcp)
                    .await?;
                get_routes(s, cfg).await
            }
        }
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), get).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header end"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "admin API answered {status:?}");
    let rows: Vec<Row> = serde_json::from_str(body)?;
    Ok(rows
        .into_iter()
        .map(|r| r.cidr)
        .filter(|c| c.addr().is_ipv4())
        .collect())
}

/// `GET /v1/routes` on an established (TCP or TLS) connection; the whole
/// response, bounded in size.
async fn get_routes<S>(mut s: S, cfg: &AgentConfig) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    {
        let auth = cfg
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
            .unwrap_or_default();
        s.write_all(
            format!("GET /v1/routes HTTP/1.1\r\nHost: relay\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut body = Vec::new();
        // A route table of 100,000 rows is well under 16 MiB.
        match (&mut s).take(16 << 20).read_to_end(&mut body).await {
            Ok(_) => {}
            // A TLS peer closing without close_notify after the body: what
            // was read is complete (Connection: close), or it fails to
            // parse as JSON below.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !body.is_empty() => {}
            Err(e) => return Err(e.into()),
        }
        anyhow::Ok(body)
    }
}

async fn ip(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    Ok(relay_transport::capture::command("ip", args, stdin).await?)
}

/// Our routes now on this host.
async fn installed(proto: u8) -> anyhow::Result<BTreeSet<Cidr>> {
    let out = ip(&["-4", "route", "show", "proto", &proto.to_string()], None).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Makes this host's routes of protocol `proto` exactly `want` via `via`.
async fn sync(want: &BTreeSet<Cidr>, via: IpAddr, proto: u8) -> anyhow::Result<(usize, usize)> {
    let have = installed(proto).await?;
    let mut batch = String::new();
    let del: Vec<_> = have.difference(want).collect();
    let add: Vec<_> = want.difference(&have).collect();
    for c in &del {
        let _ = writeln!(batch, "route del {c} proto {proto}");
    }
    for c in &add {
        let _ = writeln!(batch, "route replace {c} via {via} proto {proto}");
    }
    if !batch.is_empty() {
        ip(&["-4", "-force", "-batch", "-"], Some(&batch)).await?;
    }
    Ok((add.len(), del.len()))
}

/// Runs until `stop`, then removes every route it installed.
pub async fn run(cfg: AgentConfig, stop: CancellationToken) {
    info!(admin = %cfg.admin, via = %cfg.via, "route agent started");
    let mut failing = false;
    loop {
        match fetch(&cfg).await {
            Ok(want) => match sync(&want, cfg.via, cfg.proto).await {
                Ok((added, removed)) => {
                    if added + removed > 0 {
                        info!(added, removed, total = want.len(), "routes synced");
                    }
                    failing = false;
                }
                Err(e) => warn!(error = %e, "installing routes failed"),
            },
            // Keep the routes we have: if the relay is briefly away, traffic
            // to edges still goes to the relay node, which answers at once.
            Err(e) if !failing => {
                warn!(error = %e, "cannot read the relay's routes; keeping the current ones");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
    match sync(&BTreeSet::new(), cfg.via, cfg.proto).await {
        Ok((_, removed)) => info!(removed, "route agent stopped; its routes removed"),
        Err(e) => warn!(error = %e, "removing routes on exit failed"),
    }
}
