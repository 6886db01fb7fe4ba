//! From a Node's claims to the relay's view of it: which Nodes are the
//! cloud's (the relay dials only those for a CONNECT client), the names
//! (Hostname, InternalDNS, ExternalDNS) that resolve to a Node, and the
//! cloud Nodes' prefixes that become capture sources.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use relay_kube::NodeClaims;
use relay_protocol::Cidr;

use super::node_addresses;
use crate::directory::{NodeEntry, NodeSource};

/// Whether a Node is in the cloud, so that the relay may dial it for a
/// CONNECT client: never with evidence of an edge (the edge label, or the
/// relay's condition: [`NodeClaims::edge`]); otherwise only with evidence
/// of the cloud: a control-plane or cloud label, or pod CIDRs, IPAM
/// prefixes (Calico's blocks, Cilium's ranges) or an address inside the
/// cloud ranges (`tunnel_routes`, which list the cloud nodes' pod
/// CIDRs). A Node with neither counts as an edge, so a CONNECT to an edge
/// that never connected and carries no label still fails at once.
pub(super) fn is_cloud(c: &NodeClaims, cloud_ranges: &[Cidr]) -> bool {
    let inside = |x: &Cidr| cloud_ranges.iter().any(|r| r.contains_cidr(x));
    !c.edge
        && (c.control_plane
            || c.cloud_label
            || (!c.pod_cidrs.is_empty() && c.pod_cidrs.iter().all(inside))
            || (!c.ipam_cidrs.is_empty() && c.ipam_cidrs.iter().all(inside))
            || c.internal_ips
                .iter()
                .chain(&c.external_ips)
                .any(|a| inside(&Cidr::host(*a))))
}

/// Hostname, InternalDNS or ExternalDNS address (lower case) → the Node
/// carrying it. A node's kubelet writes these names, so an edge could
/// copy another node's: where several Nodes carry a name, the one whose
/// Node name it is keeps it, else none (`None`; a cloud node has no better
/// claim: whether a Node looks like one rests partly on what its kubelet
/// writes). Names of a Service's form
/// ([`crate::services::is_service_name`], for cluster domain `domain`) are
/// no Node's.
pub(super) fn hostnames(
    entries: &HashMap<String, Arc<NodeEntry>>,
    domain: &str,
) -> HashMap<String, Option<String>> {
    let mut carriers: HashMap<String, Vec<&String>> = HashMap::new();
    for (n, e) in entries {
        for h in &e.hostnames {
            let h = h.to_ascii_lowercase();
            // Never a node's: not even a cloud-looking one's (an edge
            // could look like one).
            if crate::services::is_service_name(&h, domain) {
                continue;
            }
            let v = carriers.entry(h).or_default();
            if !v.contains(&n) {
                v.push(n);
            }
        }
    }
    carriers
        .into_iter()
        .map(|(h, v)| {
            let owner = match v.as_slice() {
                [n] => Some((*n).clone()),
                _ => v
                    .iter()
                    .find(|n| n.eq_ignore_ascii_case(&h))
                    .map(|n| (*n).clone()),
            };
            (h, owner)
        })
        .collect()
}

