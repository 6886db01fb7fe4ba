//! `/readyz`: whether this relay serves what it promises, and if not
//! why, on one line.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use relay_kube::ipam::StrictAffinity;

use super::capture::CaptureReadiness;
use crate::server::Shared;

/// `; its cache (written … ago) is too old to use` for a source whose
/// cache is past its age limit (and so no longer trusted), or nothing.
fn expired(since: Option<std::time::SystemTime>) -> String {
    since
        .filter(|_| crate::directory::cache_too_old(since))
        .map(|t| {
            format!(
                "; its cache (written {}s ago) is too old to use",
                t.elapsed().unwrap_or_default().as_secs()
            )
        })
        .unwrap_or_default()
}

/// `; last watch error: …` (on one line), or nothing.
fn why(e: Option<String>) -> String {
    e.map(|e| format!("; last watch error: {}", e.replace(['\r', '\n'], " ")))
        .unwrap_or_default()
}

/// `/readyz`: 503 while draining, until the Nodes and the Services are
/// loaded, and with `[capture]` while its capture is not installed (see
/// [`super::capture`] for what counts as a transient); else 200 `ready`
/// with notes on what it serves from caches or cannot read yet.
pub(super) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let capture = capture_readiness(&shared);
    if shared.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !shared.directory.is_synced() {
        // A rollout pauses here until the relay knows which nodes exist.
        let msg = format!(
            "{} node directory not loaded yet{}{}\n",
            shared.directory.source(),
            expired(shared.directory.cached_since()),
            why(shared.directory.last_error())
        );
        (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
    } else if !shared.services.is_synced() {
        // Capture and edges' service tables would start from nothing.
        let msg = format!(
            "services and endpointslices not loaded yet{}{}{}\n",
            expired(shared.services.cached_since()),
            why(shared.services.last_error()),
            cached(&shared)
        );
        (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
    } else if let CaptureReadiness::NotInstalled(what) = &capture {
        // Traffic from this node to the edges would leave by the default
        // route instead of the relay: not what this replica promises.
        (StatusCode::SERVICE_UNAVAILABLE, format!("capture {what}\n")).into_response()
    } else {
        let retrying = match capture {
            CaptureReadiness::Retrying(what) => {
                format!("; capture update {what} (retried every second)")
            }
            _ => String::new(),
        };
        format!("ready{}{}{retrying}\n", cached(&shared), ipam_note(&shared)).into_response()
    }
}

/// The capture's state for `/readyz`: [`CaptureReadiness::Installed`]
/// with capture off (nothing to wait for).
fn capture_readiness(shared: &Shared) -> CaptureReadiness {
    match shared.cfg.capture {
        None => CaptureReadiness::Installed,
        Some(_) => shared
            .metrics
            .capture_health
            .readiness(std::time::Instant::now()),
    }
}

/// `; CNI IPAM …` naming the IPAM resources not yet listed or not
/// readable, then [`strict_affinity_note`], or nothing. Ready all the
/// same: the relay routes what it knows (Nodes' pod CIDRs), and an
/// apiserver hiccup on a CRD must not take every replica out of its
/// Service; this says what is missing.
fn ipam_note(shared: &Shared) -> String {
    let Some(ipam) = shared.directory.ipam() else {
        return String::new();
    };
    let pending: Vec<String> = ipam
        .sources
        .iter()
        .filter(|(_, s)| !matches!(*s, "absent" | "listed"))
        .map(|(r, s)| format!("{r} {s}"))
        .collect();
    let strict = strict_affinity_note(ipam.calico_strict_affinity);
    if pending.is_empty() {
        return strict.to_string();
    }
    format!(
        "; CNI IPAM pod ranges not (yet) read: {}{}{strict}",
        pending.join(", "),
        why(ipam.last_error)
    )
}

/// `; Calico IPAM strictAffinity …` where Calico's blocks are in use and
/// it is not known to be true, or nothing. Ready all the same: the
/// setting is the cluster's, not the relay's, and the tunnel serves every
/// other pod; this says why some pods may be routed to the wrong node.
fn strict_affinity_note(s: StrictAffinity) -> &'static str {
    match s {
        StrictAffinity::Off => "; Calico IPAM strictAffinity is false: a node may be given addresses of another node's block, and pods with them are routed to that node (set it true: deploy/README.md)",
        StrictAffinity::Unset => "; Calico IPAM strictAffinity is unset (Calico's default, false): a node may be given addresses of another node's block, and pods with them are routed to that node (set it true: deploy/README.md)",
        StrictAffinity::Forbidden => "; Calico IPAM strictAffinity unknown: 403 reading ipamconfigs.crd.projectcalico.org default",
        _ => "",
    }
}

/// `; nodes from the cache written … ago (…)` while the directory serves
/// its cache, the same for the Services, or nothing.
fn cached(shared: &Shared) -> String {
    let since = |t: std::time::SystemTime| t.elapsed().unwrap_or_default().as_secs();
    let nodes = shared.directory.cached_since().map(|t| {
        format!(
            "; nodes from the cache written {}s ago until the first list{}",
            since(t),
            why(shared.directory.last_error())
        )
    });
    let services = shared.services.cached_since().map(|t| {
        format!(
            "; services from the cache written {}s ago until the first lists{}",
            since(t),
            why(shared.services.last_error())
        )
    });
    nodes.into_iter().chain(services).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_affinity_is_noted_only_when_not_known_true() {
        for s in StrictAffinity::ALL {
            let note = strict_affinity_note(s);
            match s {
                StrictAffinity::Off | StrictAffinity::Unset => {
                    assert!(note.contains("strictAffinity is"), "{s:?}: {note}");
                    assert!(note.contains("routed to that node"), "{s:?}: {note}");
                }
                StrictAffinity::Forbidden => assert!(note.contains("403"), "{note}"),
                _ => assert_eq!(note, "", "{s:?}"),
            }
            assert!(!note.contains('\n'), "one line: {note}");
        }
    }
}
