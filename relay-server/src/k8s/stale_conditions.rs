//! Node conditions out of step with the sessions: Nodes whose
//! `EdgeTunnelReady` says `True` while their edge has no session at this
//! relay, Nodes saying `False` while it has one, the nodes this replica
//! becomes the writer of, and the flush of queued condition writes at
//! shutdown.
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
//!
//! The reverse too: a Node saying `False` (or nothing) while its edge has
//! a session here gets that session's report again
//! (`SessionHandle::report_to`). Another writer wrote `False` after
//! this relay wrote `True`: a replica whose own session of the edge ended,
//! or the relay this one replaced in a rolling update, writing its
//! sessions' "down" as the edges came here. A session reports only when
//! it comes up or its description changes, so nothing else would write
//! `True` again while it lives.
//!
//! With replicas, a session's reports while this replica does not write
//! its node are dropped (`replicas::DesignatedStatus`), and the session
//! counts them as made; so when the replica set changes, the sessions here
//! of the nodes this replica now writes and did not report again at once
//! ([`report_gained`]), rather than at the sweep after the grace.

use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Replica;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{KubeDirectory, KubeStatus};
use crate::server::Shared;
use crate::session::SessionHandle;
use crate::status::StatusSink;

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
/// "down" (or "up") write was lost, or was overwritten by another writer,
/// is corrected within it.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Keeps the conditions this relay writes true beyond the sessions' own
/// reports: the sweep for stale `True`s and `False`s, the reports again
/// when this replica gains nodes, and the flush at shutdown.
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
        // Followed from the start: the nodes this replica gains while the
        // Nodes are being listed need their reports too.
        let mut replicas = shared.replicas.clone();
        let mut set = replicas.borrow_and_update().clone();
        let mut follow = true;
        // The first sweep: a grace after the Nodes themselves are in (not
        // the cache, which has no conditions).
        let mut next = nodes.is_synced().then(|| Instant::now() + self.grace);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed(), if next.is_none() => {
                    if r.is_err() {
                        return;
                    }
                    if nodes.is_synced() {
                        next = Some(Instant::now() + self.grace);
                    }
                    continue;
                }
                r = replicas.changed(), if follow => {
                    if r.is_err() {
                        follow = false;
                        continue;
                    }
                    let now = replicas.borrow_and_update().clone();
                    if now != set {
                        // A replica leaving writes nothing more (as at
                        // its sessions' end).
                        if !shared.is_shutting_down() {
                            report_gained(&shared, &*shared.status, &set, &now);
                        }
                        // Who writes which node changed: the edges of the
                        // nodes this replica gains may still be connecting.
                        set = now;
                        next = next.map(|n| n.max(Instant::now() + self.grace));
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
            // A replica leaving does not write "down" for its edges (they
            // hold sessions to the others); a single relay's flush does.
            if shared.is_shutting_down() {
                return;
            }
            self.sweep(&shared, &set);
            next = Some(Instant::now() + SWEEP_EVERY);
        }
    }

    /// One look over the Nodes.
    fn sweep(&self, shared: &Shared, set: &[Replica]) -> Corrected {
        let nodes = self.directory.nodes.nodes();
        let says = nodes.iter().filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            Some((name, relay_kube::says_ready(n)))
        });
        correct(&self.status, shared, set, says)
    }
}

/// What one sweep corrected.
#[derive(Debug, Default, PartialEq, Eq)]
struct Corrected {
    /// Nodes written `False`: they said `True` with no session here.
    down: usize,
    /// Sessions here that reported again: their Nodes did not say `True`.
    again: usize,
}

/// The sweep over `nodes` (each Node's name and whether its condition
/// says `True`), for the nodes this replica writes under `set`: a `True`
/// with no session here is written `False` ([`KubeStatus::stale`]), and a
/// session here whose Node does not say `True` reports again, straight to
/// `status` as `stale` writes (after [`KubeStatus::unstale`]).
fn correct<'a>(
    status: &KubeStatus,
    shared: &Shared,
    set: &[Replica],
    nodes: impl IntoIterator<Item = (&'a str, bool)>,
) -> Corrected {
    let me = shared.cfg.relay_id.as_str();
    let replicated = shared.cfg.replicas.is_some();
    // Stable (no time, no count): it is the condition's message.
    let why = format!("none at relay {me} (the condition said True from before)");
    let mut done = Corrected::default();
    for (name, ready) in nodes {
        if !writes(name, me, replicated, set) {
            continue;
        }
        if ready {
            if status.stale(name, &why, || shared.registry.get(name).is_none()) {
                done.down += 1;
            }
        } else if let Some(s) = shared.registry.get(name) {
            if status.unstale(name) {
                let info = || s.status_info(shared);
                s.report_to(&shared.registry, status, info, true);
                done.again += 1;
            }
        }
    }
    if done.down > 0 {
        info!(
            nodes = done.down,
            "Nodes said their tunnel was up with no session at this relay; writing them down"
        );
    }
    if done.again > 0 {
        info!(
            nodes = done.again,
            "Nodes did not say their tunnel was up while it has a session at this relay; writing them up"
        );
    }
    done
}

