//! [`NodeDirectory`]: what each Node owns (pod CIDRs, addresses), from a
//! reflector over Nodes.
//!
//! Why a reflector and not a GET per check: the relay checks claims on
//! every edge hello, and must keep working (with the last known state)
//! when the apiserver is unreachable. The watcher relists on its own after
//! `410 Gone` or a broken stream and the store is only replaced once a
//! relist completes, so an outage never empties it.
//!
//! Each Node is trimmed to what the relay reads of it before it is stored
//! (see [`NodeDirectory::nodes`]). A real Node carries the kubelet's image
//! list (up to 50 entries), its `nodeInfo`, capacities, the kubelet's
//! conditions and the CNI's and CSI drivers' annotations: several KB to
//! ~15 KB each, which the store would hold for every Node, twice while a
//! relist builds the new store beside the old.
//!
//! Subscribers are told only when a Node's [`NodeClaims`] change: a
//! kubelet re-reports its status at least every 5 minutes (heartbeat
//! times, images), which at 10,000 Nodes is dozens of events a second
//! that change nothing the relay's directory is built from.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use relay_protocol::{Cidr, CidrError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{KubeClient, KubeError};

/// What a Node claims, as the relay uses it to check an edge's routes.
/// Serializable for the relay's cache of them (fields missing from a
/// cache written by another version take their defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NodeClaims {
    /// `spec.podCIDRs` (or `spec.podCIDR` when the list is empty), parsed;
    /// unparsable entries are left out (see [`ClaimIssue`]).
    pub pod_cidrs: Vec<Cidr>,
    /// Pod prefixes the CNI's own IPAM gave the node (Calico's confirmed
    /// BlockAffinities, Cilium's `CiliumNode` `spec.ipam.podCIDRs`; see
    /// [`crate::IpamDirectory`]). Never filled from the Node: the relay
    /// adds them, vetted, before it uses the claims. Unlike `pod_cidrs`
    /// (set by kube-controller-manager) these are written by the CNI's
    /// agents on the nodes, so they are a node's word.
    pub ipam_cidrs: Vec<Cidr>,
    /// `status.addresses` of type `InternalIP`.
    pub internal_ips: Vec<IpAddr>,
    /// `status.addresses` of type `ExternalIP`.
    pub external_ips: Vec<IpAddr>,
    /// The `Hostname` address, which may differ from the Node name.
    pub hostname: Option<String>,
    /// `status.addresses` of type `InternalDNS` and `ExternalDNS`: names
    /// kube-apiserver dials a kubelet by when its
    /// `--kubelet-preferred-address-types` puts them first.
    pub dns_names: Vec<String>,
    /// Edge-to-edge communities from labels
    /// `node-restriction.kubernetes.io/edge-relay-community-<name>` (any
    /// value; FabEdge-style groups an operator sets with `kubectl label
    /// node edge-1 node-restriction.kubernetes.io/edge-relay-community-shops=`).
    /// See [`COMMUNITY_LABEL_PREFIX`] for why that prefix.
    pub communities: std::collections::BTreeSet<String>,
    /// An edge node: labelled [`EDGE_ROLE_LABEL`] (what the edge
    /// DaemonSet selects) or as one by another edge tool
    /// ([`OTHER_EDGE_LABELS`]), or carrying the relay's
    /// [`CONDITION_TYPE`](crate::CONDITION_TYPE) condition (its edge
    /// connected once). Every other Node is a cloud node, which the relay
    /// may dial itself for a CONNECT client (the apiserver's kubelet
    /// traffic through its egress selector) only with evidence that it
    /// is one (see the relay's directory).
    pub edge: bool,
    /// Labelled a control-plane node (`node-role.kubernetes.io/control-plane`,
    /// or the older `.../master`): in the cloud.
    pub control_plane: bool,
    /// Labelled a cloud node by another edge tool ([`CLOUD_LABELS`]).
    pub cloud_label: bool,
    /// The [`ZONE_LABEL`] value: the zone the node's kube-proxy keeps
    /// traffic in when a Service's endpoints carry zone hints.
    pub zone: Option<String>,
}

/// The Node label naming its zone, which topology hints refer to.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Prefix of the Node labels that put a node in a community (the rest of
/// the key names it). Membership lets an edge reach other edges, so a
/// node must not be able to grant it to itself: a node's kubelet may
/// update its own Node, labels included, except (with the NodeRestriction
/// admission plugin, on in kubeadm, k3s and the managed services) labels
/// under `node-restriction.kubernetes.io/`, the prefix Kubernetes keeps
/// for exactly this.
pub const COMMUNITY_LABEL_PREFIX: &str = "node-restriction.kubernetes.io/edge-relay-community-";

