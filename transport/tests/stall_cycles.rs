//! Stalls that end and come back do not grow a QUIC session's receive
//! window past its bound ([`relay_transport::stall`]), over a real QUIC
//! connection on loopback. A binary of its own: the windows are recorded
//! per process, and this test's small ones must not reach other tests'
//! connections.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_transport::conn::BiStream;
use relay_transport::quic::QuicTuning;
use relay_transport::stall;

/// A stream that stalls and resumes again and again (a reader paging
/// through `kubectl logs | less`) leaves its session's receive window
/// where one stall puts it: the peer can have at most `conn_window +
/// MAX_STALLED × stream_window` unread on the connection. Before, each
/// resumption lowered the window and the next stall raised it again, and
/// quinn grants a raise at once but takes a lowering out of credit it
/// would grant only as data is read: every cycle gave the peer one more
/// stream window (a review saw 28 MiB buffered against 9 promised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_that_end_and_come_back_do_not_grow_the_window() {
    // Small windows, the same on both sides (the windows are recorded
    // per process): a connection window of one stream window, so the
    // raised window is 25 stream windows and 30 unread streams can show
    // more than that.
    const WINDOW: u32 = 64 * 1024;
    const STREAMS: usize = 30;
    let tuning = QuicTuning {
        stream_window: WINDOW,
        conn_window: WINDOW,
        ..QuicTuning::relay_default()
    };
    let (edge, relay, _endpoints) = common::quic_pair(&tuning, &tuning).await;

    // Uploads on streams the relay accepts and never reads.
    let written = Arc::new(AtomicU64::new(0));
    let mut uploads = tokio::task::JoinSet::new();
    let mut unread = Vec::new();
    for _ in 0..STREAMS {
        let BiStream { mut send, recv: _ } = edge.open_bi().await.unwrap();
        let written = written.clone();
        uploads.spawn(async move {
            let chunk = Bytes::from(vec![0x5a; 4 * 1024]);
            while send.write_chunk(chunk.clone()).await.is_ok() {
                written.fetch_add(chunk.len() as u64, Relaxed);
            }
        });
        unread.push(relay.accept_bi().await.unwrap());
    }
    // Stall and resume, again and again, more times than the cap.
    for _ in 0..3 * stall::MAX_STALLED {
        drop(unread[0].recv.stalled());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the uploads take every byte of credit they were given.
    let mut last = u64::MAX;
    let settled = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Relaxed);
        if now == last || settled.elapsed() > Duration::from_secs(10) {
            break;
        }
        last = now;
    }
    uploads.abort_all();
    edge.close(0, "done");
    let bound = u64::from(WINDOW) * (1 + u64::from(stall::MAX_STALLED));
    let all = u64::from(WINDOW) * STREAMS as u64;
    let got = written.load(Relaxed);
    assert!(
        got <= bound,
        "the edge got {got} bytes written to streams nobody reads; the raised window allows \
         {bound} (its streams could take {all})"
    );
    eprintln!(
        "unread on the session after the cycles: {got} of at most {bound} (streams' room {all})"
    );
}
