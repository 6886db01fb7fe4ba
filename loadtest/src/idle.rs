//! `rr-idle`: fixed-rate request/response through one edge while N idle
//! edges hold sessions to the same relay. The same runs without the idle
//! edges, with them, and straight to the service (the baseline), in one
//! invocation, so the table shows what the idle sessions cost the data
//! path (keep-alives, route and service feeds, timers).
//!
//! Processes: the relay; the measured edge (`edge-client`); the N idle
//! edges in a child of their own (`loadtest idle-edges-process`, one
//! `EdgeClient` and UDP socket each), so their timers never run on the
//! runtime of the client measuring the latency; the client and the echo
//! service here, as in `rr`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_lab::{edge_ip, edge_name, spawn_echo};
use relay_protocol::Cidr;
use relay_transport::tls::TlsMaterial;
use serde_json::{json, Value};

use crate::common::{
    cpu_secs, get, machine, median, write_json, Bench, Binaries, ChildGuard, Counter, Progress,
    RelayProc, Table, Via,
};
use crate::rr::{check_rate, fixed_rate, RrResult};
use crate::sessions::{check_edges, stop_edges, wait_relay_count, wait_sessions};

/// Arguments of `rr-idle`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Idle edges connected during the second set of runs.
    #[arg(long, default_value_t = 1000)]
    idle_edges: usize,
    /// Request (and response) size in bytes.
    #[arg(long, value_parser = crate::common::parse_bytes, default_value = "1KiB")]
    size: u64,
    /// Requests per second (all connections together).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    rate_conns: usize,
    /// Duration of each run.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Wait after the idle edges registered before measuring, so the
    /// registration burst (handshakes, route feeds) is over.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "5s")]
    settle: Duration,
    /// Runs per path and phase (the table shows medians).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run the idle edges inside this process, beside the measuring client
    /// and the echo service (the layout of `storm` and `sessions`), instead
    /// of in a child of their own: shows what the simulated fleet's own
    /// timers cost the client's runtime.
    #[arg(long)]
    idle_in_process: bool,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The idle edges: a child process, or `EdgeClient`s in this one.
enum Idle {
    Process(ChildGuard),
    InProcess(Vec<EdgeClient>),
}