/// The community label prefix of earlier builds, which a node's own
/// kubelet may set: ignored, and reported ([`ClaimIssue::SelfSetCommunity`]).
pub const SELF_SET_COMMUNITY_PREFIX: &str = "community.edge-relay.io/";

/// The Node label that marks an edge node (any value): the edge
/// DaemonSet's node selector.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";

/// Labels other edge tools put on their edge nodes, with the value that
/// means "edge": OpenYurt's and SuperEdge's. A cluster moving from one of
/// them keeps telling its edges apart before it labels them
/// [`EDGE_ROLE_LABEL`] (KubeEdge's too) for the edge DaemonSet.
pub const OTHER_EDGE_LABELS: [(&str, &str); 2] = [
    ("openyurt.io/is-edge-worker", "true"),
    ("superedge.io/node-edge", "enable"),
];

/// Labels other edge tools put on their cloud nodes, with the value that
/// means "cloud" (OpenYurt's).
pub const CLOUD_LABELS: [(&str, &str); 1] = [("openyurt.io/is-edge-worker", "false")];

/// The Node labels that mark a control-plane node (any value).
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// An entry of a Node that could not be used; the rest of the Node is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimIssue {
    /// A `podCIDRs` entry that is not a CIDR (or has host bits set).
    #[error("node {node}: pod CIDR {value:?} skipped: {error}")]
    BadPodCidr {
        /// Node name.
        node: String,
        /// The entry as written.
        value: String,
        /// Why it does not parse.
        error: CidrError,
    },
    /// A community label its node's kubelet may set
    /// ([`SELF_SET_COMMUNITY_PREFIX`]): not a membership.
    #[error("node {node}: label {label} ignored: the node's own kubelet may set it; put the node in a community with {COMMUNITY_LABEL_PREFIX}<name>, which NodeRestriction keeps from kubelets")]
    SelfSetCommunity {
        /// Node name.
        node: String,
        /// The label's key.
        label: String,
    },
    /// An `InternalIP`/`ExternalIP` address that is not an IP address.
    #[error("node {node}: {kind} address {value:?} skipped: not an IP address")]
    BadAddress {
        /// Node name.
        node: String,
        /// Address type.
        kind: String,
        /// The entry as written.
        value: String,
    },
}

/// Computes a Node's claims; bad entries are skipped and reported.
pub fn node_claims(node: &Node) -> (NodeClaims, Vec<ClaimIssue>) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut claims = NodeClaims::default();
    let mut issues = Vec::new();
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    for value in cidrs {
        match value.parse::<Cidr>() {
            Ok(c) if value.contains('/') => claims.pod_cidrs.push(c),
            Ok(_) => issues.push(ClaimIssue::BadPodCidr {
                node: name.clone(),
                error: CidrError::Length(value.clone()),
                value,
            }),
            Err(error) => issues.push(ClaimIssue::BadPodCidr {
                node: name.clone(),
                value,
                error,
            }),
        }
    }
    for (key, value) in node.metadata.labels.iter().flatten() {
        if let Some(name) = key.strip_prefix(COMMUNITY_LABEL_PREFIX) {
            if !name.is_empty() {
                claims.communities.insert(name.to_string());
            }
        }
        if key.starts_with(SELF_SET_COMMUNITY_PREFIX) {
            issues.push(ClaimIssue::SelfSetCommunity {
                node: name.clone(),
                label: key.clone(),
            });
        }
        let pair = (key.as_str(), value.as_str());
        claims.edge |= key == EDGE_ROLE_LABEL || OTHER_EDGE_LABELS.contains(&pair);
        claims.control_plane |= CONTROL_PLANE_LABELS.contains(&key.as_str());
        claims.cloud_label |= CLOUD_LABELS.contains(&pair);
        if key == ZONE_LABEL && !value.is_empty() {
            claims.zone = Some(value.clone());
        }
    }
    claims.edge |= node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == crate::CONDITION_TYPE));
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    for a in addresses {
        match a.type_.as_str() {
            "Hostname" if claims.hostname.is_none() => claims.hostname = Some(a.address),
            "InternalDNS" | "ExternalDNS" if !claims.dns_names.contains(&a.address) => {
                claims.dns_names.push(a.address)
            }
            kind @ ("InternalIP" | "ExternalIP") => match a.address.parse::<IpAddr>() {
                Ok(ip) if kind == "InternalIP" => claims.internal_ips.push(ip),
                Ok(ip) => claims.external_ips.push(ip),
                Err(_) => issues.push(ClaimIssue::BadAddress {
                    node: name.clone(),
                    kind: kind.to_string(),
                    value: a.address,
                }),
            },
            _ => {}
        }
    }
    (claims, issues)
}

