//! The resolver's sockets: queries over UDP (with truncation) and TCP,
//! answered from the [`Zone`] or forwarded to the upstream cluster DNS.
//!
//! Bad input never costs more than a reply: a datagram that is not a DNS
//! message is answered FORMERR when its header is readable and is a query,
//! and dropped otherwise (never answer a response: two resolvers would
//! bounce it forever). Forwards are bounded twice: at most
//! `max_forwards` in flight (past that, SERVFAIL at once, counted) and
//! each within `forward_timeout` (then SERVFAIL).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use relay_protocol::Cidr;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::codec::LengthDelimitedCodec;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::zone::{Outcome, Zone};

/// Largest UDP answer we send, whatever a client advertises: the EDNS
/// size that avoids IP fragmentation (DNS flag day 2020).
pub const MAX_UDP_ANSWER: usize = 1232;
/// A TCP connection silent this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Most TCP connections served at once (more are closed at accept).
const MAX_TCP_CONNS: usize = 128;
/// Most queries of one TCP connection forwarded at once; past that the
/// connection is not read until one is answered (the resolver-wide bound
/// is `max_forwards`).
const TCP_PIPELINE: usize = 16;

/// Counters of one resolver.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries answered from the table (including NXDOMAIN and NODATA).
    pub local: AtomicU64,
    /// Of those, NXDOMAIN.
    pub nxdomain: AtomicU64,
    /// Queries forwarded to the upstream and answered by it.
    pub forwarded: AtomicU64,
    /// Forwards that failed or timed out (answered SERVFAIL).
    pub forward_failed: AtomicU64,
    /// Forwards refused because `max_forwards` were in flight (SERVFAIL).
    pub forward_shed: AtomicU64,
    /// UDP answers truncated (TC set; the client retries over TCP).
    pub truncated: AtomicU64,
    /// Malformed queries answered FORMERR.
    pub formerr: AtomicU64,
    /// Datagrams dropped (unreadable, or not a query).
    pub dropped: AtomicU64,
    /// Queries received over TCP.
    pub tcp_queries: AtomicU64,
    /// Queries (UDP) and connections (TCP) from peers that are neither
    /// this node nor its pods, dropped unanswered.
    pub refused_peers: AtomicU64,
    /// The listen address is bound and served (false while its bind
    /// fails and is retried).
    pub listening: std::sync::atomic::AtomicBool,
}

/// What the sockets share.
pub(crate) struct Shared {
    /// The table; `None` until one is received or loaded, and then every
    /// query is forwarded (answering NXDOMAIN from nothing would break
    /// names that exist).
    pub(crate) zone: watch::Sender<Option<Arc<Zone>>>,
    pub(crate) upstream: SocketAddr,
    pub(crate) forward_timeout: Duration,
    pub(crate) forwards: Arc<Semaphore>,
    pub(crate) stats: Arc<DnsStats>,
    /// Who may ask besides this node itself: the prefixes the edge serves
    /// (its pods) and `capture.sources`; `None` until known, when anyone
    /// may (see [`may_ask`]).
    pub(crate) clients: std::sync::RwLock<Option<Arc<Vec<Cidr>>>>,
}

/// Whether `peer` may ask: loopback, and the clients (this node's own
/// addresses, its pods, `capture.sources`). The resolver listens on a
/// link-local address that Linux accepts on any interface, so a device on
/// the site's LAN could send to it through the node, and read cluster
/// names or have queries forwarded to the cluster's DNS through the
/// tunnel, past the source check capture applies. Until the clients are
/// known (no session yet in this run), everyone may: pods must resolve
/// during an outage.
pub(crate) fn may_ask(shared: &Shared, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    let clients = shared
        .clients
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(clients) = clients else {
        return true;
    };
    peer.is_loopback() || clients.iter().any(|c| c.contains(&peer))
}

