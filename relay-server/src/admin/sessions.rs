//! `/v1/sessions`: the live sessions, one at a time or page by page, and
//! closing or draining one.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use relay_protocol::{close_code, Cidr};
use serde::{Deserialize, Serialize};

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
    /// Whether the edge's own capture is installed, as the edge reports
    /// it: `false` while its install fails (the node's pods do not reach
    /// the cloud through the tunnel; see `capture_error`); `null` from an
    /// edge without capture or one that does not report it.
    #[serde(default)]
    pub capture_installed: Option<bool>,
    /// Why the edge's capture is not installed (its error, bounded);
    /// empty otherwise.
    #[serde(default)]
    pub capture_error: String,
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
        let capture = s.capture();
        SessionRow {
            node: s.node.clone(),
            session_id: s.session_id,
            generation: s.generation,
            transport: s.conn.kind().as_str().to_string(),
            remote_addr: s.conn.remote_addr().to_string(),
            connected_since: humantime::format_rfc3339_seconds(s.connected_at).to_string(),
            // The monotonic clock: a wall clock stepped back (NTP after a
            // boot without RTC) would report 0, stepped forward years.
            connected_secs: s.age_ms() / 1000,
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
            capture_installed: capture.as_ref().map(|c| c.installed),
            capture_error: capture.map(|c| c.error).unwrap_or_default(),
            draining: s.is_draining(),
            udp_flows: s.flows.len(),
            udp_max_payload: relay_transport::udp::max_payload(&s.conn),
        }
    }
}

/// Most sessions one page of `GET /v1/sessions?limit=N` holds. Without
/// `limit` (and `after`) the answer stays the whole list as a JSON array,
/// as clients from before pagination expect; with them it is one
/// [`SessionsPage`] of at most this many rows, so a relay with 10,000
/// sessions need not build (nor its client parse) one huge answer.
pub const MAX_SESSIONS_PAGE: usize = 1000;

/// One page of `GET /v1/sessions?limit=N&after=NODE`: sessions ordered by
/// node name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionsPage {
    /// Up to `limit` sessions, the first nodes after `after` by name.
    pub sessions: Vec<SessionRow>,
    /// The last node of this page when more sessions follow (ask again
    /// with `after=<next>`); `null` on the last page.
    pub next: Option<String>,
}

/// `?limit=N&after=NODE` on `GET /v1/sessions`, as given (checked by
/// [`SessionsQuery::page`], so a bad value gets a message of ours).
#[derive(Debug, Default, Deserialize)]
pub(super) struct SessionsQuery {
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

impl SessionsQuery {
    /// `None`: no pagination asked for (the whole list, as an array);
    /// else the page size (the ceiling when only `after` is given) and
    /// the node to start after. `Err`: why the query is refused.
    fn page(&self) -> Result<Option<(usize, Option<&str>)>, String> {
        let limit = match self.limit.as_deref() {
            None if self.after.is_none() => return Ok(None),
            None => MAX_SESSIONS_PAGE,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_SESSIONS_PAGE).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "limit must be a whole number from 1 to {MAX_SESSIONS_PAGE}, not {l:?}\n"
                    ))
                }
            },
        };
        Ok(Some((limit, self.after.as_deref())))
    }
}

/// The page of `sorted` (ordered by `node`) after node `after`: at most
/// `limit` items, and whether more follow.
fn window<'a, T>(
    sorted: &'a [T],
    node: impl Fn(&T) -> &str,
    after: Option<&str>,
    limit: usize,
) -> (&'a [T], bool) {
    let start = after.map_or(0, |a| sorted.partition_point(|s| node(s) <= a));
    let rest = &sorted[start..];
    (&rest[..rest.len().min(limit)], rest.len() > limit)
}

pub(super) async fn list_sessions(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<SessionsQuery>,
) -> Response {
    let page = match q.page() {
        Ok(p) => p,
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
    };
    let sessions = shared.registry.sessions();
    let row = |s: &Arc<SessionHandle>| SessionRow::of(s, &shared);
    match page {
        None => whole_list(sessions, shared.clone()).await,
        Some((limit, after)) => {
            let (page, more) = window(&sessions, |s| s.node.as_str(), after, limit);
            Json(SessionsPage {
                sessions: page.iter().map(row).collect(),
                next: page.last().filter(|_| more).map(|s| s.node.clone()),
            })
            .into_response()
        }
    }
}

/// Rows serialised between two yields to the runtime while the whole list
/// is built: one piece is about a millisecond of a worker's time (a row
/// is ~1 KiB of JSON).
const ROWS_PER_PIECE: usize = 256;

/// The whole list (no `limit`, no `after`) as one JSON array, built
/// [`ROWS_PER_PIECE`] rows at a time with a yield to the runtime between
/// pieces. Built in one go, 10,000 rows held a runtime worker for tens of
/// milliseconds, stalling the tunnels' tasks queued behind it; moved to a
/// blocking thread, the list left that thread lingering 10 s after each
/// request. The answer is still one body with its length (not chunked),
/// as clients from before expect. Each row is a snapshot of its session
/// as it is read; the set of sessions is the one at the request.
async fn whole_list(sessions: Vec<Arc<SessionHandle>>, shared: Arc<Shared>) -> Response {
    let body = array_in_pieces(&sessions, ROWS_PER_PIECE, |s| SessionRow::of(s, &shared)).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `items` as one JSON array of `row(item)`, serialised `per_piece` rows
/// at a time with a yield to the runtime between pieces.
async fn array_in_pieces<T, R: Serialize>(
    items: &[T],
    per_piece: usize,
    row: impl Fn(&T) -> R,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + items.len().min(MAX_SESSIONS_PAGE) * 1024);
    out.push(b'[');
    for (n, piece) in items.chunks(per_piece.max(1)).enumerate() {
        if n > 0 {
            tokio::task::yield_now().await;
        }
        for (i, item) in piece.iter().enumerate() {
            if n > 0 || i > 0 {
                out.push(b',');
            }
            // A row is plain data; should serialising one ever fail, what
            // it wrote is cut off and `null` stands in its place, so the
            // array stays well-formed, and the failure is logged.
            let start = out.len();
            if let Err(e) = serde_json::to_writer(&mut out, &row(item)) {
                tracing::warn!(error = %e, "admin: a row did not serialise");
                out.truncate(start);
                out.extend_from_slice(b"null");
            }
        }
    }
    out.push(b']');
    out
}

