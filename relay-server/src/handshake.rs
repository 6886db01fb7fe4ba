//! The handshake: identity from the client certificate, the hello checked
//! against the directory (what the node may claim), registration, and the
//! accepting reply. Every step is bounded by the handshake timeout.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::codec::{self, decode, peek_version, read_frame_bytes, write_frame};
use relay_protocol::{
    capability, close_code, Cidr, ClientHello, FrameError, HelloReply, RejectReason, Rejection,
    ServerHello, ServerHelloExt, PROTOCOL_VERSION,
};
use relay_transport::log_sample::{self, LogSampler};
use relay_transport::tls::cert_names_node;
use relay_transport::{SendHalf, TunnelConn};
use tracing::{debug, info, Instrument};

use crate::directory::{Lookup, NodeEntry};
use crate::metrics::REJECT_REASONS;
use crate::routefeed::RouteFeed;
use crate::server::Shared;
use crate::session::{note_cut, run_session, supersede, visible, ControlParts, SessionHandle};

/// Why a handshake ended without a session.
enum HandshakeError {
    /// Typed refusal, sent to the edge.
    Rejected(RejectReason, String),
    /// Nothing could be sent (timeout, transport failure).
    Failed(&'static str, String),
}

fn reject(reason: RejectReason, msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Rejected(reason, msg.into())
}

/// Validates a hello against identity and policy; returns it on success.
fn check_hello(
    shared: &Shared,
    conn: &TunnelConn,
    body: &[u8],
) -> Result<ClientHello, HandshakeError> {
    let hello: ClientHello = match decode(body) {
        Ok(h) => h,
        Err(e) => {
            return Err(match peek_version(body) {
                Some(v) if v != PROTOCOL_VERSION => reject(
                    RejectReason::UnsupportedVersion,
                    format!(
                        "protocol version {v} not supported; this relay speaks {PROTOCOL_VERSION}"
                    ),
                ),
                _ => reject(RejectReason::Malformed, format!("undecodable hello: {e}")),
            })
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(reject(
            RejectReason::UnsupportedVersion,
            format!(
                "protocol version {} not supported; this relay speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    let certs = conn.peer_certs();
    let named = certs
        .first()
        .is_some_and(|leaf| cert_names_node(leaf, &hello.node));
    if !named {
        return Err(reject(
            RejectReason::IdentityMismatch,
            format!("client certificate does not name node {:?}", hello.node),
        ));
    }
    if shared.is_shutting_down() {
        return Err(reject(RejectReason::ShuttingDown, "relay is shutting down"));
    }
    Ok(hello)
}

/// What an accepted session serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Prefixes routed to the session.
    pub served: Vec<Cidr>,
    /// The node's own address for `CONNECT <node>:<port>`.
    pub primary: Option<IpAddr>,
}

/// Decides what a session serves from the node's directory entry and what
/// its edge advertised. An edge that advertises nothing and lets the relay
/// decide ([`capability::SERVED_ROUTES`]) serves everything its entry
/// allows; otherwise every advertised prefix must be allowed. Ambiguous
/// host prefixes (shared with another node) are never served by address,
/// and neither are a cloud node's host prefixes: a cloud Node's addresses
/// are not vetted as an edge's are (its kubelet writes them; see
/// `k8s/node_addresses.rs`), so a node that holds a session while it looks
/// like a cloud node (an edge that dropped its edge labels, or one before
/// its first connection) serves its pod CIDRs only.
pub fn decide_claim(
    entry: &NodeEntry,
    advertised: &[Cidr],
    primary: Option<IpAddr>,
    relay_decides: bool,
) -> Result<Claim, (RejectReason, String)> {
    // Left out rather than refused: an edge may well advertise its own
    // address, and the session still serves the rest.
    let left_out = |c: &Cidr| {
        entry.ambiguous.contains(c) || entry.refused.contains(c) || (entry.cloud && c.is_host())
    };
    for r in advertised.iter().filter(|r| !left_out(r)) {
        if !entry.allowed.iter().any(|a| a.contains_cidr(r)) {
            return Err((
                RejectReason::RouteNotAllowed,
                format!("may not serve {r} (allowed: {:?})", entry.allowed),
            ));
        }
    }
    if let Some(p) = primary {
        if !advertised.iter().any(|r| r.contains(&p)) {
            return Err((
                RejectReason::Malformed,
                format!("primary address {p} is not inside the advertised routes"),
            ));
        }
    }
    let served = if advertised.is_empty() && relay_decides {
        entry.routable()
    } else {
        advertised.to_vec()
    };
    let served = served.into_iter().filter(|c| !left_out(c)).collect();
    Ok(Claim {
        served,
        primary: primary.or(entry.primary),
    })
}

/// Asks the directory what `hello.node` may claim (waiting, bounded, for a
/// directory that has not loaded yet) and decides the session's routes.
async fn claim(shared: &Shared, hello: &ClientHello) -> Result<Claim, HandshakeError> {
    let dir = shared.directory.as_ref();
    let mut lookup = dir.lookup(&hello.node);
    if lookup == Lookup::NotSynced
        && crate::directory::wait_synced(dir, shared.cfg.limits.handshake_timeout / 2).await
    {
        lookup = dir.lookup(&hello.node);
    }
    let entry = match lookup {
        Lookup::Known(e) => e,
        Lookup::NotSynced => {
            return Err(reject(
                RejectReason::Overloaded,
                format!("the {} node directory has not loaded yet", dir.source()),
            ))
        }
        Lookup::Unknown => {
            // Older edges do not know the reason; they get one they know.
            let reason = if hello.capabilities & capability::EXTENSIBLE != 0 {
                RejectReason::UnknownNode
            } else {
                RejectReason::RouteNotAllowed
            };
            let msg = match dir.source() {
                "static" => format!(
                    "unknown node {:?}: not in the relay's [nodes] table",
                    hello.node
                ),
                _ => format!("unknown node {:?}: no Node object of that name", hello.node),
            };
            return Err(reject(reason, msg));
        }
    };
    let relay_decides = hello.capabilities & capability::SERVED_ROUTES != 0;
    decide_claim(&entry, &hello.routes, hello.primary_addr, relay_decides)
        .map_err(|(r, m)| reject(r, format!("node {}: {m}", hello.node)))
}

/// Runs the handshake on a fresh connection and, if accepted, the session
/// until it ends. Every step is bounded by the handshake timeout.
/// `permit` (the handshake permit, and the place of the edge's address)
/// is held until the hello is answered.
pub(crate) async fn serve_connection(conn: TunnelConn, shared: Arc<Shared>, permit: impl Send) {
    let remote = conn.remote_addr();
    let hs_timeout = shared.cfg.limits.handshake_timeout;
    let result = tokio::time::timeout(hs_timeout, handshake(&conn, &shared)).await;
    // The handshake is over either way: free the slot before a rejected edge
    // gets its grace period or an accepted one runs for days.
    drop(permit);
    let (handle, control) = match result {
        Ok(Ok(v)) => v,
        Ok(Err((HandshakeError::Rejected(reason, msg), send))) => {
            shared.metrics.reject(reason);
            log_rejected(remote, reason, &msg);
            if let Some(mut send) = send {
                let reply = HelloReply::Rejected(Rejection {
                    reason,
                    message: msg,
                    relay_version: PROTOCOL_VERSION,
                    retry_after_ms: reason.is_transient().then_some(1000),
                });
                // Give the edge a bounded moment to read the reason before
                // the close discards anything still in flight.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = write_frame(&mut send, &reply).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
                    conn.closed().await
                })
                .await;
            }
            conn.close(close_code::REJECTED, reason.as_str());
            return;
        }
        Ok(Err((HandshakeError::Failed(kind, msg), _))) => {
            shared.metrics.handshake_failed(kind);
            debug!(%remote, kind, %msg, "handshake failed");
            conn.close(close_code::PROTOCOL, kind);
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failed("timeout");
            debug!(%remote, "handshake timed out");
            conn.close(close_code::PROTOCOL, "handshake timeout");
            return;
        }
    };
    let span = tracing::info_span!("session", node = %handle.node, session = handle.session_id, gen = handle.generation);
    run_session(handle, control, shared).instrument(span).await;
}

/// One log sampler per rejection reason (in `metrics::REJECT_REASONS`
/// order, then one for reasons of a newer protocol): a storm of one reason
/// (edges refused `overloaded` during a reconnect storm) must not hide
/// another (one edge's `identity_mismatch`).
static REJECTED_LOG: [LogSampler; REJECT_REASONS.len() + 1] =
    [const { LogSampler::new(log_sample::WINDOW) }; REJECT_REASONS.len() + 1];

/// Logs a rejected handshake, sampled per reason: an edge refused retries
/// (once a second and more across a fleet), and this line is written once
/// per connection. The message names the node where it is known.
fn log_rejected(remote: std::net::SocketAddr, reason: RejectReason, msg: &str) {
    let i = REJECT_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REJECT_REASONS.len());
    let Some(s) = REJECTED_LOG[i].admit(log_sample::now()) else {
        return;
    };
    let reason = reason.as_str();
    if s.suppressed == 0 {
        info!(%remote, reason, %msg, "handshake rejected");
    } else {
        info!(
            %remote, reason, %msg, suppressed = s.suppressed,
            "handshake rejected (and {} more for {reason} in the last {} s)",
            s.suppressed,
            s.since.as_secs()
        );
    }
}

/// Removes a provisional registration unless committed (see
/// [`handshake`]), and closes the session a planned move left draining
/// for it: the edge never got its answer and stays on that one, which
/// takes no new streams (see [`SessionHandle::close_predecessor`]).
struct Registration<'a> {
    shared: &'a Shared,
    handle: &'a Arc<SessionHandle>,
    committed: bool,
}

impl Registration<'_> {
    fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let h = self.handle;
            self.shared.registry.remove(&h.node, h.generation);
            h.close_predecessor();
        }
    }
}

