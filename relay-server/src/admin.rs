//! The admin API (axum): sessions, routes, health, Prometheus metrics.
//!
//! Loopback by default. With a token configured, `/v1/*` and `/metrics`
//! require `Authorization: Bearer <token>`; `/healthz` and `/readyz` stay
//! open for probes. Off loopback the configuration must give it a token and
//! TLS (`admin.tls`, see `config.rs`): it then serves HTTPS through
//! `TlsListener`'s bounded handshakes.
//!
//! Two tokens ([`Access`]): the full one (`admin.token_file`) may do
//! anything, closing and draining sessions included; an optional
//! read-only one (`admin.read_token_file`), for Prometheus and the route
//! agents, is accepted for `GET` only and refused with 403 otherwise, so
//! the copy every cloud node holds cannot disconnect edges. Closing and
//! draining log who asked (peer address, token class). The tokens are
//! those their files hold now: re-read when the files change and on
//! SIGHUP (`crate::token_reload`), each file taken on its own, each
//! request checking one snapshot; a token a rotation replaced is still
//! accepted, with the access it had, for `admin.token_grace`.
//!
//! Requests are bounded in two budgets, each shared by every route in it
//! and shed with 503 when full: [`API_SLOTS`] for `/v1/*`, and
//! [`SCRAPE_SLOTS`] apart for `/metrics`, `/healthz` and `/readyz`, so
//! route agents and operators filling the first cannot fail a scrape;
//! 10 s each. `GET /v1/routes` carries an ETag ([`routes_etag`]) and
//! answers `If-None-Match` with 304, so a route agent polling an
//! unchanged table gets no body.
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
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
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
pub(crate) mod tests;

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
    // The token files, looked at while the API serves (a rotated Secret
    // is taken without a restart).
    if let Some(tokens) = &shared.cfg.admin_token_files {
        tokio::spawn(crate::token_reload::watch(tokens.clone(), stop.clone()));
    }
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

/// Requests to `/v1/*` served at once, every route of it together; more
/// are shed with 503 ("admin API overloaded", `Retry-After: 1`).
pub const API_SLOTS: usize = 64;

/// Requests to `/metrics`, `/healthz` and `/readyz` served at once, apart
/// from [`API_SLOTS`]: route agents and operators filling those cannot
/// fail a Prometheus scrape. Shed with 503 likewise.
pub const SCRAPE_SLOTS: usize = 16;

/// Bound on one admin request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin API's request budgets (semaphores shared by every route of
/// each), and the epoch of its route table's ETags.
#[derive(Debug, Clone)]
pub(crate) struct Budgets {
    /// `/v1/*`: [`API_SLOTS`] permits.
    pub(crate) api: Arc<tokio::sync::Semaphore>,
    /// `/metrics`, `/healthz`, `/readyz`: [`SCRAPE_SLOTS`] permits.
    pub(crate) scrape: Arc<tokio::sync::Semaphore>,
    /// Random, drawn once per router (so per relay process): an ETag a
    /// client holds from an earlier process never matches.
    pub(crate) epoch: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            api: Arc::new(tokio::sync::Semaphore::new(API_SLOTS)),
            scrape: Arc::new(tokio::sync::Semaphore::new(SCRAPE_SLOTS)),
            epoch: random_epoch(),
        }
    }
}

/// A random `u64` (the clock and the process id if the system's random
/// source fails, which `ring` reports only on a broken system).
fn random_epoch() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// The admin API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    router_with(shared, Budgets::default())
}

/// [`router`] with the budgets given (a test fills one to see the other
/// still answer).
///
/// The budgets are semaphores shared by every route they cover
/// (`GlobalConcurrencyLimitLayer`): axum applies `Router::layer` to each
/// route (and method) separately, so a plain `concurrency_limit(64)` there
/// gave each its own 64, and "at most 64 in flight" held per route only.
pub(crate) fn router_with(shared: Arc<Shared>, budgets: Budgets) -> Router {
    let auth = middleware::from_fn_with_state(shared.clone(), auth);
    let epoch = budgets.epoch;
    let api = Router::new()
        .route("/v1/sessions", get(list_sessions))
        .route(
            "/v1/sessions/{node}",
            get(get_session).delete(delete_session),
        )
        .route(
            "/v1/routes",
            get(
                move |st: State<Arc<Shared>>, q: Query<RoutesQuery>, h: HeaderMap| {
                    list_routes(st, q, h, epoch)
                },
            ),
        )
        .route("/v1/replicas", get(list_replicas))
        .layer(auth.clone());
    let scrape = Router::new()
        .route("/metrics", get(metrics))
        .layer(auth)
        .merge(probe_routes());
    bounded(api, budgets.api, "api", shared.clone())
        .merge(bounded(scrape, budgets.scrape, "scrape", shared.clone()))
        .with_state(shared)
}

