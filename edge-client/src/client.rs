//! The edge client: dial out, register, serve the relay's streams,
//! reconnect with backoff when the session ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use relay_protocol::codec::{
    self, decode, decode_control, decode_with_rest, read_frame_bytes, write_frame, Incoming,
};
use relay_protocol::{
    capability, close_code, Cidr, ClientHello, Control, HelloReply, RejectReason, Rejection,
    Replica, ServerHelloExt, EDGE_FLOW_BIT, PROTOCOL_VERSION,
};
use relay_transport::udp::FlowTable;
use relay_transport::{quic, BiStream, Direction, Meter, TunnelConn};
use tokio::sync::watch;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{EdgeConfig, TransportMode};
use crate::identity::{clock_hint, Credentials, IdentityError};
use crate::liveness::{Liveness, Tick, DEAD_AFTER_KEEPALIVES};
use crate::serve::{serve_stream, ServedRoutes, ServedSet};
use crate::services::EdgeServices;

/// Where the client is in its life cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeState {
    /// Dialing the relay (attempt number since the last session).
    Connecting {
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// Registered with the relay.
    Connected {
        /// Session id assigned by the relay.
        session_id: u64,
        /// Session generation.
        generation: u64,
        /// Which replica.
        relay_id: String,
        /// Prefixes the relay asks us to send back through the tunnel.
        tunnel_routes: Vec<Cidr>,
        /// Prefixes this edge serves (the relay's word if it decides,
        /// else the config's); never captured.
        served_routes: Vec<Cidr>,
        /// The relay replicas this relay says to hold a session to each;
        /// `None` until it says (a relay without a replica set never does:
        /// one session is all).
        replicas: Option<Vec<Replica>>,
    },
    /// The relay refused the last handshake (retrying with backoff).
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The relay's explanation.
        message: String,
    },
    /// Shut down.
    Stopped,
}

/// Counters of one edge client (all sessions).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Streams being served now.
    pub open_streams: AtomicU64,
    /// Streams the relay opened, in total.
    pub streams_total: AtomicU64,
    /// Streams refused because the target is outside our routes or ports.
    pub denied: AtomicU64,
    /// Streams whose dial failed.
    pub dial_failures: AtomicU64,
    /// Bytes sent to the relay.
    pub bytes_up: AtomicU64,
    /// Bytes received from the relay.
    pub bytes_down: AtomicU64,
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Times the client fell back from QUIC to TLS over TCP.
    pub fallbacks: AtomicU64,
    /// Control messages of a newer protocol revision, ignored.
    pub control_unknown: AtomicU64,
    /// Round-trip time of the edge's last answered control ping, in
    /// microseconds (0 before the first pong). Measured ping → pong on the
    /// control stream, so on a congested uplink it includes the queueing
    /// delay the tunnel's traffic sees (unlike QUIC's own RTT estimate,
    /// which quinn takes from acknowledgements).
    pub control_rtt_us: AtomicU64,
    /// The largest control RTT seen, in microseconds.
    pub control_rtt_max_us: AtomicU64,
    /// Pongs that arrived after the next ping had been sent (late, but
    /// within the dead-path bound, so the session was kept).
    pub pongs_late: AtomicU64,
    /// UDP flow counters.
    pub udp: Arc<relay_transport::udp::UdpStats>,
    /// The captured-connection bound (`capture.max_connections`) and its
    /// refusal count; set once capture runs.
    pub capture_bound: std::sync::OnceLock<relay_transport::conn::AcceptBound>,
}

impl Meter for EdgeStats {
    fn add(&self, dir: Direction, bytes: u64) {
        // ToTunnel here is from the local target towards the relay.
        match dir {
            Direction::ToTunnel => self.bytes_up.fetch_add(bytes, Relaxed),
            Direction::FromTunnel => self.bytes_down.fetch_add(bytes, Relaxed),
        };
    }
}

/// A running edge client.
pub struct EdgeClient {
    state: watch::Receiver<EdgeState>,
    stats: Arc<EdgeStats>,
    services: Arc<EdgeServices>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    capture: Option<tokio::task::JoinHandle<()>>,
    dns: Option<crate::dns::Resolver>,
}

