//! Live sessions and the route table.
//!
//! One lock guards both maps so that registering a session (conflict check,
//! replacing an older session of the same node, inserting routes) is atomic.
//! The lock is a `std::sync::RwLock` held only for map operations, never
//! across an `.await` (clippy's `await_holding_lock` is denied).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use relay_protocol::{Cidr, RejectReason};

mod journal;
mod offline;
mod table;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
use journal::Journal;
pub use journal::{RouteChanges, RouteEvent, JOURNAL_CAP};
use offline::OfflineRoutes;
pub use offline::OFFLINE_CAP;
use table::RouteTable;

/// What the registry needs to know about a session.
pub trait RouteOwner: Send + Sync {
    /// Node name (one live session per node).
    fn node(&self) -> &str;
    /// Generation: higher is newer.
    fn generation(&self) -> u64;
    /// Session id, for the admin API.
    fn session_id(&self) -> u64;
}

/// A live session and the prefixes routed to it (the registry owns the
/// list, so it can change while the session lives: a Node's pod CIDRs or
/// addresses changed).
struct Live<S> {
    session: Arc<S>,
    routes: Vec<Cidr>,
}

struct Inner<S> {
    sessions: HashMap<String, Live<S>>,
    routes: RouteTable<S>,
    /// Routes of nodes whose session ended, still claimed for them (see
    /// `registry/offline.rs`): captured and sent to other edges, served
    /// by no session.
    offline: OfflineRoutes,
    /// Whether a node's routes are held when its session ends (see
    /// [`Registry::hold_offline`]).
    hold: bool,
    journal: Journal,
}

/// A refusal to register, with its reason for the hello reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterError {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// Explanation for the edge's log.
    pub message: String,
}

/// The relay's session registry and route table.
pub struct Registry<S> {
    inner: RwLock<Inner<S>>,
    /// Bumped on every change of sessions or routes; subscribers (route
    /// capture, per-session route updates) coalesce bursts of changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            inner: RwLock::new(Inner {
                sessions: HashMap::new(),
                routes: RouteTable::default(),
                offline: OfflineRoutes::default(),
                hold: true,
                journal: Journal::default(),
            }),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

/// One row of the route table, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteRow {
    /// The prefix.
    pub cidr: Cidr,
    /// The node that serves it.
    pub node: String,
    /// The session that serves it (0 for an offline node's route).
    pub session_id: u64,
    /// The node is offline: no session serves the route, which stays
    /// captured and routed here so that connections to it are refused at
    /// once (only `GET /v1/routes?offline=1` lists such rows).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
}