/// The decision for one query.
pub(crate) enum Handled {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Forward the query bytes as they are (the upstream's answer carries
    /// the client's id); the parsed query makes the SERVFAIL if that
    /// fails, unless there is an answer to give instead (encoded).
    Forward(Box<Message>, Option<Vec<u8>>),
    /// Send nothing.
    Drop,
}

/// Decides what to do with one query; `udp_limit` is set for UDP (the
/// answer is truncated past the client's size).
pub(crate) fn handle(shared: &Shared, bytes: &[u8], udp_limit: bool) -> Handled {
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => {
            // A readable header of a query: tell the client, else drop.
            if bytes.len() >= 12 && bytes[2] & 0x80 == 0 {
                debug!(error = %e, "malformed query: FORMERR");
                shared.stats.formerr.fetch_add(1, Relaxed);
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                let m = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return m.to_vec().map_or(Handled::Drop, Handled::Reply);
            }
            shared.stats.dropped.fetch_add(1, Relaxed);
            return Handled::Drop;
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        shared.stats.dropped.fetch_add(1, Relaxed);
        return Handled::Drop;
    }
    // EDNS version 0 is the only one (RFC 6891 6.1.3: BADVERS, with an
    // OPT of the version we speak).
    if msg.edns.as_ref().is_some_and(|e| e.version() != 0) {
        return reply(&msg, error(&msg, ResponseCode::BADVERS), false, shared);
    }
    if msg.metadata.op_code != OpCode::Query {
        return reply(&msg, error(&msg, ResponseCode::NotImp), false, shared);
    }
    if msg.queries.len() != 1 {
        shared.stats.formerr.fetch_add(1, Relaxed);
        return reply(&msg, error(&msg, ResponseCode::FormErr), false, shared);
    }
    let zone = shared.zone.borrow().clone();
    match zone.map(|z| z.answer(&msg)) {
        Some(Outcome::Answer(resp)) => {
            shared.stats.local.fetch_add(1, Relaxed);
            if resp.metadata.response_code == ResponseCode::NXDomain {
                shared.stats.nxdomain.fetch_add(1, Relaxed);
            }
            reply(&msg, resp, udp_limit, shared)
        }
        Some(Outcome::ForwardOr(resp)) => {
            let fallback = match reply(&msg, resp, udp_limit, shared) {
                Handled::Reply(b) => Some(b),
                _ => None,
            };
            Handled::Forward(Box::new(msg), fallback)
        }
        Some(Outcome::Forward) | None => Handled::Forward(Box::new(msg), None),
    }
}

/// The OPT record of an answer to `query`, when it had one: our UDP size,
/// version 0, its DO bit echoed (RFC 3225; no DNSSEC data is added).
fn opt(query: &Message) -> Option<Edns> {
    let q = query.edns.as_ref()?;
    let mut e = Edns::new();
    e.set_max_payload(MAX_UDP_ANSWER as u16);
    e.set_dnssec_ok(q.flags().dnssec_ok);
    Some(e)
}

/// An error answer to `query`, with its question (and an OPT record when
/// the query had one).
pub(crate) fn error(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.iter().cloned());
    if let Some(e) = opt(query) {
        m.set_edns(e);
    }
    m
}

/// Encodes `resp`, with an OPT record when the query had one; a UDP
/// answer larger than the client takes is cut to fit ([`fit`]).
fn reply(query: &Message, mut resp: Message, udp_limit: bool, shared: &Shared) -> Handled {
    if let Some(e) = opt(query) {
        resp.set_edns(e);
    }
    let Ok(bytes) = resp.to_vec() else {
        return error(query, ResponseCode::ServFail)
            .to_vec()
            .map_or(Handled::Drop, Handled::Reply);
    };
    let limit = usize::from(query.max_payload()).clamp(512, MAX_UDP_ANSWER);
    if udp_limit && bytes.len() > limit {
        return fit(resp, limit, shared).map_or(Handled::Drop, Handled::Reply);
    }
    Handled::Reply(bytes)
}

