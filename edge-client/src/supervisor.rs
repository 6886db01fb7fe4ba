//! One session per relay replica.
//!
//! The edge first dials the address in its config (a load balancer, a DNS
//! name, or one replica: the *bootstrap* session). A relay with
//! `[replicas]` then tells it the replica set ([`Control::Replicas`]); the
//! supervisor keeps one session per replica, each dialling the replica's
//! own address with its own reconnect loop and backoff
//! ([`crate::client::run`]), adds and drops sessions as the set changes,
//! and follows at most [`EdgeConfig::max_relays`] replicas.
//!
//! When the configured address is one replica's advertised address, the
//! bootstrap session simply becomes that replica's session. Otherwise the
//! bootstrap session hands over to a direct one, make-before-break: once it
//! is up on a replica X the edge follows, direct sessions start for every
//! replica, X included, and the bootstrap session stays until the direct
//! session to X is up. X registers that one over the bootstrap session in
//! one step (one session per node per relay: the newer supersedes the
//! older, and no route of this edge is withdrawn, so the edges whose
//! traffic goes through X never lose this edge's routes, and X writes no
//! Node condition for it); then the bootstrap session is closed. The
//! superseded bootstrap session must not come back: its reconnect loop
//! dials the configured address, which may well lead to X again, and
//! would supersede the direct session in turn. So from the moment the
//! direct session to X is started, the bootstrap loop dials no more: its
//! session ending, superseded or otherwise, ends it (the supervisor sets
//! its `give_way` flag before it starts that direct session; the relay's
//! "superseded" close code is not relied on, as the TCP fallback does not
//! carry it). A bootstrap session on a replica the edge does not follow
//! (outside the set, or past `max_relays`), or one still dialling, gives
//! way once any direct session is up.
//!
//! The edge is never without a session while a replica answers: when no
//! session has been up for a handshake timeout (every advertised address
//! fails, e.g. a Lease naming an address that does not answer), the
//! bootstrap session is started again, whatever the set says. (This is
//! also how a bootstrap session that ended after its hand-over began comes
//! back when the direct session to its replica never came up.)
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
//! Outside, the client's state is that of the first connected session
//! (bootstrap first, then replicas by id: the *primary*). Capture gets
//! every connected session ([`sessions::Sessions`]): it installs the union
//! of their relays' tunnel routes and sends each edge-opened stream or
//! flow on a session whose relay lists its destination, the primary first,
//! so a peer edge that one replica withdrew while another serves it stays
//! reachable.
//!
//! [`Control::Replicas`]: relay_protocol::Control::Replicas

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Replica;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::client::{run, set_state, ConnWatch, EdgeState, EdgeStats};
use crate::config::EdgeConfig;
use crate::identity::Credentials;
use crate::serve::ServedSet;
use crate::services::EdgeServices;

pub(crate) mod sessions;
use sessions::{Live, Sessions};

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
    /// Set on the bootstrap loop when the direct session to its replica is
    /// started: it then dials no more (see the module doc).
    give_way: Arc<AtomicBool>,
    state: watch::Receiver<EdgeState>,
    conn: ConnWatch,
    task: tokio::task::JoinHandle<()>,
    notifier: tokio::task::JoinHandle<()>,
    /// What capture was last given of this session: made anew only when
    /// the session or its routes changed.
    live: Option<Arc<Live>>,
    /// The keep-alive interval: how quiet a live path may be (see
    /// [`Live`]'s quiet check).
    keepalive: Duration,
}

impl Runner {
    /// The replica id the session is registered with and its generation
    /// there, if it is up.
    fn connected(&self) -> Option<(String, u64)> {
        match &*self.state.borrow() {
            EdgeState::Connected {
                relay_id,
                generation,
                ..
            } => Some((relay_id.clone(), *generation)),
            _ => None,
        }
    }

    fn is_connected(&self) -> bool {
        matches!(&*self.state.borrow(), EdgeState::Connected { .. })
    }

    /// Whether the loop ended by itself (a bootstrap loop that gave way):
    /// its last word is `Stopped`.
    fn finished(&self) -> bool {
        self.task.is_finished() || matches!(&*self.state.borrow(), EdgeState::Stopped)
    }