/// Starting the client failed (only possible with capture on).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Binding the transparent listener failed.
    #[error("transparent listener on {addr}: {source}")]
    Listener {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Installing capture (nftables, policy routing) failed.
    #[error("installing capture: {0}")]
    Capture(#[from] relay_transport::capture::CaptureError),
    /// Starting the node-local resolver failed.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

impl EdgeClient {
    /// Starts the client without capture; it connects in the background
    /// and keeps reconnecting until [`EdgeClient::shutdown`]. A capture
    /// setting in `cfg` is ignored here (with an error logged): use
    /// [`EdgeClient::start`], which can report capture failures.
    pub fn spawn(mut cfg: EdgeConfig) -> Self {
        if cfg.capture.take().is_some() {
            tracing::error!("EdgeClient::spawn ignores capture; use EdgeClient::start");
        }
        if cfg.dns.take().is_some() {
            tracing::error!("EdgeClient::spawn ignores dns; use EdgeClient::start");
        }
        Self::launch(cfg, None, None)
    }

    /// Starts the client, first installing capture when configured (so a
    /// node without CAP_NET_ADMIN fails here, loudly, not later).
    /// The node-local resolver starts here too when configured.
    pub async fn start(cfg: EdgeConfig) -> Result<Self, StartError> {
        let dns = match cfg.dns.clone() {
            Some(d) => Some(crate::dns::Resolver::spawn(d, CancellationToken::new()).await?),
            None => None,
        };
        let Some(ccfg) = cfg.capture.clone() else {
            return Ok(Self::launch(cfg, None, dns));
        };
        let addr = SocketAddr::from(([0, 0, 0, 0], ccfg.port));
        let listener = relay_transport::capture::capture_tcp_listener(ccfg.port)
            .map_err(|source| StartError::Listener { addr, source })?;
        let udp_addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, ccfg.port);
        let udp = relay_transport::udp::RedirectUdp::bind(ccfg.port).map_err(|source| {
            StartError::Listener {
                addr: udp_addr.into(),
                source,
            }
        })?;
        let cap = relay_transport::capture::Capture::install(ccfg).await?;
        Ok(Self::launch(
            cfg,
            Some(crate::capture::Parts {
                cap,
                tcp: listener,
                udp,
            }),
            dns,
        ))
    }

    fn launch(
        cfg: EdgeConfig,
        capture: Option<crate::capture::Parts>,
        dns: Option<crate::dns::Resolver>,
    ) -> Self {
        let (tx, rx) = watch::channel(EdgeState::Connecting { attempt: 1 });
        let (conn_tx, conn_rx) = watch::channel(None);
        let stats = Arc::new(EdgeStats::default());
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("edge", node = %cfg.node);
        let cfg = Arc::new(cfg);
        let served = Arc::new(ServedSet::from_config(&cfg));
        let creds = Arc::new(Credentials::new(&cfg));
        let services = Arc::new(EdgeServices::default());
        let capture = capture.map(|parts| {
            let t = crate::capture::run(
                parts,
                cfg.clone(),
                rx.clone(),
                conn_rx,
                services.clone(),
                stats.clone(),
                cancel.clone(),
            );
            tokio::spawn(t.instrument(span.clone()))
        });
        // One session, or one per relay replica when the relay advertises
        // a replica set (see `supervisor`).
        let task = tokio::spawn(
            crate::supervisor::supervise(
                cfg,
                served,
                services.clone(),
                creds,
                tx,
                conn_tx,
                stats.clone(),
                cancel.clone(),
                dns.clone(),
            )
            .instrument(span),
        );
        EdgeClient {
            state: rx,
            stats,
            services,
            cancel,
            task,
            capture,
            dns,
        }
    }

    /// The node-local resolver, when `[dns]` is on.
    pub fn dns(&self) -> Option<&crate::dns::Resolver> {
        self.dns.as_ref()
    }

    /// The current state.
    pub fn state(&self) -> EdgeState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn watch(&self) -> watch::Receiver<EdgeState> {
        self.state.clone()
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<EdgeStats> {
        &self.stats
    }

    /// The ClusterIP table the relay sent (empty until it does).
    pub fn services(&self) -> &Arc<EdgeServices> {
        &self.services
    }

    /// Waits (at most `timeout`) until the client is connected; returns
    /// `(session_id, generation)`.
    pub async fn wait_connected(&self, timeout: Duration) -> Option<(u64, u64)> {
        let mut rx = self.state.clone();
        let fut = async move {
            let s = rx
                .wait_for(|s| matches!(s, EdgeState::Connected { .. }))
                .await
                .ok()?;
            match &*s {
                EdgeState::Connected {
                    session_id,
                    generation,
                    ..
                } => Some((*session_id, *generation)),
                _ => None,
            }
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }

    /// Closes the session (streams are reset) and stops reconnecting.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            warn!("edge client did not stop within 5s");
        }
        // Capture is removed last, awaited rather than aborted, so the node
        // keeps nothing of ours.
        if let Some(c) = self.capture {
            if tokio::time::timeout(Duration::from_secs(15), c)
                .await
                .is_err()
            {
                warn!("removing capture timed out");
            }
        }
        if let Some(d) = self.dns {
            d.shutdown().await;
        }
    }
}

/// Why an attempt ended without a session.
#[derive(Debug)]
enum AttemptError {
    Rejected(Rejection),
    Failed(String),
}

/// The current session's connection, for streams the edge opens.
pub(crate) type ConnWatch = watch::Receiver<Option<(TunnelConn, Arc<FlowTable>)>>;

/// One relay's reconnect loop: dial `cfg.relay`, run the session, back off,
/// again, until `cancel`. The supervisor runs one per replica.
// The session's shared parts, passed once at start; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    cfg: Arc<EdgeConfig>,
    served: Arc<ServedSet>,
    services: Arc<EdgeServices>,
    creds: Arc<Credentials>,
    state: watch::Sender<EdgeState>,
    conn_tx: watch::Sender<Option<(TunnelConn, Arc<FlowTable>)>>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
    dns: Option<crate::dns::Resolver>,
) {
    let mut backoff = Backoff::new(cfg.backoff.clone());
    let mut attempt = 0u32;
    // A session already established (a QUIC probe that succeeded while on
    // the TCP fallback): run it next, with no delay.
    let mut next: Option<Connected> = None;
    loop {
        let result = match next.take() {
            Some(c) => Ok(c),
            None => {
                attempt = attempt.saturating_add(1);
                state.send_replace(EdgeState::Connecting { attempt });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    // Twice the handshake bound: a certificate bootstrap may
                    // come first (its own connection and a token review).
                    r = tokio::time::timeout(cfg.handshake_timeout * 2, connect(&cfg, &stats, cfg.transport, &creds)) => match r {
                        Ok(r) => r,
                        Err(_) => Err(AttemptError::Failed(format!("no session within {:?}", cfg.handshake_timeout * 2))),
                    },
                }
            }
        };
        let mut min_delay = Duration::ZERO;
        match result {
            Ok(Connected {
                endpoint,
                conn,
                hello,
                ext,
                control,
            }) => {
                attempt = 0;
                stats.sessions.fetch_add(1, Relaxed);
                info!(
                    session = hello.session_id,
                    gen = hello.generation,
                    relay = %hello.relay_id,
                    remote = %conn.remote_addr(),
                    transport = conn.kind().as_str(),
                    "session up"
                );
                // A relay that decides claims says what we serve; with an
                // older relay, our config does.
                served.set(match ext {
                    Some(x) => ServedRoutes {
                        routes: x.served_routes,
                        primary: x.primary_addr,
                    },
                    None => ServedRoutes {
                        routes: cfg.routes.clone(),
                        primary: cfg.primary_addr,
                    },
                });
                state.send_replace(EdgeState::Connected {
                    session_id: hello.session_id,
                    generation: hello.generation,
                    relay_id: hello.relay_id.clone(),
                    tunnel_routes: hello.tunnel_routes.clone(),
                    served_routes: served.get().routes.clone(),
                    replicas: None,
                });
                let up = Instant::now();
                // Flows live and die with the session.
                let flows = FlowTable::new(EDGE_FLOW_BIT, cfg.max_udp_flows, stats.udp.clone());
                tokio::spawn(relay_transport::udp::pump_datagrams(
                    conn.clone(),
                    flows.clone(),
                ));
                conn_tx.send_replace(Some((conn.clone(), flows.clone())));
                let span = tracing::info_span!(
                    "session",
                    session = hello.session_id,
                    gen = hello.generation
                );
                let end = run_session(
                    &conn,
                    &flows,
                    control,
                    &cfg,
                    &served,
                    &services,
                    &creds,
                    &stats,
                    &cancel,
                    &state,
                    dns.as_ref(),
                )
                .instrument(span)
                .await;
                conn_tx.send_replace(None);
                if up.elapsed() >= backoff.config().reset_after {
                    backoff.reset();
                }
                if let Some(ep) = endpoint {
                    ep.close(close_code::NORMAL.into(), b"");
                }
                match end {
                    SessionEnd::Upgrade(c) => {
                        info!(uptime = ?up.elapsed(), transport = c.conn.kind().as_str(), "moving the session to its new connection");
                        next = Some(*c);
                        continue;
                    }
                    SessionEnd::Lost(why) => {
                        info!(reason = %why, uptime = ?up.elapsed(), "session down")
                    }
                }
            }
            Err(AttemptError::Rejected(r)) => {
                warn!(reason = r.reason.as_str(), message = %r.message, "relay rejected the session");
                min_delay = Duration::from_millis(r.retry_after_ms.unwrap_or(0).into());
                state.send_replace(EdgeState::Rejected {
                    reason: r.reason,
                    message: r.message,
                });
            }
            Err(AttemptError::Failed(e)) => warn!(error = %e, attempt, "cannot reach relay"),
        }
        if cancel.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay(&mut rand::rng()).max(min_delay);
        debug!(?delay, "reconnecting after delay");
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    state.send_replace(EdgeState::Stopped);
}

