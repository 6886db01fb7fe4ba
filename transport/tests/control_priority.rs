//! The session's control stream goes ahead of bulk data in our own QUIC
//! send buffers: over a real QUIC connection on loopback (mutual TLS with
//! the dev PKI, the relay's and edge's default tuning), 64 KiB is written
//! on each of 24 data streams, then a message on a data stream, then one
//! on a stream at [`CONTROL_PRIORITY`], all before the connection sends
//! any of it; the control message is the first thing that arrives, while
//! the data stream's message comes after the first frame of every bulk
//! stream. At equal priority the control message keeps its place, last.
//!
//! Why places and not a time bound: quinn serves streams of equal
//! priority in turn, a frame each, so a message on a data stream waits a
//! round of every busy stream's frames; the control stream's priority puts
//! its frames before all of them. The order does not depend on how fast
//! this machine is, so the test holds on a loaded one. The network's own
//! queue is FIFO (see docs/architecture.md, "Liveness"): this shows the
//! part we control.
//!
//! The production code marks the control stream where it is opened
//! (`edge-client/src/dial.rs`) and accepted (`relay-server/src/handshake.rs`)
//! with the same [`SendHalf::set_priority`] call used here; this test does
//! not run those call sites.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_transport::conn::{BiStream, RecvHalf, SendHalf, TunnelConn, CONTROL_PRIORITY};
use relay_transport::quic::QuicTuning;

/// Data streams with bulk data written before the two messages (under the
/// 32 streams an edge may open at first, with the two others).
const BULK_STREAMS: u64 = 24;
/// Bulk data written on each: within a fresh stream's credit (1 MiB), and
/// all of them within the connection's (8 MiB), so every write is taken at
/// once and nothing is sent before all are written.
const BULK: usize = 64 * 1024;
/// The whole test's bound.
const LIMIT: Duration = Duration::from_secs(30);

/// Opens a stream and makes it known to the peer (a stream exists there
/// only once data on it arrived): one byte, read on the far side.
async fn open(edge: &TunnelConn, relay: &TunnelConn) -> (SendHalf, RecvHalf) {
    let BiStream { mut send, .. } = edge.open_bi().await.unwrap();
    send.write_chunk(Bytes::from_static(b"o")).await.unwrap();
    let BiStream { mut recv, .. } = relay.accept_bi().await.unwrap();
    let first = recv.read_chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"o");
    (send, recv)
}

/// Waits for the next data on `recv` and returns its place among the
/// streams' first arrivals (0 first), then reads the rest of `len` bytes.
/// The reader tasks are woken in the order quinn takes their frames from
/// the packets and run in that order on one thread, so the places are the
/// order in which the sender sent the streams' first frames, even within
/// one batch of packets.
async fn first_arrival(mut recv: RecvHalf, len: usize, places: Arc<AtomicU64>) -> u64 {
    let mut got = recv
        .read_chunk()
        .await
        .unwrap()
        .expect("stream ended")
        .len();
    let place = places.fetch_add(1, Relaxed);
    while got < len {
        got += recv
            .read_chunk()
            .await
            .unwrap()
            .expect("stream ended")
            .len();
    }
    place
}

/// Writes [`BULK`] on each of [`BULK_STREAMS`] data streams, then a
/// message on a data stream, then one on a stream at `control_priority`
/// (the data streams' when `None`), with no await point between them that
/// lets the connection's driver run (one thread); returns where the first
/// frame of each message arrived among all the streams': (data stream's,
/// control's).
async fn race(control_priority: Option<i32>) -> (u64, u64) {
    let (edge, relay, _endpoints) =
        common::quic_pair(&QuicTuning::relay_default(), &QuicTuning::default()).await;
    let (mut control, control_recv) = open(&edge, &relay).await;
    if let Some(p) = control_priority {
        control.set_priority(p);
    }
    let (mut probe, probe_recv) = open(&edge, &relay).await;
    let places = Arc::new(AtomicU64::new(0));
    let mut bulk = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..BULK_STREAMS {
        let (send, recv) = open(&edge, &relay).await;
        bulk.push(send);
        readers.spawn(first_arrival(recv, BULK, places.clone()));
    }
    let probe_at = tokio::spawn(first_arrival(probe_recv, 1024, places.clone()));
    let control_at = tokio::spawn(first_arrival(control_recv, 1024, places));
    // Let every reader wait on its stream before anything is sent.
    tokio::task::yield_now().await;

    for send in &mut bulk {
        send.write_chunk(Bytes::from(vec![0x5a; BULK]))
            .await
            .unwrap();
    }
    probe.write_chunk(Bytes::from(vec![1; 1024])).await.unwrap();
    control
        .write_chunk(Bytes::from(vec![2; 1024]))
        .await
        .unwrap();
    let (p, c) = (probe_at.await.unwrap(), control_at.await.unwrap());
    while let Some(r) = readers.join_next().await {
        r.unwrap();
    }
    edge.close(0, "done");
    (p, c)
}

#[tokio::test(flavor = "current_thread")]
async fn the_control_stream_overtakes_bulk_data_queued_before_it() {
    let (probe, control) = tokio::time::timeout(LIMIT, race(Some(CONTROL_PRIORITY)))
        .await
        .expect("messages arrived within the bound");
    // The control message, written last, was sent first; the data
    // stream's waited its turn behind every bulk stream.
    assert_eq!(
        control, 0,
        "the control message was not the first to arrive (data stream's message at {probe})"
    );
    assert!(
        probe > BULK_STREAMS,
        "the data stream's message arrived at {probe}, before some bulk stream's first frame"
    );
}

/// The same race with the control stream left at the data streams'
/// priority: it keeps its place, last. Shows the test above measures the
/// priority and not an accident of scheduling.
#[tokio::test(flavor = "current_thread")]
async fn without_the_priority_the_later_message_stays_behind() {
    let (probe, control) = tokio::time::timeout(LIMIT, race(None))
        .await
        .expect("messages arrived within the bound");
    assert_eq!(
        (probe, control),
        (BULK_STREAMS, BULK_STREAMS + 1),
        "at equal priority the streams' first frames go in the order written"
    );
}