/// `resp` cut to `limit` bytes: first without its additional section
/// (the addresses of SRV targets, which a client can ask for; no TC, as
/// RFC 2181 9 says), else with as many leading answer records as fit
/// and TC set (the authority section dropped too). Stub resolvers that
/// never retry over TCP (musl before 1.2.4) use what there is, as with
/// CoreDNS; hickory's `Message::truncate` would leave no record at all.
fn fit(mut resp: Message, limit: usize, shared: &Shared) -> Option<Vec<u8>> {
    resp.additionals.clear();
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    shared.stats.truncated.fetch_add(1, Relaxed);
    resp.authorities.clear();
    resp.metadata.truncation = true;
    let all = std::mem::take(&mut resp.answers);
    // The encoded size grows with the number of records kept: the most
    // that fit, by bisection (about 7 encodings for 100 records).
    let (mut lo, mut hi) = (0, all.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        resp.answers = all[..mid].to_vec();
        if resp.to_vec().ok()?.len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    resp.answers = all[..lo].to_vec();
    resp.to_vec().ok()
}

/// Whether `resp` answers the query with id `id`.
fn answers(resp: &[u8], id: u16) -> bool {
    resp.len() >= 12 && u16::from_be_bytes([resp[0], resp[1]]) == id && resp[2] & 0x80 != 0
}

/// Asks the upstream over UDP, from a fresh socket (a random source port
/// per query, so an off-path spoofer must guess it), connected so only
/// the upstream's datagrams arrive.
async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let id = u16::from_be_bytes([query[0], query[1]]);
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if answers(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Asks the upstream over TCP (the client came over TCP, or needs the
/// whole answer).
async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(upstream).await?;
    write_framed(&mut s, query).await?;
    let resp = read_framed(&mut s).await?;
    if answers(&resp, u16::from_be_bytes([query[0], query[1]])) {
        Ok(resp)
    } else {
        Err(std::io::Error::other("upstream answered another query"))
    }
}

/// What a forward that failed (or was shed) answers: `fallback` if there
/// is one, else SERVFAIL; `None` (send nothing) only if that does not
/// encode.
pub(crate) fn failed_answer(query: &Message, fallback: Option<Vec<u8>>) -> Option<Vec<u8>> {
    fallback.or_else(|| error(query, ResponseCode::ServFail).to_vec().ok())
}

/// Forwards within the bounds; when the upstream fails, is slow, or too
/// many forwards are in flight: [`failed_answer`]. `None`: send nothing.
async fn forward(
    shared: &Shared,
    query: &Message,
    bytes: &[u8],
    tcp: bool,
    fallback: Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let Ok(_permit) = shared.forwards.clone().try_acquire_owned() else {
        shared.stats.forward_shed.fetch_add(1, Relaxed);
        return failed_answer(query, fallback);
    };
    let work = async {
        if tcp {
            forward_tcp(shared.upstream, bytes).await
        } else {
            forward_udp(shared.upstream, bytes).await
        }
    };
    match tokio::time::timeout(shared.forward_timeout, work).await {
        Ok(Ok(resp)) => {
            shared.stats.forwarded.fetch_add(1, Relaxed);
            Some(resp)
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {:?}", shared.forward_timeout),
            };
            debug!(upstream = %shared.upstream, error = %why, fallback = fallback.is_some(), "forward failed");
            shared.stats.forward_failed.fetch_add(1, Relaxed);
            failed_answer(query, fallback)
        }
    }
}

/// Serves UDP queries until `cancel`. Local answers are sent inline (no
/// task per query); forwards run as tracked tasks.
pub(crate) async fn serve_udp(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    // Queries are small; anything past 4 KiB is not a query we answer
    // (it is cut, fails to parse, and is dropped or answered FORMERR).
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux:
                    // not fatal for a server socket.
                    debug!(error = %e, "dns udp receive");
                    continue;
                }
            },
        };
        if !may_ask(&shared, peer.ip()) {
            shared.stats.refused_peers.fetch_add(1, Relaxed);
            continue;
        }
        let bytes = &buf[..n];
        match handle(&shared, bytes, true) {
            Handled::Reply(r) => {
                let _ = sock.send_to(&r, peer).await;
            }
            Handled::Drop => {}
            Handled::Forward(q, fallback) => {
                let (sock, shared, bytes) = (sock.clone(), shared.clone(), bytes.to_vec());
                tasks.spawn(async move {
                    if let Some(r) = forward(&shared, &q, &bytes, false, fallback).await {
                        let _ = sock.send_to(&r, peer).await;
                    }
                });
            }
        }
    }
}

/// Serves TCP connections until `cancel`: several queries per connection
/// (2-byte length framing, RFC 7766), forwards among them concurrently,
/// idle ones closed.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "dns tcp accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !may_ask(&shared, peer.ip()) {
            shared.stats.refused_peers.fetch_add(1, Relaxed);
            continue; // dropping the stream closes it
        }
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve_conn(stream, &shared) => {}
            }
            drop(permit);
        });
    }
}

/// Serves one connection: every query is decided as it arrives, a local
/// answer written at once, a forward run beside the next queries (at most
/// [`TCP_PIPELINE`] at a time) and its answer written when it comes, so
/// a slow forward (up to `forward_timeout` with the cloud away) no longer
/// holds up the cluster names asked after it. Answers may so leave in
/// another order than their queries, as RFC 7766 7 allows (clients match
/// them by id). When the client closes its side or goes idle, the
/// forwards under way are still answered, then the connection closed.
async fn serve_conn(s: TcpStream, shared: &Shared) {
    let (rd, mut wr) = s.into_split();
    // A framed reader keeps a half-read query buffered when an answer
    // wins the select below, where `read_framed` would lose its bytes.
    let mut queries = LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(usize::from(u16::MAX))
        .new_read(rd);
    let mut forwards = FuturesUnordered::new();
    let mut reading = true;
    loop {
        let answer = tokio::select! {
            q = tokio::time::timeout(TCP_IDLE, queries.next()),
                if reading && forwards.len() < TCP_PIPELINE =>
            {
                let Ok(Some(Ok(query))) = q else {
                    // Closed, unreadable or idle.
                    reading = false;
                    if forwards.is_empty() {
                        return;
                    }
                    continue;
                };
                shared.stats.tcp_queries.fetch_add(1, Relaxed);
                match handle(shared, &query, false) {
                    Handled::Reply(r) => Some(r),
                    Handled::Drop => return,
                    Handled::Forward(q, fallback) => {
                        forwards.push(async move {
                            forward(shared, &q, &query, true, fallback).await
                        });
                        continue;
                    }
                }
            }
            Some(r) = forwards.next() => r,
            else => return,
        };
        let Some(resp) = answer else {
            return;
        };
        // A client that stops reading holds no connection slot forever.
        if !matches!(
            tokio::time::timeout(TCP_IDLE, write_framed(&mut wr, &resp)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        if !reading && forwards.is_empty() {
            return;
        }
    }
}

async fn read_framed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(s: &mut (impl AsyncWrite + Unpin), msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}
