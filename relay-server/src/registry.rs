//! Live sessions and the route table.
//!
//! One lock guards both maps so that registering a session (conflict check,
//! replacing an older session of the same node, inserting routes) is atomic.
//! The lock is a `std::sync::RwLock` held only for map operations, never
//! across an `.await` (clippy's `await_holding_lock` is denied).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use relay_protocol::{Cidr, RejectReason};

/// What the registry needs to know about a session.
pub trait RouteOwner: Send + Sync {
    /// Node name (one live session per node).
    fn node(&self) -> &str;
    /// Generation: higher is newer.
    fn generation(&self) -> u64;
    /// Session id, for the admin API.
    fn session_id(&self) -> u64;
}

/// Longest-prefix-match table: prefix → owning session.
struct RouteTable<S> {
    /// Keyed by prefix length so a lookup probes at most one map per
    /// length present (a handful), whatever the number of sessions; each
    /// map is ordered, so the prefixes inside a wider one are a range.
    by_len: BTreeMap<u8, BTreeMap<Cidr, Arc<S>>>,
}

impl<S> Default for RouteTable<S> {
    fn default() -> Self {
        RouteTable {
            by_len: BTreeMap::new(),
        }
    }
}

impl<S: RouteOwner> RouteTable<S> {
    fn lookup(&self, ip: IpAddr) -> Option<&Arc<S>> {
        self.by_len
            .iter()
            .rev()
            .find_map(|(len, map)| Cidr::containing(ip, *len).and_then(|c| map.get(&c)))
    }

    /// A prefix of a node other than `node` that overlaps `want`: one probe
    /// per shorter length (the prefix containing `want`), one range per
    /// longer length (the prefixes inside `want`). Logarithmic in the
    /// table, where a scan of every route made a storm of 10,000
    /// handshakes quadratic.
    fn conflict(&self, want: &Cidr, node: &str) -> Option<(Cidr, &Arc<S>)> {
        let other = |s: &&Arc<S>| s.node() != node;
        for (len, map) in &self.by_len {
            if *len <= want.prefix_len() {
                let hit = Cidr::containing(want.addr(), *len)
                    .and_then(|c| map.get_key_value(&c))
                    .filter(|(_, s)| other(s));
                if let Some((c, s)) = hit {
                    return Some((*c, s));
                }
            } else if let Ok(start) = Cidr::new(want.addr(), *len) {
                let hit = map
                    .range(start..)
                    .take_while(|(c, _)| want.contains_cidr(c))
                    .find(|(_, s)| other(s));
                if let Some((c, s)) = hit {
                    return Some((*c, s));
                }
            }
        }
        None
    }

    fn insert(&mut self, c: Cidr, s: Arc<S>) {
        self.by_len.entry(c.prefix_len()).or_default().insert(c, s);
    }

    fn remove(&mut self, c: &Cidr) {
        if let Some(m) = self.by_len.get_mut(&c.prefix_len()) {
            m.remove(c);
            if m.is_empty() {
                self.by_len.remove(&c.prefix_len());
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&Cidr, &Arc<S>)> {
        self.by_len.values().flat_map(|m| m.iter())
    }
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
    journal: Journal,
}

/// Most route changes remembered for sessions catching up; a session
/// further behind gets a full resync instead (see [`Registry::route_changes`]).
pub const JOURNAL_CAP: usize = 65_536;

/// One route coming or going, as recorded in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEvent {
    /// The prefix.
    pub cidr: Cidr,
    /// The node that served it (or serves it now).
    pub node: Arc<str>,
    /// Added (true) or removed (false).
    pub added: bool,
}

/// The ordered log of route changes, bounded: entry `i` has version
/// `base + i`, and the next change gets `base + len`.
#[derive(Default)]
struct Journal {
    base: u64,
    entries: VecDeque<RouteEvent>,
}

impl Journal {
    fn next(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    fn push(&mut self, node: &Arc<str>, routes: &[Cidr], added: bool) {
        for c in routes {
            if self.entries.len() == JOURNAL_CAP {
                self.entries.pop_front();
                self.base += 1;
            }
            self.entries.push_back(RouteEvent {
                cidr: *c,
                node: node.clone(),
                added,
            });
        }
    }

    /// Entries from version `since` on, or `None` if some were dropped.
    fn since(&self, since: u64) -> Option<impl Iterator<Item = &RouteEvent>> {
        let skip = since.checked_sub(self.base)?;
        (skip <= self.entries.len() as u64).then(|| self.entries.iter().skip(skip as usize))
    }
}

/// What changed for one viewer since its cursor (see [`Registry::route_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChanges {
    /// The viewer is new or fell behind the journal: every prefix it may
    /// see now, to replace whatever it had.
    Resync(Vec<Cidr>),
    /// The visible changes since the cursor, in order.
    Events(Vec<(Cidr, bool)>),
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
    /// The session that serves it.
    pub session_id: u64,
}

impl<S: RouteOwner> Registry<S> {
    /// A receiver that is marked changed whenever sessions or routes change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

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
        drop(g);
        self.changed();
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
        Self::unroute(&mut g, &name, &live.routes);
        Self::route(&mut g, &name, &live.session, &routes);
        g.sessions.insert(
            node.to_string(),
            Live {
                session: live.session,
                routes,
            },
        );
        drop(g);
        self.changed();
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
        Self::unroute(&mut g, &Arc::from(node), &live.routes);
        drop(g);
        self.changed();
        true
    }

