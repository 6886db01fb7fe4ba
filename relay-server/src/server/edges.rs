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
        // Under load an address must be proven before it may wait for a
        // permit (see Shared::handshakes_busy): a stateless Retry costs us
        // no state, and the edge one round trip.
        if shared.handshakes_busy() && !incoming.remote_address_validated() {
            shared.metrics.handshake_failed("retry");
            if let Err(e) = incoming.retry() {
                debug!(error = %e, "QUIC retry");
            }
            continue;
        }
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
    let pending = Arc::new(PerSource::default());
    loop {
        let Some((sock, remote)) = accept_until(&stop, "tcp fallback", || l.accept()).await else {
            return "tcp fallback";
        };
        // A TCP peer cannot spoof its address, so each may hold only so
        // many handshakes at once (QUIC's answer is a Retry, above).
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
            // The place is for a pending handshake only: held through the
            // session, it capped each address at 64 sessions (the 65th
            // edge behind one carrier NAT address never got in).
            drop(held);
            match accepted {
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

/// How long a TCP-fallback connection may stay silent before its TLS hello
/// (an edge sends it as soon as it connected; 3 s spans a satellite
/// round trip several times).
const FIRST_BYTES: std::time::Duration = std::time::Duration::from_secs(3);

/// Handshakes one address may have pending on the TCP fallback at once:
/// a quarter of the default permits, so that one address cannot fill the
/// queue, while a site's edges behind one carrier NAT address (hundreds,
/// reconnecting together after a relay restart) still get in at that
/// rate, the rest retrying after their backoff.
const PER_SOURCE: u32 = 64;

/// The TCP-fallback handshakes pending per source address (an IPv6
/// address by its /64, what one site gets).
#[derive(Default)]
struct PerSource(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

/// One pending handshake of a source, counted until dropped.
struct SourceHeld(Arc<PerSource>, std::net::IpAddr);

impl PerSource {
    fn key(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
            v4 => v4,
        }
    }

    /// A place for one more handshake from `ip`, unless it has
    /// [`PER_SOURCE`] pending.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceHeld> {
        let key = Self::key(ip);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceHeld(self.clone(), key))
    }
}

impl Drop for SourceHeld {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address holds at most [`PER_SOURCE`] places, released as its
    /// handshakes end; others are unaffected; an IPv6 site counts by /64.
    #[test]
    fn one_address_cannot_hold_every_place() {
        let p = Arc::new(PerSource::default());
        let a: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let held: Vec<SourceHeld> = (0..PER_SOURCE).map(|_| p.take(a).unwrap()).collect();
        assert!(p.take(a).is_none());
        assert!(p.take("198.51.100.8".parse().unwrap()).is_some());
        drop(held);
        assert!(p.take(a).is_some());
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let site: Vec<SourceHeld> = (0..PER_SOURCE)
            .map(|i| p.take(v6(&format!("2001:db8:1:2::{i:x}"))).unwrap())
            .collect();
        assert!(p.take(v6("2001:db8:1:2::ffff")).is_none());
        assert!(p.take(v6("2001:db8:1:3::1")).is_some());
        drop(site);
        assert!(
            p.0.lock().unwrap().is_empty(),
            "released places are forgotten"
        );
    }
}
