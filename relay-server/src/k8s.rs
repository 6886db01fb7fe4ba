//! The relay as a Kubernetes component (`[kubernetes]` in relay.toml):
//! Node objects decide what each node may claim, and the Node condition
//! `EdgeTunnelReady` and Events tell operators about sessions.
//!
//! The API client, the reflector and the writers live in the `relay-kube`
//! crate (the only one that imports `kube`); this module adapts them to
//! the relay's [`Directory`] and [`StatusSink`], so the rest of the relay
//! is the same in static and in-cluster mode. Built only with the
//! `kubernetes` feature (on by default).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use relay_kube::{
    ClientOptions, DirectoryOptions, IpamDirectory, IpamKind, IpamOptions, KubeClientConfig,
    NodeClaims, NodeDirectory, PodReader, SessionEvents, StatusWriter, TokenReviewer,
};
use relay_protocol::Cidr;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bootstrap::TokenAuthority;
use crate::config::{KubeSettings, RelayConfig};
use crate::directory::{
    ambiguity, build_entries, Claim, ClaimIndex, Directory, IpamReport, Lookup, NodeEntry,
    NodeSource,
};
use crate::status::StatusSink;

pub(crate) mod cache;
pub(crate) mod ipam_prefixes;
pub(crate) mod node_addresses;
mod node_source;
mod stale_conditions;
mod status_writer;
mod tokens;
use node_source::{cloud_prefixes, hostnames, is_cloud, source};
pub use stale_conditions::{ConditionUpkeep, STALE_CONDITION_GRACE};
use status_writer::KubeStatus;
pub use status_writer::{CONDITION_WRITERS, EVENT_WRITERS};
use tokens::KubeTokens;

