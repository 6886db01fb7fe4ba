//! Liveness over a bad uplink, in the network-namespace lab: edge1's
//! uplink (nat1's WAN-facing `wan0`, so the queue is a router's, which
//! local senders' TCP small-queue limits do not cap) is shaped with `tc tbf` to
//! 2 Mbit/s with a deep queue (up to 8 s of data) while a bulk upload
//! through the tunnel fills it (cpod2 reads an endless stream from a
//! service on epod1, so every byte leaves the edge through the shaped
//! link; the tunnel's 1 MiB stream window keeps ~4.2 s of it queued). The
//! edge's keep-alives queue behind that data: their round trip exceeds one
//! keep-alive interval, which used to cost the session (one late pong was
//! fatal). Checked: the session stays the same throughout, the path RTT is
//! measured and reported (EdgeStats) and exceeds the keep-alive, and the
//! upload keeps moving.
//!
//! `an_idle_session_outlives_a_queue_deeper_than_its_keepalive` leaves
//! the tunnel idle while paced uploads beside it hold the queue at ~6 s:
//! only the edge's keep-alives cross, each a round trip late (see
//! [`idle_behind_a_site_upload`]).
//!
//! `shaped_uplink_keeps_the_session` runs ~60 s, the idle case ~60 s;
//! `SOAK=1` also runs the 5-minute variant. Figures go to `target/lab-shaped.txt` and
//! docs/benchmarks.md. Needs root (skips otherwise; `REQUIRE_LAB=1` makes
//! that a failure).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_client::{EdgeClient, EdgeStats, TransportMode};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    captured_prefixes, edge_config, lab_pki, launch, relay_config, sa, session, start_relay,
    within, Running, Table,
};
use relay_server::admin::SessionRow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The bulk source on epod1.
const SOURCE_PORT: u16 = 9100;
/// A sink on the relay host's WAN address, for the upload beside the tunnel.
const SINK_PORT: u16 = 9101;
/// Keep-alive 3 s (a dead path is then declared within 9 s): below the
/// round trip this queue produces (the tunnel's 1 MiB stream window caps
/// what it queues, about 4.2 s at 2 Mbit/s), so every answer to a
/// keep-alive comes back after the next one left. The rule that once
/// ended sessions here was "one late pong is fatal"; then "a ping
/// unanswered for 2 intervals". On QUIC the edge now watches what arrives
/// (the relay's acknowledgements of the upload arrive all the time), so the
/// queue's delay no longer counts against the session at all.
const KEEPALIVE: Duration = Duration::from_secs(3);
/// The longest control round trip the TCP fallback case accepts under its
/// uploads: the path's own queue (tbf's, up to 8 s) plus the streams'
/// budget inside yamux (256 KiB, 1 s at 2 Mbit/s); far below the half
/// minute a round of a hundred and more streams' queued frames took.
const TCP_CONTROL_RTT_BOUND: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(16);
/// How deep the idle case holds the queue, in seconds of data: past the
/// keep-alive, so each arrival is late by more than one (see
/// [`idle_behind_a_site_upload`]), deep enough that the edge's smoothed
/// round-trip estimate (an eighth of each new sample) climbs past it
/// within the minute, and short of tbf's 8 s limit, so nothing is
/// dropped.
const HOLD_QUEUE: f64 = 6.0;
/// What the idle case's uploads write while the queue is below
/// [`HOLD_QUEUE`], all flows together: 2.6 Mbit/s of payload, about 2.7
/// on the wire, so the queue grows by ~0.36 s a second. A ramp, as a
/// modem's queue fills under a backup job: ~1.1 s within one keep-alive
/// by that rate, 1.4 s measured (the first writes and what the sockets
/// take unsent, 16 KiB each, go in at once),
/// inside the envelope the liveness rules are built for
/// (docs/architecture.md, "Liveness": a round trip that jumps at once from
/// short to beyond about a keep-alive cannot be told from a dead path for
/// that first cycle). Unpaced, the eight flows' first windows put 1.4 s
/// into the queue at once and slow start 0.5 s more each second (2.9 s
/// within the first keep-alive, at that envelope's edge), and then filled
/// it to tbf's limit, where its tail drops took keep-alives too.
const RAMP_BPS: u64 = 2_600_000;
/// What they write once the queue is at [`HOLD_QUEUE`]: ~1.8 Mbit/s on
/// the wire, so it drains by ~0.1 s a second until the next sample.
const HOLD_BPS: u64 = 1_700_000;
/// The paced uploads' write size.
const PACE_CHUNK: usize = 4096;
/// How much unsent data a paced upload's socket takes
/// (`TCP_NOTSENT_LOWAT`): 8 × 16 KiB, 0.5 s of the link's data, is the
/// most the queue can jump by when the flows' windows open.
const PACE_NOTSENT: u32 = 16 * 1024;
/// tbf: 2 Mbit/s, a queue of up to 8 s of data (2 MB; a bufferbloated
/// DSL or LTE uplink): more than one keep-alive interval.
const TBF: &[&str] = &[
    "tc", "qdisc", "add", "dev", "wan0", "root", "tbf", "rate", "2mbit", "burst", "32kbit",
    "latency", "8000ms",
];

