//! The edge client: dial out, register, serve the relay's streams,
//! reconnect with backoff when the session ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_protocol::{close_code, Cidr, RejectReason, Replica, EDGE_FLOW_BIT};
use relay_transport::udp::FlowTable;
use relay_transport::{Direction, Meter, TunnelConn};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{EdgeConfig, TransportMode};
use crate::dial::{connect, AttemptError, Connected};
use crate::identity::Credentials;
use crate::serve::{ServedRoutes, ServedSet};
use crate::services::EdgeServices;
use crate::session::{run_session, SessionEnd, SessionIo};

/// Where the client is in its life cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeState {
    /// Dialing the relay (attempt number since the last session).
    Connecting {
        /// 1 for the first attempt.
        attempt: u32,
        /// Why the last session ended, or the last attempt failed and then
        /// why the session before it ended (`None` before the first): what
        /// an operator reading `/readyz` during an outage needs first.
        last: Option<String>,
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
        /// Whether `tunnel_routes` is the relay's complete set. False from
        /// the hello of a relay that sends routes as deltas until the
        /// first complete batch: capture keeps the routes it had, so pod
        /// traffic to cloud ranges is never let out by the default route
        /// while a new session's routes are on their way.
        routes_complete: bool,
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
    /// Sessions QUIC carries now, to any of the relay's replicas: while
    /// there is one, UDP reaches the relay, and an unanswered QUIC attempt
    /// waits out the handshake bound instead of falling back to TCP.
    pub quic_sessions_live: AtomicU64,
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
    /// Control pings sent because data from the relay stopped dead while
    /// streams were open (QUIC; see `liveness::StallProbe`): each is a
    /// possible NAT rebinding, ended by the probe instead of a keep-alive
    /// later.
    pub stall_probes: AtomicU64,
    /// Sessions the edge gave up because its own liveness check found the
    /// path dead (nothing from the relay, or a control ping unanswered,
    /// for the dead-path bound).
    pub paths_dead: AtomicU64,
    /// QUIC sessions the relay ended with a close of its own (its idle
    /// timeout, a drain, the node deleted or refused, an operator's
    /// close). On a path dead only upstream this, not `paths_dead`, is how
    /// the edge learns: what the relay sends still arrives. The TCP
    /// fallback cannot tell a close from a loss and never counts here.
    pub closed_by_relay: AtomicU64,
    /// QUIC sessions in a row lost to a dead path soon after they came up
    /// (the edge's liveness check gave them up, or the relay closed them
    /// for hearing nothing from the edge), as counted by the reconnect loop (one per relay
    /// replica) whose QUIC session ended last; at 2 and above, that loop
    /// dials TCP first and probes QUIC less often.
    pub quic_strikes: AtomicU64,
    /// For each relay name (each replica's reconnect loop dials its own),
    /// which of its addresses the next attempt dials, modulo their number:
    /// advanced past an address that gave no answer, so a name with an
    /// IPv6 and an IPv4 address still connects where IPv6 is broken (the
    /// resolver puts IPv6 first whenever the node has an IPv6 route to
    /// it, whether or not packets get through upstream). Only a silent
    /// address moves it (and a QUIC probe that found QUIC answering at
    /// another address): a relay that answered and refused (draining,
    /// overloaded, a TLS error) is reached at that address, and moving on
    /// would send the next attempt to one that may be the broken one.
    pub relay_addr_turns: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The addresses each relay name resolved to last: dialled when the
    /// name stops resolving (the site's or carrier's DNS down while the
    /// uplink works), where a failed lookup used to fail every attempt.
    pub relay_addrs_known: std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
    /// The addresses `relay_addrs_file` held at start: dialled when a name
    /// does not resolve and has not resolved in this run either. Kept apart
    /// from `relay_addrs_known` so the short lookup bound applies only to
    /// names resolved in this run: a saved address may be stale, and a
    /// slow but working resolver must get its full time.
    pub(crate) relay_addrs_loaded:
        std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
    /// The table to save, for the saver of `relay_addrs_file` (set when a
    /// name resolves to a different set of addresses).
    pub(crate) relay_addrs_saved: watch::Sender<Option<Arc<crate::relay_addrs::SavedRelayAddrs>>>,
    /// QUIC's smoothed round-trip estimate, in microseconds, as of the last
    /// keep-alive tick (0 on TCP). Control pings are rare on QUIC (see
    /// [`relay_protocol::QUIC_CONTROL_PING`]); this follows the path every
    /// interval, and, taken from acknowledgements of what the edge sends,
    /// it includes the uplink's queueing delay.
    pub path_rtt_us: AtomicU64,
    /// The largest path RTT seen at a tick, in microseconds.
    pub path_rtt_max_us: AtomicU64,
    /// UDP flow counters.
    pub udp: Arc<relay_transport::udp::UdpStats>,
    /// The captured-connection bound (`capture.max_connections`) and its
    /// refusal count; set once capture runs.
    pub capture_bound: std::sync::OnceLock<relay_transport::conn::AcceptBound>,
    /// Tunnel routes that overlap one of this node's LANs, as capture last
    /// planned them: that part of the route is reached on the LAN, never
    /// through the relay (see `subnets`). Shown in `/metrics`, one series
    /// per route, so an operator sees which cloud range a site cannot
    /// reach without reading the edge's log, and sent to the relay
    /// ([`Control::LanOverlaps`](relay_protocol::Control::LanOverlaps))
    /// for its admin API.
    pub lan_overlaps: watch::Sender<Vec<relay_protocol::Cidr>>,
    /// 1 while capture is on the node, 0 while its install fails and is
    /// retried (see [`relay_transport::capture::Capture::uninstalled`]).
    pub capture_installed: AtomicU64,
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
    status: Option<tokio::task::JoinHandle<()>>,
    status_addr: Option<SocketAddr>,
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
    /// Binding the status endpoint (`status_listen`) failed.
    #[error("status endpoint on {addr}: {source}")]
    Status {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
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
        if cfg.status_listen.take().is_some() {
            tracing::error!("EdgeClient::spawn ignores status_listen; use EdgeClient::start");
        }
        Self::launch(cfg, None, None, None)
    }

    /// Starts the client, first installing capture when configured (so a
    /// node without CAP_NET_ADMIN fails here, loudly, not later).
    /// The node-local resolver and the status endpoint start here too when
    /// configured.
    pub async fn start(cfg: EdgeConfig) -> Result<Self, StartError> {
        let status = match cfg.status_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Status { addr, source })?,
            ),
            None => None,
        };
        let dns = match cfg.dns.clone() {
            Some(d) => Some(crate::dns::Resolver::spawn(d, CancellationToken::new()).await?),
            None => None,
        };
        let Some(ccfg) = cfg.capture.clone() else {
            return Ok(Self::launch(cfg, None, dns, status));
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
        // A capture that cannot be installed (a kernel before 5.2 has no
        // NAT chains in an `inet` table; nft missing) must not take the
        // tunnel down with it: the cloud still reaches this node's pods
        // and kubelet. It is retried every 10 s and shown in /metrics.
        let cap = match relay_transport::capture::Capture::install(ccfg.clone()).await {
            Ok(cap) => cap,
            Err(e) => {
                tracing::error!(error = %e, "installing capture failed: this node's pods do not reach the cloud through the tunnel until it succeeds (retried every 10 s; needs Linux 5.2 or later, nftables, CAP_NET_ADMIN); the tunnel runs meanwhile");
                relay_transport::capture::Capture::uninstalled(ccfg)
            }
        };
        tokio::spawn(relay_transport::capture::warn_if_socket_lb());
        let saved = cfg
            .capture_state_file
            .as_deref()
            .and_then(crate::capture_state::load_logged);
        Ok(Self::launch(
            cfg,
            Some(crate::capture::Parts {
                cap,
                tcp: listener,
                udp,
                saved,
            }),
            dns,
            status,
        ))
    }

    fn launch(
        cfg: EdgeConfig,
        capture: Option<crate::capture::Parts>,
        dns: Option<crate::dns::Resolver>,
        status: Option<tokio::net::TcpListener>,
    ) -> Self {
        let (tx, rx) = watch::channel(EdgeState::Connecting {
            attempt: 1,
            last: None,
        });
        let (conn_tx, conn_rx) = watch::channel(None);
        let stats = Arc::new(EdgeStats::default());
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("edge", node = %cfg.node);
        if let Some(path) = cfg.relay_addrs_file.clone() {
            // What the previous run resolved stands in for a failed lookup.
            let saved = span.in_scope(|| crate::relay_addrs::load_logged(&path));
            stats
                .relay_addrs_loaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(saved.names);
            let saver = relay_transport::saved::saver(
                path,
                stats.relay_addrs_saved.subscribe(),
                crate::relay_addrs::save,
                "relay addresses",
                cancel.clone(),
            );
            tokio::spawn(saver.instrument(span.clone()));
        }
        let cfg = Arc::new(cfg);
        let served = Arc::new(ServedSet::from_config(&cfg));
        let creds = Arc::new(Credentials::new(&cfg));
        // The ClusterIP table capture saved last time, if any.
        let saved_table = capture
            .as_ref()
            .and_then(|p| p.saved.as_ref())
            .map(crate::capture_state::SavedCapture::table);
        let services =
            Arc::new(saved_table.map_or_else(EdgeServices::default, EdgeServices::with_table));
        if let Some(d) = &dns {
            let saved = capture
                .as_ref()
                .and_then(|p| p.saved.as_ref())
                .and_then(|s| s.routes.as_ref())
                .map(|r| r.served.clone());
            let t = follow_dns_clients(d.clone(), cfg.clone(), rx.clone(), saved, cancel.clone());
            tokio::spawn(t.instrument(span.clone()));
        }
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
        let status_addr = status.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(addr) = status_addr {
            tracing::info!(%addr, "status endpoint listening");
        }
        let status = status.map(|l| {
            let dns_stats = dns.as_ref().map(|d| d.stats().clone());
            let t = crate::status::serve(l, rx.clone(), stats.clone(), dns_stats, cancel.clone());
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
            status,
            status_addr,
            dns,
        }
    }

    /// Where the status endpoint listens, when `status_listen` is set (the
    /// bound address: a port 0 in the config is resolved here).
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
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
        // The endpoint stopped accepting at the cancel above; what remains
        // are answers in flight, each bounded by the head timeout.
        if let Some(s) = self.status {
            if tokio::time::timeout(Duration::from_secs(6), s)
                .await
                .is_err()
            {
                warn!("status endpoint did not stop within 6s");
            }
        }
    }
}

