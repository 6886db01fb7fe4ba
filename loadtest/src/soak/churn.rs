//! Tunnelled TCP connections in a closed loop: each opens a CONNECT
//! tunnel to an echo service behind an edge, exchanges 64 bytes, closes
//! and waits for the close (`connect::one`), K at a time, until a count or
//! a deadline is reached. Every failure is counted, none retried.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::common::{Counter, Via};
use crate::rr::new_hist;

/// What a churn run did.
#[derive(Debug, Default)]
pub(crate) struct Churned {
    /// Connections that completed their round trip and close.
    pub(crate) ok: u64,
    /// Connections that failed (refused, reset, wrong echo, 10 s timeout).
    pub(crate) errors: u64,
    /// The first failure's text.
    pub(crate) first_error: Option<String>,
    /// Wall time.
    pub(crate) secs: f64,
    /// Latency of one whole connection, µs.
    pub(crate) p50_us: f64,
    /// 99th percentile, µs.
    pub(crate) p99_us: f64,
    /// Slowest, µs.
    pub(crate) max_us: f64,
}

/// Runs connections over `targets` (round robin) with `concurrency` in
/// flight until `total` have been started or `stop` is set; `done`
/// counts the completed ones (for progress lines).
pub(crate) async fn churn(
    targets: Vec<Via>,
    total: u64,
    stop: Arc<AtomicBool>,
    concurrency: usize,
    done: Counter,
) -> Result<Churned> {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let targets = Arc::new(targets);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (next, targets, done, stop) =
            (next.clone(), targets.clone(), done.clone(), stop.clone());
        set.spawn(async move {
            let mut h = new_hist();
            let mut r = Churned::default();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total || stop.load(Relaxed) {
                    break;
                }
                let via = targets[i as usize % targets.len()];
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), crate::connect::one(via)).await
                {
                    Ok(Ok(())) => {
                        r.ok += 1;
                        let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(Err(e)) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(format!("{e:#}"));
                    }
                    Err(_) => {
                        r.errors += 1;
                        r.first_error.get_or_insert("timed out after 10s".into());
                    }
                }
            }
            (h, r)
        });
    }
    let mut h = new_hist();
    let mut out = Churned::default();
    while let Some(j) = set.join_next().await {
        let (wh, r) = j.context("churn worker panicked")?;
        h.add(&wh)?;
        out.ok += r.ok;
        out.errors += r.errors;
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
    }
    out.secs = t0.elapsed().as_secs_f64();
    out.p50_us = h.value_at_quantile(0.5) as f64 / 1000.0;
    out.p99_us = h.value_at_quantile(0.99) as f64 / 1000.0;
    out.max_us = h.max() as f64 / 1000.0;
    Ok(out)
}
