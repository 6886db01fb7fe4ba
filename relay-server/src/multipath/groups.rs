//! The resilient groups on paper: which replicas serve each prefix
//! ([`merge`], [`merge_views`]), what this host holds of ours
//! ([`parse_installed`]), and the `ip -batch` lines from one to the other
//! ([`plan`]).
//!
//! Apart from the kernel side (`kernel`, which runs `ip`) because these
//! are functions of text and sets alone: group ids kept in place and
//! members changed, the heart of the multipath agent, are tested
//! without a network namespace (`super::tests`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use relay_protocol::Cidr;
use tracing::warn;

use super::{BUCKETS, GROUP_BASE, IDLE_TIMER, MAX_GROUPS, NEXTHOP_BASE};

/// What this host has of ours.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Our routes: prefix → the group id they point at (`None`: not a group).
    pub routes: BTreeMap<Cidr, Option<u32>>,
    /// Our nexthops (replica ids).
    pub nexthops: BTreeSet<u32>,
    /// Our groups: id → member nexthop ids.
    pub groups: BTreeMap<u32, BTreeSet<u32>>,
}

/// Parses `ip -4 route show table T proto P` (our routes) and `ip nexthop
/// show`.
pub fn parse_installed(routes: &str, nexthops: &str) -> Installed {
    let mut out = Installed::default();
    for l in routes
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
    {
        let mut w = l.split_whitespace();
        let Some(Ok(c)) = w.next().map(str::parse::<Cidr>) else {
            continue;
        };
        let words: Vec<&str> = l.split_whitespace().collect();
        let nhid = words
            .windows(2)
            .find(|p| p[0] == "nhid")
            .and_then(|p| p[1].parse().ok());
        out.routes.insert(c, nhid);
    }
    for l in nexthops.lines() {
        let words: Vec<&str> = l.split_whitespace().collect();
        let Some(id) = words
            .windows(2)
            .find(|p| p[0] == "id")
            .and_then(|p| p[1].parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(g) = words.windows(2).find(|p| p[0] == "group") {
            if (GROUP_BASE..GROUP_BASE + MAX_GROUPS).contains(&id) {
                let members = g[1]
                    .split('/')
                    // `id,weight` when weighted.
                    .filter_map(|m| m.split(',').next()?.parse().ok())
                    .collect();
                out.groups.insert(id, members);
            }
        } else if (NEXTHOP_BASE..GROUP_BASE).contains(&id) {
            out.nexthops.insert(id);
        }
    }
    out
}

/// The `ip -batch` commands that turn `have` into `want` (prefix → member
/// replica indices; empty members: no route). Nexthops first, groups
/// changed in place, routes last; removals in the reverse order. Route
/// lines carry `{proto}` and `{table}` for the caller to fill in.
/// `vias` are the replicas' next hops with the device each is reached
/// through (a nexthop object needs one; `None`: already installed).
pub fn plan(
    have: &Installed,
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[(IpAddr, Option<String>)],
) -> String {
    let mut b = String::new();
    let nh = |i: usize| NEXTHOP_BASE + i as u32;
    for (i, (via, dev)) in vias.iter().enumerate() {
        if !have.nexthops.contains(&nh(i)) {
            match dev {
                Some(d) => {
                    let _ = writeln!(b, "nexthop replace id {} via {via} dev {d}", nh(i));
                }
                None => warn!(%via, "no route to this replica's next hop; leaving it out"),
            }
        }
    }
    // Keep each prefix's group id; new prefixes get the lowest free ones.
    let mut used: BTreeSet<u32> = have.groups.keys().copied().collect();
    let mut next_free = GROUP_BASE;
    let mut group_of: BTreeMap<Cidr, u32> = BTreeMap::new();
    for c in want.keys() {
        let id = match have.routes.get(c).copied().flatten() {
            Some(g) if have.groups.contains_key(&g) && !group_of.values().any(|v| *v == g) => g,
            _ => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        group_of.insert(*c, id);
    }
    for (c, members) in want {
        let g = group_of[c];
        let ids: BTreeSet<u32> = members.iter().map(|i| nh(*i)).collect();
        if have.groups.get(&g) != Some(&ids) {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            let _ = writeln!(
                b,
                "nexthop replace id {g} group {} type resilient buckets {BUCKETS} idle_timer {IDLE_TIMER}",
                list.join("/")
            );
        }
        if have.routes.get(c) != Some(&Some(g)) {
            let _ = writeln!(
                b,
                "route replace {c} nhid {g} proto {{proto}} table {{table}}"
            );
        }
    }
    for c in have.routes.keys().filter(|c| !want.contains_key(c)) {
        let _ = writeln!(b, "route del {c} proto {{proto}} table {{table}}");
    }
    let keep: BTreeSet<u32> = group_of.values().copied().collect();
    for g in have.groups.keys().filter(|g| !keep.contains(g)) {
        let _ = writeln!(b, "nexthop del id {g}");
    }
    b
}

/// Every replica's view → prefix → serving replicas. `None` for a replica
/// that did not answer: left out, unless none answered (then `None`:
/// change nothing).
pub fn merge(views: &[Option<BTreeSet<Cidr>>]) -> Option<BTreeMap<Cidr, BTreeSet<usize>>> {
    if views.iter().all(Option::is_none) {
        return None;
    }
    let mut out: BTreeMap<Cidr, BTreeSet<usize>> = BTreeMap::new();
    for (i, v) in views.iter().enumerate() {
        for c in v.iter().flatten() {
            out.entry(*c).or_default().insert(i);
        }
    }
    Some(out)
}

/// [`merge`] with offline edges' prefixes: a prefix some replica serves
/// goes to the replicas serving it (never to one that lost the edge's
/// session while others keep theirs); a prefix no replica serves but some
/// hold for an offline edge goes to those, which refuse its connections
/// at once.
pub fn merge_views(
    views: &[Option<crate::agent::RouteView>],
) -> Option<BTreeMap<Cidr, BTreeSet<usize>>> {
    let live: Vec<Option<BTreeSet<Cidr>>> = views
        .iter()
        .map(|v| v.as_ref().map(|v| v.live.clone()))
        .collect();
    let mut out = merge(&live)?;
    for (i, v) in views.iter().enumerate() {
        for c in v.iter().flat_map(|v| v.offline.iter()) {
            if !live.iter().flatten().any(|l| l.contains(c)) {
                out.entry(*c).or_default().insert(i);
            }
        }
    }
    Some(out)
}
