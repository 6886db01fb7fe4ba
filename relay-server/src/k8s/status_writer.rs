//! Node conditions and Events, written in the background ([`KubeStatus`]).
//!
//! Both go out with a bounded number of requests in flight, never one at a
//! time: each request waits a round trip to the apiserver, and a condition
//! write also waits for etcd to commit it. One write at a time, 1,000
//! edges registering at once left Nodes saying their tunnel was down for
//! 16 s after every edge was connected (`loadtest sessions --kube`, 2 ms per
//! read and 10 ms per write at the stand-in); at 10,000 edges, minutes.
//! The bound keeps one relay's share of the apiserver small: a reconnect
//! storm is at most [`CONDITION_WRITERS`] + [`EVENT_WRITERS`] requests at
//! once, however many edges there are. One node's condition is never
//! written twice at once, so its writes stay in order.
//!
//! Sessions report with their generation ([`StatusSink::report`]): of a
//! node's sessions, the newest one's report is the one kept, whatever
//! order their tasks run in.
//!
//! Two writes come from elsewhere than a session's report: a Node left
//! saying `True` with no session here ([`KubeStatus::stale`], see
//! `stale_conditions.rs`; the reverse, a Node saying `False` with a
//! session here, is that session's report told again, after
//! [`KubeStatus::unstale`]), and at shutdown [`KubeStatus::flush`] writes
//! what is still queued (the last sessions' "down") before the writer
//! stops.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_kube::{
    KubeError, SessionEvent, SessionEvents, StatusWriter, TunnelCondition, WriteOutcome,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use relay_transport::sampled;

use crate::status::{EventBudget, HoldOff, Report, SessionInfo, StatusSink, StatusStats};

/// Condition writes in flight at once (each a read of the Node's status the
/// first time, then an apply).
pub const CONDITION_WRITERS: usize = 16;

/// Events being published at once.
pub const EVENT_WRITERS: usize = 8;

/// Most Events waiting to be published; more are dropped and counted (a
/// reconnect storm of thousands of edges must not queue without bound).
const EVENT_QUEUE: usize = 4096;

/// Least time between two condition writes for one node (see
/// [`HoldOff`]): a flapping node's condition is written at most this often.
const CONDITION_HOLD_OFF: Duration = Duration::from_secs(5);

/// Longest wait before a failed condition write is tried again (the wait
/// doubles from the hold-off with each failure in a row).
const RETRY_LIMIT: Duration = Duration::from_secs(300);

/// Writes conditions and Events in the background. Conditions are kept as
/// the latest desired state per node and paced per node ([`HoldOff`]: a
/// burst of ups and downs is one write); Events are budgeted per node
/// ([`EventBudget`]) and go through a bounded queue.
pub(super) struct KubeStatus {
    /// Shared with the condition writer task, for
    /// [`StatusSink::writers_changed`].
    writer: Option<Arc<StatusWriter>>,
    desired: Arc<Mutex<Queued>>,
    wake: Arc<Notify>,
    events: Option<mpsc::Sender<(String, SessionEvent)>>,
    budget: Mutex<EventBudget>,
    counters: Arc<StatusCounters>,
    /// Flushes asked for (a count), read by the condition writer.
    flush_asked: watch::Sender<u64>,
    /// The last flush the condition writer finished.
    flushed: watch::Sender<u64>,
}

/// The conditions reported and not yet written, under one lock: what
/// [`KubeStatus::stale`] must never write over; and which session's
/// reports are still taken per node.
#[derive(Default)]
struct Queued {
    /// The latest desired state per node, not yet taken by the writer.
    desired: HashMap<String, TunnelCondition>,
    /// The nodes the writer took a state for and has not finished writing
    /// (held for their hold-off or a retry after a failure, or in
    /// flight): moved here in the same lock as they leave `desired`, so a
    /// report is always in one or the other until it is written.
    pending: HashSet<String>,
    /// The newest session generation that reported per node (see
    /// [`StatusSink::report`]): a report of an older one comes from a
    /// session its successor replaced, late, and is dropped. Checked and
    /// updated in the same lock as the report is queued, so the newest
    /// session's report is the last queued whatever order the sessions'
    /// tasks run in. Never pruned: when an older session can no longer
    /// report is not known here, and the map is small (a name and a
    /// number per node that had a session here, which the cluster's Nodes
    /// bound).
    newest: HashMap<String, u64>,
}

