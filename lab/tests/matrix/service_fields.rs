//! Service fields that decide which endpoint serves, where the relay or
//! an edge picks it instead of kube-proxy:
//! - `internalTrafficPolicy: Local` (a node agent's DaemonSet): every
//!   node's kube-proxy sends the ClusterIP to that node's own endpoints
//!   only, and drops it where there is none. The relay node's capture and
//!   the edges' must leave such ports to it, or a pod would reach another
//!   node's agent through the tunnel.
//! - `sessionAffinity: ClientIP`: a client keeps to one endpoint. On the
//!   relay node the relay picks for edge endpoints, so it must too.

use std::time::Duration;

use anyhow::{ensure, Result};
use relay_lab::netns::{NetnsLab, Role};
use relay_lab::scenario::{fails_fast, http_from, Table};

use crate::setup::{SVC_NODE_LOCAL, SVC_NODE_LOCAL_AWAY, SVC_STICKY};

/// Six requests from `from` to `agent-local`, every one answered by `own`.
fn always_own(lab: &NetnsLab, from: Role, own: &str) -> Result<String> {
    let bodies = (0..6)
        .map(|_| http_from(lab, from, SVC_NODE_LOCAL))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        bodies.iter().all(|b| b.ends_with(own)),
        "answered by {bodies:?}"
    );
    Ok(format!("6 of 6 answered by {own}"))
}

/// Eight requests from `from` to `web-sticky`, all answered by one
/// endpoint (of two, on two edges).
fn sticky(lab: &NetnsLab, from: Role) -> Result<String> {
    let bodies = (0..8)
        .map(|_| http_from(lab, from, SVC_STICKY))
        .collect::<Result<Vec<_>>>()?;
    let first = bodies[0].clone();
    ensure!(bodies.iter().all(|b| *b == first), "answered by {bodies:?}");
    Ok(format!("8 of 8 answered by {}", first.trim()))
}

pub(crate) fn cells(lab: &NetnsLab, m: &mut Table) {
    for (from, path) in [
        (
            Role::Relay,
            "relay (hostNetwork) → web-sticky 10.96.0.36 × 8",
        ),
        (Role::Cpod1, "cpod1@relay → web-sticky 10.96.0.36 × 8"),
    ] {
        m.note(
            &["sessionAffinity ClientIP → one endpoint per client", path],
            sticky(lab, from),
        );
    }
    // From each node's host (hostNetwork, kube-proxy's output hook): a pod
    // would be its own node's endpoint, and reaching itself through a
    // Service needs hairpin NAT the lab's bridges do not model.
    for (from, own, path) in [
        (
            Role::Relay,
            "cpod1",
            "relay (hostNetwork) → agent-local × 6",
        ),
        (
            Role::Edge1,
            "epod1",
            "edge1 (hostNetwork) → agent-local × 6",
        ),
        (
            Role::Edge2,
            "epod2",
            "edge2 (hostNetwork) → agent-local × 6",
        ),
    ] {
        m.note(
            &["internalTrafficPolicy Local → own node's endpoint", path],
            always_own(lab, from, own),
        );
    }
    // Dropped by edge1's kube-proxy: the connect times out (5 s), where
    // carrying it to edge2 or the relay node would have answered, and
    // sending it to the relay would have been refused at once (a reset).
    m.note(
        &[
            "internalTrafficPolicy Local, no endpoint here → dropped",
            "epod1 → agent-away 10.96.0.35",
        ],
        fails_fast(
            lab,
            Role::Epod1,
            SVC_NODE_LOCAL_AWAY,
            Duration::from_secs(7),
        )
        .and_then(|d| {
            ensure!(
                d >= Duration::from_secs(4),
                "refused after {d:?}: went through the tunnel, not left to kube-proxy"
            );
            Ok(format!("no answer, dropped ({d:?})"))
        }),
    );
}