/// Counts one session QUIC carries in [`EdgeStats::quic_sessions_live`]
/// while it lives.
struct QuicLive<'a>(&'a EdgeStats);

impl<'a> QuicLive<'a> {
    fn new(stats: &'a EdgeStats) -> Self {
        stats.quic_sessions_live.fetch_add(1, Relaxed);
        QuicLive(stats)
    }
}

impl Drop for QuicLive<'_> {
    fn drop(&mut self) {
        self.0.quic_sessions_live.fetch_sub(1, Relaxed);
    }
}

/// The current session's connection, for streams the edge opens.
pub(crate) type ConnWatch = watch::Receiver<Option<(TunnelConn, Arc<FlowTable>)>>;

/// Whether a QUIC session was lost to a dead path: the edge's own liveness
/// check gave it up (`own_check`), or the relay closed it for hearing
/// nothing from us ([`close_code::SILENT`]). The second is a path dead
/// only upstream (a policer dropping our UDP after the handshake): the
/// relay's packets still arrive, so our own check sees nothing wrong, and
/// counted as an ordinary close it would have the edge reconnect on QUIC
/// and lose the session again a dead-path bound later, for ever.
pub(crate) fn path_died(own_check: bool, peer_close: Option<u32>) -> bool {
    own_check || peer_close == Some(close_code::SILENT)
}