/// The replica set changed from `old` to `new`: each live session here
/// whose node this replica writes under `new` and did not under `old`
/// reports again (`SessionHandle::report_to`) to `sink` (the
/// relay's, which passes on what this replica writes): what it reported
/// while another replica wrote its node was dropped. Returns how many did.
pub(crate) fn report_gained(
    shared: &Shared,
    sink: &dyn StatusSink,
    old: &[Replica],
    new: &[Replica],
) -> usize {
    if shared.cfg.replicas.is_none() {
        return 0;
    }
    let me = shared.cfg.relay_id.as_str();
    let gained = |s: &&Arc<SessionHandle>| {
        crate::replicas::writes(&s.node, me, new) && !crate::replicas::writes(&s.node, me, old)
    };
    let mut n = 0;
    for s in shared.registry.sessions_unsorted().iter().filter(gained) {
        let info = || s.status_info(shared);
        s.report_to(&shared.registry, sink, info, true);
        n += 1;
    }
    if n > 0 {
        info!(
            sessions = n,
            "this replica now writes the status of more nodes; their sessions here report again"
        );
    }
    n
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
    use crate::k8s::status_writer::tests::{queued, status};
    use crate::replicas::{writer_of, DesignatedStatus, ReplicaSettings, ReplicaSource};
    use crate::session::tests::{bench, register};
    use relay_protocol::capability;

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

    /// Replicas A and B; B writes node N, whose edge has sessions at both.
    /// N's session at A reports `up` (dropped: B writes N). B leaves: A
    /// now writes N, and its session there reports again, so A queues N
    /// ready. (A wrote nothing for N before: N kept what B last wrote, a
    /// "down" for its session there, while its edge was connected to A.)
    #[tokio::test]
    async fn a_replica_that_becomes_a_nodes_writer_writes_its_session_up() {
        let both = [replica("relay-a"), replica("relay-b")];
        let only_a = [replica("relay-a")];
        let (relay, pki) = crate::admin::tests::relay_configured(8, |c| {
            c.relay_id = "relay-a".into();
            c.replicas = Some(ReplicaSettings {
                advertise: "127.0.0.1:4433".into(),
                source: ReplicaSource::Static(vec![replica("relay-b")]),
            });
        })
        .await;
        let shared = relay.shared().clone();
        let by = |id: &str| {
            (0..8)
                .map(|i| format!("edge-{i}"))
                .find(|n| writer_of(n, &both).is_some_and(|w| w.id == id))
                .expect("a node")
        };
        let (n, m) = (by("relay-b"), by("relay-a"));
        let status = Arc::new(status().await);
        let (tx, rx) = tokio::sync::watch::channel(both.to_vec());
        let sink = DesignatedStatus::new(status.clone(), "relay-a", rx);
        let caps = capability::EXTENSIBLE;
        let on_a = bench(&shared, &pki, &n, caps, vec![]).await;
        let other = bench(&shared, &pki, &m, caps, vec![]).await;
        for b in [&on_a, &other] {
            register(&shared, &b.handle);
            let info = || b.handle.status_info(&shared);
            b.handle.report_to(&shared.registry, &sink, info, false);
        }
        assert_eq!(queued(&status, &n), None, "B writes N");
        assert_eq!(queued(&status, &m), Some(true), "A writes M");
        tx.send_replace(only_a.to_vec());
        assert_eq!(report_gained(&shared, &sink, &both, &only_a), 1);
        assert_eq!(queued(&status, &n), Some(true), "A writes N now");
        // Only what changed writer reports again.
        assert_eq!(report_gained(&shared, &sink, &only_a, &only_a), 0);
        relay.shutdown(Duration::ZERO).await;
    }

    /// A Node saying `False` while its edge has a session here (another
    /// writer wrote it after this relay wrote `True`) gets the session's
    /// report again; a Node saying `True` with none gets `False`, as
    /// before; and a Node whose report waits is left to it.
    #[tokio::test]
    async fn the_sweep_writes_up_a_node_saying_false_with_a_session_here() {
        let (relay, pki) = crate::admin::tests::relay_configured(2, |_| {}).await;
        let shared = relay.shared().clone();
        let status = status().await;
        let b = bench(&shared, &pki, "edge-0", capability::EXTENSIBLE, vec![]).await;
        register(&shared, &b.handle);
        b.handle.report_status(&shared);
        let says = [("edge-0", false), ("edge-1", true)];
        let done = correct(&status, &shared, &[], says);
        assert_eq!(done, Corrected { down: 1, again: 1 });
        assert_eq!(queued(&status, "edge-0"), Some(true));
        assert_eq!(queued(&status, "edge-1"), Some(false));
        let done = correct(&status, &shared, &[], says);
        assert_eq!(done, Corrected::default(), "their reports wait");
        relay.shutdown(Duration::ZERO).await;
    }
}
