//! Service names for the edge's resolver: what [`Control::ServiceNames`]
//! carries.
//!
//! An edge with a node-local resolver answers cluster-domain names
//! (`web.shop.svc.cluster.local`) itself, so names keep resolving while
//! its link to the cloud is down. The relay sends it, per Service, what a
//! cluster DNS answers from: the kind (ClusterIPs, headless, ExternalName),
//! the ports (for SRV) and, for headless Services, the ready endpoints.
//!
//! Sizes are capped so a frame is bounded whatever the cluster: at most
//! [`ServiceName::MAX_PORTS`] ports and [`ServiceName::MAX_ENDPOINTS`]
//! endpoints per Service, and names within DNS limits
//! ([`ServiceName::is_valid`]). [`Control::service_names`] cuts and splits a
//! change into frames within [`Control::SERVICE_NAMES_BUDGET`];
//! [`NamesFeed`] keeps, per edge session, what was sent and yields the
//! frames for the next table ([`names_delta`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Control;

/// Which Service: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceNameKey {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

/// What a Service's name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameKind {
    /// A ClusterIP Service: its ClusterIPs, at most one per family.
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: the name resolves to the ready endpoints.
    Headless,
    /// `type: ExternalName`: the name is an alias (CNAME) of this one.
    ExternalName(String),
}

/// Transport protocol of a Service port (the `_proto` label of SRV names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NameProtocol {
    /// `_tcp`.
    Tcp,
    /// `_udp`.
    Udp,
    /// `_sctp`.
    Sctp,
}

impl NameProtocol {
    /// The SRV label without its underscore: `tcp`, `udp`, `sctp`.
    pub fn label(&self) -> &'static str {
        match self {
            NameProtocol::Tcp => "tcp",
            NameProtocol::Udp => "udp",
            NameProtocol::Sctp => "sctp",
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamePort {
    /// The port's name (`""` when unnamed: such a port has no SRV name).
    pub name: String,
    /// The Service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: NameProtocol,
}

/// One ready endpoint of a headless Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEndpoint {
    /// Its address.
    pub ip: IpAddr,
    /// `hostname` from the EndpointSlice (StatefulSet pods): the endpoint
    /// also answers as `hostname.svc.ns.svc.<domain>`.
    pub hostname: Option<String>,
    /// Target port per Service port, in the order of
    /// [`ServiceName::ports`]; 0 where this endpoint does not serve that
    /// port. SRV answers for headless Services carry these.
    pub ports: Vec<u16>,
}

/// One Service as the edge's resolver needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceName {
    /// Which Service.
    pub key: ServiceNameKey,
    /// ClusterIP, headless or ExternalName.
    pub kind: NameKind,
    /// Its ports, at most [`ServiceName::MAX_PORTS`].
    pub ports: Vec<NamePort>,
    /// Ready endpoints (headless Services only), at most
    /// [`ServiceName::MAX_ENDPOINTS`].
    pub endpoints: Vec<NameEndpoint>,
}

impl ServiceName {
    /// Most ports per Service sent (more are cut).
    pub const MAX_PORTS: usize = 32;
    /// Most endpoints per headless Service sent (more are cut): an
    /// EndpointSlice holds 100 by default, and a DNS answer with more
    /// would be truncated on UDP anyway.
    pub const MAX_ENDPOINTS: usize = 100;

    /// Whether every name in it fits DNS: namespace, name, port names and
    /// hostnames are single labels of 1 to 63 bytes (port names may be
    /// empty), an ExternalName target is at most 253 bytes with labels of
    /// at most 63. A relay never sends an invalid entry and an edge ignores
    /// one; the caps above are not checked here ([`ServiceName::clamp`]).
    pub fn is_valid(&self) -> bool {
        let label = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('.');
        let target_ok = match &self.kind {
            NameKind::ExternalName(t) => {
                let t = t.trim_end_matches('.');
                !t.is_empty() && t.len() <= 253 && t.split('.').all(label)
            }
            NameKind::ClusterIp(ips) => ips.len() <= 2,
            NameKind::Headless => true,
        };
        label(&self.key.namespace)
            && label(&self.key.name)
            && target_ok
            && self
                .ports
                .iter()
                .all(|p| p.name.is_empty() || label(&p.name))
            && self
                .endpoints
                .iter()
                .all(|e| e.hostname.as_deref().is_none_or(label))
    }

