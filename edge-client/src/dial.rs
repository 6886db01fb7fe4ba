//! Dialling the relay: the transport a mode asks for (QUIC, or TLS over
//! TCP as the fallback), the TLS identity to present, and the hello
//! exchange that turns a connection into a registered session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use relay_protocol::codec::{self, decode, decode_with_rest, read_frame_bytes, write_frame};
use relay_protocol::{
    capability, close_code, ClientHello, HelloReply, Rejection, ServerHelloExt, PROTOCOL_VERSION,
};
use relay_transport::tcp::{ConnectError, TcpDial};
use relay_transport::{quic, BiStream, TunnelConn};
use tracing::warn;

use crate::client::EdgeStats;
use crate::config::{EdgeConfig, TransportMode};
use crate::identity::{clock_hint, Credentials, IdentityError};

/// Why an attempt ended without a session.
#[derive(Debug)]
pub(crate) enum AttemptError {
    Rejected(Rejection),
    Failed(String),
}

/// An established, registered session.
pub(crate) struct Connected {
    /// The QUIC endpoint (none on the TCP fallback).
    pub(crate) endpoint: Option<quinn::Endpoint>,
    pub(crate) conn: TunnelConn,
    pub(crate) hello: relay_protocol::ServerHello,
    /// What the relay says we serve (relays that decide claims).
    pub(crate) ext: Option<ServerHelloExt>,
    pub(crate) control: BiStream,
}

pub(crate) fn failed(what: &str, e: &dyn std::fmt::Display) -> AttemptError {
    AttemptError::Failed(format!("{what}: {e}"))
}

/// Dials the relay over the transport a mode asks for (in `Auto`: QUIC,
/// falling back to TLS over TCP when QUIC cannot complete a handshake
/// within `quic_fallback_after`), with a given TLS client config: the
/// tunnel's (node certificate) or the certificate bootstrap's (none).
pub(crate) struct Dialer<'a> {
    pub(crate) cfg: &'a EdgeConfig,
    pub(crate) stats: &'a EdgeStats,
    pub(crate) mode: TransportMode,
    /// QUIC carried this edge's last session to the relay (in `Auto`: an
    /// unanswered QUIC attempt is tried once more before falling back).
    pub(crate) quic_worked: bool,
    /// A background QUIC probe from the TCP fallback: its failures never
    /// move the relay's address turn (see [`EdgeStats::relay_addr_turns`]).
    /// On a path without UDP every probe goes unanswered, and moving the
    /// turn each time would send the next real attempt to whichever
    /// address came up, a broken one included. It walks every address,
    /// and one that answers QUIC takes the turn ([`Dialer::probe_each`]).
    pub(crate) probe: bool,
}

