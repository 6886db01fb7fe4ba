//! The route journal: the bounded, versioned log of route changes that
//! lets a route feed catch up by the changes since its cursor instead of
//! re-reading the whole table ([`super::Registry::route_changes`]).

use std::collections::VecDeque;
use std::sync::Arc;

use relay_protocol::Cidr;

#[cfg(doc)]
use super::Registry;

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
pub(super) struct Journal {
    base: u64,
    entries: VecDeque<RouteEvent>,
}

impl Journal {
    pub(super) fn next(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    pub(super) fn push(&mut self, node: &Arc<str>, routes: &[Cidr], added: bool) {
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
    pub(super) fn since(&self, since: u64) -> Option<impl Iterator<Item = &RouteEvent>> {
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
