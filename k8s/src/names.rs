//! Service names for edge resolvers: the pure step from a
//! [`ServiceTable`] to what [`relay_protocol::Control::ServiceNames`]
//! carries. The per-edge diff ([`relay_protocol::NamesFeed`],
//! [`relay_protocol::names_delta`]) lives in the protocol crate, so the
//! relay's session code uses it without this crate.
//!
//! What goes in follows what the cluster DNS (CoreDNS's `kubernetes`
//! plugin) answers from:
//! - ClusterIP Services: their ClusterIPs (one per family) and ports;
//! - headless Services: their ports and their **ready** endpoints (an
//!   EndpointSlice marks not-ready pods ready itself when the Service sets
//!   `publishNotReadyAddresses`), each with its `hostname` and the target
//!   port it serves for each Service port, at most
//!   [`ServiceName::MAX_ENDPOINTS`] (lowest addresses first, so the cut is
//!   stable); a headless Service without ports has its endpoints all the
//!   same, with no port (its names answer with their addresses and no SRV
//!   record, as CoreDNS does);
//! - ExternalName Services: their target.
//!
//! A Service whose names do not fit DNS (see [`ServiceName::is_valid`]) is
//! left out: no resolver could answer for it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use relay_protocol::{
    NameEndpoint, NameKind, NamePort, NameProtocol, NameTable, ServiceName, ServiceNameKey,
};

use crate::services::{Protocol, ServiceEntry, ServiceKind, ServiceTable};

/// The names of every Service in `table` (pure).
pub fn service_names(table: &ServiceTable) -> NameTable {
    table
        .services()
        .filter_map(name_entry)
        .map(|s| (s.key.clone(), s))
        .collect()
}

