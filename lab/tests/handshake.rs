//! Sessions and their handshakes on loopback, with a real relay and real
//! edge clients: generations across an edge restart, certificates from
//! the wrong CA or for another node, typed rejections of bad hellos, and
//! the relay's keep-alive rules for an edge that checks its path with
//! QUIC's own PINGs. Where a test needs a misbehaving or hand-driven peer,
//! it builds one from the same protocol and transport crates production
//! uses.

use std::time::{Duration, Instant};

use anyhow::Result;
use edge_client::{EdgeClient, EdgeState};
use relay_lab::traffic::eventually;
use relay_lab::{admin_get, admin_request, edge_config, sessions, Lab};
use relay_protocol::codec::read_frame;
use relay_protocol::{ClientHello, HelloReply, RejectReason};
use relay_transport::devcerts::DevPki;
use relay_transport::{quic, QuicTuning, TunnelConn};
use tokio::io::AsyncWriteExt;

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
            .contains("reason=\"unknown_ca\"} 1"))
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

/// Configs that differ: a relay with a short idle timeout (1 s) and an
/// edge whose QUIC keep-alive is longer than that (3 s). The relay's
/// keep-alive backstop (half its idle timeout) keeps the session: the same
/// session for 4 s, where without it QUIC's idle timeout closed it every
/// second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_keeping_alive_slower_than_the_relay_allows_keeps_its_session() -> Result<()> {
    let mut lab = Lab::start(1, |c| {
        c.quic.keepalive = Duration::from_millis(200);
        c.quic.idle_timeout = Duration::from_secs(1);
    })
    .await?;
    lab.edges.pop().unwrap().shutdown().await;
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.quic.keepalive = Duration::from_secs(3);
    cfg.quic.idle_timeout = Duration::from_secs(10);
    cfg.transport = edge_client::TransportMode::Quic;
    let edge = EdgeClient::spawn(cfg);
    let (session, _) = edge
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let state = edge.state();
    assert!(
        matches!(state, EdgeState::Connected { session_id, .. } if session_id == session),
        "session lost or replaced: {state:?}"
    );
    assert_eq!(
        edge.stats()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    edge.shutdown().await;
    lab.stop().await;
    Ok(())
}
