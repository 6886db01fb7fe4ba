//! What each edge is told to send back through the tunnel, kept up to date
//! at a cost proportional to the changes, not to the number of edges.
//!
//! An edge's tunnel routes are the cloud ranges (`tunnel_routes`, and in
//! Kubernetes mode the cloud Nodes' own pod ranges, which change while
//! the relay runs: see [`crate::policy::cloud_nodes`]) plus the routes of
//! the other edges its policy lets it reach (a shared community; see
//! [`crate::policy`]). Edges learn them in one of two ways:
//! - an edge that announced [`capability::ROUTE_DELTAS`] gets
//!   [`Control::RouteDelta`] frames: a full set once (flagged `reset`), then
//!   only what changed, each frame at most
//!   [`Control::MAX_ROUTES_PER_DELTA`] prefixes, so ten thousand edges'
//!   routes fit as easily as ten;
//! - an older edge gets the whole list in its hello and in each
//!   `RouteUpdate`, as before, cut to what fits in one frame (the cut is
//!   logged and counted; see [`LEGACY_MAX_ROUTES`]).
//!
//! The relay keeps no per-session copy of what a delta edge has: the
//! registry's journal says what changed since the session's cursor, and a
//! session that fell behind the journal gets a resync. Of the cloud ranges
//! each feed holds only a reference to the set it last sent (shared by
//! every feed, replaced whole by the policy when it changes), so a change
//! of the cloud set costs each edge the difference, as a delta.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use relay_protocol::{capability, Cidr, Control};

use crate::policy::CloudRanges;
use crate::registry::{Registry, RouteChanges, RouteOwner};

/// Most prefixes in the whole list sent to an edge without
/// [`capability::ROUTE_DELTAS`]: 3,000 IPv6 prefixes encode to about
/// 54 KiB, inside the 64 KiB frame with room for the rest of the hello.
pub const LEGACY_MAX_ROUTES: usize = 3000;

/// One session's view of the route table.
#[derive(Debug)]
pub struct RouteFeed {
    node: String,
    cursor: Option<u64>,
    /// For an edge without deltas, the full set it should have (what it
    /// was sent is a prefix of it when the set was cut).
    legacy: Option<BTreeSet<Cidr>>,
    /// Whether the last whole list sent to a legacy edge was cut.
    cut: bool,
    /// The policy epoch the feed's view was built under (see
    /// [`RouteFeed::at_epoch`]).
    epoch: Option<u64>,
    /// The cloud ranges the edge was last sent (see [`CloudRanges`]).
    cloud: Option<CloudRanges>,
}

/// What to send after a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedUpdate {
    /// Nothing changed for this edge.
    None,
    /// Frames for the edge, in order.
    Send(Vec<Control>),
}

impl RouteFeed {
    /// A feed for `node`'s session; `capabilities` are the edge's.
    pub fn new(node: &str, capabilities: u32) -> Self {
        RouteFeed {
            node: node.to_string(),
            cursor: None,
            legacy: (capabilities & capability::ROUTE_DELTAS == 0).then(BTreeSet::new),
            cut: false,
            epoch: None,
            cloud: None,
        }
    }

    /// Notes the policy's visibility epoch; when it moved on (communities
    /// from Node labels changed), the next poll is a full resync, since
    /// what this edge may see changed without any route changing.
    pub fn at_epoch(&mut self, epoch: u64) {
        if self.epoch.is_some_and(|e| e != epoch) {
            self.cursor = None;
        }
        self.epoch = Some(epoch);
    }