/// An endless stream of bytes to whoever connects.
fn source(lab: &NetnsLab) -> Result<Running> {
    launch(lab, Role::Epod1, "source", |ready, stop| async move {
        let l = tokio::net::TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, SOURCE_PORT)).await?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let buf = vec![0x5au8; 64 * 1024];
                    while s.write_all(&buf).await.is_ok() {}
                });
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        task.abort();
        Ok(())
    })
}

/// A sink on the relay host: reads and discards.
fn sink(lab: &NetnsLab) -> Result<Running> {
    launch(lab, Role::Relay, "sink", |ready, stop| async move {
        let l = tokio::net::TcpListener::bind(sa(netns::RELAY_WAN_IP, SINK_PORT)).await?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        task.abort();
        Ok(())
    })
}

/// Uploads from the edge host beside the tunnel (a backup job, say):
/// plain TCP flows, which can fill the shaped queue as the tunnel's own
/// (QUIC, congestion-controlled) upload alone does not (it settled at
/// ~0.5 s of queue in the lab).
///
/// With `pace` (bits per second, all flows together, read after each
/// write to time the next) the uploads write no faster than that, so the
/// queue grows by at most the excess over the link's rate; unpaced (the
/// TCP-fallback case's `BESIDE=1`), the flow fills the queue to its limit.
fn uploader(lab: &NetnsLab, flows: usize, pace: Option<Arc<AtomicU64>>) -> Result<Running> {
    launch(
        lab,
        Role::Edge1,
        "uploader",
        move |ready, stop| async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..flows {
                // CUBIC, as most hosts at a site send with: loss-based, it fills
                // a queue to its limit. A namespace takes the host's default,
                // which may be BBR (this machine's), which keeps the queue near
                // empty.
                let sock = tokio::net::TcpSocket::new_v4()?;
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::TcpCongestion,
                    &std::ffi::OsString::from("cubic"),
                )?;
                if pace.is_some() {
                    // What waits unsent in a send buffer is not paced: when
                    // the window opens it goes into the queue at once.
                    relay_transport::tcp::set_not_sent_lowat(&sock, PACE_NOTSENT)?;
                }
                let mut s = sock.connect(sa(netns::RELAY_WAN_IP, SINK_PORT)).await?;
                let pace = pace.clone();
                tasks.spawn(async move {
                    let Some(pace) = pace else {
                        let buf = vec![0xa5u8; 64 * 1024];
                        while s.write_all(&buf).await.is_ok() {}
                        return;
                    };
                    let buf = vec![0xa5u8; PACE_CHUNK];
                    let mut next = tokio::time::Instant::now();
                    loop {
                        tokio::time::sleep_until(next).await;
                        if s.write_all(&buf).await.is_err() {
                            return;
                        }
                        let per_flow = (pace.load(Relaxed) / flows as u64).max(1);
                        let every =
                            Duration::from_secs_f64((PACE_CHUNK * 8) as f64 / per_flow as f64);
                        // Never made up for in a burst.
                        let now = tokio::time::Instant::now();
                        next = (next + every).max(now.checked_sub(every).unwrap_or(now));
                    }
                });
            }
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            tasks.abort_all();
            Ok(())
        },
    )
}

