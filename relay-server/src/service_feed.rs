//! What each edge is told about Services ([`ServiceFeed`]): the ClusterIP
//! ports and node ports it captures or leaves to its kube-proxy, sent as
//! deltas; and which ports each snapshot changed ([`Changes`]), so that
//! keeping a thousand edges up to date costs the changed ports, not the
//! whole table, per snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use relay_protocol::{Control, ServiceKey, ServicePort};

use crate::services::{Backend, ServiceSnapshot};

/// Edge `node`'s view of one ClusterIP port (or node port), or `None`
/// when it has no usable endpoint (kube-proxy on the edge rejects those
/// itself). A `node_local` port (`internalTrafficPolicy: Local`) is
/// never remote: the edge leaves it to its kube-proxy, which serves it
/// with the node's own endpoints or drops it. Other ports count only the
/// endpoints the node (in `zone`) would use by their topology hints (see
/// [`crate::topology`]): a port whose hints keep the node on its own
/// endpoints is not remote either.
pub(crate) fn edge_port(
    key: ServiceKey,
    backends: &[Backend],
    (node, zone): (&str, Option<&str>),
    node_local: bool,
) -> Option<ServicePort> {
    if backends.is_empty() && !node_local {
        return None;
    }
    let backends = match node_local {
        true => std::borrow::Cow::Borrowed(backends),
        false => crate::topology::for_node(backends, Some(node), zone),
    };
    let local: Vec<SocketAddr> = backends
        .iter()
        .filter(|b| b.node.as_deref() == Some(node))
        .map(|b| b.addr)
        .take(ServicePort::MAX_LOCAL)
        .collect();
    let remote = !node_local && backends.iter().any(|b| b.node.as_deref() != Some(node));
    Some(ServicePort { key, remote, local })
}

/// A fingerprint of what an edge is told about a port (its key is the
/// map's): equal views, equal fingerprints; a different one collides with
/// odds of one in 2^64, and would only delay that port's update to its
/// next change.
fn told(p: &ServicePort) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    p.remote.hash(&mut h);
    p.local.hash(&mut h);
    h.finish()
}

/// One edge's Service feed: what it was last told, and the frames that
/// move it to the current snapshot.
#[derive(Debug, Default)]
pub struct ServiceFeed {
    /// A fingerprint of each port as the edge was told it ([`told`]): a
    /// thousand sessions keeping whole copies of a 3,000-port table held
    /// 305 MiB.
    sent: BTreeMap<ServiceKey, u64>,
    started: bool,
    /// The generation of the snapshot `sent` was computed from.
    generation: u64,
}

impl ServiceFeed {
    /// The frames that bring edge `node` from what it was told to `snap`
    /// (the first call sends everything, with `reset`); `None` when
    /// nothing changed. With `node_ports` (the edge announced
    /// `capability::NODE_PORTS`) the node ports are in the table too, as
    /// [`ServiceKey::node_port`] entries. `zone` is the node's, for
    /// topology hints (a change of it alone reaches each port with the
    /// port's next change).
    ///
    /// After the first call, only the ports the snapshots since the last
    /// call changed are looked at (see [`Changes`]), when the journal
    /// reaches back that far: a busy cluster publishes several snapshots
    /// a second, and a thousand sessions each going over every port of
    /// each was the relay's biggest cost under EndpointSlice churn.
    pub fn poll(
        &mut self,
        snap: &ServiceSnapshot,
        node: (&str, Option<&str>),
        node_ports: bool,
    ) -> Option<Vec<Control>> {
        let generation = snap.changes.generation;
        if self.started && generation != 0 && self.generation != 0 {
            if generation == self.generation {
                return None;
            }
            if let Some(keys) = snap.changes.since(self.generation) {
                self.generation = generation;
                return self.poll_keys(snap, node, node_ports, &keys);
            }
        }
        self.generation = generation;
        let np = snap
            .node_ports
            .iter()
            .filter(|_| node_ports)
            .map(|((port, udp), b)| (ServiceKey::node_port(*port, *udp), b));
        let now: BTreeMap<ServiceKey, ServicePort> = snap
            .ports
            .iter()
            .map(|(k, b)| (*k, b))
            .chain(np)
            .filter_map(|(k, b)| {
                edge_port(k, b, node, snap.node_local.contains(&k)).map(|p| (k, p))
            })
            .collect();
        let reset = !self.started;
        let upsert: Vec<ServicePort> = now
            .iter()
            .filter(|(k, p)| reset || self.sent.get(k) != Some(&told(p)))
            .map(|(_, p)| p.clone())
            .collect();
        let remove: Vec<ServiceKey> = if reset {
            Vec::new()
        } else {
            self.sent
                .keys()
                .filter(|k| !now.contains_key(k))
                .copied()
                .collect()
        };
        if !reset && upsert.is_empty() && remove.is_empty() {
            return None;
        }
        self.started = true;
        self.sent = now.iter().map(|(k, p)| (*k, told(p))).collect();
        Some(Control::service_deltas(reset, upsert, remove))
    }