/// One Service's names, or `None` when they do not fit DNS.
pub fn name_entry(e: &ServiceEntry) -> Option<ServiceName> {
    let kind = match &e.kind {
        ServiceKind::ClusterIp(ips) => NameKind::ClusterIp(ips.clone()),
        ServiceKind::Headless => NameKind::Headless,
        ServiceKind::ExternalName(t) => NameKind::ExternalName(t.clone()),
    };
    let ports: Vec<NamePort> = e
        .ports
        .iter()
        .map(|p| NamePort {
            name: p.name.clone(),
            port: p.port,
            protocol: match p.protocol {
                Protocol::Tcp => NameProtocol::Tcp,
                Protocol::Udp => NameProtocol::Udp,
                Protocol::Sctp => NameProtocol::Sctp,
            },
        })
        .collect();
    let mut endpoints = Vec::new();
    if e.kind == ServiceKind::Headless {
        // One endpoint per address, whatever ports it serves: the DNS name
        // is per pod, the SRV port per (pod, Service port).
        let mut by_ip: BTreeMap<IpAddr, NameEndpoint> = BTreeMap::new();
        for (i, p) in e.ports.iter().enumerate().take(ServiceName::MAX_PORTS) {
            for ep in p.all_endpoints.iter().filter(|ep| ep.ready) {
                let n = by_ip.entry(ep.ip).or_insert_with(|| NameEndpoint {
                    ip: ep.ip,
                    hostname: None,
                    ports: vec![0; ports.len().min(ServiceName::MAX_PORTS)],
                });
                n.ports[i] = ep.port;
                if n.hostname.is_none() {
                    n.hostname = ep.hostname.clone();
                }
            }
        }
        // Without ports (`portless_endpoints`), A records only.
        for ep in e.portless_endpoints.iter().filter(|ep| ep.ready) {
            by_ip.entry(ep.ip).or_insert_with(|| NameEndpoint {
                ip: ep.ip,
                hostname: ep.hostname.clone(),
                ports: Vec::new(),
            });
        }
        endpoints = by_ip.into_values().collect();
    }
    let mut s = ServiceName {
        key: ServiceNameKey {
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        },
        kind,
        ports,
        endpoints,
    };
    s.clamp();
    s.is_valid().then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Endpoint, ServicePort};
    use relay_protocol::names_delta;

    fn ep(ip: &str, port: u16, ready: bool, hostname: Option<&str>) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            node: Some("edge-1".into()),
            ready,
            serving: ready,
            terminating: false,
            hostname: hostname.map(String::from),
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn entry(
        name: &str,
        kind: ServiceKind,
        ports: Vec<(&str, u16, Vec<Endpoint>)>,
    ) -> ServiceEntry {
        ServiceEntry {
            namespace: "shop".into(),
            name: name.into(),
            kind,
            ports: ports
                .into_iter()
                .map(|(n, port, eps)| ServicePort {
                    name: n.into(),
                    port,
                    protocol: Protocol::Tcp,
                    target_port: None,
                    all_endpoints: eps,
                    node_port: None,
                })
                .collect(),
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

    fn table(entries: Vec<ServiceEntry>) -> ServiceTable {
        let mut t = ServiceTable::new("cluster.local");
        for e in entries {
            let (ns, n) = (e.namespace.clone(), e.name.clone());
            t.set(&ns, &n, Some(e));
        }
        t
    }

    #[test]
    fn each_kind_becomes_its_names() {
        let t = table(vec![
            entry(
                "web",
                ServiceKind::ClusterIp(vec![
                    "10.96.0.20".parse().unwrap(),
                    "fd00::20".parse().unwrap(),
                ]),
                vec![("http", 80, vec![ep("10.244.7.5", 8080, true, None)])],
            ),
            entry(
                "db",
                ServiceKind::Headless,
                vec![
                    (
                        "pg",
                        5432,
                        vec![
                            ep("10.244.7.6", 5433, true, Some("db-1")),
                            ep("10.244.7.5", 5432, true, Some("db-0")),
                            ep("10.244.7.9", 5432, false, Some("db-2")),
                        ],
                    ),
                    (
                        "metrics",
                        9187,
                        vec![ep("10.244.7.5", 9000, true, Some("db-0"))],
                    ),
                ],
            ),
            entry(
                "ext",
                ServiceKind::ExternalName("db.example.com".into()),
                vec![],
            ),
        ]);
        let names = service_names(&t);
        assert_eq!(names.len(), 3);
        let key = |n: &str| ServiceNameKey {
            namespace: "shop".into(),
            name: n.into(),
        };
        let web = &names[&key("web")];
        assert_eq!(
            web.kind,
            NameKind::ClusterIp(vec![
                "10.96.0.20".parse().unwrap(),
                "fd00::20".parse().unwrap()
            ])
        );
        assert!(
            web.endpoints.is_empty(),
            "ClusterIP names never list endpoints"
        );
        assert_eq!(
            web.ports,
            vec![NamePort {
                name: "http".into(),
                port: 80,
                protocol: NameProtocol::Tcp
            }]
        );
        let db = &names[&key("db")];
        // Ready ones only, one per address, ports per Service port.
        assert_eq!(
            db.endpoints,
            vec![
                NameEndpoint {
                    ip: "10.244.7.5".parse().unwrap(),
                    hostname: Some("db-0".into()),
                    ports: vec![5432, 9000]
                },
                NameEndpoint {
                    ip: "10.244.7.6".parse().unwrap(),
                    hostname: Some("db-1".into()),
                    ports: vec![5433, 0]
                },
            ]
        );
        assert_eq!(
            names[&key("ext")].kind,
            NameKind::ExternalName("db.example.com".into())
        );
    }

    #[test]
    fn names_that_do_not_fit_dns_are_left_out_and_big_ones_cut() {
        let long = "x".repeat(64);
        let many: Vec<Endpoint> = (0..300u32)
            .map(|i| ep(&format!("10.1.{}.{}", i / 256, i % 256), 80, true, None))
            .collect();
        let t = table(vec![
            entry(&long, ServiceKind::Headless, vec![]),
            entry("bad-ext", ServiceKind::ExternalName("a..b".into()), vec![]),
            entry("big", ServiceKind::Headless, vec![("", 80, many)]),
        ]);
        let names = service_names(&t);
        assert_eq!(names.len(), 1, "{names:?}");
        let big = names.values().next().unwrap();
        assert_eq!(big.endpoints.len(), ServiceName::MAX_ENDPOINTS);
        // The lowest addresses are kept, so the cut is the same every time.
        assert_eq!(big.endpoints[0].ip, "10.1.0.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_delta_takes_one_table_to_the_next() {
        let a = service_names(&table(vec![
            entry(
                "web",
                ServiceKind::ClusterIp(vec!["10.96.0.20".parse().unwrap()]),
                vec![("http", 80, vec![])],
            ),
            entry("gone", ServiceKind::Headless, vec![]),
            entry("same", ServiceKind::Headless, vec![]),
        ]));
        let b = service_names(&table(vec![
            entry(
                "web",
                ServiceKind::ClusterIp(vec!["10.96.0.21".parse().unwrap()]),
                vec![("http", 80, vec![])],
            ),
            entry("new", ServiceKind::Headless, vec![]),
            entry("same", ServiceKind::Headless, vec![]),
        ]));
        let (upsert, remove) = names_delta(&a, &b);
        let names: Vec<&str> = upsert.iter().map(|s| s.key.name.as_str()).collect();
        assert_eq!(names, ["new", "web"]);
        assert_eq!(
            remove.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["gone"]
        );
        // Applying it to `a` gives `b`.
        let mut applied = a.clone();
        for k in &remove {
            applied.remove(k);
        }
        for s in upsert {
            applied.insert(s.key.clone(), s);
        }
        assert_eq!(applied, b);
        assert_eq!(names_delta(&b, &b), (vec![], vec![]));
    }

    #[test]
    fn hostnames_come_from_the_endpoint_slice() {
        // The real object shapes: a StatefulSet's headless Service.
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        }))
        .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "shop", "name": "db-x",
                             "labels": {"kubernetes.io/service-name": "db"}},
                "addressType": "IPv4",
                "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.7.5"], "hostname": "db-0",
                               "conditions": {"ready": true}}]
            }))
            .unwrap();
        let (e, _) = crate::services::service_entry(&svc, [&slice], None);
        let n = name_entry(&e).unwrap();
        assert_eq!(n.endpoints[0].hostname.as_deref(), Some("db-0"));
        assert_eq!(n.endpoints[0].ports, vec![5432]);
    }

    #[test]
    fn a_headless_service_without_ports_has_its_ready_endpoints() {
        // As the EndpointSlice controller writes them for a headless
        // Service without ports: slices with an empty port list (or none).
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "peers"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
        }))
        .unwrap();
        let slice = |name: &str, family: &str, ports: serde_json::Value, eps: serde_json::Value| {
            let mut v = serde_json::json!({
                "metadata": {"namespace": "shop", "name": name,
                             "labels": {"kubernetes.io/service-name": "peers"}},
                "addressType": family,
                "endpoints": eps
            });
            if !ports.is_null() {
                v["ports"] = ports;
            }
            serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(v).unwrap()
        };
        let a = slice(
            "peers-a",
            "IPv4",
            serde_json::json!([]),
            serde_json::json!([
                {"addresses": ["10.244.7.5"], "hostname": "peers-0", "nodeName": "edge1",
                 "conditions": {"ready": true}},
                {"addresses": ["10.244.8.5"], "nodeName": "edge2",
                 "conditions": {"ready": false}}
            ]),
        );
        let b = slice(
            "peers-b",
            "IPv6",
            serde_json::Value::Null,
            serde_json::json!([{"addresses": ["fd00:244:8::6"], "nodeName": "edge2"}]),
        );
        let (e, notes) = crate::services::service_entry(&svc, [&a, &b], None);
        assert_eq!(notes, crate::services::BuildNotes::default());
        assert!(e.ports.is_empty());
        assert_eq!(
            e.portless_endpoints.len(),
            3,
            "not-ready ones kept in the table"
        );
        assert!(e.portless_endpoints.iter().all(|ep| ep.port == 0));
        let n = name_entry(&e).unwrap();
        assert_eq!(n.kind, NameKind::Headless);
        assert!(n.ports.is_empty());
        let got: Vec<(IpAddr, Option<&str>, usize)> = n
            .endpoints
            .iter()
            .map(|ep| (ep.ip, ep.hostname.as_deref(), ep.ports.len()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.244.7.5".parse().unwrap(), Some("peers-0"), 0),
                ("fd00:244:8::6".parse().unwrap(), None, 0),
            ],
            "the ready ones, both families, no ports"
        );
        // A Service with ports takes nothing from a slice without them.
        let mut with_port = svc.clone();
        with_port.spec.as_mut().unwrap().ports = Some(vec![Default::default()]);
        let (e, _) = crate::services::service_entry(&with_port, [&a, &b], None);
        assert!(e.portless_endpoints.is_empty());
        assert!(e.ports[0].all_endpoints.is_empty());
    }
}