/// edge1 over `transport` with the lab's keep-alive; hands out its stats.
fn edge1(
    lab: &NetnsLab,
    pki: &relay_transport::devcerts::DevPki,
    transport: TransportMode,
) -> Result<(Running, Arc<EdgeStats>)> {
    let mut cfg = edge_config(pki, 1)?;
    cfg.transport = transport;
    cfg.quic.keepalive = KEEPALIVE;
    cfg.quic.idle_timeout = IDLE;
    let (tx, rx) = std::sync::mpsc::channel();
    let running = launch(lab, Role::Edge1, "edge1", move |ready, stop| async move {
        let edge = EdgeClient::start(cfg).await?;
        if edge.wait_connected(Duration::from_secs(15)).await.is_none() {
            anyhow::bail!("edge did not connect: {:?}", edge.state());
        }
        let _ = tx.send(edge.stats().clone());
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        edge.shutdown().await;
        Ok(())
    })?;
    let stats = rx.recv_timeout(Duration::from_secs(5))?;
    Ok((running, stats))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// How a run is set up: the edge's transport and the uploads at once.
#[derive(Clone, Copy)]
struct Setup {
    transport: TransportMode,
    streams: usize,
}

/// Runs the shaped upload for `hold`; returns the table's rows.
fn shaped(t: &mut Table, hold: Duration, setup: Setup) -> Result<()> {
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _src = source(&lab)?;
    let mut rcfg = relay_config(&pki)?;
    rcfg.quic.keepalive = KEEPALIVE;
    rcfg.quic.idle_timeout = IDLE;
    let _relay = start_relay(&lab, rcfg)?;
    let (_edge, stats) = edge1(&lab, &pki, setup.transport)?;
    let prefix = netns::edge_pod_cidr(1).to_string();
    within(Duration::from_secs(10), || {
        Ok(captured_prefixes(&lab)?.contains(&prefix))
    })
    .context("edge1's prefix never captured")?;
    let before = session(&lab, "edge1")?.context("edge1 not registered")?;
    // Unshaped control RTT first (a few pings).
    within(Duration::from_secs(3 * KEEPALIVE.as_secs() + 2), || {
        Ok(stats.control_rtt_us.load(Relaxed) > 0)
    })
    .context("no control RTT measured before shaping")?;
    let rtt_idle = stats.control_rtt_us.load(Relaxed);

    lab.exec(Role::nat(1)?, TBF)?;
    // With BESIDE=1 a plain TCP upload runs beside the tunnel's (see
    // `uploader`): it fills the queue to tbf's limit and tbf then drops.
    // Under the control-ping rule that lost the session (a dropped ping's
    // pong came back after QUIC's loss recovery, up to 7.9 s); it is not
    // part of the CI check (docs/architecture.md, "Liveness").
    let beside = std::env::var("BESIDE").as_deref() == Ok("1");
    let _beside = if beside {
        Some((sink(&lab)?, uploader(&lab, 1, None)?))
    } else {
        None
    };
    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let target = sa(netns::edge_pod_ip(1), SOURCE_PORT);
    let streams = setup.streams;
    let reader = lab.spawn_in(Role::Cpod2, move || async move {
        let end = tokio::time::Instant::now() + hold;
        let one = |got: Arc<AtomicU64>| async move {
            let mut s = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(target),
            )
            .await
            .context("connect timed out")??;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(r) = tokio::time::timeout_at(end, s.read(&mut buf)).await {
                match r? {
                    0 => anyhow::bail!("source closed after {} bytes", got.load(Relaxed)),
                    n => got.fetch_add(n as u64, Relaxed),
                };
            }
            anyhow::Ok(())
        };
        let all = (0..streams).map(|_| one(got.clone()));
        futures::future::try_join_all(all).await?;
        Ok(())
    });
    // Sample the path RTT once a second while the upload runs: on QUIC
    // its estimate (read by the edge every keep-alive; control pings are
    // rare there), on the TCP fallback the control ping's round trip
    // (every keep-alive; yamux has no estimate of its own).
    let quic = matches!(setup.transport, TransportMode::Quic);
    let rtt_now = || {
        if quic {
            stats.path_rtt_us.load(Relaxed)
        } else {
            stats.control_rtt_us.load(Relaxed)
        }
    };
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut last_us = 0u64;
    while t0.elapsed() < hold {
        std::thread::sleep(Duration::from_secs(1));
        let us = rtt_now();
        // Only after the queue has filled (the first few seconds).
        if t0.elapsed() > Duration::from_secs(10) && us != last_us {
            samples.push(us);
        }
        last_us = us;
    }
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
    let elapsed = t0.elapsed();
    let bytes = received.load(Relaxed);
    let _ = lab.exec(
        Role::nat(1)?,
        &["tc", "qdisc", "del", "dev", "wan0", "root"],
    );
    let after = session(&lab, "edge1")?;
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
    let max = if quic {
        stats.path_rtt_max_us.load(Relaxed)
    } else {
        stats.control_rtt_max_us.load(Relaxed)
    };
    let case = format!(
        "{}s shaped upload, {}, {} stream{}",
        hold.as_secs(),
        if quic { "QUIC" } else { "TCP fallback" },
        setup.streams,
        if setup.streams == 1 { "" } else { "s" }
    );
    let mbit = bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
    session_kept(t, &case, &stats, &before, after.as_ref());
    t.push(
        &[&case, if quic { "path RTT" } else { "control RTT" }],
        format!(
            "control ping idle {:.1} ms; shaped median {:.0} ms, max {:.0} ms over {} samples (keep-alive {}s)",
            ms(rtt_idle),
            ms(median),
            ms(max),
            samples.len(),
            KEEPALIVE.as_secs()
        ),
        // On QUIC, answers later than a keep-alive interval are what the
        // older rules turned into a lost session: the test must see them.
        // On the TCP fallback the control stream is exempt from the budget
        // data streams queue under inside yamux (`transport/src/tcp/
        // budget.rs`): its answers must stay within a few seconds (15 to
        // 29 s at 160 uploads before, waiting a whole round of every
        // stream's queued frames).
        !samples.is_empty()
            && median > 0
            && if quic {
                Duration::from_micros(max) > KEEPALIVE
            } else {
                Duration::from_micros(max) < TCP_CONTROL_RTT_BOUND
            },
    );
    t.push(
        &[&case, "upload"],
        format!(
            "{:.1} MiB in {:.0}s = {mbit:.2} Mbit/s{}",
            bytes as f64 / (1 << 20) as f64,
            elapsed.as_secs_f64(),
            match &read {
                Ok(()) => String::new(),
                Err(e) => format!("; reader: {e:#}"),
            }
        ),
        // Sharing 2 Mbit/s with the TCP upload: it must keep moving.
        read.is_ok() && mbit > 0.1,
    );
    Ok(())
}

