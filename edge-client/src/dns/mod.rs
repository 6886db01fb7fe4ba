//! The edge's node-local resolver: cluster names answered at the edge,
//! also while the cloud is away.
//!
//! Pods and host processes on an edge node resolve through it when
//! kubelet's `clusterDNS` points at its address (169.254.20.10 by default,
//! as NodeLocal DNSCache does). It answers names under the cluster domain
//! from the table the relay sends ([`relay_protocol::Control::ServiceNames`],
//! applied with [`NamesBatch`]), and forwards everything else to the
//! cluster DNS, which the edge reaches through the tunnel. The table is
//! saved in the state directory, so after a restart with the cloud away it
//! still answers; until a table is known (never connected, nothing saved)
//! every query is forwarded.
//!
//! Modules: [`zone`] (which names, which answers; pure), `server` (UDP and
//! TCP sockets, truncation, bounded forwarding), `store` (the saved table),
//! `config` (`[dns]`).

mod config;
#[doc(hidden)]
pub mod fuzzing;
mod server;
mod store;
#[cfg(test)]
mod tests;
pub mod zone;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::{capability, ServiceName, ServiceNameKey, DEFAULT_CLUSTER_DOMAIN};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{DnsConfig, DnsFile, DEFAULT_LISTEN};
pub use server::{DnsStats, MAX_UDP_ANSWER};
pub use store::LoadError;
use zone::Zone;

/// Starting the resolver failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The listen address could not be bound.
    #[error("dns: binding {addr} ({proto}): {source}{hint}")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
        /// Why.
        source: std::io::Error,
        /// What to do about it, when known.
        hint: &'static str,
    },
}

/// The capability bits this edge announces: [`capability::SERVICE_NAMES`]
/// only with the resolver on (else the relay would send names for nothing).
pub fn capabilities(dns_enabled: bool) -> u32 {
    if dns_enabled {
        capability::ALL
    } else {
        capability::ALL & !capability::SERVICE_NAMES
    }
}

struct Inner {
    shared: Arc<server::Shared>,
    cfg: DnsConfig,
    addr: SocketAddr,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// The newest table to save (the saver writes at most once a second).
    save: watch::Sender<Option<Arc<Zone>>>,
}

/// A running resolver; clones share it.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

fn bind_err(addr: SocketAddr, proto: &'static str, source: std::io::Error) -> DnsError {
    let hint = match source.kind() {
        std::io::ErrorKind::AddrNotAvailable => {
            " (the address must be on an interface: `ip link add nodelocaldns type dummy; \
             ip addr add 169.254.20.10/32 dev nodelocaldns`)"
        }
        std::io::ErrorKind::PermissionDenied => " (port 53 needs CAP_NET_BIND_SERVICE)",
        _ => "",
    };
    DnsError::Bind {
        addr,
        proto,
        source,
        hint,
    }
}

impl Resolver {
    /// Loads the saved table (a missing or unreadable one leaves the
    /// resolver forwarding everything until the relay sends one), binds UDP
    /// and TCP on `cfg.listen` (port 0 picks one, the same for both), and
    /// serves until `cancel`.
    ///
    /// An address that cannot be bound (taken by another resolver such as
    /// NodeLocal DNSCache's, or an interface not there yet after a
    /// reboot) is not fatal: the error is logged, `edge_dns_listening`
    /// says 0, and the bind is retried every [`DnsConfig::bind_retry`]
    /// while the rest of the edge (its tunnel) runs. Only an address that
    /// can never work fails here: port 0 that cannot be bound at all.
    pub async fn spawn(cfg: DnsConfig, cancel: CancellationToken) -> Result<Resolver, DnsError> {
        let bound = match bind(cfg.listen).await {
            Ok(b) => Some(b),
            Err(e) if cfg.listen.port() != 0 => {
                tracing::error!(error = %e, retry_every = ?cfg.bind_retry, "dns: resolver not listening; the tunnel runs without it, and the bind is retried");
                None
            }
            Err(e) => return Err(e),
        };
        let addr = match &bound {
            Some((udp, _)) => udp
                .local_addr()
                .map_err(|e| bind_err(cfg.listen, "udp", e))?,
            None => cfg.listen,
        };
        let initial = match store::load(&cfg.state_file) {
            Ok(Some((domain, services))) => {
                let domain = cfg.cluster_domain.clone().unwrap_or(domain);
                let z = Zone::new(&domain, services, serial());
                info!(services = z.len(), file = %cfg.state_file.display(), "dns: saved names loaded");
                Some(Arc::new(z))
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "dns: saved names not used; forwarding until the relay sends names");
                None
            }
        };
        let shared = Arc::new(server::Shared {
            zone: watch::Sender::new(initial),
            upstream: cfg.upstream,
            forward_timeout: cfg.forward_timeout,
            forwards: Arc::new(Semaphore::new(cfg.max_forwards)),
            stats: Arc::new(DnsStats::default()),
            clients: std::sync::RwLock::new(None),
        });
        let tasks = TaskTracker::new();
        let cancel = cancel.child_token();
        let (save, save_rx) = watch::channel(None);
        match bound {
            Some((udp, tcp)) => serve(udp, tcp, &shared, &tasks, &cancel),
            None => {
                tasks.spawn(bind_later(
                    cfg.listen,
                    cfg.bind_retry,
                    shared.clone(),
                    tasks.clone(),
                    cancel.clone(),
                ));
            }
        }
        tasks.spawn(relay_transport::saved::saver_every(
            cfg.state_file.clone(),
            save_rx,
            store::save,
            "dns name table",
            relay_transport::saved::ON_FLASH,
            cancel.clone(),
        ));
        Ok(Resolver {
            inner: Arc::new(Inner {
                shared,
                cfg,
                addr,
                tasks,
                cancel,
                save,
            }),
        })
    }

    /// Who may ask besides this node itself: the prefixes the edge
    /// serves (its pods) and `capture.sources`. Until this is called,
    /// anyone may (see `server::may_ask`).
    pub fn set_clients(&self, prefixes: Vec<relay_protocol::Cidr>) {
        let mut c = self
            .inner
            .shared
            .clients
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if c.as_deref() != Some(&prefixes) {
            debug!(?prefixes, "dns: clients");
            *c = Some(Arc::new(prefixes));
        }
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.inner.shared.stats
    }

    /// The table being answered from, if any.
    pub fn zone(&self) -> Option<Arc<Zone>> {
        self.inner.shared.zone.borrow().clone()
    }

    /// Replaces the whole table (the relay's `cluster_domain` unless the
    /// config sets one) and saves it.
    pub fn replace_table(
        &self,
        cluster_domain: &str,
        services: impl IntoIterator<Item = ServiceName>,
    ) {
        let domain = match (&self.inner.cfg.cluster_domain, cluster_domain) {
            (Some(mine), theirs) => {
                if !theirs.is_empty() && !theirs.trim_end_matches('.').eq_ignore_ascii_case(mine) {
                    warn!(config = %mine, relay = %theirs, "dns: cluster domain differs from the relay's; answering for the configured one");
                }
                mine.as_str()
            }
            (None, "") => DEFAULT_CLUSTER_DOMAIN,
            (None, theirs) => theirs,
        };
        let z = Arc::new(Zone::new(domain, services, serial()));
        self.inner.shared.zone.send_replace(Some(z.clone()));
        self.inner.save.send_replace(Some(z));
    }

    /// A batch for one session's [`relay_protocol::Control::ServiceNames`]
    /// frames.
    pub fn batch(&self) -> NamesBatch {
        NamesBatch {
            resolver: self.clone(),
            pending: BTreeMap::new(),
            domain: String::new(),
        }
    }

    /// Stops serving and waits (at most 5 s) for in-flight forwards and
    /// the last save.
    pub async fn shutdown(self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait())
            .await
            .is_err()
        {
            warn!("dns: resolver did not stop within 5s");
        }
    }
}

