//! Tests of the registry: longest-prefix match, conflicts, generations,
//! the session limit, the journal and route changes.

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

/// An edge that goes offline keeps its prefixes claimed (no withdrawal in
/// the journal, listed as offline, served by no session) until it comes
/// back, another node claims them, or the directory takes them away.
/// Without `hold_offline_routes` (the relay's default) an edge's routes
/// go with its session: withdrawn from other edges, held for nobody.
#[test]
fn without_holding_an_edges_routes_go_with_its_session() {
    let r = Registry::default();
    r.hold_offline(false);
    let c = |s: &str| s.parse::<Cidr>().unwrap();
    reg(&r, fake("a", 1, &["10.1.0.0/16"]), 10).unwrap();
    reg(&r, fake("b", 2, &["10.2.0.0/16"]), 10).unwrap();
    let (v, _) = r.route_changes(None, |_| true);
    assert!(r.remove("b", 2));
    assert!(r.lookup(ip("10.2.0.1")).is_none());
    assert!(r.offline_routes().is_empty());
    let (_, ev) = r.route_changes(Some(v), |_| true);
    assert_eq!(ev, RouteChanges::Events(vec![(c("10.2.0.0/16"), false)]));
    let RouteChanges::Resync(all) = r.route_changes(None, |_| true).1 else {
        panic!("resync")
    };
    assert_eq!(all, [c("10.1.0.0/16")]);
}

#[test]
fn an_offline_edges_routes_are_held_until_claimed_again() {
    let r = Registry::default();
    let c = |s: &str| s.parse::<Cidr>().unwrap();
    reg(&r, fake("a", 1, &["10.1.0.0/16"]), 10).unwrap();
    reg(&r, fake("b", 2, &["10.2.0.0/16", "10.3.0.0/16"]), 10).unwrap();
    let (v, _) = r.route_changes(None, |_| true);
    assert!(r.remove("b", 2));
    assert!(r.lookup(ip("10.2.0.1")).is_none(), "no session serves it");
    assert_eq!(r.routes().len(), 1);
    let offline: Vec<_> = r
        .offline_routes()
        .iter()
        .map(|o| (o.cidr, o.node.clone(), o.offline))
        .collect();
    assert_eq!(
        offline,
        [
            (c("10.2.0.0/16"), "b".into(), true),
            (c("10.3.0.0/16"), "b".into(), true)
        ]
    );
    // Other edges keep it: nothing withdrawn; a resync lists it.
    let (v, ev) = r.route_changes(Some(v), |_| true);
    assert_eq!(ev, RouteChanges::Events(vec![]));
    let RouteChanges::Resync(mut all) = r.route_changes(None, |_| true).1 else {
        panic!("resync")
    };
    all.sort();
    assert_eq!(all, [c("10.1.0.0/16"), c("10.2.0.0/16"), c("10.3.0.0/16")]);
    // Not a conflict: node c takes part of it; b's overlapping prefix is
    // withdrawn, its other one stays held.
    reg(&r, fake("c", 3, &["10.2.5.0/24"]), 10).unwrap();
    let (v, ev) = r.route_changes(Some(v), |_| true);
    assert_eq!(
        ev,
        RouteChanges::Events(vec![(c("10.2.0.0/16"), false), (c("10.2.5.0/24"), true)])
    );
    assert_eq!(r.offline_routes().len(), 1);
    // b comes back with one prefix: the held one is replaced.
    reg(&r, fake("b", 4, &["10.3.0.0/16"]), 10).unwrap();
    assert!(r.offline_routes().is_empty());
    assert_eq!(r.lookup(ip("10.3.0.1")).unwrap().node, "b");
    let (_, ev) = r.route_changes(Some(v), |_| true);
    assert_eq!(
        ev,
        RouteChanges::Events(vec![(c("10.3.0.0/16"), false), (c("10.3.0.0/16"), true)])
    );
    // The directory takes a prefix away: withdrawn.
    assert!(r.remove("a", 1));
    let (v, _) = r.route_changes(None, |_| true);
    assert_eq!(r.retain_offline(|n, _| n != "a"), 1);
    let (_, ev) = r.route_changes(Some(v), |_| true);
    assert_eq!(ev, RouteChanges::Events(vec![(c("10.1.0.0/16"), false)]));
    assert_eq!(r.offline_nodes(), 0);
}

/// `retain_offline` asks `keep` with no lock held (a lookup, even a new
/// session, may go on meanwhile), and withdraws only what is still held
/// for that node when it decided.
#[test]
fn offline_routes_are_checked_without_the_lock() {
    let r = Arc::new(Registry::default());
    reg(&r, fake("a", 1, &["10.1.0.0/16"]), 10).unwrap();
    reg(&r, fake("b", 1, &["10.2.0.0/16"]), 10).unwrap();
    assert!(r.remove("a", 1) && r.remove("b", 1));
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = r.clone();
    std::thread::spawn(move || {
        let n = r2.retain_offline(|n, c| {
            // With the registry locked this would never return.
            assert_eq!(r2.serves_exactly(c).as_deref(), Some(n));
            // a comes back while its prefix is being judged.
            if n == "a" {
                reg(&r2, fake("a", 2, &["10.1.0.0/16"]), 10).unwrap();
            }
            false
        });
        let _ = tx.send(n);
    });
    let n = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("retain_offline blocked on its own lock");
    // b's held prefix went; a's live one stayed.
    assert_eq!(n, 1);
    assert_eq!(r.offline_nodes(), 0);
    assert_eq!(r.lookup(ip("10.1.0.1")).unwrap().node, "a");
}

/// Held routes are bounded: past [`OFFLINE_CAP`] offline nodes, the one
/// offline the longest is withdrawn.
#[test]
fn offline_routes_are_bounded_oldest_first() {
    let r = Registry::default();
    let n = OFFLINE_CAP + 1;
    for i in 0..n {
        let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
        let node = format!("e{i}");
        reg(&r, fake(&node, i as u64 + 1, &[&cidr]), usize::MAX).unwrap();
        assert!(r.remove(&node, i as u64 + 1));
    }
    assert_eq!(r.offline_nodes(), OFFLINE_CAP);
    let nodes: std::collections::HashSet<String> =
        r.offline_routes().into_iter().map(|o| o.node).collect();
    assert!(
        !nodes.contains("e0") && nodes.contains("e1") && nodes.contains(&format!("e{}", n - 1))
    );
}
