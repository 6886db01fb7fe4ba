//! End-to-end tests of the tunnel core on loopback: a real relay, real edge
//! clients, real QUIC with mutual TLS, real TCP services. Nothing is mocked;
//! where a test needs a misbehaving peer (an old client, a fake relay), it
//! builds one from the same protocol and transport crates production uses.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use edge_client::{EdgeClient, EdgeState};
use futures::future::join_all;
use rand::RngCore;
use relay_lab::{
    admin_get, admin_request, connect_via, edge_config, edge_ip, sessions, spawn_echo, spawn_http,
    Lab, Refused,
};
use relay_protocol::codec::{read_frame, write_frame};
use relay_protocol::{
    ClientHello, HelloReply, RejectReason, StreamOpen, StreamReply, StreamStatus, Target, L4,
};
use relay_transport::devcerts::DevPki;
use relay_transport::{quic, QuicTuning, TunnelConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Polls `f` every 20 ms until it returns true or `limit` passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn refused(e: anyhow::Error) -> Refused {
    match e.downcast::<Refused>() {
        Ok(r) => r,
        Err(e) => panic!("expected an HTTP refusal, got {e:#}"),
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Sends `data`, half-closes, reads until EOF; returns what came back.
async fn echo_round_trip(mut s: TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut back = Vec::with_capacity(data.len());
        r.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let (a, b) = tokio::join!(send, recv);
    a?;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_edge_echo_is_byte_exact_with_half_close() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let data = random_bytes(4 * 1024 * 1024 + 17);
    let s = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    let back = echo_round_trip(s, &data).await?;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");

    // Half-close keeps the other direction open: after our FIN the echo
    // server still sends what it has, then its own FIN arrives.
    let mut s = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    s.write_all(b"ping").await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await??;
    assert_eq!(back, b"ping");

    // A client that does not wait for the 200 (bytes right after the
    // header) loses nothing.
    let mut s = TcpStream::connect(lab.connect_addr()).await?;
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: x\r\n\r\npipelined").as_bytes())
        .await?;
    s.shutdown().await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await??;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\npipelined"), "{text}");

    let row = &sessions(lab.admin_addr()).await?[0];
    assert!(
        row.bytes_out >= data.len() as u64 && row.bytes_in >= data.len() as u64,
        "{row:?}"
    );
    lab.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_across_two_edges() -> Result<()> {
    let lab = Lab::start(2, |_| {}).await?;
    let (e0, _t0) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let (e1, _t1) = spawn_echo(SocketAddr::new(edge_ip(1), 0)).await?;
    let proxy = lab.connect_addr();
    let tasks = (0..1000).map(|i| {
        let target = if i % 2 == 0 { e0 } else { e1 };
        tokio::spawn(async move {
            // Each stream carries its own pattern, so a crossed stream shows.
            let data: Vec<u8> = (0..8192u32)
                .map(|j| (j as u8) ^ (i as u8) ^ ((i >> 8) as u8))
                .collect();
            let s = connect_via(proxy, &target.to_string()).await?;
            let back = echo_round_trip(s, &data).await?;
            anyhow::ensure!(back == data, "stream {i}: echoed bytes differ");
            anyhow::Ok(())
        })
    });
    let results = tokio::time::timeout(Duration::from_secs(120), join_all(tasks)).await?;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 1000 failed, first: {:?}",
        failures.len(),
        failures.first()
    );

    // Every stream is accounted for and freed, on both sides.
    let shared = lab.relay.shared().clone();
    assert!(
        eventually(Duration::from_secs(10), || shared
            .metrics
            .streams_open
            .load(Relaxed)
            == 0)
        .await,
        "relay still counts {} open streams",
        shared.metrics.streams_open.load(Relaxed)
    );
    for e in &lab.edges {
        let st = e.stats().clone();
        assert!(
            eventually(Duration::from_secs(10), || st.open_streams.load(Relaxed)
                == 0)
            .await
        );
        assert_eq!(st.streams_total.load(Relaxed), 500);
    }
    let rows = sessions(lab.admin_addr()).await?;
    assert_eq!(rows.iter().map(|r| r.streams_total).sum::<u64>(), 1000);
    assert!(rows.iter().all(|r| r.open_streams == 0));
    lab.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_other_streams() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    // A firehose on the edge: writes as fast as it can, counting bytes.
    let hose = TcpListener::bind(SocketAddr::new(edge_ip(0), 0)).await?;
    let hose_addr = hose.local_addr()?;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w2 = written.clone();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = hose.accept().await {
            let chunk = vec![7u8; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {
                w2.fetch_add(chunk.len() as u64, Relaxed);
            }
        }
    });
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;

    // Stream A: connected to the firehose and never read.
    let stalled = connect_via(lab.connect_addr(), &hose_addr.to_string()).await?;
    // Let A fill every buffer on its path.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = written.load(Relaxed);

    // Stream B on the same session moves 64 MiB while A stays stalled.
    let data = random_bytes(64 * 1024 * 1024);
    let t = Instant::now();
    let s = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    let back = tokio::time::timeout(Duration::from_secs(60), echo_round_trip(s, &data)).await??;
    assert!(back == data, "stream B corrupted");
    let b_time = t.elapsed();

    // A is held back by per-stream flow control: the firehose made little
    // or no progress while B ran, and what it wrote is bounded by socket
    // buffers plus one stream window, not by B's traffic.
    let after = written.load(Relaxed);
    assert!(
        after < 64 * 1024 * 1024,
        "stalled stream buffered {after} bytes: no backpressure"
    );
    println!("stream B: 64 MiB echoed in {b_time:?} while stream A was stalled (firehose wrote {before} then {after} bytes)");
    drop(stalled);
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn no_session_for_the_target_is_502_within_a_second() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    for target in ["127.0.0.200:80", "no-such-node:10250", "[::1]:80"] {
        let t = Instant::now();
        let r = refused(connect_via(lab.connect_addr(), target).await.unwrap_err());
        assert_eq!(r.code, 502, "{target}: {}", r.status_line);
        assert!(r.status_line.contains("no_route"), "{}", r.status_line);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{target} took {:?}",
            t.elapsed()
        );
    }
    // Refused by the target itself (nothing listens there) is also 502,
    // with the edge's reason.
    let closed = TcpListener::bind(SocketAddr::new(edge_ip(0), 0)).await?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let r = refused(
        connect_via(lab.connect_addr(), &format!("{}:{port}", edge_ip(0)))
            .await
            .unwrap_err(),
    );
    assert_eq!(r.code, 502);
    assert!(r.status_line.contains("refused"), "{}", r.status_line);
    let (_, m) = admin_get(lab.admin_addr(), "/metrics", None).await?;
    assert!(
        m.contains("relay_streams_total{outcome=\"no_route\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("relay_streams_total{outcome=\"refused\"} 1"),
        "{m}"
    );
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn target_outside_what_the_edge_allows_is_403() -> Result<()> {
    relay_lab::init();
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let relay = relay_server::Relay::spawn(relay_lab::relay_config(&pki, 1)?).await?;
    let (web, _t) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0").await?;
    let (other, _t2) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0-other").await?;
    let mut cfg = edge_config(&pki, 0, relay.quic_addr())?;
    cfg.allowed_ports = vec![web.port()];
    let edge = EdgeClient::spawn(cfg);
    edge.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");
    let proxy = relay.connect_addr().unwrap();

    let s = connect_via(proxy, &web.to_string()).await?;
    let (code, body) = relay_lab::http_get(s, "x", "/", None).await?;
    assert_eq!((code, body.as_str()), (200, "hello from edge-0\n"));

    let r = refused(connect_via(proxy, &other.to_string()).await.unwrap_err());
    assert_eq!(r.code, 403, "{}", r.status_line);
    assert!(
        r.status_line.contains("denied") && r.status_line.contains("not allowed"),
        "{}",
        r.status_line
    );
    assert_eq!(edge.stats().denied.load(Relaxed), 1);
    edge.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A stand-in relay built from the production protocol and transport
/// crates, to send an edge what a correct relay never would: a stream to a
/// target outside the edge's routes. The edge must refuse it itself.
#[tokio::test]
async fn edge_refuses_streams_outside_its_routes_even_from_the_relay() -> Result<()> {
    relay_lab::init();
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let ep = quic::server_endpoint(
        "127.0.0.1:0".parse()?,
        &pki.relay_material()?,
        &QuicTuning::default(),
        false,
    )?;
    let edge = EdgeClient::spawn(edge_config(&pki, 0, ep.local_addr()?)?);
    let conn = TunnelConn::Quic(
        tokio::time::timeout(Duration::from_secs(10), ep.accept())
            .await?
            .unwrap()
            .await?,
    );
    let mut control = conn.accept_bi().await?;
    let hello: ClientHello = read_frame(&mut control.recv).await?;
    assert_eq!(hello.node, "edge-0");
    let accepted = HelloReply::Accepted(relay_protocol::ServerHello {
        session_id: 1,
        generation: 1,
        relay_id: "fake".into(),
        keepalive_ms: 5000,
        idle_timeout_ms: 20000,
        tunnel_routes: vec![],
        capabilities: 0,
    });
    write_frame(&mut control.send, &accepted).await?;
    edge.wait_connected(Duration::from_secs(5))
        .await
        .expect("connected to the fake relay");

    // 127.0.0.99 is on this machine but not inside the edge's 127.0.0.2/32.
    let (_, _t) = spawn_echo("127.0.0.99:0".parse()?).await?;
    for target in [
        Target::Addr("127.0.0.99:80".parse()?),
        Target::Name {
            host: "kubernetes.default".into(),
            port: 443,
        },
    ] {
        let mut bi = conn.open_bi().await?;
        write_frame(
            &mut bi.send,
            &StreamOpen {
                target,
                source: None,
                l4: L4::Tcp,
            },
        )
        .await?;
        let reply: StreamReply = read_frame(&mut bi.recv).await?;
        assert_eq!(reply.status, StreamStatus::Denied, "{}", reply.message);
    }
    assert_eq!(edge.stats().denied.load(Relaxed), 2);
    // A garbage header resets the stream instead of hanging it.
    let mut bi = conn.open_bi().await?;
    bi.send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<_, StreamReply>(&mut bi.recv),
    )
    .await?;
    assert!(r.is_err(), "garbage header was answered: {r:?}");
    edge.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_restart_reappears_with_a_higher_generation() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    let first = sessions(lab.admin_addr()).await?;
    assert_eq!(first.len(), 1);
    let old = first[0].clone();
    lab.edges.pop().unwrap().shutdown().await;
    let shared = lab.relay.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || shared.registry.is_empty()).await,
        "session of a stopped edge still listed"
    );
    let edge = EdgeClient::spawn(edge_config(&lab.pki, 0, lab.relay.quic_addr())?);
    let (sid, gen) = edge
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("reconnected");
    let rows = sessions(lab.admin_addr()).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].session_id, rows[0].generation), (sid, gen));
    assert!(gen > old.generation && sid != old.session_id);

    // Kicking through the admin API: the edge comes back by itself, newer.
    let (code, _) = admin_request(lab.admin_addr(), "DELETE", "/v1/sessions/edge-0").await?;
    assert_eq!(code, 200);
    let mut w = edge.watch();
    let back = tokio::time::timeout(
        Duration::from_secs(10),
        w.wait_for(|s| matches!(s, EdgeState::Connected { generation, .. } if *generation > gen)),
    )
    .await;
    assert!(
        back.is_ok(),
        "edge did not reconnect after a kick: {:?}",
        edge.state()
    );
    assert!(
        eventually(Duration::from_secs(5), || shared
            .registry
            .get("edge-0")
            .is_some_and(|s| s.generation > gen))
        .await
    );
    let (code, _) = admin_request(lab.admin_addr(), "DELETE", "/v1/sessions/nobody").await?;
    assert_eq!(code, 404);
    lab.edges.push(edge);
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn certificates_from_an_unknown_ca_or_for_another_node_are_refused() -> Result<()> {
    let lab = Lab::start(2, |_| {}).await?;
    // Same node name, but a certificate from a CA the relay does not trust.
    let rogue = DevPki::generate(&["localhost"], &["edge-0"])?;
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    let mut m = rogue.node_material("edge-0")?;
    m.ca = lab.pki.relay_material()?.ca; // it does trust the real relay
    cfg.identity = edge_client::config::Identity::Static(m);
    cfg.handshake_timeout = Duration::from_secs(2);
    let rogue_edge = EdgeClient::spawn(cfg);
    let shared = lab.relay.shared().clone();
    assert!(
        eventually(Duration::from_secs(5), || shared
            .metrics
            .render(0, 0)
            .contains("reason=\"tls\"} 1"))
        .await,
        "TLS failure not counted"
    );
    assert!(!matches!(rogue_edge.state(), EdgeState::Connected { .. }));
    rogue_edge.shutdown().await;

    // A valid certificate for edge-1 used to claim to be edge-0.
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.identity = edge_client::config::Identity::Static(lab.pki.node_material("edge-1")?);
    let liar = EdgeClient::spawn(cfg);
    let mut w = liar.watch();
    let s = tokio::time::timeout(
        Duration::from_secs(5),
        w.wait_for(|s| matches!(s, EdgeState::Rejected { .. })),
    )
    .await?
    .map(|s| s.clone())?;
    match s {
        EdgeState::Rejected { reason, message } => {
            assert_eq!(reason, RejectReason::IdentityMismatch, "{message}");
        }
        other => panic!("{other:?}"),
    }
    liar.shutdown().await;
    // The genuine sessions were never disturbed.
    let rows = sessions(lab.admin_addr()).await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows.iter().map(|r| r.streams_total).sum::<u64>(), 0);
    lab.stop().await;
    Ok(())
}

