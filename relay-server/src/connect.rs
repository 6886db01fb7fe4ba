//! HTTP CONNECT ingress: what kube-apiserver's `EgressSelectorConfiguration`
//! speaks with `proxyProtocol: HTTPConnect` (the Konnectivity contract):
//! `CONNECT host:port HTTP/1.1`, headers, a blank line; then, after
//! `HTTP/1.1 200`, raw bytes both ways.
//!
//! Every failure is answered at once with a status whose reason phrase says
//! why (Go's HTTP client, used by the apiserver, puts it in its error):
//! 400 malformed, 403 denied, 405 not CONNECT, 408 header too slow,
//! 431 header too large, 502 no session / refused / unreachable, 503 busy
//! or the cluster's Nodes and Services not loaded yet (after start-up, for
//! at most the dial timeout), 504 dial timeout.
//!
//! Every CONNECT connection leaves one audit line: a `tracing` event at
//! info with target `audit` (see [`Audit`]), so operators can route it to
//! its own sink (`RUST_LOG=info,audit=info`, or a JSON layer filtered on
//! the target).

use std::net::SocketAddr;
use std::sync::Arc;

use relay_protocol::{StreamReply, StreamStatus};
use relay_transport::conn::accept_until;
use relay_transport::splice::{splice, LocalStream};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

pub use crate::connect_head::{
    parse_authority, parse_request_head, Authority, HeadProblem, RequestHead,
};
use crate::connect_head::{read_head, HeadError};
use crate::policy::{canonical, Origin, Proto};
use crate::server::Shared;
use crate::services::NameLookup;
use crate::tunnel::{decide, open_on, route_any, route_backend, Route};
mod audit;
mod respond;
#[cfg(test)]
mod tests;
pub use audit::Audit;
use audit::{tls_identity, unix_identity, Client, Peer};
pub use respond::status_code;
use respond::{busy, refuse, respond, too_large};

/// Listen backlog of the CONNECT ingress (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). `TcpListener::bind` asks for
/// 128: a burst of clients larger than that (100,000 half-open CONNECTs
/// in `loadtest soak`) overflowed the accept queue, and a client that
/// sends nothing after its SYN then waited for the kernel's SYN-ACK
/// retransmissions (1, 3, 7, 15 s...) before the relay even saw it.
pub(crate) const CONNECT_BACKLOG: u32 = 4096;

/// Binds the CONNECT ingress's TCP listener with [`CONNECT_BACKLOG`]
/// (and `SO_REUSEADDR`, as `TcpListener::bind` does on Unix: a restarted
/// relay rebinds while its old connections are in TIME_WAIT; on `[::]`,
/// IPv4 as well: see [`relay_transport::listen`]).
pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    relay_transport::listen::tcp(addr, CONNECT_BACKLOG)
}

/// Accepts CONNECT clients on TCP, optionally behind TLS with client auth.
pub(crate) async fn serve_tcp(
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    tune_listener(&l);
    loop {
        let Some((sock, peer)) = accept_until(&stop, "connect", || l.accept()).await else {
            return "connect";
        };
        let shared = shared.clone();
        let tls = tls.clone();
        // Boxed: the task then holds a pointer, not the whole connection's
        // state machine, which tokio would otherwise copy several times
        // while spawning and finishing it (callgrind: ~55 % of the relay's
        // instructions per connection were those copies).
        tokio::spawn(Box::pin(serve_tcp_client(
            sock,
            Peer::Tcp(peer),
            tls,
            shared,
        )));
    }
}

