//! The route agent's status endpoint (`route-agent --status-listen`, off
//! by default): what kubelet probes and Prometheus scrapes on a cloud
//! node running the agent.
//!
//! - `GET /healthz`: 200 while the process answers. Not tied to the relay:
//!   a relay outage must not make kubelet restart every agent (the routes
//!   they hold keep sending edge traffic to the relay node meanwhile).
//! - `GET /readyz`: 200 once a poll has read the relay's routes and made
//!   this node's routes match them, as long as fewer than
//!   [`NOT_READY_AFTER`] polls in a row have failed since; else 503 with
//!   why (the relay unreadable, no next hop toward the relay node's pods,
//!   `ip` refusing the routes). A rollout of an agent that cannot sync
//!   stops at its first node; one failed poll does not flap readiness.
//! - `GET /metrics`: `route_agent_*` in the Prometheus text format.
//!
//! Both agents serve it: the single-relay one ([`crate::agent`]) and the
//! several-relay one ([`crate::multipath`]), where "the relay" above
//! reads "the replicas": a poll fails as `relay_unreachable` when none of
//! them answers (one that does not is routed around, as a success; one
//! answering busy counts as answering while its last table is kept), and
//! as `no_next_hop` when a prefix the answering replicas list has none
//! among those listing it with a route toward its VIA address.
//!
//! It is served with the relay's probe listener bounds
//! (`crate::health::serve_router`: a few connections, oldest closed
//! first, one request each, short timeouts), plain HTTP without a token,
//! so loopback unless `--allow-insecure-status`: the agent runs on the
//! host network, where every pod of the node could otherwise reach it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Polls in a row that may fail after a successful one before `/readyz`
/// answers 503: the agent keeps its routes through a short relay restart
/// (see [`crate::agent::run`]), and so does its readiness.
pub const NOT_READY_AFTER: u64 = 3;

/// Why a poll did not leave this node's routes in step with the relay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollFailure {
    /// The relay's `GET /v1/routes` failed (unreachable, refused, 401, …).
    RelayUnreachable,
    /// No usable route toward the relay node's pods (`--via-pod-network`).
    NoNextHop,
    /// `ip` failed to read or change the routes.
    InstallFailed,
}

impl PollFailure {
    /// Every failure, in metric order.
    pub const ALL: [PollFailure; 3] = [
        PollFailure::RelayUnreachable,
        PollFailure::NoNextHop,
        PollFailure::InstallFailed,
    ];

    /// The `result` label of `route_agent_polls_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            PollFailure::RelayUnreachable => "relay_unreachable",
            PollFailure::NoNextHop => "no_next_hop",
            PollFailure::InstallFailed => "install_failed",
        }
    }
}

/// What the agent's polls came to, shared by its loop and its status
/// endpoint.
#[derive(Debug, Default)]
pub struct AgentStatus {
    polls_ok: AtomicU64,
    polls_failed: [AtomicU64; 3],
    refused: AtomicU64,
    state: Mutex<Polls>,
}

#[derive(Debug, Default)]
struct Polls {
    /// Routes of ours on this node after the last successful sync.
    routes: usize,
    /// When the last successful sync finished.
    synced_at: Option<(SystemTime, Instant)>,
    /// Polls failed since then (or since start).
    failed_in_row: u64,
    /// The last failure, on one line.
    last_failure: Option<(PollFailure, String)>,
}

impl AgentStatus {
    /// A poll read the relay's routes and this node's now match them
    /// (`routes` of them).
    pub fn synced(&self, routes: usize) {
        self.polls_ok.fetch_add(1, Relaxed);
        let mut s = self.lock();
        s.routes = routes;
        s.synced_at = Some((SystemTime::now(), Instant::now()));
        s.failed_in_row = 0;
    }

    /// The last poll refused `n` of the relay's prefixes (each holds an
    /// address of this node or the next hop; see
    /// [`crate::agent::refuse_prefixes`]).
    pub fn refused(&self, n: usize) {
        self.refused.store(n as u64, Relaxed);
    }

