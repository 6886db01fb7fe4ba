//! One replica as its own poller polls it ([`ReplicaPoll`]): its kept
//! connection and last table, and what its answer puts in the groups,
//! with a replica answering busy keeping its last table for fewer than
//! [`BUSY_POLLS`] polls in a row; and the pollers themselves ([`spawn`]),
//! one task per replica, each publishing its replica's latest report on
//! a [`Board`] that the agent's merge reads.
//!
//! Apart from the loop because this per-replica state (answering, busy,
//! silent, and the log lines when that changes) decides group membership
//! on its own; the loop only merges the latest views.
//!
//! One task per replica, not one loop polling them in turn (nor all at
//! once, waiting for the slowest): a replica whose node died without a
//! word (no RST: its SYNs or its answer black-holed) takes a poll its
//! whole bound ([`crate::agent::poll::POLL_TIMEOUT`]) to fail, and no
//! other replica's change may wait behind that.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{Busy, MultipathConfig, RouteView, RoutesPoll};
use crate::agent::status::NOT_READY_AFTER;
use crate::agent::AgentConfig;

/// Polls in a row a replica may answer busy (503 "admin API overloaded":
/// alive, its admin API's request budget full) with its last table kept
/// in the groups; at this many it is left out, as one that does not
/// answer. The same count as readiness's ([`NOT_READY_AFTER`]): a busy
/// replica's table is at most this many intervals old, where an answering
/// one's is one interval old.
pub const BUSY_POLLS: u64 = NOT_READY_AFTER;

/// One replica as the agent's loop polls it.
#[derive(Debug, Default)]
pub(super) struct ReplicaPoll {
    /// Its connection and last table (see [`RoutesPoll`]).
    pub(super) poll: RoutesPoll,
    /// Polls in a row it answered busy.
    busy: u64,
    /// Its table went into the groups at the last poll (read then, or
    /// kept through a busy answer).
    in_groups: bool,
    /// Left out since it last put a table in (for the log lines).
    failing: bool,
}

impl ReplicaPoll {
    /// What this poll's `answer` puts in the groups for this replica
    /// (`None`: left out): the table read; the last one while it answers
    /// busy, fewer than [`BUSY_POLLS`] polls in a row after a poll that
    /// put one in; nothing for a replica that does not answer, or answers
    /// anything else. Logs when that changes.
    pub(super) fn view(
        &mut self,
        admin: SocketAddr,
        answer: anyhow::Result<RouteView>,
    ) -> Option<RouteView> {
        let view = match answer {
            Ok(v) => {
                self.busy = 0;
                Some(v)
            }
            Err(e) if e.downcast_ref::<Busy>().is_some() => {
                self.busy += 1;
                if self.in_groups && self.busy < BUSY_POLLS {
                    if self.busy == 1 {
                        info!(%admin, "replica busy (503, its admin API overloaded); keeping its last routes");
                    }
                    self.poll.last().cloned()
                } else {
                    if !self.failing {
                        warn!(%admin, polls = self.busy, "replica busy poll after poll (or with no earlier routes to keep); routing around it");
                    }
                    None
                }
            }
            Err(e) => {
                if !self.failing {
                    warn!(%admin, error = %format!("{e:#}"), "replica does not answer; routing around it");
                }
                self.busy = 0;
                None
            }
        };
        if view.is_some() && self.failing {
            info!(%admin, "replica answers again");
        }
        self.failing = view.is_none();
        self.in_groups = view.is_some();
        view
    }
}

/// What a replica's poller found at its last finished poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Report {
    /// What it puts in the groups ([`ReplicaPoll::view`]; `None`: left out).
    pub(super) view: Option<RouteView>,
    /// Why not, when left out: the poll's error, with the replica's address.
    pub(super) error: Option<String>,
}

/// The replicas' latest reports (index = the replica's), written by their
/// pollers, read by the merge; `changed` wakes the merge when a replica's
/// view differs from its last one (or is its first).
#[derive(Debug)]
pub(super) struct Board {
    latest: Mutex<Vec<Option<Report>>>,
    changed: Notify,
}

impl Board {
    fn new(replicas: usize) -> Board {
        Board {
            latest: Mutex::new(vec![None; replicas]),
            changed: Notify::new(),
        }
    }

    /// Every replica's latest report; `None` for one whose first poll has
    /// not finished.
    pub(super) fn latest(&self) -> Vec<Option<Report>> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Until some replica's view changed since the last call (at once when
    /// one did meanwhile: a change is never missed, though one already
    /// read may wake it once more).
    pub(super) async fn changed(&self) {
        self.changed.notified().await
    }

    fn publish(&self, i: usize, report: Report) {
        let changed = {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            let changed = latest[i].as_ref().map(|r| &r.view) != Some(&report.view);
            latest[i] = Some(report);
            changed
        };
        if changed {
            self.changed.notify_one();
        }
    }
}

/// One poller per replica of `cfg`: each polls its replica every
/// `cfg.interval` (from the end of one poll to the start of the next, each
/// bounded by [`crate::agent::poll::POLL_TIMEOUT`]: a replica whose poll is
/// outstanding keeps its last report until the poll fails, then is left out
/// as any failing one) and publishes its report on the returned board.
/// They run until the set is dropped or shut down.
pub(super) fn spawn(cfg: &MultipathConfig) -> (Arc<Board>, JoinSet<()>) {
    let board = Arc::new(Board::new(cfg.replicas.len()));
    let mut pollers = JoinSet::new();
    for (i, r) in cfg.replicas.iter().enumerate() {
        let one = AgentConfig {
            admin: r.admin,
            token: cfg.token.clone(),
            tls: r.tls.clone(),
            interval: cfg.interval,
            proto: cfg.proto,
        };
        let board = board.clone();
        pollers.spawn(async move {
            let mut p = ReplicaPoll::default();
            loop {
                let answer = p.poll.poll(&one).await.map(|a| a.view);
                let error = answer
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e:#}", one.admin));
                let view = p.view(one.admin, answer);
                let error = view.is_none().then_some(error).flatten();
                board.publish(i, Report { view, error });
                tokio::time::sleep(one.interval).await;
            }
        });
    }
    (board, pollers)
}
