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
//!
//! By concern: [`sessions`] (`/v1/sessions`, paged), `readyz` (what
//! `/readyz` weighs) and [`capture`] (the capture's state it reads).

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::server::Shared;

pub mod capture;
mod readyz;
pub mod sessions;
#[cfg(test)]
mod tests;

pub use capture::CaptureHealth;
use readyz::readyz;
use sessions::{delete_session, get_session, list_sessions};
pub use sessions::{SessionRow, SessionsPage, MAX_SESSIONS_PAGE};

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
/// Nodes and Services are loaded and, with `[capture]`, the capture is
/// installed; 503 before and while draining, saying why), open to anyone who reaches the listener: the admin API serves
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