/// The relay closed this session. When a move of ours is under way (a QUIC
/// probe from the TCP fallback, or a session with a renewed certificate),
/// that is usually the move itself: its new session registered and
/// superseded this one, and the relay closed this one before the move's
/// task read its answer. Let the move finish (bounded) rather than drop
/// it: dropping it would close the new session too, and the node's routes
/// would leave the relay until a reconnect after backoff.
async fn finish_move(
    pending: [&mut Option<AbortOnDropHandle<Result<Connected, AttemptError>>>; 2],
    limit: Duration,
    why: String,
) -> SessionEnd {
    for p in pending {
        if let Some(p) = p.take() {
            if let Ok(Ok(Ok(c))) = tokio::time::timeout(limit, p).await {
                return SessionEnd::Upgrade(Box::new(c));
            }
        }
    }
    SessionEnd::Lost(why)
}

/// An established, registered session.
struct Connected {
    /// The QUIC endpoint (none on the TCP fallback).
    endpoint: Option<quinn::Endpoint>,
    conn: TunnelConn,
    hello: relay_protocol::ServerHello,
    /// What the relay says we serve (relays that decide claims).
    ext: Option<ServerHelloExt>,
    control: BiStream,
}

/// Why a session's loop ended.
enum SessionEnd {
    /// The session is gone; reconnect after backoff.
    Lost(String),
    /// A QUIC session replaced this TCP one; run it now.
    Upgrade(Box<Connected>),
}

