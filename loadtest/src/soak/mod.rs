//! `soak`: one relay and two edges as real processes on loopback, loaded
//! in phases, each followed by a check that the processes came back to
//! where they started: open fds, RSS and threads per process (from
//! `/proc`), live tokio tasks of the relay (its `relay_runtime_tasks`) and
//! of each edge (`edge_runtime_tasks` from its status endpoint).
//!
//! - `tcp`: N tunnelled connections (CONNECT, 64-byte echo, close) over
//!   both edges, K at a time ([`mod@churn`]);
//! - `halfopen`: N half-open CONNECT clients held at once by helper
//!   processes ([`halfopen`]), while an established tunnel keeps echoing
//!   and new CONNECTs keep being tried ([`flood`]);
//! - `flap`: edge 1 killed and restarted F times in a window while edge 0
//!   carries traffic ([`flap`]);
//! - `badinput`: each row of `docs/bad-input.md` that reaches a running
//!   process sent K times, each row compared with the snapshot before it
//!   ([`badinput`]).
//!
//! UDP flows are not carried on loopback (they exist only through
//! capture, which needs nftables rules in network namespaces): see
//! `docs/benchmarks.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{edge_ip, edge_name, spawn_echo};
use serde_json::json;

use crate::common::{
    get, machine, write_json, Bench, ChildGuard, Counter, Progress, RelayProc, Via,
};

mod badinput;
mod churn;
mod flap;
mod flood;
pub(crate) mod halfopen;
mod probe;

pub(crate) use churn::churn;
use probe::{compare, report, settled, Snapshot};

/// Arguments of `soak`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Phases to run, in order (comma-separated: tcp, halfopen, flap,
    /// badinput; a
    /// phase may repeat: memory that grows again on a repeat is in use,
    /// memory that does not is what the allocator keeps once grown).
    #[arg(long, default_value = "tcp,halfopen,flap", value_delimiter = ',')]
    phases: Vec<String>,
    /// Tunnelled connections of the `tcp` phase.
    #[arg(long, default_value_t = 100_000)]
    connections: u64,
    /// Tunnelled connections of the warm-up before the baseline.
    #[arg(long, default_value_t = 2000)]
    warmup: u64,
    /// Connections in flight at once (tcp phase, warm-up).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Half-open CONNECT clients, all held at once.
    #[arg(long, default_value_t = 100_000)]
    halfopen: u64,
    /// Helper processes holding them (each below its fd limit).
    #[arg(long, default_value_t = 6)]
    halfopen_procs: u64,
    /// How long the helpers hold their sockets.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "30s")]
    halfopen_hold: Duration,
    /// The relay's `limits.connect_header_timeout` for the run.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "5s")]
    header_timeout: Duration,
    /// Restarts of edge 1 in the flap phase.
    #[arg(long, default_value_t = 100)]
    flaps: u64,
    /// The window they are spread over.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "60s")]
    flap_window: Duration,
    /// Repetitions of each bad input (badinput phase).
    #[arg(long, default_value_t = 1000)]
    repeat: u64,
    /// Rows of docs/bad-input.md to drive (badinput phase; comma-separated
    /// row numbers, default all it can drive).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Allowed growth over the baseline, percent.
    #[arg(long, default_value_t = 5.0)]
    tolerance: f64,
    /// How long to let the processes settle once the relay is idle.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "5s")]
    settle: Duration,
    /// Whether RSS back within the tolerance is part of the pass/fail
    /// (`check`), or only shown (`report`; fds, threads and tasks are
    /// always checked).
    #[arg(long, default_value = "check", value_parser = ["check", "report"])]
    rss: String,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The running setup.
pub(crate) struct Rig {
    pub(crate) bench: Bench,
    pub(crate) relay: RelayProc,
    pub(crate) edges: Vec<ChildGuard>,
    /// Echo services at edge 0's and edge 1's addresses (this process).
    pub(crate) echo: Vec<SocketAddr>,
    pub(crate) settle: Duration,
}

impl Rig {
    /// Tunnels to edge `i`'s echo.
    pub(crate) fn via(&self, i: usize) -> Via {
        Via::Tunnel {
            proxy: self.relay.connect,
            target: self.echo[i],
        }
    }

    /// The relay and the edges, with the edges' status endpoints.
    pub(crate) fn procs(&self) -> Vec<probe::Watched> {
        // Named with the pid: a restarted edge is another process, and
        // compares with nothing.
        let pid = self.relay.child.pid();
        let mut v = vec![probe::Watched {
            name: format!("relay (pid {pid})"),
            pid,
            status: None,
        }];
        for (i, e) in self.edges.iter().enumerate() {
            v.push(probe::Watched {
                name: format!("{} (pid {})", edge_name(i), e.pid()),
                pid: e.pid(),
                status: crate::common::listening_on(e.pid(), relay_lab::edge_ip(i)),
            });
        }
        v
    }

