//! Who may claim what: the one directory the handshake, the route table and
//! CONNECT-by-name ask, whatever its source.
//!
//! Two sources fill it:
//! - the static `[nodes]` table of relay.toml ([`StaticDirectory`]), for
//!   clusters the relay cannot read;
//! - the cluster's Node objects (`[kubernetes]`, in [`crate::k8s`]): a
//!   node may serve its `spec.podCIDRs` and the addresses in
//!   `status.addresses`.
//!
//! Both go through [`build_entries`], which also handles repeated site
//! LANs: shops and towers reuse `192.168.1.0/24`, so two nodes may share a
//! host address. Such an address is *ambiguous*: routed for neither node
//! (traffic for one must never land on its twin, also while one is
//! offline, so ambiguity is computed from every known node, not from live
//! sessions), shown in the admin API, counted, and both nodes stay
//! reachable by name (`CONNECT edge-7:10250`). Pod CIDRs are unique
//! cluster-wide; two nodes claiming overlapping pod CIDRs stay a typed
//! refusal at registration.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio::sync::watch;

/// What one node may serve and how it is reached by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeEntry {
    /// Prefixes the node may serve: pod CIDRs and host prefixes of its
    /// addresses (Kubernetes), or its `[nodes]` list (static).
    pub allowed: Vec<Cidr>,
    /// Host prefixes in `allowed` that another node claims too: never
    /// routed by address, for either node.
    pub ambiguous: Vec<Cidr>,
    /// Host prefixes of the node's addresses that are not its own to serve
    /// (Kubernetes: refused by the address vetting, see
    /// `k8s/node_addresses.rs`): an edge advertising one is not refused
    /// for it, it is left out, as an ambiguous one is.
    pub refused: Vec<Cidr>,
    /// Pod ranges its CNI's IPAM gives the node that the relay does not
    /// take as its own (Kubernetes: overlapping a cloud range, another
    /// node's, or a reserved one; see `k8s/ipam_prefixes.rs`): its pods
    /// there are not routed to it.
    pub refused_ranges: Vec<Cidr>,
    /// The address `CONNECT <node>:<port>` dials: the first InternalIP,
    /// else the first ExternalIP (Kubernetes); none in static mode (the
    /// edge names its own).
    pub primary: Option<IpAddr>,
    /// The node's `Hostname`, `InternalDNS` and `ExternalDNS` addresses
    /// (which may differ from its name): what `CONNECT <name>:<port>`
    /// may name it by.
    pub hostnames: Vec<String>,
    /// A cloud node (Kubernetes: neither labelled an edge nor ever
    /// connected as one), which the relay may dial itself for a CONNECT
    /// client; never in static mode, whose table lists edges.
    pub cloud: bool,
    /// Its `topology.kubernetes.io/zone` label (Kubernetes), which
    /// Services' zone hints refer to (see [`crate::topology`]).
    pub zone: Option<Arc<str>>,
}

impl NodeEntry {
    /// The prefixes the relay routes to this node when the edge advertises
    /// nothing: everything allowed except the ambiguous host prefixes.
    pub fn routable(&self) -> Vec<Cidr> {
        self.allowed
            .iter()
            .filter(|c| !self.ambiguous.contains(c))
            .copied()
            .collect()
    }
}

/// The answer to "what may `node` claim?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The node is known.
    Known(Arc<NodeEntry>),
    /// No such node.
    Unknown,
    /// The source has not loaded once yet (Kubernetes, right after start).
    NotSynced,
}