/// The row saying whether the edge kept one session throughout: the
/// relay's row for it is the one seen `before`, and the edge established
/// no other.
fn session_kept(
    t: &mut Table,
    case: &str,
    stats: &EdgeStats,
    before: &SessionRow,
    after: Option<&SessionRow>,
) {
    let sessions = stats.sessions.load(Relaxed);
    let same = after
        .is_some_and(|a| a.session_id == before.session_id && a.generation == before.generation);
    // Who ended a lost session: the edge's own liveness check, or a close
    // from the relay (its silence sweep, or QUIC's idle timer there). A
    // failure of this load-sensitive case says which side to look at.
    t.push(
        &[case, "session kept"],
        format!(
            "{} (edge sessions established: {sessions}; session {} up {:.0}s in all; paths the edge found dead: {}, sessions the relay closed: {})",
            if same && sessions == 1 { "ok" } else { "FAIL" },
            before.session_id,
            after.map_or(0, |a| a.connected_secs),
            stats.paths_dead.load(Relaxed),
            stats.closed_by_relay.load(Relaxed)
        ),
        same && sessions == 1,
    );
}

fn run(hold: Duration, file: &str, setup: Setup) -> Result<()> {
    run_table(file, |t| shaped(t, hold, setup))
}

/// Runs `case` into a table published as `file`; fails on a failed check.
fn run_table(file: &str, case: impl FnOnce(&mut Table) -> Result<()>) -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED shaped uplink: {skip}");
        return Ok(());
    }
    // Who closed a lost session, and why, shown with a failure.
    relay_lab::init_with("warn,relay_server::liveness=info,edge_client::client=info");
    let mut t = Table::new(&["case", "check", "result"]);
    if let Err(e) = case(&mut t) {
        t.push(&["setup", "-"], format!("FAIL: {e:#}"), false);
    }
    let summary = t.publish(
        file,
        &format!("{} of {} checks passed", t.passed(), t.rows.len()),
    );
    let failed = t.failed();
    assert!(failed.is_empty(), "failed checks: {failed:?}\n{summary}");
    Ok(())
}

