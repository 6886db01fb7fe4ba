//! The edges' way in: binding the QUIC endpoint and its TCP fallback on
//! one port, and the accept loops that admit each handshake (see
//! `Shared::admit`) before serving a tunnel session or a certificate
//! bootstrap. Separate from the supervisor that starts and stops them.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_transport::conn::accept_until;
use relay_transport::log_sample::{self, LogSampler};
use relay_transport::reload::{ClientCertRefusal, RefusalCause, RefusalSlot, ReloadableServerTls};
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
            // Where the verifier says which certificate it refused, and
            // why: quinn starts the connection's TLS session here, and
            // the session keeps the slot (`reload::refused`).
            let refused = RefusalSlot::new();
            let connecting = match refused.enter(|| incoming.accept()) {
                Ok(c) => c,
                Err(e) => {
                    tls_failed(&shared, Via::Quic, remote, &e, None);
                    return;
                }
            };
            let conn = match tokio::time::timeout_at(deadline, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tls_failed(&shared, Via::Quic, remote, &e, refused.refusal());
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
        match relay_transport::listen::tcp(addr, relay_transport::listen::BACKLOG) {
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
            // The handshake verifies in this task: each poll enters the
            // connection's slot (`reload::refused`).
            let refused = RefusalSlot::new();
            let accepted = refused
                .scope(relay_transport::tcp::accept(&acceptor, sock, remote, limit))
                .await;
            match accepted {
                // The place is for a pending handshake only, up to the
                // hello's answer: held through the session, it capped each
                // address at 64 sessions (the 65th edge behind one carrier
                // NAT address never got in).
                Ok(conn) => serve_edge(conn, shared, (permit, held)).await,
                Err(e) if refused.refusal().is_some() => {
                    tls_failed(&shared, Via::Tcp, remote, &e.lost, refused.refusal());
                }
                Err(e) if e.closed_early => {
                    // A load balancer's health check, or a scanner.
                    shared.metrics.handshake_failed("closed");
                    debug!(%remote, error = %e.lost, "TLS/TCP connection closed before TLS completed");
                }
                Err(e) => tls_failed(&shared, Via::Tcp, remote, &e.lost, None),
            }
        });
    }
}

/// Which accept loop a TLS failure is from.
#[derive(Clone, Copy)]
enum Via {
    Quic,
    Tcp,
}

impl Via {
    /// The log line's subject (the lines' wording from before they were
    /// sampled, for whoever searches for it).
    fn what(self) -> &'static str {
        match self {
            Via::Quic => "QUIC/TLS",
            Via::Tcp => "TLS/TCP",
        }
    }
}

/// One log sampler per accept loop and cause ([`RefusalCause::ALL`] order,
/// then `tls`: everything else, a peer that aborted or spoke no TLS): a
/// fleet whose certificates expired must not hide one edge from an
/// unknown CA, nor the reverse.
static TLS_FAILED_LOG: [[LogSampler; RefusalCause::ALL.len() + 1]; 2] =
    [const { [const { LogSampler::new(log_sample::WINDOW) }; RefusalCause::ALL.len() + 1] }; 2];

/// An edge connection that failed its TLS handshake: counted by cause
/// (`relay_handshake_failures_total`: the certificate's [`RefusalCause`],
/// else `tls`), logged sampled per cause, naming the node the certificate
/// names (`node` when our CA signed it, `claimed_node` when anyone may
/// have written it), and, for a certificate our CA signed that is expired,
/// not valid yet or revoked, reported as that node's rejection while the
/// node has no session (an `EdgeSessionRejected` Event in Kubernetes,
/// within the node's Event budget). A name from a certificate no CA of ours signed is never
/// written anywhere but the log.
fn tls_failed(
    shared: &Shared,
    via: Via,
    remote: SocketAddr,
    error: &dyn std::fmt::Display,
    refused: Option<&ClientCertRefusal>,
) {
    let cause = refused.map(|r| r.cause);
    let reason = cause.map_or("tls", RefusalCause::as_str);
    shared.metrics.handshake_failed(reason);
    let (node, claimed_node) = match refused {
        Some(r) if r.authentic => (r.node.as_deref(), None),
        Some(r) => (None, r.node.as_deref()),
        None => (None, None),
    };
    let detail = refused.map(refusal_detail);
    // An Event only for a node without a session: our CA signing the
    // certificate shows which node it was issued to, not that the peer
    // holds its key (verified later in the handshake), so anyone with a
    // copy of a node's old or revoked certificate could otherwise spend
    // a healthy node's Event budget. A node that is connected is not the
    // one whose certificate failed.
    let event_for = node.filter(|n| shared.registry.get(n).is_none());
    if let (Some(node), Some(r), Some(detail)) = (event_for, refused, &detail) {
        shared.status.rejected(
            node,
            r.cause.as_str(),
            &format!("client certificate refused at TLS: {detail}"),
        );
    }
    let i = cause
        .and_then(|c| RefusalCause::ALL.iter().position(|x| *x == c))
        .unwrap_or(RefusalCause::ALL.len());
    let site = &TLS_FAILED_LOG[via as usize][i];
    let Some(s) = site.admit(log_sample::now()) else {
        return;
    };
    let what = via.what();
    if s.suppressed == 0 {
        info!(%remote, reason, node, claimed_node, detail = detail.as_deref(), %error, "{what} handshake failed");
    } else {
        info!(
            %remote, reason, node, claimed_node, detail = detail.as_deref(), %error,
            suppressed = s.suppressed,
            "{what} handshake failed (and {} more for {reason} in the last {} s)",
            s.suppressed,
            s.since.as_secs()
        );
    }
}

