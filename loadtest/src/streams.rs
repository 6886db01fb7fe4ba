//! `streams`: M idle tunneled connections open through one edge; relay and
//! edge memory per stream. Relay, edge and the idle echo service are three
//! separate processes (so each RSS is its own, and the file descriptors
//! are spread: this process holds only the M client sockets).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::edge_ip;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    fmt_bytes, get, machine, median, rss_bytes, write_json, Bench, Binaries, ChildGuard, Counter,
    Progress, Table, Via,
};

/// Arguments of `streams`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Idle streams to hold open on the one edge.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// How long the streams stay idle before memory is read.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "3s")]
    settle: Duration,
    /// Repetitions, each with fresh processes (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Starts `loadtest echo-process` at `ip` and returns its address.
pub(crate) async fn start_echo(
    bench: &Bench,
    ip: std::net::IpAddr,
) -> Result<(ChildGuard, SocketAddr)> {
    let ready = bench.dir.path().join("echo-ready");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Binaries::self_cmd()?;
    cmd.arg("echo-process")
        .arg("--addr")
        .arg(SocketAddr::new(ip, 0).to_string())
        .arg("--ready-file")
        .arg(&ready);
    let mut child = ChildGuard::spawn("echo", cmd, &bench.dir.path().join("echo.log"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            if let Ok(a) = t.trim().parse() {
                return Ok((child, a));
            }
        }
        child.check_alive()?;
        ensure!(Instant::now() < deadline, "echo process not ready in 10s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct One {
    relay_before: u64,
    relay_after: u64,
    relay_closed: u64,
    edge_before: u64,
    edge_after: u64,
    open_s: f64,
}

async fn run_once(bench: &Bench, m: usize, settle: Duration) -> Result<One> {
    let relay = bench.start_relay().await?;
    // The edge's default `quic.max_streams` is exactly 10,000; with the
    // default M = 10,000 the last stream would wait for credit, so grant
    // headroom (a config knob, not a code change).
    let edge = bench.start_edge(0, &relay, Some(m as u32 + 100)).await?;
    let (_echo, echo_addr) = start_echo(bench, edge_ip(0)).await?;
    let via = Via::Tunnel {
        proxy: relay.connect,
        target: echo_addr,
    };
    // One warm-up stream, so lazily built state (buffers, first-use
    // allocations) is not charged to the streams.
    {
        let mut s = via.open().await?;
        ping(&mut s).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay_before = relay.rss()?;
    let edge_before = rss_bytes(edge.pid())?;
    let t0 = Instant::now();
    let opened: Counter = Arc::new(AtomicU64::new(0));
    let o2 = opened.clone();
    let conns = {
        let _p = Progress::start(format!("streams: opening {m}"), move || {
            format!("{} open", get(&o2))
        });
        // 64 openers in parallel, each handling every 64th stream.
        let mut set = tokio::task::JoinSet::new();
        let par = 64.min(m);
        for w in 0..par {
            let opened = opened.clone();
            set.spawn(async move {
                let mut mine = Vec::new();
                for _ in (w..m).step_by(par) {
                    let mut s = via.open().await?;
                    ping(&mut s).await?;
                    mine.push(s);
                    opened.fetch_add(1, Relaxed);
                }
                anyhow::Ok(mine)
            });
        }
        let mut conns = Vec::with_capacity(m);
        let limit = Duration::from_secs(120);
        tokio::time::timeout(limit, async {
            while let Some(r) = set.join_next().await {
                conns.extend(r??);
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("opening {m} streams took over {limit:?}"))??;
        conns
    };
    let open_s = t0.elapsed().as_secs_f64();
    ensure!(conns.len() == m, "opened {} of {m}", conns.len());
    tokio::time::sleep(settle).await;
    let rows = relay.admin.sessions().await?;
    let open = rows.first().map(|r| r.open_streams).unwrap_or(0);
    ensure!(
        open as usize == m,
        "relay reports {open} open streams, expected {m}"
    );
    let relay_after = relay.rss()?;
    let edge_after = rss_bytes(edge.pid())?;
    drop(conns);
    // Streams closed: how much of it does the relay give back?
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relay_closed = relay.rss()?;
    Ok(One {
        relay_before,
        relay_after,
        relay_closed,
        edge_before,
        edge_after,
        open_s,
    })
}

async fn ping(s: &mut TcpStream) -> Result<()> {
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    ensure!(&b == b"ping", "bad echo");
    Ok(())
}

/// Runs `streams`.
pub(crate) async fn run(a: Args) -> Result<()> {
    ensure!(
        (1..=10_000).contains(&a.streams),
        "--streams must be between 1 and 10000 (got {}): this process holds one socket per stream and the fd limit here is 20000",
        a.streams
    );
    ensure!(
        a.settle <= Duration::from_secs(600),
        "--settle must be at most 10m"
    );
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    let bench = Bench::new(1)?;
    println!(
        "streams: {} | {} idle streams on one edge",
        machine(),
        a.streams
    );
    let mut runs = Vec::new();
    for r in 0..a.runs {
        let o = run_once(&bench, a.streams, a.settle)
            .await
            .with_context(|| format!("run {}", r + 1))?;
        eprintln!(
            "  run {}: relay RSS {} -> {} ({} after closing), edge RSS {} -> {}, opened in {:.2}s",
            r + 1,
            fmt_bytes(o.relay_before as f64),
            fmt_bytes(o.relay_after as f64),
            fmt_bytes(o.relay_closed as f64),
            fmt_bytes(o.edge_before as f64),
            fmt_bytes(o.edge_after as f64),
            o.open_s
        );
        runs.push(o);
    }
    let m = a.streams as f64;
    let f = |g: &dyn Fn(&One) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    let relay_per = f(&|o| (o.relay_after as f64 - o.relay_before as f64) / m);
    let edge_per = f(&|o| (o.edge_after as f64 - o.edge_before as f64) / m);
    let relay_idle = f(&|o| o.relay_before as f64);
    let edge_idle = f(&|o| o.edge_before as f64);
    let relay_closed = f(&|o| o.relay_closed as f64);
    let open_rate = f(&|o| m / o.open_s);
    let kib = |x: f64| format!("{:.1} KiB", x / 1024.0);
    let mib = |x: f64| format!("{:.1} MiB", x / 1048576.0);
    let mut t = Table::new(&["figure", "median", "runs"]);
    t.stat("relay RSS, 1 session, idle", &relay_idle, mib);
    t.stat("edge RSS, idle", &edge_idle, mib);
    t.stat(
        format!("relay memory per stream ({} streams)", a.streams),
        &relay_per,
        kib,
    );
    t.stat(
        format!("edge memory per stream ({} streams)", a.streams),
        &edge_per,
        kib,
    );
    t.stat("relay RSS 2 s after closing them", &relay_closed, mib);
    t.stat("streams opened per second (64 openers)", &open_rate, |x| {
        format!("{x:.0}")
    });
    t.print();
    write_json(
        a.json.as_deref(),
        &json!({"bench": "streams", "machine": machine(), "relay": bench.bins.describe(),
                "streams": a.streams, "settle_s": a.settle.as_secs_f64(),
                "relay_rss_idle": relay_idle, "edge_rss_idle": edge_idle,
                "relay_bytes_per_stream": relay_per, "relay_bytes_per_stream_median": median(&relay_per),
                "edge_bytes_per_stream": edge_per, "edge_bytes_per_stream_median": median(&edge_per),
                "relay_rss_after_close": relay_closed, "open_per_s": open_rate}),
    )
}