/// A hand-driven client: connects with `node`'s certificate and sends
/// `first_frame` raw on the control stream; returns the relay's reply.
async fn raw_hello(lab: &Lab, node: &str, first_frame: &[u8]) -> Result<HelloReply> {
    let ep = quic::client_endpoint(
        "127.0.0.1:0".parse()?,
        &lab.pki.node_material(node)?,
        &QuicTuning::default(),
        0,
    )?;
    let conn = TunnelConn::Quic(ep.connect(lab.relay.quic_addr(), "localhost")?.await?);
    let mut c = conn.open_bi().await?;
    c.send.write_all(first_frame).await?;
    let reply = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c.recv)).await??;
    conn.close(0, "");
    Ok(reply)
}

fn hello(version: u16) -> ClientHello {
    ClientHello {
        version,
        node: "edge-0".into(),
        routes: vec![],
        primary_addr: None,
        capabilities: 0,
        agent: "test".into(),
        fallbacks: 0,
    }
}

#[tokio::test]
async fn unsupported_versions_and_bad_hellos_get_typed_rejections() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    let reason = |r: HelloReply| match r {
        HelloReply::Rejected(r) => (r.reason, r.message),
        HelloReply::Accepted(_) => panic!("accepted"),
    };
    // A future client with the same layout but a newer version.
    let frame = relay_protocol::codec::encode_frame(&hello(99))?;
    let (r, msg) = reason(raw_hello(&lab, "edge-0", &frame).await?);
    assert_eq!(r, RejectReason::UnsupportedVersion);
    assert!(msg.contains("99"), "{msg}");
    // A future client whose hello we cannot even decode: only its version.
    let mut body = relay_protocol::codec::encode(&7u16)?;
    body.extend_from_slice(&[0xff; 40]);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    assert_eq!(
        reason(raw_hello(&lab, "edge-0", &frame).await?).0,
        RejectReason::UnsupportedVersion
    );
    // A frame announcing 4 GiB: refused from its length, nothing allocated.
    let (r, msg) = reason(raw_hello(&lab, "edge-0", &[0xff, 0xff, 0xff, 0xf0]).await?);
    assert_eq!(r, RejectReason::Malformed);
    assert!(msg.contains("exceeds"), "{msg}");
    // Routes the node may not serve.
    let mut h = hello(relay_protocol::PROTOCOL_VERSION);
    h.routes = vec!["10.0.0.0/8".parse()?];
    let (r, msg) =
        reason(raw_hello(&lab, "edge-0", &relay_protocol::codec::encode_frame(&h)?).await?);
    assert_eq!(r, RejectReason::RouteNotAllowed, "{msg}");
    // The live session is untouched by all of this.
    assert_eq!(sessions(lab.admin_addr()).await?.len(), 1);
    let (_, m) = admin_get(lab.admin_addr(), "/metrics", None).await?;
    assert!(
        m.contains("relay_handshake_failures_total{reason=\"unsupported_version\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("relay_handshake_failures_total{reason=\"malformed\"} 1"),
        "{m}"
    );
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn slow_endless_or_wrong_connect_headers_are_cut_off() -> Result<()> {
    let lab = Lab::start(1, |c| {
        c.limits.connect_header_timeout = Duration::from_millis(500);
    })
    .await?;
    let read_all = |mut s: TcpStream| async move {
        let mut v = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut v)).await??;
        anyhow::Ok(String::from_utf8_lossy(&v).to_string())
    };
    // Slowloris: a header that never ends in time.
    let mut s = TcpStream::connect(lab.connect_addr()).await?;
    let t = Instant::now();
    s.write_all(b"CONNECT 127.0.0.2:80 HTTP/1.1\r\n").await?;
    let text = read_all(s).await?;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Endless: header bytes keep coming, past the 8 KiB limit.
    let mut s = TcpStream::connect(lab.connect_addr()).await?;
    s.write_all(b"CONNECT 127.0.0.2:80 HTTP/1.1\r\n").await?;
    let junk = format!("X-Junk: {}\r\n", "a".repeat(100));
    let mut sent = 0;
    while sent < 64 * 1024 {
        if s.write_all(junk.as_bytes()).await.is_err() {
            break; // the relay closed on us, as it should
        }
        sent += junk.len();
    }
    let text = read_all(s).await.unwrap_or_default();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    for (req, code) in [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        ("CONNECT nonsense HTTP/1.1\r\n\r\n", "400"),
        ("\x16\x03\x01 not http\r\n\r\n", "400"),
    ] {
        let mut s = TcpStream::connect(lab.connect_addr()).await?;
        s.write_all(req.as_bytes()).await?;
        let text = read_all(s).await?;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {code}")),
            "{req:?} -> {text}"
        );
    }
    let (_, m) = admin_get(lab.admin_addr(), "/metrics", None).await?;
    assert!(
        m.contains("relay_connect_responses_total{code=\"408\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("relay_connect_responses_total{code=\"431\"} 1"),
        "{m}"
    );
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn resets_are_carried_across_the_tunnel() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    // An edge service that accepts, reads a little, then aborts with RST.
    let l = TcpListener::bind(SocketAddr::new(edge_ip(0), 0)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let mut s = connect_via(lab.connect_addr(), &addr.to_string()).await?;
    s.write_all(b"boom").await?;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await?;
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes (a clean EOF would hide the failure)"),
    }
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn admin_api_token_routes_health_and_drain() -> Result<()> {
    let lab = Lab::start(1, |c| {
        c.admin_token = Some(relay_server::Secret::new("s3cret-token-0123456789"))
    })
    .await?;
    let admin = lab.admin_addr();
    assert_eq!(admin_get(admin, "/v1/sessions", None).await?.0, 401);
    assert_eq!(
        admin_get(admin, "/v1/sessions", Some("wrong")).await?.0,
        401
    );
    assert_eq!(admin_get(admin, "/metrics", None).await?.0, 401);
    assert_eq!(admin_get(admin, "/healthz", None).await?.0, 200);
    assert_eq!(admin_get(admin, "/readyz", None).await?.0, 200);
    let tok = Some("s3cret-token-0123456789");
    let (code, body) = admin_get(admin, "/v1/routes", tok).await?;
    assert_eq!(code, 200);
    assert!(
        body.contains("\"cidr\":\"127.0.0.2/32\"") && body.contains("\"node\":\"edge-0\""),
        "{body}"
    );
    let (code, body) = admin_get(admin, "/v1/sessions/edge-0", tok).await?;
    assert_eq!(code, 200, "{body}");
    let row: relay_server::admin::SessionRow = serde_json::from_str(&body)?;
    assert_eq!(
        (row.node.as_str(), row.transport.as_str()),
        ("edge-0", "quic")
    );
    assert!(row.rtt_ms >= 0.0 && row.remote_addr.starts_with("127.0.0.1:"));
    assert_eq!(admin_get(admin, "/v1/sessions/nope", tok).await?.0, 404);
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_lets_in_flight_streams_finish_and_refuses_new_ones() -> Result<()> {
    let lab = Lab::start(1, |_| {}).await?;
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let mut inflight = connect_via(lab.connect_addr(), &echo.to_string()).await?;
    inflight.write_all(b"before").await?;
    let session = lab.relay.shared().registry.get("edge-0").unwrap();
    session.drain(Duration::from_secs(10), "test");
    // New streams are refused with a reason while the old one still works.
    let r = refused(
        connect_via(lab.connect_addr(), &echo.to_string())
            .await
            .unwrap_err(),
    );
    assert_eq!(r.code, 502);
    assert!(r.status_line.contains("draining"), "{}", r.status_line);
    inflight.write_all(b" and after").await?;
    inflight.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), inflight.read_to_end(&mut back)).await??;
    assert_eq!(back, b"before and after");
    // With its last stream done, the drained session closes and the edge
    // reconnects as a fresh, non-draining session.
    let shared = lab.relay.shared().clone();
    let old_gen = session.generation;
    assert!(
        eventually(Duration::from_secs(10), || shared
            .registry
            .get("edge-0")
            .is_some_and(|s| s.generation > old_gen && !s.is_draining()))
        .await
    );
    lab.stop().await;
    Ok(())
}