impl Dialer<'_> {
    /// A connection to the relay (no hello yet), and its QUIC endpoint.
    pub(crate) async fn dial(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let looked_up = bounded(tokio::net::lookup_host(&cfg.relay), self.lookup_bound())
            .await
            .map(|a| a.collect::<Vec<_>>());
        let proxy = cfg
            .tcp_proxy
            .as_ref()
            .filter(|_| matches!(self.mode, TransportMode::Auto | TransportMode::Tcp));
        match self.addresses(looked_up, proxy.is_some()) {
            Ok(addrs) => {
                let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
                let addrs = crate::nat64::reachable(addrs, mark).await;
                let routed = |a: &SocketAddr| crate::nat64::has_route(*a, mark);
                let mut ordered = dial_order(&addrs, &cfg.node, routed);
                if ordered.is_empty() && proxy.is_some() {
                    // Through a proxy the addresses need no route of their
                    // own: the TCP fallback dials the proxy (a site whose
                    // only way out is a proxy often has no default route).
                    // Only then: quinn takes a send to an unrouted address
                    // for sent, so QUIC there costs its whole wait.
                    ordered = dial_order(&addrs, &cfg.node, |_: &SocketAddr| true);
                }
                if ordered.is_empty() && !addrs.is_empty() {
                    // The uplink is down (its routes gone with it): every
                    // address would fail at once. Not the addresses'
                    // fault, so the turn stays where it was.
                    return Err(format!(
                        "no route to any of {}'s addresses {addrs:?} (is the uplink down?)",
                        cfg.relay
                    ));
                }
                self.dial_any(&ordered, tls).await
            }
            // Behind a proxy the site's resolver may know no outside
            // names: the proxy resolves the relay's.
            Err(e) => match proxy {
                Some(proxy) => {
                    tracing::debug!(relay = %cfg.relay, error = %e, "relay name not resolved here; TCP through the proxy");
                    self.tcp(
                        TcpDial::Proxy {
                            proxy,
                            target: &tcp_target(cfg),
                        },
                        tls,
                    )
                    .await
                    .map_err(|e| e.lost.0)
                }
                None => Err(format!("resolve {}: {e}", cfg.relay)),
            },
        }
    }

    /// How long the relay's name may take to resolve: [`LOOKUP_WITH_KNOWN`]
    /// when it resolved before in this run (its last addresses stand in),
    /// else the handshake timeout. The system resolver alone may take
    /// 5 s × 2 tries per name server before it fails.
    fn lookup_bound(&self) -> Duration {
        let known = self.stats.relay_addrs_known.lock();
        let known = known.unwrap_or_else(|e| e.into_inner());
        match known.contains_key(&self.cfg.relay) {
            true => LOOKUP_WITH_KNOWN,
            false => self.cfg.handshake_timeout,
        }
    }

    /// The relay's addresses to dial: what its name resolves to now (kept),
    /// else, unless a proxy resolves it (`proxied`), what it resolved to
    /// last.
    fn addresses(
        &self,
        looked_up: std::io::Result<Vec<SocketAddr>>,
        proxied: bool,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let relay = &self.cfg.relay;
        let mut known = self
            .stats
            .relay_addrs_known
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match looked_up {
            Ok(addrs) if !addrs.is_empty() => {
                let sorted = |v: &[SocketAddr]| {
                    let mut v = v.to_vec();
                    v.sort_unstable();
                    v
                };
                // Round-robin DNS reorders the same set: saved only when the
                // set changes (the file lives on an SD card on many boards).
                let changed = known.get(relay).map(|k| sorted(k)) != Some(sorted(&addrs));
                known.insert(relay.clone(), addrs.clone());
                if changed {
                    // Names this run has not resolved keep what was saved.
                    let loaded = self
                        .stats
                        .relay_addrs_loaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let mut names: std::collections::BTreeMap<String, Vec<SocketAddr>> =
                        loaded.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    names.extend(known.iter().map(|(k, v)| (k.clone(), sorted(v))));
                    let table = crate::relay_addrs::SavedRelayAddrs { names };
                    self.stats
                        .relay_addrs_saved
                        .send_replace(Some(std::sync::Arc::new(table)));
                }
                Ok(addrs)
            }
            Ok(_) => Ok(Vec::new()),
            Err(e) if proxied => Err(e),
            Err(e) => match known.get(relay) {
                Some(last) => {
                    warn!(%relay, error = %e, addrs = ?last, "relay name not resolved; dialling the addresses it had");
                    Ok(last.clone())
                }
                None => {
                    let loaded = self
                        .stats
                        .relay_addrs_loaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    match loaded.get(relay) {
                        Some(saved) => {
                            warn!(%relay, error = %e, addrs = ?saved, "relay name not resolved; dialling the addresses saved by the previous run (relay_addrs_file)");
                            Ok(saved.clone())
                        }
                        None => Err(e),
                    }
                }
            },
        }
    }

    /// TLS over TCP to the relay (no hello yet); a failure says whether
    /// the relay answered.
    async fn tcp(
        &self,
        to: TcpDial<'_>,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), ConnectError> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        relay_transport::tcp::connect_detailed(
            to,
            &cfg.server_name,
            tls,
            mark,
            cfg.tcp_fallback_mss,
            cfg.handshake_timeout,
        )
        .await
        .map(|c| (None, c))
    }

    /// [`Dialer::dial`] to the address of `addrs` whose turn it is; after
    /// an attempt that got no answer there, the next attempt (after the
    /// backoff) takes the next one. An answer, even a refusal, keeps the
    /// turn: that address reaches the relay.
    async fn dial_any(
        &self,
        addrs: &[SocketAddr],
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let turn = self.turn();
        if self.probe && self.mode == TransportMode::Quic && addrs.len() > 1 {
            return self.probe_each(addrs, turn, tls).await;
        }
        let addr = pick(addrs, turn).ok_or_else(|| format!("resolve {}: no address", cfg.relay))?;
        let failed = match self.dial_addr(addr, tls).await {
            Ok(c) => return Ok(c),
            Err(f) => f,
        };
        if failed.silent && addrs.len() > 1 && !self.probe && self.advance(turn) {
            if let Some(next) = pick(addrs, turn.wrapping_add(1)) {
                warn!(relay = %cfg.relay, silent = %addr, %next, "no answer from this relay address; the next attempt dials the next one");
            }
        }
        Err(failed.message)
    }

    /// A QUIC probe from the TCP fallback, over each of the relay name's
    /// addresses from the one whose turn it is, each given
    /// `quic_fallback_after` (less where that many would not fit in the
    /// handshake timeout together): the address TCP works on may be one UDP does
    /// not reach (an IPv6 path that passes TCP only, say) while another
    /// carries QUIC. An address that answers QUIC takes the turn (later
    /// attempts start there); failures leave it (see [`Dialer::probe`]).
    async fn probe_each(
        &self,
        addrs: &[SocketAddr],
        turn: u64,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let n = u32::try_from(addrs.len()).unwrap_or(u32::MAX).max(1);
        let wait = cfg.quic_fallback_after.min(cfg.handshake_timeout / n);
        let mut failed = Vec::new();
        for k in 0..addrs.len() as u64 {
            let Some(addr) = pick(addrs, turn.wrapping_add(k)) else {
                break;
            };
            let quic = quic_transport(cfg, addr, mark, tls.clone());
            match tokio::time::timeout(wait, quic).await {
                Ok(Ok((ep, c))) => {
                    if k > 0 {
                        let mut turns = self
                            .stats
                            .relay_addr_turns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        turns.insert(cfg.relay.clone(), turn.wrapping_add(k));
                        warn!(relay = %cfg.relay, %addr, "QUIC answers at this relay address; later attempts start there");
                    }
                    return Ok((Some(ep), c));
                }
                Ok(Err(e)) => failed.push(format!("{addr}: {}", e.into_failed().message)),
                Err(_) => failed.push(format!("{addr}: no QUIC handshake within {wait:?}")),
            }
        }
        Err(failed.join("; "))
    }

    /// Whose turn it is among the relay name's addresses (see
    /// [`EdgeStats::relay_addr_turns`]).
    fn turn(&self) -> u64 {
        let turns = self.stats.relay_addr_turns.lock();
        let turns = turns.unwrap_or_else(|e| e.into_inner());
        turns.get(&self.cfg.relay).copied().unwrap_or(0)
    }

    /// Moves the relay name's turn on from `from`, unless another attempt
    /// did already (a renewal's beside the session's loop): concurrent
    /// attempts that found the same address silent advance once. Says
    /// whether this call moved it.
    fn advance(&self, from: u64) -> bool {
        let mut turns = self
            .stats
            .relay_addr_turns
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let turn = turns.entry(self.cfg.relay.clone()).or_insert(0);
        if *turn != from {
            return false;
        }
        *turn = from.wrapping_add(1);
        true
    }

    /// [`Dialer::dial`] to one of the relay's addresses.
    async fn dial_addr(
        &self,
        addr: SocketAddr,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), AddrFailed> {
        let cfg = self.cfg;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let target = tcp_target(cfg);
        let to = match &cfg.tcp_proxy {
            Some(proxy) => TcpDial::Proxy {
                proxy,
                target: &target,
            },
            None => TcpDial::Direct(SocketAddr::new(
                addr.ip(),
                cfg.tcp_fallback_port.unwrap_or(addr.port()),
            )),
        };
        let direct = matches!(to, TcpDial::Direct(_));
        match self.mode {
            TransportMode::Quic => {
                // Bounded here, not only by the caller's limit: an attempt
                // the caller drops never reaches the address turn, and an
                // unanswered handshake lasts until quinn's idle timeout.
                let wait = cfg.handshake_timeout;
                let (ep, c) = tokio::time::timeout(wait, quic_transport(cfg, addr, mark, tls))
                    .await
                    .unwrap_or_else(|_| {
                        Err(QuicAttemptError::Unanswered(format!(
                            "no QUIC handshake with {addr} within {wait:?}"
                        )))
                    })
                    .map_err(QuicAttemptError::into_failed)?;
                Ok((Some(ep), c))
            }
            // Through a proxy the address is not dialled at all: whatever
            // the proxy does says nothing about it.
            TransportMode::Tcp => self.tcp(to, tls).await.map_err(|e| AddrFailed {
                silent: direct && !e.reached,
                message: e.lost.0,
            }),
            TransportMode::Auto => {
                // Falling back is for paths that do not carry UDP: only a
                // QUIC attempt that got no answer at all counts. A relay
                // that answered (refused while draining, reset, a TLS
                // error) proves UDP gets through, and TCP to the same relay
                // would fare no better: that is an ordinary failed attempt.
                // An unanswered attempt right after a QUIC session is more
                // likely a relay restarting (its first Initial lost while
                // nothing listened, the next one due only after quinn's
                // backoff) than UDP newly blocked: one fresh attempt first,
                // so a fleet does not land on TCP after every restart.
                // And while QUIC carries another session of this edge (to
                // another replica, or the session a renewal replaces), UDP
                // demonstrably gets through: silence is a relay too busy to
                // answer yet (its handshakes queue behind a concurrency
                // limit when a thousand edges arrive at once), so the one
                // attempt may take the whole handshake bound.
                let (tries, wait) = if self.stats.quic_sessions_live.load(Relaxed) > 0 {
                    (1, cfg.handshake_timeout.max(cfg.quic_fallback_after))
                } else if self.quic_worked {
                    (2, cfg.quic_fallback_after)
                } else {
                    (1, cfg.quic_fallback_after)
                };
                let mut why = String::new();
                for _ in 0..tries {
                    let quic = quic_transport(cfg, addr, mark, tls.clone());
                    match tokio::time::timeout(wait, quic).await {
                        Ok(Ok((ep, c))) => return Ok((Some(ep), c)),
                        Ok(Err(QuicAttemptError::Answered(message))) => {
                            return Err(AddrFailed {
                                message,
                                silent: false,
                            })
                        }
                        Ok(Err(QuicAttemptError::Unanswered(e))) => why = e,
                        Err(_) => why = format!("no QUIC handshake within {wait:?}"),
                    }
                }
                self.stats.fallbacks.fetch_add(1, Relaxed);
                warn!(reason = %why, "QUIC unavailable; falling back to TLS over TCP");
                // QUIC got no answer here; the address is silent unless TCP
                // then reached the relay (UDP blocked, the address fine).
                self.tcp(to, tls).await.map_err(|e| AddrFailed {
                    silent: !e.reached,
                    message: e.lost.0,
                })
            }
        }
    }
}

