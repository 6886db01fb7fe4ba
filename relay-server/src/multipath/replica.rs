//! One replica as the multipath loop polls it ([`ReplicaPoll`]): its kept
//! connection and last table, and what its answer puts in the groups,
//! with a replica answering busy keeping its last table for fewer than
//! [`BUSY_POLLS`] polls in a row.
//!
//! Apart from the loop because this per-replica state (answering, busy,
//! silent, and the log lines when that changes) decides group membership
//! on its own; the loop only gathers the views.

use std::net::SocketAddr;

use tracing::{info, warn};

use super::{Busy, RouteView, RoutesPoll};
use crate::agent::status::NOT_READY_AFTER;

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