/// The directory interface: the relay asks it, sources fill it.
pub trait Directory: Send + Sync + 'static {
    /// What `node` may claim.
    fn lookup(&self, node: &str) -> Lookup;
    /// The node whose name, or `Hostname`, `InternalDNS` or `ExternalDNS`
    /// address, is `name`.
    fn resolve_name(&self, name: &str) -> Option<String>;
    /// Whether the source has loaded once (`/readyz` waits for it).
    fn is_synced(&self) -> bool;
    /// Marked changed whenever some node's entry changed.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The ambiguous host prefixes and the nodes sharing each.
    fn ambiguous(&self) -> Vec<(Cidr, Vec<String>)>;
    /// `static` or `kubernetes`, for logs and the admin API.
    fn source(&self) -> &'static str;
    /// Why loading fails, if it does (the last watch error), for `/readyz`.
    fn last_error(&self) -> Option<String> {
        None
    }
    /// Watch errors since start (each retried with backoff), for
    /// `/metrics`.
    fn watch_errors(&self) -> u64 {
        0
    }
    /// When the cache the entries come from was written, while they come
    /// from one rather than from the source itself.
    fn cached_since(&self) -> Option<std::time::SystemTime> {
        None
    }
    /// Edge Node addresses not taken as the edges' (Kubernetes mode; see
    /// `k8s/node_addresses.rs`).
    fn refused_addresses(&self) -> usize {
        0
    }
    /// Where the CNIs' IPAM resources stand (Kubernetes mode), for
    /// `/metrics` and `/readyz`; none in static mode.
    fn ipam(&self) -> Option<IpamReport> {
        None
    }
    /// Who claims `ip` (asked for a target no live session serves).
    fn claim(&self, ip: IpAddr) -> Claim;
    /// Whether `node` is positively known as an edge, not merely short of
    /// evidence that it is in the cloud (which [`NodeEntry::cloud`] and
    /// [`Directory::claim`] treat as an edge, failing closed): every node
    /// of a static `[nodes]` table (it lists edges); a Node labelled an
    /// edge or carrying the relay's condition (its edge connected once) in
    /// Kubernetes mode. What lets the relay node capture a Service for an
    /// endpoint no session serves: without it, its own kube-proxy keeps
    /// serving it (a cloud worker the directory cannot place must not be
    /// captured and then refused).
    fn marked_edge(&self, node: &str) -> bool;
    /// Node → the communities its labels put it in (Kubernetes mode:
    /// `node-restriction.kubernetes.io/edge-relay-community-<name>`
    /// labels); none in static mode.
    fn label_communities(&self) -> HashMap<String, BTreeSet<String>> {
        HashMap::new()
    }
    /// The pod CIDRs and host prefixes of the Nodes known to be in the
    /// cloud (Kubernetes mode; none in static mode, whose table lists
    /// edges): forwarded traffic from them is captured like the cloud
    /// ranges' (`capture.sources` unset).
    fn cloud_prefixes(&self) -> Vec<Cidr> {
        Vec::new()
    }
}

/// Where the pod ranges read from CNIs' IPAM resources (Calico's
/// BlockAffinities, Cilium's CiliumNodes) stand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamReport {
    /// Each resource (`plural.group`) and its state (`unknown`, `absent`,
    /// `forbidden`, `watching`, `listed`).
    pub sources: Vec<(String, &'static str)>,
    /// Failed watch requests since start (each retried with backoff; the
    /// last complete list stays in use).
    pub watch_errors: u64,
    /// The last of them.
    pub last_error: Option<String>,
    /// Entries skipped as unusable since start (a CIDR that does not
    /// parse, say).
    pub skipped_entries: u64,
    /// Edge nodes' prefixes not taken as theirs now.
    pub refused_prefixes: usize,
    /// Calico's `strictAffinity` where its blocks are in use: off or
    /// unset, a node may be given addresses of another node's block, and
    /// pods with them are routed to the block's node.
    pub calico_strict_affinity: relay_kube::ipam::StrictAffinity,
}

/// The host prefixes `node` shares with another node (empty for an
/// unknown node): what the admin API and the Node condition report.
pub fn ambiguous_of(dir: &dyn Directory, node: &str) -> Vec<Cidr> {
    match dir.lookup(node) {
        Lookup::Known(e) => e.ambiguous.clone(),
        _ => Vec::new(),
    }
}