/// One CONNECT client over TCP, from the permit to the end of the splice.
async fn serve_tcp_client(
    sock: tokio::net::TcpStream,
    peer: Peer,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let Ok(permit) = shared.connect_permits.clone().try_acquire_owned() else {
        let mut audit = Audit::new(Client::Addr(peer), peer);
        busy(sock, &shared, &mut audit).await;
        return;
    };
    match tls {
        None => handle(sock, peer, Audit::new(Client::Addr(peer), peer), &shared).await,
        Some(acceptor) => {
            let limit = shared.cfg.limits.connect_header_timeout;
            match tokio::time::timeout(limit, acceptor.accept(sock)).await {
                Ok(Ok(s)) => {
                    let client = tls_identity(s.get_ref().1.peer_certificates());
                    handle(s, peer, Audit::new(client, peer), &shared).await
                }
                Ok(Err(e)) if relay_transport::tcp::closed_early(&e) => {
                    // A load balancer's health check, or a scanner.
                    debug!(%peer, error = %e, "CONNECT closed before TLS completed");
                    let mut audit = Audit::new(Client::Addr(peer), peer);
                    audit.outcome = "closed_before_tls";
                }
                Ok(Err(e)) => {
                    relay_transport::sampled!(info, "CONNECT TLS handshake failed", %peer, error = %e);
                    let mut audit = Audit::new(Client::Addr(peer), peer);
                    audit.outcome = "tls_handshake_failed";
                }
                Err(_) => {
                    debug!(%peer, "CONNECT TLS handshake timed out");
                    let mut audit = Audit::new(Client::Addr(peer), peer);
                    audit.outcome = "tls_handshake_timeout";
                }
            }
        }
    }
    drop(permit);
}

/// Socket options of every accepted CONNECT client, set once on the
/// listener (Linux copies them to each accepted socket: no syscall per
/// connection; the splice sets none either, so these hold for the
/// connection's whole life). TCP keep-alive matters after the 200: the
/// header read is bounded, but the splice then waits for either side as
/// long as it takes, and a client that vanished without a FIN or RST (a
/// crashed host, a dropped NAT binding) would otherwise hold its task, fd
/// and connection permit forever (`lab/tests/halfopen.rs`: freed about
/// 25 s after it vanished). No `TCP_USER_TIMEOUT`: it would also reset a
/// client that merely stops reading for that long (see
/// `relay_transport::tcp::tune_listener`).
fn tune_listener(l: &TcpListener) {
    relay_transport::tcp::tune_listener(l);
}

/// Accepts CONNECT clients on a Unix socket.
pub(crate) async fn serve_unix(
    l: UnixListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> &'static str {
    loop {
        let Some((sock, _)) = accept_until(&stop, "connect_unix", || l.accept()).await else {
            return "connect_unix";
        };
        let shared = shared.clone();
        // Boxed for the reason given in `serve_tcp`.
        tokio::spawn(Box::pin(async move {
            let mut audit = Audit::new(unix_identity(&sock), Peer::Unix);
            let Ok(permit) = shared.connect_permits.clone().try_acquire_owned() else {
                busy(sock, &shared, &mut audit).await;
                return;
            };
            handle(sock, Peer::Unix, audit, &shared).await;
            drop(permit);
        }));
    }
}

