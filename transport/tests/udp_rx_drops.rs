//! Datagrams a QUIC connection received but dropped before they were read
//! are counted, over a real QUIC connection on loopback (mutual TLS with
//! the dev PKI): quinn keeps 1 MiB of received datagrams and drops the
//! oldest past it without a count of its own.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_protocol::datagram::encode_datagram;
use relay_transport::conn::TunnelConn;
use relay_transport::quic::QuicTuning;
use relay_transport::udp::{pump_datagrams, FlowTable, UdpStats};

/// Datagrams sent while nothing reads them: about 3 MiB, three times
/// what the receiving side buffers.
const SENT: u64 = 3_000;
const PAYLOAD: usize = 1_000;

/// 3,000 datagrams of 1,000 bytes arrive while the receiving side reads
/// none; then its pump reads what quinn kept (for a flow it does not
/// know: counted as such) and counts what was dropped, what did not fit
/// in the 1 MiB buffer, once it has read up that backlog. A few more,
/// read as they come, change nothing; every datagram received is counted
/// once, read or dropped. A close by the receiving side ends the pump
/// with no drop added.
#[tokio::test]
async fn datagrams_dropped_by_a_full_quic_receive_buffer_are_counted() {
    let (edge, relay, _endpoints) =
        common::quic_pair(&QuicTuning::relay_default(), &QuicTuning::default()).await;
    let TunnelConn::Quic(sender) = &edge else {
        unreachable!("a QUIC pair")
    };
    let payload = vec![5u8; PAYLOAD];
    for _ in 0..SENT {
        // Waits for room in the send queue instead of dropping the oldest.
        sender
            .send_datagram_wait(encode_datagram(7, &payload))
            .await
            .expect("send");
    }
    // Until the receiving side's count stops moving (loopback may lose a
    // few; the count, not SENT, is what must be accounted for).
    let t = Instant::now();
    let mut received = relay.datagram_frames_received().expect("QUIC");
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = relay.datagram_frames_received().expect("QUIC");
        if now == received && now > 0 {
            break;
        }
        received = now;
        assert!(t.elapsed() < Duration::from_secs(10), "still arriving");
    }
    assert!(received > SENT * 9 / 10, "{received} of {SENT} arrived");

    let stats = Arc::new(UdpStats::default());
    let table = FlowTable::new(0, 64, false, stats.clone());
    let pump = tokio::spawn(pump_datagrams(relay.clone(), table));
    // The pump reads what was kept, and counts what was not once it has
    // read up the backlog (however many that was).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = stats.dropped_unknown_flow.load(Relaxed);
    let dropped = stats.dropped_queue_full.load(Relaxed);
    eprintln!("received {received}, kept and read {kept}, counted dropped {dropped}");
    assert_eq!(
        dropped,
        received - kept,
        "counted while up, after the backlog"
    );
    // What fits in 1 MiB (each datagram's bookkeeping included) was read.
    let fits = (1u64 << 20) / (PAYLOAD as u64 + 4);
    assert!(kept <= fits, "kept {kept}, at most {fits} fit");
    assert!(kept > fits / 2, "kept {kept}: the buffer was not used");
    // A few more, each read as it comes: nothing dropped, nothing counted
    // twice.
    for _ in 0..40 {
        sender
            .send_datagram_wait(encode_datagram(7, &payload))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = stats.dropped_unknown_flow.load(Relaxed);
    assert_eq!(read, kept + 40);
    assert_eq!(stats.dropped_queue_full.load(Relaxed), dropped);
    assert_eq!(
        read + dropped,
        relay.datagram_frames_received().expect("QUIC"),
        "every datagram received is read or counted dropped"
    );
    // Closed by the receiving side while the peer still sends: the pump
    // ends and adds no drop. (quinn still counts frames that arrive after
    // its own close and buffers none; the pump's last look skips a
    // connection closed on its side for that. Here the pump has ended
    // before they arrive, so this does not show that part.)
    relay.close(0, "done");
    for _ in 0..50 {
        let _ = sender.send_datagram(encode_datagram(7, &payload));
    }
    tokio::time::timeout(Duration::from_secs(10), pump)
        .await
        .expect("the pump ends with the connection")
        .unwrap();
    assert_eq!(
        stats.dropped_queue_full.load(Relaxed),
        dropped,
        "datagrams after our own close are not drops"
    );
}