/// Starts `n` idle edges (`edge-1` ..) inside this process and waits until
/// the relay lists them all (besides the measured edge).
async fn start_idle_here(bench: &Bench, relay: &RelayProc, n: usize) -> Result<(Idle, f64)> {
    let t0 = Instant::now();
    let edges = (1..=n)
        .map(|i| {
            Ok(EdgeClient::spawn(relay_lab::edge_config(
                bench.pki(),
                i,
                relay.quic,
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let took = wait_sessions(&edges, 1, t0, Duration::from_secs(180)).await?;
    wait_relay_count(relay, n + 1, Duration::from_secs(10)).await?;
    Ok((Idle::InProcess(edges), took.as_secs_f64()))
}

/// `idle-edges-process --pki DIR --relay A --first I --count N --ready-file R`:
/// N in-process edges `edge-I` .. `edge-(I+N-1)`, until SIGTERM.
#[derive(clap::Args, Debug)]
pub(crate) struct EdgesArgs {
    #[arg(long)]
    pki: PathBuf,
    #[arg(long)]
    relay: SocketAddr,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    ready_file: PathBuf,
}

/// Runs the idle edges (child process): writes the ready file once every
/// edge is registered, then idles until SIGTERM.
pub(crate) async fn edges_process(a: EdgesArgs) -> Result<()> {
    relay_transport::tls::install_default_provider();
    let ca = a.pki.join("ca.pem");
    let mut edges = Vec::with_capacity(a.count);
    for i in a.first..a.first + a.count {
        let name = edge_name(i);
        let tls = TlsMaterial::from_files(
            &a.pki.join(format!("{name}.pem")),
            &a.pki.join(format!("{name}-key.pem")),
            &ca,
        )?;
        let mut cfg = EdgeConfig::new(&name, a.relay.to_string(), "localhost", tls);
        cfg.routes = vec![Cidr::host(edge_ip(i))];
        cfg.primary_addr = Some(edge_ip(i));
        edges.push(EdgeClient::spawn(cfg));
    }
    let took = wait_sessions(&edges, 1, Instant::now(), Duration::from_secs(180)).await?;
    crate::procs::write_ready(&a.ready_file, &format!("{:.3}", took.as_secs_f64()))?;
    crate::procs::terminated().await?;
    stop_edges(edges).await;
    Ok(())
}

/// The load average (1, 5, 15 min) from `/proc/loadavg`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Starts the idle edges' process and waits until the relay lists them
/// all (besides the measured edge); returns it and the registration time.
async fn start_idle(bench: &Bench, relay: &RelayProc, n: usize) -> Result<(ChildGuard, f64)> {
    let ready = bench.dir.path().join("idle-edges-ready");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Binaries::self_cmd()?;
    cmd.arg("idle-edges-process")
        .arg("--pki")
        .arg(bench.pki_dir())
        .arg("--relay")
        .arg(relay.quic.to_string())
        .arg("--first")
        .arg("1")
        .arg("--count")
        .arg(n.to_string())
        .arg("--ready-file")
        .arg(&ready);
    let log = bench.dir.path().join("idle-edges.log");
    let mut child = ChildGuard::spawn("idle-edges", cmd, &log)?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(200);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            break t;
        }
        child
            .check_alive()
            .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        ensure!(
            Instant::now() < deadline,
            "the {n} idle edges did not register within 200 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_relay_count(relay, n + 1, Duration::from_secs(10)).await?;
    let took: f64 = text.trim().parse().unwrap_or(t0.elapsed().as_secs_f64());
    Ok((child, took))
}

/// One fixed-rate run, with the CPU the relay (and the idle edges'
/// process, if any) used meanwhile, in % of one core.
struct Run {
    rr: RrResult,
    relay_cpu: f64,
    idle_cpu: Option<f64>,
}

async fn one_run(
    via: Via,
    a: &Args,
    relay_pid: u32,
    idle_pid: Option<u32>,
    label: String,
) -> Result<Run> {
    let done: Counter = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    let _p = Progress::start(label.clone(), move || {
        format!("{} requests answered", get(&d2))
    });
    let r0 = cpu_secs(relay_pid)?;
    let i0 = idle_pid.map(cpu_secs).transpose()?;
    let t0 = Instant::now();
    let rr = fixed_rate(via, a.size as usize, a.rate, a.rate_conns, a.duration, done).await?;
    let secs = t0.elapsed().as_secs_f64();
    let relay_cpu = (cpu_secs(relay_pid)? - r0) / secs * 100.0;
    let idle_cpu = match (idle_pid, i0) {
        (Some(p), Some(c0)) => Some((cpu_secs(p)? - c0) / secs * 100.0),
        _ => None,
    };
    ensure!(
        rr.ok > 0,
        "{label}: no request answered ({} errors)",
        rr.errors
    );
    eprintln!(
        "  {label}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs; relay CPU {relay_cpu:.1} %{}",
        rr.us(0.5),
        rr.us(0.99),
        rr.us(0.999),
        rr.max_us(),
        idle_cpu
            .map(|c| format!(", idle edges' process {c:.1} %"))
            .unwrap_or_default()
    );
    Ok(Run {
        rr,
        relay_cpu,
        idle_cpu,
    })
}

/// Medians over runs: req/s, p50, p90, p99, p99.9, max, relay CPU %.
fn medians(runs: &[Run]) -> [f64; 7] {
    let m = |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    [
        m(&|r| r.rr.rate()),
        m(&|r| r.rr.us(0.5)),
        m(&|r| r.rr.us(0.9)),
        m(&|r| r.rr.us(0.99)),
        m(&|r| r.rr.us(0.999)),
        m(&|r| r.rr.max_us()),
        m(&|r| r.relay_cpu),
    ]
}

fn runs_json(runs: &[Run]) -> Value {
    runs.iter()
        .map(|r| {
            json!({
                "ok": r.rr.ok, "errors": r.rr.errors, "late": r.rr.late,
                "p50_us": r.rr.us(0.5), "p90_us": r.rr.us(0.9), "p99_us": r.rr.us(0.99),
                "p999_us": r.rr.us(0.999), "max_us": r.rr.max_us(),
                "relay_cpu_pct": r.relay_cpu, "idle_edges_cpu_pct": r.idle_cpu,
            })
        })
        .collect()
}

/// Runs `rr-idle`.
pub(crate) async fn run(a: Args) -> Result<()> {
    check_edges(a.idle_edges)?;
    check_rate(a.rate, a.rate_conns)?;
    ensure!(
        (1..=(1 << 20)).contains(&a.size),
        "--size must be between 1 byte and 1 MiB (got {})",
        a.size
    );
    ensure!(
        a.duration >= Duration::from_millis(100) && a.duration <= Duration::from_secs(3600),
        "--duration must be between 100ms and 1h (got {:?})",
        a.duration
    );
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
    let load_start = loadavg();
    let bench = Bench::new(a.idle_edges + 1)?;
    let relay = bench.start_relay().await?;
    let edge = bench.start_edge(0, &relay, None).await?;
    let (echo, _task) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    println!(
        "rr-idle: {} | load average {load_start} | relay pid {} | edge pid {} | {} B at {} req/s over {} conns, {:?} per run, {} runs | idle edges: {}",
        machine(),
        relay.child.pid(),
        edge.pid(),
        a.size,
        a.rate,
        a.rate_conns,
        a.duration,
        a.runs,
        a.idle_edges
    );
    let tunnel = Via::Tunnel {
        proxy: relay.connect,
        target: echo,
    };
    let direct = Via::Direct(echo);
    let rpid = relay.child.pid();

    // Alone first, then with the idle edges; direct in both phases, so a
    // change of the machine's load between the phases shows.
    let mut alone_t = Vec::new();
    let mut alone_d = Vec::new();
    for r in 0..a.runs {
        alone_t.push(
            one_run(
                tunnel,
                &a,
                rpid,
                None,
                format!("alone, tunnel, run {}", r + 1),
            )
            .await?,
        );
        alone_d.push(
            one_run(
                direct,
                &a,
                rpid,
                None,
                format!("alone, direct, run {}", r + 1),
            )
            .await?,
        );
    }
    let load_mid = loadavg();
    let (idle, reg_s) = {
        let _p = Progress::start(format!("{} idle edges connecting", a.idle_edges), || {
            String::new()
        });
        if a.idle_in_process {
            start_idle_here(&bench, &relay, a.idle_edges).await?
        } else {
            let (c, t) = start_idle(&bench, &relay, a.idle_edges).await?;
            (Idle::Process(c), t)
        }
    };
    eprintln!(
        "  {} idle edges registered in {reg_s:.1} s; settling {:?}",
        a.idle_edges, a.settle
    );
    tokio::time::sleep(a.settle).await;
    let ipid = match &idle {
        Idle::Process(c) => Some(c.pid()),
        Idle::InProcess(_) => None,
    };
    let mut idle_t = Vec::new();
    let mut idle_d = Vec::new();
    for r in 0..a.runs {
        idle_t.push(
            one_run(
                tunnel,
                &a,
                rpid,
                ipid,
                format!("{} idle, tunnel, run {}", a.idle_edges, r + 1),
            )
            .await?,
        );
        idle_d.push(
            one_run(
                direct,
                &a,
                rpid,
                ipid,
                format!("{} idle, direct, run {}", a.idle_edges, r + 1),
            )
            .await?,
        );
    }
    // Still all there?
    wait_relay_count(&relay, a.idle_edges + 1, Duration::from_secs(1)).await?;
    let load_end = loadavg();
    let idle_cpu = median(
        &idle_t
            .iter()
            .chain(&idle_d)
            .filter_map(|r| r.idle_cpu)
            .collect::<Vec<_>>(),
    );

    let idle_where = if a.idle_in_process {
        "in this process (beside the client and the echo service)".to_string()
    } else {
        format!("in their own process, {idle_cpu:.1} % CPU")
    };
    let mut table = Table::new(&[
        "idle edges",
        "path",
        "req/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "relay CPU %",
        "p99 runs",
    ]);
    let p99s = |runs: &[Run]| {
        runs.iter()
            .map(|r| format!("{:.0}", r.rr.us(0.99)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut row = |idle: &str, path: &str, m: [f64; 7], runs: &str| {
        table.row(vec![
            idle.into(),
            path.into(),
            format!("{:.0}", m[0]),
            format!("{:.0}", m[1]),
            format!("{:.0}", m[2]),
            format!("{:.0}", m[3]),
            format!("{:.0}", m[4]),
            format!("{:.0}", m[5]),
            format!("{:.1}", m[6]),
            runs.into(),
        ]);
    };
    let n = a.idle_edges.to_string();
    let (at, ad, it, id) = (
        medians(&alone_t),
        medians(&alone_d),
        medians(&idle_t),
        medians(&idle_d),
    );
    row("0", "tunnel", at, &p99s(&alone_t));
    row("0", "direct", ad, &p99s(&alone_d));
    row(&n, "tunnel", it, &p99s(&idle_t));
    row(&n, "direct", id, &p99s(&idle_d));
    table.print();
    println!(
        "tunnel p99 with / without the idle edges: {:.2}x ({:.0} vs {:.0} µs); added over direct: {:+.0} µs without, {:+.0} µs with; idle edges {idle_where}; load average {load_start} (start), {load_mid} (before the idle edges), {load_end} (end)",
        it[3] / at[3].max(1e-9),
        it[3],
        at[3],
        at[3] - ad[3],
        it[3] - id[3],
    );
    let med = |m: [f64; 7]| {
        json!({"req_per_s": m[0], "p50_us": m[1], "p90_us": m[2], "p99_us": m[3],
               "p999_us": m[4], "max_us": m[5], "relay_cpu_pct": m[6]})
    };
    if let Idle::InProcess(edges) = idle {
        stop_edges(edges).await;
    }
    write_json(
        a.json.as_deref(),
        &json!({"bench": "rr-idle", "machine": machine(), "relay": bench.bins.describe(),
                "loadavg": [load_start, load_mid, load_end],
                "idle_edges": a.idle_edges, "idle_in_process": a.idle_in_process, "idle_register_s": reg_s,
                "size": a.size, "rate": a.rate, "rate_conns": a.rate_conns,
                "duration_s": a.duration.as_secs_f64(), "settle_s": a.settle.as_secs_f64(),
                "idle_edges_cpu_pct": idle_cpu,
                "alone": {"tunnel": {"median": med(at), "runs": runs_json(&alone_t)},
                          "direct": {"median": med(ad), "runs": runs_json(&alone_d)}},
                "idle": {"tunnel": {"median": med(it), "runs": runs_json(&idle_t)},
                         "direct": {"median": med(id), "runs": runs_json(&idle_d)}}}),
    )
}
