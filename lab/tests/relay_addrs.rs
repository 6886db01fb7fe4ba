//! The relay's addresses kept across an edge restart (`relay_addrs_file`),
//! on loopback with a real relay and real edge clients: an edge restarted
//! while DNS is down (a reboot after a site power cut, with the site's or
//! the carrier's resolver still out) dials the addresses its relay's name
//! last resolved to, instead of failing every attempt until DNS returns.
//!
//! The first run resolves `localhost` and must save what it got. The
//! restart is then played with a name under `.invalid` (RFC 6761: it never
//! resolves), the file naming it as the first run would have: with the
//! file the edge connects, without it the edge never does.

use relay_lab::TempDir;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::traffic::eventually;
use relay_lab::{edge_config, Lab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_while_dns_is_down_dials_the_saved_addresses() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    for e in std::mem::take(&mut lab.edges) {
        e.shutdown().await;
    }
    let port = lab.relay.quic_addr().port();
    let dir = TempDir::new("relay-addrs")?;
    let file = dir.path().join("relay-addrs.json");
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.relay_addrs_file = Some(file.clone());

    // First run: the name resolves; what it resolved to is saved.
    cfg.relay = format!("localhost:{port}");
    let e = EdgeClient::spawn(cfg.clone());
    e.wait_connected(Duration::from_secs(10))
        .await
        .context("first run connects")?;
    let want = format!("127.0.0.1:{port}");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    let name = format!("\"localhost:{port}\"");
    let saved = eventually(Duration::from_secs(5), || {
        let text = read();
        text.contains(&name) && text.contains(&want)
    })
    .await;
    ensure!(saved, "the resolved addresses not saved: {:?}", read());
    let saved = read();
    e.shutdown().await;

    // The restart, the name no longer resolving: the saved addresses
    // stand in.
    cfg.relay = format!("relay.invalid:{port}");
    std::fs::write(
        &file,
        saved.replace(&name, &format!("\"relay.invalid:{port}\"")),
    )?;
    let e = EdgeClient::spawn(cfg.clone());
    e.wait_connected(Duration::from_secs(15))
        .await
        .with_context(|| format!("restart with saved addresses: {:?}", e.state()))?;
    e.shutdown().await;

    // The same restart without the file never connects.
    cfg.relay_addrs_file = None;
    let e = EdgeClient::spawn(cfg);
    let connected = e.wait_connected(Duration::from_secs(6)).await;
    let state = e.state();
    e.shutdown().await;
    ensure!(connected.is_none(), "connected without saved addresses");
    ensure!(
        matches!(state, EdgeState::Connecting { .. }),
        "still trying: {state:?}"
    );
    lab.stop().await;
    Ok(())
}

/// Aborts the stand-in's tasks when the test ends, however it ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The edge's order key for `addr` (FNV-1a of its node name and the
/// address, as `edge-client/src/dial/addrs.rs` `dial_order` takes them):
/// the lower key is dialled first.
fn order_key(node: &str, addr: std::net::SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0]).chain(addr.to_string().into_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A relay name with two addresses, one of them recycled: it accepts TCP
/// on the relay's port and closes at once (an ingress, a load balancer with
/// no backends) and answers UDP with garbage. The edge's order puts that
/// one first; every attempt there is answered (no silence), which used to
/// keep the edge on it for ever. It now moves on after three such
/// attempts and gets its session at the healthy address.
///
/// Time budget: about 13 s expected (three attempts of 3 s each, QUIC's
/// fallback timer, plus 3.5 s of backoff), bounded at 30 s; loopback only
/// (127.0.0.0/8), no namespaces needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_leaves_a_relay_address_that_answers_but_is_no_relay() -> Result<()> {
    const BOUND: Duration = Duration::from_secs(30);
    let mut lab = Lab::start(1, |_| {}).await?;
    for e in std::mem::take(&mut lab.edges) {
        e.shutdown().await;
    }
    let real = lab.relay.quic_addr();
    let port = real.port();
    let node = relay_lab::edge_name(0);
    // A loopback address the edge's order puts before the relay's, from
    // 127.0.0.0/16 (the relay's port is random: among 253 addresses it
    // was once ordered first, in about one run of 250).
    let bogus = (0..=255u8)
        .flat_map(|x| (1..=254u8).map(move |y| std::net::SocketAddr::from(([127, 0, x, y], port))))
        .filter(|&a| a != real)
        .find(|&a| order_key(&node, a) < order_key(&node, real))
        .context("no loopback address ordered first")?;

    let tcp = tokio::net::TcpListener::bind(bogus).await?;
    let udp = tokio::net::UdpSocket::bind(bogus).await?;
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let _stand_in = AbortOnDrop(vec![
        tokio::spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                drop(s);
                let _ = seen_tx.send(());
            }
        }),
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(b"HTTP/1.1 400 Bad Request\r\n\r\n", from).await;
            }
        }),
    ]);

    let dir = TempDir::new("relay-addrs-recycled")?;
    let file = dir.path().join("relay-addrs.json");
    let name = format!("relay.invalid:{port}");
    std::fs::write(
        &file,
        format!(r#"{{"version":1,"names":{{"{name}":["{bogus}","{real}"]}}}}"#),
    )?;
    let mut cfg = edge_config(&lab.pki, 0, real)?;
    cfg.relay = name;
    cfg.relay_addrs_file = Some(file);
    let started = std::time::Instant::now();
    let e = EdgeClient::spawn(cfg);
    let connected = e.wait_connected(BOUND).await;
    let took = started.elapsed();
    let state = e.state();
    e.shutdown().await;
    let answered = seen.try_iter().count();
    eprintln!("session after {took:?}; the recycled address answered {answered} TCP connections");
    ensure!(
        connected.is_some(),
        "no session within {BOUND:?}: {state:?}"
    );
    ensure!(
        answered >= 1,
        "the recycled address was never dialled (not first in the order?)"
    );
    lab.stop().await;
    Ok(())
}
