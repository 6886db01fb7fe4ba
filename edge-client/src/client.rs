//! The edge client: dial out, register, serve the relay's streams,
//! reconnect with backoff when the session ends.

mod reconnect;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use crate::config::EdgeConfig;
use crate::identity::Credentials;
use crate::serve::ServedSet;
use crate::services::EdgeServices;

pub(crate) use reconnect::{run, set_state, ConnWatch, QuicStrikes};
pub use state::{CaptureReport, EdgeState, EdgeStats};

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
        // The error also goes to the relay (`Control::CaptureStatus`).
        let (cap, install_error) = match relay_transport::capture::Capture::install(ccfg.clone())
            .await
        {
            Ok(cap) => (cap, None),
            Err(e) => {
                tracing::error!(error = %e, "installing capture failed: this node's pods do not reach the cloud through the tunnel until it succeeds (retried every 10 s; needs Linux 5.2 or later, nftables, CAP_NET_ADMIN); the tunnel runs meanwhile");
                (
                    relay_transport::capture::Capture::uninstalled(ccfg),
                    Some(e.to_string()),
                )
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
                install_error,
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
        // Every connected session, for capture (see `supervisor::sessions`).
        let (sessions_tx, sessions_rx) = watch::channel(Arc::default());
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
                sessions_rx,
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
                sessions_tx,
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