    /// Whether the edge gets whole lists (it predates route deltas).
    pub fn is_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    /// Whether the last whole list for a legacy edge had to be cut to fit
    /// a frame (the caller logs and counts it).
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// Brings the feed up to date with `reg`: `cloud` is the cloud ranges
    /// now ([`crate::policy::Policy::cloud_ranges`]), `visible(node)`
    /// whether this edge may reach `node`. Returns the frames to send
    /// (none when nothing changed for it).
    pub fn poll<S: RouteOwner>(
        &mut self,
        reg: &Registry<S>,
        cloud: CloudRanges,
        visible: impl Fn(&str) -> bool,
    ) -> FeedUpdate {
        let me = self.node.as_str();
        let sees = |n: &str| n != me && visible(n);
        let (next, changes) = reg.route_changes(self.cursor, sees);
        let first = self.cursor.is_none();
        self.cursor = Some(next);
        let before = self.cloud.replace(cloud.clone());
        let (reset, add, remove) = match changes {
            RouteChanges::Resync(all) => {
                let mut add: BTreeSet<Cidr> = (*cloud).clone();
                add.extend(all);
                (true, add, BTreeSet::new())
            }
            RouteChanges::Events(events) => {
                // The last event of a prefix decides.
                let mut net: BTreeMap<Cidr, bool> = BTreeMap::new();
                for (c, added) in events {
                    net.insert(c, added);
                }
                let mut add = BTreeSet::new();
                let mut remove = BTreeSet::new();
                // The cloud set changed (a cloud Node came or went): its
                // difference. A prefix that left it stays with the edge
                // when an edge it sees serves that very prefix (the edge's
                // claim is why it left), unless the journal says more.
                let old = before.unwrap_or_default();
                if !Arc::ptr_eq(&old, &cloud) {
                    add.extend(cloud.difference(&old).copied());
                    for c in old.difference(&cloud) {
                        let kept = || reg.serves_exactly(c).is_some_and(|n| sees(&n));
                        if !net.contains_key(c) && !kept() {
                            remove.insert(*c);
                        }
                    }
                }
                for (c, added) in net {
                    // A cloud range stays whatever edge comes or goes with
                    // the same prefix.
                    if cloud.contains(&c) {
                        continue;
                    }
                    if added {
                        add.insert(c);
                    } else {
                        remove.insert(c);
                    }
                }
                (false, add, remove)
            }
        };
        if let Some(full) = &mut self.legacy {
            if reset {
                full.clear();
            }
            let before = full.clone();
            full.retain(|c| !remove.contains(c));
            full.extend(add);
            if !first && *full == before {
                return FeedUpdate::None;
            }
            // Which are held for offline edges matters only to a cut:
            // the scan of every held route is skipped when all fit.
            let held = if full.len() + cloud.len() > LEGACY_MAX_ROUTES {
                reg.held_among(full)
            } else {
                BTreeSet::new()
            };
            let (tunnel_routes, cut) = legacy_list(full, &cloud, &held);
            self.cut = cut;
            return FeedUpdate::Send(vec![Control::RouteUpdate { tunnel_routes }]);
        }
        if !reset && add.is_empty() && remove.is_empty() {
            return FeedUpdate::None;
        }
        FeedUpdate::Send(Control::route_deltas(
            reset,
            add.into_iter().collect(),
            remove.into_iter().collect(),
        ))
    }

    /// The routes for a legacy edge's hello (empty for a delta edge, which
    /// gets its first full set as deltas right after the hello): polls
    /// once, so the session loop sends only later changes.
    pub fn hello_routes<S: RouteOwner>(
        &mut self,
        reg: &Registry<S>,
        cloud: CloudRanges,
        visible: impl Fn(&str) -> bool,
    ) -> Vec<Cidr> {
        if !self.is_legacy() {
            return Vec::new();
        }
        match self.poll(reg, cloud, visible) {
            FeedUpdate::Send(mut frames) => match frames.pop() {
                Some(Control::RouteUpdate { tunnel_routes }) => tunnel_routes,
                _ => Vec::new(),
            },
            FeedUpdate::None => Vec::new(),
        }
    }
}