/// Serves the bound sockets until `cancel`, and says so.
fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    shared: &Arc<server::Shared>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let addr = udp.local_addr().ok();
    tasks.spawn(server::serve_udp(
        Arc::new(udp),
        shared.clone(),
        tasks.clone(),
        cancel.clone(),
    ));
    tasks.spawn(server::serve_tcp(
        tcp,
        shared.clone(),
        tasks.clone(),
        cancel.clone(),
    ));
    shared
        .stats
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(?addr, upstream = %shared.upstream, "dns: resolver listening (udp, tcp)");
}

/// Retries binding `listen` every `every` until it works (then serves)
/// or `cancel`.
async fn bind_later(
    listen: SocketAddr,
    every: Duration,
    shared: Arc<server::Shared>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match bind(listen).await {
            Ok((udp, tcp)) => return serve(udp, tcp, &shared, &tasks, &cancel),
            Err(e) => debug!(error = %e, "dns: bind retried, still failing"),
        }
    }
}

/// Binds UDP, then TCP on the same port (with port 0, retried up to 50
/// times when another socket holds the TCP side of the port UDP got: on a
/// host with tens of thousands of TCP connections most ephemeral ports
/// are taken for TCP, and 5 tries were seen to fail).
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut tries = 0;
    loop {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|e| bind_err(listen, "udp", e))?;
        let addr = udp.local_addr().map_err(|e| bind_err(listen, "udp", e))?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 && tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "dns: tcp port taken, trying another");
            }
            Err(e) => return Err(bind_err(addr, "tcp", e)),
        }
    }
}

/// A SOA serial that grows across restarts (seconds since the epoch).
fn serial() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32)
}

/// Frames of one session's name batches being put together: a batch is
/// applied to the resolver only when its last frame arrives, so queries
/// never see half of a large update. A session starts from an empty table
/// (the relay's first batch has `reset` and every Service); until it
/// completes, the resolver keeps answering from the previous table.
pub struct NamesBatch {
    resolver: Resolver,
    pending: BTreeMap<ServiceNameKey, ServiceName>,
    domain: String,
}

impl NamesBatch {
    /// Applies one [`relay_protocol::Control::ServiceNames`] frame; returns
    /// whether it completed a batch (and so replaced the resolver's table).
    pub fn frame(
        &mut self,
        reset: bool,
        cluster_domain: String,
        upsert: Vec<ServiceName>,
        remove: Vec<ServiceNameKey>,
        complete: bool,
    ) -> bool {
        if reset {
            self.pending.clear();
        }
        for k in &remove {
            self.pending.remove(k);
        }
        // Bounded like the relay's frames: an entry past the caps is cut,
        // an invalid one ignored (the zone would never answer it).
        for mut s in upsert.into_iter().filter(ServiceName::is_valid) {
            s.clamp();
            self.pending.insert(s.key.clone(), s);
        }
        self.domain = cluster_domain;
        if complete {
            self.resolver
                .replace_table(&self.domain, self.pending.values().cloned());
        }
        complete
    }
}
