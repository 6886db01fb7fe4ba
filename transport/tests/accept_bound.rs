//! The capture listeners' concurrency bound, on real loopback sockets:
//! past the bound a connection is reset at once and counted, and a freed
//! permit lets the next one in.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_transport::conn::{accept_bounded, AcceptBound};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn excess_connections_are_reset_fast_and_counted() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let bound = Arc::new(AcceptBound::new(2));
    let stop = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let acceptor = {
        let (bound, stop) = (bound.clone(), stop.clone());
        tokio::spawn(async move {
            // Admitted connections are held (socket and permit) by the test.
            while let Some(held) = accept_bounded(&stop, "test", &l, &bound).await {
                if tx.send(held).await.is_err() {
                    break;
                }
            }
        })
    };
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    let first = rx.recv().await.unwrap();
    let _second = rx.recv().await.unwrap();
    assert_eq!(bound.available(), 0);

    // The third: reset, not left waiting.
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("the excess connection must be answered at once");
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "reset, not closed cleanly nor served"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(bound.refused.load(Relaxed), 1);

    // One ends: its permit goes back, and the next connection is admitted.
    drop(first);
    let _d = TcpStream::connect(addr).await.unwrap();
    let admitted = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("a freed permit admits the next connection");
    assert!(admitted.is_some());
    assert_eq!(bound.refused.load(Relaxed), 1);
    stop.cancel();
    acceptor.await.unwrap();
}
