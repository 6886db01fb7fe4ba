//! Stream credit on loopback, with a real relay and a real edge client:
//! both sides grant the peer 32 concurrent streams when a connection
//! starts and raise the grant as it fills (`relay_transport::grant`).
//! These tests hold more streams open at once than the first grant; with
//! the raise switched off, the 33rd stream would wait for credit forever
//! and the test would time out.
//!
//! The edge holding the streams open is hand-driven (built from the same
//! protocol and transport crates production uses) so that the test
//! controls exactly how many streams it opens towards the relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, sessions, spawn_echo, Lab};
use relay_protocol::codec::{encode_frame, read_frame, write_frame};
use relay_protocol::{
    capability, Cidr, ClientHello, HelloReply, StreamOpen, StreamReply, StreamStatus, Target, L4,
};
use relay_transport::{quic, QuicTuning, TunnelConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// More than the first grant (32) and than its first raise (128), below
/// the relay's default maximum (256, the control stream included): the
/// relay must raise edge-0's grant twice (32 → 128 → 256) and edge-1
/// the relay's twice (32 → 128 → 512).
const HELD: usize = 200;

/// A hand-driven `edge-0` holds [`HELD`] streams to `edge-1`'s echo
/// service open at once, through the relay (edge to edge, one community),
/// then echoes a distinct pattern on every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_first_grant_go_through_both_ways() -> Result<()> {
    let mut lab = Lab::start(2, |cfg| {
        cfg.communities = HashMap::from([(
            "all".to_string(),
            vec!["edge-0".to_string(), "edge-1".to_string()],
        )]);
    })
    .await?;
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(1), 0)).await?;
    // edge-0's own client steps aside for the hand-driven one.
    lab.edges.remove(0).shutdown().await;

    let ep = quic::client_endpoint(
        "127.0.0.1:0".parse()?,
        &lab.pki.node_material("edge-0")?,
        &QuicTuning::default(),
        0,
    )?;
    let conn = TunnelConn::Quic(ep.connect(lab.relay.quic_addr(), "localhost")?.await?);
    let mut control = conn.open_bi().await?;
    let hello = ClientHello {
        version: relay_protocol::PROTOCOL_VERSION,
        node: "edge-0".into(),
        routes: vec![Cidr::host(edge_ip(0))],
        primary_addr: Some(edge_ip(0)),
        capabilities: capability::TCP_STREAMS
            | capability::ROUTE_DELTAS
            | capability::EXTENSIBLE
            | capability::QUIC_LIVENESS,
        agent: "test".into(),
        fallbacks: 0,
    };
    control.send.write_all(&encode_frame(&hello)?).await?;
    let reply: HelloReply =
        tokio::time::timeout(Duration::from_secs(5), read_frame(&mut control.recv)).await??;
    ensure!(matches!(reply, HelloReply::Accepted(_)), "{reply:?}");

    // Open and hold them all; each open waits while the grant is full.
    let mut held = Vec::with_capacity(HELD);
    let mut replied = 0;
    let open_all = async {
        for i in 0..HELD {
            let mut bi = conn.open_bi().await?;
            let open = StreamOpen {
                target: Target::Addr(echo),
                source: None,
                l4: L4::Tcp,
            };
            write_frame(&mut bi.send, &open).await?;
            held.push(bi);
            // The reply comes once the stream reached edge-1; read the
            // replies in batches so many opens are in flight at once.
            if held.len() - replied == 64 || i + 1 == HELD {
                for (j, bi) in held.iter_mut().enumerate().skip(replied) {
                    let r: StreamReply = read_frame(&mut bi.recv).await?;
                    ensure!(r.status == StreamStatus::Ok, "stream {j}: {r:?}");
                }
                replied = held.len();
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), open_all)
        .await
        .with_context(|| format!("only {} of {HELD} streams opened within 30 s", held.len()))??;

    // All open at once: the relay counts them on the session that carries
    // them on to edge-1, then each echoes its own pattern.
    let rows = sessions(lab.admin_addr()).await?;
    let edge1 = rows
        .iter()
        .find(|r| r.node == "edge-1")
        .context("edge-1 listed")?;
    ensure!(
        edge1.open_streams as usize >= HELD,
        "relay counts {} open streams to edge-1, want {HELD}",
        edge1.open_streams
    );
    let echo_all = async {
        for (i, bi) in held.iter_mut().enumerate() {
            let data = format!("stream {i} of {HELD}").into_bytes();
            bi.send.write_all(&data).await?;
            let mut back = vec![0; data.len()];
            bi.recv.read_exact(&mut back).await?;
            ensure!(back == data, "stream {i}: echoed bytes differ");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), echo_all).await??;
    conn.close(0, "");
    lab.stop().await;
    Ok(())
}