#[derive(Default)]
struct StatusCounters {
    writes: AtomicU64,
    failed: AtomicU64,
    coalesced: AtomicU64,
    rate_limited: AtomicU64,
    queue_full: AtomicU64,
    event_errors: AtomicU64,
}

/// What the condition says when a node has no session: the one vocabulary
/// for a session that ended and for a Node left `True` without one.
fn no_session(why: &str) -> TunnelCondition {
    TunnelCondition {
        ready: false,
        reason: "NoSession".into(),
        message: format!("no tunnel session: {why}"),
    }
}

impl KubeStatus {
    pub(super) fn start(
        writer: Option<StatusWriter>,
        events: Option<SessionEvents>,
        stop: CancellationToken,
    ) -> Self {
        let desired: Arc<Mutex<Queued>> = Arc::default();
        let wake = Arc::new(Notify::new());
        let counters = Arc::new(StatusCounters::default());
        let writer = writer.map(Arc::new);
        let flush_asked = watch::channel(0).0;
        let flushed = watch::channel(0).0;
        if let Some(writer) = &writer {
            tokio::spawn(write_conditions(
                writer.clone(),
                desired.clone(),
                wake.clone(),
                counters.clone(),
                (flush_asked.subscribe(), flushed.clone()),
                stop.clone(),
            ));
        }
        let tx = events.map(|events| {
            let (tx, rx) = mpsc::channel::<(String, SessionEvent)>(EVENT_QUEUE);
            tokio::spawn(publish_events(Arc::new(events), rx, counters.clone(), stop));
            tx
        });
        KubeStatus {
            writer,
            desired,
            wake,
            events: tx,
            budget: Mutex::default(),
            counters,
            flush_asked,
            flushed,
        }
    }

    /// Writes `node` down (`NoSession`, for `why`) for a Node that says
    /// `True` while, as `unbacked` tells, no session of this relay backs
    /// it. `unbacked` is asked under the lock every session report
    /// takes, and a session reports only once it is registered: so a
    /// session coming up meanwhile either is seen (nothing written) or
    /// reports after this, and its `True` replaces this `False` (written
    /// after it, in order). Nothing is written either while a report for
    /// the node waits, queued or held by the writer (its hold-off, a retry
    /// after a failed write) or in flight: it is newer than what the Node
    /// says, and its reason (a real "down") must not be replaced by this
    /// generic one. Returns whether the write was queued.
    pub(super) fn stale(&self, node: &str, why: &str, unbacked: impl FnOnce() -> bool) -> bool {
        let Some(writer) = &self.writer else {
            return false;
        };
        let mut q = self.desired.lock().unwrap_or_else(|e| e.into_inner());
        if q.desired.contains_key(node) || q.pending.contains(node) || !unbacked() {
            return false;
        }
        // The Node says `True`: what this writer remembers writing (say
        // `False`, before another replica wrote `True`) must not make the
        // write look unneeded.
        writer.forget(node);
        q.desired.insert(node.to_string(), no_session(why));
        drop(q);
        self.wake.notify_one();
        true
    }

    /// Writes the conditions still queued, hold-offs ignored, and waits
    /// for them, at most `bound`; false if some were left (or failed and
    /// wait for their retry). For shutdown: the sessions' last "down"
    /// reports must reach the Nodes before the writer stops, or the Nodes
    /// stay `True` with no relay to correct them until one starts.
    pub(super) async fn flush(&self, bound: Duration) -> bool {
        if self.writer.is_none() {
            return true;
        }
        let mut asked = 0;
        self.flush_asked.send_modify(|n| {
            *n += 1;
            asked = *n;
        });
        let mut done = self.flushed.subscribe();
        let finished = tokio::time::timeout(bound, done.wait_for(|n| *n >= asked))
            .await
            .is_ok_and(|r| r.is_ok());
        finished
    }