/// A cache of what the apiserver said (Nodes, Services) older than this is
/// not used, at start or while running: by then Nodes and Services may be
/// gone and their addresses given to others.
pub const CACHE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Whether what came from a cache written at `since` (none: not from a
/// cache) is past [`CACHE_MAX_AGE`].
pub fn cache_too_old(since: Option<std::time::SystemTime>) -> bool {
    since.is_some_and(|t| t.elapsed().unwrap_or_default() > CACHE_MAX_AGE)
}

/// The host prefixes of `node`'s addresses that are not routed to it (see
/// [`NodeEntry::refused`]); none for an unknown node.
pub fn refused_of(dir: &dyn Directory, node: &str) -> Vec<Cidr> {
    match dir.lookup(node) {
        Lookup::Known(e) => e.refused.clone(),
        _ => Vec::new(),
    }
}

/// The pod ranges of `node` its CNI gives it that are not routed to it
/// (see [`NodeEntry::refused_ranges`]); none for an unknown node.
pub fn refused_ranges_of(dir: &dyn Directory, node: &str) -> Vec<Cidr> {
    match dir.lookup(node) {
        Lookup::Known(e) => e.refused_ranges.clone(),
        _ => Vec::new(),
    }
}

/// Waits (at most `limit`) until `dir` has synced; true if it has.
pub async fn wait_synced(dir: &dyn Directory, limit: Duration) -> bool {
    if dir.is_synced() {
        return true;
    }
    let wait = changed_until(dir.subscribe(), || dir.is_synced());
    tokio::time::timeout(limit, wait).await.unwrap_or(false)
}

/// Waits until `done()` holds, checking again at each change `rx` sees;
/// false if its sender goes first.
pub async fn changed_until<T>(mut rx: watch::Receiver<T>, done: impl Fn() -> bool) -> bool {
    while !done() {
        if rx.changed().await.is_err() {
            return false;
        }
    }
    true
}

/// One node as a source describes it, before ambiguity is computed.
#[derive(Debug, Clone, Default)]
pub struct NodeSource {
    /// Prefixes other than host addresses (pod CIDRs; static ranges).
    pub prefixes: Vec<Cidr>,
    /// Host addresses (InternalIP, ExternalIP) the node may serve.
    pub addresses: Vec<IpAddr>,
    /// Its other addresses, which it may not (see [`NodeEntry::refused`]).
    pub refused: Vec<IpAddr>,
    /// See [`NodeEntry::refused_ranges`].
    pub refused_ranges: Vec<Cidr>,
    /// Preferred address for CONNECT by name.
    pub primary: Option<IpAddr>,
    /// The `Hostname`, `InternalDNS` and `ExternalDNS` addresses.
    pub hostnames: Vec<String>,
    /// A cloud node (see [`NodeEntry::cloud`]).
    pub cloud: bool,
    /// See [`NodeEntry::zone`].
    pub zone: Option<String>,
}

/// Builds every node's entry from its source description, marking host
/// prefixes that two or more nodes claim as ambiguous (for all of them).
/// Host prefixes are `/32` and `/128` entries, from addresses or from a
/// static list.
pub fn build_entries(nodes: &BTreeMap<String, NodeSource>) -> HashMap<String, Arc<NodeEntry>> {
    let hosts = |s: &NodeSource| -> Vec<Cidr> {
        let mut h: Vec<Cidr> = s.addresses.iter().map(|a| Cidr::host(*a)).collect();
        h.extend(s.prefixes.iter().filter(|c| c.is_host()).copied());
        h.sort();
        h.dedup();
        h
    };
    let mut claimants: HashMap<Cidr, usize> = HashMap::new();
    for s in nodes.values() {
        for h in hosts(s) {
            *claimants.entry(h).or_default() += 1;
        }
    }
    nodes
        .iter()
        .map(|(name, s)| {
            let mut allowed: Vec<Cidr> = s
                .prefixes
                .iter()
                .filter(|c| !c.is_host())
                .copied()
                .collect();
            let host = hosts(s);
            let ambiguous = host
                .iter()
                .filter(|h| claimants.get(h).copied().unwrap_or(0) > 1)
                .copied()
                .collect();
            allowed.extend(host);
            let entry = NodeEntry {
                allowed,
                ambiguous,
                refused: s.refused.iter().map(|a| Cidr::host(*a)).collect(),
                refused_ranges: s.refused_ranges.clone(),
                primary: s.primary,
                hostnames: s.hostnames.clone(),
                cloud: s.cloud,
                zone: s.zone.as_deref().map(Arc::from),
            };
            (name.clone(), Arc::new(entry))
        })
        .collect()
}

/// Who claims an address that no live session serves: what lets a
/// CONNECT to a cloud node (its kubelet) or a cloud pod be dialled by the
/// relay, while one to an edge without a session still fails at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No known node.
    Nobody,
    /// An edge node (its address or pod CIDR): only its session may carry
    /// it. An address an edge and a cloud node share counts as the edge's.
    Edge(String),
    /// A cloud node's address or pod CIDR.
    Cloud,
}