    /// The session as capture sees it, if it is up and its connection
    /// published.
    fn live(&mut self) -> Option<Arc<Live>> {
        let state = self.state.borrow();
        let conn = self.conn.borrow();
        let (
            EdgeState::Connected {
                session_id,
                tunnel_routes,
                routes_complete,
                served_routes,
                draining,
                ..
            },
            Some((c, flows)),
        ) = (&*state, &*conn)
        else {
            self.live = None;
            return None;
        };
        let same = self.live.as_ref().filter(|l| {
            l.is(
                *session_id,
                flows,
                (tunnel_routes, *routes_complete),
                served_routes,
                *draining,
            )
        });
        if let Some(l) = same {
            return Some(l.clone());
        }
        let l = Arc::new(Live::new(
            *session_id,
            (c.clone(), flows.clone()),
            (tunnel_routes, *routes_complete),
            served_routes,
            (*draining, self.keepalive),
        ));
        drop((state, conn));
        self.live = Some(l.clone());
        Some(l)
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
        let give_way = Arc::new(AtomicBool::new(false));
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
                give_way.clone(),
            )
            .instrument(span),
        );
        // Wakes the supervisor on any change of this session (and when
        // its loop ends: both senders are dropped then).
        let (mut s, mut c, wake) = (state.clone(), conn.clone(), self.wake.clone());
        let notifier = tokio::spawn(async move {
            loop {
                let open = tokio::select! {
                    r = s.changed() => r.is_ok(),
                    r = c.changed() => r.is_ok(),
                };
                wake.notify_one();
                if !open {
                    break;
                }
            }
        });
        Runner {
            addr: addr.to_string(),
            cancel,
            give_way,
            state,
            conn,
            task,
            notifier,
            live: None,
            keepalive: self.cfg.quic.keepalive,
        }
    }
}

/// Runs the edge's sessions until `cancel`; publishes the first connected
/// session's state, and every connected session for capture.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn supervise(
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    services: Arc<EdgeServices>,
    creds: Arc<Credentials>,
    state: watch::Sender<EdgeState>,
    sessions_tx: watch::Sender<Arc<Sessions>>,
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
        // A loop that ended by itself (a bootstrap loop that gave way) is
        // dropped; the rules below start what the edge still needs.
        let ended: Vec<Key> = runners
            .iter()
            .filter(|(_, r)| r.finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            if let Some(r) = runners.remove(&k) {
                info!(session = ?k, relay = %r.addr, "the session to this relay gave way");
                r.stop().await;
            }
        }
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
                    // It is the replica's own loop now: it redials as any.
                    b.give_way.store(false, SeqCst);
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
        // The bootstrap session's replica and generation there, when the
        // edge follows that replica: the handover to it is make-before-break.
        let handover = runners
            .get(&Key::Bootstrap)
            .and_then(Runner::connected)
            .filter(|(id, _)| wanted.iter().any(|r| r.id == *id));
        // The bootstrap session: alone without a set; on a followed
        // replica, until the direct session to it is up there (and newer:
        // the relay registered it over the bootstrap session); otherwise
        // gives way once any direct session is up; comes back when nothing
        // has been up for a handshake timeout.
        let want_boot = if wanted.is_empty() {
            true
        } else if wanted.iter().any(|r| r.addr == cfg.relay) {
            // (A replica's own loop already dials the configured address.)
            false
        } else if let Some((id, boot_gen)) = &handover {
            let direct = runners
                .get(&Key::Replica(id.clone()))
                .and_then(Runner::connected);
            !direct.is_some_and(|(on, g)| on == *id && g > *boot_gen)
        } else if runners.contains_key(&Key::Bootstrap) {
            !direct_up
        } else {
            down_since.is_some_and(|t| t.elapsed() >= fallback_after)
        };
        // A bootstrap session on a replica the edge no longer follows (it
        // left the set, or max_relays cut it): no direct session to that
        // replica will start, so nothing it could supersede; should it
        // drop, its loop redials as before the handover began.
        if let Some(b) = runners.get(&Key::Bootstrap) {
            if b.connected()
                .is_some_and(|(id, _)| !wanted.iter().any(|r| r.id == id))
            {
                b.give_way.store(false, SeqCst);
            }
        }
        if let (Some((id, _)), Some(b)) = (&handover, runners.get(&Key::Bootstrap)) {
            // Before the direct session to its replica is started below:
            // once that one registers, the bootstrap loop must not dial
            // again (it could land on the same replica and supersede it).
            if !b.give_way.swap(true, SeqCst) {
                info!(replica = %id, "handing the bootstrap session over to a direct session to its replica");
            }
        }
        let mut want: BTreeMap<Key, String> = BTreeMap::new();
        if want_boot {
            want.insert(Key::Bootstrap, cfg.relay.clone());
        }
        for r in &wanted {
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
        publish(&mut runners, &state, &sessions_tx);
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
    sessions_tx.send_replace(Arc::new(Sessions::default()));
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

/// Publishes the first connected session's state (or, with none up, the
/// first session's), and every connected session for capture when any of
/// them changed.
fn publish(
    runners: &mut BTreeMap<Key, Runner>,
    state: &watch::Sender<EdgeState>,
    sessions_tx: &watch::Sender<Arc<Sessions>>,
) {
    let primary = runners
        .values()
        .find(|r| r.is_connected())
        .or_else(|| runners.values().next());
    if let Some(r) = primary {
        let s = r.state.borrow().clone();
        set_state(state, s);
    }
    // In key order, so the first is the primary whenever its connection
    // is published.
    let live: Vec<Arc<Live>> = runners.values_mut().filter_map(Runner::live).collect();
    if !sessions_tx.borrow().is(&live) {
        sessions_tx.send_replace(Arc::new(Sessions::new(live)));
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
