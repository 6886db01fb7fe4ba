//! [`ServiceTable`]: the Services by name, their ClusterIP:ports and
//! external IPs by address, their node ports by port, and the queries the
//! relay and the edges make of it. Pure indexing of entries already built
//! (`entry.rs`); [`super::ServiceDirectory`] keeps one up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

#[cfg(doc)]
use super::ServiceDirectory;
use super::{ClusterIpEntry, Endpoint, Protocol, ServiceEntry, ServiceKind, ServicePort};

/// A ClusterIP Service's addresses taking connections: its ClusterIPs and
/// external IPs (none for headless and ExternalName Services).
fn addresses(e: &ServiceEntry) -> Vec<IpAddr> {
    match &e.kind {
        ServiceKind::ClusterIp(ips) => ips.iter().chain(&e.external_ips).copied().collect(),
        _ => Vec::new(),
    }
}

/// `entry`'s port `p` at its address `ip` (a ClusterIP or an external
/// IP), with the endpoints that serve it there: for a ClusterIP of an
/// `internalTrafficPolicy: Local` Service, each node's own
/// ([`super::usable_per_node`]); otherwise the cluster's
/// ([`ServicePort::usable`]).
fn vip_entry(entry: &ServiceEntry, p: &ServicePort, ip: IpAddr) -> ClusterIpEntry {
    let node_local = entry.internal_local && !entry.external_ips.contains(&ip);
    let endpoints = if node_local {
        super::usable_per_node(&p.all_endpoints, ip.is_ipv4())
    } else {
        p.usable(ip.is_ipv4())
    };
    port_entry(entry, p, endpoints, ip.is_ipv4())
}

/// `entry`'s port `p` with `endpoints`, and the addresses of its serving
/// endpoints of one family (IPv4 when `ipv4`).
fn port_entry(
    entry: &ServiceEntry,
    p: &ServicePort,
    endpoints: Vec<&Endpoint>,
    ipv4: bool,
) -> ClusterIpEntry {
    let mut serving: Vec<IpAddr> = p
        .all_endpoints
        .iter()
        .filter(|e| e.serving && e.ip.is_ipv4() == ipv4)
        .map(|e| e.ip)
        .collect();
    serving.sort_unstable();
    serving.dedup();
    ClusterIpEntry {
        namespace: entry.namespace.clone(),
        name: entry.name.clone(),
        port_name: p.name.clone(),
        target_port: p.target_port.clone(),
        endpoints: endpoints.into_iter().cloned().collect(),
        serving,
    }
}

/// `entry`'s port listed at `k` (an address, port and protocol), if any.
fn listed(entry: &ServiceEntry, k: (SocketAddr, Protocol)) -> Option<&ServicePort> {
    if !addresses(entry).contains(&k.0.ip()) {
        return None;
    }
    entry
        .ports
        .iter()
        .find(|p| p.port == k.0.port() && p.protocol == k.1)
}

/// `entry`'s claim on `k`, if it lists it.
fn claim(entry: &ServiceEntry, k: (SocketAddr, Protocol)) -> Option<ClusterIpEntry> {
    listed(entry, k).map(|p| vip_entry(entry, p, k.0.ip()))
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
            let owned = |e: &ClusterIpEntry| e.namespace == old.namespace && e.name == old.name;
            for ip in addresses(&old) {
                for p in &old.ports {
                    let k = (SocketAddr::new(ip, p.port), p.protocol);
                    // Another Service may list the same external IP and
                    // port (ClusterIPs are never shared): it keeps it, or
                    // takes it over once this one's goes.
                    if !self.by_vip.get(&k).is_some_and(owned) {
                        continue;
                    }
                    // Still this Service's after the update: rewritten
                    // below, not handed over.
                    if entry.as_ref().is_some_and(|e| listed(e, k).is_some()) {
                        continue;
                    }
                    self.by_vip.remove(&k);
                    if old.external_ips.contains(&ip) {
                        if let Some(other) = self.by_name.values().find_map(|e| claim(e, k)) {
                            self.by_vip.insert(k, other);
                        }
                    }
                }
            }
            for p in &old.ports {
                if let Some(np) = p.node_port {
                    // Another Service may have taken the port meanwhile.
                    if self.by_node_port.get(&(np, p.protocol)).is_some_and(owned) {
                        self.by_node_port.remove(&(np, p.protocol));
                    }
                }
            }
        }
        let Some(entry) = entry else {
            return;
        };
        for ip in addresses(&entry) {
            let shared = entry.external_ips.contains(&ip);
            for p in &entry.ports {
                let k = (SocketAddr::new(ip, p.port), p.protocol);
                // An external IP another Service listed first stays its
                // own (else every update of either would move it).
                if shared
                    && self
                        .by_vip
                        .get(&k)
                        .is_some_and(|e| e.namespace != entry.namespace || e.name != entry.name)
                {
                    continue;
                }
                self.by_vip.insert(k, vip_entry(&entry, p, ip));
            }
        }
        if matches!(entry.kind, ServiceKind::ClusterIp(_)) {
            for p in &entry.ports {
                if let Some(np) = p.node_port {
                    // `externalTrafficPolicy: Local`: each node's own.
                    let endpoints = if entry.external_local {
                        super::usable_per_node(&p.all_endpoints, true)
                    } else {
                        p.usable(true)
                    };
                    self.by_node_port
                        .insert((np, p.protocol), port_entry(&entry, p, endpoints, true));
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
