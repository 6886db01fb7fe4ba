//! The `badinput` phase: the rows of `docs/bad-input.md` that reach a
//! running relay or edge, each sent K times to the soak's processes
//! (driven the way the row's test drives it), then the relay left to
//! settle and compared with the snapshot before the row: open fds,
//! threads and the relay's tokio tasks must be back exactly, RSS within
//! the tolerance, every repetition must have got the row's typed answer,
//! and a tunnel opened before the row must have lost no echo.
//!
//! Rows that never reach a running process (configuration refused at
//! start, decoder-only and fuzzing rows) are not driven here; the table
//! says so for each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::edge_name;
use serde_json::json;

use super::flood::echo_probe;
use super::probe::{compare, Delta, Snapshot};
use super::{snap_json, Rig};
use crate::common::fmt_bytes;

mod cases;
mod http;
mod quic;

use cases::{one, Case, Ctx, Kind, CASES};
use quic::FakeEdge;

/// The admin token of the relay while this phase may run (the wrong-token
/// row needs a relay that has one).
pub(crate) const ADMIN_TOKEN: &str = "soak-badinput-admin-token-0123456789";

/// A node listed in the relay's `[nodes]` with no process: the stand-in
/// edge of the edge-stream rows is this node.
pub(crate) const STAND_IN: usize = 2;

/// A node the relay's CA signed but `[nodes]` does not list.
pub(crate) const STRANGER: &str = "stranger";

/// How long the tunnel opened before a row keeps echoing after it.
const PROBE_AFTER: Duration = Duration::from_millis(200);

/// Runs `k` repetitions of `case`, `parallel` at a time; answers by name.
async fn repeat(
    ctx: &Arc<Ctx>,
    case: &Case,
    fake: Option<Arc<FakeEdge>>,
    k: u64,
) -> Result<BTreeMap<String, u64>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..case.parallel.min(k as usize).max(1) {
        let (ctx, next, fake, kind) = (ctx.clone(), next.clone(), fake.clone(), case.kind);
        set.spawn(async move {
            let mut m = BTreeMap::<String, u64>::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= k {
                    return m;
                }
                let o = match one(&ctx, kind, fake.as_deref(), i).await {
                    Ok(o) => o,
                    Err(e) => format!("client error: {e:#}"),
                };
                *m.entry(o).or_default() += 1;
            }
        });
    }
    let mut all = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        for (o, n) in r.context("a repetition panicked")? {
            *all.entry(o).or_default() += n;
        }
    }
    Ok(all)
}

/// The relay's counters (`*_total` series) that moved between two
/// `/metrics` bodies: the typed refusals it counted.
fn counted(before: &str, after: &str) -> BTreeMap<String, f64> {
    let parse = |b: &str| -> BTreeMap<String, f64> {
        b.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(k, _)| k.split('{').next().is_some_and(|n| n.ends_with("_total")))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect()
    };
    let (b, a) = (parse(before), parse(after));
    a.into_iter()
        .filter_map(|(k, v)| {
            let d = v - b.get(&k).copied().unwrap_or(0.0);
            (d != 0.0).then_some((k, d))
        })
        .collect()
}

/// Whether a figure is back: fds, threads and tasks exactly, RSS within
/// `tol` (checked only if `check_rss`).
fn back(d: &Delta, tol: f64, check_rss: bool) -> bool {
    if d.bytes {
        !check_rss || d.ok(tol)
    } else {
        d.after == d.before
    }
}

/// Bound on the wait for counts to come back after the settle.
const LATE_LIMIT: Duration = Duration::from_secs(20);

/// Polls from the settled snapshot `after` until fds, threads and tasks
/// equal `before`'s, at most [`LATE_LIMIT`]: a refused QUIC connection's
/// state lives on for a moment after the refusal (the relay gives the edge
/// up to 2 s to read it; QUIC then drains for three probe timeouts), and
/// that is not a leak unless it stays. Returns the last snapshot and the
/// wait.
async fn until_back(rig: &Rig, before: &Snapshot, after: Snapshot) -> Result<(Snapshot, Duration)> {
    let t0 = Instant::now();
    let mut now = after;
    while !compare(before, None, &now)
        .iter()
        .all(|d| back(d, 0.0, false))
        && t0.elapsed() < LATE_LIMIT
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = super::probe::snapshot(&rig.procs(), &rig.relay.admin).await?;
    }
    Ok((now, t0.elapsed()))
}