/// [`Claim`]s by address, built from the entries whenever they change:
/// one exact-match table per prefix length, so a lookup costs one hash
/// probe per distinct length (a handful: /32, /24, /128, /64), however
/// many Nodes the cluster has.
#[derive(Debug, Default)]
pub struct ClaimIndex {
    by_len: BTreeMap<std::cmp::Reverse<u8>, HashMap<Cidr, (String, bool)>>,
}

impl ClaimIndex {
    /// Indexes `entries`' claims (host addresses and pod CIDRs alike). Of
    /// two Nodes claiming one prefix, an edge's claim is kept.
    pub fn new(entries: &HashMap<String, Arc<NodeEntry>>) -> Self {
        let mut ix = ClaimIndex::default();
        for (node, e) in entries {
            for c in &e.allowed {
                let held = ix
                    .by_len
                    .entry(std::cmp::Reverse(c.prefix_len()))
                    .or_default()
                    .entry(*c)
                    .or_insert((node.clone(), e.cloud));
                if held.1 && !e.cloud {
                    *held = (node.clone(), false);
                }
            }
        }
        ix
    }

    /// Who claims `ip`: an edge if any edge's prefix contains it (edges
    /// win, whatever the prefix lengths), else a cloud Node if one does.
    pub fn claim(&self, ip: IpAddr) -> Claim {
        let mut cloud = false;
        for (len, table) in &self.by_len {
            let Some(c) = Cidr::containing(ip, len.0) else {
                continue;
            };
            match table.get(&c) {
                Some((node, false)) => return Claim::Edge(node.clone()),
                Some((_, true)) => cloud = true,
                None => {}
            }
        }
        if cloud {
            Claim::Cloud
        } else {
            Claim::Nobody
        }
    }
}

/// The ambiguous host prefixes of `entries` with the nodes sharing each.
pub fn ambiguity(entries: &HashMap<String, Arc<NodeEntry>>) -> Vec<(Cidr, Vec<String>)> {
    let mut by: BTreeMap<Cidr, Vec<String>> = BTreeMap::new();
    for (node, e) in entries {
        for c in &e.ambiguous {
            by.entry(*c).or_default().push(node.clone());
        }
    }
    by.into_iter()
        .map(|(c, mut n)| {
            n.sort();
            (c, n)
        })
        .collect()
}

/// The `[nodes]` table of relay.toml: fixed for the relay's lifetime.
pub struct StaticDirectory {
    entries: HashMap<String, Arc<NodeEntry>>,
    claims: ClaimIndex,
    ambiguous: Vec<(Cidr, Vec<String>)>,
    changes: watch::Sender<u64>,
}

impl StaticDirectory {
    /// The directory of a `[nodes]` table.
    pub fn new(nodes: &HashMap<String, Vec<Cidr>>) -> Self {
        let sources = nodes
            .iter()
            .map(|(n, prefixes)| {
                let src = NodeSource {
                    prefixes: prefixes.clone(),
                    ..NodeSource::default()
                };
                (n.clone(), src)
            })
            .collect();
        let entries = build_entries(&sources);
        let ambiguous = ambiguity(&entries);
        StaticDirectory {
            claims: ClaimIndex::new(&entries),
            entries,
            ambiguous,
            changes: watch::channel(0).0,
        }
    }
}

impl Directory for StaticDirectory {
    fn lookup(&self, node: &str) -> Lookup {
        match self.entries.get(node) {
            Some(e) => Lookup::Known(e.clone()),
            None => Lookup::Unknown,
        }
    }

    fn resolve_name(&self, name: &str) -> Option<String> {
        self.entries.contains_key(name).then(|| name.to_string())
    }

