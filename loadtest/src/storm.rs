//! `storm`: N edges connected, the relay process restarted (SIGTERM, then
//! a new process on the same ports); the time until all N are registered
//! again, and the latency of a fixed-rate `rr` run going on meanwhile
//! (through the tunnel to a service on edge 0), against the same run on a
//! quiet relay first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, spawn_echo};
use serde_json::json;

use crate::common::{
    describe_requests, get, kube_banner, machine, median, write_json, Bench, BenchCluster, Counter,
    KubeArgs, KubeRun, Progress, Table, Via,
};
use crate::rr::{check_rate, fixed_rate, RrResult};
use crate::sessions::{
    check_edges, spawn_edges, stop_edges, wait_arrivals, wait_relay_count, wait_sessions, Arrivals,
};

/// Arguments of `storm`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Simulated edges.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Request rate of the concurrent rr run (req/s, 1 KiB messages).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Connections of the concurrent rr run.
    #[arg(long, default_value_t = 4)]
    rate_conns: usize,
    /// Length of the rr run; the restart happens 2 s into it.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "15s")]
    rr_duration: Duration,
    /// Repetitions, each with a fresh fleet (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
}

struct One {
    quiet: RrResult,
    storm: RrResult,
    relay_exit_s: f64,
    relay_ready_s: f64,
    all_back_s: f64,
    /// When half, 90 % and 99 % were back.
    back: Arrivals,
    /// Edges that fell back to TLS over TCP during the restart.
    fell_back: u64,
    failures: String,
    /// `--kube`: seconds after SIGTERM until the new relay had checked
    /// every Node's condition and each said the tunnel is up, and the API
    /// requests from the SIGTERM to then.
    kube: Option<KubeRun>,
}

async fn run_once(bench: &Bench, a: &Args, cluster: Option<&BenchCluster>) -> Result<One> {
    let relay = bench.start_relay().await?;
    let (quic, connect) = (relay.quic, relay.connect);
    let t_start = Instant::now();
    let edges = spawn_edges(bench, a.edges, &relay)?;
    let took = wait_sessions(&edges, 1, t_start, Duration::from_secs(60)).await?;
    wait_relay_count(&relay, a.edges, Duration::from_secs(10)).await?;
    if let Some(c) = cluster {
        // Every condition up before the restart, so the restart's own
        // writes are what is measured.
        c.wait_ready(0, t_start, Duration::from_secs(300)).await?;
    }
    eprintln!(
        "  {} edges registered in {:.2}s",
        a.edges,
        took.as_secs_f64()
    );
    let (echo, _task) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let via = Via::Tunnel {
        proxy: connect,
        target: echo,
    };
    let quiet_len = Duration::from_secs(5).min(a.rr_duration);
    let done: Counter = Arc::new(AtomicU64::new(0));
    let quiet = fixed_rate(via, 1024, a.rate, a.rate_conns, quiet_len, done).await?;

    let done: Counter = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    let _p = Progress::start("storm rr", move || {
        format!("{} requests answered", get(&d2))
    });
    let (rate, conns, dur) = (a.rate, a.rate_conns, a.rr_duration);
    let rr = tokio::spawn(async move { fixed_rate(via, 1024, rate, conns, dur, done).await });
    tokio::time::sleep(Duration::from_secs(2).min(a.rr_duration / 4)).await;

    let mut relay = relay;
    let log0 = cluster.map(BenchCluster::log_len);
    let t0 = Instant::now();
    relay
        .child
        .terminate(Duration::from_secs(10))
        .await
        .context("stopping the relay")?;
    let relay_exit_s = t0.elapsed().as_secs_f64();
    // Requests from here on are the new relay's: the old one has exited.
    let log_new = cluster.map(BenchCluster::log_len);
    let fallbacks = || -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        edges
            .iter()
            .map(|e| e.stats().fallbacks.load(Relaxed))
            .sum()
    };
    let fallbacks_before = fallbacks();
    let relay = bench.start_relay_at(quic, connect).await?;
    let relay_ready_s = t0.elapsed().as_secs_f64();
    let back = wait_arrivals(&edges, 2, t0, Duration::from_secs(60)).await?;
    let fell_back = fallbacks() - fallbacks_before;
    wait_relay_count(&relay, a.edges, Duration::from_secs(10)).await?;
    let failures = relay.handshake_failures().await?;
    let kube = match (cluster, log0, log_new) {
        (Some(c), Some(from), Some(new)) => {
            let ready = c.wait_ready(new, t0, Duration::from_secs(300)).await?;
            Some((ready.as_secs_f64(), c.requests_since(from)))
        }
        _ => None,
    };
    let storm = tokio::time::timeout(a.rr_duration + Duration::from_secs(20), rr)
        .await
        .context("rr run did not end")???;
    stop_edges(edges).await;
    Ok(One {
        quiet,
        storm,
        relay_exit_s,
        relay_ready_s,
        all_back_s: back.all.as_secs_f64(),
        back,
        fell_back,
        failures,
        kube,
    })
}

