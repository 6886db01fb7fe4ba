//! UDP flows and a datagram flood through the relay, then back to where
//! it started. UDP is only carried for captured traffic (nftables rules
//! and conntrack), so this runs in the network-namespace lab, with the
//! relay, the edge and the services inside this test process: the fd and
//! memory figures are the whole process's.
//!
//! 1. `SOAK_UDP_FLOWS` flows (default 500; the soak in docs/benchmarks.md
//!    runs 10,000) from a cloud pod on the relay node to an edge pod's
//!    responder: each a new source port (a new capture, conntrack lookup
//!    and tunnel stream), one query answered; at most [`RATE`] new flows a
//!    second so the flows alive at once (rate × idle timeout) stay under
//!    the caps.
//! 2. A flood on one flow: [`FLOOD`] 1,000-byte payloads as fast as the
//!    socket takes them and [`BIG`] of 3,000 bytes (over the QUIC
//!    datagram size, so they take the flow's stream): the relay's bounded
//!    queue overflows, counted
//!    (`relay_udp_dropped_total{reason="queue_full"}`), and meanwhile an
//!    HTTP request over the tunnel keeps being answered within 2 s. Then
//!    [`PACED_BIG`] 3,000-byte queries, each sent once its predecessor's
//!    answer arrived: every one answered in full (3,006 bytes, also too
//!    large for a datagram on the way back) and carried on the flow's
//!    stream (`relay_udp_stream_payloads_total`), none dropped as oversize,
//!    none truncated.
//! 3. With the idle timeouts shortened to 1 s, the relay ends with no
//!    flow or stream open and the process's open fds back at the
//!    baseline. RSS is printed, not checked: it is this whole process's
//!    (relay, edge, services and a thread with its own runtime for every
//!    step in a namespace, each its own malloc arena), and it grows
//!    until those arenas are warm (with 500 flows a round the second
//!    round still grows it; with 10,000 the second adds 1 %, see
//!    docs/benchmarks.md). Per-process memory is `loadtest soak`'s.
//!
//! Needs root; skips loudly otherwise (`REQUIRE_LAB=1` or `CI=true` fail).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    captured_prefixes, edge_config, http_from, lab_pki, metric, relay_config, sa, services,
    start_edge, start_relay, udp_from, within, DNS, HTTP,
};
use tokio::net::UdpSocket;

/// New flows a second at most.
const RATE: u64 = 400;
/// Flood payloads of 1,000 bytes.
const FLOOD: u64 = 20_000;
/// Flood payloads of 3,000 bytes (over the path's datagram size).
const BIG: u64 = 500;
/// 3,000-byte payloads sent 10 ms apart after the flood.
const PACED_BIG: u64 = 50;

fn flows() -> u64 {
    std::env::var("SOAK_UDP_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
        .clamp(1, 100_000)
}

fn fds() -> Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

fn rss_mib() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn dropped(lab: &NetnsLab, reason: &str) -> Result<f64> {
    metric(
        lab,
        &format!("relay_udp_dropped_total{{reason=\"{reason}\"}}"),
    )
}

/// Every reason of `relay_udp_dropped_total`, in the order printed.
fn all_dropped(lab: &NetnsLab) -> Result<Vec<f64>> {
    [
        "oversize",
        "queue_full",
        "unknown_flow",
        "flow_cap",
        "starting",
    ]
    .iter()
    .map(|r| dropped(lab, r))
    .collect()
}

/// The relay has no flow and no stream open.
fn relay_idle(lab: &NetnsLab) -> Result<bool> {
    Ok(metric(lab, "relay_udp_flows")? == 0.0 && metric(lab, "relay_streams_open")? == 0.0)
}

/// `n` flows, each a new socket with one query (one retransmission after
/// 2 s, as a resolver would); returns how many were answered.
fn run_flows(lab: &NetnsLab, target: SocketAddr, n: u64) -> Result<u64> {
    let limit = Duration::from_secs(n / RATE * 2 + 60);
    lab.run_in(Role::Cpod1, limit, move || async move {
        let answered = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (answered, next) = (answered.clone(), next.clone());
            set.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    // Paced: flow i starts no earlier than i / RATE s in.
                    let at = t0 + Duration::from_micros(i * 1_000_000 / RATE);
                    tokio::time::sleep_until(at.into()).await;
                    let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
                    s.connect(target).await?;
                    let q = format!("flow{i:08}");
                    let mut buf = [0u8; 128];
                    for _ in 0..2 {
                        s.send(q.as_bytes()).await?;
                        let r = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf));
                        if let Ok(Ok(k)) = r.await {
                            if buf[..k].ends_with(q.as_bytes()) {
                                answered.fetch_add(1, Relaxed);
                                break;
                            }
                        }
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        Ok(answered.load(Relaxed))
    })
}