/// `before→after` of the compared figures, short (`relay fds 15→15, ...`).
fn figures(rows: &[Delta]) -> String {
    rows.iter()
        .map(|d| {
            // `relay (pid 7) fds` → `relay fds`: the pids are in the JSON.
            let what = match (d.what.find(" (pid "), d.what.find(") ")) {
                (Some(a), Some(b)) if a < b => format!("{}{}", &d.what[..a], &d.what[b + 1..]),
                _ => d.what.clone(),
            };
            if d.bytes {
                let pct = (d.after - d.before) * 100.0 / d.before.max(1.0);
                format!(
                    "{what} {}→{} ({pct:+.1} %)",
                    fmt_bytes(d.before),
                    fmt_bytes(d.after)
                )
            } else {
                format!("{what} {:.0}→{:.0}", d.before, d.after)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Settings of the phase.
pub(crate) struct Settings {
    /// Repetitions per row.
    pub(crate) repeat: u64,
    /// Rows to run (empty: all).
    pub(crate) rows: Vec<String>,
    /// RSS tolerance (0.05).
    pub(crate) tol: f64,
    /// Whether RSS is checked or only shown.
    pub(crate) check_rss: bool,
    /// The relay's `connect_header_timeout`.
    pub(crate) header_timeout: Duration,
}

/// Runs the phase from the settled snapshot `start`; returns the JSON
/// (one entry per row, and `pass`).
pub(crate) async fn run(rig: &Rig, start: &Snapshot, s: &Settings) -> Result<serde_json::Value> {
    let pki = rig.bench.pki();
    let rogue = {
        let other = relay_transport::devcerts::DevPki::generate(&["localhost"], &["edge-0"])?;
        let mut m = other.node_material("edge-0")?;
        // It trusts the real relay; the relay must not trust it.
        m.ca = pki.relay_material()?.ca;
        m
    };
    let ctx = Arc::new(Ctx {
        relay_quic: rig.relay.quic,
        connect: rig.relay.connect,
        admin: rig.relay.admin.addr,
        echo0: rig.echo[0],
        edge0: quic::endpoint(&pki.node_material(&edge_name(0))?)?,
        stranger: quic::endpoint(&pki.node_material(STRANGER)?)?,
        rogue: quic::endpoint(&rogue)?,
        stand_in: pki.node_material(&edge_name(STAND_IN))?,
        // Past the CONNECT header timeout with room to see the 408.
        hold: (s.header_timeout * 3).max(Duration::from_secs(3)),
    });
    let mut before = start.clone();
    let mut out = Vec::new();
    let mut all_ok = true;
    for case in CASES {
        if !s.rows.is_empty() && !s.rows.iter().any(|r| r == case.rows) {
            continue;
        }
        let t0 = Instant::now();
        let m0 = rig.relay.admin.metrics().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let probe = tokio::spawn(echo_probe(rig.via(0), stop.clone()));
        let fake = match case.kind {
            Kind::EdgeStream(_) => Some(Arc::new(
                FakeEdge::connect(ctx.relay_quic, &ctx.stand_in, STAND_IN).await?,
            )),
            _ => None,
        };
        let answers = repeat(&ctx, case, fake.clone(), s.repeat).await?;
        if let Some(f) = fake {
            Arc::into_inner(f)
                .context("the stand-in edge is still shared")?
                .close()
                .await?;
        }
        // The tunnel must also work after the row: echoes for a while more.
        tokio::time::sleep(PROBE_AFTER).await;
        stop.store(true, Relaxed);
        let (ok, lost, first, _, max_us) = probe.await??;
        let took = t0.elapsed();
        let (after, late) = until_back(rig, &before, rig.settled().await?).await?;
        let m1 = rig.relay.admin.metrics().await?;
        let rows = compare(&before, None, &after);
        let figs_ok = rows.iter().all(|d| back(d, s.tol, s.check_rss));
        let unexpected: u64 = answers
            .iter()
            .filter(|(a, _)| !case.expect.iter().any(|e| a.starts_with(e)))
            .map(|(_, n)| n)
            .sum();
        let pass = figs_ok && unexpected == 0 && lost == 0 && ok > 0;
        all_ok &= pass;
        let counted = counted(&m0, &m1);
        println!(
            "row {:<3} ×{} {}: {:?}; tunnel opened before: {ok} echoes, {lost} lost (max {:.0} ms); {}; {:.1}s, back {:.1}s after the settle{}",
            case.rows,
            s.repeat,
            case.what,
            answers,
            max_us / 1000.0,
            figures(&rows),
            took.as_secs_f64(),
            late.as_secs_f64(),
            if pass { "" } else { "  ** NOT BACK / UNEXPECTED **" }
        );
        out.push(json!({
            "rows": case.rows, "what": case.what, "repeat": s.repeat, "answers": answers,
            "expected": case.expect, "unexpected": unexpected, "relay_counted": counted,
            "probe_ok": ok, "probe_lost": lost, "probe_first_error": first, "probe_max_us": max_us,
            "before": snap_json(&before), "after": snap_json(&after),
            "compare": rows.iter().map(|d| json!({"figure": d.what, "before": d.before, "after": d.after, "back": back(d, s.tol, s.check_rss)})).collect::<Vec<_>>(),
            "figures_back": figs_ok, "secs": took.as_secs_f64(), "late_s": late.as_secs_f64(), "pass": pass,
        }));
        before = after;
    }
    Ok(json!({"cases": out, "pass": all_ok}))
}