    /// Whether the Node says `False` (or nothing) while, as the caller
    /// saw, a session of this relay backs it: then what the writer
    /// remembers writing (`True`, before another writer wrote `False`:
    /// another replica, or the relay this one replaced in a rolling
    /// update) is forgotten, so that the session's report, told again by
    /// the caller next, is written rather than skipped as written already.
    /// False while a report for the node waits, queued or held by the
    /// writer or in flight: it is newer than what the Node says.
    pub(super) fn unstale(&self, node: &str) -> bool {
        let Some(writer) = &self.writer else {
            return false;
        };
        let q = self.desired.lock().unwrap_or_else(|e| e.into_inner());
        if q.desired.contains_key(node) || q.pending.contains(node) {
            return false;
        }
        writer.forget(node);
        true
    }

    /// Queues `cond` for `node`, reported by the session of `generation`
    /// (`None`: not a session's report, always taken); false, queueing
    /// nothing, when a newer session of the node reported already.
    fn condition(&self, node: &str, generation: Option<u64>, cond: TunnelCondition) -> bool {
        let mut q = self.desired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = generation {
            match q.newest.get_mut(node) {
                Some(newest) if g < *newest => {
                    let newer = *newest;
                    drop(q);
                    debug!(%node, generation = g, newer, "a replaced session's late report dropped");
                    return false;
                }
                Some(newest) => *newest = g,
                None => {
                    q.newest.insert(node.to_string(), g);
                }
            }
        }
        let replaced = q.desired.insert(node.to_string(), cond);
        drop(q);
        if replaced.is_some() {
            self.counters.coalesced.fetch_add(1, Relaxed);
        }
        self.wake.notify_one();
        true
    }

    /// A session's report (`generation` `None`: through the plain
    /// [`StatusSink`] methods): its condition, and for a session coming or
    /// going an Event; nothing when a newer session of the node reported
    /// already (see [`StatusSink::report`]).
    fn apply(&self, node: &str, generation: Option<u64>, report: Report<'_>) {
        let ready = |info: &SessionInfo| TunnelCondition {
            ready: true,
            reason: info.reason().into(),
            message: info.message(),
        };
        match report {
            Report::Up(info) => {
                if self.condition(node, generation, ready(info)) {
                    // Stable notes, so the recorder folds repeats into a
                    // series.
                    let note = format!(
                        "tunnel up over {} via relay {}",
                        info.transport, info.relay_id
                    );
                    self.event(node, SessionEvent::Up { note });
                }
            }
            Report::Changed(info) => {
                self.condition(node, generation, ready(info));
            }
            Report::Down(why) => {
                if self.condition(node, generation, no_session(why)) {
                    let note = why.to_string();
                    self.event(node, SessionEvent::Down { note });
                }
            }
        }
    }

    fn event(&self, node: &str, ev: SessionEvent) {
        let Some(tx) = &self.events else { return };
        let allowed = self
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(node, std::time::Instant::now());
        if !allowed {
            // Sampled in time (not at powers of two of a process-long
            // count, which months in logs a new episode, or another node,
            // only at the next power of two).
            let n = self.counters.rate_limited.fetch_add(1, Relaxed) + 1;
            sampled!(
                warn,
                "a node over its event budget; events dropped (its condition still tells its state)",
                %node,
                dropped = n
            );
            return;
        }
        if tx.try_send((node.to_string(), ev)).is_err() {
            let n = self.counters.queue_full.fetch_add(1, Relaxed) + 1;
            sampled!(warn, "event queue full; events dropped", dropped = n);
        }
    }
}