#[test]
fn udp_flows_and_a_datagram_flood_leave_nothing_behind() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED udp soak: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _svc = services(&lab, Role::Epod1, "epod1")?;
    let mut cfg = relay_config(&pki)?;
    // Short idle timeouts, so the run ends idle within seconds; more
    // flows per session than the default 1,024 alive at once.
    cfg.limits.udp_idle_timeout = Duration::from_secs(1);
    cfg.limits.max_udp_flows_per_session = 4096;
    let _relay = start_relay(&lab, cfg)?;
    let mut ecfg = edge_config(&pki, 1)?;
    ecfg.udp_idle = Duration::from_secs(1);
    let _edge = start_edge(&lab, 1, ecfg)?;
    within(Duration::from_secs(10), || {
        Ok(captured_prefixes(&lab)?.contains("10.244.7.0/24"))
    })
    .context("the relay does not capture edge1's pods")?;
    let epod1 = netns::edge_pod_ip(1);
    let (udp, http) = (sa(epod1, DNS), sa(epod1, HTTP));

    // Warm-up, then the baseline once idle.
    ensure!(udp_from(&lab, Role::Cpod1, udp)? == "epod1");
    ensure!(http_from(&lab, Role::Cpod1, http)? == "hello from epod1");
    run_flows(&lab, udp, 50)?;
    within(Duration::from_secs(20), || relay_idle(&lab)).context("not idle after warm-up")?;
    let (fds0, rss0) = (fds()?, rss_mib()?);

    // 1. Many flows, twice (RSS after each: memory held per flow would
    // grow again in the second round).
    let n = flows();
    let mut rss_rounds = Vec::new();
    for round in 1..=2 {
        let total0 = metric(&lab, "relay_udp_flows_total")?;
        let t = Instant::now();
        let answered = run_flows(&lab, udp, n)?;
        let took = t.elapsed();
        let opened = metric(&lab, "relay_udp_flows_total")? - total0;
        within(Duration::from_secs(20), || relay_idle(&lab))
            .context("flows still open 20 s after the last")?;
        std::thread::sleep(Duration::from_secs(1));
        rss_rounds.push(rss_mib()?);
        eprintln!(
            "udp soak: round {round}: {answered} of {n} flows answered in {:.1}s; relay opened {opened} flows; then idle: fds {}, RSS {:.1} MiB (baseline {fds0}, {rss0:.1} MiB)",
            took.as_secs_f64(),
            fds()?,
            rss_rounds[round - 1]
        );
        ensure!(answered == n, "{} of {n} flows unanswered", n - answered);
        // A new socket may get the port of one whose flow is still alive
        // (the kernel picks ports at random): that query rides the live flow.
        ensure!(
            opened >= n as f64 * 0.9,
            "relay counted {opened} flows for {n}"
        );
    }

    // 2. The flood, with HTTP over the tunnel meanwhile.
    let before = all_dropped(&lab)?;
    let flood = lab.spawn_in(Role::Cpod1, move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(udp).await?;
        let replies = Arc::new(AtomicU64::new(0));
        let s = Arc::new(s);
        let rx = {
            let (s, replies) = (s.clone(), replies.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await
                {
                    replies.fetch_add(1, Relaxed);
                }
            })
        };
        let t = Instant::now();
        for i in 0..FLOOD {
            s.send(&[b'f'; 1000]).await?;
            if i % (FLOOD / BIG) == 0 {
                s.send(&[b'B'; 3000]).await?;
            }
        }
        let sent_in = t.elapsed();
        rx.await?;
        anyhow::Ok((sent_in, replies.load(Relaxed)))
    });
    let mut worst = Duration::ZERO;
    let mut requests = 0;
    while !flood.is_finished() || requests < 3 {
        let t = Instant::now();
        let body = http_from(&lab, Role::Cpod1, http).context("HTTP during the flood")?;
        ensure!(
            body == "hello from epod1",
            "HTTP during the flood answered {body:?}"
        );
        worst = worst.max(t.elapsed());
        requests += 1;
    }
    let (sent_in, replies) = flood
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    let after = all_dropped(&lab)?;
    let d: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "udp soak: flood of {FLOOD} × 1000 B + {BIG} × 3000 B sent in {:.2}s, {replies} replies; relay drops oversize {} queue_full {} unknown_flow {} flow_cap {} starting {}; {requests} HTTP requests during it, slowest {:.0} ms",
        sent_in.as_secs_f64(),
        d[0], d[1], d[2], d[3], d[4],
        worst.as_secs_f64() * 1000.0
    );
    // Under the flood most payloads die in a full queue (counted
    // queue_full) or the kernel's socket buffer before the size check;
    // the flood must have overflowed the relay's bounded queue, counted.
    ensure!(d[1] > 0.0, "a flood of {FLOOD} payloads filled no queue");
    // Paced, every payload too large for a datagram is carried on its
    // flow's stream both ways and answered in full.
    let (over0, carried0) = (
        dropped(&lab, "oversize")?,
        metric(&lab, "relay_udp_stream_payloads_total")?,
    );
    let answered = lab.run_in(Role::Cpod1, Duration::from_secs(30), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(udp).await?;
        let mut buf = [0u8; 4096];
        for i in 0..PACED_BIG {
            s.send(&[b'B'; 3000]).await?;
            let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
                .await
                .with_context(|| format!("3000-byte query {i}: no answer within 2 s"))??;
            let reply = &buf[..n];
            ensure!(
                reply.starts_with(b"epod1:") && reply[6..] == [b'B'; 3000],
                "3000-byte query {i}: answer of {n} bytes is not the full echo"
            );
        }
        anyhow::Ok(PACED_BIG)
    })?;
    let over = dropped(&lab, "oversize")? - over0;
    let carried = metric(&lab, "relay_udp_stream_payloads_total")? - carried0;
    eprintln!(
        "udp soak: {answered} of {PACED_BIG} 3000-byte queries answered in full; relay carried {carried} on flow streams, counted {over} oversize"
    );
    ensure!(
        carried >= PACED_BIG as f64 && over == 0.0,
        "relay carried {carried} payloads on flow streams (≥ {PACED_BIG} expected) and dropped {over} as oversize (0 expected)"
    );
    ensure!(
        worst < Duration::from_secs(2),
        "HTTP took {worst:?} during the flood"
    );

    // 3. Back to the baseline.
    let idle = within(Duration::from_secs(30), || relay_idle(&lab))
        .context("flows or streams still open 30 s after the flood")?;
    // Sockets the runtimes close lazily: give them a moment.
    std::thread::sleep(Duration::from_secs(2));
    let (fds1, rss1) = (fds()?, rss_mib()?);
    eprintln!(
        "udp soak: idle {:.1}s after the flood; test process fds {fds0} → {fds1}, RSS {rss0:.1} → {rss1:.1} MiB ({:+.1} %)",
        idle.as_secs_f64(),
        (rss1 - rss0) * 100.0 / rss0
    );
    ensure!(
        fds1 as f64 <= fds0 as f64 * 1.05,
        "open fds {fds0} → {fds1}"
    );
    Ok(())
}
