//! Stopping the relay: drain, close, flush what the cluster must know,
//! and remove what it installed in the kernel, each step bounded.

use std::time::Duration;

use relay_protocol::close_code;
use tracing::{info, warn};

use super::Relay;

/// How long a stopping relay waits for its closed QUIC connections to
/// drain before it lets the port go (see [`Relay::shutdown`]).
const DRAINING_WAIT: Duration = Duration::from_millis(250);

/// How long a stopping relay waits for the Node conditions still queued
/// (its last sessions' "down") to be written (see [`Relay::shutdown`]).
/// 16 writes at a time at ~10 ms each write 1,000 Nodes in under a
/// second; the bound is for a slow apiserver. With the Lease release's
/// 2 s, the manifests' `drain_grace` (30 s), the sessions' extra second,
/// [`DRAINING_WAIT`] and the capture teardown's 15 s, shutdown takes at
/// most 53.25 s: within the pod's `terminationGracePeriodSeconds` (60).
/// It also bounds [`SESSIONS_CLOSING`], which comes out of it.
const CONDITION_FLUSH: Duration = Duration::from_secs(5);

/// How long a stopping relay waits, after closing the sessions still open
/// past the grace period, for them to end and queue their "down" before
/// the condition flush (out of [`CONDITION_FLUSH`]'s bound): closed, they
/// end at once but for a task slow to notice.
const SESSIONS_CLOSING: Duration = Duration::from_secs(1);

impl Relay {
    /// Graceful shutdown: stop accepting, send GOAWAY to every session, let
    /// in-flight streams finish for up to `grace`, then close everything.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shared.begin_shutdown(grace);
        self.accept_stop.cancel();
        // First, so the other replicas (and through them the edges) stop
        // counting on this one while it drains.
        self.replicas.release().await;
        let sessions = self.shared.registry.sessions();
        info!(sessions = sessions.len(), ?grace, "draining");
        for s in &sessions {
            s.drain(grace, "relay shutting down");
        }
        self.sessions.close();
        // Drained sessions close themselves once idle or at the deadline;
        // the extra second covers the close handshake.
        let overran = tokio::time::timeout(grace + Duration::from_secs(1), self.sessions.wait())
            .await
            .is_err();
        if overran {
            warn!("sessions still open after the grace period; closing them");
        }
        self.shared.shutdown.cancel();
        self.endpoint
            .close(close_code::GOING_AWAY.into(), b"relay shutting down");
        // Long enough for the last CONNECTION_CLOSE frames to leave, not
        // QUIC's whole draining period (three PTOs: with 1,000 edges, 246
        // connections were still draining 0.8 s later, their RTT estimates
        // dating from a busy handshake). That period only re-answers an
        // edge whose close was lost, and it holds the port: a relay
        // restarting on it answers such an edge with a stateless reset (its
        // keys derive from its private key), which also starts the edge's
        // short reconnect pace, and starts listening sooner.
        let _ = tokio::time::timeout(DRAINING_WAIT, self.endpoint.wait_idle()).await;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        // The condition flush's bound starts here: it also covers waiting
        // for the sessions closed above to end.
        let flush_by = tokio::time::Instant::now() + CONDITION_FLUSH;
        // Sessions that outlived the grace period end only now (closed
        // above): their "down" must be queued before the flush, or the
        // writer stops without it. A short wait, out of the flush's bound.
        if overran {
            let until = tokio::time::Instant::now() + SESSIONS_CLOSING;
            let _ = tokio::time::timeout_at(until.min(flush_by), self.sessions.wait()).await;
        }
        // The sessions' last "down" reports are queued (held off, 16 in
        // flight at a time): written before the writer stops with the
        // rest, or the Nodes would say `True` until a relay corrects them.
        #[cfg(feature = "kubernetes")]
        if let Some(c) = &self.conditions {
            let left = flush_by.saturating_duration_since(tokio::time::Instant::now());
            if !c.flush(left).await {
                warn!(bound = ?CONDITION_FLUSH, "Node conditions still queued at shutdown; left for the next relay to correct");
            }
        }
        self.background.cancel();
        // Routes go last but surely: awaited, not aborted, so the kernel is
        // left with nothing of ours but the capture address, which flows
        // captured before now still need (see `Capture::teardown`).
        if let Some((stop, task)) = self.capture.take() {
            stop.cancel();
            if tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .is_err()
            {
                warn!("removing relay routes timed out");
            }
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        info!("relay stopped");
    }
}
