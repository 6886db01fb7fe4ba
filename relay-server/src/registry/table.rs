//! The longest-prefix-match route table ([`RouteTable`]): prefixes by
//! length, so a lookup or a conflict check costs a probe per length
//! present, not a scan of every route. Pure data structure, separate from
//! the registry's locking and session bookkeeping.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use relay_protocol::Cidr;

use super::RouteOwner;

/// Longest-prefix-match table: prefix → owning session.
pub(super) struct RouteTable<S> {
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
    pub(super) fn lookup(&self, ip: IpAddr) -> Option<&Arc<S>> {
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
    pub(super) fn conflict(&self, want: &Cidr, node: &str) -> Option<(Cidr, &Arc<S>)> {
        self.overlap(want, |s| s.node() != node)
    }

    /// A prefix overlapping `want` whose session `other` accepts (see
    /// [`RouteTable::conflict`] for the cost).
    pub(super) fn overlap(
        &self,
        want: &Cidr,
        other: impl Fn(&Arc<S>) -> bool,
    ) -> Option<(Cidr, &Arc<S>)> {
        let other = |s: &&Arc<S>| other(s);
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

    /// The session `c` itself (not a wider prefix) is routed to.
    pub(super) fn get(&self, c: &Cidr) -> Option<&Arc<S>> {
        self.by_len.get(&c.prefix_len())?.get(c)
    }

    pub(super) fn insert(&mut self, c: Cidr, s: Arc<S>) {
        self.by_len.entry(c.prefix_len()).or_default().insert(c, s);
    }

    pub(super) fn remove(&mut self, c: &Cidr) {
        if let Some(m) = self.by_len.get_mut(&c.prefix_len()) {
            m.remove(c);
            if m.is_empty() {
                self.by_len.remove(&c.prefix_len());
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Cidr, &Arc<S>)> {
        self.by_len.values().flat_map(|m| m.iter())
    }
}
