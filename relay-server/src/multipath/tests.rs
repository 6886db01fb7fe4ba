//! Tests of the multipath agent: the merge of the replicas' views and
//! the plan here, the agent for real in [`netns`].
//!
//! In one `tests` module rather than next to `groups`: docs cite these
//! tests by this path (`multipath::tests::...` in docs/bad-input.md and
//! docs/architecture.md), and the single-relay agent's namespace tests
//! use [`netns`]'s harness by it.

use super::*;

fn c(s: &str) -> Cidr {
    s.parse().unwrap()
}

#[test]
fn a_lost_replica_changes_groups_in_place_and_a_lost_prefix_goes() {
    let vias: Vec<(IpAddr, Option<String>)> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        .iter()
        .map(|v| (v.parse().unwrap(), Some("lan0".to_string())))
        .collect();
    let all = |cs: &[&str]| Some(cs.iter().map(|s| c(s)).collect::<BTreeSet<Cidr>>());
    let want = merge(&[
        all(&["10.244.7.0/24", "10.244.8.0/24"]),
        all(&["10.244.7.0/24", "10.244.8.0/24"]),
        all(&["10.244.7.0/24"]),
    ])
    .unwrap();
    let first = plan(&Installed::default(), &want, &vias);
    assert!(first.contains(&format!(
        "nexthop replace id {} via 10.0.0.3 dev lan0",
        NEXTHOP_BASE + 2
    )));
    assert!(first.contains(&format!(
        "nexthop replace id {GROUP_BASE} group {}/{}/{} type resilient",
        NEXTHOP_BASE,
        NEXTHOP_BASE + 1,
        NEXTHOP_BASE + 2
    )));
    assert!(first.contains(&format!(
        "route replace 10.244.8.0/24 nhid {} proto {{proto}} table {{table}}",
        GROUP_BASE + 1
    )));
    // As the kernel then shows it (`idle_timer 10`: groups an older
    // agent made; only their members matter to the plan, and a change
    // of members brings `IDLE_TIMER`).
    let routes = format!(
        "10.244.7.0/24 nhid {g0} proto 250 \n\tnexthop via 10.0.0.1 dev lan0 weight 1 \n10.244.8.0/24 nhid {g1} proto 250 \n",
        g0 = GROUP_BASE,
        g1 = GROUP_BASE + 1
    );
    let nhs = format!(
        "id {a} via 10.0.0.1 dev lan0 scope link \nid {b} via 10.0.0.2 dev lan0 scope link \nid {cc} via 10.0.0.3 dev lan0 scope link \nid {g0} group {a}/{b}/{cc} type resilient buckets 64 idle_timer 10 unbalanced_timer 0 unbalanced_time 0 \nid {g1} group {a}/{b} type resilient buckets 64 idle_timer 10 unbalanced_timer 0 unbalanced_time 0 \nid 7 via 192.0.2.1 dev eth0 scope link \n",
        a = NEXTHOP_BASE,
        b = NEXTHOP_BASE + 1,
        cc = NEXTHOP_BASE + 2,
        g0 = GROUP_BASE,
        g1 = GROUP_BASE + 1
    );
    let have = parse_installed(&routes, &nhs);
    assert_eq!(
        have.nexthops.len(),
        3,
        "someone else's nexthop 7 is not ours"
    );
    assert_eq!(plan(&have, &want, &vias), "", "nothing to do when in step");
    // Replica 0 stops answering and replica 1 loses edge 2's session:
    // groups change in place (same ids), routes stay.
    let want = merge(&[
        None,
        all(&["10.244.7.0/24"]),
        all(&["10.244.7.0/24", "10.244.8.0/24"]),
    ])
    .unwrap();
    let p = plan(&have, &want, &vias);
    assert_eq!(
        p,
        format!(
            "nexthop replace id {g0} group {b}/{cc} type resilient buckets 64 idle_timer {IDLE_TIMER}\nnexthop replace id {g1} group {cc} type resilient buckets 64 idle_timer {IDLE_TIMER}\n",
            g0 = GROUP_BASE,
            g1 = GROUP_BASE + 1,
            b = NEXTHOP_BASE + 1,
            cc = NEXTHOP_BASE + 2
        )
    );
    // Nobody answers: change nothing. Edge 2 gone everywhere: its route
    // and group go.
    assert!(merge(&[None, None, None]).is_none());
    let want = merge(&[all(&["10.244.7.0/24"]), None, None]).unwrap();
    let p = plan(&have, &want, &vias);
    assert!(
        p.contains("route del 10.244.8.0/24 proto {proto} table {table}"),
        "{p}"
    );
    assert!(
        p.ends_with(&format!("nexthop del id {}\n", GROUP_BASE + 1)),
        "{p}"
    );
}

/// An offline edge's prefix goes to the replicas that hold it only
/// while no replica serves it: a replica that lost the edge's session
/// while the others keep theirs gets none of its flows.
#[test]
fn offline_prefixes_go_where_held_only_while_nobody_serves_them() {
    use crate::agent::RouteView;
    let view = |live: &[&str], offline: &[&str]| {
        Some(RouteView {
            live: live.iter().map(|s| c(s)).collect(),
            offline: offline.iter().map(|s| c(s)).collect(),
        })
    };
    let e2 = "10.244.8.0/24";
    // Replica 0 lost edge 2's session; 1 and 2 serve it.
    let want = merge_views(&[view(&[], &[e2]), view(&[e2], &[]), view(&[e2], &[])]).unwrap();
    assert_eq!(want[&c(e2)], BTreeSet::from([1, 2]));
    // Edge 2 offline everywhere (one replica restarted and holds
    // nothing): routed to those that refuse it.
    let want = merge_views(&[view(&[], &[e2]), view(&[], &[]), view(&[], &[e2])]).unwrap();
    assert_eq!(want[&c(e2)], BTreeSet::from([0, 2]));
    // An older relay lists live routes only.
    let want = merge_views(&[view(&[], &[]), None, view(&[], &[e2])]).unwrap();
    assert_eq!(want[&c(e2)], BTreeSet::from([2]));
    assert!(merge_views(&[None, None]).is_none());
}

pub(crate) mod netns;
