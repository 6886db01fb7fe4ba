//! Relay replicas in the network-namespace lab: several `relay-server`
//! processes in the relay node's namespace, each at its own WAN address
//! (198.18.0.i, the address edges dial) with its own CONNECT and admin
//! ports on the cloud LAN, and what the scale-out tests
//! (`tests/netns_replicas.rs`, `tests/netns_leases.rs`) ask of them: their
//! sessions and replica sets through the admin API, CONNECT through one
//! replica, byte-exact echo transfers, and a sampler of every edge's
//! sessions across all replicas.
//!
//! By default the lab has one relay host: the replicas share its namespace
//! and differ by address and ports, which is everything the protocol and
//! the edges see of a replica (relay capture, one nftables table per node,
//! is off). A lab built with [`netns::LabOptions::relay_hosts`] gives
//! replica `i` relay host `i` of its own ([`host`]): its admin and CONNECT
//! ports are then on that host's LAN address ([`lan_ip`]), and capture can
//! be on ([`replica_config_on`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use edge_client::EdgeConfig;
use relay_server::admin::SessionRow;
use relay_server::RelayConfig;
use relay_transport::devcerts::DevPki;
use tokio::net::TcpStream;

use crate::netns::{self, NetnsLab, Role};
use crate::scenario::{edge_config, relay_config, sa, ADMIN_TOKEN, QUIC_PORT};

/// Replica `i`'s (1-based) WAN address: the one it advertises.
pub fn wan(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, i)
}

/// Replica `i`'s id.
pub fn id(i: u8) -> String {
    format!("relay-{i}")
}

/// Replica `i`'s relay host in `lab`: relay host `i` when the lab has it,
/// the relay node otherwise.
pub fn host(lab: &NetnsLab, i: u8) -> Role {
    let hosts = lab.relay_hosts();
    hosts
        .get(usize::from(i).wrapping_sub(1))
        .copied()
        .unwrap_or(Role::Relay)
}

/// The cloud-LAN address replica `i`'s CONNECT and admin ports are on in
/// `lab`: its own host's (see [`host`]).
pub fn lan_ip(lab: &NetnsLab, i: u8) -> Ipv4Addr {
    if usize::from(i) <= lab.relay_hosts().len() {
        netns::relay_host_lan_ip(i)
    } else {
        netns::RELAY_LAN_IP
    }
}

/// Replica `i`'s CONNECT port (on [`lan_ip`]).
pub fn connect_port(i: u8) -> u16 {
    8130 + u16::from(i)
}

/// Replica `i`'s admin port (on [`lan_ip`]).
pub fn admin_port(i: u8) -> u16 {
    9089 + u16::from(i)
}

/// Adds WAN addresses 198.18.0.i for `replicas` to the relay node (1 is
/// the lab's own relay address and always there).
pub fn add_wan_addresses(lab: &NetnsLab, replicas: impl IntoIterator<Item = u8>) -> Result<()> {
    for i in replicas.into_iter().filter(|i| *i != 1) {
        let a = format!("{}/24", wan(i));
        lab.exec(Role::Relay, &["ip", "addr", "add", &a, "dev", "wan0"])?;
    }
    Ok(())
}

/// The replica set of replicas `1..=n` in the namespace lab: each
/// advertising its WAN address ([`wan`]) on the QUIC port.
pub fn wan_replica_set(n: u8) -> Vec<relay_protocol::Replica> {
    (1..=n)
        .map(|i| relay_protocol::Replica {
            id: id(i),
            addr: sa(wan(i), QUIC_PORT).to_string(),
        })
        .collect()
}

/// [`replica_config`] for replica `i` of `set` ([`wan_replica_set`]),
/// with the others of `set` as its static peers and the short timings the
/// replica lab tests use (keep-alive 1 s, idle timeout 5 s, drain grace
/// 500 ms).
pub fn wan_replica_config(
    pki: &DevPki,
    i: u8,
    set: &[relay_protocol::Replica],
) -> Result<RelayConfig> {
    let mut cfg = replica_config(pki, i)?;
    cfg.quic.keepalive = Duration::from_secs(1);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.limits.drain_grace = Duration::from_millis(500);
    cfg.replicas = Some(static_peers(set, &id(i), sa(wan(i), QUIC_PORT).to_string()));
    Ok(cfg)
}

