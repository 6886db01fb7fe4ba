//! [`ServiceDirectory`]: what each ClusterIP:port resolves to, from
//! reflectors over Services and EndpointSlices, with kube-proxy's rules
//! for which endpoints are usable; [`ServiceTable`] is the pure part.
//!
//! Why the relay needs it: kube-proxy DNATs a ClusterIP to one endpoint in
//! the same NAT hook where capture would redirect it, and a connection
//! gets one NAT binding per hook, so capture has to run first (see
//! `relay_transport::capture::Capture::apply_services`) and the relay has
//! to pick the endpoint itself. This module says, for every captured
//! ClusterIP:port, which Service it is and which endpoints (with their
//! node) kube-proxy would have picked from.
//!
//! kube-proxy's semantics applied (pkg/proxy/endpointslicecache.go and
//! topology.go):
//! - a Service port maps to the EndpointSlice port **of the same name**
//!   (the EndpointSlice controller has already resolved `targetPort`,
//!   named or numbered, into the slice port's number), and protocol;
//! - an endpoint's `ready` condition missing means ready; `serving`
//!   missing means serving; `terminating` missing means false;
//! - the usable endpoints are the ready ones; when none is ready, the ones
//!   serving **and** terminating (so connections drain during a rollout);
//! - an endpoint's first address is used (as kube-proxy does), endpoints
//!   are deduplicated by address and port across slices;
//! - each ClusterIP family (`spec.clusterIPs`, dual stack) gets its own
//!   entry, fed only by slices of the matching `addressType`;
//! - headless Services (`clusterIP: None`) have no ClusterIP entry, but
//!   resolve by name with their endpoints; a headless Service may have no
//!   ports at all (its EndpointSlices then list endpoints with an empty
//!   port list), and its endpoints are kept apart
//!   ([`ServiceEntry::portless_endpoints`]) for the names the cluster DNS
//!   answers with them; ExternalName Services are
//!   recorded as such and have no endpoints and no ClusterIP entry (never
//!   captured);
//! - endpoints on nodes the caller does not know
//!   ([`ServiceDirectory::set_known_nodes`]) are kept, with a warning and
//!   a counter ([`ServiceDirectory::unknown_node_endpoints`]) each time
//!   their Service is recomputed.
//!
//! Like the node directory, the watches relist on their own after `410
//! Gone` or a broken stream, and the table is only replaced once a relist
//! completes: while the API is unreachable, the last known table serves.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use relay_protocol::Cidr;

mod entry;
mod table;
#[cfg(test)]
pub(crate) mod tests;
pub use entry::{service_entry, BuildNotes};
pub use table::ServiceTable;

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service label that hands a Service to another proxy (any value):
/// kube-proxy leaves such Services alone, and so does the relay.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The label kube-proxy's watches exclude besides
/// [`SERVICE_PROXY_NAME_LABEL`] (any value): the EndpointSlice
/// controller puts it on headless Services' slices, and a Service with a
/// ClusterIP that carries it (copied from a headless sibling) is left
/// alone by kube-proxy, its ClusterIP dead; the relay leaves it too.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (also the default when `protocol` is unset).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (recorded, never captured by the relay).
    Sctp,
}

impl Protocol {
    fn parse(p: Option<&str>) -> Option<Protocol> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// The endpoint's (first) address.
    pub ip: IpAddr,
    /// The port traffic goes to (the slice port of the Service port's name).
    pub port: u16,
    /// `nodeName`, if set.
    pub node: Option<String>,
    /// `conditions.ready` (missing means true).
    pub ready: bool,
    /// `conditions.serving` (missing means true).
    pub serving: bool,
    /// `conditions.terminating` (missing means false).
    pub terminating: bool,
    /// `hostname` (set by StatefulSets): the endpoint's own DNS name under
    /// a headless Service.
    pub hostname: Option<String>,
    /// `hints.forZones`: the zones whose nodes should use this endpoint
    /// (set by the EndpointSlice controller for `trafficDistribution` and
    /// `service.kubernetes.io/topology-mode: Auto`).
    pub zone_hints: Vec<String>,
    /// `hints.forNodes`: the nodes that should use it
    /// (`trafficDistribution: PreferSameNode`).
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// The endpoint's `IP:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// One port of a Service, with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name (`""` for a single unnamed port).
    pub name: String,
    /// The Service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// `targetPort` as written (a number, a name, or `None` = same as
    /// `port`); the endpoints' ports are what it resolved to per pod.
    pub target_port: Option<String>,
    /// Every endpoint found for this port (all families), with conditions.
    pub all_endpoints: Vec<Endpoint>,
    /// `nodePort` (NodePort and LoadBalancer Services): every node's own
    /// addresses take connections on it, as on the ClusterIP; with
    /// `externalTrafficPolicy: Local`, each node's own endpoints only
    /// (its table entry lists them node by node).
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// The endpoints kube-proxy would use for `family` (IPv4 when `true`):
    /// the ready ones, else the serving-and-terminating ones.
    pub fn usable(&self, ipv4: bool) -> Vec<&Endpoint> {
        usable(&self.all_endpoints, ipv4)
    }
}