const QUIC_ONE: Setup = Setup {
    transport: TransportMode::Quic,
    streams: 1,
};

#[test]
fn shaped_uplink_keeps_the_session() -> Result<()> {
    run(Duration::from_secs(60), "lab-shaped.txt", QUIC_ONE)
}

/// The TCP fallback under the same queue, with 160 uploads at once
/// (`TCP_STREAMS` to change). The relay's bytes keep arriving, which is
/// what both sides' checks watch on TCP as on QUIC
/// (`edge-client/src/liveness.rs`, `relay-server/src/liveness.rs`), and
/// the control stream is exempt from the data streams' queue budget in
/// yamux, so its answers come within seconds: before the budget they
/// queued behind a round of every stream's frames (12 to 21 s at 48
/// uploads, 15 to 29 s at 160, where a control write not done within two
/// keep-alives once ended the session); with 8 uploads the kernel's send
/// buffer alone once held a ping past the bound (see `TCP_NOTSENT_LOWAT`
/// in `transport/src/tcp/socket.rs`).
#[test]
fn shaped_uplink_keeps_a_tcp_fallback_session() -> Result<()> {
    let streams = std::env::var("TCP_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok());
    let setup = Setup {
        transport: TransportMode::Tcp,
        streams: streams.unwrap_or(160),
    };
    run(Duration::from_secs(40), "lab-shaped-tcp.txt", setup)
}

/// How long [`idle_behind_a_site_upload`] runs.
const IDLE_HOLD: Duration = Duration::from_secs(60);

/// An idle tunnel behind a site upload that is not the tunnel's (a backup
/// job): nothing comes from the relay but its answers to the edge's QUIC
/// keep-alives, which queue behind the upload on the way out, so the
/// silence the edge sees between two arrivals is a keep-alive plus the
/// queue's round trip. Its limit allows for the measured round trip
/// (`quic_silence_limit`); under "two keep-alives without an arrival"
/// (5.7 s at this 3 s keep-alive) the session ended once the round trip
/// passed 2.7 s.
///
/// The queue is held at about 6 s, deeper than a keep-alive and short of
/// tbf's limit: at the limit tbf drops from its tail, keep-alives and
/// their acknowledgements among what it drops, and whether a session then
/// outlives the relay's allowance depends on which packets were lost
/// (with the unpaced uploads this case had before, the queue full from
/// ~14 s on and the flows' send buffers bursting into it, the relay
/// closed the session in about one run in ten, the reason not logged
/// then). That is loss on the uplink, not the long round trip this case
/// is about; docs/benchmarks.md has the runs.
fn idle_behind_a_site_upload(t: &mut Table) -> Result<()> {
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let mut rcfg = relay_config(&pki)?;
    rcfg.quic.keepalive = KEEPALIVE;
    rcfg.quic.idle_timeout = IDLE;
    let _relay = start_relay(&lab, rcfg)?;
    let (_edge, stats) = edge1(&lab, &pki, TransportMode::Quic)?;
    within(Duration::from_secs(10), || {
        Ok(session(&lab, "edge1")?.is_some())
    })
    .context("edge1 never registered")?;
    let before = session(&lab, "edge1")?.context("edge1 not registered")?;
    let _sink = sink(&lab)?;
    lab.exec(Role::nat(1)?, TBF)?;
    // Several flows (a backup job's), paced so that the queue ramps to
    // `HOLD_QUEUE` and stays there (see `RAMP_BPS`), read every sample.
    // tbf's parameters are not changed while it runs: a change replaces
    // its queue, dropping what it held.
    let t0 = Instant::now();
    // The queue, sampled from the start (empty) through the hold: the
    // ramp the case stays within is measured, not assumed.
    let mut queue = vec![(Duration::ZERO, queued(&lab)?.0)];
    let pace = Arc::new(AtomicU64::new(RAMP_BPS));
    let _upload = uploader(&lab, 8, Some(pace.clone()))?;
    let mut rtts = Vec::new();
    let mut next_rtt = Duration::from_secs(1);
    let mut drops = 0;
    while t0.elapsed() < IDLE_HOLD {
        std::thread::sleep(QUEUE_SAMPLE);
        let (q, dropped) = queued(&lab)?;
        queue.push((t0.elapsed(), q));
        drops = dropped;
        pace.store(if q < HOLD_QUEUE { RAMP_BPS } else { HOLD_BPS }, Relaxed);
        if t0.elapsed() >= next_rtt {
            next_rtt += Duration::from_secs(1);
            rtts.push(stats.path_rtt_us.load(Relaxed));
        }
    }
    let elapsed = t0.elapsed();
    let _ = lab.exec(
        Role::nat(1)?,
        &["tc", "qdisc", "del", "dev", "wan0", "root"],
    );
    let after = session(&lab, "edge1")?;
    let case = format!(
        "{:.0}s idle tunnel, site upload beside",
        elapsed.as_secs_f64()
    );
    session_kept(t, &case, &stats, &before, after.as_ref());
    let max = stats.path_rtt_max_us.load(Relaxed);
    let mut sorted = rtts.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    // The case only shows something if the silence between arrivals
    // (a keep-alive plus the round trip) went past the old limit.
    let old_limit = KEEPALIVE * 2 - KEEPALIVE / 10;
    t.push(
        &[&case, "path RTT"],
        format!(
            "median {:.0} ms, max {:.0} ms over {} samples; keep-alive {}s, so up to {:.1} s between arrivals (the old limit {:.1} s)",
            ms(median),
            ms(max),
            rtts.len(),
            KEEPALIVE.as_secs(),
            (KEEPALIVE + Duration::from_micros(max)).as_secs_f64(),
            old_limit.as_secs_f64()
        ),
        KEEPALIVE + Duration::from_micros(max) > old_limit + Duration::from_secs(1),
    );
    // The case's premise: a queue that ramps (see `RAMP_BPS`), with a
    // second to spare under the keep-alive, and drops nothing.
    let rise = largest_rise(&queue, KEEPALIVE);
    let peak = queue.iter().map(|q| q.1).fold(0.0, f64::max);
    // Time between samples both that deep (a sample takes longer than its
    // sleep: the `tc` it runs, more on a loaded machine).
    let held: f64 = queue
        .windows(2)
        .filter(|w| w[0].1 >= HOLD_QUEUE - 1.0 && w[1].1 >= HOLD_QUEUE - 1.0)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64())
        .sum();
    t.push(
        &[&case, "queue"],
        format!(
            "rose by at most {rise:.1} s of data within a keep-alive ({}s), to {peak:.1} s; {held:.0} s at {:.0} s or more; {drops} packets dropped; {} samples",
            KEEPALIVE.as_secs(),
            HOLD_QUEUE - 1.0,
            queue.len()
        ),
        rise < (KEEPALIVE - Duration::from_secs(1)).as_secs_f64() && drops == 0 && held >= 30.0,
    );
    Ok(())
}