/// `r` in one budget (`name`, as counted in `shared`'s metrics): shed
/// with 503 when `slots` has no permit left, 504 past [`REQUEST_TIMEOUT`].
fn bounded(
    r: Router<Arc<Shared>>,
    slots: Arc<tokio::sync::Semaphore>,
    name: &'static str,
    shared: Arc<Shared>,
) -> Router<Arc<Shared>> {
    r.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |e: tower::BoxError| {
                let timed_out = e.is::<tower::timeout::error::Elapsed>();
                shared.metrics.admin_refused(name, timed_out);
                async move {
                    if timed_out {
                        (StatusCode::GATEWAY_TIMEOUT, "admin request timed out\n").into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(header::RETRY_AFTER, "1")],
                            OVERLOADED,
                        )
                            .into_response()
                    }
                }
            }))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                slots,
            ))
            .timeout(REQUEST_TIMEOUT),
    )
}

/// The body of the 503 a full budget sheds with, which route agents read
/// as "busy, alive" ([`crate::agent::Busy`]); relays before the budgets
/// answered the same.
pub const OVERLOADED: &str = "admin API overloaded\n";

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

/// Which token an admin request to `/v1/*` or `/metrics` presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token is configured (loopback, or allowed insecure): anyone
    /// who reaches the listener may do anything, as before tokens.
    Open,
    /// The full token (`admin.token_file`).
    Full,
    /// The read-only token (`admin.read_token_file`): `GET` only.
    Read,
}

impl Access {
    /// As the log lines name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Open => "none",
            Access::Full => "full",
            Access::Read => "read-only",
        }
    }
}

/// Who made an admin request, for the log lines of what changes state:
/// put in the request's extensions by the admin API's token check.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The client's address (`None` if the listener gave none).
    pub peer: Option<std::net::SocketAddr>,
    /// The token it presented.
    pub access: Access,
}

impl std::fmt::Display for Caller {
    /// `10.0.3.17:51234 (full token)`, `127.0.0.1:40000 (no token
    /// configured)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.peer {
            Some(p) => write!(f, "{p}")?,
            None => f.write_str("unknown peer")?,
        }
        match self.access {
            Access::Open => f.write_str(" (no token configured)"),
            a => write!(f, " ({} token)", a.as_str()),
        }
    }
}

/// Which token `given` is, comparing it with both in constant time (and
/// with both whatever the first gives, so the time taken says nothing
/// about which one came close); `None`: neither.
fn access_of(
    given: &[u8],
    full: &crate::config::Secret,
    read: Option<&crate::config::Secret>,
) -> Option<Access> {
    let slots = [
        Some(full.expose().as_bytes()),
        read.map(|r| r.expose().as_bytes()),
        None,
        None,
    ];
    match first_match(given, slots)? {
        0 => Some(Access::Full),
        _ => Some(Access::Read),
    }
}

/// The first of `tokens` (in order of precedence) that `given` is, each
/// compared with [`same`]. All four are compared whichever matches, an
/// absent one against a stand-in whose result is dropped, so the time a
/// check takes says neither which token matched nor how many are held
/// (the full and read tokens, and the previous ones in their grace).
pub(crate) fn first_match(given: &[u8], tokens: [Option<&[u8]>; 4]) -> Option<usize> {
    let mut found = None;
    // Last to first, so the hit written last is the first in precedence:
    // a select per slot, never an early return.
    for (i, t) in tokens.iter().enumerate().rev() {
        // `&`, not `&&`: the comparison runs for an absent slot too.
        let hit = same(given, t.unwrap_or(b"")) & t.is_some();
        found = if hit { Some(i) } else { found };
    }
    found
}