fn failed(what: &str, e: &dyn std::fmt::Display) -> AttemptError {
    AttemptError::Failed(format!("{what}: {e}"))
}

/// Dials the relay over the transport a mode asks for (in `Auto`: QUIC,
/// falling back to TLS over TCP when QUIC cannot complete a handshake
/// within `quic_fallback_after`), with a given TLS client config: the
/// tunnel's (node certificate) or the certificate bootstrap's (none).
pub(crate) struct Dialer<'a> {
    cfg: &'a EdgeConfig,
    stats: &'a EdgeStats,
    mode: TransportMode,
}

impl Dialer<'_> {
    /// A connection to the relay (no hello yet), and its QUIC endpoint.
    pub(crate) async fn dial(
        &self,
        tls: rustls::ClientConfig,
    ) -> Result<(Option<quinn::Endpoint>, TunnelConn), String> {
        let cfg = self.cfg;
        let addr: SocketAddr = tokio::net::lookup_host(&cfg.relay)
            .await
            .map_err(|e| format!("resolve {}: {e}", cfg.relay))?
            .next()
            .ok_or_else(|| format!("resolve {}: no address", cfg.relay))?;
        let mark = cfg.capture.as_ref().map(|c| c.own_mark).unwrap_or(0);
        let tcp = |tls: rustls::ClientConfig| async move {
            relay_transport::tcp::connect_with(
                addr,
                &cfg.server_name,
                tls,
                mark,
                cfg.handshake_timeout,
            )
            .await
            .map_err(|e| e.0)
        };
        match self.mode {
            TransportMode::Quic => {
                let (ep, c) = quic_transport(cfg, addr, mark, tls).await?;
                Ok((Some(ep), c))
            }
            TransportMode::Tcp => Ok((None, tcp(tls).await?)),
            TransportMode::Auto => {
                let quic = quic_transport(cfg, addr, mark, tls.clone());
                match tokio::time::timeout(cfg.quic_fallback_after, quic).await {
                    Ok(Ok((ep, c))) => Ok((Some(ep), c)),
                    quic => {
                        let why = match quic {
                            Ok(Err(e)) => e,
                            _ => format!("no QUIC handshake within {:?}", cfg.quic_fallback_after),
                        };
                        self.stats.fallbacks.fetch_add(1, Relaxed);
                        warn!(reason = %why, "QUIC unavailable; falling back to TLS over TCP");
                        Ok((None, tcp(tls).await?))
                    }
                }
            }
        }
    }
}

