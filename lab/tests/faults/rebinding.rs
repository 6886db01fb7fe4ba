//! The NAT rebinding faults (see the list in `faults.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{edge_config, lab_pki, sa, session, within, Table, ECHO};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{echo_relay_edge1, echo_transfer, pattern, secs, timed, wait_progress, write_paced};

/// The address nat1 switches to in the rebinding faults.
const REBOUND_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);

/// Port of the sink on epod1 in the download fault.
const SINK: u16 = 9;

/// Fault 1: NAT rebinding during a long transfer.
///
/// The relay learns the new address from the first packet the edge sends
/// through the NAT after the change; its own packets go to the old mapping
/// and are lost. An edge sending at that moment (echoed data, an ACK of
/// it, a retransmission) moves the session within milliseconds. An edge
/// with nothing unacknowledged and nothing to send, because what the relay
/// sends no longer arrives, stays silent until its QUIC keep-alive PING,
/// which leaves once nothing has arrived for one keep-alive interval. On a
/// loaded machine the echo loop sometimes sits in that state at the fault
/// (measured: 4.5 to 5.9 s in 2 of 5 runs with three busy loops beside,
/// 0.00 to 0.09 s otherwise; in the run traced, what ended the stall was
/// the control ping of the edge's keep-alive tick). So the bound is one
/// keep-alive plus a second of margin, the same bound an idle edge gets,
/// and what docs/architecture.md states.
pub(super) fn nat_rebinding(t: &mut Table) -> Result<()> {
    const TOTAL: u64 = 32 << 20;
    const CHUNK: usize = 64 << 10;
    // 64 KiB every 8 ms: 8 MiB/s, about 4 s in all.
    const PACE: Duration = Duration::from_millis(8);
    let bound = Duration::from_secs(20);
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let (_running, before) = echo_relay_edge1(&lab, &pki)?;
    let moved_bound = edge_config(&pki, 1)?.quic.keepalive + Duration::from_secs(1);
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let target = sa(netns::edge_pod_ip(1), ECHO);
    let xfer = lab.spawn_in(Role::Cpod2, move || {
        echo_transfer(
            target,
            TOTAL,
            CHUNK,
            PACE,
            p,
            bound + Duration::from_secs(10),
        )
    });
    // Mid-transfer: a quarter of the bytes are back.
    wait_progress(&progress, TOTAL / 4, Duration::from_secs(15))?;
    let at_fault = progress.load(Relaxed);
    lab.change_masquerade_addr(1, REBOUND_IP)?;
    let new_prefix = format!("{REBOUND_IP}:");
    let seen = within(Duration::from_secs(10), || {
        Ok(session(&lab, "edge1")?.is_some_and(|s| s.remote_addr.starts_with(&new_prefix)))
    });
    let result = xfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?;
    timed(
        t,
        "NAT rebinding: 32 MiB echo during masquerade change completes byte-exact",
        Some(bound),
        result.map(|r| {
            (
                r.elapsed,
                format!(
                    "fault at {} MiB back; longest stall {}",
                    at_fault >> 20,
                    secs(r.max_stall)
                ),
            )
        }),
    );
    let after = session(&lab, "edge1")?.context("edge1 session gone")?;
    timed(
        t,
        "NAT rebinding: same session, relay sees the new address",
        Some(moved_bound),
        seen.and_then(|d| {
            anyhow::ensure!(
                after.session_id == before.session_id && after.generation == before.generation,
                "session changed: {} gen {} -> {} gen {}",
                before.session_id,
                before.generation,
                after.session_id,
                after.generation
            );
            Ok((
                d,
                format!(
                    "session {} kept; remote_addr {} -> {}",
                    after.session_id, before.remote_addr, after.remote_addr
                ),
            ))
        }),
    );
    Ok(())
}