    /// Cuts ports and endpoints to the caps, and each endpoint's port list
    /// to the number of ports.
    pub fn clamp(&mut self) {
        self.ports.truncate(Self::MAX_PORTS);
        self.endpoints.truncate(Self::MAX_ENDPOINTS);
        let n = self.ports.len();
        for e in &mut self.endpoints {
            e.ports.resize(n, 0);
        }
    }

    /// Upper bound of the encoded size of a valid, clamped entry (bincode
    /// varints: a length prefix is at most 9 bytes, an address 17, a port
    /// 3), so frames can be cut without encoding anything twice.
    pub fn max_encoded_len(&self) -> usize {
        const LEN: usize = 9;
        let s = |x: &str| LEN + x.len();
        let kind = match &self.kind {
            NameKind::ClusterIp(ips) => 1 + LEN + ips.len() * 17,
            NameKind::Headless => 1,
            NameKind::ExternalName(t) => 1 + s(t),
        };
        let ports: usize = self.ports.iter().map(|p| s(&p.name) + 3 + 1).sum();
        let eps: usize = self
            .endpoints
            .iter()
            .map(|e| 17 + 1 + e.hostname.as_deref().map_or(0, s) + LEN + e.ports.len() * 3)
            .sum();
        s(&self.key.namespace) + s(&self.key.name) + kind + LEN + ports + LEN + eps
    }
}

/// The cluster domain when nothing says otherwise.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

impl Control {
    /// Byte budget of the entries in one [`Control::ServiceNames`] frame:
    /// with the frame's other fields, well inside [`crate::MAX_FRAME_LEN`].
    /// The largest valid, clamped entry (100 endpoints with 63-byte
    /// hostnames and 32 ports) is about 20 KiB, so one always fits.
    pub const SERVICE_NAMES_BUDGET: usize = 48 * 1024;

    /// Splits a change of the name table into [`Control::ServiceNames`]
    /// frames whose entries stay within [`Control::SERVICE_NAMES_BUDGET`]:
    /// entries are clamped ([`ServiceName::clamp`]), invalid ones
    /// ([`ServiceName::is_valid`]) are left out. Removals go first; the first
    /// frame carries `reset`, the last is `complete`; every frame carries
    /// the cluster domain; an empty change yields one empty, complete frame.
    pub fn service_names(
        reset: bool,
        cluster_domain: &str,
        upsert: Vec<ServiceName>,
        remove: Vec<ServiceNameKey>,
    ) -> Vec<Control> {
        let key_cost = |k: &ServiceNameKey| 18 + k.namespace.len() + k.name.len();
        let mut out = Vec::new();
        let mut upsert = upsert
            .into_iter()
            .filter(ServiceName::is_valid)
            .map(|mut s| {
                s.clamp();
                s
            })
            .peekable();
        let mut remove = remove
            .into_iter()
            // A removal of a name no valid entry can have is a no-op, and
            // such a key could be large.
            .filter(|k| k.namespace.len() <= 63 && k.name.len() <= 63)
            .peekable();
        loop {
            let (mut r, mut u, mut used) = (Vec::new(), Vec::new(), 0usize);
            while let Some(k) = remove.peek() {
                if used + key_cost(k) > Self::SERVICE_NAMES_BUDGET {
                    break;
                }
                used += key_cost(k);
                r.extend(remove.next());
            }
            while let Some(s) = upsert.peek() {
                let c = s.max_encoded_len();
                // The first entry of a frame always goes in (a valid,
                // clamped entry fits the budget alone), so this ends.
                if used + c > Self::SERVICE_NAMES_BUDGET && !(r.is_empty() && u.is_empty()) {
                    break;
                }
                used += c;
                u.extend(upsert.next());
            }
            let done = upsert.peek().is_none() && remove.peek().is_none();
            out.push(Control::ServiceNames {
                reset: reset && out.is_empty(),
                cluster_domain: cluster_domain.to_string(),
                upsert: u,
                remove: r,
                complete: done,
            });
            if done {
                return out;
            }
        }
    }
}