/// Starts one in-process relay per replica of `set` on loopback, each
/// with `[nodes]` for `edges` edges ([`crate::relay_config`]), QUIC only,
/// short keep-alives and drain grace, and the others of `set` as its
/// static peers. Replica `i` listens on `ports[i]`: replica 0 on every
/// local address (so another loopback address reaches it, standing in for
/// a load balancer's), the others on 127.0.0.1; each advertises its
/// address in `set`.
pub async fn loopback_replicas(
    pki: &DevPki,
    edges: usize,
    set: &[relay_protocol::Replica],
    ports: &[u16],
) -> Result<Vec<relay_server::Relay>> {
    let mut relays = Vec::new();
    for (i, me) in set.iter().enumerate() {
        let mut cfg = crate::relay_config(pki, edges)?;
        cfg.relay_id = me.id.clone();
        let ip = if i == 0 { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
        cfg.quic_listen = SocketAddr::from((ip, ports[i]));
        cfg.tcp_fallback = false;
        cfg.quic.keepalive = Duration::from_millis(500);
        cfg.limits.drain_grace = Duration::from_millis(200);
        cfg.replicas = Some(static_peers(set, &me.id, me.addr.clone()));
        relays.push(
            relay_server::Relay::spawn(cfg)
                .await
                .with_context(|| format!("relay {i}"))?,
        );
    }
    Ok(relays)
}

/// Replica `me` of `set`, advertising `advertise`: its `[replicas]` with
/// the others of `set` as its static peers.
pub fn static_peers(
    set: &[relay_protocol::Replica],
    me: &str,
    advertise: impl Into<String>,
) -> relay_server::replicas::ReplicaSettings {
    relay_server::replicas::ReplicaSettings {
        advertise: advertise.into(),
        source: relay_server::replicas::ReplicaSource::Static(
            set.iter().filter(|r| r.id != me).cloned().collect(),
        ),
    }
}
/// The lab relay's configuration as replica `i`: its id, QUIC on its WAN
/// address only (no TCP fallback), CONNECT and admin on its own ports,
/// capture off (the replicas share one host). `[replicas]` is the
/// caller's.
pub fn replica_config(pki: &DevPki, i: u8) -> Result<RelayConfig> {
    let mut cfg = relay_config(pki)?;
    cfg.relay_id = id(i);
    cfg.quic_listen = sa(wan(i), QUIC_PORT);
    cfg.tcp_fallback = false;
    cfg.connect_listen = Some(sa(netns::RELAY_LAN_IP, connect_port(i)));
    cfg.admin_listen = Some(sa(netns::RELAY_LAN_IP, admin_port(i)));
    cfg.capture = None;
    Ok(cfg)
}

/// [`replica_config`] for replica `i` in `lab`: CONNECT and admin on its
/// host's LAN address ([`lan_ip`]), `[nodes]` for every site of the lab
/// ([`crate::scenario::relay_config_in`]), and capture on when the replica
/// has a host of its own (one nftables table per host).
pub fn replica_config_on(lab: &NetnsLab, pki: &DevPki, i: u8) -> Result<RelayConfig> {
    let mut cfg = replica_config(pki, i)?;
    let own = crate::scenario::relay_config_in(lab, pki)?;
    cfg.nodes = own.nodes;
    cfg.connect_listen = Some(sa(lan_ip(lab, i), connect_port(i)));
    cfg.admin_listen = Some(sa(lan_ip(lab, i), admin_port(i)));
    let hosts = lab.relay_hosts().len();
    if hosts > 1 && usize::from(i) <= hosts {
        cfg.capture = own.capture;
    }
    Ok(cfg)
}

/// Edge `site`'s configuration for the replica tests: only replica 1's
/// address (the rest comes from the replica set), QUIC, no capture, and
/// short timings (keep-alive 1 s, handshake 3 s, backoff 0.2 s up to
/// `backoff_max`).
pub fn replica_edge_config(pki: &DevPki, site: u8, backoff_max: Duration) -> Result<EdgeConfig> {
    let mut cfg = edge_config(pki, site)?;
    cfg.relay = sa(wan(1), QUIC_PORT).to_string();
    cfg.capture = None;
    cfg.transport = edge_client::TransportMode::Quic;
    cfg.quic.keepalive = Duration::from_secs(1);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.handshake_timeout = Duration::from_secs(3);
    cfg.backoff.initial = Duration::from_millis(200);
    cfg.backoff.max = backoff_max;
    Ok(cfg)
}

async fn admin_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .context("admin connect timed out")??;
    let (code, body) = crate::http_request(s, "GET", "admin", path, Some(ADMIN_TOKEN)).await?;
    ensure!(
        code == 200,
        "replica at {addr}: GET {path}: HTTP {code}: {body}"
    );
    Ok(serde_json::from_str(&body)?)
}