/// Serves one CONNECT client from header to the end of the splice; `audit`
/// is filled in on the way and logged when it drops.
async fn handle<S: LocalStream>(mut s: S, peer: Peer, mut audit: Audit, shared: &Arc<Shared>) {
    let limits = &shared.cfg.limits;
    let head = tokio::time::timeout(
        limits.connect_header_timeout,
        read_head(&mut s, limits.connect_max_header_bytes),
    )
    .await;
    let buf = match head {
        Err(_) => {
            audit.answer(408, "header_timeout");
            let _ = respond(
                &mut s,
                408,
                "header_timeout",
                "request header not received in time",
                shared,
            )
            .await;
            return;
        }
        Ok(Err(HeadError::TooLarge)) => {
            audit.answer(431, "header_too_large");
            let _ = respond(
                &mut s,
                431,
                "header_too_large",
                &too_large(limits.connect_max_header_bytes),
                shared,
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::Io(e))) => {
            debug!(%peer, error = %e, "CONNECT client read failed");
            audit.outcome = "read_error";
            return;
        }
        Ok(Ok(v)) => v,
    };
    let head = match parse_request_head(&buf, limits.connect_max_header_bytes) {
        Ok(h) => h,
        Err(p) => {
            let (code, label, msg) = match p {
                HeadProblem::TooLarge => (
                    431,
                    "header_too_large",
                    too_large(limits.connect_max_header_bytes),
                ),
                HeadProblem::Method(m) => (405, "method", m),
                HeadProblem::Malformed(m) => (400, "malformed", m),
            };
            audit.answer(code, label);
            let _ = respond(&mut s, code, label, &msg, shared).await;
            return;
        }
    };
    let pending = &buf[head.len..];
    // Bounded by the header size; control characters are stripped so a
    // client cannot forge audit lines.
    audit.target = head.authority.chars().filter(|c| !c.is_control()).collect();
    let (authority, auth) = (head.authority, head.target);
    // Before the first lists nothing claims an edge's address, so a
    // cluster range in `tunnel_routes` would send it to the cloud network
    // (and no Service would resolve): wait for them, within the dial bound.
    if !cluster_loaded(shared, &auth, limits.dial_timeout).await {
        audit.answer(503, "not_ready");
        let msg = "the relay has not loaded the cluster's Nodes and Services yet";
        relay_transport::sampled!(info, "CONNECT refused: not ready", %peer, dst = %authority);
        let _ = respond(&mut s, 503, "not_ready", msg, shared).await;
        return;
    }
    let routed = match resolve(shared, &auth, judged_client(&peer)) {
        Ok(v) => v,
        Err(reply) => {
            shared.metrics.stream_outcome(reply.status);
            // Sampled, unlike the audit line (one per connection by contract):
            // a scraper polling offline edges would log at its poll rate.
            // Policy denials sampled apart from the rest.
            if reply.status == relay_protocol::StreamStatus::Denied {
                relay_transport::sampled!(info, "CONNECT denied by policy", %peer, dst = %authority, msg = %reply.message);
            } else {
                relay_transport::sampled!(info, "CONNECT refused", %peer, dst = %authority, reason = reply.status.as_str(), msg = %reply.message);
            }
            return refuse(&mut s, &mut audit, &reply, shared).await;
        }
    };
    let (session, target) = match routed {
        Routed::Edge(session, target) => (session, target),
        Routed::Direct(target) => return direct(s, pending, target, audit, shared).await,
    };
    audit.node = session.node.clone();
    audit.dst = Some(target);
    let span = tracing::info_span!("stream", node = %session.node, session = session.session_id, dst = %target, src = %peer);
    async move {
        let (bi, guard) = match open_on(shared, session, target, peer.addr()).await {
            Ok(v) => v,
            Err(reply) => {
                relay_transport::sampled!(info, "stream refused", reason = reply.status.as_str(), msg = %reply.message);
                return refuse(&mut s, &mut audit, &reply, shared).await;
            }
        };
        audit.answer(200, "ok");
        if respond(&mut s, 200, "", "", shared).await.is_err() {
            audit.answer(200, "client_gone");
            return;
        }
        let out = splice(s, pending, bi, &guard).await;
        audit.spliced(out.to_tunnel, out.from_tunnel, out.reset.is_some());
        debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "stream closed");
    }
    .instrument(span)
    .await
}

/// A CONNECT to a Service whose picked endpoint is in the cloud (a webhook
/// or aggregated API, which the apiserver asks for by its ClusterIP, or a
/// client naming the Service): the relay dials it itself.
async fn direct<S: LocalStream>(
    mut s: S,
    pending: &[u8],
    target: SocketAddr,
    mut audit: Audit,
    shared: &Arc<Shared>,
) {
    audit.node = "cloud".into();
    audit.dst = Some(target);
    let tcp = match crate::tunnel::dial_direct(shared, target).await {
        Ok(t) => t,
        Err(reply) => {
            relay_transport::sampled!(info, "CONNECT to a cloud endpoint refused", dst = %target, reason = reply.status.as_str(), msg = %reply.message);
            return refuse(&mut s, &mut audit, &reply, shared).await;
        }
    };
    audit.answer(200, "ok");
    if respond(&mut s, 200, "", "", shared).await.is_err() {
        audit.answer(200, "client_gone");
        return;
    }
    let out = relay_transport::splice::splice_local(s, pending, tcp).await;
    audit.spliced(out.to_tunnel, out.from_tunnel, out.reset.is_some());
    debug!(up = out.to_tunnel, down = out.from_tunnel, reset = ?out.reset, "direct connection closed");
}

