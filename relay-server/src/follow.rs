//! Keeps live sessions in step with the directory: a node deleted (no
//! Node object, or removed from the table) loses its session within
//! seconds; a node whose pod CIDRs or addresses changed has its routes
//! follow without a reconnect; the cloud Nodes' pod ranges join the cloud
//! ranges (and leave them) as Nodes come and go, and reach every edge as
//! tunnel routes without a reconnect ([`crate::policy::cloud_nodes`]).

use std::sync::Arc;
use std::time::Duration;

use relay_protocol::{capability, close_code};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::directory::Lookup;
use crate::handshake::decide_claim;
use crate::server::Shared;

/// How long a burst of directory changes is gathered before the sessions
/// are walked (a relist changes every node at once).
const SETTLE: Duration = Duration::from_millis(200);

/// Runs until `stop`: walks the live sessions whenever the directory
/// changes; looks at the cloud Nodes' pod ranges again whenever the
/// routes edges serve change (an edge's claim wins over them).
pub(crate) async fn follow_directory(shared: Arc<Shared>, stop: CancellationToken) -> &'static str {
    let mut changes = shared.directory.subscribe();
    let mut routes = shared.registry.subscribe();
    // A directory loaded before this subscribed (from its cache) has its
    // cloud Nodes already.
    cloud_nodes(&shared);
    loop {
        // `changed()` marks what it saw as seen: which branch fired is
        // remembered, and a directory change during the settle counts too.
        let mut directory = tokio::select! {
            _ = stop.cancelled() => return "directory",
            r = changes.changed() => if r.is_err() { return "directory" } else { true },
            r = routes.changed() => if r.is_err() { return "directory" } else { false },
        };
        tokio::time::sleep(SETTLE).await;
        routes.borrow_and_update();
        directory |= changes.has_changed().unwrap_or(false);
        if directory {
            changes.borrow_and_update();
            apply(&shared);
        } else {
            // Only routes changed: no session walk, just the cloud set
            // (one probe of the route table per cloud Node prefix).
            cloud_nodes(&shared);
        }
    }
}

/// Brings the cloud ranges' joined part up to date with the directory's
/// cloud Nodes and the routes edges serve (see
/// [`crate::policy::cloud_nodes`]); when it changed, every route feed
/// looks again (batched as any route change is), so live edges are sent
/// the difference without a reconnect.
pub(crate) fn cloud_nodes(shared: &Shared) {
    let candidates = shared.directory.cloud_prefixes();
    if shared
        .policy
        .set_cloud_nodes(&candidates, |c| shared.registry.overlapping(c))
    {
        shared.registry.poke();
    }
}

/// One walk over the live sessions.
pub(crate) fn apply(shared: &Shared) {
    // Communities from Node labels: a change changes what edges may see
    // of each other; the route feeds resync.
    if shared
        .policy
        .set_label_communities(shared.directory.label_communities())
    {
        info!("communities from Node labels changed; edges' routes follow");
        shared.registry.poke();
    }
    for s in shared.registry.sessions() {
        follow_session(shared, &s);
    }
    // Last: the sessions' routes above decide which cloud prefixes an
    // edge's claim keeps out.
    cloud_nodes(shared);
}

/// Brings one live session in step with the directory: closed when its
/// node is gone or may no longer serve what it advertised; otherwise its
/// routes and Node condition follow its node's entry. [`apply`] runs it
/// for every session; a handshake runs it for its own session when the
/// directory changed between its lookup and its registration, which a
/// walk in that window did not see.
pub(crate) fn follow_session(shared: &Shared, s: &Arc<crate::session::SessionHandle>) {
    let entry = match shared.directory.lookup(&s.node) {
        Lookup::Known(e) => e,
        // An outage keeps the last known state; nothing to do.
        Lookup::NotSynced => return,
        Lookup::Unknown => {
            info!(node = %s.node, "node no longer known to the directory; closing its session");
            shared
                .metrics
                .node_gone
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            s.kick(close_code::KICKED, "node deleted");
            return;
        }
    };
    let relay_decides = s.has(capability::SERVED_ROUTES);
    match decide_claim(&entry, &s.advertised, s.advertised_primary, relay_decides) {
        Ok(claim) => {
            match s.serve(shared, &claim) {
                Ok(true) => {
                    info!(node = %s.node, routes = ?claim.served, "routes follow the directory")
                }
                Ok(false) => {}
                Err(msg) => {
                    warn!(node = %s.node, %msg, "new routes refused; keeping the old ones")
                }
            }
            // What the Node condition says follows too.
            s.report_status(shared);
        }
        Err((reason, msg)) => {
            info!(node = %s.node, reason = reason.as_str(), %msg, "node may no longer serve what it advertised; closing its session");
            s.kick(close_code::KICKED, "advertised routes no longer allowed");
        }
    }
}
