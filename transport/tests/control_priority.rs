//! The session's control stream goes ahead of bulk data in our own QUIC
//! send buffers: over a real QUIC connection on loopback (mutual TLS with
//! the dev PKI, the relay's and edge's default tuning but a smaller
//! stream window, see [`STREAM_WINDOW`]), with six streams
//! uploading as fast as they can, a message written on a stream at
//! [`CONTROL_PRIORITY`] arrives before one written just before it on a
//! data stream.
//!
//! Why the comparison and not a time bound: quinn serves streams of equal
//! priority in turn, a frame each, so a message on a data stream waits a
//! round of every busy stream's frames; the control stream's priority puts
//! its frames before all of them. Which message arrives first does not
//! depend on how fast this machine is, so the test holds on a loaded one.
//! The network's own queue is FIFO (see docs/architecture.md, "Liveness"):
//! this shows the part we control.
//!
//! The production code marks the control stream where it is opened
//! (`edge-client/src/dial.rs`) and accepted (`relay-server/src/handshake.rs`)
//! with the same [`SendHalf::set_priority`] call used here.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_transport::conn::{BiStream, RecvHalf, SendHalf, TunnelConn, CONTROL_PRIORITY};
use relay_transport::quic::QuicTuning;

/// Streams uploading at once.
const BULK_STREAMS: usize = 6;
/// The relay side's stream window (its default is 1 MiB). Six uploads
/// then run at most 768 KiB ahead of what the relay side has read, far
/// under the connection's windows (8 MiB), so the two messages are written at once:
/// a write waiting for connection credit would let the connection's driver
/// run between them (and quinn hands freed credit to whichever blocked
/// writer runs first, which on one thread is always a bulk writer). The
/// priority acts on data already written, whatever the windows.
const STREAM_WINDOW: u32 = 128 * 1024;
/// Each bulk write.
const CHUNK: usize = 16 * 1024;
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

/// Where a message arrived: its place among the messages the test waits
/// for (0 first), and the bulk bytes received by then.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    place: u64,
    bulk: u64,
}

/// Reads one message of `len` bytes and says where it arrived. The reader
/// tasks are woken in the order quinn takes their frames from the packets
/// and run in that order on one thread, so `place` is the order in which
/// the sender sent the messages even when both come in one batch of
/// packets (the bulk count cannot tell those apart).
async fn arrival(
    mut recv: RecvHalf,
    len: usize,
    bulk: Arc<AtomicU64>,
    places: Arc<AtomicU64>,
) -> Arrival {
    let mut got = 0;
    while got < len {
        got += recv
            .read_chunk()
            .await
            .unwrap()
            .expect("stream ended")
            .len();
    }
    Arrival {
        place: places.fetch_add(1, Relaxed),
        bulk: bulk.load(Relaxed),
    }
}

/// Writes a message on a stream at `control_priority` right after one on
/// a data stream, with [`BULK_STREAMS`] uploads keeping quinn's send
/// buffers full; returns where each arrived: (data stream's, control's).
async fn race(control_priority: Option<i32>) -> (Arrival, Arrival) {
    let (edge, relay, _endpoints) = common::quic_pair(&QuicTuning {
        stream_window: STREAM_WINDOW,
        ..QuicTuning::relay_default()
    })
    .await;
    let (mut control, control_recv) = open(&edge, &relay).await;
    if let Some(p) = control_priority {
        control.set_priority(p);
    }
    let (mut probe, probe_recv) = open(&edge, &relay).await;

    // The uploads, and their reader on the relay side counting every byte.
    let bulk = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..BULK_STREAMS {
        let (mut send, mut recv) = open(&edge, &relay).await;
        let chunk = Bytes::from(vec![0x5a; CHUNK]);
        tasks.spawn(async move { while send.write_chunk(chunk.clone()).await.is_ok() {} });
        let bulk = bulk.clone();
        tasks.spawn(async move {
            while let Ok(Some(c)) = recv.read_chunk().await {
                bulk.fetch_add(c.len() as u64, Relaxed);
            }
        });
    }
    // Let the uploads fill the connection's windows and send buffers.
    let start = bulk.load(Relaxed);
    while bulk.load(Relaxed) < start + 4 * 1024 * 1024 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let places = Arc::new(AtomicU64::new(0));
    let probe_at = tokio::spawn(arrival(probe_recv, 1024, bulk.clone(), places.clone()));
    let control_at = tokio::spawn(arrival(control_recv, 1024, bulk.clone(), places));
    // Both written with no await point between them that could let the
    // connection's driver send the first before the second is queued (a
    // current-thread runtime runs nothing else while these do not wait).
    probe.write_chunk(Bytes::from(vec![1; 1024])).await.unwrap();
    control
        .write_chunk(Bytes::from(vec![2; 1024]))
        .await
        .unwrap();
    let (p, c) = (probe_at.await.unwrap(), control_at.await.unwrap());
    tasks.abort_all();
    edge.close(0, "done");
    (p, c)
}

#[tokio::test(flavor = "current_thread")]
async fn the_control_stream_overtakes_bulk_data_queued_before_it() {
    let (probe, control) = tokio::time::timeout(LIMIT, race(Some(CONTROL_PRIORITY)))
        .await
        .expect("messages arrived within the bound");
    // The data stream's message waited its turn behind the uploads; the
    // control message, written after it, did not.
    assert!(
        control.place < probe.place,
        "the control message arrived after the data stream's, written just before it \
         (control {control:?}, data stream {probe:?}): its priority did not put it ahead"
    );
    eprintln!(
        "bulk bytes received before: control {}, data stream {}",
        control.bulk, probe.bulk
    );
}

/// The same race with the control stream left at the data streams'
/// priority: it keeps its place behind the message written before it.
/// Shows the test above measures the priority and not an accident of
/// scheduling.
#[tokio::test(flavor = "current_thread")]
async fn without_the_priority_the_later_message_stays_behind() {
    let (first, second) = tokio::time::timeout(LIMIT, race(None))
        .await
        .expect("messages arrived within the bound");
    assert!(
        first.place < second.place,
        "at equal priority the later message arrived first (first {first:?}, second {second:?})"
    );
    eprintln!(
        "bulk bytes received before: first {}, second {}",
        first.bulk, second.bulk
    );
}
