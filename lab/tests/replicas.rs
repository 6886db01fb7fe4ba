//! Scale-out on loopback: three relay replicas (a static `[replicas]`
//! list) and two edges that first dial only replica 0: edge 0 at the
//! address replica 0 advertises (its first session becomes replica 0's),
//! edge 1 at another address of it, as through a load balancer (its first
//! session hands over to a direct one). Every edge ends up
//! with a session on every replica, CONNECT through any replica reaches
//! any edge, and with replica 0 gone (the one the edges were configured
//! with) the others keep serving on the sessions they had. Real QUIC and
//! TLS on 127.0.0.0/8; the namespace-lab version with NATs and SIGKILL is
//! `netns_replicas.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::{connect_via, edge_config, edge_ip, edge_name, http_get, relay_config, spawn_http};
use relay_protocol::Replica;
use relay_server::replicas::{ReplicaSettings, ReplicaSource};
use relay_server::Relay;
use relay_transport::devcerts::DevPki;

/// A free UDP port on 127.0.0.1 (static peers need addresses up front).
fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Node name → generation on one replica.
async fn sessions(admin: SocketAddr) -> Result<BTreeMap<String, u64>> {
    Ok(relay_lab::sessions(admin)
        .await?
        .into_iter()
        .map(|r| (r.node, r.generation))
        .collect())
}

