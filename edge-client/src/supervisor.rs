//! One session per relay replica.
//!
//! The edge first dials the address in its config (a load balancer, a DNS
//! name, or one replica: the *bootstrap* session). A relay with
//! `[replicas]` then tells it the replica set ([`Control::Replicas`]); the
//! supervisor keeps one session per replica, each dialling the replica's
//! own address with its own reconnect loop and backoff
//! ([`crate::client::run`], unchanged), adds and drops sessions as the set
//! changes, and follows at most [`EdgeConfig::max_relays`] replicas.
//!
//! When the configured address is one replica's advertised address, the
//! bootstrap session simply becomes that replica's session. Otherwise the
//! bootstrap session and a direct session to the same replica would
//! supersede each other on that replica (one session per node per relay),
//! so the bootstrap session gives way: direct sessions start for every
//! replica but the one the bootstrap session is on, and once any direct
//! session is up the bootstrap session closes and that replica gets its
//! direct one. The edge is never without a session while a replica answers:
//! when no direct session has been up for a handshake timeout (every
//! advertised address fails, e.g. a Lease naming an address that does not
//! answer), the bootstrap session is started again, whatever the set says.
//!
//! A session to a replica that leaves the set is not closed by the edge
//! while it is up: a replica leaving on a rolling update has released its
//! Lease and is draining, and the streams in flight through it get its
//! drain grace; the relay closes the session when they are done, and only
//! then is its reconnect loop stopped (at most [`RETIRE_LIMIT`] later).
//!
//! A relay that advertises no set (an older relay, or no `[replicas]`)
//! leaves the edge with its one bootstrap session, as before. An empty set
//! is treated the same way (the last set is kept): no live relay can
//! truthfully report one, and following it would drop every session.
//!
//! Outside, the client still looks like one session: its state and the
//! connection edge-opened streams use are those of the first connected
//! session (bootstrap first, then replicas by id), so capture and
//! edge-opened streams follow whichever session is up.
//!
//! [`Control::Replicas`]: relay_protocol::Control::Replicas

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Replica;
use relay_transport::udp::FlowTable;
use relay_transport::TunnelConn;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::client::{run, set_state, EdgeState, EdgeStats};
use crate::config::EdgeConfig;
use crate::identity::Credentials;
use crate::serve::ServedSet;
use crate::services::EdgeServices;

type ConnSlot = Option<(TunnelConn, Arc<FlowTable>)>;

/// How long a session to a replica that left the set is kept for the
/// streams in flight through it: the relay's default drain grace. A
/// draining relay closes the session sooner, as soon as they are done; the
/// limit bounds a session to a replica that left the set without draining
/// (its Lease expired while it still runs).
const RETIRE_LIMIT: Duration = Duration::from_secs(30);

/// Which session: the configured address, or a replica by id. Ordered so
/// the bootstrap session comes first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Bootstrap,
    Replica(String),
}

/// One reconnect loop and what it publishes.
struct Runner {
    addr: String,
    cancel: CancellationToken,
    state: watch::Receiver<EdgeState>,
    conn: watch::Receiver<ConnSlot>,
    task: tokio::task::JoinHandle<()>,
    notifier: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// The replica id the session is registered with, if it is up.
    fn connected_to(&self) -> Option<String> {
        match &*self.state.borrow() {
            EdgeState::Connected { relay_id, .. } => Some(relay_id.clone()),
            _ => None,
        }
    }

    /// The session id, if the session is up and its connection published.
    fn session(&self) -> Option<u64> {
        match &*self.state.borrow() {
            EdgeState::Connected { session_id, .. } if self.conn.borrow().is_some() => {
                Some(*session_id)
            }
            _ => None,
        }
    }

    fn is_connected(&self) -> bool {
        matches!(&*self.state.borrow(), EdgeState::Connected { .. })
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.notifier.abort();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            warn!(relay = %self.addr, "session to a replica did not stop within 5s");
        }
    }
}

/// What the supervisor shares with every runner.
struct Common {
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    /// The ClusterIP table: one per edge, fed by every session (each
    /// replica sends the same table).
    services: Arc<EdgeServices>,
    creds: Arc<Credentials>,
    stats: Arc<EdgeStats>,
    wake: Arc<Notify>,
    /// The node-local resolver (`[dns]`): one per edge, fed by every
    /// session like the Service table.
    dns: Option<crate::dns::Resolver>,
}

