//! [`NodeDirectory`]: what each Node owns (pod CIDRs, addresses), from a
//! reflector over Nodes.
//!
//! Why a reflector and not a GET per check: the relay checks claims on
//! every edge hello, and must keep working (with the last known state)
//! when the apiserver is unreachable. The watcher relists on its own after
//! `410 Gone` or a broken stream and the store is only replaced once a
//! relist completes, so an outage never empties it. `managedFields` are
//! stripped before storing: they are most of a Node's bytes and we never
//! read them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
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

impl Inner {
    /// Recomputes one node's claims; logs and counts issues only when they
    /// differ from the last computation, so an unchanged bad Node is quiet.
    fn update(&self, node: &Node) {
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        let (claims, issues) = node_claims(node);
        let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
        let known = map.get(&name).map(|(_, i)| i);
        if known != Some(&issues) {
            for i in &issues {
                tracing::warn!(node = %name, "{i}");
            }
            self.skipped
                .fetch_add(issues.len() as u64, Ordering::Relaxed);
        }
        map.insert(name, (claims, issues));
    }

    fn remove(&self, node: &Node) {
        if let Some(name) = &node.metadata.name {
            let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
            map.remove(name);
        }
    }

    /// After a (re)list: the store was replaced, rebuild claims from it.
    fn rebuild(&self) {
        let nodes = self.store.state();
        {
            let mut map = self.claims.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|name, _| nodes.iter().any(|n| n.metadata.name.as_ref() == Some(name)));
        }
        for n in &nodes {
            self.update(n);
        }
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
        let (store, writer) = reflector::store();
        let inner = Arc::new(Inner {
            store,
            claims: RwLock::new(BTreeMap::new()),
            synced: watch::channel(false).0,
            changes: watch::channel(0).0,
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: crate::client::LastError::default(),
        });
        let config = watcher::Config::default().timeout(opts.watch_timeout_secs);
        let stream = watcher(Api::<Node>::all(client.0.clone()), config)
            .modify(|n: &mut Node| n.metadata.managed_fields = None)
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

