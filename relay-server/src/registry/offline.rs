//! The routes of edges that went offline, still claimed for them.
//!
//! When an edge's session ends, its prefixes are not withdrawn: the relay
//! node keeps capturing them, route agents keep routing them here, and
//! other edges keep them in their tunnel routes, so a connection to an
//! offline edge's pod is refused at once (the relay resets a captured
//! connection no session serves) instead of following a default route,
//! where a cloud router or carrier drops RFC 1918 traffic silently (a
//! connect then hangs through ~127 s of SYN retries) and an edge pod's
//! packets leave by its site's gateway.
//!
//! Bounded ([`OFFLINE_CAP`] nodes; past it the one offline the longest is
//! released) and released when another node claims an overlapping prefix,
//! when the node comes back (its new session's routes replace them) or
//! when the directory no longer gives the node the prefix (a Node deleted,
//! its pod CIDR moved: [`super::Registry::retain_offline`]). Held routes
//! never overlap another node's routes, live or offline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use relay_protocol::Cidr;

use super::table::RouteTable;
use super::RouteOwner;

/// Most offline nodes whose routes are held: as many as the relay's
/// default session limit, so every edge of a full relay is covered.
pub const OFFLINE_CAP: usize = 10_000;

/// The owner of a held prefix in the held routes' table.
pub(super) struct Offline {
    node: Arc<str>,
}

impl RouteOwner for Offline {
    fn node(&self) -> &str {
        &self.node
    }
    fn generation(&self) -> u64 {
        0
    }
    fn session_id(&self) -> u64 {
        0
    }
}

/// Held routes by node, in the order they went offline.
#[derive(Default)]
pub(super) struct OfflineRoutes {
    by_node: HashMap<Arc<str>, (u64, Vec<Cidr>)>,
    order: BTreeMap<u64, Arc<str>>,
    table: RouteTable<Offline>,
    seq: u64,
}

impl OfflineRoutes {
    /// Holds `routes` for `node`; returns the nodes released to make room
    /// (with their routes), oldest first.
    pub(super) fn hold(
        &mut self,
        node: &Arc<str>,
        routes: Vec<Cidr>,
        cap: usize,
    ) -> Vec<(Arc<str>, Vec<Cidr>)> {
        let mut released = Vec::new();
        if let Some(r) = self.release(node) {
            released.push((node.clone(), r));
        }
        if routes.is_empty() {
            return released;
        }
        while self.by_node.len() >= cap.max(1) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(r) = self.release(&oldest) {
                released.push((oldest, r));
            }
        }
        self.seq += 1;
        let owner = Arc::new(Offline { node: node.clone() });
        for c in &routes {
            self.table.insert(*c, owner.clone());
        }
        self.order.insert(self.seq, node.clone());
        self.by_node.insert(node.clone(), (self.seq, routes));
        released
    }

    /// Releases everything held for `node`; returns its routes.
    pub(super) fn release(&mut self, node: &str) -> Option<Vec<Cidr>> {
        let (seq, routes) = self.by_node.remove(node)?;
        self.order.remove(&seq);
        for c in &routes {
            self.table.remove(c);
        }
        Some(routes)
    }

    /// Releases the held prefixes of nodes other than `node` overlapping
    /// any of `routes` (now claimed by `node`); returns them. Their
    /// nodes' other prefixes stay held.
    pub(super) fn release_overlapping(
        &mut self,
        node: &str,
        routes: &[Cidr],
    ) -> Vec<(Arc<str>, Vec<Cidr>)> {
        let mut released = Vec::new();
        for want in routes {
            while let Some((c, other)) = self
                .table
                .conflict(want, node)
                .map(|(c, o)| (c, o.node.clone()))
            {
                self.table.remove(&c);
                let emptied = match self.by_node.get_mut(&other) {
                    Some((_, held)) => {
                        held.retain(|h| *h != c);
                        held.is_empty()
                    }
                    None => false,
                };
                if emptied {
                    self.release(&other);
                }
                released.push((other, vec![c]));
            }
        }
        released
    }

    /// Releases each of `gone`'s prefixes still held for its node (one
    /// held for another node since, or no longer held, is left alone);
    /// returns those released, by node.
    pub(super) fn release_held(
        &mut self,
        gone: Vec<(Arc<str>, Vec<Cidr>)>,
    ) -> Vec<(Arc<str>, Vec<Cidr>)> {
        let mut released = Vec::new();
        for (node, unwanted) in gone {
            let Some((_, routes)) = self.by_node.get_mut(&node) else {
                continue;
            };
            let (gone, kept): (Vec<Cidr>, Vec<Cidr>) =
                routes.iter().partition(|c| unwanted.contains(c));
            if gone.is_empty() {
                continue;
            }
            *routes = kept;
            for c in &gone {
                self.table.remove(c);
            }
            if routes.is_empty() {
                self.release(&node);
            }
            released.push((node, gone));
        }
        released
    }

    /// A held prefix overlapping `c`, and its node.
    pub(super) fn overlap(&self, c: &Cidr) -> Option<(Cidr, String)> {
        self.table
            .overlap(c, |_| true)
            .map(|(have, o)| (have, o.node.to_string()))
    }

    /// The node holding exactly `c`.
    pub(super) fn get(&self, c: &Cidr) -> Option<String> {
        self.table.get(c).map(|o| o.node.to_string())
    }

    /// Every held route and its node.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Vec<Cidr>)> {
        self.by_node.iter().map(|(n, (_, r))| (n, r))
    }

    /// Offline nodes whose routes are held.
    pub(super) fn len(&self) -> usize {
        self.by_node.len()
    }
}
