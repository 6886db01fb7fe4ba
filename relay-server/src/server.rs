//! The relay supervisor: binds every listener, runs the accept loops in a
//! `JoinSet` (any of them dying is reported by [`Relay::wait`]), and drains
//! on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use relay_transport::quic;
use relay_transport::reload::ReloadableServerTls;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::RelayConfig;
use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::policy::{Communities, Policy};
use crate::registry::Registry;
use crate::services::ServiceSource;
use crate::session::SessionHandle;
use crate::status::StatusSink;

mod edges;
mod per_source;
mod shutdown;
mod sources;
use edges::{accept_quic, accept_tcp, bind_quic_and_tcp};
use sources::directory_and_status;

/// State shared by every task of one relay.
pub struct Shared {
    /// The configuration the relay was started with.
    pub cfg: RelayConfig,
    /// Live sessions and routes.
    pub registry: Registry<SessionHandle>,
    /// Who may reach what (the one authorisation seam).
    pub policy: Policy,
    /// Who may claim what: the static `[nodes]` table or the cluster.
    pub directory: Arc<dyn Directory>,
    /// Where session comings and goings are reported (Node condition and
    /// Events in Kubernetes; nothing in static mode).
    pub status: Arc<dyn StatusSink>,
    /// Verifies certificate-bootstrap tokens (with `[bootstrap]`).
    pub tokens: Option<Arc<dyn crate::bootstrap::TokenAuthority>>,
    /// ClusterIP ports and their endpoints (none in static mode).
    pub services: Arc<dyn ServiceSource>,
    /// Which Service ports' endpoints changed (for UDP flows picked for
    /// them).
    pub(crate) endpoint_watch: Arc<crate::endpoint_watch::EndpointWatch>,
    /// Counters.
    pub metrics: Metrics,
    generation: AtomicU64,
    /// Cancelled last on shutdown: closes every session still open.
    pub shutdown: CancellationToken,
    shutting_down: AtomicBool,
    /// The drain grace of a shutdown under way (set before
    /// `shutting_down`).
    shutdown_grace: std::sync::OnceLock<std::time::Duration>,
    handshakes: Arc<Semaphore>,
    /// Places in the queue for a handshake permit (a few times the permits).
    handshake_queue: Arc<Semaphore>,
    /// Permits for CONNECT client connections.
    pub connect_permits: Arc<Semaphore>,
    /// UDP counters (all sessions).
    pub udp: Arc<relay_transport::udp::UdpStats>,
    /// Bound on captured TCP connections served at once
    /// (`capture.max_connections`).
    pub capture_bound: relay_transport::conn::AcceptBound,
    /// The replica set edges are told about (empty without `[replicas]`).
    pub replicas: tokio::sync::watch::Receiver<Vec<relay_protocol::Replica>>,
    /// The session prefixes the kernel capture is installed for (`None`:
    /// capture is off). The admin API's `/v1/routes` lists only these, so
    /// a route agent never sends traffic to a replica that registered a
    /// session but has not captured its prefix yet (a restarted replica's
    /// first ~100 ms: the agent's packets met no route there).
    pub captured: std::sync::RwLock<Option<std::collections::BTreeSet<relay_protocol::Cidr>>>,
    /// This relay's certificate reloads, for `/metrics` (its own, shared
    /// with its reload targets: never another relay's in the process).
    pub(crate) tls_files: Arc<crate::tls_reload::FileStatuses>,
}

impl Shared {
    /// The next session generation (relay-wide, strictly increasing).
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Relaxed)
    }

    /// Admission control for handshakes. A handshake needs one of
    /// `max_concurrent_handshakes` permits; up to four times as many wait
    /// for one (bounded by the handshake timeout) and the rest are refused
    /// at once. Waiting instead of refusing matters in a reconnect storm: a
    /// refused edge backs off, and backoff is what stretches a storm's tail.
    /// Returns `None` when the queue is full; the future yields `None` when
    /// the wait timed out.
    fn admit(
        self: &Arc<Self>,
    ) -> Option<impl std::future::Future<Output = Option<tokio::sync::OwnedSemaphorePermit>>> {
        let slot = self.handshake_queue.clone().try_acquire_owned().ok()?;
        let (permits, limit) = (self.handshakes.clone(), self.cfg.limits.handshake_timeout);
        Some(async move {
            let permit = tokio::time::timeout(limit, permits.acquire_owned())
                .await
                .ok()?
                .ok();
            drop(slot);
            permit
        })
    }

    /// Whether handshakes are queueing: every permit is taken, or close to
    /// it (a quarter left). A QUIC attempt from an address it has not
    /// proven is then asked to prove it first (a Retry: one round trip
    /// more), so a flood of Initials from spoofed sources cannot fill the
    /// queue and lock out every edge that has to reconnect.
    fn handshakes_busy(&self) -> bool {
        self.handshakes.available_permits() * 4 < self.cfg.limits.max_concurrent_handshakes
    }

    /// Whether the relay is draining for shutdown.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Marks the relay as shutting down, sessions draining for `grace`.
    pub(crate) fn begin_shutdown(&self, grace: std::time::Duration) {
        let _ = self.shutdown_grace.set(grace);
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The drain grace of the shutdown under way, if one is.
    pub(crate) fn shutdown_grace(&self) -> Option<std::time::Duration> {
        if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.shutdown_grace.get().copied()
        } else {
            None
        }
    }
}