/// A QUIC connection to `addr` (no hello yet).
async fn quic_transport(
    cfg: &EdgeConfig,
    addr: SocketAddr,
    mark: u32,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Endpoint, TunnelConn), String> {
    // A fresh endpoint per attempt: matches the relay's address family and
    // starts from a new source port if the old NAT binding went bad.
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let endpoint = quic::client_endpoint_with(bind, tls, &cfg.quic, mark)
        .map_err(|e| format!("endpoint: {e}"))?;
    let connecting = endpoint
        .connect(addr, &cfg.server_name)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let conn = connecting
        .await
        .map_err(|e| clock_hint(&format!("QUIC/TLS to {addr}: {e}")))?;
    Ok((endpoint, TunnelConn::Quic(conn)))
}

/// Obtains the certificate to dial with (bootstrapping or renewing it
/// first when needed), dials the relay over the transport `mode` asks for,
/// then says hello.
async fn connect(
    cfg: &EdgeConfig,
    stats: &EdgeStats,
    mode: TransportMode,
    creds: &Credentials,
) -> Result<Connected, AttemptError> {
    let dialer = Dialer { cfg, stats, mode };
    let material = creds.material(cfg, &dialer).await.map_err(|e| match e {
        IdentityError::Refused(r) => AttemptError::Rejected(r),
        IdentityError::Failed(m) => AttemptError::Failed(m),
    })?;
    let tls = material
        .client_config(relay_protocol::ALPN)
        .map_err(|e| failed("tls config", &e))?;
    let (endpoint, conn) = dialer.dial(tls).await.map_err(AttemptError::Failed)?;
    let (hello, ext, control) = say_hello(cfg, stats, &conn).await?;
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

#[allow(clippy::too_many_arguments)]
async fn run_session(
    conn: &TunnelConn,
    flows: &Arc<FlowTable>,
    control: BiStream,
    cfg: &Arc<EdgeConfig>,
    served: &Arc<ServedSet>,
    services: &EdgeServices,
    creds: &Arc<Credentials>,
    stats: &Arc<EdgeStats>,
    cancel: &CancellationToken,
    state: &watch::Sender<EdgeState>,
    dns: Option<&crate::dns::Resolver>,
) -> SessionEnd {
    let BiStream { mut send, recv } = control;
    // Service names for the resolver, put together per session.
    let mut names = dns.map(crate::dns::Resolver::batch);
    let mut frames = FramedRead::new(recv, codec::frame_codec());
    // Tunnel routes being assembled from RouteDelta frames; published to
    // the state (and so to capture) only when a batch is complete, so the
    // kernel never sees half of a large update.
    let mut routes: std::collections::BTreeSet<Cidr> = match &*state.borrow() {
        EdgeState::Connected { tunnel_routes, .. } => tunnel_routes.iter().copied().collect(),
        _ => Default::default(),
    };
    // The relay pings every keep-alive interval; a relay silent for the
    // idle timeout is gone (this is the only liveness check on TCP); the
    // edge pings every interval too (see the tick arm).
    let mut last_heard = Instant::now();
    // Our pings: a ping unanswered for two keep-alive intervals means the
    // path is gone (e.g. the NAT rebound and dropped the relay's reset), so
    // we reconnect within 3 × keep-alive instead of waiting for the idle
    // timeout, while a late pong on a congested uplink costs nothing.
    let mut liveness = Liveness::new(cfg.quic.keepalive);
    let mut rtt_logged: Option<Instant> = None;
    let mut svc_batch = crate::services::Batch::default();
    // The first ping at a random point of the first interval, not at once:
    // edges that connected together (after a relay restart, a thousand
    // within seconds) then ping spread over the interval, not in one burst
    // the relay answers while its data path waits. The dead-path bound is
    // unchanged: later pings still leave every interval.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.quic.keepalive.mul_f64(rand::random::<f64>()),
        cfg.quic.keepalive,
    );
    // A tick delayed (a busy runtime) must not fire a burst of pings that
    // would then all count as in flight.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // On the TCP fallback in auto mode, keep trying QUIC in the background.
    let probing =
        cfg.transport == TransportMode::Auto && conn.kind() == relay_transport::TransportKind::Tcp;
    let mut probe_at = tokio::time::Instant::now() + cfg.quic_probe_interval;
    // Owned: dropping it (the session ends, the client shuts down) aborts
    // the probe, so a probe can never outlive its session and register a
    // QUIC session that supersedes a newer one (or appears after shutdown).
    let mut probe: Option<AbortOnDropHandle<Result<Connected, AttemptError>>> = None;
    // Certificate renewal (bootstrap identity): at two thirds of the
    // certificate's life a new one is obtained and the session moves to a
    // new connection that uses it; owned like the probe.
    let mut renew_at = creds.renew_at(cfg).map(|t| {
        tokio::time::Instant::now()
            + t.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
    });
    let mut renewal: Option<AbortOnDropHandle<Result<Connected, AttemptError>>> = None;
    loop {
        let reply = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                conn.close(close_code::NORMAL, "edge shutting down");
                return SessionEnd::Lost("shutdown".into());
            }
            why = conn.closed() => {
                return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, why).await;
            }
            bi = conn.accept_bi() => match bi {
                Ok(bi) => {
                    let f = (conn.clone(), flows.clone());
                    tokio::spawn(serve_stream(bi, f, cfg.clone(), served.clone(), stats.clone()).in_current_span());
                    continue;
                }
                Err(e) => {
                    return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, e.to_string()).await;
                }
            },
            f = frames.next() => match f {
                Some(Ok(bytes)) => {
                    last_heard = Instant::now();
                    let msg = match decode_control(&bytes) {
                        Ok(Incoming::Known { msg, .. }) => msg,
                        Ok(Incoming::Unknown { variant }) => {
                            // A newer relay's message: ignore it, so rolling
                            // upgrades never cost a session.
                            stats.control_unknown.fetch_add(1, Relaxed);
                            debug!(variant, "ignoring unknown control message");
                            continue;
                        }
                        Err(e) => {
                            conn.close(close_code::PROTOCOL, "bad control frame");
                            return SessionEnd::Lost(format!("bad control frame: {e}"));
                        }
                    };
                    match msg {
                        Control::Ping { nonce } => Control::Pong { nonce },
                        Control::Pong { nonce } => {
                            let late = liveness.in_flight() > 1;
                            if let Some(rtt) = liveness.pong(nonce, Instant::now()) {
                                note_rtt(stats, rtt, late, &mut rtt_logged);
                            }
                            continue;
                        }
                        Control::RouteUpdate { tunnel_routes } => {
                            routes = tunnel_routes.iter().copied().collect();
                            publish_routes(state, tunnel_routes);
                            continue;
                        }
                        Control::RouteDelta { reset, add, remove, complete } => {
                            if reset {
                                routes.clear();
                            }
                            for c in &remove {
                                routes.remove(c);
                            }
                            routes.extend(add);
                            if complete {
                                publish_routes(state, routes.iter().copied().collect());
                            }
                            continue;
                        }
                        Control::ServedRoutes { routes, primary_addr } => {
                            info!(?routes, ?primary_addr, "relay changed what this edge serves");
                            served.set(ServedRoutes { routes: routes.clone(), primary: primary_addr });
                            state.send_modify(|s| {
                                if let EdgeState::Connected { served_routes, .. } = s {
                                    *served_routes = routes;
                                }
                            });
                            continue;
                        }
                        Control::Replicas { replicas } => {
                            // The supervisor reads it from the state and
                            // keeps one session per replica.
                            debug!(?replicas, "relay replica set");
                            state.send_modify(|s| {
                                if let EdgeState::Connected { replicas: r, .. } = s {
                                    *r = Some(replicas);
                                }
                            });
                            continue;
                        }
                        msg @ Control::ServiceDelta { .. } => {
                            svc_batch.apply(&msg, services);
                            continue;
                        }
                        Control::ServiceNames { reset, cluster_domain, upsert, remove, complete } => {
                            if let Some(n) = names.as_mut() {
                                n.frame(reset, cluster_domain, upsert, remove, complete);
                            }
                            continue;
                        }
                        Control::GoAway { reason, grace_ms } => {
                            // The relay stops opening streams and closes when
                            // the in-flight ones are done; we reconnect then.
                            info!(%reason, grace_ms, "relay sent GOAWAY");
                            continue;
                        }
                        _ => continue,
                    }
                }
                Some(Err(e)) => {
                    conn.close(close_code::PROTOCOL, "bad control frame");
                    return SessionEnd::Lost(format!("control stream: {e}"));
                }
                None => {
                    let why = "relay closed the control stream".to_string();
                    return finish_move([&mut probe, &mut renewal], cfg.handshake_timeout, why).await;
                }
            },
            _ = tick.tick() => {
                if last_heard.elapsed() > cfg.quic.idle_timeout {
                    conn.close(close_code::PROTOCOL, "relay silent");
                    return SessionEnd::Lost(format!("nothing from the relay for {:?}", last_heard.elapsed()));
                }
                // The edge pings too: after a NAT rebinding an idle TCP
                // session would otherwise send nothing until its idle
                // timeout, while the relay's pings die at the NAT. Our ping
                // leaves through the new mapping, the relay's kernel resets
                // the unknown connection, and we reconnect in seconds.
                match liveness.tick(Instant::now(), rand::random()) {
                    Tick::Ping(nonce) => Control::Ping { nonce },
                    Tick::Dead(age) => {
                        conn.close(close_code::PROTOCOL, "ping unanswered");
                        return SessionEnd::Lost(format!(
                            "no answer to a ping for {age:?} ({} in flight)",
                            liveness.in_flight()
                        ));
                    }
                }
            }
            _ = sleep_until_some(renew_at), if renew_at.is_some() && renewal.is_none() => {
                let (cfg, stats, creds) = (cfg.clone(), stats.clone(), creds.clone());
                let limit = cfg.handshake_timeout * 2;
                renewal = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    let work = async {
                        let dialer = Dialer { cfg: &cfg, stats: &stats, mode: cfg.transport };
                        creds.renew(&cfg, &dialer).await.map_err(|e| match e {
                            IdentityError::Refused(r) => AttemptError::Rejected(r),
                            IdentityError::Failed(m) => AttemptError::Failed(m),
                        })?;
                        connect(&cfg, &stats, cfg.transport, &creds).await
                    };
                    tokio::time::timeout(limit, work)
                        .await
                        .unwrap_or_else(|_| Err(AttemptError::Failed(format!("no renewed session within {limit:?}"))))
                })));
                continue;
            }
            r = async {
                match renewal.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if renewal.is_some() => {
                renewal = None;
                match r {
                    Ok(Ok(c)) => {
                        info!("certificate renewed; moving the session to it");
                        return SessionEnd::Upgrade(Box::new(c));
                    }
                    Ok(Err(e)) => {
                        // The current certificate is still valid: try again
                        // in a minute, until it is not.
                        warn!(error = ?e, "certificate renewal failed; retrying in 60s");
                        renew_at = Some(tokio::time::Instant::now() + Duration::from_secs(60));
                    }
                    Err(e) => warn!(error = %e, "certificate renewal task failed"),
                }
                continue;
            }
            _ = tokio::time::sleep_until(probe_at), if probing && probe.is_none() => {
                let (cfg, stats, creds) = (cfg.clone(), stats.clone(), creds.clone());
                // A full QUIC session: registering it supersedes this one on
                // the relay, in one step, so the routes never go away.
                // Bounded like any attempt, so a probe into a black hole
                // ends and the next one can start.
                let limit = cfg.handshake_timeout;
                probe = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                    tokio::time::timeout(limit, connect(&cfg, &stats, TransportMode::Quic, &creds))
                        .await
                        .unwrap_or_else(|_| Err(AttemptError::Failed(format!("no QUIC session within {limit:?}"))))
                })));
                continue;
            }
            r = async {
                match probe.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if probe.is_some() => {
                probe = None;
                probe_at = tokio::time::Instant::now() + cfg.quic_probe_interval;
                match r {
                    Ok(Ok(c)) => return SessionEnd::Upgrade(Box::new(c)),
                    Ok(Err(AttemptError::Failed(e))) => debug!(error = %e, "QUIC probe failed; staying on TCP"),
                    Ok(Err(AttemptError::Rejected(r))) => debug!(reason = r.reason.as_str(), "QUIC probe rejected"),
                    Err(e) => debug!(error = %e, "QUIC probe task failed"),
                }
                continue;
            }
        };
        // Bounded: on a path that died silently (a NAT that rebound and
        // dropped the relay's reset) a write on the TCP fallback can block.
        // The same allowance as an unanswered ping (two keep-alive
        // intervals), so a write queued behind a slow uplink's backlog is
        // not mistaken for a dead path, and a write started by a tick still
        // fails within 3 × keep-alive of the path's death.
        let write_limit = cfg.quic.keepalive * DEAD_AFTER_KEEPALIVES;
        match tokio::time::timeout(write_limit, write_frame(&mut send, &reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return SessionEnd::Lost(format!("control write: {e}")),
            Err(_) => {
                conn.close(close_code::PROTOCOL, "control write stuck");
                return SessionEnd::Lost(format!("control write not done within {write_limit:?}"));
            }
        }
    }
}