impl<S: RouteOwner> Registry<S> {
    /// A receiver that is marked changed whenever sessions or routes change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Called with the write lock still held: a reader that takes the
    /// counter and then the tables (the admin API's ETag on
    /// `/v1/routes`) must never pair a change's rows with the counter from
    /// before it, or a client holding that older ETag would be told 304
    /// (unchanged) while the table had changed.
    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes every subscriber as if routes had changed: what each edge may
    /// see changed (communities), so route feeds look again.
    pub fn poke(&self) {
        self.changed();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner<S>> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than stopping would; keep serving.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner<S>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `new` with the prefixes routed to it, replacing an older
    /// session of the same node. Returns the replaced session (the caller
    /// closes it). Refuses a session older than the live one, one whose
    /// routes overlap another node's, and any session past `max_sessions`.
    pub fn register(
        &self,
        new: Arc<S>,
        routes: Vec<Cidr>,
        max_sessions: usize,
    ) -> Result<Option<Arc<S>>, RegisterError> {
        let mut g = self.write();
        let old = g.sessions.get(new.node()).map(|l| l.session.clone());
        if let Some(old) = &old {
            if old.generation() > new.generation() {
                return Err(RegisterError {
                    reason: RejectReason::RouteConflict,
                    message: format!(
                        "a newer session (generation {}) of node {} is already live",
                        old.generation(),
                        new.node()
                    ),
                });
            }
        } else if g.sessions.len() >= max_sessions {
            return Err(RegisterError {
                reason: RejectReason::Overloaded,
                message: format!("relay is at its limit of {max_sessions} sessions"),
            });
        }
        Self::check_conflicts(&g, new.node(), &routes)?;
        let node: Arc<str> = Arc::from(new.node());
        Self::claim_offline(&mut g, &node, &routes);
        if let Some(prev) = g.sessions.remove(new.node()) {
            Self::unroute(&mut g, &node, &prev.routes);
        }
        Self::route(&mut g, &node, &new, &routes);
        g.sessions.insert(
            new.node().to_string(),
            Live {
                session: new,
                routes,
            },
        );
        self.changed();
        drop(g);
        Ok(old)
    }

    /// Replaces the prefixes routed to `node`'s session if it is still
    /// generation `generation` (a Node's pod CIDRs or addresses changed).
    /// Returns `Ok(false)` when that session is gone or nothing changed.
    pub fn set_routes(
        &self,
        node: &str,
        generation: u64,
        routes: Vec<Cidr>,
    ) -> Result<bool, RegisterError> {
        let mut g = self.write();
        let Some(live) = g.sessions.get(node) else {
            return Ok(false);
        };
        if live.session.generation() != generation || live.routes == routes {
            return Ok(false);
        }
        Self::check_conflicts(&g, node, &routes)?;
        let Some(live) = g.sessions.remove(node) else {
            return Ok(false);
        };
        let name: Arc<str> = Arc::from(node);
        Self::claim_offline(&mut g, &name, &routes);
        Self::unroute(&mut g, &name, &live.routes);
        Self::route(&mut g, &name, &live.session, &routes);
        g.sessions.insert(
            node.to_string(),
            Live {
                session: live.session,
                routes,
            },
        );
        self.changed();
        drop(g);
        Ok(true)
    }

    fn check_conflicts(g: &Inner<S>, node: &str, routes: &[Cidr]) -> Result<(), RegisterError> {
        for want in routes {
            if let Some((have, owner)) = g.routes.conflict(want, node) {
                return Err(RegisterError {
                    reason: RejectReason::RouteConflict,
                    message: format!(
                        "route {want} overlaps {have} served by node {}",
                        owner.node()
                    ),
                });
            }
        }
        Ok(())
    }

    /// `node` claims `routes`: what other nodes held offline overlapping
    /// them is released (the prefix moved), and so is what `node` itself
    /// held (its new routes replace them); withdrawn in the journal.
    fn claim_offline(g: &mut Inner<S>, node: &Arc<str>, routes: &[Cidr]) {
        let mut released = g.offline.release_overlapping(node, routes);
        if let Some(own) = g.offline.release(node) {
            released.push((node.clone(), own));
        }
        for (n, r) in released {
            g.journal.push(&n, &r, false);
        }
    }

    fn unroute(g: &mut Inner<S>, node: &Arc<str>, routes: &[Cidr]) {
        for c in routes {
            g.routes.remove(c);
        }
        g.journal.push(node, routes, false);
    }

    fn route(g: &mut Inner<S>, node: &Arc<str>, session: &Arc<S>, routes: &[Cidr]) {
        for c in routes {
            g.routes.insert(*c, session.clone());
        }
        g.journal.push(node, routes, true);
    }

    /// Whether a node's routes are held when its session ends (the
    /// relay's `hold_offline_routes`; on in a registry made by `default`,
    /// as the unit tests of holding use it): held, they stay captured,
    /// routed to the relay and in other edges' routes while the node is
    /// offline; otherwise they are withdrawn with the session.
    pub fn hold_offline(&self, on: bool) {
        self.write().hold = on;
    }

    /// Removes the session of `node` if it is still generation
    /// `generation`; a newer session of the same node is left alone.
    pub fn remove(&self, node: &str, generation: u64) -> bool {
        let mut g = self.write();
        match g.sessions.get(node) {
            Some(l) if l.session.generation() == generation => {}
            _ => return false,
        }
        let Some(live) = g.sessions.remove(node) else {
            return false;
        };
        let name: Arc<str> = Arc::from(node);
        if !g.hold {
            Self::unroute(&mut g, &name, &live.routes);
            self.changed();
            drop(g);
            return true;
        }
        // Out of the live table, but not withdrawn: held while the node
        // is offline (see `registry/offline.rs`).
        for c in &live.routes {
            g.routes.remove(c);
        }
        for (n, r) in g.offline.hold(&name, live.routes, OFFLINE_CAP) {
            g.journal.push(&n, &r, false);
        }
        self.changed();
        drop(g);
        true
    }

    /// Keeps the offline nodes' routes `keep` accepts (node, prefix) and
    /// withdraws the others: the directory no longer gives the node that
    /// prefix (a Node deleted, a pod CIDR moved). Returns how many were
    /// withdrawn.
    ///
    /// `keep` is asked with no lock held (a copy of the held routes is
    /// taken under the read lock; it is called for each node's routes in
    /// a row), and the write lock is taken only when something must go,
    /// to remove exactly those prefixes still held for the same node: with
    /// ten thousand held routes, lookups are not blocked while they are
    /// checked.
    pub fn retain_offline(&self, mut keep: impl FnMut(&str, &Cidr) -> bool) -> usize {
        let held: Vec<(Arc<str>, Vec<Cidr>)> = self
            .read()
            .offline
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        let gone: Vec<(Arc<str>, Vec<Cidr>)> = held
            .into_iter()
            .filter_map(|(node, routes)| {
                let gone: Vec<Cidr> = routes.into_iter().filter(|c| !keep(&node, c)).collect();
                (!gone.is_empty()).then_some((node, gone))
            })
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut g = self.write();
        let released = g.offline.release_held(gone);
        let n = released.iter().map(|(_, r)| r.len()).sum();
        for (node, r) in released {
            g.journal.push(&node, &r, false);
        }
        if n > 0 {
            self.changed();
        }
        drop(g);
        n
    }

    /// The routes held for offline nodes, sorted by prefix.
    pub fn offline_routes(&self) -> Vec<RouteRow> {
        let mut v: Vec<_> = self
            .read()
            .offline
            .iter()
            .flat_map(|(n, routes)| {
                routes.iter().map(|c| RouteRow {
                    cidr: *c,
                    node: n.to_string(),
                    session_id: 0,
                    offline: true,
                })
            })
            .collect();
        v.sort_by_key(|r| r.cidr);
        v
    }

    /// The prefixes of `set` held for offline nodes.
    pub fn held_among(&self, set: &BTreeSet<Cidr>) -> BTreeSet<Cidr> {
        let g = self.read();
        g.offline
            .iter()
            .flat_map(|(_, routes)| routes.iter().filter(|c| set.contains(c)).copied())
            .collect()
    }

    /// Offline nodes whose routes are held.
    pub fn offline_nodes(&self) -> usize {
        self.read().offline.len()
    }

    /// The prefixes routed to `node`'s live session.
    pub fn routes_of(&self, node: &str) -> Vec<Cidr> {
        self.read()
            .sessions
            .get(node)
            .map(|l| l.routes.clone())
            .unwrap_or_default()
    }

    /// A route some session serves, or an offline node's held route, that
    /// overlaps `c`, and its node (the
    /// cloud Nodes' pod ranges never join the cloud ranges over an edge's
    /// route: see [`crate::policy::cloud_nodes`]).
    pub fn overlapping(&self, c: &Cidr) -> Option<(Cidr, String)> {
        let g = self.read();
        g.routes
            .overlap(c, |_| true)
            .map(|(have, s)| (have, s.node().to_string()))
            .or_else(|| g.offline.overlap(c))
    }

    /// The node whose session serves exactly the prefix `c`, or holds it
    /// while offline.
    pub fn serves_exactly(&self, c: &Cidr) -> Option<String> {
        let g = self.read();
        (g.routes.get(c).map(|s| s.node().to_string())).or_else(|| g.offline.get(c))
    }

    /// The session whose routes contain `ip`, by longest prefix.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<S>> {
        self.read().routes.lookup(ip).cloned()
    }