/// Of `endpoints`, those of one family (IPv4 when `ipv4`) kube-proxy would
/// use: the ready ones, else the serving-and-terminating ones.
pub fn usable(endpoints: &[Endpoint], ipv4: bool) -> Vec<&Endpoint> {
    ready_else_draining(endpoints.iter().filter(|e| e.ip.is_ipv4() == ipv4))
}

/// [`usable`] node by node: on each node (endpoints without a node counted
/// as one more), its ready endpoints, else its serving-and-terminating
/// ones, whatever other nodes have. This is what serves an
/// `internalTrafficPolicy: Local` port, where each node's own endpoints
/// are all it may use: a node whose only pod is shutting down drains to
/// it even while other nodes have ready ones (kube-proxy does the same).
pub fn usable_per_node(endpoints: &[Endpoint], ipv4: bool) -> Vec<&Endpoint> {
    let mut nodes: Vec<Option<&str>> = endpoints.iter().map(|e| e.node.as_deref()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut out: Vec<&Endpoint> = nodes
        .into_iter()
        .flat_map(|node| {
            ready_else_draining(
                endpoints
                    .iter()
                    .filter(move |e| e.ip.is_ipv4() == ipv4 && e.node.as_deref() == node),
            )
        })
        .collect();
    out.sort_unstable();
    out
}

/// The ready endpoints of `eps`, else its serving-and-terminating ones.
fn ready_else_draining<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<&'a Endpoint> {
    let ready: Vec<&Endpoint> = eps.clone().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).collect()
}

/// What kind of Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Has ClusterIPs (one per family).
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: resolves by name to its endpoints.
    Headless,
    /// `type: ExternalName`: a DNS alias, never captured.
    ExternalName(String),
}

impl ServiceEntry {
    /// The source ranges that restrict traffic to `ip`, one of this
    /// Service's addresses: its `loadBalancerSourceRanges` of `ip`'s family
    /// when `ip` is a load-balancer IP; empty (no restriction) otherwise.
    pub fn source_ranges_of(&self, ip: IpAddr) -> Vec<Cidr> {
        if !self.lb_ips.contains(&ip) {
            return Vec::new();
        }
        self.lb_source_ranges
            .iter()
            .filter(|c| c.addr().is_ipv4() == ip.is_ipv4())
            .copied()
            .collect()
    }
}

/// One Service as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterIP, headless or ExternalName.
    pub kind: ServiceKind,
    /// The ports with their endpoints.
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs` and the load balancer's ingress IPs: kube-proxy
    /// serves them like the ClusterIP (ClusterIP Services only).
    pub external_ips: Vec<IpAddr>,
    /// The load balancer's ingress IPs (also in `external_ips`): the
    /// addresses `lb_source_ranges` applies to.
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`: where kube-proxy takes traffic to
    /// the load balancer's IPs from (everywhere else: dropped). Ranges of
    /// the other family than a load-balancer IP's do not restrict it
    /// (kube-proxy ignores them too); unparsable ones are skipped and
    /// counted. Not `spec.externalIPs`: kube-proxy applies none there.
    pub lb_source_ranges: Vec<Cidr>,
    /// A headless Service without ports: its endpoints (port 0), from the
    /// slices that list no port, as the cluster DNS answers with them (an
    /// A record per ready endpoint, no SRV). Empty for every other
    /// Service.
    pub portless_endpoints: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local`: each node's kube-proxy sends the
    /// ClusterIP's traffic to that node's own endpoints only (none there:
    /// dropped). External IPs and node ports are not affected.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: each client keeps to one endpoint.
    pub client_ip_affinity: bool,
    /// `externalTrafficPolicy: Local`: kube-proxy sends traffic from
    /// outside the cluster to the receiving node's own endpoints only (else
    /// drops it), for node ports (whose table entries list each node's own:
    /// see [`ServicePort::node_port`]) and external and load-balancer IPs;
    /// from pods and nodes it still goes to every endpoint.
    pub external_local: bool,
    /// Left by kube-proxy: labelled [`SERVICE_PROXY_NAME_LABEL`] (another
    /// proxy serves it) or, with a ClusterIP, [`HEADLESS_LABEL`]; so none
    /// of its addresses is captured or resolved (its names still resolve,
    /// to its ClusterIP).
    pub other_proxy: bool,
}

/// What one ClusterIP:port (protocol) resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIpEntry {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// The Service port's name.
    pub port_name: String,
    /// `targetPort` as written.
    pub target_port: Option<String>,
    /// The usable endpoints of this ClusterIP's family (see
    /// [`ServicePort::usable`]).
    pub endpoints: Vec<Endpoint>,
    /// The addresses of every serving endpoint of this port and family
    /// (ready, or terminating and still serving), sorted: what
    /// kube-proxy's conntrack cleanup keeps UDP flows to. A flow already
    /// bound to an endpoint keeps it while the endpoint serves, even once
    /// new flows go elsewhere (traffic policy, topology and terminating
    /// state are not taken into account, as for TCP connections).
    pub serving: Vec<IpAddr>,
}

/// A namespaced object's `(namespace, name)`.
pub(crate) type Key = (String, String);

pub(crate) fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

pub(crate) fn owner_of(slice: &EndpointSlice) -> Option<Key> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        slice.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

pub use crate::service_directory::{ServiceDirectory, ServiceDirectoryOptions, ServiceObjects};
