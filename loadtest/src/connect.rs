//! `connect`: new connections per second (open, one round trip, close),
//! through the tunnel and directly, with K of them in flight at a time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, spawn_echo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    cpu_secs, get, machine, median, write_json, Bench, Counter, Progress, Table, Via,
};
use crate::rr::new_hist;

/// Arguments of `connect`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Connections in flight at once (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Duration of each run.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Repetitions (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One connection's life: open, 64-byte round trip, half-close, wait for
/// the service's close.
pub(crate) async fn one(via: Via) -> Result<()> {
    let mut s = via.open().await?;
    let msg = [0x42u8; 64];
    s.write_all(&msg).await?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await?;
    ensure!(back == msg, "echo differs");
    s.shutdown().await?;
    let mut rest = [0u8; 1];
    let n = s.read(&mut rest).await?;
    ensure!(n == 0, "data after the echo");
    Ok(())
}

struct Outcome {
    ok: u64,
    errors: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    first_error: Option<String>,
}

async fn run_once(via: Via, k: usize, dur: Duration, done: Counter) -> Result<Outcome> {
    let t0 = Instant::now();
    let end = t0 + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..k {
        let done = done.clone();
        tasks.spawn(async move {
            let mut h = new_hist();
            let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), one(via)).await {
                    Ok(Ok(())) => {
                        ok += 1;
                        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        first.get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        errors += 1;
                        first.get_or_insert("timed out after 5s".to_string());
                    }
                }
            }
            (h, ok, errors, first)
        });
    }
    let mut h = new_hist();
    let mut out = Outcome {
        ok: 0,
        errors: 0,
        secs: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        first_error: None,
    };
    let limit = dur + Duration::from_secs(10);
    tokio::time::timeout(limit, async {
        while let Some(r) = tasks.join_next().await {
            let (wh, ok, errors, first) = r?;
            h.add(&wh)?;
            out.ok += ok;
            out.errors += errors;
            if out.first_error.is_none() {
                out.first_error = first;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("connect workers did not finish in time")??;
    out.secs = t0.elapsed().as_secs_f64();
    out.p50_us = h.value_at_quantile(0.5) as f64 / 1000.0;
    out.p99_us = h.value_at_quantile(0.99) as f64 / 1000.0;
    Ok(out)
}

/// Runs `connect`.
pub(crate) async fn run(a: Args) -> Result<()> {
    ensure!(
        (1..=1024).contains(&a.concurrency),
        "--concurrency must be between 1 and 1024 (got {})",
        a.concurrency
    );
    ensure!(
        a.duration >= Duration::from_millis(100) && a.duration <= Duration::from_secs(600),
        "--duration must be between 100ms and 10m (got {:?})",
        a.duration
    );
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    let bench = Bench::new(1)?;
    let relay = bench.start_relay().await?;
    let edge = bench.start_edge(0, &relay, None).await?;
    let (echo, _task) = spawn_echo(std::net::SocketAddr::new(edge_ip(0), 0)).await?;
    println!(
        "connect: {} | relay pid {} | edge pid {} | echo {echo} | {} in flight",
        machine(),
        relay.child.pid(),
        edge.pid(),
        a.concurrency
    );
    let vias = [
        Via::Tunnel {
            proxy: relay.connect,
            target: echo,
        },
        Via::Direct(echo),
    ];
    let mut table = Table::new(&[
        "path",
        "conns/s (median)",
        "runs",
        "p50 µs",
        "p99 µs",
        "errors",
        "relay CPU µs/conn",
        "edge CPU µs/conn",
    ]);
    let mut results = Vec::new();
    for via in vias {
        let mut rates = Vec::new();
        let (mut p50, mut p99, mut rcpu, mut ecpu) = (vec![], vec![], vec![], vec![]);
        let mut errors = 0;
        for r in 0..a.runs {
            let done: Counter = Arc::new(AtomicU64::new(0));
            let d2 = done.clone();
            let _p = Progress::start(
                format!("connect {} run {}", via.label(), r + 1),
                move || format!("{} connections", get(&d2)),
            );
            let (rc0, ec0) = (cpu_secs(relay.child.pid())?, cpu_secs(edge.pid())?);
            let o = run_once(via, a.concurrency, a.duration, done).await?;
            let (rc1, ec1) = (cpu_secs(relay.child.pid())?, cpu_secs(edge.pid())?);
            ensure!(
                o.ok > 0,
                "connect {}: no connection completed ({} errors, first: {:?})",
                via.label(),
                o.errors,
                o.first_error
            );
            if let Some(e) = &o.first_error {
                eprintln!("  connect {}: {} errors, first: {e}", via.label(), o.errors);
            }
            rates.push(o.ok as f64 / o.secs);
            p50.push(o.p50_us);
            p99.push(o.p99_us);
            rcpu.push((rc1 - rc0) * 1e6 / o.ok as f64);
            ecpu.push((ec1 - ec0) * 1e6 / o.ok as f64);
            errors += o.errors;
        }
        let tunnel = matches!(via, Via::Tunnel { .. });
        let cpu = |v: &[f64]| {
            if tunnel {
                format!("{:.0}", median(v))
            } else {
                "-".into()
            }
        };
        table.row(vec![
            via.label().into(),
            format!("{:.0}", median(&rates)),
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            format!("{:.0}", median(&p50)),
            format!("{:.0}", median(&p99)),
            errors.to_string(),
            cpu(&rcpu),
            cpu(&ecpu),
        ]);
        results.push(json!({
            "path": via.label(), "conns_per_s": rates, "conns_per_s_median": median(&rates),
            "p50_us": p50, "p99_us": p99, "errors": errors,
            "relay_cpu_us_per_conn": if tunnel { json!(rcpu) } else { json!(null) },
            "edge_cpu_us_per_conn": if tunnel { json!(ecpu) } else { json!(null) },
        }));
    }
    table.print();
    write_json(
        a.json.as_deref(),
        &json!({"bench": "connect", "machine": machine(), "relay": bench.bins.describe(),
                "concurrency": a.concurrency, "duration_s": a.duration.as_secs_f64(), "results": results}),
    )
}
