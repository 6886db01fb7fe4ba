//! A relay that crashed and restarted on the same address tells every edge
//! at once: real QUIC endpoints on loopback (mutual TLS with the dev PKI).
//!
//! 150 connections are established to a relay endpoint, which then dies
//! without a word (its runtime is shut down, so no CONNECTION_CLOSE
//! leaves). A new endpoint with the same key binds the same address, and
//! every connection sends one packet. Each must end with a stateless reset
//! (`ConnectionError::Reset`), all within 2 s. With quinn's default of one
//! reset per 20 ms for the whole endpoint, 150 resets need at least 3 s
//! (and at the scale of `loadtest replicas`, 1,000 edges took 24 s).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_transport::devcerts::DevPki;
use relay_transport::quic::{client_endpoint, server_endpoint, QuicTuning};

const CONNECTIONS: usize = 150;
const BOUND: Duration = Duration::from_secs(2);

/// Runs a relay endpoint on `addr` in a runtime of its own, accepts
/// `n` connections, reports its address, and on `crash` shuts the runtime
/// down before anything is closed: the connections' state vanishes with
/// no CONNECTION_CLOSE sent, as in a SIGKILL.
fn crashing_relay(
    pki: &DevPki,
    n: usize,
    addr_tx: std::sync::mpsc::Sender<SocketAddr>,
    crash: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    let material = pki.relay_material().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let server = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &material,
            &QuicTuning::relay_default(),
            false,
        )
        .unwrap();
        addr_tx.send(server.local_addr().unwrap()).unwrap();
        // Spawned, so the endpoint is driven while this thread waits for
        // the crash signal below.
        let accepting = rt.spawn({
            let server = server.clone();
            async move {
                let mut conns = Vec::new();
                while conns.len() < n {
                    let c = server.accept().await.unwrap().await.unwrap();
                    conns.push(c);
                }
                conns
            }
        });
        let conns = rt.block_on(accepting).unwrap();
        let _ = crash.recv();
        rt.shutdown_background();
        drop(conns);
        drop(server);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resets_every_connection_at_once() {
    relay_transport::tls::install_default_provider();
    let pki = DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel();
    let old = crashing_relay(&pki, CONNECTIONS, addr_tx, crash_rx);
    let addr = addr_rx.recv().unwrap();

    let client = client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &pki.node_material("edge-a").unwrap(),
        &QuicTuning::default(),
        0,
    )
    .unwrap();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let c = client.connect(addr, "relay.test").unwrap();
        conns.push(
            tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .unwrap()
                .unwrap(),
        );
    }

    crash_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || old.join().unwrap())
        .await
        .unwrap();
    let new = server_endpoint(
        addr,
        &pki.relay_material().unwrap(),
        &QuicTuning::relay_default(),
        false,
    )
    .expect("the crashed relay's address is free again");

    let t0 = Instant::now();
    let mut ends = tokio::task::JoinSet::new();
    for c in conns {
        ends.spawn(async move {
            // One packet towards the restarted relay.
            if let Ok((mut s, _r)) = c.open_bi().await {
                let _ = s.write_all(b"x").await;
            }
            c.closed().await
        });
    }
    let mut resets = 0;
    while let Some(end) = tokio::time::timeout(BOUND * 3, ends.join_next())
        .await
        .expect("a connection was never told")
    {
        match end.unwrap() {
            quinn::ConnectionError::Reset => resets += 1,
            other => panic!("ended otherwise than by a stateless reset: {other}"),
        }
    }
    let took = t0.elapsed();
    eprintln!("{resets} of {CONNECTIONS} connections reset {took:?} after the restart");
    assert_eq!(resets, CONNECTIONS);
    assert!(
        took <= BOUND,
        "{CONNECTIONS} connections told of the restart in {took:?}, over {BOUND:?}"
    );
    drop(new);
}