    /// The live session of `node`.
    pub fn get(&self, node: &str) -> Option<Arc<S>> {
        self.read().sessions.get(node).map(|l| l.session.clone())
    }

    /// All live sessions, sorted by node name.
    pub fn sessions(&self) -> Vec<Arc<S>> {
        let mut v = self.sessions_unsorted();
        v.sort_by(|a, b| a.node().cmp(b.node()));
        v
    }

    /// All live sessions in no particular order (for sweeps that visit
    /// each once: no sort, and the lock is held only for the copy).
    pub fn sessions_unsorted(&self) -> Vec<Arc<S>> {
        self.read()
            .sessions
            .values()
            .map(|l| l.session.clone())
            .collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What changed in the route table for a viewer that may see the
    /// routes of the nodes `visible` accepts, since version `since` (the
    /// version this returned last time; `None` for a new viewer). Returns
    /// the version to pass next time and either the changes, in order, or
    /// a full resync when the viewer is new or fell more than
    /// [`JOURNAL_CAP`] changes behind. The cost is the number of changes,
    /// not the number of sessions, except for a resync.
    pub fn route_changes(
        &self,
        since: Option<u64>,
        visible: impl Fn(&str) -> bool,
    ) -> (u64, RouteChanges) {
        let g = self.read();
        let next = g.journal.next();
        if let Some(events) = since.and_then(|v| g.journal.since(v)) {
            let changes = events
                .filter(|e| visible(&e.node))
                .map(|e| (e.cidr, e.added))
                .collect();
            return (next, RouteChanges::Events(changes));
        }
        // Per session, not per route: the policy is asked once per node.
        let live = g
            .sessions
            .values()
            .filter(|l| visible(l.session.node()))
            .flat_map(|l| l.routes.iter().copied());
        let offline = g
            .offline
            .iter()
            .filter(|(n, _)| visible(n))
            .flat_map(|(_, r)| r.iter().copied());
        let all = live.chain(offline).collect();
        (next, RouteChanges::Resync(all))
    }

    /// The route table, sorted by prefix.
    pub fn routes(&self) -> Vec<RouteRow> {
        let mut v: Vec<_> = self
            .read()
            .routes
            .iter()
            .map(|(c, s)| RouteRow {
                cidr: *c,
                node: s.node().to_string(),
                session_id: s.session_id(),
                offline: false,
            })
            .collect();
        v.sort_by_key(|r| r.cidr);
        v
    }
}