/// Whether [`node_claims`] (or [`NodeClaims`]) depends on the Node label
/// `key`: the only labels [`trim`] keeps.
fn label_read(key: &str) -> bool {
    key.starts_with(COMMUNITY_LABEL_PREFIX)
        || key.starts_with(SELF_SET_COMMUNITY_PREFIX)
        || key == EDGE_ROLE_LABEL
        || key == ZONE_LABEL
        || CONTROL_PLANE_LABELS.contains(&key)
        || OTHER_EDGE_LABELS.iter().any(|(k, _)| *k == key)
        || CLOUD_LABELS.iter().any(|(k, _)| *k == key)
}

/// Trims a Node to what the relay reads of it, in place, before it is
/// stored: the name; the labels [`node_claims`] looks at; `spec.podCIDR`
/// and `spec.podCIDRs`; `status.addresses`; and the relay's own
/// [`CONDITION_TYPE`](crate::CONDITION_TYPE) condition, whole (its
/// presence marks an edge in [`node_claims`], its status is what
/// [`says_ready`](crate::says_ready) reads). Everything else goes: the
/// other metadata (annotations, managedFields, resourceVersion: the
/// watcher keeps its own), the rest of the spec (taints, providerID) and
/// of the status (images, nodeInfo, capacity, the kubelet's conditions).
/// [`node_claims`] of the trimmed Node equals that of the whole one.
fn trim(node: &mut Node) {
    let labels: BTreeMap<String, String> = node
        .metadata
        .labels
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| label_read(k))
        .collect();
    node.metadata = ObjectMeta {
        name: node.metadata.name.take(),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    };
    node.spec = node.spec.take().map(|s| NodeSpec {
        pod_cidr: s.pod_cidr,
        pod_cidrs: s.pod_cidrs,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|s| {
        let conditions: Vec<_> = s
            .conditions
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ == crate::CONDITION_TYPE)
            .collect();
        NodeStatus {
            addresses: s.addresses,
            conditions: (!conditions.is_empty()).then_some(conditions),
            ..NodeStatus::default()
        }
    });
}

/// Options for the directory's watch.
#[derive(Clone, Debug)]
pub struct DirectoryOptions {
    /// `timeoutSeconds` of each watch request; the watcher re-watches from
    /// the last resourceVersion when it expires. Short (60 s, against the
    /// usual 290), so the read timeout that notices a silently dead watch
    /// connection can be short too (90 s, see
    /// [`crate::ClientOptions::read_timeout`]): Node and Service changes
    /// are then at most that late after such a failure, not 5.5 minutes.
    pub watch_timeout_secs: u32,
}

impl Default for DirectoryOptions {
    fn default() -> Self {
        DirectoryOptions {
            watch_timeout_secs: 60,
        }
    }
}

struct Inner {
    store: Store<Node>,
    claims: RwLock<BTreeMap<String, (NodeClaims, Vec<ClaimIssue>)>>,
    synced: watch::Sender<bool>,
    changes: watch::Sender<u64>,
    skipped: AtomicU64,
    errors: AtomicU64,
    /// The last watch error since start.
    last_error: crate::client::LastError,
}

type ClaimMap = BTreeMap<String, (NodeClaims, Vec<ClaimIssue>)>;

impl Inner {
    /// An empty directory's state and the writer of its store.
    fn new() -> (Inner, reflector::store::Writer<Node>) {
        let (store, writer) = reflector::store();
        let inner = Inner {
            store,
            claims: RwLock::new(BTreeMap::new()),
            synced: watch::channel(false).0,
            changes: watch::channel(0).0,
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: crate::client::LastError::default(),
        };
        (inner, writer)
    }

    /// Recomputes one node's claims; true if they differ from the stored
    /// ones (or the node is new).
    fn update(&self, node: &Node) -> bool {
        let Some(name) = node.metadata.name.clone() else {
            return false;
        };
        let (claims, issues) = node_claims(node);
        let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
        self.store_claims(&mut map, name, claims, issues)
    }

    /// Stores one node's claims; true if they differ from the stored ones.
    /// Logs and counts issues only when they differ from the last
    /// computation, so an unchanged bad Node is quiet.
    fn store_claims(
        &self,
        map: &mut ClaimMap,
        name: String,
        claims: NodeClaims,
        issues: Vec<ClaimIssue>,
    ) -> bool {
        let known = map.get(&name);
        if known.map(|(_, i)| i) != Some(&issues) {
            for i in &issues {
                tracing::warn!(node = %name, "{i}");
            }
            self.skipped
                .fetch_add(issues.len() as u64, Ordering::Relaxed);
        }
        let changed = known.map(|(c, _)| c) != Some(&claims);
        map.insert(name, (claims, issues));
        changed
    }

