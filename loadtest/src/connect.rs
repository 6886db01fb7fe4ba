//! `connect`: new connections per second (open, one round trip, close),
//! through the tunnel and directly (and through rathole with `--rathole`),
//! with K of them in flight at a time.

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
    /// Also run through rathole (this binary, e.g. `target/peers/bin/rathole`
    /// from `loadtest/peers/install-rathole.sh`) on the same loopback path,
    /// and print the tunnel / rathole ratios.
    #[arg(long)]
    rathole: Option<PathBuf>,
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

/// Per path, one entry per run: conns/s, p50 and p99 µs, CPU µs per
/// connection of the relay (or rathole's server) and of the edge (or
/// rathole's client).
#[derive(Default)]
struct Runs {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    relay_cpu: Vec<f64>,
    edge_cpu: Vec<f64>,
    errors: u64,
}

/// `a / b` of the medians and of each run (the runs of all paths
/// interleave, so run `i` of every path saw the same machine).
fn ratio(a: &[f64], b: &[f64]) -> (f64, Vec<f64>) {
    (
        median(a) / median(b),
        a.iter().zip(b).map(|(x, y)| x / y).collect(),
    )
}

fn joined(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(" ")
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
    let mut vias = vec![
        Via::Tunnel {
            proxy: relay.connect,
            target: echo,
        },
        Via::Direct(echo),
    ];
    let peer = crate::rathole::start_if(
        &bench,
        a.rathole.as_deref(),
        echo,
        crate::rathole::futures_probe::echo,
    )
    .await?;
    vias.extend(peer.as_ref().map(crate::rathole::Rathole::via));
    let peer_pids = peer
        .as_ref()
        .map(|r| {
            format!(
                " | rathole server pid {} client pid {}",
                r.server.pid(),
                r.client.pid()
            )
        })
        .unwrap_or_default();
    println!(
        "connect: {} | relay pid {} | edge pid {}{peer_pids} | echo {echo} | {} in flight",
        machine(),
        relay.child.pid(),
        edge.pid(),
        a.concurrency
    );
    // Runs interleave the paths (run 1 of every path, then run 2...), so a
    // change in the shared machine's load hits every path alike.
    let mut runs: Vec<Runs> = vias.iter().map(|_| Runs::default()).collect();
    for r in 0..a.runs {
        for (via, m) in vias.iter().zip(runs.iter_mut()) {
            // The processes whose CPU a connection costs: relay and edge,
            // or rathole's server and client; none for direct.
            let pids = match (via, &peer) {
                (Via::Tunnel { .. }, _) => Some((relay.child.pid(), edge.pid())),
                (Via::Peer { .. }, Some(p)) => Some((p.server.pid(), p.client.pid())),
                _ => None,
            };
            let cpu = || -> Result<(f64, f64)> {
                Ok(match pids {
                    Some((x, y)) => (cpu_secs(x)?, cpu_secs(y)?),
                    None => (0.0, 0.0),
                })
            };
            let done: Counter = Arc::new(AtomicU64::new(0));
            let d2 = done.clone();
            let _p = Progress::start(
                format!("connect {} run {}", via.label(), r + 1),
                move || format!("{} connections", get(&d2)),
            );
            let (rc0, ec0) = cpu()?;
            let o = run_once(*via, a.concurrency, a.duration, done).await?;
            let (rc1, ec1) = cpu()?;
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
            m.rate.push(o.ok as f64 / o.secs);
            m.p50.push(o.p50_us);
            m.p99.push(o.p99_us);
            m.relay_cpu.push((rc1 - rc0) * 1e6 / o.ok as f64);
            m.edge_cpu.push((ec1 - ec0) * 1e6 / o.ok as f64);
            m.errors += o.errors;
        }
    }
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
    for (via, m) in vias.iter().zip(&runs) {
        let proxied = !matches!(via, Via::Direct(_));
        let cpu = |v: &[f64]| {
            if proxied {
                format!("{:.0}", median(v))
            } else {
                "-".into()
            }
        };
        table.row(vec![
            via.label().into(),
            format!("{:.0}", median(&m.rate)),
            joined(&m.rate, |r| format!("{r:.0}")),
            format!("{:.0}", median(&m.p50)),
            format!("{:.0}", median(&m.p99)),
            m.errors.to_string(),
            cpu(&m.relay_cpu),
            cpu(&m.edge_cpu),
        ]);
        let cpu_json = |v: &Vec<f64>| if proxied { json!(v) } else { json!(null) };
        results.push(json!({
            "path": via.label(), "conns_per_s": m.rate, "conns_per_s_median": median(&m.rate),
            "p50_us": m.p50, "p99_us": m.p99, "errors": m.errors,
            "relay_cpu_us_per_conn": cpu_json(&m.relay_cpu),
            "edge_cpu_us_per_conn": cpu_json(&m.edge_cpu),
        }));
    }
    // Ratios of conns/s (of the medians, and run by run); tunnel / rathole
    // also compares the CPU per connection, relay against rathole's server
    // and edge against its client.
    let mut ratios = Vec::new();
    let pairs: &[(usize, usize)] = if peer.is_some() {
        &[(0, 1), (2, 1), (0, 2)]
    } else {
        &[(0, 1)]
    };
    for &(i, j) in pairs {
        let (x, y) = (&runs[i], &runs[j]);
        let name = format!("{} / {}", vias[i].label(), vias[j].label());
        let (rate, per_run) = ratio(&x.rate, &y.rate);
        let cpu = (j == 2).then(|| {
            (
                median(&x.relay_cpu) / median(&y.relay_cpu),
                median(&x.edge_cpu) / median(&y.edge_cpu),
            )
        });
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_default();
        table.row(vec![
            name.clone(),
            format!("{rate:.2}"),
            joined(&per_run, |r| format!("{r:.2}")),
            String::new(),
            String::new(),
            String::new(),
            cell(cpu.map(|c| c.0)),
            cell(cpu.map(|c| c.1)),
        ]);
        ratios.push(json!({
            "ratio": name, "conns_per_s": rate, "conns_per_s_per_run": per_run,
            "relay_cpu_per_conn": cpu.map(|c| c.0), "edge_cpu_per_conn": cpu.map(|c| c.1),
        }));
    }
    table.print();
    if peer.is_some() {
        println!("\nrathole: relay column = its server, edge column = its client.");
    }
    write_json(
        a.json.as_deref(),
        &json!({"bench": "connect", "machine": machine(), "relay": bench.bins.describe(),
                "concurrency": a.concurrency, "duration_s": a.duration.as_secs_f64(),
                "results": results, "ratios": ratios}),
    )
}
