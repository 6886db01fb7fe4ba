//! The `flap` phase: edge 1's process stopped and started again F times
//! within a window (every other stop a SIGKILL, so the relay also meets
//! sessions that vanish without a close), while edge 0 carries a closed
//! loop of tunnelled connections and an established tunnel keeps echoing.
//! Edge 0's traffic must not notice; the relay must end with the same
//! two sessions, each node's routes once, and count every flap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::edge_name;
use serde_json::json;

use super::flood::echo_probe;
use super::probe::series;
use super::{churn, Rig};
use crate::common::Counter;

/// `relay_sessions_accepted_total`.
async fn accepted(rig: &Rig) -> Result<f64> {
    let m = rig.relay.admin.metrics().await?;
    series(&m, "relay_sessions_accepted_total").context("no relay_sessions_accepted_total")
}

/// Runs the phase.
pub(crate) async fn run(rig: &mut Rig, flaps: u64, window: Duration) -> Result<serde_json::Value> {
    let acc0 = accepted(rig).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(echo_probe(rig.via(0), stop.clone()));
    let done: Counter = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(churn(vec![rig.via(0)], u64::MAX, stop.clone(), 8, done));
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    for k in 0..flaps {
        let slot = t0 + window.mul_f64(k as f64 / flaps as f64);
        tokio::time::sleep_until(slot.into()).await;
        let before = accepted(rig).await?;
        if k % 2 == 1 {
            rig.edges[1].kill();
        } else {
            rig.edges[1]
                .terminate(Duration::from_secs(5))
                .await
                .context("stopping edge 1")?;
        }
        let t = Instant::now();
        rig.edges[1] = rig.bench.start_edge(1, &rig.relay, None).await?;
        // Registered means a new session accepted, not the old one (a
        // killed edge's session lingers until the new one replaces it).
        let deadline = Instant::now() + Duration::from_secs(15);
        while accepted(rig).await? <= before {
            ensure!(
                Instant::now() < deadline,
                "edge 1 flap {k}: no new session within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worst = worst.max(t.elapsed());
    }
    let took = t0.elapsed();
    // Edge 0's traffic runs on a little after the last flap, then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Relaxed);
    let (ok, errors, first, p99, max) = probe.await??;
    let traffic = tokio::time::timeout(Duration::from_secs(30), traffic)
        .await
        .context("edge 0's traffic did not stop")???;
    let acc = accepted(rig).await? - acc0;
    let sessions = rig.relay.admin.sessions().await?;
    let nodes: Vec<&str> = sessions.iter().map(|s| s.node.as_str()).collect();
    let routes: Vec<String> = sessions
        .iter()
        .flat_map(|s| s.routes.iter().map(|r| r.to_string()))
        .collect();
    println!(
        "soak flap: {flaps} restarts of {} in {:.1}s ({:.0}/min), slowest re-registration {:.0} ms; relay counted {acc} new sessions; sessions now {nodes:?}, routes {routes:?}; \
         edge 0 meanwhile: {} connections, {} failed{}, p99 {:.0} µs; its tunnel opened before: {ok} echoes, {errors} failed{}, p99 {p99:.0} µs, max {max:.0} µs",
        edge_name(1),
        took.as_secs_f64(),
        flaps as f64 * 60.0 / took.as_secs_f64(),
        worst.as_secs_f64() * 1000.0,
        traffic.ok,
        traffic.errors,
        traffic.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        traffic.p99_us,
        first.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
    );
    let mut sorted = nodes.clone();
    sorted.sort();
    let pass = errors == 0
        && traffic.errors == 0
        && traffic.ok > 0
        && acc >= flaps as f64
        && sorted == [edge_name(0), edge_name(1)];
    Ok(
        json!({"flaps": flaps, "secs": took.as_secs_f64(), "per_min": flaps as f64 * 60.0 / took.as_secs_f64(),
        "slowest_reregistration_ms": worst.as_secs_f64() * 1000.0, "sessions_accepted": acc,
        "sessions_after": nodes, "routes_after": routes,
        "edge0_connections": traffic.ok, "edge0_errors": traffic.errors, "edge0_first_error": traffic.first_error,
        "edge0_p99_us": traffic.p99_us, "edge0_max_us": traffic.max_us,
        "probe_ok": ok, "probe_errors": errors, "probe_first_error": first, "probe_p99_us": p99, "probe_max_us": max,
        "pass": pass}),
    )
}