/// Replica `i`'s sessions (on the relay node), asked from inside the
/// current namespace: node → session id.
pub async fn sessions_async(i: u8) -> Result<BTreeMap<String, u64>> {
    sessions_at(sa(netns::RELAY_LAN_IP, admin_port(i))).await
}

/// The sessions of the replica whose admin API is at `admin`, asked from
/// inside the current namespace: node → session id.
pub async fn sessions_at(admin: SocketAddr) -> Result<BTreeMap<String, u64>> {
    let rows: Vec<SessionRow> = serde_json::from_value(admin_json(admin, "/v1/sessions").await?)?;
    Ok(rows.into_iter().map(|r| (r.node, r.session_id)).collect())
}

/// Replica `i`'s sessions (from the apiserver host): node → session id.
pub fn sessions(lab: &NetnsLab, i: u8) -> Result<BTreeMap<String, u64>> {
    let admin = sa(lan_ip(lab, i), admin_port(i));
    lab.run_in(Role::Apiserver, Duration::from_secs(5), move || {
        sessions_at(admin)
    })
}

/// The replica ids replica `i` tells its edges about (`GET /v1/replicas`).
pub fn replica_ids(lab: &NetnsLab, i: u8) -> Result<Vec<String>> {
    let admin = sa(lan_ip(lab, i), admin_port(i));
    let rows: Vec<serde_json::Value> = serde_json::from_value(lab.run_in(
        Role::Apiserver,
        Duration::from_secs(5),
        move || async move { admin_json(admin, "/v1/replicas").await },
    )?)?;
    Ok(rows
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

/// Whether every edge of the lab has a session on each of `replicas`.
pub fn all_edges_everywhere(lab: &NetnsLab, replicas: &[u8]) -> Result<bool> {
    for i in replicas {
        match sessions(lab, *i) {
            Ok(s) if s.len() == lab.sites().len() => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// `CONNECT <target>` through replica `i` from the apiserver host, then a
/// GET; returns the body.
pub fn fetch_via(lab: &NetnsLab, i: u8, target: SocketAddr) -> Result<String> {
    let proxy = sa(lan_ip(lab, i), connect_port(i));
    lab.run_in(
        Role::Apiserver,
        Duration::from_secs(10),
        move || async move {
            let s = crate::connect_via(proxy, &target.to_string()).await?;
            let (code, body) = crate::http_get(s, "pod", "/", None).await?;
            ensure!(code == 200, "HTTP {code}");
            Ok(body.trim().to_string())
        },
    )
}

/// CONNECT through `proxy` to the echo service at `target`, then `total`
/// bytes in 16 KiB writes paced over about `over`, a half-close, and the
/// same bytes back before EOF.
pub async fn echo_through(
    proxy: SocketAddr,
    target: SocketAddr,
    total: usize,
    over: Duration,
) -> Result<()> {
    let s = crate::connect_via(proxy, &target.to_string()).await?;
    echo_over(s, total, over).await
}

/// `total` bytes in 16 KiB writes paced over about `over` on `s` (a
/// connection to an echo service, however it was reached), a half-close,
/// and the same bytes back before EOF.
pub async fn echo_over(s: TcpStream, total: usize, over: Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..total).map(|i| (i ^ (i >> 11)) as u8).collect();
    let send = data.clone();
    let pause = over / u32::try_from(total.div_ceil(16 << 10)).unwrap_or(1);
    let writer = tokio::spawn(async move {
        for c in send.chunks(16 << 10) {
            w.write_all(c).await?;
            tokio::time::sleep(pause).await;
        }
        w.shutdown().await
    });
    let mut got = Vec::with_capacity(total);
    tokio::time::timeout(over + Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .context("echo timed out")??;
    writer.await??;
    ensure!(
        got == data,
        "echo differs: {} of {total} bytes back",
        got.len()
    );
    Ok(())
}

/// What [`SessionWatch`] saw.
#[derive(Debug, Clone, Default)]
pub struct SessionWatchReport {
    /// Rounds sampled (every replica asked once per round).
    pub rounds: u64,
    /// Per edge: the longest time it had no session on any replica, as an
    /// upper bound: from the last round that saw one to the next that did
    /// (zero when every round saw one).
    pub longest_without: BTreeMap<String, Duration>,
    /// Per edge: the fewest replicas it had sessions on in one round.
    pub fewest: BTreeMap<String, usize>,
}

/// Samples every replica's admin API from the apiserver host every
/// `every` until stopped: how long each edge was without any session, and
/// on how few replicas it was at worst. A replica that does not answer
/// (restarting, killed) counts as holding no sessions.
pub struct SessionWatch {
    stop: Arc<AtomicBool>,
    join: std::thread::JoinHandle<Result<SessionWatchReport>>,
}

impl SessionWatch {
    /// Starts sampling `replicas` for the edges of [`netns::SITES`].
    pub fn start(lab: &NetnsLab, replicas: Vec<u8>, every: Duration) -> SessionWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let join = lab.spawn_in(Role::Apiserver, move || async move {
            let edges: Vec<String> = netns::SITES.iter().map(|s| format!("edge{s}")).collect();
            let mut r = SessionWatchReport::default();
            let start = Instant::now();
            let mut last_seen: BTreeMap<String, Instant> =
                edges.iter().map(|e| (e.clone(), start)).collect();
            let mut missing = std::collections::BTreeSet::new();
            // Bounded: an hour of rounds at most, whatever the caller does.
            while !st.load(SeqCst) && start.elapsed() < Duration::from_secs(3600) {
                let round = Instant::now();
                let mut on: BTreeMap<&str, usize> = edges.iter().map(|e| (e.as_str(), 0)).collect();
                for i in &replicas {
                    if let Ok(s) = sessions_async(*i).await {
                        for node in s.keys() {
                            if let Some(n) = on.get_mut(node.as_str()) {
                                *n += 1;
                            }
                        }
                    }
                }
                r.rounds += 1;
                for (e, n) in on {
                    let fewest = r.fewest.entry(e.to_string()).or_insert(n);
                    *fewest = (*fewest).min(n);
                    let worst = r.longest_without.entry(e.to_string()).or_default();
                    if n > 0 {
                        // Missed in some rounds since: the gap is at most
                        // from the last round that saw it to this one.
                        if missing.remove(e) {
                            *worst = (*worst).max(round.saturating_duration_since(last_seen[e]));
                        }
                        last_seen.insert(e.to_string(), round);
                    } else {
                        missing.insert(e.to_string());
                    }
                }
                tokio::time::sleep(every.saturating_sub(round.elapsed())).await;
            }
            // An edge still without sessions at the end: its gap runs to now.
            let now = Instant::now();
            for e in &missing {
                let worst = r.longest_without.entry(e.clone()).or_default();
                *worst = (*worst).max(now.saturating_duration_since(last_seen[e]));
            }
            Ok(r)
        });
        SessionWatch { stop, join }
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(self) -> Result<SessionWatchReport> {
        self.stop.store(true, SeqCst);
        self.join
            .join()
            .map_err(|_| anyhow!("session watch thread panicked"))?
    }
}
