//! The cluster's Services and EndpointSlices as the relay's
//! [`ServiceSource`]: relay-kube's `ServiceDirectory` keeps the table
//! (kube-proxy's endpoint semantics), this adapter turns each change into
//! an immutable [`ServiceSnapshot`] for the data path. Built only with the
//! `kubernetes` feature.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use relay_kube::services::{usable, Protocol, ServiceKind, ServiceTable};
use relay_kube::{KubeClient, ServiceDirectory, ServiceDirectoryOptions, ServiceObjects};
use relay_protocol::ServiceKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::k8s::cache;
use crate::service_feed::changed_keys;
use crate::services::{Backend, NameLookup, ServiceSnapshot, ServiceSource};

/// Gathers a burst of changes (a relist, a rollout touching many slices)
/// into one snapshot; well under the second an endpoint change may take.
const SETTLE: Duration = Duration::from_millis(100);

/// Services from the Kubernetes API.
pub struct KubeServices {
    dir: ServiceDirectory,
    snapshot: watch::Sender<Arc<ServiceSnapshot>>,
    /// Set once a snapshot built after the first lists is published: the
    /// directory's own flag turns up to [`SETTLE`] earlier, while
    /// `snapshot()` still returns the empty table.
    published: std::sync::atomic::AtomicBool,
    /// When the cache the table came from was written, while it comes
    /// from it (until both first lists).
    cached: std::sync::Mutex<Option<std::time::SystemTime>>,
}

/// The snapshot of `table`: every TCP and UDP ClusterIP (and external IP)
/// port and node port with its usable endpoints (SCTP is never captured,
/// so never listed, nor are Services another proxy serves).
pub fn snapshot_of(table: &ServiceTable) -> ServiceSnapshot {
    // `(udp, endpoints)` of an entry, or `None` for SCTP and for a Service
    // labelled for another proxy (kube-proxy leaves those alone too).
    let usable = |proto: &Protocol, entry: &relay_kube::ClusterIpEntry| {
        if table
            .service(&entry.namespace, &entry.name)
            .is_some_and(|s| s.other_proxy)
        {
            return None;
        }
        let udp = match proto {
            Protocol::Tcp => false,
            Protocol::Udp => true,
            Protocol::Sctp => return None,
        };
        let backends: Vec<Backend> = entry.endpoints.iter().map(backend).collect();
        Some((udp, Arc::<[Backend]>::from(backends)))
    };
    let ports: BTreeMap<ServiceKey, Arc<[Backend]>> = table
        .cluster_ips()
        .filter_map(|((vip, proto), e)| {
            usable(proto, e).map(|(udp, b)| (ServiceKey { vip: *vip, udp }, b))
        })
        .collect();
    // The captured ClusterIP (and external IP) ports whose Service and
    // address pass `pred`.
    let keys_where = |pred: &dyn Fn(&relay_kube::ServiceEntry, IpAddr) -> bool| {
        table
            .cluster_ips()
            .filter(|((vip, _), e)| {
                table
                    .service(&e.namespace, &e.name)
                    .is_some_and(|s| pred(s, vip.ip()))
            })
            .map(|((vip, proto), _)| ServiceKey {
                vip: *vip,
                udp: *proto == Protocol::Udp,
            })
            .filter(|k| ports.contains_key(k))
            .collect::<BTreeSet<ServiceKey>>()
    };
    // External and load-balancer IPs share the table with ClusterIPs; the
    // Service says which of its addresses they are. Those of
    // `externalTrafficPolicy: Local` Services are not open to any source:
    // from outside the cluster kube-proxy gives them to the receiving
    // node's own endpoints only, so they are captured, like ClusterIPs,
    // from the cluster's own sources alone.
    let external = keys_where(&|s, ip| s.external_ips.contains(&ip) && !s.external_local);
    // The node ports whose Service passes `pred`.
    let node_ports_where = |pred: &dyn Fn(&relay_kube::ServiceEntry) -> bool| {
        table
            .node_ports()
            .filter(|(_, e)| table.service(&e.namespace, &e.name).is_some_and(pred))
            .map(|((port, proto), _)| ServiceKey::node_port(*port, *proto == Protocol::Udp))
            .collect::<Vec<ServiceKey>>()
    };
    // internalTrafficPolicy applies to ClusterIPs, not to external IPs;
    // externalTrafficPolicy to node ports (and external IPs, above).
    let mut node_local = keys_where(&|s, ip| s.internal_local && !s.external_ips.contains(&ip));
    node_local.extend(node_ports_where(&|s| s.external_local));
    let mut sticky = keys_where(&|s, _| s.client_ip_affinity);
    sticky.extend(node_ports_where(&|s| s.client_ip_affinity));
    // kube-proxy's firewall for load balancers: only their source ranges
    // reach a load-balancer IP of a Service that lists some.
    let source_ranges = table
        .cluster_ips()
        .filter_map(|((vip, proto), e)| {
            let key = ServiceKey {
                vip: *vip,
                udp: *proto == Protocol::Udp,
            };
            let ranges = table
                .service(&e.namespace, &e.name)?
                .source_ranges_of(vip.ip());
            (ports.contains_key(&key) && !ranges.is_empty()).then(|| (key, Arc::from(ranges)))
        })
        .collect();
    let node_ports: BTreeMap<(u16, bool), Arc<[Backend]>> = table
        .node_ports()
        .filter_map(|((port, proto), e)| usable(proto, e).map(|(udp, b)| ((*port, udp), b)))
        .collect();
    // UDP only (a TCP connection keeps its endpoint for its lifetime), and
    // only the ports listed above (not another proxy's).
    let serving = |e: &relay_kube::ClusterIpEntry| Arc::<[IpAddr]>::from(e.serving.as_slice());
    let udp_serving = table
        .cluster_ips()
        .filter(|((_, proto), _)| *proto == Protocol::Udp)
        .map(|((vip, _), e)| {
            (
                ServiceKey {
                    vip: *vip,
                    udp: true,
                },
                e,
            )
        })
        .filter(|(k, _)| ports.contains_key(k))
        .chain(
            table
                .node_ports()
                .filter(|((p, proto), _)| {
                    *proto == Protocol::Udp && node_ports.contains_key(&(*p, true))
                })
                .map(|((p, _), e)| (ServiceKey::node_port(*p, true), e)),
        )
        .map(|(k, e)| (k, serving(e)))
        .collect();
    ServiceSnapshot {
        ports,
        node_ports,
        udp_serving,
        external,
        node_local,
        sticky,
        source_ranges,
        names: Arc::new(relay_kube::service_names(table)),
        cluster_domain: Arc::from(table.cluster_domain()),
        changes: Arc::default(),
    }
}