/// The count of QUIC sessions in a row lost to a dead path (see
/// [`path_died`]) soon after they came up. A middlebox that lets each new UDP flow through and
/// drops it after a while (a DPI box classifying QUIC, a UDP volume cap)
/// would otherwise have an `auto` edge flap for ever: every new attempt's
/// handshake succeeds, the session dies a dead-path bound later, and
/// again. After [`QuicStrikes::PREFER_TCP`] such losses the edge dials TCP
/// first (an attempt after a failed TCP-first one is QUIC-first again, so
/// a relay reachable only over QUIC is still reached), and its QUIC probe
/// waits twice as long after each further one. Counted per reconnect loop
/// (per relay replica), each path being its own.
pub(crate) struct QuicStrikes<'a>(pub(crate) &'a AtomicU64);

impl QuicStrikes<'_> {
    /// Losses in a row after which an `auto` edge dials TCP first.
    pub(crate) const PREFER_TCP: u64 = 2;
    /// A QUIC session that lasted this long clears the count.
    pub(crate) const WINDOW: Duration = Duration::from_secs(300);
    /// The QUIC probe's interval grows at most this many times, for
    /// strikes and failed probes together (see `session::ProbeBackoff`):
    /// 32 minutes at the default 60 s.
    pub(crate) const MAX_PROBE_FACTOR: u32 = 32;

    /// Counts a QUIC session's end: `died`, given up by the edge's own
    /// liveness check, after `lasted`.
    pub(crate) fn session_ended(&self, lasted: Duration, died: bool) {
        if lasted >= Self::WINDOW {
            self.0.store(0, Relaxed);
        }
        if died {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// The transport to dial: `configured`, except `auto` with a count at
    /// [`Self::PREFER_TCP`] or above, which dials TCP (the probe tries
    /// QUIC from there).
    pub(crate) fn mode(&self, configured: TransportMode) -> TransportMode {
        if configured == TransportMode::Auto && self.0.load(Relaxed) >= Self::PREFER_TCP {
            TransportMode::Tcp
        } else {
            configured
        }
    }

    /// How long the QUIC probe waits on the TCP fallback: `interval`,
    /// doubled for each loss from [`Self::PREFER_TCP`] on (at most
    /// [`Self::MAX_PROBE_FACTOR`] times).
    pub(crate) fn probe_interval(&self, interval: Duration) -> Duration {
        let over = self.0.load(Relaxed).saturating_sub(Self::PREFER_TCP - 1);
        let factor = 1u32
            .checked_shl(u32::try_from(over).unwrap_or(u32::MAX))
            .unwrap_or(u32::MAX)
            .min(Self::MAX_PROBE_FACTOR);
        interval.saturating_mul(factor)
    }
}

/// One relay's reconnect loop: dial `cfg.relay`, run the session, back off,
/// again, until `cancel`. The supervisor runs one per replica.
// The session's shared parts, passed once at start; a struct would only rename them.
/// Publishes `s` unless it is the state already: watchers (capture, the
/// supervisor) wake only for a change.
pub(crate) fn set_state(tx: &watch::Sender<EdgeState>, s: EdgeState) {
    tx.send_if_modified(|cur| {
        let changed = *cur != s;
        *cur = s;
        changed
    });
}

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
    // Why the last session ended or attempt failed (see EdgeState).
    let mut last: Option<String> = None;
    // Why the last session ended, kept through the failed attempts after
    // it (cleared by the next session): an attempt failing at once (no
    // route while the link is down) must not hide the cause from the
    // operator reading `/readyz`.
    let mut ended: Option<String> = None;
    // A session already established (a QUIC probe that succeeded while on
    // the TCP fallback): run it next, with no delay.
    let mut next: Option<Connected> = None;
    // Whether QUIC carried the last session (see Dialer::quic_worked).
    let mut quic_worked = false;
    // This loop's QUIC sessions lost to a dead path (see QuicStrikes): per
    // loop, as each replica's path is its own.
    let strikes = AtomicU64::new(0);
    // A TCP-first attempt (see QuicStrikes) failed: the next one is the
    // configured mode again, QUIC first, so a relay reachable only over
    // QUIC (no TCP fallback, a UDP-only balancer) is not given up on.
    let mut tcp_first_failed = false;
    let attempt_limit = cfg.handshake_timeout * 3 + cfg.quic_fallback_after;
    loop {
        let mode = if tcp_first_failed {
            cfg.transport
        } else {
            QuicStrikes(&strikes).mode(cfg.transport)
        };
        let tcp_first = mode != cfg.transport;
        let result = match next.take() {
            Some(c) => Ok(c),
            None => {
                attempt = attempt.saturating_add(1);
                // Usually already so (published when the last one ended).
                set_state(
                    &state,
                    EdgeState::Connecting {
                        attempt,
                        last: last.clone(),
                    },
                );
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    // A certificate bootstrap may come first (its own
                    // connection and a token review), then QUIC (up to a
                    // handshake bound while another session proves UDP
                    // works, else two fallback timers), then TCP.
                    r = tokio::time::timeout(attempt_limit, connect(&cfg, &stats, mode, &creds, quic_worked, false)) => match r {
                        Ok(r) => r,
                        Err(_) => Err(AttemptError::Failed(format!("no session within {attempt_limit:?}"))),
                    },
                }
            }
        };
        let mut min_delay = Duration::ZERO;
        // The relay refused us with a reason: back off even after a drain.
        let mut refused = false;
        match result {
            Ok(Connected {
                endpoint,
                conn,
                hello,
                ext,
                control,
            }) => {
                attempt = 0;
                ended = None;
                tcp_first_failed = false;
                quic_worked = conn.kind() == relay_transport::TransportKind::Quic;
                let _quic_live = quic_worked.then(|| QuicLive::new(&stats));
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
                    // An older relay puts its whole list in the hello.
                    routes_complete: hello.capabilities & relay_protocol::capability::ROUTE_DELTAS
                        == 0,
                    served_routes: served.get().routes.clone(),
                    replicas: None,
                });
                let up = Instant::now();
                // Flows live and die with the session.
                let flows = FlowTable::new(
                    EDGE_FLOW_BIT,
                    cfg.max_udp_flows,
                    hello.capabilities & relay_protocol::capability::UDP_STREAM_PAYLOADS != 0,
                    stats.udp.clone(),
                );
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
                let mut io = SessionIo {
                    probe_interval: QuicStrikes(&strikes).probe_interval(cfg.quic_probe_interval),
                    went_away: false,
                    path_dead: false,
                };
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
                    hello.capabilities,
                    &mut io,
                )
                .instrument(span)
                .await;
                conn_tx.send_replace(None);
                if up.elapsed() >= backoff.config().reset_after {
                    backoff.reset();
                }
                if quic_worked {
                    let died = path_died(io.path_dead, conn.peer_close_code());
                    QuicStrikes(&strikes).session_ended(up.elapsed(), died);
                    stats.quic_strikes.store(strikes.load(Relaxed), Relaxed);
                    // A path that went dead is not a relay restarting (a
                    // restarted relay answers with a stateless reset, and
                    // one that restarts takes less than the dead-path
                    // bound): UDP may be blocked now, so one unanswered
                    // QUIC attempt is enough to fall back.
                    quic_worked = !died;
                }
                // Closed now unless the session moved (then `retire`
                // closes it when the old connection is done).
                let endpoint = match &end {
                    SessionEnd::Upgrade(..) => endpoint,
                    SessionEnd::Lost(_) => {
                        if let Some(ep) = endpoint {
                            ep.close(close_code::NORMAL.into(), b"");
                        }
                        None
                    }
                };
                if matches!(end, SessionEnd::Lost(_)) && conn.peer_close_code().is_some() {
                    stats.closed_by_relay.fetch_add(1, Relaxed);
                }
                match end {
                    SessionEnd::Upgrade(c, old) => {
                        info!(uptime = ?up.elapsed(), transport = c.conn.kind().as_str(), "moving the session to its new connection");
                        next = Some(*c);
                        // The old connection's streams finish on it (the
                        // relay drains it) rather than being cut here.
                        tokio::spawn(
                            retire(conn, endpoint, old, cfg.handshake_timeout, cancel.clone())
                                .in_current_span(),
                        );
                        continue;
                    }
                    // The relay is draining (a restart, a rolling update):
                    // it said so, or, if the GOAWAY was dropped (its control
                    // queue full), QUIC's close code says it; or it restarted
                    // without a word and its stateless reset says it is up.
                    SessionEnd::Lost(why)
                        if io.went_away
                            || conn.peer_close_code() == Some(close_code::GOING_AWAY)
                            || conn.was_reset() =>
                    {
                        info!(reason = %why, uptime = ?up.elapsed(), pace_for = ?backoff.config().after_drain, "session down: the relay is restarting; reconnecting at a short pace");
                        backoff.relay_drained(Instant::now());
                        last = Some(format!("session ended (relay restarting): {why}"));
                        ended = last.clone();
                    }
                    SessionEnd::Lost(why) => {
                        info!(reason = %why, uptime = ?up.elapsed(), "session down");
                        last = Some(format!("session ended: {why}"));
                        ended = last.clone();
                    }
                }
            }
            Err(AttemptError::Rejected(r)) => {
                warn!(reason = r.reason.as_str(), message = %r.message, "relay rejected the session");
                min_delay = Duration::from_millis(r.retry_after_ms.unwrap_or(0).into());
                refused = true;
                state.send_replace(EdgeState::Rejected {
                    reason: r.reason,
                    message: r.message,
                });
            }
            Err(AttemptError::Failed(e)) => {
                tcp_first_failed = tcp_first;
                warn!(error = %e, attempt, "cannot reach relay");
                last = Some(match &ended {
                    Some(why) => format!("cannot reach the relay: {e}; before that, {why}"),
                    None => format!("cannot reach the relay: {e}"),
                });
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        // Not connected (any more): say so now, and why, not only when the
        // next attempt starts after the backoff (until then `/readyz` and
        // `edge_session_up` still showed the lost session, and the
        // supervisor could take it for the live one).
        if !refused {
            set_state(
                &state,
                EdgeState::Connecting {
                    attempt: attempt.saturating_add(1),
                    last: last.clone(),
                },
            );
        }
        let delay = backoff
            .delay_after_failure(Instant::now(), refused, &mut rand::rng())
            .max(min_delay);
        debug!(?delay, "reconnecting after delay");
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    state.send_replace(EdgeState::Stopped);
}