/// Starting the relay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(#[from] relay_transport::TlsError),
    /// Installing relay routes (nftables, policy routing) failed.
    #[error("installing routes: {0}")]
    Capture(#[from] relay_transport::capture::CaptureError),
    /// The configuration is invalid (also when built by code rather than
    /// loaded from a file).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The Kubernetes API client could not be set up.
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeStartError),
    /// Replica membership could not be started.
    #[error(transparent)]
    Replicas(#[from] crate::replicas::ReplicasStartError),
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    tcp_fallback_addr: Option<SocketAddr>,
    connect_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    accept_stop: CancellationToken,
    tasks: JoinSet<&'static str>,
    sessions: TaskTracker,
    capture: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    background: CancellationToken,
    /// Stale Node conditions swept, queued ones flushed at shutdown.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    conditions: sources::Upkeep,
    /// The listeners' TLS identities reloaded from files (the relay's own
    /// `[tls]` first); empty for a config built by code.
    reload_targets: Vec<crate::tls_reload::Target>,
    replicas: crate::replicas::Replicas,
}

fn bind_err(what: &'static str, addr: impl ToString) -> impl FnOnce(std::io::Error) -> StartError {
    let addr = addr.to_string();
    move |source| StartError::Bind { what, addr, source }
}

impl Relay {
    /// Binds every configured listener and starts serving.
    pub async fn spawn(cfg: RelayConfig) -> Result<Relay, StartError> {
        cfg.validate()?;
        // Generations start at the wall clock in microseconds, so "higher is
        // newer" also holds across relay restarts.
        let gen0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        // One TLS state behind the QUIC endpoint and the TCP fallback, so a
        // reload reaches both (see `tls_reload`).
        let tls = ReloadableServerTls::new(&cfg.tls, &cfg.tls_crls, cfg.bootstrap.is_some())?;
        let tls_files: Arc<crate::tls_reload::FileStatuses> = Arc::default();
        let mut reload_targets: Vec<crate::tls_reload::Target> = cfg
            .tls_reload
            .iter()
            .map(|r| crate::tls_reload::Target {
                name: "tls",
                state: tls.clone(),
                paths: r.paths.clone(),
                must_trust: cfg.bootstrap.as_ref().map(|b| b.issuer_cert.clone()),
                files: tls_files.clone(),
                sessions: None,
            })
            .collect();
        let (endpoint, tcp_listener) = bind_quic_and_tcp(&cfg, &tls).await?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(bind_err("quic", cfg.quic_listen))?;
        let mut policy = Policy::new(
            cfg.tunnel_routes.clone(),
            Communities::new(&cfg.communities),
        );
        policy.set_connect_cloud(cfg.connect_cloud);
        policy.add_own_listener(quic_addr);
        let tcp_fallback_addr = match &tcp_listener {
            Some(l) => Some(
                l.local_addr()
                    .map_err(bind_err("tcp fallback", quic_addr))?,
            ),
            None => None,
        };
        if let Some(a) = tcp_fallback_addr.filter(|a| *a != quic_addr) {
            policy.add_own_listener(a);
        }
        // Cancelled on shutdown: stops the Kubernetes watch and writers.
        let background = CancellationToken::new();
        let (directory, status, tokens, services, conditions) =
            directory_and_status(&cfg, &background).await?;
        let replicas = crate::replicas::Replicas::start(&cfg, background.clone()).await?;
        // Several replicas: one writer per node (see `replicas::writer_of`).
        let status: Arc<dyn StatusSink> = match &cfg.replicas {
            Some(_) => Arc::new(crate::replicas::DesignatedStatus::new(
                status,
                &cfg.relay_id,
                replicas.subscribe(),
            )),
            None => status,
        };
        let registry = Registry::default();
        registry.hold_offline(cfg.hold_offline_routes);
        let shared = Arc::new(Shared {
            registry,
            policy,
            directory,
            status,
            tokens,
            endpoint_watch: crate::endpoint_watch::EndpointWatch::start(
                services.clone(),
                background.clone(),
            ),
            services,
            metrics: Metrics::default(),
            generation: AtomicU64::new(gen0),
            shutdown: CancellationToken::new(),
            shutting_down: AtomicBool::new(false),
            shutdown_grace: std::sync::OnceLock::new(),
            handshakes: Arc::new(Semaphore::new(cfg.limits.max_concurrent_handshakes)),
            handshake_queue: Arc::new(Semaphore::new(cfg.limits.max_concurrent_handshakes * 4)),
            connect_permits: Arc::new(Semaphore::new(cfg.limits.max_connect_connections)),
            udp: Arc::default(),
            capture_bound: relay_transport::conn::AcceptBound::new(
                cfg.capture.as_ref().map_or(1, |c| c.max_connections),
            ),
            replicas: replicas.subscribe(),
            captured: std::sync::RwLock::new(cfg.capture.as_ref().map(|_| Default::default())),
            tls_files,
            cfg,
        });
        // A reload changing the client CA or CRLs verifies live sessions again.
        crate::tls_reload::watch_sessions(&mut reload_targets, &shared);
        #[cfg(feature = "kubernetes")]
        if let Some(c) = &conditions {
            c.spawn(shared.clone(), background.clone());
        }
        let accept_stop = CancellationToken::new();
        let sessions = TaskTracker::new();
        let mut tasks = JoinSet::new();

        let mut connect_addr = None;
        if let Some(addr) = shared.cfg.connect_listen {
            let l = crate::connect::bind_tcp(addr).map_err(bind_err("connect", addr))?;
            connect_addr = Some(l.local_addr().map_err(bind_err("connect", addr))?);
            shared.policy.add_own_listener(connect_addr.unwrap_or(addr));
            let tls = match &shared.cfg.connect_tls {
                Some(m) => {
                    let state = crate::tls_reload::listener_tls(
                        "connect_tls",
                        m,
                        &shared.cfg.connect_tls_crls,
                        shared.cfg.connect_tls_files.as_ref(),
                        &mut reload_targets,
                        &shared.tls_files,
                    )?;
                    Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                        state.server_config(&[b"http/1.1"])?,
                    )))
                }
                None => None,
            };
            tasks.spawn(crate::connect::serve_tcp(
                l,
                tls,
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        let mut unix_path = None;
        if let Some(path) = shared.cfg.connect_unix.clone() {
            // A socket file left by a crashed run would make bind fail.
            if path.exists() {
                let _ = std::fs::remove_file(&path);
            }
            let l = tokio::net::UnixListener::bind(&path)
                .map_err(bind_err("connect_unix", path.display()))?;
            unix_path = Some(path);
            tasks.spawn(crate::connect::serve_unix(
                l,
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        let mut admin_addr = None;
        if let Some(addr) = shared.cfg.admin_listen {
            let l = relay_transport::listen::tcp(addr, relay_transport::listen::BACKLOG)
                .map_err(bind_err("admin", addr))?;
            admin_addr = Some(l.local_addr().map_err(bind_err("admin", addr))?);
            shared.policy.add_own_listener(admin_addr.unwrap_or(addr));
            let tls = match &shared.cfg.admin_tls {
                Some(m) => {
                    let state = crate::tls_reload::listener_tls(
                        "admin",
                        m,
                        &[],
                        shared.cfg.admin_tls_files.as_ref(),
                        &mut reload_targets,
                        &shared.tls_files,
                    )?;
                    Some(state.server_config_without_client_auth(b"http/1.1")?)
                }
                None => None,
            };
            tasks.spawn(crate::admin::serve(
                l,
                tls,
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        // kubelet's probes, apart from the admin API so that its clients
        // cannot starve them (see `crate::health`).
        let mut health_addr = None;
        if let Some(addr) = shared.cfg.health_listen {
            match relay_transport::listen::tcp(addr, relay_transport::listen::BACKLOG) {
                Ok(l) => {
                    let bound = l.local_addr().map_err(bind_err("health", addr))?;
                    health_addr = Some(bound);
                    shared.policy.add_own_listener(bound);
                    tasks.spawn(crate::health::serve(l, shared.clone(), accept_stop.clone()));
                }
                // The default address, taken (another relay in this network
                // namespace, or another program): start as before there was
                // a probe listener rather than not at all.
                Err(e) if shared.cfg.health_listen_defaulted => warn!(
                    %addr, error = %e,
                    "probe listener (listen.health, default address) not started: probes on it will fail; set listen.health"
                ),
                Err(e) => return Err(bind_err("health", addr)(e)),
            }
        }
        let mut capture = None;
        if let Some(ccfg) = shared.cfg.capture.clone() {
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], ccfg.port));
            let l = relay_transport::capture::capture_tcp_listener(ccfg.port)
                .map_err(bind_err("transparent", addr))?;
            let udp_addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, ccfg.port);
            let udp = relay_transport::udp::RedirectUdp::bind(ccfg.port)
                .map_err(bind_err("transparent udp", udp_addr))?;
            shared.policy.add_own_listener(addr);
            let cap = relay_transport::capture::Capture::install(ccfg).await?;
            tokio::spawn(relay_transport::capture::warn_if_socket_lb());
            tasks.spawn(crate::tunnel::serve_transparent(
                l,
                shared.clone(),
                accept_stop.clone(),
            ));
            tasks.spawn(crate::tunnel_udp::serve_transparent_udp(
                udp,
                shared.clone(),
                accept_stop.clone(),
            ));
            let stop = CancellationToken::new();
            let task = tokio::spawn(crate::tunnel::sync_capture(
                cap,
                shared.clone(),
                stop.clone(),
            ));
            capture = Some((stop, task));
        }
        tasks.spawn(crate::follow::follow_directory(
            shared.clone(),
            accept_stop.clone(),
        ));
        tasks.spawn(crate::offline::follow_offline(
            shared.clone(),
            accept_stop.clone(),
        ));
        tasks.spawn(crate::liveness::watch(shared.clone(), accept_stop.clone()));
        // Edges are let in last, once every listener is bound and known to
        // the policy as the relay's own (never a tunnel target).
        if let Some(l) = tcp_listener {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(quic::relay_server_tls_with(
                &tls,
                shared.cfg.bootstrap.is_some(),
            )?));
            tasks.spawn(accept_tcp(
                l,
                acceptor,
                shared.clone(),
                accept_stop.clone(),
                sessions.clone(),
            ));
        }
        tasks.spawn(accept_quic(
            endpoint.clone(),
            shared.clone(),
            accept_stop.clone(),
            sessions.clone(),
        ));
        if let Some(r) = &shared.cfg.tls_reload {
            tokio::spawn(crate::tls_reload::watch(
                reload_targets.clone(),
                r.interval,
                background.clone(),
            ));
        }
        info!(%quic_addr, tcp_fallback = ?tcp_fallback_addr, connect = ?connect_addr, unix = ?unix_path, admin = ?admin_addr, health = ?health_addr, relay_id = %shared.cfg.relay_id, "relay listening");
        Ok(Relay {
            shared,
            endpoint,
            quic_addr,
            tcp_fallback_addr,
            connect_addr,
            admin_addr,
            health_addr,
            unix_path,
            accept_stop,
            tasks,
            sessions,
            capture,
            background,
            conditions,
            reload_targets,
            replicas,
        })
    }

    /// Re-reads the relay's certificate, key, client CA and CRLs from the
    /// files of its `[tls]` section, and the CONNECT listener's
    /// (`[connect_tls]`) and the admin API's certificates from theirs, and
    /// uses them for new handshakes; connections already up are not
    /// touched, except edge sessions whose certificates a changed `[tls]`
    /// client CA or CRL now refuses, which are closed (see
    /// `session::cert_check`). A listener whose files fail to load keeps what it
    /// had (the others still reload). Returns the relay's leaf certificate
    /// now served, or the first error. A config built by code (no files)
    /// has nothing to reload: an error.
    pub fn reload_tls(
        &self,
    ) -> Result<rustls::pki_types::CertificateDer<'static>, crate::tls_reload::ReloadError> {
        crate::tls_reload::reload_all(&self.reload_targets)
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound TCP fallback address, if enabled.
    pub fn tcp_fallback_addr(&self) -> Option<SocketAddr> {
        self.tcp_fallback_addr
    }

    /// The bound CONNECT (TCP) address, if enabled.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect_addr
    }

    /// The bound admin API address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound probe listener address (`/healthz`, `/readyz`), if
    /// enabled and bound.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Shared state (registry, metrics), for embedding and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when a listener task exits on its own (an error); a relay
    /// whose listener died should be restarted by its supervisor.
    pub async fn wait(&mut self) -> String {
        match self.tasks.join_next().await {
            Some(Ok(name)) => format!("{name} listener stopped"),
            Some(Err(e)) => format!("listener task failed: {e}"),
            None => "no listeners".to_string(),
        }
    }
}
