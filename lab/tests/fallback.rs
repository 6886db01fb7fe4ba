//! The TLS-over-TCP fallback on loopback: a real relay and real edge
//! clients, with UDP swallowed by a stand-in for a network that blocks it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use edge_client::{EdgeClient, EdgeState};
use futures::future::join_all;
use relay_lab::traffic::{echo_round_trip, eventually, random_bytes};
use relay_lab::{
    connect_via, edge_config, edge_ip, relay_config, sessions, spawn_echo, spawn_http, Lab,
};
use relay_server::Relay;
use tokio::net::{TcpListener, TcpStream};

/// A stand-in for a network that blocks UDP: a UDP socket that swallows
/// every packet, and on the same port a TCP forwarder to the relay.
async fn udp_blackhole_to(
    relay: SocketAddr,
) -> Result<(SocketAddr, Vec<tokio::task::JoinHandle<()>>)> {
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let sink = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while udp.recv_from(&mut buf).await.is_ok() {}
    });
    let fwd = tokio::spawn(async move {
        while let Ok((mut client, _)) = tcp.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(relay).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    Ok((addr, vec![sink, fwd]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_fallback_carries_the_same_sessions_and_streams() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    // Replace the QUIC edge with one that may only use TLS over TCP.
    lab.edges.pop().unwrap().shutdown().await;
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.transport = edge_client::TransportMode::Tcp;
    let edge = EdgeClient::spawn(cfg);
    edge.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected over tcp");
    let row = &sessions(lab.admin_addr()).await?[0];
    assert_eq!(row.transport, "tcp", "{row:?}");

    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let data = random_bytes(4 * 1024 * 1024 + 3);
    let back = echo_round_trip(
        connect_via(lab.connect_addr(), &echo.to_string()).await?,
        &data,
    )
    .await?;
    assert!(back == data, "tcp transport corrupted the echo");
    let proxy = lab.connect_addr();
    let tasks = (0..200u32).map(|i| {
        tokio::spawn(async move {
            let data: Vec<u8> = (0..4096u32).map(|j| (j ^ i) as u8).collect();
            let back = echo_round_trip(connect_via(proxy, &echo.to_string()).await?, &data).await?;
            anyhow::ensure!(back == data, "stream {i} differs");
            anyhow::Ok(())
        })
    });
    for r in join_all(tasks).await {
        r??;
    }
    let shared = lab.relay.shared().clone();
    assert!(
        eventually(Duration::from_secs(10), || shared
            .metrics
            .streams_open
            .load(Relaxed)
            == 0)
        .await
    );
    edge.shutdown().await;
    lab.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_falls_back_to_tcp_when_udp_is_blocked() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    lab.edges.pop().unwrap().shutdown().await;
    let (hole, _tasks) = udp_blackhole_to(lab.relay.quic_addr()).await?;
    let mut cfg = edge_config(&lab.pki, 0, hole)?;
    cfg.quic_fallback_after = Duration::from_millis(500);
    let t = Instant::now();
    let edge = EdgeClient::spawn(cfg);
    edge.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected after falling back");
    let took = t.elapsed();
    let row = &sessions(lab.admin_addr()).await?[0];
    assert_eq!(
        (row.transport.as_str(), row.fallbacks),
        ("tcp", 1),
        "{row:?}"
    );
    assert_eq!(edge.stats().fallbacks.load(Relaxed), 1);
    // Bounded: the QUIC attempt gets 500 ms, then TCP+TLS on loopback.
    assert!(took < Duration::from_secs(5), "fallback took {took:?}");
    let (web, _w) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0").await?;
    let (code, body) = relay_lab::http_get(
        connect_via(lab.connect_addr(), &web.to_string()).await?,
        "x",
        "/",
        None,
    )
    .await?;
    assert_eq!((code, body.as_str()), (200, "hello from edge-0\n"));
    edge.shutdown().await;
    lab.stop().await;
    Ok(())
}

/// The fallback on a TCP port of its own (`listen.tcp_fallback_port`, as
/// for QUIC on one port and TCP on 443 where a site lets nothing else
/// out): an edge told the port (`tcp_fallback_port`) falls back to it; one
/// not told dials the QUIC port's number on TCP, where nothing listens,
/// and stays down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_on_its_own_port_is_found_by_edges_told_it() -> Result<()> {
    let mut lab = Lab::start(1, |c| c.tcp_fallback_port = Some(0)).await?;
    lab.edges.pop().unwrap().shutdown().await;
    let quic = lab.relay.quic_addr();
    let tcp = lab.relay.tcp_fallback_addr().expect("fallback on");
    assert_ne!(tcp.port(), quic.port());
    assert!(
        TcpStream::connect(quic).await.is_err(),
        "TCP answered on the QUIC port"
    );
    // Where the edge dials: UDP swallowed, no TCP on that port.
    let hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let hole_addr = hole.local_addr()?;
    let _sink = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while hole.recv_from(&mut buf).await.is_ok() {}
    });
    let mut cfg = edge_config(&lab.pki, 0, hole_addr)?;
    cfg.quic_fallback_after = Duration::from_millis(300);
    let untold = EdgeClient::spawn(cfg.clone());
    assert!(
        untold
            .wait_connected(Duration::from_secs(2))
            .await
            .is_none(),
        "connected without being told the fallback's port"
    );
    untold.shutdown().await;
    cfg.tcp_fallback_port = Some(tcp.port());
    let told = EdgeClient::spawn(cfg);
    told.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected on the fallback's own port");
    let row = &sessions(lab.admin_addr()).await?[0];
    assert_eq!(row.transport, "tcp", "{row:?}");
    told.shutdown().await;
    lab.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_fallback_session_survives_idle_keepalive_periods() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    lab.edges.pop().unwrap().shutdown().await;
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.transport = edge_client::TransportMode::Tcp;
    let edge = EdgeClient::spawn(cfg);
    let (sid, _) = edge
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("connected over tcp");
    // Three keep-alive periods of silence: pings both ways must keep it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rows = sessions(lab.admin_addr()).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].session_id, rows[0].transport.as_str()),
        (sid, "tcp"),
        "{rows:?}"
    );
    let (web, _w) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0").await?;
    let (code, _) = relay_lab::http_get(
        connect_via(lab.connect_addr(), &web.to_string()).await?,
        "x",
        "/",
        None,
    )
    .await?;
    assert_eq!(code, 200);
    edge.shutdown().await;
    lab.stop().await;
    Ok(())
}

