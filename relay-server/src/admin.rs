//! The admin API (axum): sessions, routes, health, Prometheus metrics.
//!
//! Loopback by default. With a token configured, `/v1/*` and `/metrics`
//! require `Authorization: Bearer <token>`; `/healthz` and `/readyz` stay
//! open for probes. Off loopback the configuration must give it a token and
//! TLS (`admin.tls`, see `config.rs`): it then serves HTTPS through
//! `TlsListener`'s bounded handshakes. Requests are bounded: at most 64 in
//! flight (more are shed with 503) and 10 s each.
//!
//! Those bounds are shared by every client that reaches the port, so
//! kubelet's probes do not come here: `crate::health` serves the same
//! `/healthz` and `/readyz` ([`probe_routes`]) on a loopback listener of
//! their own, which idle or slow admin clients cannot starve.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use relay_protocol::{close_code, Cidr};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::server::Shared;
use crate::session::SessionHandle;

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRow {
    /// Node name.
    pub node: String,
    /// Session id.
    pub session_id: u64,
    /// Generation (higher is newer).
    pub generation: u64,
    /// `quic` or `tcp`.
    pub transport: String,
    /// The edge's address as the relay sees it (after NAT).
    pub remote_addr: String,
    /// RFC 3339 time the session was registered.
    pub connected_since: String,
    /// Seconds since then.
    pub connected_secs: u64,
    /// Smoothed round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Prefixes served.
    pub routes: Vec<Cidr>,
    /// Primary node address.
    pub primary_addr: Option<String>,
    /// Host addresses this node shares with another node (repeated site
    /// LANs): not routed by address for either; reach the node by name.
    pub ambiguous: Vec<Cidr>,
    /// Host addresses its Node lists that are not its own to serve
    /// (loopback or link-local, the cloud's, another node's, outside
    /// `kubernetes.edge_address_ranges`): not routed to it.
    #[serde(default)]
    pub refused: Vec<Cidr>,
    /// Pod ranges its CNI's IPAM gives the node that are not routed to it
    /// (overlapping the cloud's, another node's or a reserved range).
    #[serde(default)]
    pub refused_ranges: Vec<Cidr>,
    /// Served prefixes the relay node does not capture (IPv6: capture is
    /// IPv4 only); reachable through CONNECT.
    pub not_captured: Vec<Cidr>,
    /// Edge software version.
    pub agent: String,
    /// Times the edge fell back from QUIC to TCP since it started.
    pub fallbacks: u32,
    /// Streams open now.
    pub open_streams: u64,
    /// Streams opened in this session.
    pub streams_total: u64,
    /// Payload bytes from the edge.
    pub bytes_in: u64,
    /// Payload bytes to the edge.
    pub bytes_out: u64,
    /// Seconds since the edge last answered on the control stream.
    pub last_seen_secs: f64,
    /// The keep-alive interval the edge told the relay, in seconds
    /// (`None`: an edge that does not tell it).
    #[serde(default)]
    pub edge_keepalive_secs: Option<f64>,
    /// How long the relay lets the edge go unheard before it closes the
    /// session (see `crate::liveness::session_limit`), in seconds.
    #[serde(default)]
    pub silence_limit_secs: f64,
    /// Tunnel routes the edge reports as overlapping its LANs: their LAN
    /// part is reached on the site's LAN, never through the relay (empty
    /// for an edge that does not report them).
    #[serde(default)]
    pub lan_overlaps: Vec<Cidr>,
    /// Whether the session is draining.
    pub draining: bool,
    /// UDP flows open on the session.
    pub udp_flows: usize,
    /// Largest UDP payload one tunnel datagram carries now (path datagram
    /// size minus the flow header); larger payloads travel whole on their
    /// flow's stream (dropped and counted only towards a peer that does
    /// not take them there).
    pub udp_max_payload: usize,
}