/// Fault 1b: NAT rebinding during a download (cloud pod → edge pod), twice
/// (away to another address and back). The edge only acknowledges what
/// arrives, so when the relay's packets stop arriving it has nothing of its
/// own to send, and before its stall probe (`edge-client` `liveness::
/// StallProbe`) the download waited for the edge's next QUIC keep-alive
/// PING: up to a whole keep-alive interval (8 s). Now the edge sends a
/// control ping once the flow has stopped dead for one check (1 s), so the
/// receiver never waits more than about two checks. Bound: the longest gap
/// between two reads at the sink, 3 s, over both changes. (Without the
/// probe each change stalls for anything from 0 to 8 s, so both stay under
/// 3 s only about one run in seven.)
pub(super) fn nat_rebinding_download(t: &mut Table) -> Result<()> {
    const TOTAL: u64 = 96 << 20;
    const CHUNK: usize = 64 << 10;
    // 64 KiB every 8 ms: 8 MiB/s, about 12 s in all.
    const PACE: Duration = Duration::from_millis(8);
    let bound = Duration::from_secs(3);
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let (_running, before) = echo_relay_edge1(&lab, &pki)?;
    let sink_addr = sa(netns::edge_pod_ip(1), SINK);
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let sink = lab.spawn_in(Role::Epod1, move || sink(sink_addr, TOTAL, r));
    let send = lab.spawn_in(Role::Cpod2, move || {
        paced_send(sink_addr, TOTAL, CHUNK, PACE)
    });
    wait_progress(&received, TOTAL / 6, Duration::from_secs(15))?;
    lab.change_masquerade_addr(1, REBOUND_IP)?;
    wait_progress(&received, TOTAL / 2, Duration::from_secs(20))?;
    lab.change_masquerade_addr(1, netns::nat_wan_ip(1))?;
    let sent = send
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?;
    let after = session(&lab, "edge1")?.context("edge1 session gone")?;
    timed(
        t,
        "NAT rebinding twice during a 96 MiB download: longest stall at the edge pod",
        Some(bound),
        sent.and(got).and_then(|(elapsed, max_gap)| {
            anyhow::ensure!(
                after.session_id == before.session_id,
                "session changed: {} -> {}",
                before.session_id,
                after.session_id
            );
            Ok((
                max_gap,
                format!(
                    "byte-exact in {}; session {} kept, remote_addr {} -> {}",
                    secs(elapsed),
                    after.session_id,
                    before.remote_addr,
                    after.remote_addr
                ),
            ))
        }),
    );
    Ok(())
}

/// Sends `total` bytes of [`pattern`] to `target` in `chunk`-sized writes,
/// one every `pace`, then closes. Connects with retries (the sink starts in
/// another thread).
async fn paced_send(target: SocketAddr, total: u64, chunk: usize, pace: Duration) -> Result<()> {
    let mut s = None;
    for _ in 0..50 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
        {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = s.context("the sink not reachable")?;
    write_paced(&mut s, total, chunk, pace).await?;
    s.shutdown().await?;
    Ok(())
}

/// Accepts one connection on `addr` and reads it to EOF, checking every
/// byte against [`pattern`] and counting them into `progress`; returns the
/// time from the first byte to EOF and the longest gap between two reads.
/// Bounded: 60 s in all.
async fn sink(
    addr: SocketAddr,
    total: u64,
    progress: Arc<AtomicU64>,
) -> Result<(Duration, Duration)> {
    let run = async move {
        let l = TcpListener::bind(addr).await?;
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut got, mut first, mut last) = (0u64, None::<Instant>, None::<Instant>);
        let mut max_gap = Duration::ZERO;
        loop {
            let n = s.read(&mut buf).await.context("reading the download")?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            if let Some(l) = last {
                max_gap = max_gap.max(now - l);
            }
            last = Some(now);
            first.get_or_insert(now);
            if let Some(k) = (0..n).find(|&k| buf[k] != pattern(got + k as u64)) {
                anyhow::bail!("byte {} differs", got + k as u64);
            }
            got += n as u64;
            progress.fetch_add(n as u64, Relaxed);
        }
        anyhow::ensure!(got == total, "EOF after {got} of {total} bytes");
        Ok((first.map_or(Duration::ZERO, |f| f.elapsed()), max_gap))
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .context("download not done within 60 s")?
}
