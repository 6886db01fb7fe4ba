//! What the relay writes back to the API (see `kube.rs`): the
//! `EdgeTunnelReady` condition and Events, written after an outage that
//! failed them, paced for a flapping node, and side by side, within a
//! bound, for many nodes at once.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_lab::admin_get;

use super::{eventually, node_name, KubeLab, BOUND};

/// A tunnel that goes down while the apiserver answers 503 has its
/// condition written once the apiserver is back (the failed write used to
/// be dropped, the Node left `True` until the node's next change); its
/// Event, refused, is counted dropped (`api_error`).
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_condition_that_failed_during_an_api_outage_is_written_after_it() -> Result<()> {
    let lab = KubeLab::start(1, &[]).await?;
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0")?;
    eventually("condition True", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "True"))
    })
    .await?;
    lab.standin.set_unavailable(true);
    e0.shutdown().await;
    // The write of False is tried, and refused, while the API is down.
    eventually("a failed condition write counted", async || {
        let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
        Ok(m.lines()
            .find_map(|l| {
                l.strip_prefix("relay_node_condition_write_failures_total ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|n| *n > 0))
    })
    .await?;
    assert_eq!(
        lab.condition("edge-0").map(|c| c.0).as_deref(),
        Some("True")
    );
    // So is the session's Down Event, which is not retried: counted as
    // dropped (it used to go by at debug, counted nowhere).
    eventually("an Event the API refused counted", async || {
        let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
        Ok(m.lines()
            .find_map(|l| {
                l.strip_prefix("relay_events_dropped_total{reason=\"api_error\"} ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|n| *n > 0))
    })
    .await?;
    lab.standin.set_unavailable(false);
    let back = std::time::Instant::now();
    let (status, reason, _) = eventually("condition False after the outage", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    eprintln!(
        "condition False {:?} after the API came back",
        back.elapsed()
    );
    // The outage shows in the metrics, where readiness (the last known
    // objects in use) does not.
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    for watch in ["nodes", "services"] {
        let line = format!("relay_kube_watch_errors_total{{watch=\"{watch}\"}} ");
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
            .with_context(|| format!("no {line} in {m}"))?;
        ensure!(n > 0, "{line}{n}");
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A node flapping (its edge connecting and leaving over and over) does
/// not storm the API: condition writes paced per node, Events within the
/// node's budget, the excess counted; the condition ends at the node's
/// final state; another node's session is untouched. Stand-in, not a real
/// apiserver (see the module doc).
#[tokio::test]
async fn a_flapping_node_does_not_storm_the_api() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let steady = lab.edge("edge-1")?;
    let (_, g1) = steady.wait_connected(BOUND).await.context("edge-1")?;
    const FLAPS: usize = 60;
    let t = std::time::Instant::now();
    for i in 0..FLAPS {
        let e = lab.edge("edge-0")?;
        e.wait_connected(BOUND)
            .await
            .with_context(|| format!("flap {i}"))?;
        e.shutdown().await;
        // About 200 flaps a minute: paced writes show over several
        // hold-off periods.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let flapping = t.elapsed();
    let (status, reason, _) = eventually("condition False at the end", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    // Let a held write (if any) land before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let requests = lab.standin.requests();
    let writes = requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/edge-0/status")
        .count();
    let events = requests
        .iter()
        .filter(|r| r.path.contains("/events") && r.method != "GET")
        .count();
    // One write per 5 s hold-off at most, plus the first and the last.
    let bound = 2 + (flapping.as_secs_f64() / 5.0).ceil() as usize;
    assert!(
        writes <= bound,
        "{writes} condition writes for {FLAPS} flaps in {flapping:?} (bound {bound})"
    );
    // The node's event budget (edge-1 published one more).
    assert!(
        events <= 22,
        "{events} event requests for {FLAPS} flaps in {flapping:?}"
    );
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    let sample = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        sample("relay_events_dropped_total{reason=\"rate_limited\"}") > 0,
        "{m}"
    );
    assert!(sample("relay_node_condition_coalesced_total") > 0, "{m}");
    assert_eq!(
        sample("relay_node_condition_writes_total") as usize,
        writes + 1,
        "edge-1's one write and edge-0's"
    );
    let (_, g) = steady.wait_connected(BOUND).await.context("edge-1 kept")?;
    assert_eq!(g, g1, "the steady node kept its session");
    assert_eq!(lab.routes_of("edge-0").await?, None);
    println!("{FLAPS} flaps in {flapping:?}: {writes} condition writes, {events} event requests");
    steady.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Many edges connecting at once get their conditions and Events written
/// side by side, not one request at a time (one at a time, 1,000 edges
/// left their Nodes saying "down" for 16 s after all were connected, at
/// 10 ms per write), with at most the relay's bound in flight, and never
/// two requests for one node's condition at once (its writes stay in
/// order). The stand-in answers each write after 100 ms, as an apiserver
/// waits for etcd, so requests that run together overlap for certain.
#[tokio::test]
async fn conditions_of_many_nodes_are_written_side_by_side_within_a_bound() -> Result<()> {
    const N: u8 = 40;
    let lab = KubeLab::start(N, &[]).await?;
    lab.standin
        .set_latency(Duration::from_millis(20), Duration::from_millis(100));
    let edges = (0..N)
        .map(|i| lab.edge(&node_name(i)))
        .collect::<Result<Vec<_>>>()?;
    for (i, e) in edges.iter().enumerate() {
        e.wait_connected(BOUND)
            .await
            .with_context(|| format!("edge-{i}"))?;
    }
    eventually("every condition True", async || {
        Ok((0..N)
            .all(|i| lab.condition(&node_name(i)).is_some_and(|c| c.0 == "True"))
            .then_some(()))
    })
    .await?;
    let requests = lab.standin.requests();
    let status: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/nodes/") && r.path.ends_with("/status"))
        .collect();
    let events: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/events") && r.method == "POST")
        .collect();
    // Most requests in flight at once, as the stand-in served them.
    let most = |rs: &[&relay_kube_standin::RequestRecord]| {
        rs.iter()
            .map(|a| {
                rs.iter()
                    .filter(|b| a.started >= b.started && a.started < b.answered)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    let (cond_most, event_most) = (most(&status), most(&events));
    println!(
        "{} condition requests, at most {cond_most} at once; {} event requests, at most {event_most} at once",
        status.len(),
        events.len()
    );
    assert!(
        (2..=relay_server::k8s::CONDITION_WRITERS).contains(&cond_most),
        "condition requests at once: {cond_most}"
    );
    assert!(
        (2..=relay_server::k8s::EVENT_WRITERS).contains(&event_most),
        "event requests at once: {event_most}"
    );
    for (i, a) in status.iter().enumerate() {
        for b in &status[i + 1..] {
            assert!(
                a.path != b.path || !a.overlaps(b),
                "two requests for {} at once",
                a.path
            );
        }
    }
    for e in edges {
        e.shutdown().await;
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