/// Where a CONNECT goes.
enum Routed {
    /// Through an edge's session, to this address.
    Edge(Arc<crate::session::SessionHandle>, SocketAddr),
    /// Dialled by the relay: a Service's cloud endpoint.
    Direct(SocketAddr),
}

/// Waits (at most `limit`) until what deciding `auth` needs has loaded
/// once: the Node directory, and the Service table unless `auth` is a
/// node (so kubelet traffic does not wait on a Service watch that fails,
/// say for want of RBAC on EndpointSlices); true if it has. Immediate
/// after start-up.
async fn cluster_loaded(shared: &Shared, auth: &Authority, limit: std::time::Duration) -> bool {
    let services = &shared.services;
    if shared.directory.is_synced() && services.is_synced() {
        return true;
    }
    let deadline = tokio::time::Instant::now() + limit;
    if !crate::directory::wait_synced(&*shared.directory, limit).await {
        return false;
    }
    if !may_be_a_service(shared, auth) {
        return true;
    }
    let wait = crate::directory::changed_until(services.subscribe(), || services.is_synced());
    tokio::time::timeout_at(deadline, wait)
        .await
        .unwrap_or(false)
}

/// Whether resolving `auth` may need the Service table: an address no
/// node claims (a ClusterIP, an external IP), a name that is no node's.
fn may_be_a_service(shared: &Shared, auth: &Authority) -> bool {
    use crate::directory::Lookup;
    let dir = &shared.directory;
    match auth {
        Authority::Ip(sa) => matches!(dir.claim(canonical(*sa).ip()), crate::policy::Claim::Nobody),
        Authority::Name(name, _) => {
            let name = normal(name);
            crate::services::is_service_name(&name, cluster_domain(shared))
                || (dir.resolve_name(&name).is_none()
                    && !matches!(dir.lookup(&name), Lookup::Known(_)))
        }
    }
}

/// `name` as names are compared: lower case, without a trailing dot.
fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The cluster's DNS domain as configured (none in static mode).
fn cluster_domain(shared: &Shared) -> &str {
    shared
        .cfg
        .kubernetes
        .as_ref()
        .map_or("", |k| k.cluster_domain.as_str())
}

/// The CONNECT client's address as Services judge it (source ranges,
/// affinity): its IPv4 form when IPv4-mapped; none for a process on the
/// relay's own node (the unix socket, or loopback), whose address means
/// nothing to a Service's source ranges.
fn judged_client(peer: &Peer) -> Option<std::net::IpAddr> {
    peer.addr()
        .map(|a| a.ip().to_canonical())
        .filter(|ip| !ip.is_loopback())
}

/// Finds where a CONNECT authority goes, asking the policy (the same seam
/// every ingress uses): an address (a ClusterIP resolved to one of its
/// endpoints), or a name ([`by_name`]). `client` ([`judged_client`]) is
/// checked against a load balancer's `loadBalancerSourceRanges` and keeps
/// a `sessionAffinity: ClientIP` Service's address to one endpoint.
fn resolve(
    shared: &Shared,
    auth: &Authority,
    client: Option<std::net::IpAddr>,
) -> Result<Routed, StreamReply> {
    let (routed, target) = match auth {
        Authority::Ip(sa) => route_any(shared, Origin::Connect, *sa, Proto::Tcp, None, client)?,
        Authority::Name(name, port) => by_name(shared, name, *port, client)?,
    };
    Ok(match routed {
        Route::Edge(s) => Routed::Edge(s, target),
        Route::Cloud => Routed::Direct(target),
    })
}

