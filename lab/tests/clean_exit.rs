//! What a pod's open connections see when the edge-client exits cleanly
//! (a rollout's old pod, `kubectl delete`), network-namespace lab.
//!
//! Captured connections and flows outlive the capture table: their
//! conntrack entries still send their packets to the capture address on
//! `lo`. Capture used to remove that address on exit, and then
//! - a captured TCP connection's client hung: the exiting process's socket
//!   could not send its FIN or reset from an address the node no longer
//!   had, and the client's own segments were forwarded by the default
//!   route;
//! - a captured UDP flow's packets left by the default route too, past the
//!   held refusals (`hold_after_exit`), unanswered and unrefused.
//!
//! The address now stays until the next start: the TCP client reads the
//! end of its connection, and the UDP client's next datagram is refused
//! (ICMP port unreachable: no listener any more), both at once. The next
//! start removes it even when configured with another address.
//!
//! Run: `REQUIRE_LAB=1 cargo test -p relay-lab --test clean_exit`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use relay_lab::netns::{self, Role};
use relay_lab::scenario::{
    echo_service, edge_config_in, netns_start, relay_config_in, sa, services, start_edge,
    start_relay, within, DNS, ECHO, HTTP,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long each side may take to see the end once the edge is gone.
const BOUND: Duration = Duration::from_secs(3);

#[test]
fn a_clean_exit_ends_captured_connections_and_flows_at_once() -> Result<()> {
    let Some((_t0, lab, pki)) = netns_start("clean exit")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Cpod2, "cpod2")?,
        echo_service(&lab, Role::Cpod2)?,
    ];
    let _relay = start_relay(&lab, relay_config_in(&lab, &pki)?)?;
    let mut cfg = edge_config_in(&lab, &pki, 1)?;
    if let Some(c) = cfg.capture.as_mut() {
        c.hold_after_exit = Duration::from_secs(30);
    }
    let edge = start_edge(&lab, 1, cfg.clone())?;
    let web = sa(netns::CPOD2_IP, HTTP);
    within(Duration::from_secs(5), || {
        Ok(relay_lab::scenario::http_from(&lab, Role::Epod1, web)
            .is_ok_and(|b| b.contains("cpod2")))
    })
    .context("epod1 → cpod2 once captured")?;

    // In epod1: a TCP connection to cpod2's echo and a connected UDP
    // socket to its resolver, both captured and working, then held open
    // across the edge's exit.
    let (opened_tx, opened) = mpsc::channel::<Result<()>>();
    let (stopped, stopped_rx) = mpsc::channel::<()>();
    let client = lab.spawn_in(Role::Epod1, move || async move {
        let echo = sa(netns::CPOD2_IP, ECHO);
        let mut tcp = tokio::net::TcpStream::connect(echo).await?;
        tcp.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(BOUND, tcp.read_exact(&mut buf)).await??;
        ensure!(&buf == b"ping", "echo answered {buf:?}");
        let udp = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        udp.connect(sa(netns::CPOD2_IP, DNS)).await?;
        udp.send(b"q1").await?;
        let mut ans = [0u8; 512];
        let n = tokio::time::timeout(BOUND, udp.recv(&mut ans)).await??;
        let said = String::from_utf8_lossy(&ans[..n]).to_string();
        ensure!(said.contains("cpod2"), "resolver answered {said}");
        let _ = opened_tx.send(Ok(()));
        tokio::task::spawn_blocking(move || stopped_rx.recv()).await??;

        let t = Instant::now();
        let tcp_end = match tokio::time::timeout(BOUND, tcp.read(&mut buf)).await {
            Ok(Ok(0)) => format!("end of stream after {:?}", t.elapsed()),
            Ok(Ok(n)) => return Err(anyhow!("{n} bytes after the edge left")),
            Ok(Err(e)) => format!("{} after {:?}", e.kind(), t.elapsed()),
            Err(_) => return Err(anyhow!("TCP: nothing within {BOUND:?} of the edge's exit")),
        };
        let t = Instant::now();
        udp.send(b"q2").await?;
        let udp_end = match tokio::time::timeout(BOUND, udp.recv(&mut ans)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                format!("refused after {:?}", t.elapsed())
            }
            Ok(Err(e)) => return Err(anyhow!("UDP: {e} instead of a refusal")),
            Ok(Ok(n)) => {
                return Err(anyhow!(
                    "UDP answered after the edge left: {}",
                    String::from_utf8_lossy(&ans[..n])
                ))
            }
            Err(_) => return Err(anyhow!("UDP: nothing within {BOUND:?} of the edge's exit")),
        };
        Ok((tcp_end, udp_end))
    });
    opened
        .recv_timeout(Duration::from_secs(10))
        .context("epod1's connections never opened")??;

    edge.stop()?;
    let left = lab.exec(Role::Edge1, &["ip", "-4", "addr", "show", "dev", "lo"])?;
    ensure!(
        left.contains("169.254.70.1/32"),
        "the capture address left with the edge: {left}"
    );
    let _ = stopped.send(());
    let (tcp_end, udp_end) = client
        .join()
        .map_err(|_| anyhow!("epod1's client panicked"))??;
    eprintln!("clean exit: held TCP connection: {tcp_end}; UDP flow: {udp_end}");

    // The next start, configured with another capture address, removes
    // the one the last run kept (found by its label), not only its own.
    let moved: std::net::Ipv4Addr = "169.254.70.2".parse()?;
    if let Some(c) = cfg.capture.as_mut() {
        c.redirect_address = moved;
    }
    let _edge = start_edge(&lab, 1, cfg)?;
    let now = lab.exec(Role::Edge1, &["ip", "-4", "addr", "show", "dev", "lo"])?;
    ensure!(
        now.contains("169.254.70.2/32") && !now.contains("169.254.70.1/32"),
        "after a start with capture.redirect_address {moved}: {now}"
    );
    Ok(())
}