/// How often the idle case reads the queue.
const QUEUE_SAMPLE: Duration = Duration::from_millis(250);

/// How many seconds of data (at tbf's 2 Mbit/s) nat1's queue on `wan0`
/// holds now, and how many packets it has dropped.
fn queued(lab: &NetnsLab) -> Result<(f64, u64)> {
    let out = lab.exec(
        Role::nat(1)?,
        &["tc", "-s", "-j", "qdisc", "show", "dev", "wan0"],
    )?;
    let qdiscs: serde_json::Value = serde_json::from_str(&out).context("tc -j qdisc")?;
    let root = qdiscs
        .as_array()
        .and_then(|a| a.iter().find(|q| q["root"] == true));
    let (Some(bytes), Some(drops)) = (
        root.and_then(|q| q["backlog"].as_u64()),
        root.and_then(|q| q["drops"].as_u64()),
    ) else {
        anyhow::bail!("no root qdisc backlog and drops in {out}");
    };
    Ok((bytes as f64 * 8.0 / 2_000_000.0, drops))
}

/// The largest rise of `samples` (time, seconds queued) within any
/// `window`.
fn largest_rise(samples: &[(Duration, f64)], window: Duration) -> f64 {
    samples
        .iter()
        .enumerate()
        .map(|(j, &(tj, qj))| {
            let low = samples[..j]
                .iter()
                .filter(|&&(ti, _)| tj - ti <= window)
                .map(|s| s.1)
                .fold(qj, f64::min);
            qj - low
        })
        .fold(0.0, f64::max)
}