/// The cloud Nodes' routable prefixes (pod CIDRs, host prefixes), sorted.
pub(super) fn cloud_prefixes(entries: &HashMap<String, Arc<NodeEntry>>) -> Vec<Cidr> {
    let mut all: Vec<Cidr> = entries
        .values()
        .filter(|e| e.cloud)
        .flat_map(|e| e.routable())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The relay's view of one Node's claims, with the addresses taken as
/// its own (`InternalIP`s first; see [`node_addresses`]).
pub(super) fn source(c: &NodeClaims, addresses: &[IpAddr], cloud_ranges: &[Cidr]) -> NodeSource {
    let listed = node_addresses::addresses(c);
    // Pod CIDRs, then the IPAM prefixes the vetting left (Calico's blocks,
    // Cilium's ranges): both are where the node's pods are.
    let mut prefixes = c.pod_cidrs.clone();
    for p in &c.ipam_cidrs {
        if !prefixes.contains(p) {
            prefixes.push(*p);
        }
    }
    NodeSource {
        prefixes,
        // What `CONNECT <node>:<port>` dials: traffic named for the node
        // goes to the node, so its own first address serves even when it
        // is not routed to it (inside a cloud range, say); never a
        // loopback or link-local one.
        primary: addresses
            .first()
            .or_else(|| listed.iter().find(|ip| !crate::policy::forbidden(**ip)))
            .copied(),
        refused: listed
            .iter()
            .filter(|ip| !addresses.contains(ip))
            .copied()
            .collect(),
        addresses: addresses.to_vec(),
        hostnames: c.hostname.iter().chain(&c.dns_names).cloned().collect(),
        cloud: is_cloud(c, cloud_ranges),
        zone: c.zone.clone(),
        refused_ranges: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::build_entries;

    fn claims(pods: &[&str], addr: &str, edge: bool, control_plane: bool) -> NodeClaims {
        NodeClaims {
            pod_cidrs: pods.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: vec![addr.parse().unwrap()],
            edge,
            control_plane,
            ..NodeClaims::default()
        }
    }

    /// A Node is dialled by the relay only with evidence that it is in the
    /// cloud, and never with evidence that it is an edge.
    #[test]
    fn cloud_nodes_need_evidence_and_edges_always_win() {
        let ranges: Vec<Cidr> = ["10.244.0.0/24", "10.244.1.0/24", "10.96.0.0/12"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let cases = [
            // A cloud worker: its pod CIDR is listed in tunnel_routes.
            (claims(&["10.244.1.0/24"], "10.0.0.2", false, false), true),
            // A control-plane node, whatever its ranges.
            (claims(&[], "10.0.0.1", false, true), true),
            // An address inside tunnel_routes (Calico: no pod CIDR).
            (claims(&[], "10.96.0.9", false, false), true),
            // No evidence either way: an edge that never connected.
            (
                claims(&["10.244.7.0/24"], "192.168.1.10", false, false),
                false,
            ),
            (claims(&[], "192.168.1.10", false, false), false),
            // Another edge tool's cloud label (OpenYurt's).
            (
                NodeClaims {
                    cloud_label: true,
                    ..claims(&["10.244.9.0/24"], "192.168.5.1", false, false)
                },
                true,
            ),
            // Edge evidence wins over cloud evidence.
            (claims(&["10.244.1.0/24"], "10.0.0.2", true, true), false),
        ];
        for (c, want) in cases {
            assert_eq!(is_cloud(&c, &ranges), want, "{c:?}");
        }
    }

    /// The directory's entries for `(name, claims, Hostname)` under the
    /// base's ranges.
    fn entries(nodes: &[(&str, NodeClaims, &str)]) -> HashMap<String, Arc<NodeEntry>> {
        let ranges: Vec<Cidr> = ["10.244.0.0/24", "10.244.1.0/24", "10.96.0.0/12"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let sources = nodes
            .iter()
            .map(|(n, c, h)| {
                let mut c = c.clone();
                c.hostname = Some(h.to_string());
                let mut addresses = c.internal_ips.clone();
                addresses.extend(&c.external_ips);
                (n.to_string(), source(&c, &addresses, &ranges))
            })
            .collect();
        build_entries(&sources)
    }

    /// A Hostname two Nodes carry resolves to neither, unless it is one's
    /// Node name (an edge's kubelet writes its own addresses, and could
    /// copy a cloud node's); a unique one
    /// resolves, in any case, and so do InternalDNS and ExternalDNS names
    /// (kube-apiserver dials kubelets by them when its preferred address
    /// types put them first), also where one Node carries a name twice; an
    /// edge's name of a Service's form is not taken.
    #[test]
    fn a_hostname_several_nodes_carry_resolves_to_none() {
        let mut dns = claims(&["10.244.9.0/24"], "192.168.1.12", true, false);
        dns.dns_names = vec![
            "ip-192-168-1-12.shop.internal".into(),
            "Edge-3".into(),
            "metrics-server.kube-system.svc".into(),
            "edge3.site7.svc.example.com".into(),
            "shared.site".into(),
        ];
        let e = entries(&[
            (
                "worker-1",
                claims(&["10.244.1.0/24"], "10.0.0.2", false, false),
                "ip-10-0-0-2",
            ),
            ("edge-3", dns, "edge-3"),
            (
                "edge-1",
                claims(&["10.244.7.0/24"], "192.168.1.10", true, false),
                "IP-10-0-0-2",
            ),
            (
                "edge-2",
                claims(&["10.244.8.0/24"], "192.168.1.11", true, false),
                "Shop-2",
            ),
        ]);
        let mut e = e;
        let mut two = (*e["edge-2"]).clone();
        two.hostnames
            .extend(["shared.site".into(), "edge-3".into()]);
        e.insert("edge-2".into(), Arc::new(two));
        let h = hostnames(&e, "cluster.local");
        let edge3 = Some("edge-3".to_string());
        assert_eq!(
            h.get("ip-10-0-0-2"),
            Some(&None),
            "copied from a cloud node"
        );
        assert_eq!(h.get("shop-2"), Some(&Some("edge-2".to_string())));
        assert_eq!(
            h.get("edge-3"),
            Some(&edge3),
            "its own name, copied by edge-2"
        );
        assert_eq!(h.get("shared.site"), Some(&None));
        assert_eq!(h.get("metrics-server.kube-system.svc"), None);
        assert_eq!(
            h.get("edge3.site7.svc.example.com"),
            Some(&edge3),
            "not the cluster's domain"
        );
        assert_eq!(h.get("ip-192-168-1-12.shop.internal"), Some(&edge3));
    }

    /// Only cloud Nodes' pod CIDRs and addresses become capture sources.
    #[test]
    fn cloud_prefixes_are_the_cloud_nodes_own() {
        let e = entries(&[
            (
                "worker-1",
                claims(&["10.244.1.0/24"], "10.0.0.2", false, false),
                "w1",
            ),
            ("cp", claims(&[], "10.0.0.1", false, true), "cp"),
            (
                "edge-1",
                claims(&["10.244.7.0/24"], "192.168.1.10", true, false),
                "e1",
            ),
        ]);
        let want: Vec<Cidr> = ["10.0.0.1/32", "10.0.0.2/32", "10.244.1.0/24"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(cloud_prefixes(&e), want);
    }
}
