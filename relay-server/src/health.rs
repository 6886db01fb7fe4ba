//! The probe listener (`listen.health`, default `127.0.0.1:9470`): what
//! kubelet's liveness and readiness probes ask.
//!
//! It serves `/healthz` and `/readyz` only, with the admin API's own
//! handlers ([`crate::admin::probe_routes`]), so both listeners give the
//! same answers; the admin API keeps serving them too.
//!
//! Why a listener of its own: the admin API's bounds (64 TLS handshakes at
//! a time, each up to 10 s; 64 requests in flight) are shared by everyone
//! who reaches its port, and in the manifests that port is on every address
//! of the relay node (the route agents read it). 64 idle connections from
//! any pod held every handshake slot, kubelet's 3 s probe timed out, and
//! after three failures kubelet killed the relay and every edge dropped.
//! Here nothing of the admin port is shared: its own socket and accept
//! loop, its own few connection slots.
//!
//! Plain HTTP and loopback only ([`RelayConfig::validate`] refuses another
//! address): its slots are safe only where no one off the host can take
//! them. kubelet reaches it because the relay pod shares the host's network
//! namespace (`hostNetwork`; probes set `host: 127.0.0.1`). Its bounds:
//!
//! - at most [`MAX_CONNECTIONS`] connections; one more closes the oldest,
//!   so clients holding connections idle (even on loopback) never keep a
//!   new probe out: a probe sends its request at once and is answered long
//!   before that many newer connections arrive;
//! - one request per connection (no keep-alive), its head within
//!   [`HEAD_TIMEOUT`] and at most [`MAX_HEADER_BYTES`], the whole
//!   connection within [`CONNECTION_TIMEOUT`].
//!
//! [`RelayConfig::validate`]: crate::RelayConfig::validate

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

/// The probe listener's address when the configuration names none.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9470);

/// Most connections open at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 16;

/// Bound on reading a request head (kubelet sends it at once).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on a whole connection, whatever the client does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head accepted, in bytes (a probe's is about 150).
pub const MAX_HEADER_BYTES: usize = 4096;

/// Most header fields in a request.
const MAX_HEADERS: usize = 32;

/// Serves `/healthz` and `/readyz` on `l` until `stop`.
pub(crate) async fn serve(
    l: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    serve_router(l, crate::admin::probe_routes().with_state(shared), stop).await;
    "health"
}

/// Serves `app` on `l` until `stop` with this listener's bounds (see the
/// module docs): the relay's probes, and the route agent's status
/// endpoint (`crate::agent::status`), whose probes need the same
/// protection from idle clients.
pub(crate) async fn serve_router(l: TcpListener, app: axum::Router, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    // Open connections, oldest first.
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = relay_transport::conn::accept_until(&stop, "health", || l.accept()) => {
                let Some((sock, peer)) = accepted else { break };
                open.retain(|h| !h.is_finished());
                if open.len() >= MAX_CONNECTIONS {
                    if let Some(oldest) = open.pop_front() {
                        oldest.abort();
                        tracing::debug!(%peer, "probe listener full: closed its oldest connection");
                    }
                }
                let _ = sock.set_nodelay(true);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                open.push_back(conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .max_header_size(MAX_HEADER_BYTES)
                        .max_headers(MAX_HEADERS)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "probe connection ended"),
                        Err(_) => tracing::debug!(%peer, "probe connection timed out"),
                    }
                }));
            }
        }
    }
    // Every connection is bounded anyway; none needs to finish.
    conns.shutdown().await;
}