impl SessionRow {
    /// Snapshot of a live session.
    pub fn of(s: &SessionHandle, shared: &Shared) -> Self {
        let routes = shared.registry.routes_of(&s.node);
        SessionRow {
            node: s.node.clone(),
            session_id: s.session_id,
            generation: s.generation,
            transport: s.conn.kind().as_str().to_string(),
            remote_addr: s.conn.remote_addr().to_string(),
            connected_since: humantime::format_rfc3339_seconds(s.connected_at).to_string(),
            connected_secs: s.connected_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            rtt_ms: s.conn.rtt().as_secs_f64() * 1000.0,
            not_captured: crate::status::not_captured(&routes, shared.cfg.capture.is_some()),
            routes,
            primary_addr: s.primary_addr().map(|a| a.to_string()),
            ambiguous: crate::directory::ambiguous_of(shared.directory.as_ref(), &s.node),
            refused: crate::directory::refused_of(shared.directory.as_ref(), &s.node),
            refused_ranges: crate::directory::refused_ranges_of(shared.directory.as_ref(), &s.node),
            agent: s.agent.clone(),
            fallbacks: s.fallbacks,
            open_streams: s.open_streams.load(Relaxed),
            streams_total: s.streams_total.load(Relaxed),
            bytes_in: s.bytes_from_edge.load(Relaxed),
            bytes_out: s.bytes_to_edge.load(Relaxed),
            last_seen_secs: s.last_seen_ago().as_secs_f64(),
            edge_keepalive_secs: s.heard.edge_keepalive().map(|k| k.as_secs_f64()),
            silence_limit_secs: crate::liveness::session_limit(s, shared.cfg.quic.idle_timeout)
                .as_secs_f64(),
            lan_overlaps: s
                .lan_overlaps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            draining: s.is_draining(),
            udp_flows: s.flows.len(),
            udp_max_payload: relay_transport::udp::max_payload(&s.conn),
        }
    }
}

/// Serves the admin API on `l` until `stop`: over HTTPS with `tls` (a
/// reloadable certificate, no client certificates), else plain HTTP.
pub(crate) async fn serve(
    l: TcpListener,
    tls: Option<rustls::ServerConfig>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    // The same bound as a CONNECT head: a client that trickles its request
    // head (or sends none) would otherwise hold its fd and task for as
    // long as it likes, as many times as it likes.
    let head_timeout = shared.cfg.limits.connect_header_timeout;
    let app = router(shared);
    match tls {
        None => relay_transport::http::serve(l, app, head_timeout, stop).await,
        Some(cfg) => {
            let l = TlsListener::start(l, cfg, stop.clone());
            relay_transport::http::serve(l, app, head_timeout, stop).await
        }
    }
    "admin"
}

/// Most admin TLS handshakes in progress at once; more connections wait
/// in the kernel's accept queue.
const MAX_TLS_HANDSHAKES: usize = 64;

/// Bound on one admin TLS handshake, so a client that connects and says
/// nothing cannot hold a handshake slot.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin API's listener when it serves HTTPS: an accept task completes
/// TLS handshakes concurrently (bounded in number and time, so a slow
/// client cannot stall the others) and hands finished connections to axum.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::io::Result<std::net::SocketAddr>,
}

impl TlsListener {
    fn start(l: TcpListener, cfg: rustls::ServerConfig, stop: CancellationToken) -> Self {
        let local = l.local_addr();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_TLS_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some((sock, peer)) =
                    relay_transport::conn::accept_until(&stop, "admin", || l.accept()).await
                else {
                    return;
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            drop(permit);
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (stopping): nothing more will come, and
            // graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// The admin API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let protected = Router::new()
        .route("/v1/sessions", get(list_sessions))
        .route(
            "/v1/sessions/{node}",
            get(get_session).delete(delete_session),
        )
        .route("/v1/routes", get(list_routes))
        .route("/v1/replicas", get(list_replicas))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(shared.clone(), auth));
    probe_routes()
        .merge(protected)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|e: tower::BoxError| async move {
                    if e.is::<tower::timeout::error::Elapsed>() {
                        (StatusCode::GATEWAY_TIMEOUT, "admin request timed out\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "admin API overloaded\n")
                    }
                }))
                .load_shed()
                .concurrency_limit(64)
                .timeout(Duration::from_secs(10)),
        )
        .with_state(shared)
}

/// `/healthz` (200 while the process answers) and `/readyz` (200 once the
/// Nodes and Services are loaded, 503 before and while draining, saying
/// why), open to anyone who reaches the listener: the admin API serves
/// them, and so does the probe listener ([`crate::health`],
/// `listen.health`) with exactly these handlers.
pub fn probe_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

/// Compares two secrets in time independent of their contents and of
/// their lengths: both are hashed to fixed-size SHA-256 digests first, so
/// a wrong guess of the token's length costs as long as any other wrong
/// guess (an early return on a length mismatch would leak the length).
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (
        ring::digest::digest(&ring::digest::SHA256, a),
        ring::digest::digest(&ring::digest::SHA256, b),
    );
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(token) = &shared.cfg.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), token.expose().as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

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

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
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
    } else {
        format!("ready{}{}\n", cached(&shared), ipam_note(&shared)).into_response()
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

async fn list_sessions(State(shared): State<Arc<Shared>>) -> Json<Vec<SessionRow>> {
    Json(
        shared
            .registry
            .sessions()
            .iter()
            .map(|s| SessionRow::of(s, &shared))
            .collect(),
    )
}

fn not_found(node: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("no session for node {node}\n"),
    )
        .into_response()
}