/// Publishes queued Events, [`EVENT_WRITERS`] at a time, until `stop`.
async fn publish_events(
    events: Arc<SessionEvents>,
    mut rx: mpsc::Receiver<(String, SessionEvent)>,
    counters: Arc<StatusCounters>,
    stop: CancellationToken,
) {
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            next = rx.recv(), if in_flight.len() < EVENT_WRITERS => {
                let Some((node, ev)) = next else { break };
                let (events, counters) = (events.clone(), counters.clone());
                in_flight.spawn(async move {
                    if let Err(e) = events.publish(&node, &ev).await {
                        // Not retried (the condition tells the node's
                        // state); counted, and logged once in a while, as
                        // an apiserver refusing every Event (no RBAC for
                        // events.k8s.io) fails them all.
                        let n = counters.event_errors.fetch_add(1, Relaxed) + 1;
                        sampled!(warn, "publishing an event failed; dropped", %node, error = %e, failed = n);
                    }
                });
            }
        }
    }
    // The queue closed (the relay stopped): finish what was started.
    while in_flight.join_next().await.is_some() {}
}

/// The condition writer: takes the latest desired state per node and
/// writes each node when its hold-off allows, [`CONDITION_WRITERS`] nodes
/// at a time, until `stop`. Once a flush is asked (`flush`: asked, done)
/// hold-offs no longer hold (a failed write still waits for its retry),
/// and each flush is marked done once nothing is queued or in flight
/// (but such failed writes).
async fn write_conditions(
    writer: Arc<StatusWriter>,
    desired: Arc<Mutex<Queued>>,
    wake: Arc<Notify>,
    counters: Arc<StatusCounters>,
    (mut flush_asked, flushed): (watch::Receiver<u64>, watch::Sender<u64>),
    stop: CancellationToken,
) {
    // The last flush asked: from then on, the relay is stopping.
    let mut flushing = 0u64;
    let mut pace = HoldOff::new(CONDITION_HOLD_OFF);
    // Desired states waiting for their node's hold-off or a free writer.
    let mut held: HashMap<String, TunnelCondition> = HashMap::new();
    let mut in_flight: JoinSet<Result<WriteOutcome, KubeError>> = JoinSet::new();
    // The node each write in flight is for, and the state it writes (by
    // task, so a write that panicked still frees its node); a newer state
    // for one waits in `held`.
    let mut writing: HashMap<tokio::task::Id, (String, TunnelCondition)> = HashMap::new();
    let busy = |writing: &HashMap<tokio::task::Id, (String, TunnelCondition)>, n: &str| {
        writing.values().any(|(w, _)| w == n)
    };
    // Nodes whose last write failed: how many times in a row, and when the
    // next try is due (the hold-off doubling per failure, up to
    // RETRY_LIMIT), so a write the apiserver keeps refusing (no RBAC for
    // nodes/status, a 422) costs a request every few minutes per node, not
    // every hold-off.
    let mut failing: HashMap<String, (u32, std::time::Instant)> = HashMap::new();
    let due = |pace: &HoldOff,
               failing: &HashMap<String, (u32, std::time::Instant)>,
               flushing: bool,
               n: &str,
               now: std::time::Instant| {
        let paced = if flushing { now } else { pace.due(n, now) };
        failing.get(n).map_or(paced, |(_, at)| paced.max(*at))
    };
    loop {
        let now = std::time::Instant::now();
        // The next hold-off to end, if a writer is free to act on it.
        let next = (in_flight.len() < CONDITION_WRITERS)
            .then(|| {
                held.keys()
                    .filter(|n| !busy(&writing, n))
                    .map(|n| due(&pace, &failing, flushing > 0, n, now))
                    .min()
            })
            .flatten();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            r = flush_asked.changed() => match r {
                Ok(()) => flushing = *flush_asked.borrow_and_update(),
                // The sink is gone: nothing more can be asked or queued.
                Err(_) => return,
            },
            Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                let (id, result) = match done {
                    Ok((id, result)) => (id, Some(result)),
                    Err(e) => (e.id(), None),
                };
                let Some((node, cond)) = writing.remove(&id) else { continue };
                let failed = match result {
                    Some(Ok(outcome)) => {
                        debug!(%node, ?outcome, "node condition");
                        if outcome == WriteOutcome::Written {
                            counters.writes.fetch_add(1, Relaxed);
                            pace.wrote(&node, std::time::Instant::now());
                        }
                        None
                    }
                    Some(Err(KubeError::NotFound { .. })) => {
                        writer.forget(&node);
                        None
                    }
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("the write panicked".to_string()),
                };
                // A state that did not reach the apiserver (it is down,
                // throttling, timing out, refusing) is written again after
                // a wait (see `failing`), unless a newer one is waiting: a
                // node whose tunnel went down during an apiserver outage
                // must not stay `True` for ever.
                if let Some(error) = failed {
                    counters.failed.fetch_add(1, Relaxed);
                    let tries = failing.get(&node).map_or(1, |(n, _)| n + 1);
                    let wait = CONDITION_HOLD_OFF
                        .saturating_mul(1u32 << (tries.min(10) - 1))
                        .min(RETRY_LIMIT);
                    failing.insert(node.clone(), (tries, std::time::Instant::now() + wait));
                    // Sampled: with the apiserver away every node's write
                    // fails, and each is retried (a line per node per
                    // retry was thousands a minute at 10,000 nodes). The
                    // line names one node and how many are failing;
                    // relay_node_condition_write_failures_total counts
                    // every failure.
                    sampled!(
                        warn,
                        "writing the node condition failed; retrying later",
                        %node,
                        %error,
                        nodes_failing = failing.len(),
                        retry_in = ?wait
                    );
                    held.entry(node).or_insert(cond);
                } else {
                    failing.remove(&node);
                    if !held.contains_key(&node) {
                        // Written: no report of the node's waits any more.
                        desired
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pending
                            .remove(&node);
                    }
                }
            }
            _ = tokio::time::sleep_until(next.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)), if next.is_some() => {}
        }
        {
            let mut q = desired.lock().unwrap_or_else(|e| e.into_inner());
            let Queued {
                desired, pending, ..
            } = &mut *q;
            for (node, cond) in desired.drain() {
                pending.insert(node.clone());
                if held.insert(node, cond).is_some() {
                    counters.coalesced.fetch_add(1, Relaxed);
                }
            }
        }
        let now = std::time::Instant::now();
        let free = CONDITION_WRITERS.saturating_sub(in_flight.len());
        let ready: Vec<String> = held
            .keys()
            .filter(|n| !busy(&writing, n) && due(&pace, &failing, flushing > 0, n, now) <= now)
            .take(free)
            .cloned()
            .collect();
        for node in ready {
            let Some(cond) = held.remove(&node) else {
                continue;
            };
            let writer = writer.clone();
            let (name, sent) = (node.clone(), cond.clone());
            let task = in_flight.spawn(async move { writer.set(&name, &sent).await });
            writing.insert(task.id(), (node, cond));
        }
        // `desired` was drained above, after the flush was asked: every
        // report made before it is written, failed, or in flight.
        if flushing > *flushed.borrow()
            && in_flight.is_empty()
            && held.keys().all(|n| failing.contains_key(n))
        {
            flushed.send_replace(flushing);
        }
    }
}