/// `snap` as the snapshot after `prev`: numbered, with the ports it
/// changed in its journal (sessions compare only those), and `prev`'s
/// name table when the names did not change (sessions skip the names
/// when the pointer is the one they sent).
fn following(prev: &ServiceSnapshot, mut snap: ServiceSnapshot) -> ServiceSnapshot {
    snap.changes = Arc::new(prev.changes.next(changed_keys(prev, &snap)));
    if snap.names == prev.names {
        snap.names = prev.names.clone();
    }
    snap
}

/// `CONNECT host:port` against `table` (see [`NameLookup`]).
pub fn lookup_name(table: &ServiceTable, host: &str, port: u16) -> NameLookup {
    let Some(svc) = table.resolve(host) else {
        return NameLookup::NotAService;
    };
    let what = format!("service {}/{}", svc.namespace, svc.name);
    if svc.other_proxy {
        return NameLookup::Refused(format!(
            "{what} is left by kube-proxy, so by the relay (labelled service.kubernetes.io/service-proxy-name: another proxy serves it; or a ClusterIP labelled service.kubernetes.io/headless)"
        ));
    }
    if svc.kind == ServiceKind::Headless && svc.ports.is_empty() {
        // No ports to check against: a client that resolved the name
        // through DNS would connect to an endpoint's address on any port.
        let eps = &svc.portless_endpoints;
        let out = usable(eps, true).into_iter().chain(usable(eps, false));
        return NameLookup::Backends(
            out.map(|e| Backend {
                addr: SocketAddr::new(e.ip, port),
                ..backend(e)
            })
            .collect(),
        );
    }
    let Some(p) = svc
        .ports
        .iter()
        .find(|p| p.port == port && p.protocol == Protocol::Tcp)
    else {
        return NameLookup::Refused(format!("{what} has no TCP port {port}"));
    };
    match &svc.kind {
        ServiceKind::ExternalName(target) => NameLookup::Refused(format!(
            "{what} is an ExternalName for {target}: connect to that name"
        )),
        // Only the asking node's own endpoints may serve it, and a CONNECT
        // comes from no node (as for its ClusterIP, see `route_node_local`).
        ServiceKind::ClusterIp(_) if svc.internal_local => NameLookup::Refused(format!(
            "{what} has internalTrafficPolicy Local: only a node's own endpoints serve it, and a CONNECT is from no node"
        )),
        // Endpoints of the families the Service has (headless: both).
        ServiceKind::ClusterIp(ips) => {
            let mut out = Vec::new();
            for ip in ips {
                out.extend(p.usable(ip.is_ipv4()).into_iter().map(backend));
            }
            NameLookup::Backends(out)
        }
        ServiceKind::Headless => {
            let mut out: Vec<Backend> = p.usable(true).into_iter().map(backend).collect();
            out.extend(p.usable(false).into_iter().map(backend));
            NameLookup::Backends(out)
        }
    }
}

