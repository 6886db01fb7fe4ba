//! `rr`: request/response of small messages to an echo service at the
//! edge, at a fixed rate and at the maximum rate C connections sustain;
//! latency percentiles (HdrHistogram), tunnel vs direct, added latency.
//! The fixed-rate client is reused by `storm`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use hdrhistogram::Histogram;
use relay_lab::{edge_ip, spawn_echo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{get, machine, median, write_json, Bench, Counter, Progress, Table, Via};

/// Arguments of `rr`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Request (and response) size in bytes.
    #[arg(long, value_parser = crate::common::parse_bytes, default_value = "1KiB")]
    size: u64,
    /// Requests per second of the fixed-rate run (all connections together).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Connections of the fixed-rate run.
    #[arg(long, default_value_t = 4)]
    rate_conns: usize,
    /// Connections of the max-rate run (closed loop, one request in flight each).
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Duration of each run.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Repetitions (the table shows medians of each figure).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency distribution plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Also run through rathole (this binary, e.g. `target/peers/bin/rathole`
    /// from `loadtest/peers/install-rathole.sh`) on the same loopback path.
    #[arg(long)]
    rathole: Option<PathBuf>,
}

/// A latency histogram in nanoseconds (1 ns to 100 s, 3 significant digits).
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds are valid")
}

/// What one request/response run measured.
pub(crate) struct RrResult {
    /// Latencies, ns.
    pub(crate) hist: Histogram<u64>,
    /// Requests answered.
    pub(crate) ok: u64,
    /// Requests that failed (connection errors, short echoes).
    pub(crate) errors: u64,
    /// Requests held up by the previous answer (fixed rate only).
    pub(crate) late: u64,
    /// Wall time of the run, s.
    pub(crate) secs: f64,
    /// Longest time one connection went without an answer, s (shows an
    /// outage, e.g. a relay restart).
    pub(crate) max_gap: f64,
}

impl RrResult {
    /// Requests per second.
    pub(crate) fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    /// Percentile in µs.
    pub(crate) fn us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// Max in µs.
    pub(crate) fn max_us(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    fn json(&self) -> Value {
        json!({
            "ok": self.ok, "errors": self.errors, "late": self.late, "secs": self.secs,
            "req_per_s": self.rate(),
            "p50_us": self.us(0.5), "p90_us": self.us(0.9), "p99_us": self.us(0.99),
            "p999_us": self.us(0.999), "max_us": self.max_us(),
        })
    }
}

/// One request: write `msg`, read the same number of bytes back.
async fn round_trip(s: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> Result<()> {
    s.write_all(msg).await?;
    s.read_exact(back).await?;
    ensure!(back == msg, "echo differs from the request");
    Ok(())
}

/// Worker outcome: histogram, ok, errors, late, longest gap (s).
type Worker = (Histogram<u64>, u64, u64, u64, f64);

/// Fixed rate: `rate` req/s over `conns` connections for `dur`. Latency is
/// measured from the send, or from the scheduled time when the previous
/// answer on the connection came after it (coordinated omission
/// correction: a slow answer is charged to the requests it delayed). A
/// failed request is not charged to the next one: it counts as an error,
/// the connection is reopened at the next tick (so this keeps going
/// through a relay restart), and the time without answers shows as
/// `max_gap`.
pub(crate) async fn fixed_rate(
    via: Via,
    size: usize,
    rate: u64,
    conns: usize,
    dur: Duration,
    done: Counter,
) -> Result<RrResult> {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = t0 + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let done = done.clone();
        let offset = interval.mul_f64(c as f64 / conns as f64);
        tasks.spawn(async move {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + c) as u8).collect();
            let mut back = vec![0u8; size];
            let mut h = new_hist();
            let (mut ok, mut errors, mut late) = (0u64, 0u64, 0u64);
            let mut conn: Option<TcpStream> = None;
            let mut k = 0u32;
            let mut prev_done = t0;
            let mut prev_failed = false;
            let mut last_ok = t0;
            let mut max_gap = Duration::ZERO;
            loop {
                let intended = t0 + offset + interval * k;
                k += 1;
                // The second test bounds the run when requests time out
                // (an outage): ticks already past are not replayed.
                if intended >= end || tokio::time::Instant::now() >= end {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                let sent = tokio::time::Instant::now();
                // Held up by the previous answer: the wait is the system's
                // fault and counts. Otherwise any lateness is the timer's
                // (tokio rounds sleeps up to the next millisecond).
                let start = if prev_done > intended && !prev_failed {
                    late += 1;
                    intended
                } else {
                    sent
                };
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    if conn.is_none() {
                        conn = Some(via.open().await?);
                    }
                    let s = conn.as_mut().expect("just set");
                    round_trip(s, &msg, &mut back).await
                })
                .await;
                prev_done = tokio::time::Instant::now();
                prev_failed = !matches!(r, Ok(Ok(())));
                if prev_failed {
                    errors += 1;
                    conn = None;
                } else {
                    let _ = h.record(start.elapsed().as_nanos().max(1) as u64);
                    ok += 1;
                    done.fetch_add(1, Relaxed);
                    max_gap = max_gap.max(prev_done - last_ok);
                    last_ok = prev_done;
                }
            }
            (h, ok, errors, late, max_gap.as_secs_f64())
        });
    }
    collect(tasks, dur).await
}