/// The whole list for an edge without deltas, cloud ranges first, then
/// the routes some session serves, then those held for offline edges
/// (`held`), cut at [`LEGACY_MAX_ROUTES`]: a cut drops offline edges'
/// prefixes before any live one. The flag says whether it was cut.
pub fn legacy_list(
    full: &BTreeSet<Cidr>,
    cloud: &BTreeSet<Cidr>,
    held: &BTreeSet<Cidr>,
) -> (Vec<Cidr>, bool) {
    let mut out: Vec<Cidr> = cloud.iter().copied().collect();
    let rest = || full.iter().filter(|c| !cloud.contains(c));
    out.extend(rest().filter(|c| !held.contains(c)).copied());
    out.extend(rest().filter(|c| held.contains(c)).copied());
    let cut = out.len() > LEGACY_MAX_ROUTES;
    out.truncate(LEGACY_MAX_ROUTES);
    (out, cut)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use relay_protocol::codec::encode;

    use super::*;
    use crate::registry::testing::Fake;

    fn add(reg: &Registry<Fake>, f: Arc<Fake>, max: usize) {
        crate::registry::testing::reg(reg, f, max).unwrap();
    }

    /// Node `i`: pod CIDR `10.x.y.0/24` and host address `172.16.x.y/32`.
    fn session(i: u32, generation: u64) -> Arc<Fake> {
        let (x, y) = (i / 256, i % 256);
        Arc::new(Fake {
            node: format!("n{i}"),
            generation,
            routes: vec![
                format!("10.{x}.{y}.0/24").parse().unwrap(),
                format!("172.16.{x}.{y}/32").parse().unwrap(),
            ],
        })
    }

    /// The edge side: applies frames the way edge-client does and checks
    /// each frame fits the wire limit.
    #[derive(Default)]
    struct Edge {
        pending: BTreeSet<Cidr>,
        applied: BTreeSet<Cidr>,
        frames: usize,
    }

    impl Edge {
        fn apply(&mut self, u: FeedUpdate) {
            let FeedUpdate::Send(frames) = u else { return };
            for f in frames {
                let len = encode(&f)
                    .expect("every frame encodes within the frame limit")
                    .len();
                assert!(len <= relay_protocol::MAX_FRAME_LEN);
                self.frames += 1;
                match f {
                    Control::RouteDelta {
                        reset,
                        add,
                        remove,
                        complete,
                    } => {
                        if reset {
                            self.pending.clear();
                        }
                        for c in &remove {
                            self.pending.remove(c);
                        }
                        self.pending.extend(add);
                        if complete {
                            self.applied = self.pending.clone();
                        }
                    }
                    Control::RouteUpdate { tunnel_routes } => {
                        self.applied = tunnel_routes.into_iter().collect();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    /// What node `me` should have: cloud ranges plus visible others' routes.
    fn expected(
        reg: &Registry<Fake>,
        cloud: &BTreeSet<Cidr>,
        me: &str,
        vis: &dyn Fn(&str) -> bool,
    ) -> BTreeSet<Cidr> {
        let mut want: BTreeSet<Cidr> = cloud.iter().copied().collect();
        for s in reg.sessions() {
            if s.node != me && vis(&s.node) {
                want.extend(s.routes.iter().copied());
            }
        }
        // Offline nodes' routes stay (see `registry/offline.rs`).
        for r in reg.offline_routes() {
            if r.node != me && vis(&r.node) {
                want.insert(r.cidr);
            }
        }
        want
    }

    fn cloud() -> CloudRanges {
        // One set for every call, as the policy keeps it until it changes.
        static CLOUD: std::sync::OnceLock<CloudRanges> = std::sync::OnceLock::new();
        CLOUD
            .get_or_init(|| {
                Arc::new(
                    ["10.96.0.0/12", "192.168.0.0/24"]
                        .iter()
                        .map(|c| c.parse().unwrap())
                        .collect(),
                )
            })
            .clone()
    }

    #[test]
    fn a_delta_edge_gets_a_full_set_then_only_changes() {
        let reg = Registry::default();
        for i in 0..3 {
            add(&reg, session(i, 1), 100);
        }
        let mut feed = RouteFeed::new("n0", capability::ALL);
        assert!(feed.hello_routes(&reg, cloud(), |_| true).is_empty());
        let mut edge = Edge::default();
        edge.apply(feed.poll(&reg, cloud(), |_| true));
        assert_eq!(edge.applied, expected(&reg, &cloud(), "n0", &|_| true));
        assert_eq!(feed.poll(&reg, cloud(), |_| true), FeedUpdate::None);
        // n1 reconnects with other routes, n2 goes: one delta, exact.
        add(&reg, session(7, 2).with_node("n1"), 100);
        reg.remove("n2", 1);
        let u = feed.poll(&reg, cloud(), |_| true);
        let FeedUpdate::Send(frames) = &u else {
            panic!("no update")
        };
        assert_eq!(frames.len(), 1);
        edge.apply(u);
        assert_eq!(edge.applied, expected(&reg, &cloud(), "n0", &|_| true));
    }

    #[test]
    fn a_legacy_edge_gets_whole_lists_cut_to_fit() {
        let reg = Registry::default();
        for i in 0..2000 {
            add(&reg, session(i, 1), 10_000);
        }
        let mut feed = RouteFeed::new("n0", capability::TCP_STREAMS | capability::UDP_DATAGRAMS);
        assert!(feed.is_legacy());
        let hello = feed.hello_routes(&reg, cloud(), |_| true);
        assert_eq!(hello.len(), LEGACY_MAX_ROUTES);
        assert!(feed.was_cut());
        // Cloud ranges are never the part cut off.
        assert!(cloud().iter().all(|c| hello.contains(c)));
        assert_eq!(feed.poll(&reg, cloud(), |_| true), FeedUpdate::None);
        // An offline node's routes stay; withdrawn, they change the list.
        reg.remove("n5", 1);
        assert_eq!(feed.poll(&reg, cloud(), |_| true), FeedUpdate::None);
        reg.retain_offline(|n, _| n != "n5");
        let FeedUpdate::Send(f) = feed.poll(&reg, cloud(), |_| true) else {
            panic!("no update")
        };
        assert!(matches!(&f[..], [Control::RouteUpdate { .. }]));
    }

    #[test]
    fn a_cut_whole_list_drops_offline_edges_prefixes_before_live_ones() {
        let reg = Registry::default();
        for i in 0..2000 {
            add(&reg, session(i, 1), 10_000);
        }
        // Half the edges go offline: their prefixes (the lower ones) are
        // held, and the list (4,000 prefixes) is still cut.
        for i in 1..=1000 {
            reg.remove(&format!("n{i}"), 1);
        }
        let mut feed = RouteFeed::new("n0", capability::TCP_STREAMS | capability::UDP_DATAGRAMS);
        let tunnel_routes = feed.hello_routes(&reg, cloud(), |_| true);
        assert_eq!(tunnel_routes.len(), LEGACY_MAX_ROUTES);
        assert!(feed.was_cut());
        let sent: BTreeSet<Cidr> = tunnel_routes.into_iter().collect();
        for i in 1001..2000 {
            for c in reg.routes_of(&format!("n{i}")) {
                assert!(sent.contains(&c), "live route {c} of n{i} cut");
            }
        }
        assert!(cloud().iter().all(|c| sent.contains(c)));
    }

    /// The scale the relay is configured for (`max_sessions` 10,000): every
    /// edge's view stays exact and every frame fits, with 100 route changes
    /// per round (a second's worth at 100 changes per second) for ten
    /// rounds. Views are checked for a sample of edges in communities of
    /// 100 nodes, and for one edge that sees every other edge (20,000
    /// prefixes, far past one frame).
    #[test]
    fn ten_thousand_sessions_and_a_hundred_changes_per_round() {
        const N: u32 = 10_000;
        let reg = Registry::default();
        for i in 0..N {
            add(&reg, session(i, 1), N as usize);
        }
        let community = |n: &str| n[1..].parse::<u32>().unwrap() / 100;
        let sample: Vec<u32> = (0..N).step_by(97).collect();
        let mut feeds: Vec<(String, RouteFeed, Edge)> = sample
            .iter()
            .map(|i| {
                (
                    format!("n{i}"),
                    RouteFeed::new(&format!("n{i}"), capability::ALL),
                    Edge::default(),
                )
            })
            .collect();
        let mut all_seeing = (RouteFeed::new("n0", capability::ALL), Edge::default());
        let mut generation = 2;
        for round in 0..11u32 {
            if round > 0 {
                // 100 changes: 50 sessions drop out, 50 come back.
                for k in 0..50 {
                    let i = (round * 631 + k * 197) % N;
                    if reg.get(&format!("n{i}")).is_some() {
                        reg.remove(
                            &format!("n{i}"),
                            reg.get(&format!("n{i}")).unwrap().generation,
                        );
                    } else {
                        add(&reg, session(i, generation), N as usize);
                    }
                    let j = (round * 389 + k * 211 + 7) % N;
                    if reg.get(&format!("n{j}")).is_none() {
                        generation += 1;
                        add(&reg, session(j, generation), N as usize);
                    }
                }
            }
            // Each community's routes, computed once per round.
            let mut by_community: std::collections::HashMap<u32, BTreeSet<Cidr>> =
                Default::default();
            for s in reg.sessions() {
                by_community
                    .entry(community(&s.node))
                    .or_default()
                    .extend(s.routes.iter().copied());
            }
            let offline = reg.offline_routes();
            for r in &offline {
                by_community
                    .entry(community(&r.node))
                    .or_default()
                    .insert(r.cidr);
            }
            for (me, feed, edge) in &mut feeds {
                let mine = community(me);
                edge.apply(feed.poll(&reg, cloud(), move |n: &str| community(n) == mine));
                let mut want = by_community.get(&mine).cloned().unwrap_or_default();
                if let Some(s) = reg.get(me) {
                    for c in &s.routes {
                        want.remove(c);
                    }
                }
                // Its own routes held while it was offline (the test polls
                // feeds of nodes whose session it removed).
                for r in offline.iter().filter(|r| r.node == *me) {
                    want.remove(&r.cidr);
                }
                want.extend(cloud().iter().copied());
                assert_eq!(edge.applied, want, "{me} round {round}");
            }
            let (feed, edge) = &mut all_seeing;
            edge.apply(feed.poll(&reg, cloud(), |_| true));
            assert_eq!(
                edge.applied,
                expected(&reg, &cloud(), "n0", &|_| true),
                "round {round}"
            );
        }
        // ~20,000 prefixes: the first sync alone spans ten frames.
        assert!(all_seeing.1.frames >= 10, "{} frames", all_seeing.1.frames);
    }

    /// `base` and `extra` as one cloud set (a new one, as the policy makes
    /// when a cloud Node comes or goes).
    fn grown(base: &CloudRanges, extra: &[Cidr]) -> CloudRanges {
        let mut s = (**base).clone();
        s.extend(extra.iter().copied());
        Arc::new(s)
    }

    /// The cloud set grows and shrinks while sessions live (a cloud worker
    /// joins, an edge's claim pushes its range out, the worker goes): a
    /// delta edge gets each difference as one delta, never a resync; a
    /// legacy edge a whole list; both stay exact, and a prefix that left
    /// the set because an edge now serves it stays with edges that see
    /// that edge.
    #[test]
    fn cloud_ranges_that_change_reach_edges_as_deltas() {
        let reg = Registry::default();
        add(&reg, session(1, 1), 100);
        let all = |_: &str| true;
        let mut delta = (RouteFeed::new("n0", capability::ALL), Edge::default());
        let mut legacy = (
            RouteFeed::new("n9", capability::TCP_STREAMS),
            Edge::default(),
        );
        let base = cloud();
        delta.1.apply(delta.0.poll(&reg, base.clone(), all));
        let hello = legacy.0.hello_routes(&reg, base.clone(), all);
        legacy.1.apply(FeedUpdate::Send(vec![Control::RouteUpdate {
            tunnel_routes: hello,
        }]));
        let check = |delta: &(RouteFeed, Edge), legacy: &(RouteFeed, Edge), cloud: &CloudRanges| {
            assert_eq!(delta.1.applied, expected(&reg, cloud, "n0", &all));
            assert_eq!(legacy.1.applied, expected(&reg, cloud, "n9", &all));
        };
        check(&delta, &legacy, &base);

        // A cloud worker joins: its range alone, as one delta.
        let worker: Cidr = "10.245.3.0/24".parse().unwrap();
        let with_worker = grown(&base, &[worker]);
        let u = delta.0.poll(&reg, with_worker.clone(), all);
        let FeedUpdate::Send(frames) = &u else {
            panic!("no update")
        };
        assert!(
            matches!(&frames[..], [Control::RouteDelta { reset: false, add, remove, complete: true }]
                if add == &vec![worker] && remove.is_empty()),
            "{frames:?}"
        );
        delta.1.apply(u);
        let u = legacy.0.poll(&reg, with_worker.clone(), all);
        assert!(
            matches!(&u, FeedUpdate::Send(f) if matches!(&f[..], [Control::RouteUpdate { .. }]))
        );
        legacy.1.apply(u);
        check(&delta, &legacy, &with_worker);
        // The same set rebuilt (another Node changed): nothing to send.
        let same = grown(&with_worker, &[]);
        assert_eq!(delta.0.poll(&reg, same.clone(), all), FeedUpdate::None);
        assert_eq!(legacy.0.poll(&reg, same.clone(), all), FeedUpdate::None);

        // An edge comes serving exactly the worker's range: the feeds look
        // before the policy drops it from the cloud set, then after.
        add(
            &reg,
            Arc::new(Fake {
                node: "n5".into(),
                generation: 1,
                routes: vec![worker],
            }),
            100,
        );
        for feed in [&mut delta, &mut legacy] {
            feed.1.apply(feed.0.poll(&reg, same.clone(), all));
            feed.1.apply(feed.0.poll(&reg, base.clone(), all));
        }
        check(&delta, &legacy, &base);
        assert!(delta.1.applied.contains(&worker), "the edge's route stays");
        // The edge goes offline: its route stays (held), whatever the
        // cloud set does.
        reg.remove("n5", 1);
        for feed in [&mut delta, &mut legacy] {
            feed.1.apply(feed.0.poll(&reg, base.clone(), all));
        }
        check(&delta, &legacy, &base);
        assert!(delta.1.applied.contains(&worker), "held while offline");
        // Its Node is deleted (the held route withdrawn), the worker's
        // range is back in the cloud set in the same round: still there;
        // then the worker goes: gone.
        reg.retain_offline(|n, _| n != "n5");
        for feed in [&mut delta, &mut legacy] {
            feed.1.apply(feed.0.poll(&reg, with_worker.clone(), all));
        }
        check(&delta, &legacy, &with_worker);
        for feed in [&mut delta, &mut legacy] {
            feed.1.apply(feed.0.poll(&reg, base.clone(), all));
        }
        check(&delta, &legacy, &base);
        assert!(!delta.1.applied.contains(&worker));
    }

    impl Fake {
        fn with_node(self: Arc<Self>, node: &str) -> Arc<Fake> {
            Arc::new(Fake {
                node: node.into(),
                generation: self.generation,
                routes: self.routes.clone(),
            })
        }
    }
}