    fn is_synced(&self) -> bool {
        true
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn ambiguous(&self) -> Vec<(Cidr, Vec<String>)> {
        self.ambiguous.clone()
    }

    fn source(&self) -> &'static str {
        "static"
    }

    fn claim(&self, ip: IpAddr) -> Claim {
        self.claims.claim(ip)
    }

    fn marked_edge(&self, node: &str) -> bool {
        // The table lists edges only.
        self.entries.contains_key(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// A node with one pod CIDR and one address, its primary.
    fn source(pod: &str, addr: &str, cloud: bool) -> NodeSource {
        NodeSource {
            prefixes: vec![c(pod)],
            addresses: vec![addr.parse().unwrap()],
            primary: Some(addr.parse().unwrap()),
            cloud,
            ..NodeSource::default()
        }
    }

    #[test]
    fn shared_host_addresses_are_ambiguous_for_every_claimant_and_pod_cidrs_never() {
        let mut nodes = BTreeMap::new();
        for (n, pod, addr) in [
            ("shop-1", "10.244.1.0/24", "192.168.1.10"),
            ("shop-2", "10.244.2.0/24", "192.168.1.10"),
            ("tower", "10.244.3.0/24", "192.168.7.1"),
        ] {
            let mut src = source(pod, addr, false);
            src.hostnames = vec![format!("{n}.local")];
            nodes.insert(n.to_string(), src);
        }
        let e = build_entries(&nodes);
        assert_eq!(e["shop-1"].ambiguous, [c("192.168.1.10/32")]);
        assert_eq!(e["shop-2"].ambiguous, [c("192.168.1.10/32")]);
        assert!(e["tower"].ambiguous.is_empty());
        assert_eq!(e["shop-1"].routable(), [c("10.244.1.0/24")]);
        assert_eq!(
            e["tower"].routable(),
            [c("10.244.3.0/24"), c("192.168.7.1/32")]
        );
        // Still reachable by name: the primary address stays.
        assert_eq!(e["shop-2"].primary, Some("192.168.1.10".parse().unwrap()));
        assert_eq!(
            ambiguity(&e),
            [(
                c("192.168.1.10/32"),
                vec!["shop-1".to_string(), "shop-2".to_string()]
            )]
        );
    }

    #[test]
    fn the_static_table_marks_repeated_host_entries() {
        let d = StaticDirectory::new(&HashMap::from([
            (
                "a".to_string(),
                vec![c("10.244.1.0/24"), c("192.168.1.10/32")],
            ),
            (
                "b".to_string(),
                vec![c("10.244.2.0/24"), c("192.168.1.10/32")],
            ),
        ]));
        let Lookup::Known(a) = d.lookup("a") else {
            panic!()
        };
        assert_eq!(a.routable(), [c("10.244.1.0/24")]);
        assert_eq!(d.lookup("zz"), Lookup::Unknown);
        assert_eq!(d.ambiguous().len(), 1);
        assert!(d.is_synced());
    }

    #[test]
    fn claims_by_address_edges_first() {
        let mut nodes = BTreeMap::new();
        for (n, pod, addr, cloud) in [
            ("cloud-1", "10.244.0.0/24", "10.0.0.2", true),
            ("edge-1", "10.244.7.0/24", "192.168.1.10", false),
            // A cloud VM numbered like a shop's node: the edge's claim wins.
            ("cloud-2", "10.244.1.0/24", "192.168.1.10", true),
        ] {
            nodes.insert(n.to_string(), source(pod, addr, cloud));
        }
        let ix = ClaimIndex::new(&build_entries(&nodes));
        let at = |ip: &str| ix.claim(ip.parse().unwrap());
        assert_eq!(at("10.0.0.2"), Claim::Cloud);
        assert_eq!(at("10.244.0.9"), Claim::Cloud);
        assert_eq!(at("10.244.7.5"), Claim::Edge("edge-1".into()));
        assert_eq!(at("192.168.1.10"), Claim::Edge("edge-1".into()));
        assert_eq!(at("10.0.0.3"), Claim::Nobody);
    }
}