    /// A poll failed, `why`, with this error.
    pub fn failed(&self, why: PollFailure, error: &dyn std::fmt::Display) {
        if let Some(i) = PollFailure::ALL.iter().position(|f| *f == why) {
            self.polls_failed[i].fetch_add(1, Relaxed);
        }
        let mut s = self.lock();
        s.failed_in_row += 1;
        s.last_failure = Some((why, format!("{error:#}").replace(['\r', '\n'], " ")));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Polls> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok(line)` when ready, else `Err(why)`; both one line.
    pub fn readiness(&self) -> Result<String, String> {
        let s = self.lock();
        let last = || {
            s.last_failure
                .as_ref()
                .map(|(why, e)| format!("; last failure: {}: {e}", why.as_str()))
                .unwrap_or_default()
        };
        match s.synced_at {
            None if s.failed_in_row == 0 => Err("no poll has finished yet".into()),
            None => Err(format!(
                "no poll has synced the routes yet ({} failed){}",
                s.failed_in_row,
                last()
            )),
            Some((_, at)) if s.failed_in_row >= NOT_READY_AFTER => Err(format!(
                "{} polls in a row failed since the last sync {}s ago{}",
                s.failed_in_row,
                at.elapsed().as_secs(),
                last()
            )),
            Some((_, at)) => Ok(format!(
                "ready: {} routes in step with the relay (last sync {}s ago){}",
                s.routes,
                at.elapsed().as_secs(),
                if s.failed_in_row > 0 {
                    last()
                } else {
                    String::new()
                }
            )),
        }
    }

    /// The counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP route_agent_polls_total Polls of the relay's routes, by result (ok: this node's routes now match the relay's; relay_unreachable: GET /v1/routes failed; no_next_hop: no route toward the relay node's pods; install_failed: ip refused).\n# TYPE route_agent_polls_total counter\n",
        );
        let _ = writeln!(
            out,
            "route_agent_polls_total{{result=\"ok\"}} {}",
            self.polls_ok.load(Relaxed)
        );
        for (f, n) in PollFailure::ALL.iter().zip(&self.polls_failed) {
            let _ = writeln!(
                out,
                "route_agent_polls_total{{result=\"{}\"}} {}",
                f.as_str(),
                n.load(Relaxed)
            );
        }
        let ready = u8::from(self.readiness().is_ok());
        let s = self.lock();
        let synced = s.synced_at.map_or(0.0, |(t, _)| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        });
        let _ = write!(
            out,
            "# HELP route_agent_routes_installed Edge prefix routes of the agent's protocol on this node after its last successful sync.\n# TYPE route_agent_routes_installed gauge\nroute_agent_routes_installed {}\n\
             # HELP route_agent_last_sync_timestamp_seconds Unix time of the last poll that left this node's routes matching the relay's (0: none yet).\n# TYPE route_agent_last_sync_timestamp_seconds gauge\nroute_agent_last_sync_timestamp_seconds {synced:.3}\n\
             # HELP route_agent_ready 1 while /readyz answers 200.\n# TYPE route_agent_ready gauge\nroute_agent_ready {ready}\n\
             # HELP route_agent_prefixes_refused Edge prefixes the last poll refused to route because each holds an address of this node or the next hop (it would take over this node's own traffic).\n# TYPE route_agent_prefixes_refused gauge\nroute_agent_prefixes_refused {}\n",
            s.routes,
            self.refused.load(Relaxed)
        );
        out
    }
}

/// `/healthz`, `/readyz` and `/metrics` of `status`.
pub fn router(status: Arc<AgentStatus>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(status)
}

async fn readyz(State(status): State<Arc<AgentStatus>>) -> Response {
    match status.readiness() {
        Ok(line) => format!("{line}\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(status): State<Arc<AgentStatus>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        status.render(),
    )
        .into_response()
}

/// Serves the status endpoint on `l` until `stop`.
pub async fn serve(l: TcpListener, status: Arc<AgentStatus>, stop: CancellationToken) {
    crate::health::serve_router(l, router(status), stop).await
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;

    #[test]
    fn readiness_waits_for_a_sync_and_survives_a_failed_poll_or_two() {
        let s = AgentStatus::default();
        assert_eq!(s.readiness(), Err("no poll has finished yet".into()));
        s.failed(PollFailure::RelayUnreachable, &"connection refused");
        let e = s.readiness().unwrap_err();
        assert!(
            e.contains("(1 failed); last failure: relay_unreachable: connection refused"),
            "{e}"
        );
        s.synced(4);
        assert!(s.readiness().unwrap().starts_with("ready: 4 routes"));
        for i in 1..NOT_READY_AFTER {
            s.failed(
                PollFailure::InstallFailed,
                &"ip: RTNETLINK answers\nOperation not permitted",
            );
            let line = s
                .readiness()
                .unwrap_or_else(|e| panic!("after {i} failures: {e}"));
            assert!(
                line.ends_with("install_failed: ip: RTNETLINK answers Operation not permitted"),
                "{line}"
            );
        }
        s.failed(PollFailure::NoNextHop, &"only the default route");
        let e = s.readiness().unwrap_err();
        assert!(
            e.starts_with("3 polls in a row failed since the last sync"),
            "{e}"
        );
        let m = s.render();
        for line in [
            "route_agent_polls_total{result=\"ok\"} 1\n",
            "route_agent_polls_total{result=\"relay_unreachable\"} 1\n",
            "route_agent_polls_total{result=\"no_next_hop\"} 1\n",
            "route_agent_polls_total{result=\"install_failed\"} 2\n",
            "route_agent_routes_installed 4\n",
            "route_agent_ready 0\n",
        ] {
            assert!(m.contains(line), "{line:?} not in\n{m}");
        }
    }

    /// `GET path` over plain HTTP; `(status, body)`.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("answered in time")
            .expect("read");
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            code,
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b)
                .unwrap_or("")
                .into(),
        )
    }

    /// Polls `path` until it answers `code`; the last body.
    async fn until(addr: SocketAddr, path: &str, code: u16) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (c, body) = get(addr, path).await;
            if c == code {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path}: still {c} {body:?}, want {code}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agent against a real relay (no sessions, so no route to add:
    /// `ip` only reads this host's routes of a protocol number nothing
    /// else uses), its status endpoint over a real socket: ready once a
    /// poll synced, not ready once the relay has been gone for
    /// [`NOT_READY_AFTER`] polls, alive throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_status_endpoint_follows_the_agents_polls() {
        relay_transport::tls::install_default_provider();
        let pki = relay_transport::devcerts::DevPki::generate(&["localhost"], &[]).expect("pki");
        let relay = crate::Relay::spawn(crate::RelayConfig::loopback(
            pki.relay_material().expect("material"),
        ))
        .await
        .expect("relay");
        let cfg = crate::agent::AgentConfig {
            admin: relay.admin_addr().expect("admin"),
            token: None,
            tls: None,
            interval: Duration::from_millis(50),
            proto: 237,
        };
        let status = Arc::<AgentStatus>::default();
        let stop = CancellationToken::new();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let served = tokio::spawn(serve(l, status.clone(), stop.clone()));
        let toward = crate::agent::Toward::Via("127.0.0.1".parse().expect("ip"));
        let agent = tokio::spawn(crate::agent::run_with_status(
            cfg,
            toward,
            stop.clone(),
            status.clone(),
        ));
        let body = until(addr, "/readyz", 200).await;
        assert!(
            body.starts_with("ready: 0 routes in step with the relay"),
            "{body}"
        );
        let (code, m) = get(addr, "/metrics").await;
        assert_eq!(code, 200, "{m}");
        assert!(
            m.contains("route_agent_ready 1\n") && m.contains("route_agent_routes_installed 0\n"),
            "{m}"
        );
        assert!(
            !m.contains("route_agent_polls_total{result=\"ok\"} 0\n"),
            "{m}"
        );
        assert!(
            !m.contains("route_agent_last_sync_timestamp_seconds 0.000\n"),
            "{m}"
        );
        // The relay goes away: not ready, saying why; still alive.
        relay.shutdown(Duration::ZERO).await;
        let body = until(addr, "/readyz", 503).await;
        // Three or more, as the agent may poll again meanwhile.
        assert!(
            body.contains(" polls in a row failed since the last sync"),
            "{body}"
        );
        assert!(body.contains("last failure: relay_unreachable: "), "{body}");
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        let (_, m) = get(addr, "/metrics").await;
        assert!(m.contains("route_agent_ready 0\n"), "{m}");
        assert!(
            !m.contains("route_agent_polls_total{result=\"relay_unreachable\"} 0\n"),
            "{m}"
        );
        stop.cancel();
        agent.await.expect("agent");
        served.await.expect("status endpoint");
    }
}