#[tokio::test]
async fn connect_over_a_unix_socket_and_over_mutual_tls() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("relay-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("connect.sock");
    let apiserver_pki = DevPki::generate(&["localhost"], &["kube-apiserver"])?;
    let tls_for_connect = apiserver_pki.relay_material()?;
    let sock2 = sock.clone();
    let lab = Lab::start(1, move |c| {
        c.connect_unix = Some(sock2);
        c.connect_tls = Some(tls_for_connect);
    })
    .await?;
    let (web, _t) = spawn_http(SocketAddr::new(edge_ip(0), 0), "edge-0").await?;

    // Unix socket, as kube-apiserver's egress selector can use.
    let mut s = tokio::net::UnixStream::connect(&sock).await?;
    s.write_all(format!("CONNECT edge-0:{} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", web.port()).as_bytes())
        .await?;
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut all)).await??;
    assert!(
        all.starts_with("HTTP/1.1 200") && all.ends_with("hello from edge-0\n"),
        "{all}"
    );

    // TLS with a client certificate from the CONNECT CA.
    let client_cfg = apiserver_pki
        .node_material("kube-apiserver")?
        .client_config(b"http/1.1")?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_cfg));
    let tcp = TcpStream::connect(lab.connect_addr()).await?;
    let mut tls = connector.connect("localhost".try_into()?, tcp).await?;
    tls.write_all(
        format!(
            "CONNECT {web} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut all)).await?;
    let all = String::from_utf8_lossy(&all);
    assert!(
        all.starts_with("HTTP/1.1 200") && all.contains("hello from edge-0"),
        "{all}"
    );

    // Without a client certificate the TLS listener refuses.
    let anon =
        tokio_rustls::rustls::ClientConfig::builder_with_provider(relay_transport::tls::provider())
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])?
            .with_root_certificates({
                let mut r = tokio_rustls::rustls::RootCertStore::empty();
                r.add(apiserver_pki.relay_material()?.ca[0].clone())?;
                r
            })
            .with_no_client_auth();
    let tcp = TcpStream::connect(lab.connect_addr()).await?;
    let res = async {
        let mut t = tokio_rustls::TlsConnector::from(std::sync::Arc::new(anon))
            .connect("localhost".try_into()?, tcp)
            .await?;
        t.write_all(b"CONNECT edge-0:1 HTTP/1.1\r\n\r\n").await?;
        let mut v = Vec::new();
        t.read_to_end(&mut v).await?;
        anyhow::ensure!(!v.is_empty(), "closed without an answer");
        anyhow::Ok(v)
    }
    .await;
    assert!(res.is_err(), "anonymous TLS client was served: {res:?}");
    lab.stop().await;
    assert!(!sock.exists(), "unix socket left behind");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

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