/// How long past the relay's drain grace a moved-from connection is kept
/// at most: the relay closes it when the grace ends; this only bounds a
/// relay that does not.
const RETIRE_MARGIN: Duration = Duration::from_secs(30);

/// Keeps a connection the session moved away from (a renewed
/// certificate, a QUIC probe from the TCP fallback) while its streams
/// finish, then closes it and its endpoint. The relay decides: for a move
/// the edge announced ([`relay_protocol::Control::Moving`]) it drains the
/// old session (GOAWAY with its grace) and closes it when its streams are
/// done or the grace has passed; here the old control stream is served
/// meanwhile (pings answered). Without a GOAWAY within `wait` (an older
/// relay closes the old session at once; the move was not announced; the
/// new session went elsewhere), it is closed now, as before. At shutdown
/// it is closed at once.
async fn retire(
    conn: TunnelConn,
    endpoint: Option<quinn::Endpoint>,
    old: Option<crate::session::Retired>,
    wait: Duration,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    use relay_protocol::codec::{decode_control, write_frame, Incoming};
    use relay_protocol::Control;
    let work = async {
        let Some(crate::session::Retired {
            grace_ms,
            mut send,
            mut frames,
        }) = old
        else {
            return;
        };
        // Until the relay says it drains: `wait`; then its grace and a margin.
        let mut draining = grace_ms.is_some();
        let mut until = tokio::time::Instant::now()
            + match grace_ms {
                Some(g) => Duration::from_millis(g.into()) + RETIRE_MARGIN,
                None => wait,
            };
        if draining {
            info!(grace = ?until.duration_since(tokio::time::Instant::now()), "the old session drains: its streams finish on it");
        }
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                _ = tokio::time::sleep_until(until) => {
                    if !draining {
                        debug!("the relay did not drain the old session; closing it");
                    }
                    return;
                }
                f = frames.next() => {
                    let Some(Ok(bytes)) = f else {
                        // The relay ended the control stream: it closes
                        // the connection next; wait for that (bounded).
                        tokio::select! {
                            _ = conn.closed() => {}
                            _ = tokio::time::sleep_until(until) => {}
                        }
                        return;
                    };
                    match decode_control(&bytes) {
                        Ok(Incoming::Known { msg: Control::GoAway { grace_ms, .. }, .. }) if !draining => {
                            draining = true;
                            let grace = Duration::from_millis(grace_ms.into());
                            info!(?grace, "the old session drains: its streams finish on it");
                            until = tokio::time::Instant::now() + grace + RETIRE_MARGIN;
                        }
                        Ok(Incoming::Known { msg: Control::Ping { nonce }, .. }) => {
                            let pong = Control::Pong { nonce };
                            if tokio::time::timeout(wait, write_frame(&mut send, &pong)).await.is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        () = work => {}
    }
    conn.close(close_code::NORMAL, "moved to a new session");
    if let Some(ep) = endpoint {
        ep.close(close_code::NORMAL.into(), b"");
    }
}

/// Keeps the node-local resolver's clients (see
/// [`crate::dns::Resolver::set_clients`]) at what the edge serves (its
/// pods) plus `capture.sources`: from the capture state saved last run at
/// start, then from each session.
async fn follow_dns_clients(
    dns: crate::dns::Resolver,
    cfg: Arc<EdgeConfig>,
    mut state: watch::Receiver<EdgeState>,
    saved: Option<Vec<Cidr>>,
    cancel: CancellationToken,
) {
    // This node's own addresses (its host processes, hostNetwork pods),
    // read from its interfaces: asking the kernel whether a peer's address
    // is local would take syscalls per query, and says yes to any address
    // where `ip_nonlocal_bind` is set (keepalived, kube-vip nodes).
    let local = || -> Vec<Cidr> {
        nix::ifaddrs::getifaddrs()
            .map(|ifs| {
                ifs.filter_map(|i| i.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| std::net::IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| v6.ip().into()))
                    })
                    .map(Cidr::host)
                    .collect()
            })
            .unwrap_or_default()
    };
    let clients = |served: &[Cidr]| -> Vec<Cidr> {
        let mut all: Vec<Cidr> = served.to_vec();
        all.extend(cfg.capture.iter().flat_map(|c| c.sources.iter().flatten()));
        all.extend(local());
        all.sort();
        all.dedup();
        all
    };
    // An empty list (an older relay that says nothing, an edge with no
    // routes) names no pod: keep answering everyone rather than no pod.
    let mut served: Option<Vec<Cidr>> = saved.filter(|s| !s.is_empty());
    let mut reread = tokio::time::interval(LOCAL_ADDRESSES_EVERY);
    loop {
        if let EdgeState::Connected { served_routes, .. } = &*state.borrow_and_update() {
            if !served_routes.is_empty() {
                served = Some(served_routes.clone());
            }
        }
        if let Some(s) = &served {
            dns.set_clients(clients(s));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = state.changed() => if r.is_err() { return },
            _ = reread.tick() => {}
        }
    }
}