/// See [`idle_behind_a_site_upload`]; ~60 s.
#[test]
fn an_idle_session_outlives_a_queue_deeper_than_its_keepalive() -> Result<()> {
    run_table("lab-shaped-idle.txt", idle_behind_a_site_upload)
}

#[test]
fn shaped_uplink_soak_5_minutes() -> Result<()> {
    if std::env::var("SOAK").as_deref() != Ok("1") {
        eprintln!("shaped uplink soak: set SOAK=1 to run the 5-minute variant");
        return Ok(());
    }
    run(Duration::from_secs(300), "lab-shaped-soak.txt", QUIC_ONE)
}

#[test]
fn largest_rise_is_within_the_window() {
    let s = |t: u64, q: f64| (Duration::from_millis(t), q);
    // Up 1 s in 1 s, then 3 s more over 6 s: within 3 s, at most 1.5.
    let samples = [
        s(0, 0.0),
        s(1000, 1.0),
        s(4000, 2.5),
        s(7000, 4.0),
        s(8000, 3.0),
    ];
    assert_eq!(largest_rise(&samples, Duration::from_secs(3)), 1.5);
    assert_eq!(largest_rise(&samples, Duration::from_secs(7)), 4.0);
    assert_eq!(largest_rise(&samples[..1], Duration::from_secs(3)), 0.0);
}