impl Common {
    fn spawn(&self, key: &Key, addr: &str) -> Runner {
        let mut cfg = (*self.cfg).clone();
        cfg.relay = addr.to_string();
        let (state_tx, state) = watch::channel(EdgeState::Connecting {
            attempt: 1,
            last: None,
        });
        let (conn_tx, conn) = watch::channel(None);
        let cancel = CancellationToken::new();
        let span = match key {
            Key::Bootstrap => tracing::info_span!("relay", target = %addr),
            Key::Replica(id) => tracing::info_span!("relay", replica = %id, target = %addr),
        };
        let task = tokio::spawn(
            run(
                Arc::new(cfg),
                self.served.clone(),
                self.services.clone(),
                self.creds.clone(),
                state_tx,
                conn_tx,
                self.stats.clone(),
                cancel.clone(),
                self.dns.clone(),
            )
            .instrument(span),
        );
        // Wakes the supervisor on any change of this session.
        let (mut s, mut c, wake) = (state.clone(), conn.clone(), self.wake.clone());
        let notifier = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = s.changed() => if r.is_err() { break },
                    r = c.changed() => if r.is_err() { break },
                }
                wake.notify_one();
            }
        });
        Runner {
            addr: addr.to_string(),
            cancel,
            state,
            conn,
            task,
            notifier,
        }
    }
}

/// Runs the edge's sessions until `cancel`; publishes the first connected
/// session's state and connection.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn supervise(
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    services: Arc<EdgeServices>,
    creds: Arc<Credentials>,
    state: watch::Sender<EdgeState>,
    conn_tx: watch::Sender<ConnSlot>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
    dns: Option<crate::dns::Resolver>,
) {
    let common = Common {
        cfg: cfg.clone(),
        served,
        services,
        creds,
        stats,
        wake: Arc::new(Notify::new()),
        dns,
    };
    let mut runners: BTreeMap<Key, Runner> = BTreeMap::new();
    runners.insert(Key::Bootstrap, common.spawn(&Key::Bootstrap, &cfg.relay));
    // The last set a connected session reported; kept while every session
    // is down, so an outage does not tear down the per-replica loops.
    let mut set: Vec<Replica> = Vec::new();
    let mut capped_logged: Option<usize> = None;
    // Since when no session has been up (None: one is up now).
    let mut down_since: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let fallback_after = cfg.handshake_timeout;
    let mut published: Option<(Key, Option<u64>)> = None;
    // Sessions to replicas that left the set, kept until the relay closes
    // them (see RETIRE_LIMIT); never published.
    let mut retiring: Vec<(Runner, tokio::time::Instant)> = Vec::new();
    // At a random phase: edges started together (a host running many, the
    // load tester's fleet) do not all wake in the same millisecond.
    let period = Duration::from_millis(500);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + period.mul_f64(rand::random::<f64>()),
        period,
    );
    loop {
        // The set most connected sessions report (replicas agree but for
        // moments of a change, or one with a stale view, e.g. cut off from
        // the API); ties go to the first in key order, which is stable.
        if let Some(s) = majority(runners.values().filter_map(|r| match &*r.state.borrow() {
            EdgeState::Connected {
                replicas: Some(set),
                ..
            } => Some(set.clone()),
            _ => None,
        })) {
            if s != set {
                info!(replicas = ?s.iter().map(|r| &r.id).collect::<Vec<_>>(), "relay replica set");
                set = s;
            }
        }
        let mut wanted: Vec<Replica> = set.clone();
        wanted.sort();
        wanted.dedup_by(|a, b| a.id == b.id);
        if wanted.len() > cfg.max_relays {
            if capped_logged != Some(wanted.len()) {
                warn!(
                    advertised = wanted.len(),
                    cap = cfg.max_relays,
                    "more relay replicas than max_relays: following the first by id"
                );
                capped_logged = Some(wanted.len());
            }
            wanted.truncate(cfg.max_relays);
        }
        // The configured address may be one replica's own: that session
        // simply becomes the replica's (no second session, no handover).
        if let Some(r) = wanted.iter().find(|r| r.addr == cfg.relay) {
            let k = Key::Replica(r.id.clone());
            if !runners.contains_key(&k) {
                if let Some(b) = runners.remove(&Key::Bootstrap) {
                    info!(replica = %r.id, "the configured relay address is this replica's; its session stays");
                    runners.insert(k, b);
                }
            }
        }
        let any_up = runners.values().any(Runner::is_connected);
        match (any_up, down_since) {
            (true, _) => down_since = None,
            (false, None) => down_since = Some(tokio::time::Instant::now()),
            (false, Some(_)) => {}
        }
        let direct_up = runners
            .iter()
            .any(|(k, r)| matches!(k, Key::Replica(_)) && r.is_connected());
        let boot_on = runners.get(&Key::Bootstrap).and_then(Runner::connected_to);
        // The bootstrap session: alone without a set; gives way once a
        // direct session is up; comes back when nothing has been up for a
        // handshake timeout.
        let want_boot = if wanted.is_empty() {
            true
        } else if direct_up || wanted.iter().any(|r| r.addr == cfg.relay) {
            // (A replica's own loop already dials the configured address.)
            false
        } else if runners.contains_key(&Key::Bootstrap) {
            true
        } else {
            down_since.is_some_and(|t| t.elapsed() >= fallback_after)
        };
        let mut want: BTreeMap<Key, String> = BTreeMap::new();
        if want_boot {
            want.insert(Key::Bootstrap, cfg.relay.clone());
        }
        for r in &wanted {
            // Never a second session to the replica the bootstrap session
            // is on: the two would supersede each other there.
            if want_boot && boot_on.as_deref() == Some(r.id.as_str()) {
                continue;
            }
            want.insert(Key::Replica(r.id.clone()), r.addr.clone());
        }
        // Stop what is no longer wanted (or moved to a new address) ...
        let stale: Vec<Key> = runners
            .iter()
            .filter(|(k, r)| want.get(k) != Some(&r.addr))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            let Some(r) = runners.remove(&k) else {
                continue;
            };
            if matches!(k, Key::Replica(_)) && !want.contains_key(&k) && r.is_connected() {
                // The replica left the set: on a rolling update it has
                // released its Lease and is draining. Closing now would cut
                // the streams in flight through it, which its drain grace
                // exists to let finish; the relay closes the session itself
                // once they are done (or at its grace).
                info!(session = ?k, relay = %r.addr, "replica left the set: its session ends when the relay closes it");
                retiring.push((r, tokio::time::Instant::now() + RETIRE_LIMIT));
            } else {
                info!(session = ?k, relay = %r.addr, "closing the session to this relay");
                r.stop().await;
            }
        }
        // Retired sessions: stopped once the relay closed them (no
        // reconnecting to a replica that left), or at the limit.
        let mut keep = Vec::new();
        for (r, until) in std::mem::take(&mut retiring) {
            if r.is_connected() && tokio::time::Instant::now() < until {
                keep.push((r, until));
            } else {
                info!(relay = %r.addr, "closing the session to a replica that left the set");
                r.stop().await;
            }
        }
        retiring = keep;
        // ... and start what is missing.
        for (k, addr) in &want {
            if !runners.contains_key(k) {
                info!(session = ?k, relay = %addr, "opening a session to this relay");
                runners.insert(k.clone(), common.spawn(k, addr));
            }
        }
        publish(&runners, &state, &conn_tx, &mut published);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = common.wake.notified() => {}
            _ = tick.tick() => {}
        }
    }
    for r in std::mem::take(&mut runners)
        .into_values()
        .chain(retiring.into_iter().map(|(r, _)| r))
    {
        r.stop().await;
    }
    conn_tx.send_replace(None);
    state.send_replace(EdgeState::Stopped);
}

