//! `sessions`: N simulated edges (in this process, one UDP socket each)
//! connect to a relay process and stay idle; relay memory per session and
//! the time until all N are registered. Also the shared edge-fleet helpers
//! `storm` uses.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::edge_config;
use serde_json::json;

use crate::common::{
    describe_requests, fmt_bytes, kube_banner, machine, median, write_json, Bench, BenchCluster,
    KubeArgs, KubeRun, Progress, RelayProc, Table,
};

/// Arguments of `sessions`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Simulated edges.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// How long the sessions stay idle before memory is read.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "3s")]
    settle: Duration,
    /// Repetitions, each with a fresh relay (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
}

/// Checks an edge count argument.
pub(crate) fn check_edges(n: usize) -> Result<()> {
    ensure!(
        (1..=5000).contains(&n),
        "--edges must be between 1 and 5000 (got {n}); each simulated edge uses one UDP socket and a 127.0.x.y address"
    );
    Ok(())
}

/// Starts `n` in-process edge clients against `relay`.
pub(crate) fn spawn_edges(bench: &Bench, n: usize, relay: &RelayProc) -> Result<Vec<EdgeClient>> {
    // The allocator as the edge-client binary sets it (its main calls
    // this): with glibc's dynamic mmap threshold instead, each QUIC
    // attempt's 3 MB receive buffer (quinn: payload × GRO segments × 32)
    // came from the heap and was zeroed by hand, and a thousand edges
    // retrying through a relay restart spent their process's CPU on it.
    relay_transport::memory::keep_heap_top();
    (0..n)
        .map(|i| Ok(EdgeClient::spawn(edge_config(bench.pki(), i, relay.quic)?)))
        .collect()
}

/// Waits until every edge has established at least `sessions` sessions
/// (1 = first registration, 2 = back after one relay restart); returns
/// the time, from `t0`, at which the last one got there.
pub(crate) async fn wait_sessions(
    edges: &[EdgeClient],
    sessions: u64,
    t0: Instant,
    limit: Duration,
) -> Result<Duration> {
    Ok(wait_arrivals(edges, sessions, t0, limit).await?.all)
}

/// When the edges got there, from `t0`: how a storm's stragglers differ
/// from its bulk (a median alone hides whether one edge or a hundred
/// came late).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrivals {
    /// Half of the edges.
    pub(crate) half: Duration,
    /// 90 % of them.
    pub(crate) p90: Duration,
    /// 99 % of them.
    pub(crate) p99: Duration,
    /// All of them.
    pub(crate) all: Duration,
}