/// Connecting to the API failed at start.
#[derive(Debug, thiserror::Error)]
#[error("kubernetes: {0}")]
pub struct KubeStartError(#[from] relay_kube::KubeError);

/// What `[kubernetes]` gives the relay.
pub struct Kube {
    /// Node objects as the relay's directory.
    pub directory: Arc<KubeDirectory>,
    /// Condition and Events writer (or nothing, as configured).
    pub status: Arc<dyn StatusSink>,
    /// Token verification for the certificate bootstrap (with `[bootstrap]`).
    pub tokens: Option<Arc<dyn TokenAuthority>>,
    /// Services and EndpointSlices (unless `services = false`).
    pub services: Option<Arc<dyn crate::services::ServiceSource>>,
    /// The sweep for stale conditions and the flush at shutdown (with
    /// `node_status`); started once the relay's shared state exists.
    pub conditions: Option<Arc<ConditionUpkeep>>,
}

/// Connects and starts the reflector and the status writer; both run
/// until `stop`. Does not wait for the first list: `/readyz` and unknown
/// nodes' handshakes wait for it, bounded.
pub async fn start(
    settings: &KubeSettings,
    relay: &RelayConfig,
    stop: CancellationToken,
) -> Result<Kube, KubeStartError> {
    let relay_id = relay.relay_id.as_str();
    let cfg = match &settings.kubeconfig {
        Some(path) => KubeClientConfig::Kubeconfig {
            path: path.clone(),
            context: settings.context.clone(),
        },
        None => KubeClientConfig::InCluster,
    };
    let opts = ClientOptions {
        connect_timeout: settings.api_timeout,
        ..ClientOptions::default()
    };
    let client = cfg.client(&opts).await?;
    let directory = KubeDirectory::start(
        NodeDirectory::spawn(&client, &DirectoryOptions::default()),
        IpamDirectory::spawn(&client, &IpamOptions::default()),
        relay.tunnel_routes.clone(),
        settings.edge_address_ranges.clone(),
        settings.cluster_domain.clone(),
        settings.cache_file.clone(),
        stop.clone(),
    );
    let mut conditions = None;
    let status: Arc<dyn StatusSink> = if settings.node_status || settings.events {
        let writer = settings
            .node_status
            .then(|| StatusWriter::new(&client, settings.api_timeout));
        let events = settings
            .events
            .then(|| SessionEvents::new(&client, Some(relay_id.to_string()), settings.api_timeout));
        let status = Arc::new(KubeStatus::start(writer, events, stop.clone()));
        if settings.node_status {
            conditions = Some(Arc::new(ConditionUpkeep::new(
                status.clone(),
                directory.clone(),
                settings.stale_condition_grace,
            )));
        }
        status
    } else {
        Arc::new(crate::status::NoStatus)
    };
    let tokens = relay.bootstrap.as_ref().map(|b| {
        Arc::new(KubeTokens {
            reviewer: TokenReviewer::new(&client, settings.api_timeout),
            pods: PodReader::new(&client, &b.namespace, settings.api_timeout),
            username: format!(
                "system:serviceaccount:{}:{}",
                b.namespace, b.service_account
            ),
            service_account: b.service_account.clone(),
            daemonsets: b.daemonsets.clone(),
        }) as Arc<dyn TokenAuthority>
    });
    let tokens =
        tokens.map(|t| Arc::new(crate::bootstrap::ReviewGate::new(t)) as Arc<dyn TokenAuthority>);
    let services = settings.services.then(|| {
        crate::k8s_services::KubeServices::start(
            &client,
            &settings.cluster_domain,
            settings.services_cache_file.clone(),
            stop.clone(),
        ) as Arc<dyn crate::services::ServiceSource>
    });
    Ok(Kube {
        directory,
        status,
        tokens,
        services,
        conditions,
    })
}

struct Snapshot {
    entries: HashMap<String, Arc<NodeEntry>>,
    claims: ClaimIndex,
    /// Hostname address → the one Node carrying it; `None` for a name
    /// several Nodes carry, which resolves to none of them (a kubelet
    /// writes its own addresses: an edge must not take a cloud node's
    /// name by copying its Hostname).
    by_hostname: HashMap<String, Option<String>>,
    ambiguous: Vec<(Cidr, Vec<String>)>,
    /// The cloud Nodes' pod CIDRs and host prefixes (sorted).
    cloud_prefixes: Vec<Cidr>,
    /// Node → communities from its labels (nodes with none left out).
    communities: HashMap<String, BTreeSet<String>>,
    /// The Nodes positively marked as edges ([`NodeClaims::edge`]: the
    /// edge label, or the relay's condition, written once an edge
    /// connected): see [`Directory::marked_edge`].
    edges: BTreeSet<String>,
}

/// The cluster's Nodes as the relay's [`Directory`]. Recomputed from the
/// reflector's claims after each burst of changes; subscribers are told
/// only when some node's entry actually changed (the relay's own
/// condition writes change Nodes too, and must not wake every session).
pub struct KubeDirectory {
    nodes: NodeDirectory,
    /// Pod prefixes from the CNI's IPAM objects (Calico, Cilium), where
    /// installed; vetted by [`ipam_prefixes`] before use.
    ipam: IpamDirectory,
    /// When the directory started (it waits up to [`IPAM_WAIT`] after
    /// it for the IPAM resources' first answer).
    started: std::time::Instant,
    /// The IPAM prefixes last refused, so each is logged once.
    refused_prefixes: std::sync::Mutex<Vec<ipam_prefixes::Refused>>,
    /// `tunnel_routes`: evidence that a Node is in the cloud ([`is_cloud`]).
    cloud_ranges: Vec<Cidr>,
    /// `kubernetes.edge_address_ranges` (see [`node_addresses`]).
    edge_ranges: Vec<Cidr>,
    /// The cluster's DNS domain (Service names are never an edge's).
    cluster_domain: String,
    /// The Node addresses last refused, so each is logged once.
    refused: std::sync::Mutex<Vec<node_addresses::Refused>>,
    snapshot: RwLock<Arc<Snapshot>>,
    synced: AtomicBool,
    changes: watch::Sender<u64>,
    /// When the cache the entries came from was written, while they come
    /// from it (until the first list).
    cached: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The claims to keep in the cache (`kubernetes.cache_file`).
    to_cache: Option<watch::Sender<Option<Arc<cache::Nodes>>>>,
}

/// Gathers a burst of Node changes (a relist touches every node) into one
/// recomputation.
const SETTLE: Duration = Duration::from_millis(100);

/// How long after start the first Node list waits for the IPAM resources
/// to be probed and listed (they answer in a round trip or two where the
/// API answers the Node list), so that the first entries already hold
/// Calico's and Cilium's prefixes; after it the entries are installed
/// without them and follow when they come.
const IPAM_WAIT: Duration = Duration::from_secs(5);

impl KubeDirectory {
    fn start(
        nodes: NodeDirectory,
        ipam: IpamDirectory,
        cloud_ranges: Vec<Cidr>,
        edge_ranges: Vec<Cidr>,
        cluster_domain: String,
        cache_file: Option<std::path::PathBuf>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let cached = cache_file.as_deref().and_then(cache::load::<cache::Nodes>);
        let to_cache = cache_file.as_ref().map(|_| watch::channel(None).0);
        let dir = Arc::new(KubeDirectory {
            nodes,
            ipam,
            started: std::time::Instant::now(),
            refused_prefixes: std::sync::Mutex::new(Vec::new()),
            cloud_ranges,
            edge_ranges,
            cluster_domain,
            refused: std::sync::Mutex::new(Vec::new()),
            snapshot: RwLock::new(Arc::new(Snapshot {
                entries: HashMap::new(),
                claims: ClaimIndex::default(),
                by_hostname: HashMap::new(),
                ambiguous: Vec::new(),
                cloud_prefixes: Vec::new(),
                communities: HashMap::new(),
                edges: BTreeSet::new(),
            })),
            synced: AtomicBool::new(false),
            changes: watch::channel(0).0,
            cached: std::sync::Mutex::new(None),
            to_cache,
        });
        if let Some((cache::Nodes { nodes: claims }, written)) = cached {
            let age = written.elapsed().unwrap_or_default();
            info!(
                nodes = claims.len(),
                age_secs = age.as_secs(),
                "admitting edges on the node cache until the first Node list"
            );
            dir.install(&claims);
            *dir.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(written);
        }
        if let (Some(path), Some(tx)) = (cache_file, &dir.to_cache) {
            tokio::spawn(relay_transport::saved::saver(
                path,
                tx.subscribe(),
                cache::save::<cache::Nodes>,
                <cache::Nodes as cache::Cached>::WHAT,
                stop.clone(),
            ));
            let (w1, w2) = (Arc::downgrade(&dir), Arc::downgrade(&dir));
            tokio::spawn(cache::restamp(
                move || w1.upgrade().map(|d| d.nodes.watch_errors()),
                move || {
                    if let Some(tx) = w2.upgrade().as_ref().and_then(|d| d.to_cache.as_ref()) {
                        // Only claims from the API (none yet: nothing).
                        if tx.borrow().is_some() {
                            tx.send_modify(|_| {});
                        }
                    }
                },
                stop.clone(),
            ));
        }
        let me = dir.clone();
        tokio::spawn(async move {
            let mut rx = me.nodes.subscribe();
            let mut ipam_rx = me.ipam.subscribe();
            let ipam_wait = tokio::time::sleep(IPAM_WAIT);
            let mut ipam_wait = std::pin::pin!(ipam_wait);
            let mut waited = false;
            loop {
                me.refresh();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                    r = ipam_rx.changed() => if r.is_err() { return },
                    _ = &mut ipam_wait, if !waited => waited = true,
                }
                tokio::time::sleep(SETTLE).await;
                rx.borrow_and_update();
                ipam_rx.borrow_and_update();
            }
        });
        dir
    }

    /// Takes the reflector's claims, once it has listed, with each node's
    /// IPAM prefixes (once the IPAM resources answered, or [`IPAM_WAIT`]
    /// passed): the first list replaces what came from the cache.
    fn refresh(&self) {
        if !self.nodes.is_synced() {
            return;
        }
        if !self.ipam.is_settled() && self.started.elapsed() < IPAM_WAIT {
            return;
        }
        let mut claims = self.nodes.all_claims();
        for (node, prefixes) in self.ipam.prefixes() {
            if let Some(c) = claims.get_mut(&node) {
                c.ipam_cidrs = prefixes;
            }
        }
        let from_cache = self
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        let changed = self.install(&claims);
        if let Some(tx) = &self.to_cache {
            if changed || from_cache || tx.borrow().is_none() {
                tx.send_replace(Some(Arc::new(cache::Nodes { nodes: claims })));
            }
        }
    }

    /// Makes `claims` the directory's entries; false when nothing changed.
    fn install(&self, claims: &BTreeMap<String, NodeClaims>) -> bool {
        let cloud = |c: &NodeClaims| is_cloud(c, &self.cloud_ranges);
        // IPAM prefixes first: the addresses are vetted against the pod
        // ranges taken (an edge's forged block must not cost another node
        // its address). Vetting keeps each Node cloud or edge as it was.
        let (claims, refused_prefixes) =
            ipam_prefixes::vet(claims, cloud, &self.cloud_ranges, &self.edge_ranges);
        let mut refused_ranges: BTreeMap<&str, Vec<Cidr>> = BTreeMap::new();
        for r in &refused_prefixes {
            refused_ranges.entry(&r.node).or_default().push(r.prefix);
        }
        let refused_ranges: BTreeMap<String, Vec<Cidr>> = refused_ranges
            .into_iter()
            .map(|(n, mut v)| {
                v.sort_unstable();
                v.dedup();
                (n.to_string(), v)
            })
            .collect();
        self.report_prefixes(refused_prefixes);
        let claims = &claims;
        let (addresses, refused) =
            node_addresses::vet(claims, cloud, &self.cloud_ranges, &self.edge_ranges);
        self.report(refused);
        let sources: BTreeMap<String, NodeSource> = claims
            .iter()
            .map(|(n, c)| {
                let mine = addresses.get(n).map(Vec::as_slice).unwrap_or_default();
                let mut s = source(c, mine, &self.cloud_ranges);
                s.refused_ranges = refused_ranges.get(n).cloned().unwrap_or_default();
                (n.clone(), s)
            })
            .collect();
        let communities: HashMap<String, BTreeSet<String>> = claims
            .iter()
            .filter(|(_, c)| !c.communities.is_empty())
            .map(|(n, c)| (n.clone(), c.communities.clone()))
            .collect();
        let edges: BTreeSet<String> = claims
            .iter()
            .filter(|(_, c)| c.edge)
            .map(|(n, _)| n.clone())
            .collect();
        let entries = build_entries(&sources);
        let first = !self.synced.load(Relaxed);
        let now = self.read();
        if !first && now.entries == entries && now.communities == communities && now.edges == edges
        {
            return false;
        }
        let by_hostname = hostnames(&entries, &self.cluster_domain);
        let shared_names = by_hostname.values().filter(|v| v.is_none()).count();
        if shared_names > 0 {
            info!(
                count = shared_names,
                "Hostname addresses carried by several nodes resolve to none of them"
            );
        }
        let cloud_prefixes = cloud_prefixes(&entries);
        let ambiguous = ambiguity(&entries);
        if !ambiguous.is_empty() {
            info!(
                count = ambiguous.len(),
                "host addresses shared by several nodes are not routed by address"
            );
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Snapshot {
            claims: ClaimIndex::new(&entries),
            entries,
            by_hostname,
            ambiguous,
            cloud_prefixes,
            communities,
            edges,
        });
        // Only now: a lookup that sees "synced" must also see the entries.
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        true
    }

    /// Logs the Node addresses refused that were not refused before.
    fn report(&self, mut refused: Vec<node_addresses::Refused>) {
        refused.sort();
        let mut last = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        for r in refused.iter().filter(|r| last.binary_search(r).is_err()) {
            warn!(
                node = %r.node,
                address = %r.ip,
                why = %r.why,
                "Node address not taken as the node's: not routed to it"
            );
        }
        *last = refused;
    }

    /// Logs the IPAM prefixes refused that were not refused before.
    fn report_prefixes(&self, mut refused: Vec<ipam_prefixes::Refused>) {
        refused.sort();
        let mut last = self
            .refused_prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for r in refused.iter().filter(|r| last.binary_search(r).is_err()) {
            warn!(
                node = %r.node,
                prefix = %r.prefix,
                why = %r.why,
                "IPAM prefix (Calico block, Cilium range) not taken as the node's: not routed to it"
            );
        }
        *last = refused;
    }

    fn read(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Directory for KubeDirectory {
    fn watch_errors(&self) -> u64 {
        self.nodes.watch_errors()
    }

    fn cached_since(&self) -> Option<std::time::SystemTime> {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refused_addresses(&self) -> usize {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn ipam(&self) -> Option<IpamReport> {
        Some(IpamReport {
            sources: IpamKind::ALL
                .iter()
                .map(|k| (k.resource_name(), self.ipam.state(*k).as_str()))
                .collect(),
            watch_errors: self.ipam.watch_errors(),
            last_error: self.ipam.last_error(),
            skipped_entries: self.ipam.skipped_entries(),
            refused_prefixes: self
                .refused_prefixes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            calico_strict_affinity: self.ipam.calico_strict_affinity(),
        })
    }

    fn lookup(&self, node: &str) -> Lookup {
        if !self.is_synced() {
            return Lookup::NotSynced;
        }
        match self.read().entries.get(node) {
            Some(e) => Lookup::Known(e.clone()),
            None => Lookup::Unknown,
        }
    }

    fn resolve_name(&self, name: &str) -> Option<String> {
        let s = self.read();
        if s.entries.contains_key(name) {
            return Some(name.to_string());
        }
        s.by_hostname
            .get(&name.to_ascii_lowercase())
            .cloned()
            .flatten()
    }

    fn is_synced(&self) -> bool {
        // Entries from a cache that has aged past its limit while the
        // first list never came are no longer trusted (as at start).
        self.synced.load(std::sync::atomic::Ordering::Acquire)
            && !crate::directory::cache_too_old(self.cached_since())
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn ambiguous(&self) -> Vec<(Cidr, Vec<String>)> {
        self.read().ambiguous.clone()
    }

    fn source(&self) -> &'static str {
        "kubernetes"
    }

    fn last_error(&self) -> Option<String> {
        self.nodes.last_error()
    }

    fn claim(&self, ip: std::net::IpAddr) -> Claim {
        self.read().claims.claim(ip)
    }

    fn marked_edge(&self, node: &str) -> bool {
        self.is_synced() && self.read().edges.contains(node)
    }

    fn label_communities(&self) -> HashMap<String, BTreeSet<String>> {
        self.read().communities.clone()
    }

    fn cloud_prefixes(&self) -> Vec<Cidr> {
        self.read().cloud_prefixes.clone()
    }
}
