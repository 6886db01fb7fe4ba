//! A CONNECT client that vanishes after the 200 (its host dies, its NAT
//! forgets it: no FIN, no RST) used to hold its relay task, fd, stream and
//! CONNECT permit for as long as the target stayed open, forever with an
//! idle echo service. Accepted CONNECT sockets now have TCP keep-alive
//! (probes from 10 s of silence, every 5 s, 3 unanswered ones end it):
//! the relay frees all of it about 25 s after the client vanished (no
//! `TCP_USER_TIMEOUT`, which would also reset a client that only stops
//! reading). Network-namespace lab (the client's link
//! is taken down, which loopback cannot do); needs root, skips otherwise
//! (`REQUIRE_LAB=1` fails instead).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    echo_service, edge_config, lab_pki, launch, relay_config, sa, session, start_edge, within,
    CONNECT_PORT, ECHO,
};
use relay_server::Relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn a_vanished_connect_client_frees_its_permit() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED halfopen: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _echo = echo_service(&lab, Role::Epod1)?;
    let cfg = relay_config(&pki)?;
    let max = cfg.limits.max_connect_connections;
    let (tx, rx) = std::sync::mpsc::channel();
    let _relay = launch(&lab, Role::Relay, "relay", move |ready, stop| async move {
        let relay = Relay::spawn(cfg).await?;
        let _ = tx.send(relay.shared().clone());
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        relay.shutdown(Duration::from_secs(2)).await;
        Ok(())
    })?;
    let shared = rx.recv_timeout(Duration::from_secs(5))?;
    let _edge = start_edge(&lab, 1, edge_config(&pki, 1)?)?;
    within(Duration::from_secs(10), || {
        Ok(session(&lab, "edge1")?.is_some())
    })
    .context("edge1 not registered")?;

    // The client, on the apiserver host: CONNECT, one echo, then idle.
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let target = sa(netns::edge_pod_ip(1), ECHO).to_string();
    let _client = lab.spawn_in(Role::Apiserver, move || async move {
        let mut s = relay_lab::connect_via(sa(netns::RELAY_LAN_IP, CONNECT_PORT), &target).await?;
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await?;
        let _ = up_tx.send(());
        // Held, idle, until the link under it is gone (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(90), s.read(&mut b)).await;
        anyhow::Ok(())
    });
    up_rx
        .recv_timeout(Duration::from_secs(15))
        .context("the CONNECT tunnel did not come up")?;
    let held = || shared.connect_permits.available_permits() < max;
    anyhow::ensure!(held(), "no CONNECT permit held while the tunnel is up");

    // The client's host disappears: nothing more comes from it. A second
    // first, so its acknowledgement of the echo (delayed ACK) has left: a
    // client that vanishes with data unacknowledged is given up by the
    // kernel's retransmission limit instead (about 15 minutes: no
    // `TCP_USER_TIMEOUT` on CONNECT sockets, see
    // `relay_transport::tcp::tune_listener`), which this test does not
    // wait for.
    std::thread::sleep(Duration::from_secs(1));
    lab.exec(Role::Apiserver, &["ip", "link", "set", "lan0", "down"])?;
    let t0 = Instant::now();
    let freed = within(Duration::from_secs(45), || {
        Ok(!held()
            && shared
                .metrics
                .streams_open
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0)
    });
    let took = freed.with_context(|| {
        format!(
            "permit still held {:?} after the client vanished",
            t0.elapsed()
        )
    })?;
    eprintln!("halfopen: permit and stream freed {took:?} after the client vanished");
    // Keep-alive (10 s of silence, then 3 probes 5 s apart: 25 s from
    // the last packet, a little before the link went down), plus polling.
    assert!(took <= Duration::from_secs(40), "took {took:?}");
    Ok(())
}
