//! UDP payloads larger than a QUIC datagram, over a real QUIC connection on
//! loopback (mutual TLS with the dev PKI) to a real UDP echo service: with
//! a peer that announced `UDP_STREAM_PAYLOADS` they travel whole on the
//! flow's stream, both ways; towards an older peer they are dropped and
//! counted, as before; small payloads stay datagrams either way.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::datagram::StreamPayloads;
use relay_transport::conn::{BiStream, TunnelConn};
use relay_transport::quic::QuicTuning;
use relay_transport::udp::{
    max_payload, pump_datagrams, send_payload, serve_target, FlowHandle, FlowTable, StreamStalled,
    UdpStats, STREAM_PAYLOAD_WRITE_LIMIT,
};
use tokio::net::UdpSocket;

const LIMIT: Duration = Duration::from_secs(5);

/// A UDP echo service on loopback.
async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// The near side of one flow: its connection, flow, stream and counters.
struct Near {
    conn: TunnelConn,
    flow: FlowHandle,
    bi: BiStream,
    stats: Arc<UdpStats>,
    frames: StreamPayloads,
    /// The far side's end of the flow's stream when nothing serves it.
    _unserved: Option<BiStream>,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

impl Near {
    async fn send(&mut self, payload: &[u8]) {
        self.try_send(payload).await.expect("stream write");
    }

    async fn try_send(&mut self, payload: &[u8]) -> Result<(), StreamStalled> {
        send_payload(
            &self.conn,
            &self.flow,
            &mut self.bi.send,
            payload,
            &self.stats,
        )
        .await
    }