/// How often the resolver's list of this node's own addresses is read
/// again (DHCP renewals, interfaces coming up).
const LOCAL_ADDRESSES_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay's close for silence (`SILENT`: a path dead only upstream)
    /// is a strike like the edge's own dead-path verdict: two such quick
    /// losses and the edge dials TCP first. Other closes by the relay (and
    /// an older relay's `PROTOCOL` for the same silence) are not.
    #[test]
    fn a_relay_silence_close_is_a_dead_path_strike() {
        assert!(path_died(false, Some(close_code::SILENT)));
        assert!(path_died(true, None));
        for other in [
            None,
            Some(close_code::NORMAL),
            Some(close_code::PROTOCOL),
            Some(close_code::GOING_AWAY),
            Some(close_code::KICKED),
        ] {
            assert!(!path_died(false, other), "{other:?}");
        }
        let n = AtomicU64::new(0);
        let s = QuicStrikes(&n);
        let quick = Duration::from_secs(16);
        for _ in 0..2 {
            s.session_ended(quick, path_died(false, Some(close_code::SILENT)));
        }
        assert_eq!(s.mode(TransportMode::Auto), TransportMode::Tcp);
    }

    #[test]
    fn quic_strikes_prefer_tcp_after_two_quick_losses_and_clear_after_a_long_session() {
        let n = AtomicU64::new(0);
        let s = QuicStrikes(&n);
        let quick = Duration::from_secs(20);
        let probe = Duration::from_secs(60);
        s.session_ended(quick, true);
        assert_eq!(s.mode(TransportMode::Auto), TransportMode::Auto);
        assert_eq!(s.probe_interval(probe), probe);
        // Ended some other way: no strike, none cleared.
        s.session_ended(quick, false);
        assert_eq!(n.load(Relaxed), 1);
        s.session_ended(quick, true);
        assert_eq!(s.mode(TransportMode::Auto), TransportMode::Tcp);
        // Only `auto` changes.
        assert_eq!(s.mode(TransportMode::Quic), TransportMode::Quic);
        assert_eq!(s.probe_interval(probe), probe * 2);
        s.session_ended(quick, true);
        assert_eq!(s.probe_interval(probe), probe * 4);
        for _ in 0..100 {
            s.session_ended(quick, true);
        }
        assert_eq!(s.probe_interval(probe), probe * 32, "capped");
        // A session that lasted clears the count; if it died, it is the
        // first strike of a new run.
        s.session_ended(QuicStrikes::WINDOW, true);
        assert_eq!(n.load(Relaxed), 1);
        assert_eq!(s.mode(TransportMode::Auto), TransportMode::Auto);
        s.session_ended(QuicStrikes::WINDOW, false);
        assert_eq!(n.load(Relaxed), 0);
    }
}