#[allow(clippy::type_complexity)]
async fn handshake(
    conn: &TunnelConn,
    shared: &Arc<Shared>,
) -> Result<(Arc<SessionHandle>, ControlParts), (HandshakeError, Option<SendHalf>)> {
    let mut control = conn
        .accept_bi()
        .await
        .map_err(|e| (HandshakeError::Failed("protocol", e.to_string()), None))?;
    // Pings, pongs and route updates go ahead of bulk data in our send
    // buffers (a pong queued behind a download looks like a dead path).
    control
        .send
        .set_priority(relay_transport::conn::CONTROL_PRIORITY);
    let body = match read_frame_bytes(&mut control.recv, codec::MAX_FRAME_LEN).await {
        Ok(b) => b,
        Err(e @ FrameError::TooLarge { .. }) => {
            return Err((
                reject(RejectReason::Malformed, e.to_string()),
                Some(control.send),
            ));
        }
        Err(e) => return Err((HandshakeError::Failed("protocol", e.to_string()), None)),
    };
    let hello = match check_hello(shared, conn, &body) {
        Ok(h) => h,
        Err(e) => return Err((e, Some(control.send))),
    };
    // The directory's version before its lookup: a change after it that
    // a walk of the live sessions handled before this one registered is
    // looked at again below (see `follow_session`).
    let directory_version = *shared.directory.subscribe().borrow();
    let claim = match claim(shared, &hello).await {
        Ok(c) => c,
        Err(e) => {
            if let HandshakeError::Rejected(reason, msg) = &e {
                shared.status.rejected(&hello.node, reason.as_str(), msg);
            }
            return Err((e, Some(control.send)));
        }
    };
    // The claim may have waited for the directory (up to half the
    // handshake timeout): a shutdown that began meanwhile refuses it here,
    // as `check_hello` would have, rather than register a session the
    // shutdown's drain does not know of.
    if shared.is_shutting_down() {
        return Err((
            reject(RejectReason::ShuttingDown, "relay is shutting down"),
            Some(control.send),
        ));
    }
    let generation = shared.next_generation();
    let (handle, control_rx) = SessionHandle::new(&hello, &claim, conn, shared, generation);
    match shared.registry.register(
        handle.clone(),
        claim.served.clone(),
        shared.cfg.limits.max_sessions,
    ) {
        // Drained instead when the edge planned the move (see `supersede`).
        Ok(Some(old)) => supersede(&old, &handle, shared),
        Ok(None) => {}
        Err(e) => {
            shared
                .status
                .rejected(&hello.node, e.reason.as_str(), &e.message);
            return Err((reject(e.reason, e.message), Some(control.send)));
        }
    }
    // Until the edge has its answer, the registration is provisional: if
    // this future is dropped (the handshake timeout fires during the
    // write) or fails, the guard removes it, so no zombie session stays
    // registered with routes nobody serves.
    let registration = Registration {
        shared,
        handle: &handle,
        committed: false,
    };
    let mut feed = RouteFeed::new(&hello.node, hello.capabilities);
    let cloud = shared.policy.cloud_ranges();
    feed.at_epoch(shared.policy.epoch());
    let tunnel_routes = feed.hello_routes(&shared.registry, cloud, visible(shared, &hello.node));
    note_cut(shared, &feed);
    let accepted = HelloReply::Accepted(ServerHello {
        session_id: handle.session_id,
        generation,
        relay_id: shared.cfg.relay_id.clone(),
        keepalive_ms: shared.cfg.quic.keepalive.as_millis() as u32,
        idle_timeout_ms: shared.cfg.quic.idle_timeout.as_millis() as u32,
        tunnel_routes,
        capabilities: capability::ALL,
    });
    let reply = match hello_reply(&accepted, &claim, hello.capabilities) {
        Ok(r) => r,
        Err(e) => return Err((HandshakeError::Failed("protocol", e.to_string()), None)),
    };
    if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut control.send, &reply).await {
        return Err((HandshakeError::Failed("protocol", e.to_string()), None));
    }
    registration.commit();
    // A shutdown that began after the check above took its list of
    // sessions to drain before this one registered (or after: then this
    // drain is refused as a second one): drained here, the edge gets its
    // GOAWAY and the shutdown does not wait out its whole grace for it.
    if let Some(grace) = shared.shutdown_grace() {
        handle.drain(grace, "relay shutting down");
    }
    // A directory change between the claim's lookup and the registration
    // may have been walked without this session: it follows now.
    if *shared.directory.subscribe().borrow() != directory_version {
        crate::follow::follow_session(shared, &handle);
    }
    shared.metrics.sessions_accepted.fetch_add(1, Relaxed);
    shared.metrics.accepted_on(handle.conn.kind().as_str());
    Ok((handle, (control, control_rx, feed)))
}