    /// The next answer, from a datagram or the flow's stream: (via the
    /// stream?, payload).
    async fn answer(&mut self) -> (bool, Vec<u8>) {
        let frames = &mut self.frames;
        let recv = &mut self.bi.recv;
        let on_stream = async {
            loop {
                if let Some(p) = frames.next_payload() {
                    return p;
                }
                let chunk = recv.read_chunk().await.unwrap().expect("stream ended");
                frames.extend(&chunk);
            }
        };
        tokio::time::timeout(LIMIT, async {
            tokio::select! {
                p = on_stream => (true, p.to_vec()),
                p = self.flow.recv() => (false, p.expect("flow gone").to_vec()),
            }
        })
        .await
        .expect("no answer within 5 s")
    }
}

/// A QUIC connection between an "edge" (near) and a "relay" (far) and one
/// UDP flow to an echo service, served on the far side by `serve_target`.
/// `near_peer_takes_streams` / `far_peer_takes_streams`: whether each side
/// believes its peer announced `UDP_STREAM_PAYLOADS`; without `serve`, the
/// far side never reads the flow's stream (a peer that stopped).
async fn flow(near_peer_takes_streams: bool, far_peer_takes_streams: bool, serve: bool) -> Near {
    let (near, far, endpoints) =
        common::quic_pair(&QuicTuning::relay_default(), &QuicTuning::default()).await;

    let near_stats = Arc::new(UdpStats::default());
    let far_stats = Arc::new(UdpStats::default());
    let near_table = FlowTable::new(1 << 31, 8, near_peer_takes_streams, near_stats.clone());
    let far_table = FlowTable::new(0, 8, far_peer_takes_streams, far_stats.clone());
    tokio::spawn(pump_datagrams(near.clone(), near_table.clone()));
    tokio::spawn(pump_datagrams(far.clone(), far_table.clone()));

    // The flow's stream; one byte stands for the protocol's StreamOpen (a
    // QUIC stream reaches the peer with its first byte), and the answer
    // for its StreamReply, so no payload frame follows it in one read.
    let flow = near_table.register(None).unwrap();
    let mut bi = near.open_bi().await.unwrap();
    bi.send
        .write_chunk(bytes::Bytes::from_static(b"o"))
        .await
        .unwrap();
    let mut far_bi = far.accept_bi().await.unwrap();
    assert_eq!(&far_bi.recv.read_chunk().await.unwrap().unwrap()[..], b"o");
    far_bi
        .send
        .write_chunk(bytes::Bytes::from_static(b"k"))
        .await
        .unwrap();
    assert_eq!(&bi.recv.read_chunk().await.unwrap().unwrap()[..], b"k");

    let far_flow = far_table.register(Some(flow.id)).unwrap();
    let mut unserved = None;
    if serve {
        let target = relay_transport::udp::connect_target(udp_echo().await, None, 0)
            .await
            .unwrap();
        tokio::spawn(serve_target(
            far_bi,
            far.clone(),
            far_flow,
            target,
            Duration::from_secs(30),
            relay_transport::udp::never_stale(),
            far_stats,
        ));
    } else {
        unserved = Some(far_bi);
    }
    Near {
        conn: near,
        flow,
        bi,
        stats: near_stats,
        frames: StreamPayloads::default(),
        _unserved: unserved,
        _endpoints: endpoints,
    }
}

#[tokio::test]
async fn payloads_too_large_for_a_datagram_travel_whole_on_the_flow_stream() {
    let mut near = flow(true, true, true).await;
    let max = max_payload(&near.conn);
    assert!(max > 1000 && max < 1500, "datagram payload limit {max}");

    let small = vec![b's'; 100];
    near.send(&small).await;
    assert_eq!(near.answer().await, (false, small));

    // One byte over this side's limit: on the stream. The far side's
    // limit may differ (each side's datagram size depends on what its peer
    // accepts and on its own path MTU estimate), so its answer may come
    // either way, but whole.
    // (Read again: path-MTU discovery raises it as the connection runs;
    // on this single-threaded runtime nothing changes it before the send.)
    let max = max_payload(&near.conn);
    let edge: Vec<u8> = (0..=max).map(|i| (i % 251) as u8).collect();
    near.send(&edge).await;
    assert!(
        near.answer().await.1 == edge,
        "{}-byte answer differs",
        max + 1
    );
    // Well over both limits, up to the largest UDP payload over IPv4
    // (65,535 - 20 - 8): on the stream both ways.
    for len in [3000, 65_507] {
        let big: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        near.send(&big).await;
        let (on_stream, back) = near.answer().await;
        assert!(on_stream, "{len}-byte answer came as a datagram");
        assert_eq!(back.len(), len);
        assert!(back == big, "{len}-byte answer differs");
    }
    assert_eq!(near.stats.stream_payloads.load(Relaxed), 3);
    assert_eq!(near.stats.dropped_oversize.load(Relaxed), 0);

    // A datagram sent after them still arrives.
    near.send(b"after").await;
    assert_eq!(near.answer().await, (false, b"after".to_vec()));
}

#[tokio::test]
async fn towards_an_older_peer_they_are_dropped_and_counted() {
    let mut near = flow(false, true, true).await;
    near.send(&vec![b'x'; 3000]).await;
    assert_eq!(near.stats.dropped_oversize.load(Relaxed), 1);
    assert_eq!(near.stats.stream_payloads.load(Relaxed), 0);
    // Nothing went out for it, and the flow still works.
    near.send(b"small").await;
    assert_eq!(near.answer().await, (false, b"small".to_vec()));
}

#[tokio::test]
async fn a_peer_that_stops_reading_the_flow_ends_it_within_the_bound() {
    let mut near = flow(true, true, false).await;
    // The stream's flow-control window (1 MiB by default) takes the first
    // ones; then a write waits for credit that never comes, for at most
    // STREAM_PAYLOAD_WRITE_LIMIT.
    let big = vec![b'z'; 65_507];
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let stalled_after = loop {
        let t = tokio::time::Instant::now();
        match near.try_send(&big).await {
            Ok(()) => sent += 1,
            Err(StreamStalled) => break t.elapsed(),
        }
        assert!(
            sent < 1000,
            "1,000 payloads accepted by a peer that reads nothing"
        );
    };
    assert!(sent >= 1, "not even the first payload fitted the window");
    assert!(
        stalled_after >= STREAM_PAYLOAD_WRITE_LIMIT
            && stalled_after < STREAM_PAYLOAD_WRITE_LIMIT * 3,
        "stalled after {stalled_after:?}"
    );
    assert_eq!(near.stats.stream_payload_stalls.load(Relaxed), 1);
    assert_eq!(near.stats.stream_payloads.load(Relaxed), sent);
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A burst larger than the connection's datagram send queue
/// (`quic::DATAGRAM_SEND_BUFFER`, 128 KiB) queued at once, with no chance
/// for the connection to send in between (this runtime has one thread and
/// the loop never yields): what the queue cannot hold is dropped, and every
/// drop is counted as `queue_full`; the burst's tail still arrives.
#[tokio::test]
async fn a_burst_past_the_datagram_queue_is_counted_not_silent() {
    let mut near = flow(true, true, true).await;
    let payload = vec![b'b'; 1000];
    let burst = 1000;
    for _ in 0..burst {
        near.send(&payload).await;
    }
    let dropped = near.stats.dropped_queue_full.load(Relaxed);
    // About 128 KiB of ~1 KiB datagrams fit: the rest of the 1,000 were
    // dropped (quinn drops the oldest; each counted once).
    let fit = relay_transport::quic::DATAGRAM_SEND_BUFFER / payload.len();
    assert!(
        dropped >= (burst - fit - 10) as u64 && dropped < burst as u64,
        "{dropped} of {burst} counted as dropped; about {fit} fit"
    );
    // The newest queued ones go out and are echoed.
    let (on_stream, answer) = near.answer().await;
    assert!(!on_stream && answer == payload);
}

/// A payload sent after the tunnel connection ended (a flow task that has
/// not yet seen the end) is counted as `closed`, not as a full queue: a
/// `queue_full` count is the operator's sign of a congested uplink, and a
/// session ending must not raise it.
#[tokio::test]
async fn a_send_after_the_connection_ended_is_counted_closed() {
    let mut near = flow(true, true, true).await;
    near.conn.close(0, "test");
    let payload = vec![b'c'; 100];
    near.send(&payload).await;
    assert_eq!(near.stats.dropped_closed.load(Relaxed), 1);
    assert_eq!(near.stats.dropped_queue_full.load(Relaxed), 0);
    let metrics = near.stats.render_prometheus("edge");
    assert!(
        metrics.contains("edge_udp_dropped_total{reason=\"closed\"} 1"),
        "{metrics}"
    );
}
