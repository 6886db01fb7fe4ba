//! `/readyz`: whether this relay serves what it promises, and if not
//! why, on one line.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

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
/// readable, or nothing. Ready all the same: the relay routes what it
/// knows (Nodes' pod CIDRs), and an apiserver hiccup on a CRD must not
/// take every replica out of its Service; this says what is missing.
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
    if pending.is_empty() {
        return String::new();
    }
    format!(
        "; CNI IPAM pod ranges not (yet) read: {}{}",
        pending.join(", "),
        why(ipam.last_error)
    )
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