impl StatusSink for KubeStatus {
    fn up(&self, node: &str, info: &SessionInfo) {
        self.apply(node, None, Report::Up(info));
    }

    fn changed(&self, node: &str, info: &SessionInfo) {
        self.apply(node, None, Report::Changed(info));
    }

    fn down(&self, node: &str, why: &str) {
        self.apply(node, None, Report::Down(why));
    }

    fn report(&self, node: &str, generation: u64, report: Report<'_>) {
        self.apply(node, Some(generation), report);
    }

    fn rejected(&self, node: &str, reason: &str, message: &str) {
        // The reason is also the Event's action, so each reason is its own
        // Event; the note keeps it for `kubectl describe`, which shows no
        // action. relay-kube cuts the note to what the apiserver accepts.
        self.event(
            node,
            SessionEvent::Rejected {
                reason: reason.to_string(),
                note: format!("{reason}: {message}"),
            },
        );
    }

    fn writers_changed(&self) {
        // Synchronously, before the caller passes on the write that follows:
        // that write then reads the Node instead of trusting the memory.
        if let Some(w) = &self.writer {
            w.forget_all();
        }
    }

    fn stats(&self) -> StatusStats {
        let c = &self.counters;
        StatusStats {
            condition_writes: c.writes.load(Relaxed),
            condition_failures: c.failed.load(Relaxed),
            condition_coalesced: c.coalesced.load(Relaxed),
            events_rate_limited: c.rate_limited.load(Relaxed),
            events_queue_full: c.queue_full.load(Relaxed),
            events_api_errors: c.event_errors.load(Relaxed),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::registry::testing::{reg, Fake};
    use crate::registry::Registry;
    use relay_kube::{ClientOptions, KubeClientConfig};

    /// A writer whose API is nowhere; on a current-thread runtime its task
    /// never runs between the test's steps (no await), so `desired` shows
    /// exactly what the calls queued.
    pub(crate) async fn status() -> KubeStatus {
        let path = std::env::temp_dir().join(format!(
            "status-writer-{}-{}.kubeconfig",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:9\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        )
        .unwrap();
        let client = KubeClientConfig::Kubeconfig {
            path: path.clone(),
            context: None,
        }
        .client(&ClientOptions::default())
        .await
        .unwrap();
        let _ = std::fs::remove_file(&path);
        let writer = StatusWriter::new(&client, Duration::from_secs(1));
        KubeStatus::start(Some(writer), None, CancellationToken::new())
    }

    /// Whether the condition queued for `node` says ready, if one is.
    pub(crate) fn queued(s: &KubeStatus, node: &str) -> Option<bool> {
        let d = s.desired.lock().unwrap();
        d.desired.get(node).map(|c| c.ready)
    }

    fn info() -> SessionInfo {
        SessionInfo::for_tests()
    }

    /// An edge that reports its capture not installed: its node stays
    /// `True` (the tunnel is up) with reason `CaptureFailing` and the
    /// error in the message; installed again, `SessionUp` as before.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_edge_capture_keeps_true_with_a_reason_of_its_own() {
        let s = status().await;
        let queued_condition = |node: &str| s.desired.lock().unwrap().desired.get(node).cloned();
        let mut failing = info();
        failing.capture_failing = Some("nft: Operation not supported".into());
        s.report("edge-7", 3, Report::Up(&failing));
        let c = queued_condition("edge-7").expect("queued");
        assert!(c.ready, "{c:?}");
        assert_eq!(c.reason, "CaptureFailing");
        assert!(
            c.message.ends_with(": nft: Operation not supported"),
            "{}",
            c.message
        );
        s.report("edge-7", 3, Report::Changed(&info()));
        let c = queued_condition("edge-7").expect("queued");
        assert_eq!((c.ready, c.reason.as_str()), (true, "SessionUp"));
        assert!(!c.message.contains("capture failing"), "{}", c.message);
    }

    /// The sweep's `False` never undoes a session: one registered is seen,
    /// one whose report waits is left to it, and one reporting after the
    /// sweep replaces its `False`.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_write_yields_to_a_session() {
        let s = status().await;
        assert!(s.stale("edge-0", "none here", || true));
        assert_eq!(queued(&s, "edge-0"), Some(false));
        assert!(!s.stale("edge-1", "none here", || false), "a session");
        assert_eq!(queued(&s, "edge-1"), None);
        s.up("edge-2", &info());
        assert!(!s.stale("edge-2", "none here", || true), "a report waits");
        assert_eq!(queued(&s, "edge-2"), Some(true));
        s.up("edge-0", &info());
        assert_eq!(queued(&s, "edge-0"), Some(true), "the later report wins");
    }

    /// Session 1 of a node ends: out of the registry, its task preempted
    /// before its `down`. Session 2 registers and reports `up`; then
    /// session 1's `down` comes: the node stays ready (the last call used
    /// to win, leaving it `False` under a connected edge, and its Down
    /// Event after the Up). Session 2's own `down` is still taken, and so
    /// is a newer session's `up` after it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_replaced_sessions_late_down_does_not_undo_its_successor() {
        let s = status().await;
        let r = Registry::<Fake>::default();
        let session = |generation| {
            std::sync::Arc::new(Fake {
                node: "edge-5".into(),
                generation,
                routes: vec![],
            })
        };
        let (g1, g2, g3) = (7, 8, 9);
        reg(&r, session(g1), 10).unwrap();
        s.report("edge-5", g1, Report::Up(&info()));
        assert!(r.remove("edge-5", g1), "session 1 ends");
        reg(&r, session(g2), 10).unwrap();
        s.report("edge-5", g2, Report::Up(&info()));
        s.report("edge-5", g1, Report::Down("the edge closed the session"));
        assert_eq!(queued(&s, "edge-5"), Some(true), "session 2 is live");
        s.report("edge-5", g1, Report::Changed(&info()));
        assert!(r.remove("edge-5", g2), "session 2 ends");
        s.report("edge-5", g2, Report::Down("the edge closed the session"));
        assert_eq!(queued(&s, "edge-5"), Some(false), "its own down is taken");
        s.report("edge-5", g1, Report::Up(&info()));
        assert_eq!(queued(&s, "edge-5"), Some(false), "nor a late up");
        reg(&r, session(g3), 10).unwrap();
        s.report("edge-5", g3, Report::Up(&info()));
        assert_eq!(queued(&s, "edge-5"), Some(true));
        // Other nodes keep their own order.
        s.report("edge-6", 1, Report::Down("gone"));
        assert_eq!(queued(&s, "edge-6"), Some(false));
    }