/// Every Service's names, by namespace and name: what one edge resolver
/// holds (in Kubernetes mode, `relay_kube::service_names` builds it).
pub type NameTable = BTreeMap<ServiceNameKey, ServiceName>;

/// What changed from `old` to `new`: entries added or different, and keys
/// gone. An edge that applies them in order then holds `new`.
pub fn names_delta(old: &NameTable, new: &NameTable) -> (Vec<ServiceName>, Vec<ServiceNameKey>) {
    let upsert = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let remove = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (upsert, remove)
}

/// What one edge session has been sent, and the frames that bring it to
/// the current table: everything (with `reset`) the first time, then only
/// what changed. Tables are shared (`Arc`): the relay builds one per
/// directory change, every session keeps a pointer to the last one it
/// sent, so memory does not grow with the number of edges.
#[derive(Debug, Default)]
pub struct NamesFeed {
    sent: Option<Arc<NameTable>>,
}

impl NamesFeed {
    /// The frames to send for `current` (none when nothing changed since
    /// the last call). Costs one comparison per Service when the table
    /// changed, nothing when it is the same `Arc`.
    pub fn frames(&mut self, current: &Arc<NameTable>, cluster_domain: &str) -> Vec<Control> {
        let out = match &self.sent {
            None => Control::service_names(
                true,
                cluster_domain,
                current.values().cloned().collect(),
                Vec::new(),
            ),
            Some(last) if Arc::ptr_eq(last, current) => Vec::new(),
            Some(last) => {
                let (upsert, remove) = names_delta(last, current);
                if upsert.is_empty() && remove.is_empty() {
                    Vec::new()
                } else {
                    Control::service_names(false, cluster_domain, upsert, remove)
                }
            }
        };
        self.sent = Some(current.clone());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> ServiceName {
        ServiceName {
            key: ServiceNameKey {
                namespace: "shop".into(),
                name: name.into(),
            },
            kind: NameKind::ClusterIp(vec![ip.parse().unwrap()]),
            ports: vec![],
            endpoints: vec![],
        }
    }

    fn table(s: &[(&str, &str)]) -> Arc<NameTable> {
        Arc::new(
            s.iter()
                .map(|(n, ip)| (svc(n, ip).key, svc(n, ip)))
                .collect(),
        )
    }

    #[test]
    fn a_feed_sends_everything_once_then_changes_only() {
        let a = table(&[("web", "10.96.0.20"), ("db", "10.96.0.30")]);
        let mut feed = NamesFeed::default();
        let first = feed.frames(&a, "cluster.local");
        assert!(
            matches!(&first[..], [Control::ServiceNames { reset: true, upsert, complete: true, .. }] if upsert.len() == 2)
        );
        assert!(
            feed.frames(&a, "cluster.local").is_empty(),
            "same table: nothing"
        );
        // An equal table built again: still nothing.
        let a2 = Arc::new((*a).clone());
        assert!(feed.frames(&a2, "cluster.local").is_empty());
        let b = table(&[("web", "10.96.0.21")]);
        let next = feed.frames(&b, "cluster.local");
        let [Control::ServiceNames {
            reset: false,
            upsert,
            remove,
            complete: true,
            ..
        }] = &next[..]
        else {
            panic!("{next:?}")
        };
        assert_eq!(upsert, &vec![svc("web", "10.96.0.21")]);
        assert_eq!(
            remove.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["db"]
        );
        // Applying the delta to the old table gives the new one.
        let (u, r) = names_delta(&a, &b);
        let mut applied = (*a).clone();
        for k in &r {
            applied.remove(k);
        }
        for s in u {
            applied.insert(s.key.clone(), s);
        }
        assert_eq!(applied, *b);
    }
}
