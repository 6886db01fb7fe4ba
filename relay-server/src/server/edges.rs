//! The edges' way in: binding the QUIC endpoint and its TCP fallback on
//! one port, and the accept loops that admit each handshake (see
//! `Shared::admit`) before serving a tunnel session or a certificate
//! bootstrap. Separate from the supervisor that starts and stops them.

use std::sync::Arc;

use relay_transport::conn::accept_until;
use relay_transport::reload::ReloadableServerTls;
use relay_transport::{quic, TunnelConn};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::{bind_err, Shared, StartError};
use crate::config::RelayConfig;
use crate::handshake::serve_connection;

pub(super) async fn accept_quic(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) -> &'static str {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => {
                refuse_while_draining(&endpoint, &shared).await;
                return "quic";
            }
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return "quic",
            },
        };
        // Admission before any work for the handshake (see Shared::admit).
        let Some(admitted) = shared.admit() else {
            shared
                .metrics
                .reject(relay_protocol::RejectReason::Overloaded);
            debug!(remote = %incoming.remote_address(), "handshake queue full; refusing");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        sessions.spawn(async move {
            let Some(permit) = admitted.await else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                incoming.refuse();
                return;
            };
            let remote = incoming.remote_address();
            let conn =
                match tokio::time::timeout(shared.cfg.limits.handshake_timeout, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        shared.metrics.handshake_failed("tls");
                        info!(%remote, error = %e, "QUIC/TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        shared.metrics.handshake_failed("timeout");
                        debug!(%remote, "QUIC/TLS handshake timed out");
                        return;
                    }
                };
            serve_edge(TunnelConn::Quic(conn), shared, permit).await;
        });
    }
}

/// Answers every new QUIC attempt with a refusal until the endpoint
/// closes (the drain's end). Left unanswered, an edge's Initial would wait
/// for QUIC's retransmission (1 s, then 2 s more) and an edge told to
/// reconnect would spend its first attempts waiting; refused, it learns at
/// once and, having had the GOAWAY, retries at a short pace until a relay
/// answers (`edge-client` `backoff`), without growing its backoff.
async fn refuse_while_draining(endpoint: &quinn::Endpoint, shared: &Shared) {
    while let Some(incoming) = endpoint.accept().await {
        shared
            .metrics
            .reject(relay_protocol::RejectReason::ShuttingDown);
        incoming.refuse();
    }
}

/// A tunnel session, or (by ALPN) a certificate bootstrap request; both
/// count against the handshake permits while they run.
async fn serve_edge(
    conn: TunnelConn,
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    if conn.alpn().as_deref() == Some(relay_protocol::bootstrap::BOOTSTRAP_ALPN) {
        crate::bootstrap::serve_bootstrap(conn, shared).await;
        drop(permit);
    } else {
        serve_connection(conn, shared, permit).await;
    }
}

/// Binds the QUIC endpoint and, with the TCP fallback on, a TCP listener
/// on the same address and port number, so one Service port serves both
/// (or on `tcp_fallback_port`, when set). With port 0, the ephemeral UDP
/// port may be taken on TCP: try another, a bounded number of times.
pub(super) async fn bind_quic_and_tcp(
    cfg: &RelayConfig,
    tls: &Arc<ReloadableServerTls>,
) -> Result<(quinn::Endpoint, Option<tokio::net::TcpListener>), StartError> {
    let attempts = if cfg.quic_listen.port() == 0 { 32 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let rustls = quic::relay_server_tls_with(tls, cfg.bootstrap.is_some())?;
        let endpoint = quic::server_endpoint_with(cfg.quic_listen, rustls, &cfg.tls, &cfg.quic)
            .map_err(bind_err("quic", cfg.quic_listen))?;
        if !cfg.tcp_fallback {
            return Ok((endpoint, None));
        }
        let mut addr = endpoint
            .local_addr()
            .map_err(bind_err("quic", cfg.quic_listen))?;
        if let Some(port) = cfg.tcp_fallback_port {
            addr.set_port(port);
        }
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                // Set on the listener: the SYN-ACK announces it and every
                // accepted connection inherits it (both directions then
                // use segments no larger, see RelayConfig::tcp_fallback_mss).
                if let Some(mss) = cfg.tcp_fallback_mss {
                    relay_transport::tcp::set_listener_mss(&l, mss)
                        .map_err(bind_err("tcp fallback (TCP_MAXSEG)", addr))?;
                }
                return Ok((endpoint, Some(l)));
            }
            // Another try helps only where the TCP port follows an
            // ephemeral QUIC port.
            Err(e) if cfg.tcp_fallback_port.is_some() => {
                return Err(bind_err("tcp fallback", addr)(e))
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.unwrap_or_else(|| (cfg.quic_listen, std::io::Error::other("no attempt")));
    Err(bind_err("tcp fallback", addr)(e))
}

pub(super) async fn accept_tcp(
    l: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) -> &'static str {
    loop {
        let Some((sock, remote)) = accept_until(&stop, "tcp fallback", || l.accept()).await else {
            return "tcp fallback";
        };
        // Same admission control as QUIC handshakes.
        let Some(admitted) = shared.admit() else {
            shared
                .metrics
                .reject(relay_protocol::RejectReason::Overloaded);
            drop(sock);
            continue;
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        sessions.spawn(async move {
            let Some(permit) = admitted.await else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                return;
            };
            let limit = shared.cfg.limits.handshake_timeout;
            match relay_transport::tcp::accept(&acceptor, sock, remote, limit).await {
                Ok(conn) => serve_edge(conn, shared, permit).await,
                Err(e) if e.closed_early => {
                    // A load balancer's health check, or a scanner.
                    shared.metrics.handshake_failed("closed");
                    debug!(%remote, error = %e.lost, "TLS/TCP connection closed before TLS completed");
                }
                Err(e) => {
                    shared.metrics.handshake_failed("tls");
                    info!(%remote, error = %e.lost, "TLS/TCP handshake failed");
                }
            }
        });
    }
}