/// A relay restart must not push QUIC edges onto the fallback. Between
/// the old relay's GOAWAY and the new one listening, the edge's first
/// attempt sends its QUIC Initial (and quinn's first retransmission, a
/// second later) into nothing; the next retransmission is due only after
/// the 3 s fallback timer. The edge had been on QUIC, so it tries QUIC
/// once more instead of falling back, and comes back on QUIC. (Before:
/// 995 of 1,000 edges were on TCP after `loadtest storm`'s restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_brings_quic_edges_back_on_quic() -> Result<()> {
    // Restarted on the same address, so not a port from the ephemeral
    // pool (see restartable_loopback_addr).
    let quic = relay_lab::restartable_loopback_addr()?;
    let lab = Lab::start(1, |c| c.quic_listen = quic).await?;
    let Lab { pki, relay, edges } = lab;
    assert_eq!(edges[0].stats().sessions.load(Relaxed), 1);
    relay.shutdown(Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut cfg = relay_config(&pki, 1)?;
    cfg.quic_listen = quic;
    let relay = Relay::spawn(cfg).await?;
    let stats = edges[0].stats().clone();
    assert!(
        eventually(Duration::from_secs(20), || stats.sessions.load(Relaxed)
            == 2
            && matches!(edges[0].state(), EdgeState::Connected { .. }))
        .await,
        "edge not back within 20 s: {:?}",
        edges[0].state()
    );
    let admin = relay
        .admin_addr()
        .expect("lab relays have an admin listener");
    let row = &sessions(admin).await?[0];
    assert_eq!(
        (row.transport.as_str(), row.fallbacks),
        ("quic", 0),
        "{row:?}"
    );
    assert_eq!(stats.fallbacks.load(Relaxed), 0);
    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A draining relay tells its edges (GOAWAY) and refuses new QUIC attempts
/// until it exits; an edge told so retries at a short pace (at most twice
/// the backoff's first step) instead of a growing backoff, and never falls
/// back to TCP for it. Edge 1 is idle, so its session closes at once; a
/// stream held open to edge 0 keeps the old relay draining (and refusing)
/// for 5 s. Under the old rule the delays would have grown 0.5, 1, 2, 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_notice_an_edge_retries_at_a_short_pace() -> Result<()> {
    let quic = relay_lab::restartable_loopback_addr()?;
    let lab = Lab::start(2, |c| c.quic_listen = quic).await?;
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let mut held = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(b"spliced").await?;
        let mut back = [0u8; 7];
        held.read_exact(&mut back).await?;
        assert_eq!(&back, b"spliced", "the held stream carries data");
    }
    // Every attempt edge 1 starts, with its time, until it is connected again.
    let mut watch = lab.edges[1].watch();
    let attempts = tokio::spawn(async move {
        let mut seen: Vec<Instant> = Vec::new();
        while watch.changed().await.is_ok() {
            match &*watch.borrow_and_update() {
                EdgeState::Connecting { .. } => seen.push(Instant::now()),
                EdgeState::Connected { .. } if !seen.is_empty() => break,
                _ => {}
            }
        }
        seen
    });
    let Lab { pki, relay, edges } = lab;
    let metrics = relay.shared().clone();
    let drain = tokio::spawn(relay.shutdown(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refused = relay_lab::metric_sample(
        &metrics.metrics.render(0, 0),
        "relay_handshake_failures_total{reason=\"shutting_down\"}",
    )
    .unwrap_or(0.0);
    // Shared holds the endpoint: let it go, so the address can be bound again.
    drop(metrics);
    // The stream ends, so does the drain.
    drop(held);
    drain.await?;
    // The old endpoint's socket goes once its last connection has drained
    // (a process that exits frees it at once): bind as soon as it is free.
    let mut relay = None;
    for _ in 0..50 {
        let mut cfg = relay_config(&pki, 2)?;
        cfg.quic_listen = quic;
        if let Ok(r) = Relay::spawn(cfg).await {
            relay = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relay = relay.expect("the relay's address free again within 5 s");
    let attempts = tokio::time::timeout(Duration::from_secs(20), attempts)
        .await
        .expect("edge 1 back within 20 s of the new relay")?;

    assert!(
        refused >= 4.0,
        "the draining relay refused {refused} attempts in 5 s"
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // During the 5 s drain: refusals come back at once, so the gap between
    // two attempts is the pace (≤ 1 s) plus a loopback round trip.
    let during: Vec<&Duration> = attempts
        .windows(2)
        .zip(&gaps)
        .filter(|(w, _)| w[1] < attempts[0] + Duration::from_secs(4))
        .map(|(_, g)| g)
        .collect();
    assert!(during.len() >= 3, "attempts {gaps:?}");
    assert!(
        during.iter().all(|g| **g < Duration::from_millis(1_500)),
        "a gap beyond the pace: {gaps:?}"
    );
    assert_eq!(edges[1].stats().fallbacks.load(Relaxed), 0);
    assert!(matches!(edges[1].state(), EdgeState::Connected { .. }));
    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Anyone who reaches the TCP fallback port opens connections that send
/// nothing (here 1,400 from 127.0.0.9, replaced as the relay closes
/// them): each used to take a place in the relay's handshake queue
/// (1,024 waiting for 256 permits) for the whole handshake timeout, and a
/// few hundred such connections a second locked every edge out of
/// reconnecting. Now one address holds at most 64 places, and a
/// connection that sends nothing for 3 s is closed before it queues: a
/// TCP-fallback edge from another address connects during the flood, in
/// milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_does_not_keep_edges_out() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    lab.edges.pop().unwrap().shutdown().await;
    let relay = lab.relay.quic_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held: std::collections::VecDeque<TcpStream> = Default::default();
            let mut opened = 0u64;
            while !stop.is_cancelled() {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.bind("127.0.0.9:0".parse()?)?;
                if let Ok(Ok(c)) =
                    tokio::time::timeout(Duration::from_millis(200), s.connect(relay)).await
                {
                    opened += 1;
                    held.push_back(c);
                }
                while held.len() > 1_400 {
                    held.pop_front();
                }
                if opened.is_multiple_of(100) {
                    tokio::task::yield_now().await;
                }
            }
            anyhow::Ok(opened)
        })
    };
    // Let the flood fill what it can first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut cfg = edge_config(&lab.pki, 0, relay)?;
    cfg.transport = edge_client::TransportMode::Tcp;
    let t = Instant::now();
    let edge = EdgeClient::spawn(cfg);
    // Unhindered, it connects in milliseconds; 5 s leaves room for a
    // loaded machine, and none for a queue held until handshakes time out
    // (10 s).
    let connected = edge.wait_connected(Duration::from_secs(5)).await.is_some();
    let took = t.elapsed();
    stop.cancel();
    let opened = flood.await??;
    let m = relay_lab::admin_get(lab.admin_addr(), "/metrics", None)
        .await?
        .1;
    let per_source = m
        .lines()
        .find(|l| l.starts_with("relay_handshake_failures_total{reason=\"per_source\"}"))
        .unwrap_or("per_source: none")
        .to_string();
    edge.shutdown().await;
    anyhow::ensure!(
        connected,
        "the edge did not connect within 5 s during the flood ({opened} connections opened; {per_source})"
    );
    anyhow::ensure!(
        !per_source.ends_with(" 0") && per_source.starts_with("relay_"),
        "the flood was never limited: {per_source}"
    );
    eprintln!("silent flood: {opened} connections opened from one address; the edge connected after {took:?}; {per_source}");
    Ok(())
}
