//! The certificate bootstrap against a slow apiserver (see
//! `bootstrap.rs`). Stand-in, not a real apiserver.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_protocol::RejectReason;

use super::{lab_with, rejected, BOUND};

/// The relay's handshake timeout here (10 s by default).
const HANDSHAKE: Duration = Duration::from_secs(3);

/// TokenReview and pod reads answered after longer than the handshake
/// timeout: the edge is answered `overloaded` (typed, so it backs off and
/// retries) before the connection's bound, and the refusal is counted
/// (`relay_bootstrap_total{outcome="refused"}`, which the
/// `EdgeRelayCertificatesRefused` alert watches). Before, the
/// connection's own timer fired first: the edge saw a closed connection,
/// and nothing was counted or logged above debug.
#[tokio::test]
async fn a_slow_apiserver_is_answered_overloaded_and_counted() -> Result<()> {
    let lab = lab_with(Duration::from_secs(3600), |cfg, _, _| {
        cfg.limits.handshake_timeout = HANDSHAKE;
        Ok(())
    })
    .await?;
    // The Nodes listed first (the lookup before the token check), then
    // every read and write slower than the handshake.
    let shared = lab.relay.shared().clone();
    let t = std::time::Instant::now();
    while !shared.directory.is_synced() {
        ensure!(t.elapsed() < BOUND, "the Node list never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow = HANDSHAKE + Duration::from_secs(2);
    lab.standin.set_latency(slow, slow);
    let token = lab.token("edge-0", "edge-client-0", "uid-0", "edge-relay");
    let asked = std::time::Instant::now();
    let (e0, _) = lab.edge("edge-0", &token)?;
    let (reason, message) = rejected(&e0).await.context("a typed answer")?;
    let took = asked.elapsed();
    ensure!(reason == RejectReason::Overloaded, "{reason:?}: {message}");
    ensure!(
        message.contains("did not answer within"),
        "refused for the deadline: {message}"
    );
    let refused = shared
        .metrics
        .bootstrap_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(refused >= 1, "refusals counted: {refused}");
    eprintln!("refused overloaded {took:?} after asking: {message}");
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