async fn wait_all_sessions(
    admins: &[SocketAddr],
    edges: usize,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let mut ok = true;
        for a in admins {
            ok &= sessions(*a).await?.len() == edges;
        }
        if ok {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            let mut seen = Vec::new();
            for a in admins {
                seen.push(sessions(*a).await?);
            }
            bail!("not every edge on every replica within {limit:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fetch(connect: SocketAddr, i: usize, port: u16) -> Result<String> {
    let s = connect_via(connect, &SocketAddr::new(edge_ip(i), port).to_string()).await?;
    let (code, body) = http_get(s, &edge_name(i), "/", None).await?;
    ensure!(code == 200, "HTTP {code}");
    Ok(body)
}

#[tokio::test]
async fn every_edge_on_every_replica_and_any_replica_serves_any_edge() -> Result<()> {
    relay_lab::init();
    let edges = 2;
    let names: Vec<String> = (0..edges).map(edge_name).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &refs)?;
    let ports = (0..3)
        .map(|_| free_udp_port())
        .collect::<Result<Vec<u16>>>()?;
    let set: Vec<Replica> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| Replica {
            id: format!("relay-{i}"),
            addr: format!("127.0.0.1:{p}"),
        })
        .collect();
    let mut relays = relay_lab::replicas::loopback_replicas(&pki, edges, &set, &ports).await?;
    let admins: Vec<SocketAddr> = relays.iter().map(|r| r.admin_addr().unwrap()).collect();
    let connects: Vec<SocketAddr> = relays.iter().map(|r| r.connect_addr().unwrap()).collect();
    let mut services = Vec::new();
    let mut clients = Vec::new();
    for i in 0..edges {
        let (addr, task) = spawn_http(SocketAddr::new(edge_ip(i), 0), &edge_name(i)).await?;
        services.push((addr.port(), task));
        // Each edge knows only replica 0.
        let first: SocketAddr = match i {
            0 => set[0].addr.parse()?,
            _ => SocketAddr::from(([127, 0, 0, 9], ports[0])),
        };
        let mut cfg = edge_config(&pki, i, first)?;
        cfg.transport = edge_client::TransportMode::Quic;
        cfg.backoff.initial = Duration::from_millis(100);
        cfg.backoff.max = Duration::from_millis(500);
        cfg.handshake_timeout = Duration::from_secs(2);
        cfg.quic.keepalive = Duration::from_millis(500);
        clients.push(EdgeClient::spawn(cfg));
    }
    let took = wait_all_sessions(&admins, edges, Duration::from_secs(15)).await?;
    println!("every edge on all 3 replicas {took:?} after start");
    // Edge 1's first session hands over to its direct one on replica 0:
    // wait until the sessions stay put for a second.
    let t = Instant::now();
    let mut last = Vec::new();
    loop {
        let mut now = Vec::new();
        for a in &admins {
            now.push(sessions(*a).await?);
        }
        if now == last && now.iter().all(|s| s.len() == edges) {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "sessions never settled: {now:?}"
        );
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("settled {:?} after start", took + t.elapsed());
    // The replica set as each replica tells it.
    let (code, body) = relay_lab::admin_get(admins[1], "/v1/replicas", None).await?;
    ensure!(code == 200 && body.contains("relay-2"), "{code} {body}");
    for (r, c) in connects.iter().enumerate() {
        for (i, (port, _)) in services.iter().enumerate() {
            let body = fetch(*c, i, *port)
                .await
                .with_context(|| format!("relay-{r} → edge {i}"))?;
            ensure!(body.contains(&edge_name(i)), "relay-{r} → edge {i}: {body}");
        }
    }
    let before: Vec<BTreeMap<String, u64>> = {
        let mut v = Vec::new();
        for a in &admins[1..] {
            v.push(sessions(*a).await?);
        }
        v
    };
    // Replica 0 goes away: the address the edges were configured with.
    let gone = relays.remove(0);
    gone.shutdown(Duration::from_millis(200)).await;
    for (k, c) in connects[1..].iter().enumerate() {
        for (i, (port, _)) in services.iter().enumerate() {
            fetch(*c, i, *port)
                .await
                .with_context(|| format!("relay-{} → edge {i} after relay-0 left", k + 1))?;
        }
    }
    // The sessions on the survivors are the same ones: nothing was
    // re-established because of replica 0.
    for (k, a) in admins[1..].iter().enumerate() {
        ensure!(
            sessions(*a).await? == before[k],
            "sessions on relay-{} changed",
            k + 1
        );
    }
    for e in &clients {
        ensure!(
            matches!(e.state(), EdgeState::Connected { .. }),
            "{:?}",
            e.state()
        );
    }
    for e in clients {
        e.shutdown().await;
    }
    for r in relays {
        r.shutdown(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A relay without `[replicas]`: the edge keeps exactly its one session.
#[tokio::test]
async fn without_a_replica_set_the_edge_keeps_one_session() -> Result<()> {
    let lab = relay_lab::Lab::start(1, |_| {}).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = sessions(lab.admin_addr()).await?;
    ensure!(s.len() == 1, "{s:?}");
    let (_, body) = relay_lab::admin_get(lab.admin_addr(), "/v1/replicas", None).await?;
    ensure!(body.trim() == "[]", "{body}");
    ensure!(
        lab.edges[0]
            .stats()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    );
    lab.stop().await;
    Ok(())
}

/// Bad input: the relay advertises 51 replicas (over the edge's cap of 4),
/// 50 of them at addresses that do not answer, and the live one sorts
/// last (outside the cap). The edge follows 4 dead replicas with backoff
/// and never loses its one working session.
#[tokio::test]
async fn a_set_over_the_cap_of_dead_addresses_never_costs_the_working_session() -> Result<()> {
    relay_lab::init();
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0"])?;
    let port = free_udp_port()?;
    let me = format!("127.0.0.1:{port}");
    let mut cfg = relay_config(&pki, 1)?;
    cfg.relay_id = "relay-z".into();
    cfg.quic_listen = me.parse()?;
    cfg.tcp_fallback = false;
    // Addresses nothing listens on: a UDP port bound and released.
    let dead = (0..50)
        .map(|i| {
            Ok(Replica {
                id: format!("dead-{i:02}"),
                addr: format!("127.0.0.1:{}", free_udp_port()?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    cfg.replicas = Some(ReplicaSettings {
        advertise: me.clone(),
        source: ReplicaSource::Static(dead),
    });
    let relay = Relay::spawn(cfg).await?;
    let admin = relay.admin_addr().unwrap();
    let mut ecfg = edge_config(&pki, 0, relay.quic_addr())?;
    ecfg.transport = edge_client::TransportMode::Quic;
    ecfg.max_relays = 4;
    ecfg.handshake_timeout = Duration::from_millis(500);
    ecfg.backoff.initial = Duration::from_millis(100);
    ecfg.backoff.max = Duration::from_millis(300);
    let edge = EdgeClient::spawn(ecfg);
    edge.wait_connected(Duration::from_secs(5))
        .await
        .context("first session")?;
    let first = sessions(admin).await?;
    ensure!(first.len() == 1, "{first:?}");
    // Several rounds of failing dials to the dead replicas (0.5 s each).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        ensure!(
            matches!(edge.state(), EdgeState::Connected { .. }),
            "the edge lost its session: {:?}",
            edge.state()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        sessions(admin).await? == first,
        "the working session was replaced"
    );
    ensure!(
        edge.stats()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1,
        "more than one session was ever established"
    );
    edge.shutdown().await;
    relay.shutdown(Duration::from_millis(200)).await;
    Ok(())
}