    /// Waits until the relay is idle with both sessions, then snapshots.
    pub(crate) async fn settled(&self) -> Result<Snapshot> {
        let (s, idle) = settled(
            &self.procs(),
            &self.relay.admin,
            2.0,
            Duration::from_secs(90),
            self.settle,
        )
        .await?;
        eprintln!("  relay idle {:.1}s after the load", idle.as_secs_f64());
        Ok(s)
    }
}

/// Samples the processes every 500 ms until stopped; keeps the peak (a
/// process gone meanwhile, a flapping edge, counts as zeros).
pub(crate) struct Sampler(
    tokio::task::JoinHandle<Option<Snapshot>>,
    Arc<tokio::sync::Notify>,
);

impl Sampler {
    /// Starts sampling `rig`'s processes.
    pub(crate) fn start(rig: &Rig) -> Sampler {
        let (procs, admin) = (rig.procs(), rig.relay.admin.clone());
        let stop = Arc::new(tokio::sync::Notify::new());
        let s2 = stop.clone();
        Sampler(
            tokio::spawn(async move {
                let mut peak = None;
                loop {
                    if let Ok(s) = probe::snapshot_lenient(&procs, &admin).await {
                        probe::keep_peak(&mut peak, s);
                    }
                    tokio::select! {
                        _ = s2.notified() => return peak,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }),
            stop,
        )
    }

    /// Stops and returns the peak.
    pub(crate) async fn stop(self) -> Option<Snapshot> {
        self.1.notify_one();
        self.0.await.ok().flatten()
    }
}

async fn start(a: &Args) -> Result<Rig> {
    let bad = a.phases.iter().any(|p| p == "badinput");
    // The badinput phase needs a node the relay lists but no process
    // serves (its stand-in edge), a certificate of a node it does not
    // list, an admin token to get wrong, and edges that allow only the
    // echo ports (to be asked for another one).
    let mut bench = Bench::new(if bad { badinput::STAND_IN + 1 } else { 2 })?;
    bench.relay_limits = format!(
        "connect_header_timeout = \"{}\"\n",
        humantime::format_duration(a.header_timeout)
    );
    let mut echo = Vec::new();
    for i in 0..2 {
        // The tasks end with the process (the runtime drops them).
        let (addr, _task) = spawn_echo(SocketAddr::new(edge_ip(i), 0)).await?;
        echo.push(addr);
    }
    if bad {
        bench.pki_mut().add_node(badinput::STRANGER)?;
        bench.admin_token = Some(badinput::ADMIN_TOKEN.into());
        bench.edge_top = format!("allowed_ports = [{}, {}]\n", echo[0].port(), echo[1].port());
    }
    let relay = bench.start_relay().await?;
    let edges = vec![
        bench.start_edge(0, &relay, None).await?,
        bench.start_edge(1, &relay, None).await?,
    ];
    // Their tasks are compared too: a soak that cannot read them fails.
    for (i, e) in edges.iter().enumerate() {
        crate::common::listening_on(e.pid(), relay_lab::edge_ip(i))
            .with_context(|| format!("{}: no status endpoint found", edge_name(i)))?;
    }
    Ok(Rig {
        bench,
        relay,
        edges,
        echo,
        settle: a.settle,
    })
}

/// Runs the `tcp` phase: `n` connections over both edges.
async fn tcp(rig: &Rig, n: u64, k: usize) -> Result<serde_json::Value> {
    let done: Counter = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    let _p = Progress::start("soak tcp", move || format!("{} connections", get(&d2)));
    let r = churn(vec![rig.via(0), rig.via(1)], n, Arc::default(), k, done).await?;
    println!(
        "soak tcp: {} connections in {:.1}s ({:.0}/s), {} failed{}; p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        r.ok,
        r.secs,
        r.ok as f64 / r.secs,
        r.errors,
        r.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        r.p50_us,
        r.p99_us,
        r.max_us
    );
    Ok(
        json!({"pass": r.errors == 0 && r.ok == n, "ok": r.ok, "errors": r.errors, "first_error": r.first_error, "secs": r.secs,
              "p50_us": r.p50_us, "p99_us": r.p99_us, "max_us": r.max_us}),
    )
}

pub(crate) fn snap_json(s: &Snapshot) -> serde_json::Value {
    json!({
        "procs": s.procs.iter().map(|(n, f)| json!({"name": n, "fds": f.fds, "rss": f.rss, "threads": f.threads})).collect::<Vec<_>>(),
        "relay_tasks": s.gauges.tasks,
    })
}

/// Runs `soak`.
pub(crate) async fn run(a: Args) -> Result<()> {
    for p in &a.phases {
        ensure!(
            ["tcp", "halfopen", "flap", "badinput"].contains(&p.as_str()),
            "unknown phase {p:?} (tcp, halfopen, flap, badinput)"
        );
    }
    ensure!(
        (1..=1_000_000).contains(&a.connections),
        "--connections 1 to 1000000"
    );
    ensure!((1..=100_000).contains(&a.warmup), "--warmup 1 to 100000");
    ensure!(
        (1..=1024).contains(&a.concurrency),
        "--concurrency 1 to 1024"
    );
    ensure!(
        (1..=200_000).contains(&a.halfopen),
        "--halfopen 1 to 200000"
    );
    ensure!(
        (1..=32).contains(&a.halfopen_procs),
        "--halfopen-procs 1 to 32"
    );
    ensure!(
        a.halfopen / a.halfopen_procs <= 18_000,
        "at most 18000 half-open clients per helper process (fd limit); add --halfopen-procs"
    );
    ensure!((1..=1000).contains(&a.flaps), "--flaps 1 to 1000");
    ensure!((1..=100_000).contains(&a.repeat), "--repeat 1 to 100000");
    ensure!(
        a.flap_window <= Duration::from_secs(600),
        "--flap-window at most 10m"
    );
    let tol = a.tolerance / 100.0;
    let check_rss = a.rss == "check";
    let mut rig = start(&a).await?;
    println!(
        "soak: {} | relay pid {} ({}) | edges {} {} | header timeout {:?}",
        machine(),
        rig.relay.child.pid(),
        rig.bench.bins.describe(),
        rig.edges[0].pid(),
        rig.edges[1].pid(),
        a.header_timeout
    );
    // Warm-up: the first connections size the runtime's and allocator's
    // pools; the baseline is what an idle relay that has served looks like.
    let warm = churn(
        vec![rig.via(0), rig.via(1)],
        a.warmup,
        Arc::default(),
        a.concurrency,
        Arc::default(),
    )
    .await?;
    ensure!(warm.errors == 0, "warm-up failed: {:?}", warm.first_error);
    let start_snap = rig.settled().await?;
    let mut out = json!({"bench": "soak", "machine": machine(), "relay": rig.bench.bins.describe(),
        "tolerance_pct": a.tolerance, "baseline": snap_json(&start_snap)});
    let mut all_ok = true;
    let mut before = start_snap.clone();
    for phase in &a.phases {
        let t0 = Instant::now();
        let sampler = Sampler::start(&rig);
        let res = match phase.as_str() {
            "tcp" => tcp(&rig, a.connections, a.concurrency).await?,
            "halfopen" => flood::run(&rig, a.halfopen, a.halfopen_procs, a.halfopen_hold).await?,
            "badinput" => {
                let s = badinput::Settings {
                    repeat: a.repeat,
                    rows: a.rows.clone(),
                    tol,
                    check_rss,
                    header_timeout: a.header_timeout,
                };
                badinput::run(&rig, &before, &s).await?
            }
            _ => flap::run(&mut rig, a.flaps, a.flap_window).await?,
        };
        let peak = sampler.stop().await;
        let after = rig.settled().await?;
        let (cmp, ok) = report(
            &format!("soak {phase}"),
            &compare(&before, peak.as_ref(), &after),
            tol,
            check_rss,
        );
        let phase_ok = res["pass"].as_bool().unwrap_or(true);
        all_ok &= ok && phase_ok;
        out[phase.as_str()] = json!({"result": res, "after": snap_json(&after), "compare": cmp,
            "within": ok, "phase_checks_passed": phase_ok, "took_s": t0.elapsed().as_secs_f64(), "peak": peak.as_ref().map(snap_json)});
        before = after;
    }
    let (cmp, ok) = report(
        "soak, whole run",
        &compare(&start_snap, None, &before),
        tol,
        check_rss,
    );
    all_ok &= ok;
    out["whole_run"] = json!({"compare": cmp, "within": ok});
    out["pass"] = json!(all_ok);
    write_json(a.json.as_deref(), &out)?;
    for e in &mut rig.edges {
        let _ = e.terminate(Duration::from_secs(5)).await;
    }
    rig.relay
        .child
        .terminate(Duration::from_secs(5))
        .await
        .context("stopping the relay")?;
    ensure!(
        all_ok,
        "soak: some figure did not return to its baseline or a phase failed (see above)"
    );
    println!("soak: PASS");
    Ok(())
}
