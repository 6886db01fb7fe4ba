//! An edge client running inside a lab namespace whose state the test
//! thread can watch: [`crate::scenario::start_edge`] only says "connected",
//! while the Kubernetes tests need to see rejections (typed reasons),
//! reconnects (generations) and what the relay told the edge it serves.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_protocol::RejectReason;
use tokio::sync::watch;

use crate::netns::{NetnsLab, Role};
use crate::scenario::{launch, Running};

/// An edge client in a namespace, with its state visible from outside.
pub struct WatchedEdge {
    state: watch::Receiver<EdgeState>,
    // Last: dropping it stops the client.
    running: Running,
}

impl WatchedEdge {
    /// Starts an edge client with `cfg` in `ns`; returns at once (no wait
    /// for a session: a test may expect a refusal).
    pub fn start(lab: &NetnsLab, ns: Role, cfg: EdgeConfig) -> Result<WatchedEdge> {
        let (tx, rx) = std::sync::mpsc::channel();
        let running = launch(lab, ns, &cfg.node.clone(), move |ready, stop| async move {
            let edge = EdgeClient::start(cfg).await?;
            let _ = tx.send(edge.watch());
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            edge.shutdown().await;
            Ok(())
        })?;
        let state = rx.recv_timeout(Duration::from_secs(1))?;
        Ok(WatchedEdge { state, running })
    }

    /// The current state.
    pub fn state(&self) -> EdgeState {
        self.state.borrow().clone()
    }

    /// Polls (every 20 ms, at most `limit`) until `pick` returns `Some`.
    pub fn wait<T>(
        &self,
        limit: Duration,
        mut pick: impl FnMut(&EdgeState) -> Option<T>,
    ) -> Result<T> {
        let t = Instant::now();
        loop {
            if let Some(v) = pick(&self.state.borrow()) {
                return Ok(v);
            }
            if t.elapsed() > limit {
                bail!("not within {limit:?}; edge state: {:?}", self.state());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a session; returns its generation.
    pub fn connected(&self, limit: Duration) -> Result<u64> {
        self.wait(limit, |s| match s {
            EdgeState::Connected { generation, .. } => Some(*generation),
            _ => None,
        })
    }

    /// Waits for a refusal; returns its reason and message.
    pub fn rejected(&self, limit: Duration) -> Result<(RejectReason, String)> {
        self.wait(limit, |s| match s {
            EdgeState::Rejected { reason, message } => Some((*reason, message.clone())),
            _ => None,
        })
    }

    /// Stops the client (and waits for it to end).
    pub fn stop(self) -> Result<()> {
        self.running.stop()
    }
}
