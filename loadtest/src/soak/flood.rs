//! The `halfopen` phase: N half-open CONNECT clients held at once by
//! helper processes (a third each silent, partial head, silent after the
//! 200), while an established tunnel keeps echoing and a new CONNECT is
//! tried every 100 ms. Shows what the relay does with them (408 at the
//! header timeout, 503 beyond `limits.max_connect_connections`) and that
//! the tunnel opened before the flood loses nothing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::probe::{labelled, tcp_ext};
use super::Rig;
use crate::common::{Binaries, ChildGuard, Via};
use crate::rr::new_hist;

const KINDS: [&str; 3] = ["silent", "partial", "after200"];

/// Round trips on a tunnel opened before the load, every 20 ms until
/// `stop`: `(ok, errors, first error, p99 µs, max µs)`.
pub(crate) async fn echo_probe(
    via: Via,
    stop: Arc<AtomicBool>,
) -> Result<(u64, u64, Option<String>, f64, f64)> {
    let mut s = via.open().await.context("opening the probe tunnel")?;
    let mut h = new_hist();
    let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    while !stop.load(Relaxed) {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            anyhow::Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) if back == msg => {
                ok += 1;
                let _ = h.record(t.elapsed().as_nanos().max(1) as u64);
            }
            Ok(Ok(())) => {
                errors += 1;
                first.get_or_insert("echo differs".to_string());
            }
            Ok(Err(e)) => {
                // The tunnel is gone: every later round trip would fail too.
                errors += 1;
                first.get_or_insert(format!("{e:#}"));
                break;
            }
            Err(_) => {
                errors += 1;
                first.get_or_insert("no echo within 5 s".into());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok((ok, errors, first, us(0.99), h.max() as f64 / 1000.0))
}

/// New CONNECTs every 100 ms until `stop`: answers by outcome.
async fn new_connects(via: Via, stop: Arc<AtomicBool>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    while !stop.load(Relaxed) {
        let r = tokio::time::timeout(Duration::from_secs(10), crate::connect::one(via)).await;
        let k = match r {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => {
                let t = format!("{e:#}");
                if t.contains(" 503 ") {
                    "503 busy".into()
                } else {
                    t
                }
            }
            Err(_) => "timed out after 10 s".into(),
        };
        *m.entry(k).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m
}

/// Runs the phase.
pub(crate) async fn run(
    rig: &Rig,
    n: u64,
    procs: u64,
    hold: Duration,
) -> Result<serde_json::Value> {
    let m0 = rig.relay.admin.metrics().await?;
    let overflows0 = tcp_ext("ListenOverflows")?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(echo_probe(rig.via(0), stop.clone()));
    let tries = tokio::spawn(new_connects(rig.via(1), stop.clone()));
    let mut helpers = Vec::new();
    for p in 0..procs {
        let count = n / procs + u64::from(p < n % procs);
        let kind = KINDS[p as usize % KINDS.len()];
        // Own source address per helper: 28k ephemeral ports per address.
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + p as u8));
        let mut cmd = Binaries::self_cmd()?;
        cmd.arg("halfopen-process")
            .args(["--proxy", &rig.relay.connect.to_string()])
            .args(["--target", &rig.echo[0].to_string()])
            .args(["--kind", kind, "--count", &count.to_string()])
            .args(["--src", &src.to_string()])
            .args(["--hold", &format!("{}ms", hold.as_millis())]);
        let log = rig.bench.dir.path().join(format!("halfopen-{p}.log"));
        helpers.push((
            kind,
            count,
            log.clone(),
            ChildGuard::spawn(&format!("halfopen-{p}"), cmd, &log)?,
        ));
    }
    let mut results = Vec::new();
    for (kind, count, log, mut child) in helpers {
        child
            .wait_exit(hold + Duration::from_secs(120))
            .await
            .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        let text = std::fs::read_to_string(&log)?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("helper printed no result")?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        eprintln!("  {kind} ×{count}: {}", v["answers"]);
        results.push(v);
    }
    stop.store(true, Relaxed);
    let (ok, errors, first, p99, max) = probe.await??;
    let tried = tries.await?;
    let m1 = rig.relay.admin.metrics().await?;
    // Whole-machine counter: nothing else here listens under load.
    let overflows = tcp_ext("ListenOverflows")? - overflows0;
    let code = |c: &str| {
        let l = format!("code=\"{c}\"");
        labelled(&m1, "relay_connect_responses_total", &l)
            - labelled(&m0, "relay_connect_responses_total", &l)
    };
    let answered: BTreeMap<&str, f64> = ["200", "408", "503", "504", "502"]
        .iter()
        .map(|c| (*c, code(c)))
        .collect();
    println!(
        "soak halfopen: {n} half-open clients from {procs} processes; relay answered {answered:?}; \
         tunnel opened before: {ok} echoes, {errors} failed{}, p99 {p99:.0} µs, max {max:.0} µs; new CONNECTs during: {tried:?}; kernel listen-queue overflows: {overflows}",
        first.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
    // Every client must have got an answer of the relay's or been held:
    // nothing else (resets, connect errors) is acceptable.
    let mut bad = 0u64;
    for r in &results {
        for (k, v) in r["answers"].as_object().into_iter().flatten() {
            let fine = ["408", "503", "200, held silent to the end"].contains(&k.as_str());
            if !fine {
                bad += v.as_u64().unwrap_or(0);
            }
        }
    }
    let pass = errors == 0 && ok > 0 && bad == 0;
    ensure!(ok > 0, "the probe tunnel echoed nothing");
    Ok(
        json!({"clients": n, "procs": procs, "hold_s": hold.as_secs_f64(), "helpers": results,
              "relay_answers": answered, "probe_ok": ok, "probe_errors": errors, "probe_first_error": first,
              "probe_p99_us": p99, "probe_max_us": max, "new_connects": tried, "unexpected_client_outcomes": bad, "listen_overflows": overflows,
              "pass": pass}),
    )
}
