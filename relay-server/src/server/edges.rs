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

use super::per_source::{share, PerSource, QuicPending, SourceHeld};
use super::{bind_err, Shared, StartError};
use crate::config::RelayConfig;
use crate::handshake::serve_connection;

pub(super) async fn accept_quic(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) -> &'static str {
    let pending = QuicPending::new(shared.cfg.limits.max_concurrent_handshakes);
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
        // Under load, or once its address has its share of attempts
        // pending, an address must be proven before it may wait for a
        // permit (see Shared::handshakes_busy): a stateless Retry costs us
        // no state, and the edge one round trip. A proven address has two
        // shares of its own, and waits past them (see QuicPending).
        let remote = incoming.remote_address();
        // One bound for the whole attempt, from its arrival: waiting for
        // a place, for a permit, and the handshake.
        let deadline = tokio::time::Instant::now() + shared.cfg.limits.handshake_timeout;
        let place = if incoming.remote_address_validated() {
            let limit = PLACE_WAIT.min(shared.cfg.limits.handshake_timeout);
            match pending.proven_place(remote.ip(), limit) {
                Ok(place) => place,
                Err(()) => {
                    shared.metrics.handshake_failed("per_source");
                    debug!(%remote, "too many proven QUIC attempts waiting; refusing");
                    incoming.refuse();
                    continue;
                }
            }
        } else {
            // A place is taken only when not busy: busy, every unproven
            // attempt is asked for a Retry anyway.
            let held = (!shared.handshakes_busy())
                .then(|| pending.unproven.take(remote.ip()))
                .flatten();
            match held {
                Some(held) => Ok(held),
                None => {
                    shared.metrics.handshake_failed("retry");
                    if let Err(e) = incoming.retry() {
                        debug!(error = %e, "QUIC retry");
                    }
                    continue;
                }
            }
        };
        let shared = shared.clone();
        sessions.spawn(async move {
            let held = match place {
                Ok(held) => held,
                Err(wait) => match wait.await {
                    Some(held) => held,
                    None => {
                        shared.metrics.handshake_failed("per_source");
                        debug!(%remote, "no place for this address within the handshake timeout; refusing");
                        incoming.refuse();
                        return;
                    }
                },
            };
            // Admission before any work for the handshake (see
            // Shared::admit).
            let Some(admitted) = shared.admit() else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                debug!(%remote, "handshake queue full; refusing");
                incoming.refuse();
                return;
            };
            let Ok(Some(permit)) = tokio::time::timeout_at(deadline, admitted).await else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                incoming.refuse();
                return;
            };
            let conn = match tokio::time::timeout_at(deadline, incoming).await {
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
            serve_edge(TunnelConn::Quic(conn), shared, (permit, held)).await;
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
/// hold their handshake permit and their address's place (`permit`) until
/// the hello is answered, or the request: a client that completes TLS and
/// then sends nothing holds both for the handshake timeout, and its
/// address may not hold more than its share that way either.
async fn serve_edge(
    conn: TunnelConn,
    shared: Arc<Shared>,
    permit: (tokio::sync::OwnedSemaphorePermit, SourceHeld),
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
    let pending = PerSource::new(share(shared.cfg.limits.max_concurrent_handshakes));
    loop {
        let Some((sock, remote)) = accept_until(&stop, "tcp fallback", || l.accept()).await else {
            return "tcp fallback";
        };
        // A TCP peer cannot spoof its address, so each may hold only its
        // share of handshakes at once (QUIC asks for a proof first, above).
        let Some(held) = pending.take(remote.ip()) else {
            shared.metrics.handshake_failed("per_source");
            debug!(%remote, "too many handshakes pending from this address; closing");
            drop(sock);
            continue;
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        sessions.spawn(async move {
            // Its TLS hello first, bounded, before it may queue for a
            // permit: a connection that sends nothing holds no place an
            // edge could have.
            if tokio::time::timeout(FIRST_BYTES, sock.readable()).await.is_err() {
                shared.metrics.handshake_failed("silent");
                debug!(%remote, "nothing sent within {FIRST_BYTES:?}; closing");
                return;
            }
            // Same admission control as QUIC handshakes.
            let Some(admitted) = shared.admit() else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                return;
            };
            let Some(permit) = admitted.await else {
                shared
                    .metrics
                    .reject(relay_protocol::RejectReason::Overloaded);
                return;
            };
            let limit = shared.cfg.limits.handshake_timeout;
            let accepted = relay_transport::tcp::accept(&acceptor, sock, remote, limit).await;
            match accepted {
                // The place is for a pending handshake only, up to the
                // hello's answer: held through the session, it capped each
                // address at 64 sessions (the 65th edge behind one carrier
                // NAT address never got in).
                Ok(conn) => serve_edge(conn, shared, (permit, held)).await,
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

/// How long a proven QUIC attempt waits for one of its address's places:
/// an edge in `auto` mode gives QUIC 3 s (`quic_fallback_after`) before it
/// tries TCP, so an attempt kept waiting longer has most likely been
/// given up, and a handshake for it would be work for nobody. The cost:
/// an edge on QUIC alone (`transport = "quic"`, or moving sessions) would
/// have waited up to its handshake timeout, and is refused after 2 s
/// instead, into its backoff.
const PLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a TCP-fallback connection may stay silent before its TLS hello
/// (an edge sends it as soon as it connected; 3 s spans a satellite
/// round trip several times).
const FIRST_BYTES: std::time::Duration = std::time::Duration::from_secs(3);
