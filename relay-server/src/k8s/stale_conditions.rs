//! Node conditions no session backs: Nodes whose `EdgeTunnelReady` says
//! `True` while their edge has no session at this relay, and the flush of
//! queued condition writes at shutdown.
//!
//! A session's end writes "down" only in the process that held it. A relay
//! killed (SIGKILL, OOM, its node rebooted) writes nothing, so an edge that
//! died meanwhile kept `True` for ever (`lastHeartbeatTime` is not kept:
//! nothing ages the condition) and the `EdgeTunnelDown` alert never fired.
//! So, once the relay's Node list is in and the edges have had
//! [`STALE_CONDITION_GRACE`] to come back, and every [`SWEEP_EVERY`] after,
//! the relay writes `False` (`NoSession`) on every Node it writes for
//! (with replicas, the nodes it is the designated writer of: see
//! `replicas::writer_of`) that says `True` with no session here. Through
//! [`KubeStatus::stale`], which cannot undo a session coming up meanwhile.

use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Replica;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{KubeDirectory, KubeStatus};
use crate::server::Shared;

/// How long after the relay's first Node list (and after each change of the
/// replica set) a `True` with no session here is still taken for an edge
/// on its way back. Two of the edges' largest reconnect backoffs (8 s,
/// edge-client `BackoffConfig::max`: an edge that just missed the relay
/// waits up to one, and one attempt lost in the restart's crowd costs
/// another) plus a handshake's bound (`limits.handshake_timeout`, 10 s by
/// default): an edge alive through a relay restart has a session by then,
/// and its Node never reads `False` for the restart alone.
pub const STALE_CONDITION_GRACE: Duration = Duration::from_secs(2 * 8 + 10);

/// How often the Nodes are looked over after the first time: an edge whose
/// writer replica left (its new writer writes at the edge's next session
/// event otherwise) or whose "down" write was lost is corrected within it.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Keeps the conditions this relay writes true beyond the sessions' own
/// reports: the sweep for stale `True`s, and the flush at shutdown.
pub struct ConditionUpkeep {
    status: Arc<KubeStatus>,
    directory: Arc<KubeDirectory>,
    grace: Duration,
}

impl ConditionUpkeep {
    pub(super) fn new(
        status: Arc<KubeStatus>,
        directory: Arc<KubeDirectory>,
        grace: Duration,
    ) -> Self {
        ConditionUpkeep {
            status,
            directory,
            grace,
        }
    }

    /// Starts the sweep; it runs until `stop` or the relay's shutdown.
    pub fn spawn(self: &Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        tokio::spawn(self.clone().run(shared, stop));
    }

    /// Writes the queued conditions now, hold-offs ignored, waiting at
    /// most `bound`; false if some were left (or failed and wait for
    /// their retry).
    pub async fn flush(&self, bound: Duration) -> bool {
        self.status.flush(bound).await
    }

    async fn run(self: Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        let nodes = &self.directory.nodes;
        let mut changes = nodes.subscribe();
        // The Nodes themselves, not the cache (which has no conditions).
        while !nodes.is_synced() {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
        }
        let mut replicas = shared.replicas.clone();
        let mut set = replicas.borrow_and_update().clone();
        let mut follow = true;
        let mut next = Instant::now() + self.grace;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = replicas.changed(), if follow => {
                    if r.is_err() {
                        follow = false;
                        continue;
                    }
                    let now = replicas.borrow_and_update().clone();
                    if now != set {
                        // Who writes which node changed: the edges of the
                        // nodes this replica gains may still be connecting.
                        set = now;
                        next = next.max(Instant::now() + self.grace);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            // A replica leaving does not write "down" for its edges (they
            // hold sessions to the others); a single relay's flush does.
            if shared.is_shutting_down() {
                return;
            }
            self.sweep(&shared, &set);
            next = Instant::now() + SWEEP_EVERY;
        }
    }

    /// One look over the Nodes; returns how many were written `False`.
    fn sweep(&self, shared: &Shared, set: &[Replica]) -> usize {
        let me = shared.cfg.relay_id.as_str();
        let replicated = shared.cfg.replicas.is_some();
        // Stable (no time, no count): it is the condition's message.
        let why = format!("none at relay {me} (the condition said True from before)");
        let mut written = 0;
        for node in self.directory.nodes.nodes() {
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            if !relay_kube::says_ready(&node) || !writes(name, me, replicated, set) {
                continue;
            }
            if self
                .status
                .stale(name, &why, || shared.registry.get(name).is_none())
            {
                written += 1;
            }
        }
        if written > 0 {
            info!(
                nodes = written,
                "Nodes said their tunnel was up with no session at this relay; writing them down"
            );
        }
        written
    }
}

/// Whether replica `me` corrects `node`'s condition: a single relay
/// (`replicated` false) writes every node; a replica only the nodes it is
/// the designated writer of (`replicas::writer_of`), and none before the
/// set is known or while it is not in it. Stricter than the session
/// reports' rule (which write before the set is known, better two writers
/// than none): a stale `True` waits a few seconds more, and no replica
/// writes `False` for an edge whose session is at another.
fn writes(node: &str, me: &str, replicated: bool, set: &[Replica]) -> bool {
    if !replicated {
        return true;
    }
    crate::replicas::writer_of(node, set).is_some_and(|w| w.id == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str) -> Replica {
        Replica {
            id: id.into(),
            addr: format!("{id}:8443"),
        }
    }

    #[test]
    fn the_settings_default_to_the_grace() {
        assert_eq!(
            crate::config::KubeSettings::default().stale_condition_grace,
            STALE_CONDITION_GRACE
        );
    }

    #[test]
    fn only_the_designated_writer_corrects_a_node() {
        assert!(writes("edge-1", "relay-a", false, &[]), "a single relay");
        assert!(
            !writes("edge-1", "relay-a", true, &[]),
            "replicas, set unknown: nobody yet"
        );
        let set: Vec<Replica> = ["relay-a", "relay-b", "relay-c"].map(replica).to_vec();
        for i in 0..300 {
            let node = format!("edge-{i}");
            let writers: Vec<&str> = ["relay-a", "relay-b", "relay-c"]
                .into_iter()
                .filter(|me| writes(&node, me, true, &set))
                .collect();
            assert_eq!(writers.len(), 1, "{node}: {writers:?}");
            assert!(
                !writes(&node, "relay-d", true, &set),
                "a replica outside its set writes nothing"
            );
        }
    }
}