    /// The prefixes routed to `node`'s live session.
    pub fn routes_of(&self, node: &str) -> Vec<Cidr> {
        self.read()
            .sessions
            .get(node)
            .map(|l| l.routes.clone())
            .unwrap_or_default()
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
        let mut v: Vec<_> = self
            .read()
            .sessions
            .values()
            .map(|l| l.session.clone())
            .collect();
        v.sort_by(|a, b| a.node().cmp(b.node()));
        v
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
        let all = g
            .sessions
            .values()
            .filter(|l| visible(l.session.node()))
            .flat_map(|l| l.routes.iter().copied())
            .collect();
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
            })
            .collect();
        v.sort_by_key(|r| r.cidr);
        v
    }
}

/// A stand-in session for registry and route-feed tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A session with a node, a generation and the routes it registers.
    #[derive(Debug)]
    pub(crate) struct Fake {
        pub(crate) node: String,
        pub(crate) generation: u64,
        pub(crate) routes: Vec<Cidr>,
    }

    impl RouteOwner for Fake {
        fn node(&self) -> &str {
            &self.node
        }
        fn generation(&self) -> u64 {
            self.generation
        }
        fn session_id(&self) -> u64 {
            self.generation * 100
        }
    }

    /// Registers a fake with its own routes.
    pub(crate) fn reg(
        r: &Registry<Fake>,
        f: Arc<Fake>,
        max: usize,
    ) -> Result<Option<Arc<Fake>>, RegisterError> {
        let routes = f.routes.clone();
        r.register(f, routes, max)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{reg, Fake};
    use super::*;

    fn fake(node: &str, generation: u64, routes: &[&str]) -> Arc<Fake> {
        Arc::new(Fake {
            node: node.into(),
            generation,
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let r = Registry::default();
        reg(&r, fake("wide", 1, &["10.0.0.0/8"]), 10).unwrap();
        assert_eq!(r.lookup(ip("10.1.2.3")).unwrap().node, "wide");
        assert!(r.lookup(ip("11.0.0.1")).is_none());
        assert!(r.lookup(ip("::1")).is_none());
    }

    #[test]
    fn lpm_within_one_node_and_v6() {
        let r = Registry::default();
        reg(
            &r,
            fake(
                "a",
                1,
                &[
                    "10.244.0.0/16",
                    "10.244.7.0/24",
                    "fd00::/64",
                    "192.168.1.10/32",
                ],
            ),
            10,
        )
        .unwrap();
        assert_eq!(r.lookup(ip("10.244.7.5")).unwrap().node, "a");
        assert_eq!(r.lookup(ip("fd00::5")).unwrap().node, "a");
        assert_eq!(r.lookup(ip("192.168.1.10")).unwrap().node, "a");
        assert!(r.lookup(ip("192.168.1.11")).is_none());
        assert_eq!(r.routes().len(), 4);
    }

    #[test]
    fn overlapping_routes_of_another_node_are_refused() {
        let r = Registry::default();
        reg(&r, fake("a", 1, &["10.244.1.0/24"]), 10).unwrap();
        let e = reg(&r, fake("b", 2, &["10.244.0.0/16"]), 10).unwrap_err();
        assert_eq!(e.reason, RejectReason::RouteConflict);
        assert!(e.message.contains("node a"), "{}", e.message);
        reg(&r, fake("b", 3, &["10.244.2.0/24"]), 10).unwrap();
        assert_eq!(r.lookup(ip("10.244.2.1")).unwrap().node, "b");
        let (_, seen) = r.route_changes(None, |n| n != "b");
        assert_eq!(
            seen,
            RouteChanges::Resync(vec!["10.244.1.0/24".parse().unwrap()])
        );
        assert_eq!(r.lookup(ip("10.244.1.1")).unwrap().node, "a");
    }

    #[test]
    fn newer_generation_replaces_and_stale_never_wins() {
        let r = Registry::default();
        reg(&r, fake("a", 5, &["10.1.0.0/16"]), 10).unwrap();
        let old = reg(&r, fake("a", 7, &["10.2.0.0/16"]), 10)
            .unwrap()
            .unwrap();
        assert_eq!(old.generation, 5);
        // The old session's routes went with it.
        assert!(r.lookup(ip("10.1.0.1")).is_none());
        assert_eq!(r.lookup(ip("10.2.0.1")).unwrap().generation, 7);
        // A late, older handshake cannot shadow the fresh session...
        assert!(reg(&r, fake("a", 6, &["10.1.0.0/16"]), 10).is_err());
        // ...and the old session's teardown does not remove the new one.
        assert!(!r.remove("a", 5));
        assert_eq!(r.get("a").unwrap().generation, 7);
        let mut changes = r.subscribe();
        changes.mark_unchanged();
        assert!(r.remove("a", 7));
        assert!(r.is_empty() && r.routes().is_empty());
        assert!(
            changes.has_changed().unwrap(),
            "removal must notify subscribers"
        );
    }

    #[test]
    fn session_limit_counts_new_nodes_only() {
        let r = Registry::default();
        reg(&r, fake("a", 1, &[]), 1).unwrap();
        assert_eq!(
            reg(&r, fake("b", 2, &[]), 1).unwrap_err().reason,
            RejectReason::Overloaded
        );
        // A reconnect of a known node is not a new session.
        reg(&r, fake("a", 3, &[]), 1).unwrap();
    }

    #[test]
    fn the_journal_replays_changes_and_resyncs_a_viewer_that_fell_behind() {
        let r = Registry::default();
        let (v0, first) = r.route_changes(None, |_| true);
        assert_eq!(first, RouteChanges::Resync(vec![]));
        reg(&r, fake("a", 1, &["10.1.0.0/16"]), 10).unwrap();
        reg(&r, fake("b", 2, &["10.2.0.0/16"]), 10).unwrap();
        reg(&r, fake("a", 3, &["10.3.0.0/16"]), 10).unwrap();
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let (v1, ev) = r.route_changes(Some(v0), |n| n != "b");
        assert_eq!(
            ev,
            RouteChanges::Events(vec![
                (c("10.1.0.0/16"), true),
                (c("10.1.0.0/16"), false),
                (c("10.3.0.0/16"), true),
            ])
        );
        let (v2, ev) = r.route_changes(Some(v1), |_| true);
        assert_eq!((v2, ev), (v1, RouteChanges::Events(vec![])));
        // Push the viewer's cursor out of the journal.
        for g in 0..(JOURNAL_CAP as u64 / 2 + 1) {
            reg(&r, fake("c", 10 + g, &["10.9.0.0/16"]), 10).unwrap();
        }
        let (_, ev) = r.route_changes(Some(v1), |_| true);
        let RouteChanges::Resync(mut all) = ev else {
            panic!("expected a resync")
        };
        all.sort();
        assert_eq!(all, [c("10.2.0.0/16"), c("10.3.0.0/16"), c("10.9.0.0/16")]);
    }

    #[test]
    fn conflicts_are_found_in_both_directions_and_across_families() {
        let r = Registry::default();
        reg(
            &r,
            fake("a", 1, &["10.244.1.0/24", "10.9.0.0/16", "fd00::/64"]),
            10,
        )
        .unwrap();
        for (want, clash) in [
            ("10.244.0.0/16", true),   // wider, contains a's /24
            ("10.244.1.128/25", true), // narrower, inside a's /24
            ("10.9.3.4/32", true),
            ("10.244.2.0/24", false),
            ("fd00::1/128", true),
            ("fd01::/64", false),
            ("0.0.0.0/0", true),
            ("::/0", true),
        ] {
            let got = reg(&r, fake("b", 2, &[want]), 10);
            assert_eq!(got.is_err(), clash, "{want}");
            if !clash {
                r.remove("b", 2);
            }
        }
        // A node's own routes never conflict with its new session's.
        reg(&r, fake("a", 3, &["10.244.0.0/16"]), 10).unwrap();
    }

    #[test]
    fn routes_change_without_a_new_session() {
        let r = Registry::default();
        reg(&r, fake("a", 1, &["10.1.0.0/16"]), 10).unwrap();
        reg(&r, fake("b", 2, &["10.2.0.0/16"]), 10).unwrap();
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let (v, _) = r.route_changes(None, |_| true);
        assert!(r.set_routes("a", 1, vec![c("10.3.0.0/16")]).unwrap());
        assert!(r.lookup(ip("10.1.0.1")).is_none());
        assert_eq!(r.lookup(ip("10.3.0.1")).unwrap().node, "a");
        assert_eq!(r.routes_of("a"), [c("10.3.0.0/16")]);
        // Another node's prefix is still refused; a stale generation or an
        // unchanged list changes nothing.
        assert!(r.set_routes("a", 1, vec![c("10.2.1.0/24")]).is_err());
        assert!(!r.set_routes("a", 9, vec![c("10.4.0.0/16")]).unwrap());
        assert!(!r.set_routes("a", 1, vec![c("10.3.0.0/16")]).unwrap());
        let (_, ev) = r.route_changes(Some(v), |_| true);
        assert_eq!(
            ev,
            RouteChanges::Events(vec![(c("10.1.0.0/16"), false), (c("10.3.0.0/16"), true)])
        );
    }
}