/// The bound on resolving the relay's name when its last addresses are
/// known ([`Dialer::lookup_bound`]): a resolver that stopped answering
/// costs this much per attempt, not the resolver's own timeouts.
const LOOKUP_WITH_KNOWN: Duration = Duration::from_secs(2);

/// `lookup` (the relay name's resolution) bounded by `bound`: no answer
/// within it is an error, as a failed lookup is.
async fn bounded<T>(
    lookup: impl std::future::Future<Output = std::io::Result<T>>,
    bound: Duration,
) -> std::io::Result<T> {
    tokio::time::timeout(bound, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the resolver within {bound:?}"),
            ))
        })
}

/// Where the TCP fallback goes, as `host:port`: the relay's host, with
/// `tcp_fallback_port` when set (what a proxy is asked to CONNECT to).
fn tcp_target(cfg: &EdgeConfig) -> std::borrow::Cow<'_, str> {
    match (cfg.tcp_fallback_port, cfg.relay.rsplit_once(':')) {
        (Some(port), Some((host, _))) => format!("{host}:{port}").into(),
        _ => cfg.relay.as_str().into(),
    }
}

/// The relay's addresses in the order an edge takes turns on them: those
/// this host has a route to (`routed`; all of them unrouted gives none),
/// each once, ordered by a hash of `node` and the address. The resolver's
/// order is no order to keep a turn in: round-robin DNS rotates it on
/// every answer, and glibc sorts IPv6 first whether or not IPv6 works past
/// the site's router, so an index into it named a different address on
/// each attempt and a dead address came round again however often it was
/// passed. A hash keeps each edge's order the same across answers, and
/// spreads a fleet's first choices over the addresses as round-robin DNS
/// would (an address leaving the answer moves the edges whose first
/// choice it was, and shifts the turns of those past their first). An
/// address with no route (IPv6 on a site without it) would fail at once
/// and cost an attempt.
fn dial_order(
    addrs: &[SocketAddr],
    node: &str,
    routed: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    // FNV-1a: the same order in every run and every build.
    let key = |a: &SocketAddr| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes().chain([0]).chain(a.to_string().into_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    let mut out: Vec<SocketAddr> = addrs.iter().copied().filter(|a| routed(a)).collect();
    out.sort_unstable();
    out.dedup();
    out.sort_by_cached_key(|a| (key(a), *a));
    out
}

/// The address of `addrs` for attempt `turn` (they take turns), `None` when
/// the name resolved to nothing.
fn pick(addrs: &[SocketAddr], turn: u64) -> Option<SocketAddr> {
    let n = u64::try_from(addrs.len()).ok().filter(|&n| n > 0)?;
    addrs.get(usize::try_from(turn % n).ok()?).copied()
}

/// Why a QUIC attempt failed: whether the relay answered decides whether
/// falling back to TCP can help.
#[derive(Debug)]
enum QuicAttemptError {
    /// Nothing came back (or no UDP socket to send from): the path may
    /// not carry UDP.
    Unanswered(String),
    /// The relay answered and ended the attempt: UDP gets through.
    Answered(String),
}

impl QuicAttemptError {
    fn into_failed(self) -> AddrFailed {
        match self {
            QuicAttemptError::Unanswered(message) => AddrFailed {
                message,
                silent: true,
            },
            QuicAttemptError::Answered(message) => AddrFailed {
                message,
                silent: false,
            },
        }
    }
}

/// A failed dial of one of the relay's addresses.
#[derive(Debug)]
struct AddrFailed {
    message: String,
    /// Nothing answered at the address (QUIC unanswered and no TCP
    /// connection after it, or a TCP connection refused or timed out before
    /// TLS began): only this moves the address turn.
    silent: bool,
}

/// A QUIC connection to `addr` (no hello yet).
async fn quic_transport(
    cfg: &EdgeConfig,
    addr: SocketAddr,
    mark: u32,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Endpoint, TunnelConn), QuicAttemptError> {
    // A fresh endpoint per attempt: matches the relay's address family and
    // starts from a new source port if the old NAT binding went bad.
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let endpoint = quic::client_endpoint_with(bind, tls, &cfg.quic, mark)
        .map_err(|e| QuicAttemptError::Unanswered(format!("endpoint: {e}")))?;
    let connecting = endpoint
        .connect(addr, &cfg.server_name)
        .map_err(|e| QuicAttemptError::Unanswered(format!("connect {addr}: {e}")))?;
    let conn = connecting.await.map_err(|e| {
        let msg = clock_hint(&format!("QUIC/TLS to {addr}: {e}"));
        match e {
            quinn::ConnectionError::TimedOut | quinn::ConnectionError::LocallyClosed => {
                QuicAttemptError::Unanswered(msg)
            }
            _ => QuicAttemptError::Answered(msg),
        }
    })?;
    Ok((endpoint, TunnelConn::Quic(conn)))
}

/// Obtains the certificate to dial with (bootstrapping or renewing it
/// first when needed), dials the relay over the transport `mode` asks for
/// (`quic_worked`, `probe`: see [`Dialer`]), then says hello.
pub(crate) async fn connect(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
    quic_worked: bool,
    probe: bool,
) -> Result<Connected, AttemptError> {
    let hello_sent = std::sync::atomic::AtomicBool::new(false);
    connect_noting(cfg, stats, mode, creds, quic_worked, probe, &hello_sent).await
}

/// [`connect`], setting `hello_sent` just before the hello is written:
/// from then on the relay may have registered the session, whatever
/// becomes of the attempt (a planned move that fails after that may have
/// had the relay drain the session it left, see
/// `session::moves::MoveDrain`); before, it cannot have.
pub(crate) async fn connect_noting(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
    quic_worked: bool,
    probe: bool,
    hello_sent: &std::sync::atomic::AtomicBool,
) -> Result<Connected, AttemptError> {
    let dialer = Dialer {
        cfg,
        stats,
        mode,
        quic_worked,
        probe,
    };
    let material = creds.material(cfg, &dialer).await.map_err(|e| match e {
        IdentityError::Refused(r) => AttemptError::Rejected(r),
        IdentityError::Failed(m) => AttemptError::Failed(m),
    })?;
    let tls = material
        .client_config(relay_protocol::ALPN)
        .map_err(|e| failed("tls config", &e))?;
    let (endpoint, conn) = dialer.dial(tls).await.map_err(AttemptError::Failed)?;
    let (hello, ext, control) = match say_hello(cfg, stats, &conn, hello_sent).await {
        Ok(h) => h,
        Err(e) => {
            // A certificate the relay refuses (revoked, issued by a CA it
            // no longer trusts) would be refused on every attempt until
            // it expires: a bootstrapped edge gets a new one instead.
            if matches!(cfg.identity, crate::config::Identity::Bootstrap(_))
                && conn
                    .refused_our_certificate(std::time::Duration::from_millis(500))
                    .await
            {
                creds.refused(&material);
            }
            return Err(e);
        }
    };
    Ok(Connected {
        endpoint,
        conn,
        hello,
        ext,
        control,
    })
}

async fn say_hello(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    conn: &TunnelConn,
    hello_sent: &std::sync::atomic::AtomicBool,
) -> Result<
    (
        relay_protocol::ServerHello,
        Option<ServerHelloExt>,
        BiStream,
    ),
    AttemptError,
> {
    let mut control = conn
        .open_bi()
        .await
        .map_err(|e| failed("open control stream", &e))?;
    // Pings, pongs and route updates must not wait behind bulk uploads in
    // our own send buffers (they would look like a dead path).
    control
        .send
        .set_priority(relay_transport::conn::CONTROL_PRIORITY);
    let hello = ClientHello {
        version: PROTOCOL_VERSION,
        node: cfg.node.clone(),
        routes: cfg.routes.clone(),
        primary_addr: cfg.primary_addr,
        capabilities: crate::dns::capabilities(cfg.dns.is_some()),
        agent: concat!("edge-client/", env!("CARGO_PKG_VERSION")).to_string(),
        fallbacks: stats.fallbacks.load(Relaxed).min(u32::MAX as u64) as u32,
    };
    hello_sent.store(true, std::sync::atomic::Ordering::Release);
    write_frame(&mut control.send, &hello)
        .await
        .map_err(|e| failed("send hello", &e))?;
    let body = read_frame_bytes(&mut control.recv, codec::MAX_FRAME_LEN)
        .await
        .map_err(|e| failed("read hello reply", &e))?;
    let (reply, rest) =
        decode_with_rest::<HelloReply>(&body).map_err(|e| failed("read hello reply", &e))?;
    match reply {
        HelloReply::Accepted(h) => {
            // Only a relay that knows the capability appends what we serve.
            let ext = if h.capabilities & capability::SERVED_ROUTES != 0 && !rest.is_empty() {
                Some(
                    decode::<ServerHelloExt>(rest)
                        .map_err(|e| failed("read hello extension", &e))?,
                )
            } else {
                None
            };
            Ok((h, ext, control))
        }
        HelloReply::Rejected(r) => {
            conn.close(close_code::NORMAL, "rejected");
            Err(AttemptError::Rejected(r))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dialer for the tests.
    fn dialer_for<'a>(
        cfg: &'a EdgeConfig,
        stats: &'a EdgeStats,
        mode: TransportMode,
        quic_worked: bool,
        probe: bool,
    ) -> Dialer<'a> {
        Dialer {
            cfg,
            stats,
            mode,
            quic_worked,
            probe,
        }
    }

    /// A name that stops resolving is dialled at the addresses it had,
    /// unless a proxy resolves it; one never resolved fails as before.
    #[test]
    fn a_name_that_stops_resolving_keeps_its_last_addresses() {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let cfg = EdgeConfig::new(
            "edge-a",
            "relay.test:8443",
            "relay.test",
            pki.node_material("edge-a").unwrap(),
        );
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let down = || {
            Err(std::io::Error::other(
                "temporary failure in name resolution",
            ))
        };
        assert!(dialer.addresses(down(), false).is_err());
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        assert_eq!(dialer.addresses(Ok(vec![a]), false).unwrap(), vec![a]);
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![a]);
        assert!(dialer.addresses(down(), true).is_err());
        let b: SocketAddr = "192.0.2.2:8443".parse().unwrap();
        assert_eq!(dialer.addresses(Ok(vec![b]), false).unwrap(), vec![b]);
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![b]);
    }

    /// Addresses saved by a previous run stand in for a failed lookup, but
    /// do not shorten the lookup's bound (they may be stale, and a slow
    /// resolver that works must get its time); a set reordered by
    /// round-robin DNS is not saved again.
    #[tokio::test]
    async fn saved_addresses_stand_in_without_shortening_the_lookup() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:8443".parse().unwrap();
        stats
            .relay_addrs_loaded
            .lock()
            .unwrap()
            .insert("relay.test:8443".into(), vec![a]);
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        assert_eq!(dialer.lookup_bound(), cfg.handshake_timeout);
        let down = || Err(std::io::Error::other("no answer"));
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![a]);
        let mut saved = stats.relay_addrs_saved.subscribe();
        assert_eq!(dialer.addresses(Ok(vec![a, b]), false).unwrap(), vec![a, b]);
        assert!(saved.has_changed().unwrap(), "a new set is saved");
        saved.borrow_and_update();
        assert_eq!(dialer.lookup_bound(), LOOKUP_WITH_KNOWN);
        dialer.addresses(Ok(vec![b, a]), false).unwrap();
        assert!(!saved.has_changed().unwrap(), "reordered: not saved again");
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![b, a]);
    }

    /// A resolver that never answers costs the short bound once the name
    /// resolved before (its last addresses stand in), the handshake
    /// timeout before that; its silence is an error like a failure.
    #[tokio::test]
    async fn a_silent_resolver_is_bounded() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        assert_eq!(dialer.lookup_bound(), cfg.handshake_timeout);
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        dialer.addresses(Ok(vec![a]), false).unwrap();
        assert_eq!(dialer.lookup_bound(), LOOKUP_WITH_KNOWN);
        let silent = std::future::pending::<std::io::Result<Vec<SocketAddr>>>();
        let e = bounded(silent, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(dialer.addresses(Err(e), false).unwrap(), vec![a]);
    }

    #[test]
    fn addresses_take_turns() {
        let a: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        assert_eq!(pick(&[], 0), None);
        assert_eq!(pick(&[a], 7), Some(a));
        assert_eq!(pick(&[a, b], 0), Some(a));
        assert_eq!(pick(&[a, b], 1), Some(b));
        assert_eq!(pick(&[a, b], 2), Some(a));
    }

    /// The order turns are taken in is the same however the resolver
    /// orders the answer, differs between edges, skips addresses without
    /// a route and lists each address once; with no route at all, none.
    #[test]
    fn the_dial_order_holds_across_answers_and_spreads_edges() {
        let addrs: Vec<SocketAddr> = ["192.0.2.1:8443", "192.0.2.2:8443", "192.0.2.3:8443"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let all = |_: &SocketAddr| true;
        let order = dial_order(&addrs, "edge-a", all);
        assert_eq!(order.len(), 3);
        let mut rotated = addrs.clone();
        for _ in 0..3 {
            rotated.rotate_left(1);
            assert_eq!(dial_order(&rotated, "edge-a", all), order);
        }
        let twice: Vec<SocketAddr> = addrs.iter().chain(&addrs).copied().collect();
        assert_eq!(dial_order(&twice, "edge-a", all), order);
        // A fleet's first choices cover every address.
        let firsts: std::collections::BTreeSet<SocketAddr> = (0..60)
            .map(|i| dial_order(&addrs, &format!("edge-{i}"), all)[0])
            .collect();
        assert_eq!(firsts.len(), 3, "first choices {firsts:?}");
        // An IPv6 address without a route is not dialled; nothing routed,
        // nothing to dial.
        let v6: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        let with_v6: Vec<SocketAddr> = addrs.iter().copied().chain([v6]).collect();
        assert_eq!(
            dial_order(&with_v6, "edge-a", |a: &SocketAddr| a.is_ipv4()),
            order
        );
        assert!(dial_order(&addrs, "edge-a", |_: &SocketAddr| false).is_empty());
    }

    /// `tcp_fallback_port` replaces the relay's port in what the proxy is
    /// asked for, host names and IPv6 literals alike.
    #[test]
    fn the_fallback_port_goes_into_the_proxy_target() {
        let (mut cfg, _) = test_cfg("relay.example:4433");
        assert_eq!(tcp_target(&cfg), "relay.example:4433");
        cfg.tcp_fallback_port = Some(443);
        assert_eq!(tcp_target(&cfg), "relay.example:443");
        cfg.relay = "[2001:db8::1]:4433".into();
        assert_eq!(tcp_target(&cfg), "[2001:db8::1]:443");
    }

    /// An edge config for `relay` with test certificates, and the client
    /// TLS config to dial with.
    fn test_cfg(relay: &str) -> (EdgeConfig, rustls::ClientConfig) {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        (
            EdgeConfig::new("edge-a", relay, "relay.test", tls),
            client_tls,
        )
    }

    /// A local TCP address nothing listens on (connections refused).
    /// A QUIC relay endpoint on a free loopback port, with `pki`'s relay
    /// certificate.
    fn loopback_relay(pki: &relay_transport::devcerts::DevPki) -> quinn::Endpoint {
        relay_transport::quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &pki.relay_material().unwrap(),
            &relay_transport::quic::QuicTuning::default(),
            false,
        )
        .unwrap()
    }

    fn refusing_tcp() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Real sockets: the first address refuses the TCP connection (no
    /// answer), so the next attempt dials the second; that one accepts and
    /// closes at once (its TLS fails: the relay answered), so the turn
    /// stays and the attempt after dials it again.
    #[tokio::test]
    async fn after_a_silent_address_the_next_attempt_dials_the_next_and_stays() {
        let refused = refusing_tcp();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = l.local_addr().unwrap();
        let (tx, mut reached) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
                let _ = tx.send(());
            }
        });
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Tcp, false, false);
        let addrs = [refused, live];

        assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
        assert_eq!(dialer.turn(), 1);
        assert!(
            reached.try_recv().is_err(),
            "the second address was dialled first"
        );
        assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
        reached.recv().await.unwrap();
        assert_eq!(dialer.turn(), 1, "a TLS failure moved the turn");
        assert!(dialer.dial_any(&addrs, client_tls).await.is_err());
        reached.recv().await.unwrap();
    }

    /// A relay that answers QUIC with a refusal (draining, or over its
    /// handshake limit) is reached at that address: the next attempt dials
    /// it again, in `auto` (no TCP fallback: the answer shows UDP works)
    /// and in `quic` mode, rather than the next address (the blackholed
    /// IPv6 one on a dual-stack edge).
    #[tokio::test]
    async fn an_answered_refusal_does_not_advance() {
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let (cfg, client_tls) = test_cfg("relay.test:8443");
        let relay = loopback_relay(&pki);
        let refusing = relay.local_addr().unwrap();
        let (tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                incoming.refuse();
                let _ = tx.send(());
            }
        });
        let stats = EdgeStats::default();
        let addrs = [refusing, refusing_tcp()];
        for mode in [TransportMode::Auto, TransportMode::Quic] {
            let dialer = dialer_for(&cfg, &stats, mode, false, false);
            assert!(dialer.dial_any(&addrs, client_tls.clone()).await.is_err());
            refused.recv().await.unwrap();
            assert_eq!(dialer.turn(), 0, "{mode:?}: a refusal moved the turn");
        }
        assert_eq!(
            stats.fallbacks.load(Relaxed),
            0,
            "an answer is no reason for TCP"
        );
    }

    /// In `auto`, an address silent on QUIC (nothing listens on its UDP
    /// port) whose TCP fallback is refused gave no answer at all: the
    /// next attempt dials the next address.
    #[tokio::test]
    async fn in_auto_an_address_silent_on_quic_and_tcp_advances() {
        let (mut cfg, client_tls) = test_cfg("relay.test:8443");
        cfg.quic_fallback_after = std::time::Duration::from_millis(200);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let addrs = [refusing_tcp(), refusing_tcp()];
        assert!(dialer.dial_any(&addrs, client_tls).await.is_err());
        assert_eq!(stats.fallbacks.load(Relaxed), 1, "QUIC got no answer");
        assert_eq!(dialer.turn(), 1);
    }

    /// Each relay name (one per replica's loop) has its own turn, and a
    /// QUIC probe's failure never moves one.
    #[tokio::test]
    async fn turns_are_per_relay_name_and_probes_leave_them() {
        let (cfg_a, client_tls) = test_cfg("relay-a.test:8443");
        let (cfg_b, _) = test_cfg("relay-b.test:8443");
        let stats = EdgeStats::default();
        let dialer = |cfg, probe| dialer_for(cfg, &stats, TransportMode::Tcp, false, probe);
        let addrs = [refusing_tcp(), refusing_tcp()];
        assert!(dialer(&cfg_a, false)
            .dial_any(&addrs, client_tls.clone())
            .await
            .is_err());
        assert_eq!(dialer(&cfg_a, false).turn(), 1);
        assert_eq!(
            dialer(&cfg_b, false).turn(),
            0,
            "another replica's turn moved"
        );
        assert!(dialer(&cfg_b, true)
            .dial_any(&addrs, client_tls)
            .await
            .is_err());
        assert_eq!(dialer(&cfg_b, false).turn(), 0, "a probe moved the turn");
        assert_eq!(dialer(&cfg_a, false).turn(), 1);
    }

    /// A QUIC probe walks the relay name's addresses: the one whose turn
    /// it is swallows UDP (TCP may work there, as on an IPv6 path that
    /// passes TCP only), the next answers QUIC; the probe gets its session
    /// there and moves the turn to it.
    #[tokio::test]
    async fn a_quic_probe_tries_each_address() {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let relay = loopback_relay(&pki);
        let live = relay.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        // Held until the edge closes it.
                        conn.closed().await;
                    }
                });
            }
        });
        let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent = hole.local_addr().unwrap();
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        let mut cfg = EdgeConfig::new("edge-a", "relay.test:8443", "relay.test", tls);
        cfg.quic_fallback_after = Duration::from_millis(300);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Quic, false, true);
        let (ep, conn) = dialer
            .dial_any(&[silent, live], client_tls)
            .await
            .expect("the second address answers QUIC");
        assert!(ep.is_some());
        assert_eq!(conn.remote_addr(), live);
        assert_eq!(
            dialer.turn(),
            1,
            "the turn moved to the address QUIC answers"
        );
        drop(hole);
    }

    /// Real QUIC and TCP on one port, as the relay binds them, with a relay
    /// that answers a QUIC handshake only after 1.5 s (its handshake queue
    /// full): an edge with nothing to go by falls back to TCP after
    /// `quic_fallback_after`; an edge whose other session runs on QUIC
    /// waits for the answer and stays on QUIC.
    #[tokio::test]
    async fn with_quic_live_elsewhere_a_slow_answer_is_awaited_not_fallen_back_from() {
        use std::time::{Duration, Instant};
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        // An ephemeral UDP port whose TCP twin is free (another test may
        // hold it): a few tries.
        let mut bound = None;
        for _ in 0..20 {
            let relay = loopback_relay(&pki);
            let addr = relay.local_addr().unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                bound = Some((relay, addr, tcp));
                break;
            }
        }
        let (relay, addr, tcp) = bound.expect("no UDP port with its TCP twin free in 20 tries");
        let busy = Duration::from_millis(1500);
        // Each handshake answered after `busy`, as a full queue would; the
        // abandoned first one times out on its own.
        let (done, mut answered) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(incoming) = relay.accept().await {
                let done = done.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(busy).await;
                    if let Ok(conn) = incoming.await {
                        let _ = done.send(conn);
                    }
                });
            }
        });
        // The fallback's TCP connection: counted, then closed (its TLS fails).
        let tcp_accepts = tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Ok((s, _))) =
                tokio::time::timeout(Duration::from_secs(4), tcp.accept()).await
            {
                drop(s);
                n += 1;
            }
            n
        });
        let tls = pki.node_material("edge-a").unwrap();
        let client_tls = tls.client_config(relay_protocol::ALPN).unwrap();
        let mut cfg = EdgeConfig::new("edge-a", addr.to_string(), "relay.test", tls);
        cfg.quic_fallback_after = Duration::from_millis(300);
        cfg.handshake_timeout = Duration::from_secs(5);
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);

        // Nothing known about UDP: silence past the fallback timer moves to TCP.
        let first = dialer.dial_addr(addr, client_tls.clone()).await;
        assert!(first.is_err(), "the TCP side has no TLS server");
        assert_eq!(stats.fallbacks.load(Relaxed), 1);

        // Another session on QUIC: the same silence is waited out.
        stats.quic_sessions_live.store(1, Relaxed);
        let started = Instant::now();
        let (_ep, conn) = dialer.dial_addr(addr, client_tls).await.unwrap();
        assert_eq!(conn.kind(), relay_transport::TransportKind::Quic);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(stats.fallbacks.load(Relaxed), 1, "no second fallback");
        let answered = tokio::time::timeout(Duration::from_secs(5), answered.recv()).await;
        assert!(matches!(answered, Ok(Some(_))), "the relay answered it");
        assert_eq!(tcp_accepts.await.unwrap(), 1);
    }
}