fn backend(e: &relay_kube::services::Endpoint) -> Backend {
    Backend {
        addr: e.addr(),
        node: e.node.as_deref().map(Arc::from),
        hints: crate::topology::Hints::of(e.ready, &e.zone_hints, &e.node_hints),
    }
}

impl KubeServices {
    /// Starts the watches and the snapshot task (until `stop`); with
    /// `cache_file` (`kubernetes.services_cache_file`), the table starts
    /// from the objects kept there, if any, and they are kept there.
    pub fn start(
        client: &KubeClient,
        cluster_domain: &str,
        cache_file: Option<std::path::PathBuf>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let opts = ServiceDirectoryOptions {
            cluster_domain: cluster_domain.to_string(),
            ..ServiceDirectoryOptions::default()
        };
        let seed = cache_file
            .as_deref()
            .and_then(cache::load::<ServiceObjects>);
        if let Some((o, written)) = &seed {
            info!(
                services = o.services.len(),
                endpointslices = o.slices.len(),
                age_secs = written.elapsed().unwrap_or_default().as_secs(),
                "routing Services on the services cache until the first lists"
            );
        }
        let (seed, written) = seed.unzip();
        let me = Arc::new(KubeServices {
            dir: ServiceDirectory::spawn_seeded(client, &opts, seed),
            snapshot: watch::channel(Arc::default()).0,
            published: std::sync::atomic::AtomicBool::new(false),
            cached: std::sync::Mutex::new(written),
        });
        if let Some(path) = cache_file {
            me.keep_in(path, stop.clone());
        }
        let weak = Arc::downgrade(&me);
        let mut changes = me.dir.subscribe();
        tokio::spawn(async move {
            loop {
                {
                    let Some(me) = weak.upgrade() else { return };
                    // Read before the table: a snapshot taken after the
                    // flag turned is one of the loaded table.
                    let synced = me.dir.is_synced();
                    let mut cached = me.cached.lock().unwrap_or_else(|e| e.into_inner());
                    if synced && cached.take().is_some() {
                        info!("the first lists replace the services cache");
                    }
                    let loaded = synced || cached.is_some();
                    drop(cached);
                    let snap = me.dir.with_table(snapshot_of);
                    let snap = following(&me.snapshot.borrow().clone(), snap);
                    debug!(
                        ports = snap.ports.len(),
                        changed = snap
                            .changes
                            .since(snap.changes.generation - 1)
                            .map_or(0, |k| k.len()),
                        "service snapshot"
                    );
                    me.snapshot.send_replace(Arc::new(snap));
                    if loaded && !me.published.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        // Wakes readers that saw the snapshot above before
                        // the flag (see `cluster_loaded`).
                        me.snapshot.send_modify(|_| {});
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(SETTLE).await;
            }
        });
        me
    }
}

impl KubeServices {
    /// Keeps the objects in `path` after changes, at most every
    /// [`cache::SERVICES_EVERY`], once both first lists are in (never the
    /// cache it started from read back).
    fn keep_in(self: &Arc<Self>, path: std::path::PathBuf, stop: CancellationToken) {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(relay_transport::saved::saver(
            path,
            rx,
            cache::save::<ServiceObjects>,
            <ServiceObjects as cache::Cached>::WHAT,
            stop.clone(),
        ));
        let tx = Arc::new(tx);
        let (w1, w2) = (Arc::downgrade(self), Arc::downgrade(&tx));
        tokio::spawn(cache::restamp(
            move || w1.upgrade().map(|me| me.dir.watch_errors()),
            move || {
                if let Some(tx) = w2.upgrade() {
                    // Only objects from the API (none yet: nothing).
                    if tx.borrow().is_some() {
                        tx.send_modify(|_| {});
                    }
                }
            },
            stop.clone(),
        ));
        let weak = Arc::downgrade(self);
        let mut changes = self.dir.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let objects = {
                    let Some(me) = weak.upgrade() else { return };
                    if !me.dir.is_synced() {
                        continue;
                    }
                    me.dir.objects()
                };
                tx.send_replace(Some(Arc::new(objects)));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(cache::SERVICES_EVERY) => {}
                }
            }
        });
    }
}