async fn auth(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // The tokens the files hold now and the previous ones in their grace
    // (one snapshot for every check), or a code-built config's fixed ones.
    // From files there is always a full token: never open.
    let access = match (&shared.cfg.admin_token_files, &shared.cfg.admin_token) {
        (Some(tokens), _) => tokens.access(given.as_bytes()).map(|m| {
            if m.previous {
                relay_transport::sampled!(
                    info,
                    "admin: request authenticated with the previous token, accepted for \
                     admin.token_grace after its rotation: its sender has not seen the new one",
                    peer = %peer.map_or("unknown".to_string(), |p| p.to_string()),
                    token = m.kind.as_str()
                );
            }
            match m.kind {
                crate::token_reload::TokenKind::Full => Access::Full,
                crate::token_reload::TokenKind::Read => Access::Read,
            }
        }),
        (None, None) => Some(Access::Open),
        (None, Some(token)) => access_of(
            given.as_bytes(),
            token,
            shared.cfg.admin_read_token.as_ref(),
        ),
    };
    let Some(access) = access else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response();
    };
    if access == Access::Read && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        relay_transport::sampled!(
            warn,
            "admin: refused the read-only token for a request that changes state",
            peer = %peer.map_or("unknown".to_string(), |p| p.to_string()),
            %method,
            path
        );
        return (
            StatusCode::FORBIDDEN,
            "the read-only admin token may only read (GET); closing or draining a session \
             needs the full token\n",
        )
            .into_response();
    }
    req.extensions_mut().insert(Caller { peer, access });
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
///
/// With an ETag ([`routes_etag`]); a request whose `If-None-Match` holds
/// it gets 304 and no body (route agents poll every second or two, and a
/// table of 20,000 rows is 2 MB).
async fn list_routes(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<RoutesQuery>,
    headers: HeaderMap,
    epoch: u64,
) -> Response {
    let offline = q
        .offline
        .as_deref()
        .is_some_and(|v| v == "1" || v == "true");
    // Read before the rows: a change made while they are read moves the
    // counter on after this, so the ETag is never newer than the rows it
    // goes with (at worst a client gets the same table again next poll).
    let generation = *shared.registry.subscribe().borrow();
    let mut rows = shared.registry.routes();
    if offline {
        rows.extend(shared.registry.offline_routes());
        rows.sort_by_key(|r| r.cidr);
    }
    let (rows, left_out) = {
        let captured = shared.captured.read().unwrap_or_else(|e| e.into_inner());
        routable(rows, captured.as_ref())
    };
    let etag = routes_etag(epoch, generation, offline, left_out);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| etag_matches(v, &etag))
    {
        shared
            .metrics
            .routes_not_modified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    ([(header::ETAG, etag)], Json(rows)).into_response()
}

/// The ETag of `GET /v1/routes`: what the answer is a function of. The
/// router's random `epoch` (a restarted relay's counter starts again, and
/// must not match what a client holds from the last process); the
/// registry's change counter (`Registry::subscribe`'s value, bumped by
/// every change of sessions, routes and offline edges' held routes, which
/// is all the rows hold); whether offline rows were asked for; and a
/// digest of the prefixes left out because their capture is not installed
/// yet (`left_out`, 0 when none: see `routable`), which changes without
/// the counter.
pub fn routes_etag(epoch: u64, generation: u64, offline: bool, left_out: u64) -> String {
    format!(
        "\"{epoch:016x}.{generation:x}.{}.{left_out:x}\"",
        u8::from(offline)
    )
}

/// Whether `If-None-Match` value `v` (a list, or `*`) holds `etag`,
/// compared weakly as RFC 9110 says for this header.
fn etag_matches(v: &HeaderValue, etag: &str) -> bool {
    v.to_str().is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
    })
}

/// The routes a route agent may send here: with capture on, only the
/// prefixes whose capture is installed (see [`Shared::captured`]); and a
/// digest of those left out (0: none).
fn routable(
    rows: Vec<crate::registry::RouteRow>,
    captured: Option<&std::collections::BTreeSet<relay_protocol::Cidr>>,
) -> (Vec<crate::registry::RouteRow>, u64) {
    use std::hash::{Hash, Hasher};
    let Some(c) = captured else {
        return (rows, 0);
    };
    let mut h = std::hash::DefaultHasher::new();
    let mut any = false;
    let rows = rows
        .into_iter()
        .filter(|r| {
            let keep = c.contains(&r.cidr);
            if !keep {
                r.cidr.hash(&mut h);
                any = true;
            }
            keep
        })
        .collect();
    // Never 0 for a non-empty set (0 says none was left out).
    (rows, if any { h.finish() | 1 } else { 0 })
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
            + &crate::metrics::render_edges(&shared)
            + &crate::metrics::render_status(shared.status.stats())
            + &crate::metrics::render_watches(&shared)
            + &crate::metrics::render_runtime(&shared)
            + &shared
                .cfg
                .admin_token_files
                .as_ref()
                .map(crate::token_reload::AdminTokens::render)
                .unwrap_or_default(),
    )
        .into_response()
}
