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
//!   missing means the same as `ready`; `terminating` missing means false;
//! - the usable endpoints are the ready ones; when none is ready, the ones
//!   serving **and** terminating (so connections drain during a rollout);
//! - an endpoint's first address is used (as kube-proxy does), endpoints
//!   are deduplicated by address and port across slices;
//! - each ClusterIP family (`spec.clusterIPs`, dual stack) gets its own
//!   entry, fed only by slices of the matching `addressType`;
//! - headless Services (`clusterIP: None`) have no ClusterIP entry, but
//!   resolve by name with their endpoints; ExternalName Services are
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

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    /// `conditions.serving` (missing means the same as `ready`).
    pub serving: bool,
    /// `conditions.terminating` (missing means false).
    pub terminating: bool,
    /// `hostname` (set by StatefulSets): the endpoint's own DNS name under
    /// a headless Service.
    pub hostname: Option<String>,
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
    /// addresses take connections on it, as on the ClusterIP.
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// The endpoints kube-proxy would use for `family` (IPv4 when `true`):
    /// the ready ones, else the serving-and-terminating ones.
    pub fn usable(&self, ipv4: bool) -> Vec<&Endpoint> {
        let fam = self.all_endpoints.iter().filter(|e| e.ip.is_ipv4() == ipv4);
        let ready: Vec<&Endpoint> = fam.clone().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        fam.filter(|e| e.serving && e.terminating).collect()
    }
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
}

/// Issues found building a Service's entry; the rest of it is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildNotes {
    /// Endpoints whose `nodeName` is not a known node (kept).
    pub unknown_node_endpoints: u64,
    /// Entries that could not be used (bad ClusterIP, bad address, bad
    /// protocol).
    pub skipped: u64,
}

/// Builds one Service's entry from the Service and its EndpointSlices
/// (pure). `known_nodes` `None` means "do not check node names".
pub fn service_entry<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    known_nodes: Option<&BTreeSet<String>>,
) -> (ServiceEntry, BuildNotes) {
    let mut notes = BuildNotes::default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        ServiceKind::ExternalName(spec.external_name.clone().unwrap_or_default())
    } else if spec.cluster_ip.as_deref() == Some("None") {
        ServiceKind::Headless
    } else {
        let mut raw: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if raw.is_empty() {
            raw.extend(spec.cluster_ip.clone());
        }
        let mut ips = Vec::new();
        for r in raw.iter().filter(|r| !r.is_empty()) {
            match r.parse::<IpAddr>() {
                Ok(ip) if !ips.iter().any(|i: &IpAddr| i.is_ipv4() == ip.is_ipv4()) => ips.push(ip),
                Ok(_) => notes.skipped += 1,
                Err(_) => notes.skipped += 1,
            }
        }
        ServiceKind::ClusterIp(ips)
    };
    let slices: Vec<&EndpointSlice> = match kind {
        ServiceKind::ExternalName(_) => Vec::new(),
        _ => slices.into_iter().collect(),
    };
    let mut ports = Vec::new();
    for sp in spec.ports.clone().unwrap_or_default() {
        let Some(protocol) = Protocol::parse(sp.protocol.as_deref()) else {
            notes.skipped += 1;
            continue;
        };
        let Ok(port) = u16::try_from(sp.port) else {
            notes.skipped += 1;
            continue;
        };
        let pname = sp.name.clone().unwrap_or_default();
        let target_port = sp.target_port.as_ref().map(|t| match t {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        });
        let mut eps: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for slice in &slices {
            let v4 = match slice.address_type.as_str() {
                "IPv4" => true,
                "IPv6" => false,
                _ => continue, // FQDN slices are not proxied
            };
            let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
                p.name.clone().unwrap_or_default() == pname
                    && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
            }) else {
                continue;
            };
            let Some(eport) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for e in &slice.endpoints {
                let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    notes.skipped += 1;
                    continue;
                };
                if ip.is_ipv4() != v4 {
                    notes.skipped += 1;
                    continue;
                }
                let c = e.conditions.clone().unwrap_or_default();
                let ready = c.ready.unwrap_or(true);
                let ep = Endpoint {
                    ip,
                    port: eport,
                    node: e.node_name.clone(),
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    hostname: e.hostname.clone(),
                };
                if let (Some(known), Some(node)) = (known_nodes, &ep.node) {
                    if !known.contains(node) {
                        notes.unknown_node_endpoints += 1;
                    }
                }
                // The first slice listing an address wins, as in kube-proxy.
                eps.entry(ep.addr()).or_insert(ep);
            }
        }
        ports.push(ServicePort {
            name: pname,
            port,
            protocol,
            target_port,
            all_endpoints: eps.into_values().collect(),
            node_port: sp
                .node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0),
        });
    }
    let mut external_ips = Vec::new();
    if matches!(kind, ServiceKind::ClusterIp(_)) {
        let lb = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.clone());
        for raw in spec
            .external_ips
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(lb)
        {
            match raw.parse::<IpAddr>() {
                Ok(ip) if !external_ips.contains(&ip) => external_ips.push(ip),
                Ok(_) => {}
                Err(_) => notes.skipped += 1,
            }
        }
    }
    (
        ServiceEntry {
            namespace,
            name,
            kind,
            ports,
            external_ips,
        },
        notes,
    )
}