async fn get_session(State(shared): State<Arc<Shared>>, Path(node): Path<String>) -> Response {
    match shared.registry.get(&node) {
        Some(s) => Json(SessionRow::of(&s, &shared)).into_response(),
        None => not_found(&node),
    }
}

/// `?drain=true` drains instead of closing at once; `grace` (e.g. `30s`)
/// overrides the configured drain grace.
#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    drain: bool,
    #[serde(default, with = "humantime_serde")]
    grace: Option<Duration>,
}

async fn delete_session(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let Some(s) = shared.registry.get(&node) else {
        return not_found(&node);
    };
    if q.drain {
        let grace = q.grace.unwrap_or(shared.cfg.limits.drain_grace);
        // The drain task adds the grace to an Instant: an unbounded value
        // from the query would overflow it (a panic in the task).
        if grace > crate::config::MAX_DURATION {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "grace must be at most {}\n",
                    humantime::format_duration(crate::config::MAX_DURATION)
                ),
            )
                .into_response();
        }
        s.drain(grace, "drained by operator");
        (
            StatusCode::ACCEPTED,
            format!("draining node {node} (grace {grace:?})\n"),
        )
            .into_response()
    } else {
        s.kick(close_code::KICKED, "closed by operator");
        (StatusCode::OK, format!("closed session of node {node}\n")).into_response()
    }
}

/// `?offline=1` on `GET /v1/routes`.
#[derive(serde::Deserialize, Default)]
struct RoutesQuery {
    #[serde(default)]
    offline: Option<String>,
}

/// The live sessions' routes; with `?offline=1` also the offline edges'
/// held routes (rows with `"offline": true`), which the relay captures
/// and refuses at once. Route agents of this release ask for both; older
/// ones do not, so the multipath agent of an older release never routes
/// an edge's flows to a replica that lost its session while others serve it.
async fn list_routes(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<RoutesQuery>,
) -> Json<Vec<crate::registry::RouteRow>> {
    let mut rows = shared.registry.routes();
    if q.offline
        .as_deref()
        .is_some_and(|v| v == "1" || v == "true")
    {
        rows.extend(shared.registry.offline_routes());
        rows.sort_by_key(|r| r.cidr);
    }
    let captured = shared.captured.read().unwrap_or_else(|e| e.into_inner());
    Json(routable(rows, captured.as_ref()))
}

/// The routes a route agent may send here: with capture on, only the
/// prefixes whose capture is installed (see [`Shared::captured`]).
fn routable(
    rows: Vec<crate::registry::RouteRow>,
    captured: Option<&std::collections::BTreeSet<relay_protocol::Cidr>>,
) -> Vec<crate::registry::RouteRow> {
    match captured {
        None => rows,
        Some(c) => rows.into_iter().filter(|r| c.contains(&r.cidr)).collect(),
    }
}

/// The replica set this relay tells edges about (empty without
/// `[replicas]`).
async fn list_replicas(State(shared): State<Arc<Shared>>) -> Response {
    let set = shared.replicas.borrow().clone();
    let rows: Vec<serde_json::Value> = set
        .iter()
        .map(|r| serde_json::json!({"id": r.id, "address": r.addr, "self": r.id == shared.cfg.relay_id}))
        .collect();
    Json(rows).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared
            .metrics
            .render(shared.registry.len(), shared.cfg.limits.max_sessions)
            + &shared.udp.render_prometheus("relay")
            + &crate::metrics::render_capture(&shared)
            + &crate::metrics::render_status(shared.status.stats())
            + &crate::metrics::render_watches(&shared)
            + &crate::metrics::render_runtime(&shared),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        // Prefixes and different lengths are rejected like any other
        // wrong token (no early length check to time).
        assert!(!same(b"0123456789abcdef", b"0123456789abcdef0"));
        assert!(!same(b"0123456789abcdef", b""));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn routes_not_captured_yet_are_not_offered_to_route_agents() {
        use crate::registry::RouteRow;
        let row = |c: &str, n: &str| RouteRow {
            cidr: c.parse().unwrap(),
            node: n.into(),
            session_id: 1,
            offline: false,
        };
        let rows = vec![
            row("10.244.7.0/24", "edge-1"),
            row("10.244.8.0/24", "edge-2"),
        ];
        // Capture off: every registered route.
        assert_eq!(super::routable(rows.clone(), None), rows);
        // Capture on, edge-2's prefix registered but not installed yet.
        let captured = ["10.244.7.0/24".parse().unwrap()].into();
        assert_eq!(
            super::routable(rows.clone(), Some(&captured)),
            vec![rows[0].clone()]
        );
        // Nothing installed yet (a replica just started).
        assert!(super::routable(rows, Some(&Default::default())).is_empty());
    }
}