fn not_found(node: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("no session for node {node}\n"),
    )
        .into_response()
}

pub(super) async fn get_session(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
) -> Response {
    match shared.registry.get(&node) {
        Some(s) => Json(SessionRow::of(&s, &shared)).into_response(),
        None => not_found(&node),
    }
}

/// `?drain=true` drains instead of closing at once; `grace` (e.g. `30s`)
/// overrides the configured drain grace.
#[derive(Debug, Deserialize)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    drain: bool,
    #[serde(default, with = "humantime_serde")]
    grace: Option<Duration>,
}

/// Closes a session, or drains it. A drain of a session already draining
/// is refused with 409, naming when that drain began and its grace: the
/// drain task's deadline is fixed when it starts, so a second grace would
/// not be applied, and a 202 would say it was. Logs who asked (peer
/// address and token class, [`super::Caller`]) at info, before acting, so
/// the session's own "down" line that follows has its cause named.
pub(super) async fn delete_session(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    Query(q): Query<DeleteQuery>,
    caller: Option<Extension<super::Caller>>,
) -> Response {
    let caller = caller.map_or_else(|| "unknown caller".to_string(), |c| c.0.to_string());
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
        tracing::info!(%node, session_id = s.session_id, %caller, ?grace, "admin: draining a session");
        if s.drain(grace, "drained by operator") {
            (
                StatusCode::ACCEPTED,
                format!("draining node {node} (grace {grace:?})\n"),
            )
                .into_response()
        } else {
            (StatusCode::CONFLICT, already_draining(&s, grace)).into_response()
        }
    } else {
        tracing::info!(%node, session_id = s.session_id, %caller, "admin: closing a session");
        s.kick(close_code::KICKED, "closed by operator");
        (StatusCode::OK, format!("closed session of node {node}\n")).into_response()
    }
}

/// The 409 for a second drain: since when the session drains, with which
/// grace, and that the one asked for now is not applied.
fn already_draining(s: &SessionHandle, asked: Duration) -> String {
    let since = s
        .drain_started()
        .map(|(at, ago, grace)| {
            format!(
                " since {} ({}s ago) with grace {grace:?}",
                humantime::format_rfc3339_seconds(at),
                ago.as_secs()
            )
        })
        .unwrap_or_default();
    format!(
        "session of node {} is already draining{since}; grace {asked:?} not applied (close it now with DELETE without drain)\n",
        s.node
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(limit: Option<&str>, after: Option<&str>) -> SessionsQuery {
        SessionsQuery {
            limit: limit.map(Into::into),
            after: after.map(Into::into),
        }
    }

    #[tokio::test]
    async fn the_whole_list_is_one_json_array_built_in_pieces() {
        for (n, per_piece) in [(0, 2), (1, 2), (2, 2), (5, 2), (6, 2), (7, 300)] {
            let items: Vec<u32> = (0..n).collect();
            let calls = std::cell::Cell::new(0);
            let body = array_in_pieces(&items, per_piece, |i| {
                calls.set(calls.get() + 1);
                i * 10
            })
            .await;
            let whole: Vec<u32> = serde_json::from_slice(&body).expect("one array");
            assert_eq!(whole, items.iter().map(|i| i * 10).collect::<Vec<_>>());
            assert_eq!(calls.get(), n as usize, "one row per item");
        }
    }

    #[test]
    fn session_pages_are_checked_and_cut_by_node_name() {
        assert_eq!(q(None, None).page(), Ok(None));
        assert_eq!(q(Some("2"), None).page(), Ok(Some((2, None))));
        assert_eq!(
            q(None, Some("edge-3")).page(),
            Ok(Some((MAX_SESSIONS_PAGE, Some("edge-3"))))
        );
        for bad in ["0", "-1", "ten", "", "1001", "99999999999999999999999"] {
            let e = q(Some(bad), None).page().unwrap_err();
            assert!(
                e.contains("limit must be a whole number from 1 to 1000"),
                "{bad}: {e}"
            );
        }
        let nodes = ["a", "b", "c", "d", "e"];
        fn id<'a>(s: &'a &str) -> &'a str {
            s
        }
        assert_eq!(window(&nodes, id, None, 2), (&nodes[..2], true));
        assert_eq!(window(&nodes, id, Some("b"), 2), (&nodes[2..4], true));
        assert_eq!(window(&nodes, id, Some("d"), 2), (&nodes[4..], false));
        assert_eq!(window(&nodes, id, Some("c"), 2), (&nodes[3..], false));
        // A node that left between pages: the next page starts after
        // where it was.
        assert_eq!(window(&nodes, id, Some("bb"), 2), (&nodes[2..4], true));
        assert_eq!(window(&nodes, id, Some("z"), 2), (&nodes[..0], false));
    }
}