/// A ClusterIP Service's addresses taking connections: its ClusterIPs and
/// external IPs (none for headless and ExternalName Services).
fn addresses(e: &ServiceEntry) -> Vec<IpAddr> {
    match &e.kind {
        ServiceKind::ClusterIp(ips) => ips.iter().chain(&e.external_ips).copied().collect(),
        _ => Vec::new(),
    }
}

/// The service table: every Service by name, every ClusterIP:port by
/// address. Pure; [`ServiceDirectory`] keeps one up to date.
#[derive(Clone, Debug, Default)]
pub struct ServiceTable {
    by_name: BTreeMap<(String, String), ServiceEntry>,
    by_vip: BTreeMap<(SocketAddr, Protocol), ClusterIpEntry>,
    /// `nodePort` → the Service port's IPv4 endpoints.
    by_node_port: BTreeMap<(u16, Protocol), ClusterIpEntry>,
    cluster_domain: String,
}

impl ServiceTable {
    /// An empty table for cluster domain `cluster_domain` (usually
    /// `cluster.local`).
    pub fn new(cluster_domain: &str) -> ServiceTable {
        ServiceTable {
            cluster_domain: cluster_domain.trim_matches('.').to_string(),
            ..Default::default()
        }
    }

    /// Replaces (or, with `None`, removes) the Service `namespace/name`.
    /// Its ClusterIPs and external IPs are entries by address, its node
    /// ports entries by port.
    pub fn set(&mut self, namespace: &str, name: &str, entry: Option<ServiceEntry>) {
        let key = (namespace.to_string(), name.to_string());
        // Only this Service's own entries go (no scan of the whole table:
        // a slice update costs the size of its Service).
        if let Some(old) = self.by_name.remove(&key) {
            for ip in addresses(&old) {
                for p in &old.ports {
                    self.by_vip
                        .remove(&(SocketAddr::new(ip, p.port), p.protocol));
                }
            }
            for p in &old.ports {
                if let Some(np) = p.node_port {
                    // Another Service may have taken the port meanwhile.
                    if self
                        .by_node_port
                        .get(&(np, p.protocol))
                        .is_some_and(|e| e.namespace == old.namespace && e.name == old.name)
                    {
                        self.by_node_port.remove(&(np, p.protocol));
                    }
                }
            }
        }
        let Some(entry) = entry else {
            return;
        };
        let at = |p: &ServicePort, ipv4: bool| ClusterIpEntry {
            namespace: entry.namespace.clone(),
            name: entry.name.clone(),
            port_name: p.name.clone(),
            target_port: p.target_port.clone(),
            endpoints: p.usable(ipv4).into_iter().cloned().collect(),
        };
        for ip in addresses(&entry) {
            for p in &entry.ports {
                self.by_vip.insert(
                    (SocketAddr::new(ip, p.port), p.protocol),
                    at(p, ip.is_ipv4()),
                );
            }
        }
        if matches!(entry.kind, ServiceKind::ClusterIp(_)) {
            for p in &entry.ports {
                if let Some(np) = p.node_port {
                    self.by_node_port.insert((np, p.protocol), at(p, true));
                }
            }
        }
        self.by_name.insert(key, entry);
    }

    /// What `nodePort` over `protocol` leads to (IPv4 endpoints).
    pub fn node_port(&self, port: u16, protocol: Protocol) -> Option<&ClusterIpEntry> {
        self.by_node_port.get(&(port, protocol))
    }

    /// Every node port with its entry.
    pub fn node_ports(&self) -> impl Iterator<Item = (&(u16, Protocol), &ClusterIpEntry)> {
        self.by_node_port.iter()
    }