/// Runs `storm`.
pub(crate) async fn run(a: Args) -> Result<()> {
    check_edges(a.edges)?;
    check_rate(a.rate, a.rate_conns)?;
    ensure!(
        a.rr_duration >= Duration::from_secs(1) && a.rr_duration <= Duration::from_secs(600),
        "--rr-duration must be between 1s and 10m (got {:?})",
        a.rr_duration
    );
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    let mut bench = Bench::new(a.edges)?;
    println!(
        "storm: {} | {} simulated edges, rr at {} req/s during the restart{}",
        machine(),
        a.edges,
        a.rate,
        kube_banner(&a.kube)
    );
    let mut runs = Vec::new();
    for r in 0..a.runs {
        let cluster = a.kube.start(&mut bench)?;
        let o = run_once(&bench, &a, cluster.as_ref())
            .await
            .with_context(|| format!("run {}", r + 1))?;
        if let Some((s, counts)) = &o.kube {
            eprintln!(
                "  run {}: every Node checked by the new relay and EdgeTunnelReady=True at {s:.2}s after SIGTERM; API requests since SIGTERM: {}",
                r + 1,
                describe_requests(counts, a.edges)
            );
        }
        eprintln!(
            "  run {}: relay exited {:.2}s after SIGTERM, new relay ready at {:.2}s, all {} back at {:.2}s (half at {:.2}s, 90 % {:.2}s, 99 % {:.2}s; {} fell back to TCP); rr p99 {:.0} µs quiet, {:.0} µs during ({} errors); new relay's handshake failures: {}",
            r + 1,
            o.relay_exit_s,
            o.relay_ready_s,
            a.edges,
            o.all_back_s,
            o.back.half.as_secs_f64(),
            o.back.p90.as_secs_f64(),
            o.back.p99.as_secs_f64(),
            o.fell_back,
            o.quiet.us(0.99),
            o.storm.us(0.99),
            o.storm.errors,
            o.failures
        );
        runs.push(o);
    }
    let f = |g: &dyn Fn(&One) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    let back = f(&|o| o.all_back_s);
    let exit = f(&|o| o.relay_exit_s);
    let ready = f(&|o| o.relay_ready_s);
    let qp50 = f(&|o| o.quiet.us(0.5));
    let qp99 = f(&|o| o.quiet.us(0.99));
    let sp50 = f(&|o| o.storm.us(0.5));
    let sp99 = f(&|o| o.storm.us(0.99));
    let smax = f(&|o| o.storm.max_us());
    let errs = f(&|o| o.storm.errors as f64);
    let gap = f(&|o| o.storm.max_gap);
    let mut t = Table::new(&["figure", "median", "runs"]);
    t.stat("relay exit after SIGTERM (s)", &exit, |x| format!("{x:.2}"));
    t.stat("new relay ready (s after SIGTERM)", &ready, |x| {
        format!("{x:.2}")
    });
    t.stat(
        format!("all {} edges registered again (s after SIGTERM)", a.edges),
        &back,
        |x| format!("{x:.2}"),
    );
    let ready = f(&|o| o.kube.as_ref().map_or(f64::NAN, |k| k.0));
    if a.kube.on() {
        t.stat(
            "every Node checked and EdgeTunnelReady=True again (s after SIGTERM)",
            &ready,
            |x| format!("{x:.2}"),
        );
    }
    t.stat("rr p50 µs, quiet relay", &qp50, |x| format!("{x:.0}"));
    t.stat("rr p99 µs, quiet relay", &qp99, |x| format!("{x:.0}"));
    t.stat("rr p50 µs, during restart", &sp50, |x| format!("{x:.0}"));
    t.stat("rr p99 µs, during restart", &sp99, |x| format!("{x:.0}"));
    t.stat("rr max µs, during restart", &smax, |x| format!("{x:.0}"));
    t.stat("rr failed requests during restart", &errs, |x| {
        format!("{x:.0}")
    });
    t.stat("rr longest time without an answer (s)", &gap, |x| {
        format!("{x:.2}")
    });
    t.print();
    write_json(
        a.json.as_deref(),
        &json!({"bench": "storm", "machine": machine(), "relay": bench.bins.describe(),
                "edges": a.edges, "rate": a.rate, "rr_duration_s": a.rr_duration.as_secs_f64(),
                "relay_exit_s": exit, "relay_ready_s": ready, "all_back_s": back,
                "all_back_s_median": median(&back),
                "rr_quiet_p50_us": qp50, "rr_quiet_p99_us": qp99,
                "rr_storm_p50_us": sp50, "rr_storm_p99_us": sp99, "rr_storm_max_us": smax,
                "rr_storm_errors": errs, "rr_storm_max_gap_s": gap,
                "kube": a.kube.json(&ready, runs.iter().map(|o| o.kube.as_ref().map(|k| &k.1))),
                "rr_storm_runs": runs.iter().map(|o| json!({"ok": o.storm.ok, "errors": o.storm.errors, "late": o.storm.late, "handshake_failures": o.failures})).collect::<Vec<_>>()}),
    )
}