    /// [`ServiceFeed::poll`] for the ports in `keys` only.
    fn poll_keys(
        &mut self,
        snap: &ServiceSnapshot,
        node: (&str, Option<&str>),
        node_ports: bool,
        keys: &BTreeSet<ServiceKey>,
    ) -> Option<Vec<Control>> {
        let (mut upsert, mut remove) = (Vec::new(), Vec::new());
        for k in keys {
            let backends = match k.is_node_port() {
                true if node_ports => snap.node_ports.get(&(k.vip.port(), k.udp)),
                true => None,
                false => snap.ports.get(k),
            };
            let now = backends.and_then(|b| edge_port(*k, b, node, snap.node_local.contains(k)));
            match now {
                Some(p) => {
                    let fingerprint = told(&p);
                    if self.sent.insert(*k, fingerprint) != Some(fingerprint) {
                        upsert.push(p);
                    }
                }
                None => {
                    if self.sent.remove(k).is_some() {
                        remove.push(*k);
                    }
                }
            }
        }
        if upsert.is_empty() && remove.is_empty() {
            return None;
        }
        Some(Control::service_deltas(false, upsert, remove))
    }
}

/// How many snapshots' changes [`Changes`] remembers: a session polls at
/// most every 100 ms, so this covers seconds of the busiest churn; one
/// further behind is sent the whole comparison, as before.
const JOURNAL: usize = 64;

/// Which ports each of the latest snapshots changed: what lets a session
/// bring its edge up to date by looking only at those ports.
#[derive(Debug, Default)]
pub struct Changes {
    /// This snapshot's number: 0 for one not published through
    /// [`Changes::next`] (static mode, the empty one before the first
    /// list, tests), which sessions always compare whole.
    pub generation: u64,
    /// `(generation, ports it changed)`, oldest first.
    journal: std::collections::VecDeque<(u64, Arc<BTreeSet<ServiceKey>>)>,
}

impl Changes {
    /// The changes of the snapshot after this one, which changed `keys`.
    pub fn next(&self, keys: BTreeSet<ServiceKey>) -> Changes {
        let generation = self.generation + 1;
        let mut journal = self.journal.clone();
        journal.push_back((generation, Arc::new(keys)));
        while journal.len() > JOURNAL {
            journal.pop_front();
        }
        Changes {
            generation,
            journal,
        }
    }

    /// Every port changed after generation `since` up to this one; `None`
    /// when the journal no longer reaches back to it.
    pub fn since(&self, since: u64) -> Option<BTreeSet<ServiceKey>> {
        let oldest = self.journal.front()?.0;
        if since + 1 < oldest || since > self.generation {
            return None;
        }
        let mut keys = BTreeSet::new();
        for (g, k) in &self.journal {
            if *g > since {
                keys.extend(k.iter().copied());
            }
        }
        Some(keys)
    }
}