    /// What `vip` (a ClusterIP and Service port) over `protocol` is.
    pub fn lookup(&self, vip: SocketAddr, protocol: Protocol) -> Option<&ClusterIpEntry> {
        self.by_vip.get(&(vip, protocol))
    }

    /// The Service named `svc.ns.svc.<cluster domain>`, `svc.ns.svc` or
    /// `svc.ns` (a trailing dot allowed).
    pub fn resolve(&self, name: &str) -> Option<&ServiceEntry> {
        let n = name.trim_end_matches('.');
        let full = format!(".svc.{}", self.cluster_domain);
        let n = n
            .strip_suffix(full.as_str())
            .or_else(|| n.strip_suffix(".svc"))
            .unwrap_or(n);
        let (svc, ns) = n.split_once('.')?;
        if ns.contains('.') {
            return None;
        }
        self.by_name.get(&(ns.to_string(), svc.to_string()))
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceEntry> {
        self.by_name.get(&(namespace.to_string(), name.to_string()))
    }

    /// Every Service, ordered by namespace and name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceEntry> {
        self.by_name.values()
    }

    /// The cluster domain the table was made for, without dots around it.
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// Number of Services held.
    pub fn services_len(&self) -> usize {
        self.by_name.len()
    }

    /// Number of ClusterIP:port entries.
    pub fn cluster_ip_len(&self) -> usize {
        self.by_vip.len()
    }

    /// Every ClusterIP:port entry (external IPs' ports included).
    pub fn cluster_ips(&self) -> impl Iterator<Item = (&(SocketAddr, Protocol), &ClusterIpEntry)> {
        self.by_vip.iter()
    }

