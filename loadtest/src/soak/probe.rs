//! What a soak compares with its baseline: per process (from `/proc`) the
//! open fds, resident memory and threads; for the relay also the gauges of
//! its `/metrics` (live tokio tasks, open streams, sessions, CONNECT
//! connections, UDP flows); for the edges their live tokio tasks, from
//! their status endpoints (`edge_runtime_tasks`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::common::{fmt_bytes, AdminApi, Table};

/// One process's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcFigures {
    /// Entries of `/proc/<pid>/fd`.
    pub(crate) fds: u64,
    /// `VmRSS`.
    pub(crate) rss: u64,
    /// `Threads` of `/proc/<pid>/status`.
    pub(crate) threads: u64,
    /// Live tokio tasks, for a process with a status endpoint (an edge).
    pub(crate) tasks: Option<u64>,
}

/// A process a soak watches: its name, pid, and the status endpoint whose
/// `edge_runtime_tasks` it reads (an edge's; the relay's tasks come from
/// its admin API, see [`Gauges`]).
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    /// Shown in the tables (with the pid: a restarted process is another).
    pub(crate) name: String,
    /// Its pid.
    pub(crate) pid: u32,
    /// Its status endpoint, if it has one.
    pub(crate) status: Option<std::net::SocketAddr>,
}

/// Reads `pid`'s figures now ([`relay_lab::procfs::figures`]).
pub(crate) fn proc_figures(pid: u32) -> Result<ProcFigures> {
    let f = relay_lab::procfs::figures(pid)?;
    Ok(ProcFigures {
        fds: f.fds,
        rss: f.rss,
        threads: f.threads,
        tasks: None,
    })
}

/// [`proc_figures`] of `w`, with its tasks when it has a status endpoint.
async fn watched_figures(w: &Watched) -> Result<ProcFigures> {
    let mut f = proc_figures(w.pid)?;
    if let Some(addr) = w.status {
        let (code, body) = relay_lab::admin_get(addr, "/metrics", None)
            .await
            .with_context(|| format!("{}: status endpoint {addr}", w.name))?;
        ensure!(code == 200, "{}: /metrics answered {code}", w.name);
        let tasks = series(&body, "edge_runtime_tasks")
            .with_context(|| format!("{}: no edge_runtime_tasks", w.name))?;
        f.tasks = Some(tasks as u64);
    }
    Ok(f)
}

pub(crate) use relay_lab::metric_sample as series;

/// Sum of every labelled series of `name` whose labels contain `label`
/// (empty: all of them).
pub(crate) fn labelled(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// The relay's gauges.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gauges {
    /// `relay_runtime_tasks`.
    pub(crate) tasks: f64,
    /// `relay_streams_open`.
    pub(crate) streams: f64,
    /// `relay_sessions`.
    pub(crate) sessions: f64,
    /// `relay_connect_connections`.
    pub(crate) connect: f64,
    /// `relay_udp_flows`.
    pub(crate) udp_flows: f64,
}

/// Reads the relay's gauges.
pub(crate) async fn gauges(admin: &AdminApi) -> Result<Gauges> {
    let b = admin.metrics().await?;
    let g = |n: &str| series(&b, n).with_context(|| format!("no {n} in /metrics"));
    Ok(Gauges {
        tasks: g("relay_runtime_tasks")?,
        streams: g("relay_streams_open")?,
        sessions: g("relay_sessions")?,
        connect: g("relay_connect_connections")?,
        udp_flows: g("relay_udp_flows")?,
    })
}

/// Everything compared: the relay, the edges still running the same
/// process, and the relay's gauges.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// `(name, figures)` per process.
    pub(crate) procs: Vec<(String, ProcFigures)>,
    /// The relay's gauges.
    pub(crate) gauges: Gauges,
}

/// Takes a snapshot of `procs` and the relay's gauges.
pub(crate) async fn snapshot(procs: &[Watched], admin: &AdminApi) -> Result<Snapshot> {
    let mut v = Vec::with_capacity(procs.len());
    for w in procs {
        v.push((w.name.clone(), watched_figures(w).await?));
    }
    Ok(Snapshot {
        procs: v,
        gauges: gauges(admin).await?,
    })
}

/// [`snapshot`] for sampling under load: a process that is gone (an edge
/// being restarted) counts as zeros rather than failing the sample.
pub(crate) async fn snapshot_lenient(procs: &[Watched], admin: &AdminApi) -> Result<Snapshot> {
    let zero = ProcFigures {
        fds: 0,
        rss: 0,
        threads: 0,
        tasks: None,
    };
    let mut v = Vec::with_capacity(procs.len());
    for w in procs {
        v.push((w.name.clone(), watched_figures(w).await.unwrap_or(zero)));
    }
    Ok(Snapshot {
        procs: v,
        gauges: gauges(admin).await?,
    })
}

/// Whether the relay is idle: no streams, CONNECT connections or UDP
/// flows open, and `sessions` sessions.
fn idle(g: &Gauges, sessions: f64) -> bool {
    g.streams == 0.0 && g.connect == 0.0 && g.udp_flows == 0.0 && g.sessions == sessions
}

