//! Building one Service's entry ([`service_entry`]) from the Service and
//! its EndpointSlices, with kube-proxy's rules for ports, conditions and
//! families (see the parent module's docs). Pure parsing of API objects,
//! separate from the table that indexes the results.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use relay_protocol::Cidr;

use super::{Endpoint, Protocol, ServiceEntry, ServiceKind, ServicePort};

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
    // `externalTrafficPolicy: Local`: each node's kube-proxy sends its
    // node ports to that node's own endpoints only (keeping the client's
    // address), and nothing of ours may send them elsewhere: the table
    // lists such node ports with each node's own endpoints, and the relay
    // marks them node-local (no node captures them; an edge without
    // kube-proxy serves its own).
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
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
            let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
                p.name.clone().unwrap_or_default() == pname
                    && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
            }) else {
                continue;
            };
            let Some(eport) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            add_endpoints(slice, eport, known_nodes, &mut notes, &mut eps);
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
    // A headless Service without ports: the EndpointSlice controller lists
    // its endpoints in slices without ports, and the cluster DNS answers
    // its name with them all the same.
    let mut portless: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    if kind == ServiceKind::Headless && spec.ports.as_ref().is_none_or(Vec::is_empty) {
        for slice in slices
            .iter()
            .filter(|s| s.ports.as_ref().is_none_or(Vec::is_empty))
        {
            add_endpoints(slice, 0, known_nodes, &mut notes, &mut portless);
        }
    }
    let (mut external_ips, mut lb_ips) = (Vec::new(), Vec::new());
    // An ingress IP of `ipMode: Proxy` is the load balancer's own address
    // (it proxies to the nodes), which kube-proxy leaves alone, and so do
    // we. (`externalTrafficPolicy: Local` is kept on the entry: see
    // [`ServiceEntry::external_local`].)
    if matches!(kind, ServiceKind::ClusterIp(_)) {
        let lb = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.clone())
            .map(|ip| (ip, true));
        let listed = spec.external_ips.clone().unwrap_or_default();
        for (raw, from_lb) in listed.into_iter().map(|ip| (ip, false)).chain(lb) {
            match raw.parse::<IpAddr>() {
                // `spec.externalIPs` come first: a load balancer's address
                // already listed there is matched as one by kube-proxy
                // first, from any source (no firewall for it), and is not
                // one of `lb_ips`.
                Ok(ip) if !external_ips.contains(&ip) => {
                    external_ips.push(ip);
                    if from_lb {
                        lb_ips.push(ip);
                    }
                }
                Ok(_) => {}
                Err(_) => notes.skipped += 1,
            }
        }
    }
    // kube-proxy's watches leave out both labels; a headless Service's
    // names resolve to its endpoints whatever it is labelled.
    let labelled = |k: &str| {
        svc.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(k))
    };
    let other_proxy = labelled(crate::services::SERVICE_PROXY_NAME_LABEL)
        || (matches!(kind, ServiceKind::ClusterIp(_)) && labelled(crate::services::HEADLESS_LABEL));
    let mut lb_source_ranges = Vec::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        // The apiserver validates the syntax, so a skip is not expected.
        match source_range(raw) {
            Some(c) => lb_source_ranges.push(c),
            None => notes.skipped += 1,
        }
    }
    (
        ServiceEntry {
            namespace,
            name,
            kind,
            ports,
            external_ips,
            lb_ips,
            lb_source_ranges,
            portless_endpoints: portless.into_values().collect(),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
            external_local,
            other_proxy,
        },
        notes,
    )
}

/// A `loadBalancerSourceRanges` entry as the apiserver accepts it and
/// kube-proxy reads it: host bits allowed (`203.0.113.5/24` is
/// `203.0.113.0/24`).
fn source_range(raw: &str) -> Option<Cidr> {
    let raw = raw.trim();
    match raw.split_once('/') {
        Some((addr, len)) => Cidr::containing(addr.parse().ok()?, len.parse().ok()?),
        None => raw.parse().ok(),
    }
}

/// Adds `slice`'s endpoints, serving `port`, to `eps` (keyed by address
/// and port). An address listed twice (an endpoint moving between slices,
/// or a new pod given a terminating pod's address) keeps the copy that is
/// not terminating, else the first, as kube-proxy does: the running pod
/// wins over the one shutting down.
/// FQDN slices are not proxied and add nothing; an address that does not
/// parse or is not of the slice's family is skipped and counted.
fn add_endpoints(
    slice: &EndpointSlice,
    port: u16,
    known_nodes: Option<&BTreeSet<String>>,
    notes: &mut BuildNotes,
    eps: &mut BTreeMap<SocketAddr, Endpoint>,
) {
    let v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        _ => return,
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
            port,
            node: e.node_name.clone(),
            ready,
            // Missing means true (the v1 API's default, as kube-proxy
            // reads it), not a copy of `ready`.
            serving: c.serving.unwrap_or(true),
            terminating: c.terminating.unwrap_or(false),
            hostname: e.hostname.clone(),
            zone_hints: e
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| z.name.clone())
                .collect(),
            node_hints: e
                .hints
                .iter()
                .flat_map(|h| h.for_nodes.iter().flatten())
                .map(|n| n.name.clone())
                .collect(),
        };
        if let (Some(known), Some(node)) = (known_nodes, &ep.node) {
            if !known.contains(node) {
                notes.unknown_node_endpoints += 1;
            }
        }
        match eps.entry(ep.addr()) {
            Entry::Vacant(v) => {
                v.insert(ep);
            }
            Entry::Occupied(mut o) if !ep.terminating => {
                o.insert(ep);
            }
            Entry::Occupied(_) => {}
        }
    }
}