/// How often the control RTT is logged at info (every pong is at debug).
const RTT_LOG_EVERY: Duration = Duration::from_secs(60);

/// Records a measured control RTT in the stats, and logs it: at debug for
/// every pong, at info once a minute (and for the first), so an operator
/// sees a degraded uplink in the edge's log without debug logging.
fn note_rtt(stats: &EdgeStats, rtt: Duration, late: bool, logged: &mut Option<Instant>) {
    let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
    stats.control_rtt_us.store(us, Relaxed);
    stats.control_rtt_max_us.fetch_max(us, Relaxed);
    if late {
        stats.pongs_late.fetch_add(1, Relaxed);
    }
    let rtt_ms = rtt.as_secs_f64() * 1000.0;
    if logged.is_none_or(|t| t.elapsed() >= RTT_LOG_EVERY) {
        *logged = Some(Instant::now());
        info!(rtt_ms, late, "control channel round trip");
    } else {
        debug!(rtt_ms, late, "control channel round trip");
    }
}

/// Sleeps until `at`; never, for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Makes a complete set of tunnel routes the session's (capture follows).
fn publish_routes(state: &watch::Sender<EdgeState>, routes: Vec<Cidr>) {
    state.send_modify(|s| {
        if let EdgeState::Connected { tunnel_routes, .. } = s {
            *tunnel_routes = routes;
        }
    });
}