/// Waits (at most `limit`) until the relay is idle, lets the processes
/// settle `settle` more (freed memory returned, closed sockets reaped)
/// and takes a snapshot; repeated if the relay was busy again by then
/// (a connection the kernel still held in its listen queue arriving
/// late). Returns the snapshot and the wait.
pub(crate) async fn settled(
    procs: &[Watched],
    admin: &AdminApi,
    sessions: f64,
    limit: Duration,
    settle: Duration,
) -> Result<(Snapshot, Duration)> {
    let t0 = Instant::now();
    loop {
        let g = gauges(admin).await?;
        if idle(&g, sessions) {
            tokio::time::sleep(settle).await;
            let s = snapshot(procs, admin).await?;
            if idle(&s.gauges, sessions) {
                return Ok((s, t0.elapsed()));
            }
            eprintln!("  relay busy again after settling: {:?}", s.gauges);
        }
        ensure!(
            t0.elapsed() < limit,
            "relay not idle {limit:?} after the load: {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One compared figure.
pub(crate) struct Delta {
    /// What (`relay fds`).
    pub(crate) what: String,
    /// Baseline.
    pub(crate) before: f64,
    /// Under load (peak seen by the caller), if sampled.
    pub(crate) peak: Option<f64>,
    /// After the load, idle.
    pub(crate) after: f64,
    /// Bytes (formatting).
    pub(crate) bytes: bool,
}

impl Delta {
    /// Within `tol` (0.05) of the baseline: not above it by more.
    pub(crate) fn ok(&self, tol: f64) -> bool {
        self.after <= self.before * (1.0 + tol)
    }

    fn fmt(&self, v: f64) -> String {
        if self.bytes {
            fmt_bytes(v)
        } else {
            format!("{v:.0}")
        }
    }
}

/// The rows comparing `after` with `before` (procs matched by name;
/// `peak`, if given, the highest figures seen under load).
pub(crate) fn compare(before: &Snapshot, peak: Option<&Snapshot>, after: &Snapshot) -> Vec<Delta> {
    let mut v = Vec::new();
    for (name, b) in &before.procs {
        let Some((_, a)) = after.procs.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let p = peak.and_then(|p| p.procs.iter().find(|(n, _)| n == name).map(|x| x.1));
        let mut row = |what: &str, b: u64, p: Option<u64>, a: u64, bytes: bool| {
            v.push(Delta {
                what: format!("{name} {what}"),
                before: b as f64,
                peak: p.map(|x| x as f64),
                after: a as f64,
                bytes,
            })
        };
        row("fds", b.fds, p.map(|x| x.fds), a.fds, false);
        row("RSS", b.rss, p.map(|x| x.rss), a.rss, true);
        row("threads", b.threads, p.map(|x| x.threads), a.threads, false);
        if let (Some(bt), Some(at)) = (b.tasks, a.tasks) {
            row("tokio tasks", bt, p.and_then(|x| x.tasks), at, false);
        }
    }
    v.push(Delta {
        what: "relay tokio tasks".into(),
        before: before.gauges.tasks,
        peak: peak.map(|p| p.gauges.tasks),
        after: after.gauges.tasks,
        bytes: false,
    });
    v
}

/// Prints the comparison as a table, returns it as JSON and whether every
/// figure is within `tol` (RSS only if `check_rss`; otherwise its rows
/// are shown, marked `not checked`).
pub(crate) fn report(
    phase: &str,
    rows: &[Delta],
    tol: f64,
    check_rss: bool,
) -> (serde_json::Value, bool) {
    let mut t = Table::new(&["figure", "baseline", "under load", "after", "change", "ok"]);
    let mut all = true;
    let mut js = Vec::new();
    for d in rows {
        let ok = d.ok(tol);
        let checked = check_rss || !d.bytes;
        all &= ok || !checked;
        let change = if d.before > 0.0 {
            format!("{:+.1} %", (d.after - d.before) * 100.0 / d.before)
        } else {
            format!("{:+.0}", d.after - d.before)
        };
        t.row(vec![
            d.what.clone(),
            d.fmt(d.before),
            d.peak.map(|p| d.fmt(p)).unwrap_or_else(|| "-".into()),
            d.fmt(d.after),
            change,
            match (ok, checked) {
                (true, _) => "yes",
                (false, true) => "NO",
                (false, false) => "no (not checked)",
            }
            .into(),
        ]);
        js.push(json!({"figure": d.what, "before": d.before, "peak": d.peak, "after": d.after, "within": ok, "checked": checked}));
    }
    println!("{phase}: back to baseline (within {:.0} %)?", tol * 100.0);
    t.print();
    (json!(js), all)
}

/// Keeps the highest figures of each process seen while sampling.
pub(crate) fn keep_peak(peak: &mut Option<Snapshot>, now: Snapshot) {
    let Some(p) = peak else {
        *peak = Some(now);
        return;
    };
    for ((_, pf), (_, nf)) in p.procs.iter_mut().zip(&now.procs) {
        pf.fds = pf.fds.max(nf.fds);
        pf.rss = pf.rss.max(nf.rss);
        pf.threads = pf.threads.max(nf.threads);
        pf.tasks = pf.tasks.max(nf.tasks);
    }
    p.gauges.tasks = p.gauges.tasks.max(now.gauges.tasks);
}

/// Network statistics of the kernel (`/proc/net/netstat`): the value of
/// `TcpExt: name` (`ListenOverflows`: connections the kernel could not
/// queue for accept because the listen backlog was full).
pub(crate) fn tcp_ext(name: &str) -> Result<u64> {
    let t = std::fs::read_to_string("/proc/net/netstat")?;
    relay_lab::procfs::net_counter(&t, "TcpExt", name)
}