    /// A real "down" the writer has taken (held for its hold-off or a
    /// retry, its writes failing: the API is nowhere, or in flight) is not
    /// replaced by the sweep's generic one, however often the sweep runs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_write_yields_to_a_held_report() {
        let s = status().await;
        s.down("edge-3", "the edge closed the session");
        // Let the writer take it (and fail to write it).
        let t0 = std::time::Instant::now();
        while queued(&s, "edge-3").is_some() {
            assert!(t0.elapsed() < Duration::from_secs(5), "never taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..3 {
            assert!(!s.stale("edge-3", "none at relay a", || true));
            assert_eq!(queued(&s, "edge-3"), None);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Another node with nothing pending is still written down.
        assert!(s.stale("edge-4", "none at relay a", || true));
    }

    /// With the apiserver away every node's condition write fails (and is
    /// retried): one warning per window names a node and how many fail,
    /// not one per node per retry; the counter counts each. (At most one:
    /// the sampler is per process, and another test here may have taken
    /// the window, logging to its own thread.)
    #[tokio::test(flavor = "current_thread")]
    async fn failed_condition_writes_are_logged_sampled() {
        let (out, _guard) = relay_transport::test_log::Captured::start();
        let s = status().await;
        for i in 0..40 {
            s.down(&format!("edge-{i}"), "the edge closed the session");
        }
        let t0 = std::time::Instant::now();
        while s.stats().condition_failures < 40 {
            assert!(t0.elapsed() < Duration::from_secs(20), "never failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = out.text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("writing the node condition failed"))
            .collect();
        assert!(lines.len() <= 1, "{text}");
        assert!(lines.iter().all(|l| l.contains("nodes_failing=")), "{text}");
    }
}