    /// The TCP and UDP ClusterIP:ports with at least one usable endpoint
    /// on a node in `nodes` (e.g. the edges): what a relay node captures.
    pub fn ports_with_endpoints_on(
        &self,
        nodes: &BTreeSet<String>,
    ) -> BTreeSet<(SocketAddr, Protocol)> {
        self.by_vip
            .iter()
            .filter(|((_, p), _)| *p != Protocol::Sctp)
            .filter(|(_, e)| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.node.as_ref().is_some_and(|n| nodes.contains(n)))
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

impl ServiceTable {
    /// The TCP and UDP ClusterIP:ports with at least one usable endpoint
    /// that is not on `node` (or names no node): what edge `node` must
    /// capture ahead of its own kube-proxy, which would otherwise DNAT to a
    /// remote pod in the same hook as capture.
    pub fn ports_with_endpoints_off(&self, node: &str) -> BTreeSet<(SocketAddr, Protocol)> {
        self.by_vip
            .iter()
            .filter(|((_, p), _)| *p != Protocol::Sctp)
            .filter(|(_, e)| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.node.as_deref() != Some(node))
            })
            .map(|(k, _)| *k)
            .collect()
    }
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

pub use crate::service_directory::{ServiceDirectory, ServiceDirectoryOptions};

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort as K8sPort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn svc(name: &str, ips: &[&str], ports: &[(&str, i32, &str, IntOrString)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto, t)| K8sPort {
                            name: Some(n.to_string()),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            target_port: Some(t.clone()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    type Ep<'a> = (&'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(
        name: &str,
        service: &str,
        family: &str,
        ports: &[(&str, i32, &str)],
        eps: &[Ep<'_>],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        protocol: Some(proto.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: eps
                .iter()
                .map(|(ip, node, ready, serving, terminating)| K8sEndpoint {
                    addresses: vec![ip.to_string()],
                    node_name: Some(node.to_string()),
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn table_of(
        services: &[Service],
        slices: &[EndpointSlice],
        known: Option<&BTreeSet<String>>,
    ) -> (ServiceTable, BuildNotes) {
        let mut t = ServiceTable::new("cluster.local");
        let mut all = BuildNotes::default();
        for s in services {
            let name = s.metadata.name.clone().unwrap_or_default();
            let mine = slices
                .iter()
                .filter(|sl| owner_of(sl).is_some_and(|o| o.1 == name));
            let (e, n) = service_entry(s, mine, known);
            all.unknown_node_endpoints += n.unknown_node_endpoints;
            all.skipped += n.skipped;
            t.set("shop", &name, Some(e));
        }
        (t, all)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ports_map_by_name_and_missing_ready_means_ready() {
        let s = svc(
            "web",
            &["10.96.0.20"],
            &[
                ("http", 80, "TCP", IntOrString::String("web".into())),
                ("dns", 53, "UDP", IntOrString::Int(5353)),
            ],
        );
        let sl = slice(
            "web-abc",
            "web",
            "IPv4",
            // Slice ports in another order: matched by name, not position.
            &[("dns", 5353, "UDP"), ("http", 8080, "TCP")],
            &[
                ("10.244.7.5", "edge1", None, None, None),
                ("10.244.8.5", "edge2", Some(false), Some(false), Some(false)),
            ],
        );
        let (t, _) = table_of(&[s], &[sl], None);
        let e = t.lookup(sa("10.96.0.20:80"), Protocol::Tcp).unwrap();
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str(), e.port_name.as_str()),
            ("shop", "web", "http")
        );
        assert_eq!(e.target_port.as_deref(), Some("web"));
        let addrs: Vec<SocketAddr> = e.endpoints.iter().map(Endpoint::addr).collect();
        assert_eq!(addrs, [sa("10.244.7.5:8080")], "only the ready one");
        assert_eq!(e.endpoints[0].node.as_deref(), Some("edge1"));
        let d = t.lookup(sa("10.96.0.20:53"), Protocol::Udp).unwrap();
        assert_eq!(d.endpoints[0].addr(), sa("10.244.7.5:5353"));
        assert!(t.lookup(sa("10.96.0.20:53"), Protocol::Tcp).is_none());
        let edges: BTreeSet<String> = ["edge1".to_string()].into();
        assert_eq!(t.ports_with_endpoints_on(&edges).len(), 2);
        // edge1 serves both ports itself (the not-ready edge2 endpoint is
        // not usable): nothing for it to capture; edge2 must capture both.
        assert!(t.ports_with_endpoints_off("edge1").is_empty());
        assert_eq!(t.ports_with_endpoints_off("edge2").len(), 2);
    }

    #[test]
    fn serving_terminating_fallback_only_when_none_is_ready() {
        let s = svc(
            "api",
            &["10.96.0.30"],
            &[("", 443, "TCP", IntOrString::Int(8443))],
        );
        let eps: [Ep<'_>; 3] = [
            ("10.244.7.6", "edge1", Some(false), Some(true), Some(true)),
            ("10.244.7.7", "edge1", Some(false), Some(false), Some(true)),
            ("10.244.7.8", "edge1", Some(false), None, None),
        ];
        let (t, _) = table_of(
            std::slice::from_ref(&s),
            &[slice("api-1", "api", "IPv4", &[("", 8443, "TCP")], &eps)],
            None,
        );
        let e = t.lookup(sa("10.96.0.30:443"), Protocol::Tcp).unwrap();
        let addrs: Vec<SocketAddr> = e.endpoints.iter().map(Endpoint::addr).collect();
        assert_eq!(
            addrs,
            [sa("10.244.7.6:8443")],
            "serving and terminating only"
        );
        // One ready endpoint: the terminating ones are not used.
        let mut eps2 = eps.to_vec();
        eps2.push(("10.244.8.9", "edge2", Some(true), None, None));
        let (t, _) = table_of(
            &[s],
            &[slice("api-1", "api", "IPv4", &[("", 8443, "TCP")], &eps2)],
            None,
        );
        let e = t.lookup(sa("10.96.0.30:443"), Protocol::Tcp).unwrap();
        let addrs: Vec<SocketAddr> = e.endpoints.iter().map(Endpoint::addr).collect();
        assert_eq!(addrs, [sa("10.244.8.9:8443")]);
    }

    #[test]
    fn headless_external_name_dual_stack_and_unknown_nodes() {
        let mut headless = svc(
            "db",
            &["None"],
            &[("pg", 5432, "TCP", IntOrString::Int(5432))],
        );
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ips = Some(vec!["None".into()]);
        }
        let mut ext = svc("mail", &[], &[]);
        if let Some(spec) = ext.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
            spec.external_name = Some("mail.example.com".into());
        }
        let dual = svc(
            "web",
            &["10.96.0.20", "fd00:96::20"],
            &[("http", 80, "TCP", IntOrString::Int(8080))],
        );
        let slices = [
            slice(
                "db-1",
                "db",
                "IPv4",
                &[("pg", 5432, "TCP")],
                &[("10.244.7.9", "edge1", None, None, None)],
            ),
            slice(
                "mail-1",
                "mail",
                "IPv4",
                &[("", 25, "TCP")],
                &[("10.244.7.10", "edge1", None, None, None)],
            ),
            slice(
                "web-4",
                "web",
                "IPv4",
                &[("http", 8080, "TCP")],
                &[("10.244.7.5", "edge1", None, None, None)],
            ),
            slice(
                "web-6",
                "web",
                "IPv6",
                &[("http", 8080, "TCP")],
                &[("fd00:244:7::5", "edge-gone", None, None, None)],
            ),
        ];
        let known: BTreeSet<String> = ["edge1".to_string()].into();
        let (t, notes) = table_of(&[headless, ext, dual], &slices, Some(&known));
        assert_eq!(notes.unknown_node_endpoints, 1, "kept, counted");
        // Headless: no ClusterIP entry, resolves by name with endpoints.
        let db = t.resolve("db.shop.svc.cluster.local").unwrap();
        assert_eq!(db.kind, ServiceKind::Headless);
        assert_eq!(db.ports[0].all_endpoints[0].addr(), sa("10.244.7.9:5432"));
        assert!(t.cluster_ips().all(|(_, e)| e.name != "db"));
        // ExternalName: recorded, no endpoints, never a ClusterIP.
        let mail = t.resolve("mail.shop").unwrap();
        assert_eq!(
            mail.kind,
            ServiceKind::ExternalName("mail.example.com".into())
        );
        assert!(mail.ports.is_empty());
        assert!(t.cluster_ips().all(|(_, e)| e.name != "mail"));
        // Dual stack: one entry per family, each with its family's endpoints.
        let v4 = t.lookup(sa("10.96.0.20:80"), Protocol::Tcp).unwrap();
        let v6 = t.lookup(sa("[fd00:96::20]:80"), Protocol::Tcp).unwrap();
        assert_eq!(v4.endpoints[0].addr(), sa("10.244.7.5:8080"));
        assert_eq!(v6.endpoints[0].addr(), sa("[fd00:244:7::5]:8080"));
        assert_eq!(v6.endpoints[0].node.as_deref(), Some("edge-gone"));
        assert_eq!(t.cluster_ip_len(), 2);
        // Names: every accepted form, and nothing else.
        for n in [
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
            "web.shop.svc",
            "web.shop",
        ] {
            assert_eq!(t.resolve(n).map(|e| e.name.as_str()), Some("web"), "{n}");
        }
        for n in [
            "web",
            "web.other",
            "web.shop.svc.other.domain",
            "x.web.shop",
        ] {
            assert!(t.resolve(n).is_none(), "{n}");
        }
        // Removing a Service removes its ClusterIP entries.
        let mut t = t;
        t.set("shop", "web", None);
        assert_eq!(t.cluster_ip_len(), 0);
        assert!(t.resolve("web.shop").is_none());
    }

    #[test]
    fn node_ports_and_external_ips_are_served_like_the_cluster_ip() {
        let mut s = svc(
            "web",
            &["10.96.0.20"],
            &[("http", 80, "TCP", IntOrString::Int(8080))],
        );
        if let Some(spec) = s.spec.as_mut() {
            spec.type_ = Some("LoadBalancer".into());
            spec.external_ips = Some(vec!["203.0.113.7".into(), "bogus".into()]);
            if let Some(p) = spec.ports.as_mut().and_then(|p| p.first_mut()) {
                p.node_port = Some(30080);
            }
        }
        s.status = Some(k8s_openapi::api::core::v1::ServiceStatus {
            load_balancer: Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
                ingress: Some(vec![k8s_openapi::api::core::v1::LoadBalancerIngress {
                    ip: Some("198.51.100.9".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let sl = slice(
            "web-1",
            "web",
            "IPv4",
            &[("http", 8080, "TCP")],
            &[("10.244.7.5", "edge1", None, None, None)],
        );
        let (e, notes) = service_entry(&s, [&sl], None);
        assert_eq!(notes.skipped, 1, "the bad external IP");
        let mut t = ServiceTable::new("cluster.local");
        t.set("shop", "web", Some(e));
        for vip in ["10.96.0.20:80", "203.0.113.7:80", "198.51.100.9:80"] {
            let got = t
                .lookup(sa(vip), Protocol::Tcp)
                .map(|e| e.endpoints[0].addr());
            assert_eq!(got, Some(sa("10.244.7.5:8080")), "{vip}");
        }
        let np = t.node_port(30080, Protocol::Tcp).expect("node port");
        assert_eq!(np.endpoints[0].addr(), sa("10.244.7.5:8080"));
        t.set("shop", "web", None);
        assert_eq!(
            (t.cluster_ip_len(), t.node_ports().count()),
            (0, 0),
            "all gone with the Service"
        );
    }
}