/// What was wrong with a refused certificate, in words that stay the same
/// from one attempt to the next (an Event's note, so repeats fold into one
/// series).
fn refusal_detail(r: &ClientCertRefusal) -> String {
    let at = |what: &str| match r.at {
        Some(t) => format!("{what} {}", humantime::format_rfc3339_seconds(t)),
        None => what.to_string(),
    };
    match r.cause {
        RefusalCause::Expired => at("certificate expired at"),
        RefusalCause::NotYetValid => at("certificate not valid before"),
        RefusalCause::Revoked => "certificate revoked (tls.crl)".to_string(),
        RefusalCause::UnknownCa => "certificate not issued by a CA of tls.client_ca".to_string(),
        RefusalCause::BadCertificate => {
            "certificate refused (key usage, encoding or algorithm)".to_string()
        }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use relay_transport::devcerts::DevPki;
    use relay_transport::issue::{node_key, NodeIssuer};
    use relay_transport::reload::crls_from_pem;
    use relay_transport::tls::TlsMaterial;

    use crate::{Relay, RelayConfig};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A client certificate for `node` from `ca`'s CA, issued at `issued`
    /// (valid from 5 minutes before it for an hour, as the bootstrap
    /// issues them), trusting `trust`'s CA for the relay; and its PEM.
    fn edge(ca: &DevPki, trust: &DevPki, node: &str, issued: SystemTime) -> (TlsMaterial, String) {
        let (c, k) = ca.ca_pem_pair();
        let issuer = NodeIssuer::from_pem(&c, &k, Duration::from_secs(3600)).expect("issuer");
        let (key, public) = node_key().expect("key");
        let cert = issuer.issue(node, &public, issued).expect("issue").cert_pem;
        let m = TlsMaterial::from_pem(&cert, &key, &trust.ca_cert).expect("material");
        (m, cert)
    }

    /// `relay_handshake_failures_total{reason}` now.
    fn failures(relay: &Relay, reason: &str) -> u64 {
        let text = relay.shared().metrics.render(0, 1);
        let prefix = format!("relay_handshake_failures_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn until_counted(relay: &Relay, reason: &str, n: u64) {
        let start = Instant::now();
        while failures(relay, reason) < n {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{reason} never reached {n}: {}",
                relay.shared().metrics.render(0, 1)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Dials the relay presenting `edge`'s certificate, over TLS/TCP or
    /// QUIC, and waits for the relay to close the connection (a TLS 1.3
    /// client is done before the relay has seen its certificate).
    async fn dial(relay: &Relay, edge: &TlsMaterial, tcp: bool) {
        let bound = Duration::from_secs(5);
        if tcp {
            let addr = relay.tcp_fallback_addr().expect("tcp fallback");
            let _ = relay_transport::tcp::connect(addr, "localhost", edge, 0, bound).await;
        } else {
            let ep = relay_transport::quic::client_endpoint(
                "127.0.0.1:0".parse().expect("addr"),
                edge,
                &relay_transport::QuicTuning::default(),
                0,
            )
            .expect("endpoint");
            if let Ok(c) = ep
                .connect(relay.quic_addr(), "localhost")
                .expect("dial")
                .await
            {
                let _ = tokio::time::timeout(bound, c.closed()).await;
            }
        }
    }

    fn lines_of<'a>(text: &'a str, what: &str, reason: &str) -> Vec<&'a str> {
        let reason = format!("reason=\"{reason}\"");
        text.lines()
            .filter(|l| l.contains(what) && l.contains(&reason))
            .collect()
    }

    /// Real handshakes over QUIC and TLS/TCP with refused client
    /// certificates: each counted by its cause, not `tls`, its log line
    /// naming the node (`node` when our CA signed the certificate,
    /// `claimed_node` when anyone may have written the name); then a
    /// flood of expired certificates (128 refused in about a second; a
    /// fleet of 10,000 retrying every 4 s is 2,500 a second) is logged a
    /// line per listener per window, the counter counting each. One test,
    /// not two: the lines' samplers are per process.
    #[tokio::test]
    async fn refused_certificates_are_counted_by_cause_named_and_logged_sampled() {
        let (out, _guard) = relay_transport::test_log::Captured::start();
        relay_transport::tls::install_default_provider();
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).expect("pki");
        let other = DevPki::generate(&["localhost"], &[]).expect("pki");
        let now = SystemTime::now();
        let (revoked, revoked_pem) = edge(&pki, &pki, "edge-3", now);
        let crl = pki.crl_revoking(&[&revoked_pem]).expect("crl");
        let mut cfg = RelayConfig::loopback(pki.relay_material().expect("material"));
        cfg.tls_crls = crls_from_pem(crl.as_bytes(), "crl").expect("crl");
        let relay = Relay::spawn(cfg).await.expect("relay");
        let server_cert = TlsMaterial::from_pem(&pki.relay.cert, &pki.relay.key, &pki.ca_cert);
        let cases = [
            (
                "cert_expired",
                edge(&pki, &pki, "edge-1", now - 2 * DAY).0,
                "node=\"edge-1\"",
            ),
            (
                "cert_not_yet_valid",
                edge(&pki, &pki, "edge-2", now + DAY).0,
                "node=\"edge-2\"",
            ),
            ("revoked", revoked, "node=\"edge-3\""),
            (
                "unknown_ca",
                edge(&other, &pki, "edge-1", now).0,
                "claimed_node=\"edge-1\"",
            ),
            (
                "bad_certificate",
                server_cert.expect("material"),
                "claimed_node=\"localhost\"",
            ),
        ];
        for (reason, m, named) in &cases {
            dial(&relay, m, false).await;
            until_counted(&relay, reason, 1).await;
            dial(&relay, m, true).await;
            until_counted(&relay, reason, 2).await;
            let text = out.text();
            for what in ["QUIC/TLS handshake failed", "TLS/TCP handshake failed"] {
                assert!(
                    lines_of(&text, what, reason)
                        .iter()
                        .any(|l| l.contains(named)),
                    "{reason} {named} over {what}:\n{text}"
                );
            }
        }
        let text = out.text();
        for l in text.lines().filter(|l| l.contains("handshake failed")) {
            let claimed = l.contains("claimed_node=");
            assert_eq!(
                claimed,
                l.contains("reason=\"unknown_ca\"") || l.contains("reason=\"bad_certificate\""),
                "{l}"
            );
            assert!(!(claimed && l.contains(" node=")), "{l}");
        }
        assert_eq!(failures(&relay, "tls"), 0);
        // An expired certificate from another CA: its name is no more
        // than claimed, and it is counted unknown_ca, not cert_expired.
        dial(
            &relay,
            &edge(&other, &pki, "edge-1", now - 2 * DAY).0,
            false,
        )
        .await;
        until_counted(&relay, "unknown_ca", 3).await;
        assert_eq!(failures(&relay, "cert_expired"), 2);

        // The flood: 60 expired certificates over each transport, 8 at a
        // time, all counted; at most a line per transport per window
        // (plus the one its first window may have left).
        const FLOOD: u64 = 60;
        let expired = edge(&pki, &pki, "edge-1", now - 2 * DAY).0;
        let before = out.text().lines().count();
        let start = Instant::now();
        for tcp in [false, true] {
            for _ in 0..FLOOD / 8 + 1 {
                futures::future::join_all((0..8).map(|_| dial(&relay, &expired, tcp))).await;
            }
        }
        let dialled = 2 * 8 * (FLOOD / 8 + 1);
        until_counted(&relay, "cert_expired", 2 + dialled).await;
        let windows = start.elapsed().as_secs() / 10 + 1;
        let text = out.text();
        let flood: Vec<&str> = text.lines().skip(before).collect();
        for what in ["QUIC/TLS handshake failed", "TLS/TCP handshake failed"] {
            let n = flood
                .iter()
                .filter(|l| l.contains(what) && l.contains("reason=\"cert_expired\""))
                .count() as u64;
            assert!(
                n <= windows,
                "{n} lines for {what} in {windows} windows:\n{text}"
            );
        }
        assert!(
            flood.len() as u64 <= 2 * windows,
            "{} lines for {dialled} refusals:\n{text}",
            flood.len()
        );
        relay.shutdown(Duration::from_secs(1)).await;
    }
}
