//! Keeps the routes held for offline edges (see `registry/offline.rs`)
//! in step with the directory: a prefix the directory no longer gives
//! its node (the Node deleted, its pod CIDR moved or refused, its node
//! now a cloud node, an address now shared) is withdrawn within a settle
//! interval, everywhere (capture, route agents, other edges' routes).

use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::directory::Lookup;
use crate::server::Shared;

/// How long a burst of changes is gathered before the held routes are
/// checked (one directory lookup per offline node).
const SETTLE: Duration = Duration::from_millis(200);

/// Whether the directory's entry for a node (`lookup`) still gives it the
/// prefix `c`: unknown while it has not loaded (an outage keeps the last
/// state).
pub(crate) fn still_claimed(lookup: &Lookup, c: &Cidr) -> bool {
    match lookup {
        Lookup::NotSynced => true,
        Lookup::Unknown => false,
        Lookup::Known(e) => {
            !e.cloud
                && e.allowed.iter().any(|a| a.contains_cidr(c))
                && !e.ambiguous.contains(c)
                && !e.refused.contains(c)
                && !e.refused_ranges.iter().any(|r| r.contains_cidr(c))
        }
    }
}

/// Runs until `stop`: checks the held routes whenever the directory or
/// the sessions change (a deleted Node's session ends after the
/// directory said so, and only then are its routes held).
pub(crate) async fn follow_offline(shared: Arc<Shared>, stop: CancellationToken) -> &'static str {
    let mut nodes = shared.directory.subscribe();
    let mut routes = shared.registry.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return "offline routes",
            r = nodes.changed() => if r.is_err() { return "offline routes" },
            r = routes.changed() => if r.is_err() { return "offline routes" },
        }
        tokio::time::sleep(SETTLE).await;
        nodes.borrow_and_update();
        routes.borrow_and_update();
        if shared.registry.offline_nodes() == 0 {
            continue;
        }
        // Decided without the registry's lock; one lookup per node (its
        // routes come in a row).
        let dir = shared.directory.as_ref();
        let mut last: Option<(String, Lookup)> = None;
        let n = shared.registry.retain_offline(|node, c| {
            if last.as_ref().is_none_or(|(n, _)| n != node) {
                last = Some((node.to_string(), dir.lookup(node)));
            }
            last.as_ref().is_some_and(|(_, l)| still_claimed(l, c))
        });
        if n > 0 {
            info!(
                prefixes = n,
                "offline edges' prefixes the directory no longer gives them withdrawn"
            );
        }
    }
}