/// The accepting hello frame: the reply, then (for an edge that asked for
/// it) the [`ServerHelloExt`] saying what it serves, in one frame.
fn hello_reply(
    accepted: &HelloReply,
    claim: &Claim,
    edge_capabilities: u32,
) -> Result<Vec<u8>, relay_protocol::CodecError> {
    let mut body = codec::encode(accepted)?;
    if edge_capabilities & capability::SERVED_ROUTES != 0 {
        body.extend(codec::encode(&ServerHelloExt {
            served_routes: claim.served.clone(),
            primary_addr: claim.primary,
        })?);
    }
    if body.len() > codec::MAX_FRAME_LEN {
        return Err(relay_protocol::CodecError::TooLarge {
            len: body.len(),
            max: codec::MAX_FRAME_LEN,
        });
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn entry() -> NodeEntry {
        NodeEntry {
            allowed: vec![
                c("10.244.7.0/24"),
                c("192.168.1.10/32"),
                c("192.168.9.9/32"),
            ],
            ambiguous: vec![c("192.168.1.10/32")],
            refused: Vec::new(),
            refused_ranges: Vec::new(),
            primary: Some("192.168.1.10".parse().unwrap()),
            hostnames: Vec::new(),
            cloud: false,
            zone: None,
        }
    }

    #[test]
    fn claims_from_the_directory_and_from_the_edge() {
        // The edge advertises nothing and lets the relay decide: everything
        // routable (the shared address is not), primary from the directory.
        let got = decide_claim(&entry(), &[], None, true).unwrap();
        assert_eq!(got.served, [c("10.244.7.0/24"), c("192.168.9.9/32")]);
        assert_eq!(got.primary, Some("192.168.1.10".parse().unwrap()));
        // An older edge that advertises nothing serves nothing.
        assert!(decide_claim(&entry(), &[], None, false)
            .unwrap()
            .served
            .is_empty());
        // An edge advertising a subset gets it, minus the ambiguous address.
        let adv = [c("10.244.7.0/25"), c("192.168.1.10/32")];
        let got =
            decide_claim(&entry(), &adv, Some("192.168.1.10".parse().unwrap()), true).unwrap();
        assert_eq!(got.served, [c("10.244.7.0/25")]);
        // Outside what the node may claim: refused, typed.
        let (r, msg) = decide_claim(&entry(), &[c("10.244.8.0/24")], None, true).unwrap_err();
        assert_eq!(r, RejectReason::RouteNotAllowed);
        assert!(msg.contains("10.244.8.0/24"), "{msg}");
        // A primary outside the advertised routes is malformed.
        let (r, _) = decide_claim(
            &entry(),
            &[c("10.244.7.0/24")],
            Some("10.0.0.1".parse().unwrap()),
            true,
        )
        .unwrap_err();
        assert_eq!(r, RejectReason::Malformed);
    }

    /// A node that looks like a cloud node serves its pod CIDRs through a
    /// session, never its (unvetted) addresses.
    #[test]
    fn a_cloud_nodes_session_serves_no_address() {
        let cloud = NodeEntry {
            cloud: true,
            ..entry()
        };
        let got = decide_claim(&cloud, &[], None, true).unwrap();
        assert_eq!(got.served, [c("10.244.7.0/24")]);
        let adv = [c("10.244.7.0/24"), c("192.168.9.9/32")];
        let got = decide_claim(&cloud, &adv, None, true).unwrap();
        assert_eq!(got.served, [c("10.244.7.0/24")], "left out, not refused");
    }

    /// An address the vetting refused is left out of what an edge that
    /// advertises it serves; the session is not refused for it.
    #[test]
    fn a_refused_address_an_edge_advertises_is_left_out() {
        let e = NodeEntry {
            refused: vec![c("10.96.0.1/32")],
            ..entry()
        };
        let adv = [c("10.244.7.0/24"), c("10.96.0.1/32")];
        let got = decide_claim(&e, &adv, Some("10.96.0.1".parse().unwrap()), true).unwrap();
        assert_eq!(got.served, [c("10.244.7.0/24")]);
        assert!(decide_claim(&e, &[c("10.96.0.2/32")], None, true).is_err());
    }

    /// Rejections are logged sampled, per reason: 1,000 edges refused
    /// `overloaded` within 20 s write one line per 10 s window, and one
    /// edge's `route_conflict` among them is still logged with its node.
    #[tokio::test(start_paused = true)]
    async fn rejections_are_sampled_per_reason() {
        let (out, _guard) = relay_transport::test_log::Captured::start();
        let remote: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
        for i in 0..1_000 {
            log_rejected(remote, RejectReason::Overloaded, "relay at max_sessions");
            if i == 500 {
                log_rejected(
                    remote,
                    RejectReason::RouteConflict,
                    "node edge-7: 10.244.7.0/24 is served by edge-3",
                );
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        let overloaded = lines
            .iter()
            .filter(|l| l.contains("reason=\"overloaded\""))
            .count();
        assert_eq!(overloaded, 2, "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l
                    .contains("handshake rejected (and 499 more for overloaded in the last 10 s)")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("reason=\"route_conflict\"") && l.contains("node edge-7")),
            "{text}"
        );
        assert_eq!(lines.len(), 3, "{text}");
    }

    /// A handshake that registered its session and then never finished
    /// (its bound fired during the final write, the edge went away, the
    /// task was cancelled: the future is dropped wherever it was) leaves
    /// no session behind: the guard removes it. Committed, it stays.
    #[tokio::test]
    async fn a_registration_dropped_before_commit_leaves_no_session() {
        use crate::session::tests::{bench, register};
        let (relay, pki) = crate::admin::tests::relay_configured(2, |_| {}).await;
        let shared = relay.shared().clone();
        let caps = relay_protocol::capability::ALL;
        let dropped = bench(&shared, &pki, "edge-0", caps, vec![c("10.99.0.1/32")]).await;
        register(&shared, &dropped.handle);
        assert!(shared.registry.get("edge-0").is_some());
        // As a cancelled handshake future drops its guard.
        drop(Registration {
            shared: &shared,
            handle: &dropped.handle,
            committed: false,
        });
        assert!(
            shared.registry.get("edge-0").is_none(),
            "a zombie session stayed registered"
        );
        let kept = bench(&shared, &pki, "edge-1", caps, vec![c("10.99.0.2/32")]).await;
        register(&shared, &kept.handle);
        Registration {
            shared: &shared,
            handle: &kept.handle,
            committed: false,
        }
        .commit();
        assert!(
            shared.registry.get("edge-1").is_some(),
            "a committed one went"
        );
    }
}
