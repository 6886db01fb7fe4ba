//! End-to-end tests of the tunnel core on loopback: a real relay, real edge
//! clients, real QUIC with mutual TLS, real TCP services. Nothing is mocked;
//! where a test needs a misbehaving peer (an old client, a fake relay), it
//! builds one from the same protocol and transport crates production uses.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use edge_client::EdgeClient;
use futures::future::join_all;
use relay_lab::traffic::{echo_round_trip, eventually, random_bytes};
use relay_lab::{
    admin_get, connect_via, edge_config, edge_ip, sessions, spawn_echo, spawn_http, Lab, Refused,
};
use relay_protocol::codec::{read_frame, write_frame};
use relay_protocol::{ClientHello, HelloReply, StreamOpen, StreamReply, StreamStatus, Target, L4};
use relay_transport::devcerts::DevPki;
use relay_transport::{quic, QuicTuning, TunnelConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn refused(e: anyhow::Error) -> Refused {
    match e.downcast::<Refused>() {
        Ok(r) => r,
        Err(e) => panic!("expected an HTTP refusal, got {e:#}"),
    }
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