impl ServiceSource for KubeServices {
    fn snapshot(&self) -> Arc<ServiceSnapshot> {
        self.snapshot.borrow().clone()
    }
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSnapshot>> {
        self.snapshot.subscribe()
    }
    fn by_name(&self, host: &str, port: u16) -> NameLookup {
        self.dir.with_table(|t| lookup_name(t, host, port))
    }
    fn is_synced(&self) -> bool {
        // A cached table that has aged past its limit while a first list
        // never came (one watch failing for good) is no longer trusted.
        self.published.load(std::sync::atomic::Ordering::Acquire)
            && !crate::directory::cache_too_old(self.cached_since())
    }
    fn last_error(&self) -> Option<String> {
        self.dir.last_error()
    }
    fn watch_errors(&self) -> u64 {
        self.dir.watch_errors()
    }
    fn cached_since(&self) -> Option<std::time::SystemTime> {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_kube::services::{Endpoint, ServiceEntry, ServicePort as KPort};

    fn ep(ip: &str, port: u16, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            node: Some(node.into()),
            ready,
            serving: ready,
            terminating: false,
            hostname: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn entry(name: &str, kind: ServiceKind, ports: Vec<KPort>) -> ServiceEntry {
        ServiceEntry {
            namespace: "shop".into(),
            name: name.into(),
            kind,
            ports,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            lb_source_ranges: Vec::new(),
            portless_endpoints: Vec::new(),
            internal_local: false,
            client_ip_affinity: false,
            external_local: false,
            other_proxy: false,
        }
    }

    fn port(port: u16, protocol: Protocol, eps: Vec<Endpoint>) -> KPort {
        KPort {
            name: "p".into(),
            port,
            protocol,
            target_port: None,
            all_endpoints: eps,
            node_port: None,
        }
    }

    fn table() -> ServiceTable {
        let mut t = ServiceTable::new("cluster.local");
        let vip = "10.96.0.20".parse().unwrap();
        t.set(
            "shop",
            "web",
            Some(entry(
                "web",
                ServiceKind::ClusterIp(vec![vip]),
                vec![
                    port(
                        80,
                        Protocol::Tcp,
                        vec![
                            ep("10.244.7.5", 8080, "edge1", true),
                            ep("10.244.8.5", 8080, "edge2", false),
                        ],
                    ),
                    port(53, Protocol::Udp, vec![ep("10.244.7.5", 53, "edge1", true)]),
                    port(9, Protocol::Sctp, vec![ep("10.244.7.5", 9, "edge1", true)]),
                ],
            )),
        );
        t.set(
            "shop",
            "db",
            Some(entry(
                "db",
                ServiceKind::Headless,
                vec![port(
                    5432,
                    Protocol::Tcp,
                    vec![ep("10.244.8.7", 5432, "edge2", true)],
                )],
            )),
        );
        let mut peers = entry("peers", ServiceKind::Headless, vec![]);
        peers.portless_endpoints = vec![
            ep("10.244.7.8", 0, "edge1", true),
            ep("10.244.8.8", 0, "edge2", false),
        ];
        t.set("shop", "peers", Some(peers));
        t.set(
            "shop",
            "ext",
            Some(entry(
                "ext",
                ServiceKind::ExternalName("db.example.com".into()),
                vec![port(443, Protocol::Tcp, vec![])],
            )),
        );
        t
    }

    #[test]
    fn snapshot_lists_tcp_and_udp_cluster_ip_ports_with_usable_endpoints() {
        let s = snapshot_of(&table());
        let keys: Vec<String> = s
            .ports
            .keys()
            .map(|k| format!("{}/{}", k.vip, if k.udp { "udp" } else { "tcp" }))
            .collect();
        assert_eq!(
            keys,
            ["10.96.0.20:53/udp", "10.96.0.20:80/tcp"],
            "no SCTP, no headless"
        );
        let web = &s.ports[&ServiceKey {
            vip: "10.96.0.20:80".parse().unwrap(),
            udp: false,
        }];
        assert_eq!(web.len(), 1, "the not-ready endpoint is left out");
        assert_eq!(web[0].addr, "10.244.7.5:8080".parse().unwrap());
        assert_eq!(web[0].node.as_deref(), Some("edge1"));
    }

    /// The snapshot's per-port sets from the Service's fields: external
    /// IPs open to any source unless `externalTrafficPolicy: Local`, which
    /// makes its node ports node-local; `internalTrafficPolicy: Local` on
    /// ClusterIPs only; affinity on all.
    #[test]
    fn service_fields_sort_ports_into_the_snapshots_sets() {
        let key = |a: &str| ServiceKey {
            vip: a.parse().unwrap(),
            udp: false,
        };
        let with = |name: &str, vip: &str, ext: &str, f: &dyn Fn(&mut ServiceEntry)| {
            let mut e = entry(
                name,
                ServiceKind::ClusterIp(vec![vip.parse().unwrap()]),
                vec![port(
                    80,
                    Protocol::Tcp,
                    vec![ep("10.244.7.5", 8080, "edge1", true)],
                )],
            );
            e.external_ips = vec![ext.parse().unwrap()];
            f(&mut e);
            e
        };
        let mut t = ServiceTable::new("cluster.local");
        t.set(
            "shop",
            "open",
            Some(with("open", "10.96.0.1", "203.0.113.1", &|_| {})),
        );
        t.set(
            "shop",
            "etp",
            Some(with("etp", "10.96.0.2", "203.0.113.2", &|e| {
                e.external_local = true;
                e.ports[0].node_port = Some(30002);
            })),
        );
        t.set(
            "shop",
            "itp",
            Some(with("itp", "10.96.0.3", "203.0.113.3", &|e| {
                e.internal_local = true;
                e.client_ip_affinity = true;
            })),
        );
        t.set(
            "shop",
            "mesh",
            Some(with("mesh", "10.96.0.4", "203.0.113.4", &|e| {
                e.other_proxy = true
            })),
        );
        let s = snapshot_of(&t);
        assert!(
            !s.ports
                .keys()
                .any(|k| k.vip.ip().to_string().ends_with(".4")),
            "another proxy's Service is left alone"
        );
        for host in ["mesh.shop", "itp.shop"] {
            assert!(
                matches!(lookup_name(&t, host, 80), NameLookup::Refused(_)),
                "CONNECT {host}:80 is not ours to resolve"
            );
        }
        assert!(
            s.ports.contains_key(&key("203.0.113.2:80")),
            "captured from the cluster"
        );
        assert_eq!(
            s.external.iter().copied().collect::<Vec<_>>(),
            [key("203.0.113.1:80"), key("203.0.113.3:80")]
        );
        assert_eq!(
            s.node_local.iter().copied().collect::<Vec<_>>(),
            [ServiceKey::node_port(30002, false), key("10.96.0.3:80")],
            "ITP Local ClusterIPs and ETP Local node ports"
        );
        assert!(
            crate::services::relay_node_port_set(&s, |_| true, (None, None)).is_empty(),
            "the relay node leaves an ETP Local node port to its kube-proxy"
        );
        assert_eq!(
            s.sticky.iter().copied().collect::<Vec<_>>(),
            [key("10.96.0.3:80"), key("203.0.113.3:80")]
        );
    }

    #[test]
    fn names_resolve_to_endpoints_or_say_why_not() {
        let t = table();
        let backends = |host: &str, port: u16| match lookup_name(&t, host, port) {
            NameLookup::Backends(b) => b.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
            other => panic!("{host}:{port}: {other:?}"),
        };
        for host in [
            "web.shop",
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local.",
        ] {
            assert_eq!(backends(host, 80), ["10.244.7.5:8080"], "{host}");
        }
        assert_eq!(
            backends("db.shop.svc", 5432),
            ["10.244.8.7:5432"],
            "headless: its endpoints"
        );
        assert_eq!(
            backends("peers.shop", 7000),
            ["10.244.7.8:7000"],
            "headless without ports: its usable endpoints on the port asked"
        );
        let refused = |host: &str, port: u16| match lookup_name(&t, host, port) {
            NameLookup::Refused(m) => m,
            other => panic!("{host}:{port}: {other:?}"),
        };
        assert!(refused("web.shop", 81).contains("no TCP port 81"));
        assert!(
            refused("web.shop", 53).contains("no TCP port 53"),
            "UDP port over CONNECT"
        );
        assert!(refused("ext.shop", 443).contains("ExternalName for db.example.com"));
        assert_eq!(lookup_name(&t, "edge1", 10250), NameLookup::NotAService);
        assert_eq!(lookup_name(&t, "web.other", 80), NameLookup::NotAService);
    }
}