/// An edge announcing `QUIC_LIVENESS` keeps its path with QUIC's own PINGs
/// and talks on the control stream once a minute: the relay neither pings
/// it at keep-alive pace nor closes it for a control stream quieter than
/// the idle timeout, and its "last seen" follows what arrives. An equally
/// quiet edge without the bit (an older build) is pinged within 1.5
/// keep-alives (asserted: before the idle timeout) and, not answering,
/// closed at the idle timeout, as before.
/// Hand-driven QUIC clients with the real transport (keep-alive on).
#[tokio::test]
async fn a_quic_edge_checking_its_path_itself_is_not_pinged_at_keepalive_pace() -> Result<()> {
    use futures::StreamExt;
    use relay_protocol::capability;
    use relay_protocol::codec::{control_reader, decode_control, encode_frame};
    use relay_protocol::{Control, Incoming};
    let keepalive = Duration::from_millis(200);
    let idle = Duration::from_secs(1);
    let mut lab = Lab::start(2, |c| {
        c.quic.keepalive = keepalive;
        c.quic.idle_timeout = idle;
    })
    .await?;
    // edge-1's certificate, for the hand-driven clients.
    lab.edges.pop().unwrap().shutdown().await;
    let tuning = QuicTuning {
        keepalive,
        idle_timeout: idle,
        ..QuicTuning::default()
    };
    // Bits that add nothing to the hello reply, so it decodes alone.
    let base = capability::TCP_STREAMS | capability::ROUTE_DELTAS | capability::EXTENSIBLE;
    for lean in [true, false] {
        let ep = quic::client_endpoint(
            "127.0.0.1:0".parse()?,
            &lab.pki.node_material("edge-1")?,
            &tuning,
            0,
        )?;
        let conn = TunnelConn::Quic(ep.connect(lab.relay.quic_addr(), "localhost")?.await?);
        let mut c = conn.open_bi().await?;
        let mut h = hello(relay_protocol::PROTOCOL_VERSION);
        h.node = "edge-1".into();
        h.capabilities = base | if lean { capability::QUIC_LIVENESS } else { 0 };
        c.send.write_all(&encode_frame(&h)?).await?;
        let reply: HelloReply =
            tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c.recv)).await??;
        assert!(matches!(reply, HelloReply::Accepted(_)), "{reply:?}");
        let mut frames = control_reader(c.recv);
        // Silent on the control stream for 2.5 idle timeouts.
        let quiet = idle * 5 / 2;
        let start = Instant::now();
        let mut first_ping = None;
        let ended = loop {
            let left = quiet.saturating_sub(start.elapsed());
            tokio::select! {
                f = frames.next() => match f {
                    Some(Ok(b)) => {
                        if let Ok(Incoming::Known { msg: Control::Ping { .. }, .. }) = decode_control(&b) {
                            first_ping.get_or_insert(start.elapsed());
                        }
                    }
                    _ => break Some(start.elapsed()),
                },
                _ = tokio::time::sleep(left) => break None,
            }
        };
        if lean {
            assert_eq!(first_ping, None, "pinged an edge that checks its path");
            assert_eq!(ended, None, "closed a quiet control stream");
            let rows = sessions(lab.admin_addr()).await?;
            let row = rows
                .iter()
                .find(|r| r.node == "edge-1")
                .expect("edge-1 registered");
            assert!(
                row.last_seen_secs < idle.as_secs_f64(),
                "last seen {} s ago, although QUIC keep-alives arrive",
                row.last_seen_secs
            );
        } else {
            let ping = first_ping.expect("an older edge, quiet, was never pinged");
            assert!(ping < idle, "first ping after {ping:?}");
            let ended = ended.expect("an older edge, quiet, was never closed");
            assert!(ended <= idle * 2, "closed after {ended:?}");
        }
        conn.close(0, "");
        ep.wait_idle().await;
    }
    lab.stop().await;
    Ok(())
}
