//! Streams whose local reader stopped do not stop the rest of their QUIC
//! session ([`relay_transport::stall`]): over a real QUIC connection on
//! loopback (mutual TLS with the dev PKI, the relay's and edge's default
//! windows: 1 MiB per stream, 8 MiB per connection), ten streams are
//! spliced by the production `splice` into local TCP connections whose
//! reader never reads (a paused `kubectl logs -f | less`), and the edge
//! uploads into each until it can no more. Ten full stream windows are
//! more than the connection's: before, nothing more moved on the session,
//! on any stream; now an eleventh stream still carries its data.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_transport::conn::BiStream;
use relay_transport::quic::QuicTuning;
use relay_transport::splice::splice;
use relay_transport::stall;
use tokio::net::{TcpSocket, TcpStream};

/// Streams whose reader stops: ten windows of 1 MiB against 8 MiB.
const STALLED: usize = 10;
/// Kernel buffers of the local connections (small, so they fill at once
/// and what is left stays in the tunnel).
const SOCKET_BUFFER: u32 = 16 * 1024;
/// What the eleventh stream carries.
const PROBE_BYTES: usize = 256 * 1024;
/// Bound on the eleventh stream's transfer (a blocked session never
/// completes it).
const PROBE_LIMIT: Duration = Duration::from_secs(15);

/// A local service that accepts connections and never reads them; the
/// accepted sockets are kept open.
async fn paused_reader() -> SocketAddr {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Dials `to` with a small send buffer, as the relay dials a target.
async fn dial(to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(SOCKET_BUFFER).unwrap();
    let s = sock.connect(to).await.unwrap();
    relay_transport::splice::tune_tcp(&s);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_whose_reader_stopped_do_not_stop_the_session() {
    let (edge, relay, _endpoints) =
        common::quic_pair(&QuicTuning::relay_default(), &QuicTuning::default()).await;
    let target = paused_reader().await;

    // The relay side: every stream the edge opens is spliced into a
    // connection to the paused reader.
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..STALLED {
        let BiStream { mut send, recv: _ } = edge.open_bi().await.unwrap();
        uploads.spawn(async move {
            // Writes until the stream's window is full and stays full.
            let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
            while send.write_chunk(chunk.clone()).await.is_ok() {}
        });
        // A stream reaches the relay once data on it does.
        let bi = relay.accept_bi().await.unwrap();
        let local = dial(target).await;
        tokio::spawn(async move { splice(local, &[], bi, &()).await });
    }

    // Let every upload fill its window and every splice wait on its
    // local write past the stall threshold.
    tokio::time::sleep(stall::STALL_AFTER + Duration::from_secs(2)).await;

    // An eleventh stream: its data must still get through.
    let started = Instant::now();
    let probe = async {
        let BiStream { mut send, recv: _ } = edge.open_bi().await.unwrap();
        let writer = tokio::spawn(async move {
            send.write_chunk(Bytes::from(vec![7; PROBE_BYTES]))
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut send).await.unwrap();
            send
        });
        let BiStream { mut recv, send: _ } = relay.accept_bi().await.unwrap();
        let mut got = 0;
        while let Some(c) = recv.read_chunk().await.unwrap() {
            got += c.len();
        }
        let _ = writer.await;
        got
    };
    let got = tokio::time::timeout(PROBE_LIMIT, probe).await;
    let stalled = stall::stalled_now();
    uploads.abort_all();
    edge.close(0, "done");
    assert_eq!(
        got.ok(),
        Some(PROBE_BYTES),
        "the eleventh stream did not carry its {PROBE_BYTES} bytes within {PROBE_LIMIT:?} beside \
         {STALLED} streams whose reader stopped ({stalled} marked stalled)"
    );
    assert_eq!(
        stalled, STALLED as u64,
        "every spliced stream waiting on its reader is marked stalled"
    );
    eprintln!(
        "eleventh stream: {PROBE_BYTES} bytes in {:?} beside {stalled} stalled streams",
        started.elapsed()
    );
}