/// Max rate: `conns` connections in a closed loop for `dur`.
pub(crate) async fn max_rate(
    via: Via,
    size: usize,
    conns: usize,
    dur: Duration,
    done: Counter,
) -> Result<RrResult> {
    let mut opened = Vec::with_capacity(conns);
    for _ in 0..conns {
        opened.push(via.open().await?);
    }
    let end = Instant::now() + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mut s) in opened.into_iter().enumerate() {
        let done = done.clone();
        tasks.spawn(async move {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + c) as u8).collect();
            let mut back = vec![0u8; size];
            let mut h = new_hist();
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    round_trip(&mut s, &msg, &mut back),
                )
                .await
                {
                    Ok(Ok(())) => {
                        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                        ok += 1;
                        done.fetch_add(1, Relaxed);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (h, ok, errors, 0, 0.0)
        });
    }
    collect(tasks, dur).await
}

async fn collect(mut tasks: tokio::task::JoinSet<Worker>, dur: Duration) -> Result<RrResult> {
    let t0 = Instant::now();
    let mut out = RrResult {
        hist: new_hist(),
        ok: 0,
        errors: 0,
        late: 0,
        secs: 0.0,
        max_gap: 0.0,
    };
    // Every request has a 5 s timeout, so workers end by dur + 5 s.
    let limit = dur + Duration::from_secs(10);
    let all = async {
        while let Some(r) = tasks.join_next().await {
            let (h, ok, errors, late, gap) = r?;
            out.max_gap = out.max_gap.max(gap);
            out.hist.add(&h)?;
            out.ok += ok;
            out.errors += errors;
            out.late += late;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(limit, all)
        .await
        .map_err(|_| anyhow::anyhow!("rr workers did not finish within {limit:?}"))??;
    out.secs = dur.as_secs_f64().min(t0.elapsed().as_secs_f64()).max(1e-9);
    Ok(out)
}

/// Checks the shared rr arguments.
pub(crate) fn check_rate(rate: u64, conns: usize) -> Result<()> {
    ensure!(
        (1..=1_000_000).contains(&rate),
        "--rate must be between 1 and 1000000 req/s (got {rate})"
    );
    ensure!(
        (1..=1000).contains(&conns),
        "--rate-conns must be between 1 and 1000 (got {conns})"
    );
    ensure!(
        rate >= conns as u64,
        "--rate ({rate}) must be at least --rate-conns ({conns}): each connection sends at least 1 req/s"
    );
    Ok(())
}

/// Runs `rr`.
pub(crate) async fn run(a: Args) -> Result<()> {
    ensure!(
        (1..=(1 << 20)).contains(&a.size),
        "--size must be between 1 byte and 1 MiB (got {})",
        a.size
    );
    check_rate(a.rate, a.rate_conns)?;
    ensure!(
        (1..=4096).contains(&a.conns),
        "--conns must be between 1 and 4096 (got {})",
        a.conns
    );
    ensure!(
        a.duration >= Duration::from_millis(100) && a.duration <= Duration::from_secs(3600),
        "--duration must be between 100ms and 1h (got {:?})",
        a.duration
    );
    ensure!(
        (1..=20).contains(&a.runs),
        "--runs must be between 1 and 20 (got {})",
        a.runs
    );
    let size = a.size as usize;
    let bench = Bench::new(1)?;
    let relay = bench.start_relay().await?;
    let edge = bench.start_edge(0, &relay, None).await?;
    let (echo, _task) = spawn_echo(std::net::SocketAddr::new(edge_ip(0), 0)).await?;
    println!(
        "rr: {} | relay pid {} | edge pid {} | echo {echo} | {size} B messages",
        machine(),
        relay.child.pid(),
        edge.pid()
    );
    let mut vias = vec![
        Via::Tunnel {
            proxy: relay.connect,
            target: echo,
        },
        Via::Direct(echo),
    ];
    let _peer = match &a.rathole {
        Some(bin) => {
            let r = crate::rathole::start(&bench, bin, echo, crate::rathole::futures_probe::echo)
                .await?;
            vias.push(Via::Peer {
                addr: r.addr,
                name: "rathole",
            });
            Some(r)
        }
        None => None,
    };
    let modes = [
        (format!("{} req/s", a.rate), a.rate_conns, true),
        ("max rate".to_string(), a.conns, false),
    ];
    let mut table = Table::new(&[
        "mode",
        "conns",
        "path",
        "req/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "errors",
        "late",
    ]);
    let mut results = Vec::new();
    let mut plot = Vec::new();
    for (mode, conns, fixed) in &modes {
        // Per path: the median of each figure over the runs.
        let mut meds: Vec<[f64; 6]> = Vec::new();
        for &via in &vias {
            let mut runs: Vec<RrResult> = Vec::new();
            for r in 0..a.runs {
                let done: Counter = Arc::new(AtomicU64::new(0));
                let d2 = done.clone();
                let _p = Progress::start(
                    format!("rr {mode} {} run {}", via.label(), r + 1),
                    move || format!("{} requests answered", get(&d2)),
                );
                let res = if *fixed {
                    fixed_rate(via, size, a.rate, *conns, a.duration, done).await?
                } else {
                    max_rate(via, size, *conns, a.duration, done).await?
                };
                ensure!(
                    res.ok > 0,
                    "rr {mode} {}: no request was answered ({} errors)",
                    via.label(),
                    res.errors
                );
                runs.push(res);
            }
            let m = |f: &dyn Fn(&RrResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
            let row = [
                m(&|r| r.rate()),
                m(&|r| r.us(0.5)),
                m(&|r| r.us(0.9)),
                m(&|r| r.us(0.99)),
                m(&|r| r.us(0.999)),
                m(&|r| r.max_us()),
            ];
            let errors: u64 = runs.iter().map(|r| r.errors).sum();
            let late: u64 = runs.iter().map(|r| r.late).sum();
            table.row(vec![
                mode.clone(),
                conns.to_string(),
                via.label().into(),
                format!("{:.0}", row[0]),
                format!("{:.0}", row[1]),
                format!("{:.0}", row[2]),
                format!("{:.0}", row[3]),
                format!("{:.0}", row[4]),
                format!("{:.0}", row[5]),
                errors.to_string(),
                if *fixed { late.to_string() } else { "-".into() },
            ]);
            // Plot the run whose p99 is the median one.
            let mut idx: Vec<usize> = (0..runs.len()).collect();
            idx.sort_by(|&x, &y| runs[x].us(0.99).total_cmp(&runs[y].us(0.99)));
            let pick = &runs[idx[idx.len() / 2]];
            plot.push(crate::svg::Series {
                label: format!("{mode}, {conns} conns, {}", via.label()),
                points: crate::svg::percentile_points(&pick.hist),
                dashed: matches!(via, Via::Direct(_)),
            });
            results.push(json!({
                "mode": mode, "conns": conns, "path": via.label(),
                "median": {"req_per_s": row[0], "p50_us": row[1], "p90_us": row[2], "p99_us": row[3], "p999_us": row[4], "max_us": row[5]},
                "runs": runs.iter().map(RrResult::json).collect::<Vec<_>>(),
            }));
            meds.push(row);
        }
        let (t, d) = (meds[0], meds[1]);
        if let Some(p) = meds.get(2) {
            table.row(vec![
                mode.clone(),
                conns.to_string(),
                "rathole added".into(),
                "".into(),
                format!("{:+.0}", p[1] - d[1]),
                format!("{:+.0}", p[2] - d[2]),
                format!("{:+.0}", p[3] - d[3]),
                format!("{:+.0}", p[4] - d[4]),
                format!("{:+.0}", p[5] - d[5]),
                "".into(),
                "".into(),
            ]);
        }
        table.row(vec![
            mode.clone(),
            conns.to_string(),
            "added".into(),
            "".into(),
            format!("{:+.0}", t[1] - d[1]),
            format!("{:+.0}", t[2] - d[2]),
            format!("{:+.0}", t[3] - d[3]),
            format!("{:+.0}", t[4] - d[4]),
            format!("{:+.0}", t[5] - d[5]),
            "".into(),
            "".into(),
        ]);
        results.push(json!({
            "mode": mode, "conns": conns, "path": "added",
            "median": {"p50_us": t[1] - d[1], "p90_us": t[2] - d[2], "p99_us": t[3] - d[3], "p999_us": t[4] - d[4], "max_us": t[5] - d[5]},
        }));
    }
    table.print();
    if let Some(p) = &a.svg {
        let title = format!(
            "rr latency by percentile, {size} B request/response, loopback ({})",
            machine()
        );
        std::fs::write(p, crate::svg::percentile_plot(&title, &plot))?;
        eprintln!("wrote {}", p.display());
    }
    write_json(
        a.json.as_deref(),
        &json!({"bench": "rr", "machine": machine(), "relay": bench.bins.describe(),
                "size": size, "duration_s": a.duration.as_secs_f64(), "results": results}),
    )
}