/// The most frequent of `sets` (the first of equally frequent ones).
/// Empty sets are skipped: a relay answering us is live, so an empty set
/// says nothing, and following it would drop every session at once.
fn majority(sets: impl Iterator<Item = Vec<Replica>>) -> Option<Vec<Replica>> {
    let mut counts: Vec<(Vec<Replica>, usize)> = Vec::new();
    for mut s in sets.filter(|s| !s.is_empty()) {
        s.sort();
        match counts.iter_mut().find(|(x, _)| *x == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(s, _)| s)
}

/// Publishes the first connected session's state and connection (or, with
/// none up, the first session's state and no connection).
fn publish(
    runners: &BTreeMap<Key, Runner>,
    state: &watch::Sender<EdgeState>,
    conn_tx: &watch::Sender<ConnSlot>,
    published: &mut Option<(Key, Option<u64>)>,
) {
    let primary = runners
        .iter()
        .find(|(_, r)| r.is_connected())
        .or_else(|| runners.iter().next());
    let Some((key, r)) = primary else {
        return;
    };
    let s = r.state.borrow().clone();
    set_state(state, s);
    // A connection belongs to one session: republish when the primary or
    // its session changes, or its connection comes or goes.
    let sig = (key.clone(), r.session());
    if published.as_ref() != Some(&sig) {
        let c = match sig.1 {
            Some(_) => r.conn.borrow().clone(),
            None => None,
        };
        conn_tx.send_replace(c);
        *published = Some(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> Vec<Replica> {
        ids.iter()
            .map(|i| Replica {
                id: i.to_string(),
                addr: format!("{i}:8443"),
            })
            .collect()
    }

    #[test]
    fn the_set_most_sessions_report_wins_and_ties_keep_order() {
        let stale = set(&["a", "b", "c"]);
        let fresh = set(&["a", "b"]);
        let got = majority([stale.clone(), fresh.clone(), fresh.clone()].into_iter());
        assert_eq!(got, Some(fresh.clone()));
        // Order within a set does not matter.
        let mut shuffled = fresh.clone();
        shuffled.reverse();
        assert_eq!(
            majority([stale.clone(), shuffled, fresh.clone()].into_iter()),
            Some(fresh.clone())
        );
        assert_eq!(majority([stale.clone(), fresh].into_iter()), Some(stale));
        assert_eq!(majority(std::iter::empty()), None);
        // Empty sets say nothing: never followed, not even by a majority.
        assert_eq!(majority([vec![], vec![]].into_iter()), None);
        assert_eq!(
            majority([vec![], vec![], set(&["a"])].into_iter()),
            Some(set(&["a"]))
        );
    }
}