/// [`wait_sessions`], with the times at which half, 90 % and 99 % of the
/// edges were there.
pub(crate) async fn wait_arrivals(
    edges: &[EdgeClient],
    sessions: u64,
    t0: Instant,
    limit: Duration,
) -> Result<Arrivals> {
    use std::sync::atomic::Ordering::Relaxed;
    let count = || {
        edges
            .iter()
            .filter(|e| {
                e.stats().sessions.load(Relaxed) >= sessions
                    && matches!(e.state(), EdgeState::Connected { .. })
            })
            .count()
    };
    let n = edges.len();
    let deadline = t0 + limit;
    // Fractions in thousandths, so 1,000 edges give exact marks.
    let marks = [500, 900, 990];
    let mut at = [None; 3];
    loop {
        let c = count();
        let now = t0.elapsed();
        for (m, slot) in marks.iter().zip(at.iter_mut()) {
            if slot.is_none() && c * 1000 >= m * n {
                *slot = Some(now);
            }
        }
        if c == n {
            return Ok(Arrivals {
                half: at[0].unwrap_or(now),
                p90: at[1].unwrap_or(now),
                p99: at[2].unwrap_or(now),
                all: now,
            });
        }
        if Instant::now() >= deadline {
            let sample = edges
                .iter()
                .find(|e| !matches!(e.state(), EdgeState::Connected { .. }))
                .map(|e| format!("{:?}", e.state()))
                .unwrap_or_default();
            anyhow::bail!(
                "only {c} of {n} edges registered within {limit:?} (one waiting edge: {sample})"
            );
        }
        // 2 ms polling: adds at most 2 ms to the measured time.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the relay itself lists `n` sessions.
pub(crate) async fn wait_relay_count(relay: &RelayProc, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let c = relay.session_count().await?;
        if c as usize == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "relay lists {c} sessions, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the edges (bounded, concurrently).
pub(crate) async fn stop_edges(edges: Vec<EdgeClient>) {
    let mut set = tokio::task::JoinSet::new();
    for e in edges {
        set.spawn(e.shutdown());
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while set.join_next().await.is_some() {}
    })
    .await;
}

struct One {
    before: u64,
    after: u64,
    register_s: f64,
    failures: String,
    /// `--kube`: seconds until every Node said the tunnel is up, and the
    /// API requests from the relay's start to then.
    kube: Option<KubeRun>,
}

async fn run_once(
    bench: &Bench,
    n: usize,
    settle: Duration,
    cluster: Option<&BenchCluster>,
) -> Result<One> {
    let log0 = cluster.map(BenchCluster::log_len);
    let relay = bench.start_relay().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = relay.rss()?;
    let t0 = Instant::now();
    let edges = spawn_edges(bench, n, &relay)?;
    let took = {
        let counts: Vec<_> = edges.iter().map(|e| e.stats().clone()).collect();
        let _p = Progress::start(format!("sessions: {n} edges connecting"), move || {
            let c = counts
                .iter()
                .filter(|s| s.sessions.load(std::sync::atomic::Ordering::Relaxed) > 0)
                .count();
            format!("{c} registered")
        });
        wait_sessions(&edges, 1, t0, Duration::from_secs(60)).await?
    };
    wait_relay_count(&relay, n, Duration::from_secs(10)).await?;
    let kube = match (cluster, log0) {
        (Some(c), Some(from)) => {
            let ready = c.wait_ready(from, t0, Duration::from_secs(300)).await?;
            Some((ready.as_secs_f64(), c.requests_since(from)))
        }
        _ => None,
    };
    tokio::time::sleep(settle).await;
    let after = relay.rss()?;
    // Still all there after the idle period?
    wait_relay_count(&relay, n, Duration::from_secs(1)).await?;
    let failures = relay.handshake_failures().await?;
    stop_edges(edges).await;
    Ok(One {
        before,
        after,
        register_s: took.as_secs_f64(),
        failures,
        kube,
    })
}

/// Runs `sessions`.
pub(crate) async fn run(a: Args) -> Result<()> {
    check_edges(a.edges)?;
    ensure!(
        a.settle <= Duration::from_secs(600),
        "--settle must be at most 10m (got {:?})",
        a.settle
    );
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    let mut bench = Bench::new(a.edges)?;
    println!(
        "sessions: {} | {} simulated edges{}",
        machine(),
        a.edges,
        kube_banner(&a.kube)
    );
    let mut runs = Vec::new();
    for r in 0..a.runs {
        // A fresh cluster per run: from cold, no condition written yet.
        let cluster = a.kube.start(&mut bench)?;
        let o = run_once(&bench, a.edges, a.settle, cluster.as_ref())
            .await
            .with_context(|| format!("run {}", r + 1))?;
        if let Some((s, counts)) = &o.kube {
            eprintln!(
                "  run {}: every Node EdgeTunnelReady=True at {s:.3}s; API requests: {}",
                r + 1,
                describe_requests(counts, a.edges)
            );
        }
        eprintln!(
            "  run {}: relay RSS {} -> {}, all {} registered in {:.3}s; handshake failures on the way: {}",
            r + 1,
            fmt_bytes(o.before as f64),
            fmt_bytes(o.after as f64),
            a.edges,
            o.register_s,
            o.failures
        );
        runs.push(o);
    }
    let per: Vec<f64> = runs
        .iter()
        .map(|o| (o.after as f64 - o.before as f64) / a.edges as f64)
        .collect();
    let reg: Vec<f64> = runs.iter().map(|o| o.register_s).collect();
    let idle: Vec<f64> = runs.iter().map(|o| o.before as f64).collect();
    let after: Vec<f64> = runs.iter().map(|o| o.after as f64).collect();
    let mut t = Table::new(&["figure", "median", "runs"]);
    let kib = |x: f64| format!("{:.1} KiB", x / 1024.0);
    let mib = |x: f64| format!("{:.1} MiB", x / 1048576.0);
    let secs = |x: f64| format!("{x:.3} s");
    t.stat("relay RSS, no sessions", &idle, mib);
    t.stat(format!("relay RSS, {} sessions", a.edges), &after, mib);
    t.stat("relay memory per session", &per, kib);
    t.stat(format!("time until all {} registered", a.edges), &reg, secs);
    let ready: Vec<f64> = runs
        .iter()
        .filter_map(|o| Some(o.kube.as_ref()?.0))
        .collect();
    if !ready.is_empty() {
        t.stat(
            "time until every Node says EdgeTunnelReady=True",
            &ready,
            secs,
        );
    }
    t.print();
    write_json(
        a.json.as_deref(),
        &json!({"bench": "sessions", "machine": machine(), "relay": bench.bins.describe(),
                "edges": a.edges, "settle_s": a.settle.as_secs_f64(),
                "relay_rss_before": idle, "relay_rss_after": after,
                "bytes_per_session": per, "bytes_per_session_median": median(&per),
                "register_s": reg, "register_s_median": median(&reg),
                "handshake_failures": runs.iter().map(|o| o.failures.clone()).collect::<Vec<_>>(),
                "kube": a.kube.json(&ready, runs.iter().map(|o| o.kube.as_ref().map(|k| &k.1)))}),
    )
}