    /// Forgets a deleted node; true if it was known.
    fn remove(&self, node: &Node) -> bool {
        let Some(name) = &node.metadata.name else {
            return false;
        };
        let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name).is_some()
    }

    /// After a (re)list: the store was replaced, rebuild claims from it;
    /// true if any node's claims changed (or a node came or went). The
    /// claims are computed before the lock is taken, and the nodes gone
    /// are found through a set: linear in the number of Nodes.
    fn rebuild(&self) -> bool {
        let nodes = self.store.state();
        let fresh: Vec<(String, (NodeClaims, Vec<ClaimIssue>))> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, node_claims(n))))
            .collect();
        let listed: HashSet<&str> = fresh.iter().map(|(name, _)| name.as_str()).collect();
        let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|name, _| listed.contains(name.as_str()));
        let mut changed = map.len() != before;
        for (name, (claims, issues)) in fresh {
            changed |= self.store_claims(&mut map, name, claims, issues);
        }
        changed
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g += 1);
    }
}

/// A live view of the cluster's Nodes. Dropping it stops the watch.
pub struct NodeDirectory {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl NodeDirectory {
    /// Starts the watch (LIST then WATCH, relisting when needed, with the
    /// default backoff between failures). Needs `list` and `watch` on nodes.
    /// Must be called within a Tokio runtime.
    pub fn spawn(client: &KubeClient, opts: &DirectoryOptions) -> NodeDirectory {
        let (inner, writer) = Inner::new();
        let inner = Arc::new(inner);
        let config = watcher::Config::default().timeout(opts.watch_timeout_secs);
        let stream = watcher(Api::<Node>::all(client.0.clone()), config)
            .modify(trim)
            .default_backoff()
            .reflect(writer);
        let task = tokio::spawn(drive(inner.clone(), stream));
        NodeDirectory { inner, task }
    }

    /// Whether the first full list has been stored (stays true afterwards,
    /// through outages).
    pub fn is_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Waits until [`NodeDirectory::is_synced`], at most `timeout`.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        let mut rx = self.inner.synced.subscribe();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        );
        match ok {
            true => Ok(()),
            false => Err(KubeError::Timeout {
                what: "node directory sync",
                after: timeout,
            }),
        }
    }

    /// The claims of `node`, if the directory knows that Node.
    pub fn claims(&self, node: &str) -> Option<NodeClaims> {
        let map = self.inner.claims.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).map(|(c, _)| c.clone())
    }

    /// Every known Node's claims, by name (one lock, one copy).
    pub fn all_claims(&self) -> BTreeMap<String, NodeClaims> {
        let map = self.inner.claims.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(n, (c, _))| (n.clone(), c.clone()))
            .collect()
    }

    /// A snapshot of all known Nodes, each trimmed to what the relay reads
    /// of it: `metadata.name`; the labels [`node_claims`] reads (the
    /// community, edge, cloud, control-plane and zone labels);
    /// `spec.podCIDR` and `spec.podCIDRs`; `status.addresses`; and the
    /// relay's own [`CONDITION_TYPE`](crate::CONDITION_TYPE) condition in
    /// `status.conditions`. Nothing else is kept (no annotations, images,
    /// `nodeInfo`, capacities, or other conditions).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.inner.store.state()
    }

    /// A counter bumped when some Node's claims change (a Node added or
    /// deleted, its [`NodeClaims`] changed, a relist that changed any, the
    /// first list); `changed().await` on the receiver to react. A Node
    /// update that leaves its claims as they were (a kubelet's status
    /// report, the relay's own condition) does not bump it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Entries skipped as unusable since start ([`ClaimIssue`]s, counted
    /// when first seen on a Node).
    pub fn skipped_entries(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// Watch errors since start (each followed by a backoff and a retry).
    pub fn watch_errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// The last watch error since start (a 403 for want
    /// of RBAC, the apiserver unreachable), for readiness to say why.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.get()
    }
}

impl Drop for NodeDirectory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive<S>(inner: Arc<Inner>, stream: S)
where
    S: futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(n)) => {
                if inner.update(&n) {
                    inner.changed();
                }
            }
            Ok(watcher::Event::Delete(n)) => {
                if inner.remove(&n) {
                    inner.changed();
                }
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                let changed = inner.rebuild();
                let was_synced = inner.synced.send_replace(true);
                if changed || !was_synced {
                    inner.changed();
                }
                tracing::debug!(
                    nodes = inner.store.state().len(),
                    "node directory (re)listed"
                );
            }
            Err(e) => {
                inner.errors.fetch_add(1, Ordering::Relaxed);
                inner.last_error.set("nodes", &e);
                tracing::warn!(error = %e, "node watch failed; keeping the last known nodes, retrying with backoff");
            }
        }
    }
    tracing::error!("node watch stream ended");
}

#[cfg(test)]
mod tests;