/// `CONNECT name:port`: a Node's name goes to the node; a Service's name
/// (`svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster domain>`) to the Service;
/// a name a node reports (its `Hostname`, `InternalDNS` or `ExternalDNS`)
/// to the node. Node names and the names a node reports are written by
/// its kubelet, Services by whoever may create them in a namespace, so
/// where both claim a name, neither gets it: kube-apiserver's kubelet
/// traffic (by a node's reported name) must not reach a Service named
/// like it, and its webhook calls (by `.svc` names, never taken from an
/// edge) must not reach an edge.
fn by_name(
    shared: &Shared,
    name: &str,
    port: u16,
    client: Option<std::net::IpAddr>,
) -> Result<(Route, SocketAddr), StreamReply> {
    use crate::directory::Lookup;
    let dir = &shared.directory;
    let name = &*normal(name);
    let service_form = crate::services::is_service_name(name, cluster_domain(shared));
    if !service_form && matches!(dir.lookup(name), Lookup::Known(_)) {
        return by_node(shared, name, port, client);
    }
    let reported = dir.resolve_name(name).filter(|_| !service_form);
    match shared.services.by_name(name, port) {
        // A `.svc` name is a Service's or no one's.
        NameLookup::NotAService if service_form => Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!("no Service named {name}"),
        )),
        NameLookup::NotAService => by_node(shared, name, port, client),
        _ if reported.is_some() => Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!(
                "{name} is both a name node {} reports and a Service's: reach the node by its Node name or address, the Service by {name}.svc",
                reported.unwrap_or_default()
            ),
        )),
        NameLookup::Backends(b) => route_backend(
            shared,
            &b,
            None,
            None,
            Proto::Tcp,
            &format!("{name}:{port}"),
        ),
        NameLookup::Refused(msg) => Err(StreamReply::fail(StreamStatus::NoRoute, msg)),
    }
}

/// `CONNECT <node>:<port>`: by Node name, or by the node's Hostname,
/// InternalDNS or ExternalDNS address (which differ from the name on many
/// providers): an edge through its session, a cloud node dialled by the
/// relay, but for the relay node's own node ports, resolved to an
/// endpoint as by address (`client` as there, for `sessionAffinity`).
fn by_node(
    shared: &Shared,
    name: &str,
    port: u16,
    client: Option<std::net::IpAddr>,
) -> Result<(Route, SocketAddr), StreamReply> {
    let node = shared
        .directory
        .resolve_name(name)
        .unwrap_or_else(|| name.to_string());
    let Some(s) = shared.registry.get(&node) else {
        // A cloud node (the apiserver names kubelets by their Hostname
        // address first): the relay dials its address itself, as the
        // policy allows for a cloud node's address.
        if let crate::directory::Lookup::Known(e) = shared.directory.lookup(&node) {
            if e.cloud {
                let Some(ip) = e.primary else {
                    return Err(StreamReply::fail(
                        StreamStatus::NoRoute,
                        format!("cloud node {name} has no InternalIP or ExternalIP address"),
                    ));
                };
                let target = canonical(SocketAddr::new(ip, port));
                // The relay node's own node port: resolved as by address
                // (`CONNECT <relay-ip>:<nodePort>`), never dialled: the
                // relay's own socket would be DNATed by its kube-proxy,
                // to an edge pod too, and sent out the default route.
                if crate::route::relay_node_port(shared, target) {
                    return route_any(shared, Origin::Connect, target, Proto::Tcp, None, client);
                }
                return Ok((
                    decide(shared, Origin::Connect, target, Proto::Tcp, None)?,
                    target,
                ));
            }
        }
        return Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!("no edge session for node {name}, and no Service of that name"),
        ));
    };
    let Some(ip) = s.primary_addr() else {
        return Err(StreamReply::fail(
            StreamStatus::NoRoute,
            format!("node {name} advertised no primary address"),
        ));
    };
    let target = canonical(SocketAddr::new(ip, port));
    Ok((
        decide(shared, Origin::Connect, target, Proto::Tcp, Some(s))?,
        target,
    ))
}