/// The ports whose view an edge may see change between `before` and
/// `now`: endpoints changed, added or removed, node ports (as
/// [`ServiceKey::node_port`]) likewise, and ports moving in or out of
/// `node_local`.
pub fn changed_keys(before: &ServiceSnapshot, now: &ServiceSnapshot) -> BTreeSet<ServiceKey> {
    fn diff<K: Ord + Copy, V: PartialEq>(
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) -> impl Iterator<Item = K> {
        let gone = a
            .iter()
            .filter(|(k, v)| b.get(k) != Some(v))
            .map(|(k, _)| *k);
        let new = b
            .iter()
            .filter(|(k, _)| !a.contains_key(k))
            .map(|(k, _)| *k);
        gone.chain(new).collect::<Vec<_>>().into_iter()
    }
    let mut keys: BTreeSet<ServiceKey> = diff(&before.ports, &now.ports).collect();
    keys.extend(
        diff(&before.node_ports, &now.node_ports).map(|(p, udp)| ServiceKey::node_port(p, udp)),
    );
    keys.extend(
        before
            .node_local
            .symmetric_difference(&now.node_local)
            .copied(),
    );
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::relay_capture_set;
    use crate::services::tests::{b, key, snap};

    /// `internalTrafficPolicy: Local`: every node's own endpoints serve
    /// it, so the relay node leaves it to its kube-proxy and each edge is
    /// told it is not remote (its kube-proxy serves or drops it), even
    /// with no endpoint of its own.
    /// Zone hints: the relay node (zone `cloud`) leaves a port whose
    /// hints keep it on cloud endpoints to kube-proxy, and an edge whose
    /// zone has endpoints on its own node only is told the port is not
    /// remote; an edge in a zone nobody is hinted for sees every endpoint.
    #[test]
    fn topology_hints_decide_capture_and_what_is_remote() {
        let hinted = |addr: &str, node: &str, zone: &str| Backend {
            hints: crate::topology::Hints::of(true, &[zone.to_string()], &[]),
            ..b(addr, node)
        };
        let web = key("10.96.0.60:80", false);
        let backends = vec![
            hinted("10.244.7.5:80", "edge1", "shop1"),
            hinted("10.244.1.2:80", "cloud1", "cloud"),
        ];
        let mut s = snap(&[(web, backends.clone())]);
        s.node_ports.insert((30080, false), Arc::from(backends));
        let served = |b: &Backend| b.node.as_deref().is_some_and(|n| n.starts_with("edge"));
        let at_relay = |zone| relay_capture_set(&s, served, &BTreeSet::new(), (None, zone));
        assert!(at_relay(Some("cloud")).cluster.is_empty());
        assert_eq!(at_relay(None).cluster.len(), 1, "no zone known: captured");
        let node_ports = |zone| crate::services::relay_node_port_set(&s, served, (None, zone));
        assert!(node_ports(Some("cloud")).is_empty());
        assert_eq!(node_ports(None).len(), 1);
        let told = |zone| {
            let mut edge = BTreeMap::new();
            for f in ServiceFeed::default()
                .poll(&s, ("edge1", zone), false)
                .expect("batch")
            {
                f.apply_service_delta(&mut edge);
            }
            let p: &ServicePort = &edge[&web];
            (p.remote, p.local.len())
        };
        assert_eq!(told(Some("shop1")), (false, 1));
        assert_eq!(told(Some("shop9")), (true, 1));
    }

    #[test]
    fn node_local_ports_are_never_captured_and_never_remote() {
        let agent = key("10.96.0.50:80", false);
        let elsewhere = key("10.96.0.51:80", false);
        let mut s = snap(&[
            (
                agent,
                vec![b("10.244.7.5:80", "edge1"), b("10.244.1.2:80", "cloud1")],
            ),
            (elsewhere, vec![b("10.244.8.5:80", "edge2")]),
        ]);
        s.node_local.extend([agent, elsewhere]);
        let served = |b: &Backend| b.node.as_deref().is_some_and(|n| n.starts_with("edge"));
        let set = relay_capture_set(&s, served, &BTreeSet::new(), (None, None));
        assert_eq!(set, Default::default());
        let mut edge = BTreeMap::new();
        for f in ServiceFeed::default()
            .poll(&s, ("edge1", None), false)
            .expect("batch")
        {
            f.apply_service_delta(&mut edge);
        }
        assert_eq!(
            (edge[&agent].remote, edge[&agent].local.clone()),
            (false, vec!["10.244.7.5:80".parse().unwrap()])
        );
        assert_eq!(
            (edge[&elsewhere].remote, edge[&elsewhere].local.len()),
            (false, 0),
            "no endpoint on edge1: still not remote"
        );
    }

    #[test]
    fn feed_sends_everything_once_then_only_changes() {
        let mixed = key("10.96.0.20:80", false);
        let cloud = key("10.96.0.10:80", false);
        let own = key("10.96.0.30:80", false);
        let mut s = snap(&[
            (
                mixed,
                vec![b("10.244.7.5:80", "edge1"), b("10.244.8.5:80", "edge2")],
            ),
            (cloud, vec![b("10.244.1.2:80", "cloud1")]),
            (own, vec![b("10.244.7.6:8080", "edge1")]),
            (key("10.96.0.40:80", false), vec![]),
        ]);
        let mut feed = ServiceFeed::default();
        let mut edge = BTreeMap::new();
        let first = feed.poll(&s, ("edge1", None), false).expect("first batch");
        assert!(matches!(
            first[0],
            Control::ServiceDelta { reset: true, .. }
        ));
        for f in &first {
            f.apply_service_delta(&mut edge);
        }
        assert_eq!(edge.len(), 3, "the endpoint-less port is not sent");
        assert_eq!(
            (edge[&mixed].remote, edge[&mixed].local.len()),
            (true, 1),
            "mixed: captured, local endpoint preferred"
        );
        assert_eq!((edge[&cloud].remote, edge[&cloud].local.len()), (true, 0));
        assert_eq!(
            (edge[&own].remote, edge[&own].local.clone()),
            (false, vec!["10.244.7.6:8080".parse().unwrap()]),
            "all local: left to the edge's kube-proxy"
        );
        assert!(
            feed.poll(&s, ("edge1", None), false).is_none(),
            "no change, no frame"
        );

        // The edge1 endpoint of the mixed Service moves to edge2; the
        // cloud Service goes away.
        s.ports
            .insert(mixed, Arc::from(vec![b("10.244.8.6:80", "edge2")]));
        s.ports.remove(&cloud);
        let next = feed.poll(&s, ("edge1", None), false).expect("a change");
        assert!(matches!(
            next[0],
            Control::ServiceDelta { reset: false, .. }
        ));
        for f in &next {
            f.apply_service_delta(&mut edge);
        }
        assert_eq!(edge.len(), 2);
        assert!(edge[&mixed].local.is_empty() && edge[&mixed].remote);
        let mut fresh = BTreeMap::new();
        for f in ServiceFeed::default()
            .poll(&s, ("edge1", None), false)
            .unwrap()
        {
            f.apply_service_delta(&mut fresh);
        }
        assert_eq!(edge, fresh, "deltas reach what a fresh edge is sent");
    }

    /// Node ports go only to edges that asked for them, keyed
    /// `0.0.0.0:nodePort`, with the same local/remote split as ClusterIPs.
    #[test]
    fn node_ports_go_to_edges_that_capture_them() {
        let mut s = snap(&[(
            key("10.96.0.20:80", false),
            vec![b("10.244.7.5:80", "edge1"), b("10.244.1.2:80", "cloud1")],
        )]);
        let both = Arc::from(vec![
            b("10.244.7.5:80", "edge1"),
            b("10.244.1.2:80", "cloud1"),
        ]);
        s.node_ports.insert((30080, false), both);
        s.node_ports
            .insert((30053, true), Arc::from(vec![b("10.244.8.5:53", "edge2")]));
        let table = |node_ports: bool| {
            let mut t = BTreeMap::new();
            for f in ServiceFeed::default()
                .poll(&s, ("edge1", None), node_ports)
                .unwrap()
            {
                f.apply_service_delta(&mut t);
            }
            t
        };
        let old = table(false);
        assert!(old.keys().all(|k| !k.is_node_port()), "{old:?}");
        let new = table(true);
        let tcp = &new[&ServiceKey::node_port(30080, false)];
        assert_eq!(
            (tcp.remote, tcp.local.clone()),
            (true, vec!["10.244.7.5:80".parse().unwrap()])
        );
        let udp = &new[&ServiceKey::node_port(30053, true)];
        assert!(udp.remote && udp.local.is_empty());
        assert_eq!(new.len(), old.len() + 2);
    }

    /// A feed that follows every snapshot through the journal reaches
    /// what a fresh edge is sent, for a churn of endpoints moving, ports
    /// coming and going, node ports and `node_local` changing; one that
    /// falls behind the journal is compared whole and reaches it too.
    #[test]
    fn deltas_from_the_journal_reach_what_a_fresh_edge_is_sent() {
        let mut s = snap(&[]);
        let mut prev = Arc::new(s.clone());
        let mut follower = ServiceFeed::default();
        let mut laggard = ServiceFeed::default();
        let (mut edge, mut late) = (BTreeMap::new(), BTreeMap::new());
        let apply = |fs: Option<Vec<Control>>, t: &mut BTreeMap<ServiceKey, ServicePort>| {
            for f in fs.into_iter().flatten() {
                f.apply_service_delta(t);
            }
        };
        let nodes = ["edge1", "edge2", "cloud1"];
        for round in 0..200u32 {
            let vip = format!("10.96.0.{}:80", round % 17);
            let k = key(&vip, round % 3 == 0);
            match round % 5 {
                0 => {
                    s.ports.remove(&k);
                }
                1 => {
                    s.node_local.insert(k);
                }
                2 => {
                    s.node_local.remove(&k);
                }
                _ => {
                    let n = nodes[(round as usize / 5) % 3];
                    let ep = format!("10.244.{}.{}:80", round % 3, round % 7);
                    s.ports.insert(k, Arc::from(vec![b(&ep, n)]));
                }
            }
            if round % 4 == 0 {
                let np = 30000 + (round % 5) as u16;
                s.node_ports.insert(
                    (np, false),
                    Arc::from(vec![b("10.244.0.9:80", nodes[round as usize % 3])]),
                );
            }
            s.changes = Arc::new(prev.changes.next(changed_keys(&prev, &s)));
            let now = Arc::new(s.clone());
            apply(follower.poll(&now, ("edge1", None), true), &mut edge);
            // The laggard polls every 80 snapshots: past the journal.
            if round % 80 == 79 {
                apply(laggard.poll(&now, ("edge1", None), true), &mut late);
            }
            let mut fresh = BTreeMap::new();
            apply(
                ServiceFeed::default().poll(&now, ("edge1", None), true),
                &mut fresh,
            );
            assert_eq!(edge, fresh, "round {round}");
            if round % 80 == 79 {
                assert_eq!(late, fresh, "laggard, round {round}");
            }
            assert!(
                follower.poll(&now, ("edge1", None), true).is_none(),
                "round {round}"
            );
            prev = now;
        }
    }

    /// Not a test: what one snapshot with one changed port costs 1,000
    /// sessions over a table of 3,000 ports, through the journal and
    /// compared whole (the figures in docs/benchmarks.md, "Service churn").
    /// `cargo test --release -p relay-server --lib service_churn_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn service_churn_cost() {
        let nodes: Vec<String> = (0..1000).map(|i| format!("edge{i}")).collect();
        let mut s = snap(&[]);
        for i in 0..3000u32 {
            let k = key(&format!("10.96.{}.{}:80", i / 250, i % 250), false);
            let eps: Vec<Backend> = (0..3)
                .map(|j| {
                    let addr = format!("10.244.{}.{}:80", (i + j) % 250, j);
                    b(&addr, &nodes[((i + j) % 1000) as usize])
                })
                .collect();
            s.ports.insert(k, Arc::from(eps));
        }
        let first = Arc::new(Changes::default().next(BTreeSet::new()));
        s.changes = first;
        let base = Arc::new(s.clone());
        for journal in [true, false] {
            let rss = || -> u64 {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .unwrap_or("");
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let before = rss();
            let mut feeds: Vec<ServiceFeed> =
                nodes.iter().map(|_| ServiceFeed::default()).collect();
            for (f, n) in feeds.iter_mut().zip(&nodes) {
                f.poll(&base, (n, None), true);
            }
            println!(
                "RSS for 1,000 sessions' feeds: +{} KiB",
                rss().saturating_sub(before)
            );
            let mut times = Vec::new();
            let mut prev = base.clone();
            for round in 0..5u32 {
                let mut next = (*prev).clone();
                let k = key(&format!("10.96.0.{}:80", round), false);
                next.ports.insert(
                    k,
                    Arc::from(vec![b("10.244.9.9:80", &nodes[round as usize])]),
                );
                // The publisher's one comparison counts for the journal.
                let t = std::time::Instant::now();
                next.changes = match journal {
                    true => Arc::new(prev.changes.next(changed_keys(&prev, &next))),
                    false => Arc::default(),
                };
                let next = Arc::new(next);
                for (f, n) in feeds.iter_mut().zip(&nodes) {
                    f.poll(&next, (n, None), true);
                }
                times.push(t.elapsed());
                prev = next;
            }
            times.sort();
            println!(
                "1,000 sessions, 3,000 ports, one port changed: {} median {:?} per snapshot",
                if journal { "journal" } else { "whole table" },
                times[times.len() / 2]
            );
        }
    }

    #[test]
    fn the_journal_answers_only_as_far_back_as_it_reaches() {
        let mut c = Changes::default();
        for i in 0..(JOURNAL as u16 + 10) {
            c = c.next(BTreeSet::from([ServiceKey::node_port(i, false)]));
        }
        let g = c.generation;
        assert_eq!(c.since(g), Some(BTreeSet::new()));
        assert_eq!(c.since(g - 2).map(|k| k.len()), Some(2));
        assert_eq!(c.since(g - JOURNAL as u64).map(|k| k.len()), Some(JOURNAL));
        assert_eq!(c.since(g - JOURNAL as u64 - 1), None);
        assert_eq!(c.since(g + 1), None);
    }
}