    /// A snapshot of all known Nodes (managedFields stripped).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.inner.store.state()
    }

    /// A counter bumped on every change (Node added, changed or deleted,
    /// relist completed); `changed().await` on the receiver to react.
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
                inner.update(&n);
                inner.changed();
            }
            Ok(watcher::Event::Delete(n)) => {
                inner.remove(&n);
                inner.changed();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                inner.rebuild();
                inner.synced.send_replace(true);
                inner.changed();
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
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    fn node(name: &str, cidrs: &[&str], addrs: &[(&str, &str)]) -> Node {
        Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn claims_from_a_dual_stack_node() {
        let n = node(
            "edge-1",
            &["10.244.1.0/24", "fd00:10:244:1::/64"],
            &[
                ("InternalIP", "192.168.1.10"),
                ("InternalIP", "fd00::10"),
                ("ExternalIP", "203.0.113.7"),
                ("Hostname", "edge-1.shop.example"),
                ("InternalDNS", "ip-192-168-1-10.shop.internal"),
                ("ExternalDNS", "edge-1.shops.example.com"),
                ("InternalDNS", "ip-192-168-1-10.shop.internal"),
            ],
        );
        let (c, issues) = node_claims(&n);
        assert!(issues.is_empty());
        assert_eq!(c.pod_cidrs.len(), 2);
        assert_eq!(c.pod_cidrs[0].to_string(), "10.244.1.0/24");
        assert_eq!(c.internal_ips.len(), 2);
        assert_eq!(
            c.external_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.hostname.as_deref(), Some("edge-1.shop.example"));
        assert_eq!(
            c.dns_names,
            ["ip-192-168-1-10.shop.internal", "edge-1.shops.example.com"]
        );
        assert_eq!(c.zone, None, "no zone label");
        let mut zoned = n.clone();
        zoned.metadata.labels = Some([(ZONE_LABEL.to_string(), "shop-a".to_string())].into());
        assert_eq!(node_claims(&zoned).0.zone.as_deref(), Some("shop-a"));
    }

    #[test]
    fn edges_are_told_by_their_label_or_the_relays_condition() {
        let plain = node("cloud-1", &["10.244.0.0/24"], &[("InternalIP", "10.0.0.2")]);
        assert!(!node_claims(&plain).0.edge, "no label, no condition: cloud");
        let mut labelled = plain.clone();
        labelled.metadata.labels = Some([(EDGE_ROLE_LABEL.to_string(), String::new())].into());
        assert!(node_claims(&labelled).0.edge);
        let mut other_label = plain.clone();
        other_label.metadata.labels = Some(
            [(
                "node-role.kubernetes.io/control-plane".to_string(),
                String::new(),
            )]
            .into(),
        );
        let (c, _) = node_claims(&other_label);
        assert!(!c.edge && c.control_plane);
        // Other edge tools' labels, by value.
        for (key, value, edge, cloud) in [
            ("openyurt.io/is-edge-worker", "true", true, false),
            ("openyurt.io/is-edge-worker", "false", false, true),
            ("superedge.io/node-edge", "enable", true, false),
            ("superedge.io/node-edge", "disable", false, false),
        ] {
            let mut n = plain.clone();
            n.metadata.labels = Some([(key.to_string(), value.to_string())].into());
            let (c, _) = node_claims(&n);
            assert_eq!((c.edge, c.cloud_label), (edge, cloud), "{key}={value}");
        }
        assert!(!node_claims(&labelled).0.control_plane);
        let mut connected_once = plain.clone();
        if let Some(st) = connected_once.status.as_mut() {
            st.conditions = Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                type_: crate::CONDITION_TYPE.to_string(),
                status: "False".into(),
                ..Default::default()
            }]);
        }
        assert!(
            node_claims(&connected_once).0.edge,
            "our condition, even False"
        );
    }

    /// Only labels a kubelet cannot set on its own Node make a community
    /// member; the old, self-settable prefix is reported and ignored.
    #[test]
    fn communities_come_only_from_labels_kubelets_cannot_set() {
        let mut n = node("edge-3", &["10.244.3.0/24"], &[]);
        n.metadata.labels = Some(
            [
                (format!("{COMMUNITY_LABEL_PREFIX}shops"), String::new()),
                (format!("{SELF_SET_COMMUNITY_PREFIX}depots"), String::new()),
            ]
            .into(),
        );
        let (c, issues) = node_claims(&n);
        assert_eq!(c.communities, ["shops".to_string()].into());
        assert_eq!(
            issues,
            [ClaimIssue::SelfSetCommunity {
                node: "edge-3".into(),
                label: format!("{SELF_SET_COMMUNITY_PREFIX}depots"),
            }]
        );
        assert!(issues[0].to_string().contains(COMMUNITY_LABEL_PREFIX));
    }

    #[test]
    fn bad_entries_are_skipped_and_reported() {
        let n = node(
            "edge-2",
            &["10.244.2.0/24", "10.244.2.1/24", "banana", "10.0.0.1"],
            &[("InternalIP", "not-an-ip"), ("InternalIP", "10.0.0.2")],
        );
        let (c, issues) = node_claims(&n);
        assert_eq!(c.pod_cidrs.len(), 1);
        assert_eq!(c.internal_ips.len(), 1);
        assert_eq!(issues.len(), 4, "{issues:?}");
        assert!(matches!(issues[0], ClaimIssue::BadPodCidr { .. }));
        assert!(matches!(issues[3], ClaimIssue::BadAddress { .. }));
    }

    #[test]
    fn legacy_single_pod_cidr_is_used_when_the_list_is_empty() {
        let mut n = node("edge-3", &[], &[]);
        if let Some(s) = n.spec.as_mut() {
            s.pod_cidr = Some("10.244.3.0/24".into());
        }
        let (c, _) = node_claims(&n);
        assert_eq!(c.pod_cidrs.len(), 1);
        assert_eq!(c.hostname, None);
    }
}
