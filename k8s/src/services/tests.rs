//! Tests of the service table: port mapping by name, endpoint conditions,
//! headless, ExternalName and dual-stack Services, node ports and
//! external IPs.

use super::*;
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::core::v1::{ServicePort as K8sPort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub(crate) fn svc(name: &str, ips: &[&str], ports: &[(&str, i32, &str, IntOrString)]) -> Service {
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

pub(crate) type Ep<'a> = (&'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

pub(crate) fn slice(
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
    // Serving (explicitly, or by a missing `serving`, as kube-proxy reads
    // it), though no longer used for new connections: flows already bound
    // to them keep them (kube-proxy's conntrack cleanup spares them); the
    // one saying `serving: false` is listed nowhere.
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        e.serving,
        [ip("10.244.7.6"), ip("10.244.7.8"), ip("10.244.8.9")]
    );
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
            ingress: Some(vec![
                k8s_openapi::api::core::v1::LoadBalancerIngress {
                    ip: Some("198.51.100.9".into()),
                    ..Default::default()
                },
                // The load balancer proxies: its address is its own.
                k8s_openapi::api::core::v1::LoadBalancerIngress {
                    ip: Some("198.51.100.10".into()),
                    ip_mode: Some("Proxy".into()),
                    ..Default::default()
                },
            ]),
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
    assert!(
        t.lookup(sa("198.51.100.10:80"), Protocol::Tcp).is_none(),
        "ipMode Proxy"
    );
    let np = t.node_port(30080, Protocol::Tcp).expect("node port");
    assert_eq!(np.endpoints[0].addr(), sa("10.244.7.5:8080"));
    // `externalTrafficPolicy: Local`: the node port lists each node's own
    // endpoints (its ready ones, else its draining ones: edge2's only pod
    // is terminating, and still listed while edge1 has a ready one); the
    // ClusterIP and the external IPs stay (in-cluster sources reach every
    // endpoint), the entry says so.
    let mut local = s.clone();
    if let Some(spec) = local.spec.as_mut() {
        spec.external_traffic_policy = Some("Local".into());
    }
    let mut sl2 = sl.clone();
    sl2.endpoints.push(K8sEndpoint {
        addresses: vec!["10.244.8.5".into()],
        node_name: Some("edge2".into()),
        conditions: Some(EndpointConditions {
            ready: Some(false),
            serving: Some(true),
            terminating: Some(true),
        }),
        ..Default::default()
    });
    let (e, _) = service_entry(&local, [&sl2], None);
    t.set("shop", "web", Some(e));
    let np: Vec<SocketAddr> = t
        .node_port(30080, Protocol::Tcp)
        .expect("an externalTrafficPolicy Local node port")
        .endpoints
        .iter()
        .map(Endpoint::addr)
        .collect();
    assert_eq!(np, [sa("10.244.7.5:8080"), sa("10.244.8.5:8080")]);
    assert_eq!(
        t.lookup(sa("10.96.0.20:80"), Protocol::Tcp)
            .unwrap()
            .endpoints
            .len(),
        1,
        "the ClusterIP: the cluster's ready one"
    );
    for vip in ["203.0.113.7:80", "198.51.100.9:80"] {
        assert!(t.lookup(sa(vip), Protocol::Tcp).is_some(), "{vip}");
    }
    assert!(t.service("shop", "web").unwrap().external_local);
    assert!(t.lookup(sa("10.96.0.20:80"), Protocol::Tcp).is_some());
    assert!(!t.service("shop", "web").unwrap().internal_local);
    // `internalTrafficPolicy: Local` is noted on the entry (the relay
    // leaves its ClusterIPs to each node's own endpoints).
    let mut itp = s.clone();
    if let Some(spec) = itp.spec.as_mut() {
        spec.internal_traffic_policy = Some("Local".into());
    }
    let (e, _) = service_entry(&itp, [&sl], None);
    assert!(e.internal_local && !e.client_ip_affinity);
    if let Some(spec) = itp.spec.as_mut() {
        spec.session_affinity = Some("ClientIP".into());
    }
    assert!(service_entry(&itp, [&sl], None).0.client_ip_affinity);
    assert!(!service_entry(&itp, [&sl], None).0.other_proxy);
    itp.metadata.labels = Some(
        [(
            crate::services::SERVICE_PROXY_NAME_LABEL.to_string(),
            "mesh".to_string(),
        )]
        .into(),
    );
    assert!(service_entry(&itp, [&sl], None).0.other_proxy);
    t.set("shop", "web", None);
    assert_eq!(
        (t.cluster_ip_len(), t.node_ports().count()),
        (0, 0),
        "all gone with the Service"
    );
}

/// A missing `serving` means true (the v1 API's default), so a terminating
/// endpoint that says nothing more is drained to when none is ready; an
/// address two slices list keeps the copy that is not terminating (a new
/// pod given a terminating pod's address), in either order.
#[test]
fn missing_serving_means_true_and_the_running_copy_of_an_address_wins() {
    let s = svc(
        "api",
        &["10.96.0.31"],
        &[("", 443, "TCP", IntOrString::Int(8443))],
    );
    let port = [("", 8443, "TCP")];
    let draining = slice(
        "api-1",
        "api",
        "IPv4",
        &port,
        &[("10.244.7.6", "edge1", Some(false), None, Some(true))],
    );
    let (t, _) = table_of(std::slice::from_ref(&s), &[draining], None);
    let e = t.lookup(sa("10.96.0.31:443"), Protocol::Tcp).unwrap();
    assert_eq!(
        e.endpoints.iter().map(Endpoint::addr).collect::<Vec<_>>(),
        [sa("10.244.7.6:8443")],
        "terminating, serving unset: drained to"
    );
    let old = slice(
        "api-a",
        "api",
        "IPv4",
        &port,
        &[("10.244.7.9", "edge1", Some(false), Some(true), Some(true))],
    );
    let new = slice(
        "api-b",
        "api",
        "IPv4",
        &port,
        &[("10.244.7.9", "edge1", Some(true), Some(true), Some(false))],
    );
    for slices in [[old.clone(), new.clone()], [new, old]] {
        let (t, _) = table_of(std::slice::from_ref(&s), &slices, None);
        let e = t.lookup(sa("10.96.0.31:443"), Protocol::Tcp).unwrap();
        assert_eq!(e.endpoints.len(), 1);
        assert!(
            e.endpoints[0].ready && !e.endpoints[0].terminating,
            "the running pod's copy: {:?}",
            e.endpoints[0]
        );
    }
}

/// Two Services listing the same external IP and port: removing or
/// changing one leaves the address to the other, never to nobody.
#[test]
fn a_shared_external_ip_stays_with_the_service_still_listing_it() {
    let with_ext = |name: &str, ip: &str, target: i32| {
        let mut s = svc(
            name,
            &[ip],
            &[("http", 80, "TCP", IntOrString::Int(target))],
        );
        if let Some(spec) = s.spec.as_mut() {
            spec.external_ips = Some(vec!["203.0.113.7".into()]);
        }
        let sl = slice(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[("http", target, "TCP")],
            &[("10.244.7.5", "edge1", None, None, None)],
        );
        (s, sl)
    };
    let (a, a_sl) = with_ext("a", "10.96.0.41", 8081);
    let (b, b_sl) = with_ext("b", "10.96.0.42", 8082);
    let ext = sa("203.0.113.7:80");
    let owner = |t: &ServiceTable| t.lookup(ext, Protocol::Tcp).map(|e| e.name.clone());
    for (gone, stays) in [("a", "b"), ("b", "a")] {
        let (mut t, _) = table_of(&[a.clone(), b.clone()], &[a_sl.clone(), b_sl.clone()], None);
        t.set("shop", gone, None);
        assert_eq!(owner(&t).as_deref(), Some(stays), "{gone} removed");
        t.set("shop", stays, None);
        assert_eq!(owner(&t), None, "both removed");
    }
    // An update of the second Service leaves the address with the first.
    let (mut t, _) = table_of(&[a.clone(), b.clone()], &[a_sl.clone(), b_sl.clone()], None);
    let first = owner(&t);
    let (e, _) = service_entry(&b, [&b_sl], None);
    t.set("shop", "b", Some(e));
    let (e, _) = service_entry(&a, [&a_sl], None);
    t.set("shop", "a", Some(e));
    assert_eq!(owner(&t), first, "updates do not move it");
    // A change to one that no longer lists the address leaves it too.
    let (mut t, _) = table_of(&[a.clone(), b.clone()], &[a_sl.clone(), b_sl], None);
    let mut a2 = a;
    if let Some(spec) = a2.spec.as_mut() {
        spec.external_ips = None;
    }
    let (e, _) = service_entry(&a2, [&a_sl], None);
    t.set("shop", "a", Some(e));
    assert_eq!(owner(&t).as_deref(), Some("b"));
    assert!(t.lookup(sa("10.96.0.41:80"), Protocol::Tcp).is_some());
}

/// An `internalTrafficPolicy: Local` ClusterIP is served by each node's own
/// endpoints: a node whose only pod is terminating (still serving) drains
/// to it even while another node has a ready one; the cluster-wide rule
/// would have dropped it. The Service's external IP keeps the cluster-wide
/// choice (the policy applies to ClusterIPs only).
#[test]
fn node_local_ports_fall_back_to_draining_endpoints_node_by_node() {
    let mut s = svc(
        "dns",
        &["10.96.0.10"],
        &[("dns", 53, "UDP", IntOrString::Int(5353))],
    );
    if let Some(spec) = s.spec.as_mut() {
        spec.internal_traffic_policy = Some("Local".into());
        spec.external_ips = Some(vec!["203.0.113.53".into()]);
    }
    let sl = slice(
        "dns-1",
        "dns",
        "IPv4",
        &[("dns", 5353, "UDP")],
        &[
            ("10.244.7.5", "edge1", Some(false), Some(true), Some(true)),
            ("10.244.8.5", "edge2", Some(true), Some(true), Some(false)),
            ("10.244.8.6", "edge2", Some(false), Some(true), Some(true)),
        ],
    );
    let (t, _) = table_of(&[s], &[sl], None);
    let addrs = |vip: &str| -> Vec<SocketAddr> {
        t.lookup(sa(vip), Protocol::Udp)
            .unwrap()
            .endpoints
            .iter()
            .map(Endpoint::addr)
            .collect()
    };
    assert_eq!(
        addrs("10.96.0.10:53"),
        [sa("10.244.7.5:5353"), sa("10.244.8.5:5353")],
        "edge1 drains to its own; edge2 has a ready one"
    );
    assert_eq!(addrs("203.0.113.53:53"), [sa("10.244.8.5:5353")]);
}

/// `loadBalancerSourceRanges` restrict the load balancer's ingress IPs,
/// with ranges of their own family only; `spec.externalIPs` are not
/// restricted (kube-proxy applies no firewall there).
#[test]
fn source_ranges_apply_to_load_balancer_ips_only() {
    let mut s = svc(
        "web",
        &["10.96.0.20"],
        &[("http", 80, "TCP", IntOrString::Int(8080))],
    );
    if let Some(spec) = s.spec.as_mut() {
        spec.type_ = Some("LoadBalancer".into());
        spec.external_ips = Some(vec!["203.0.113.7".into()]);
        spec.load_balancer_source_ranges = Some(vec![
            "192.0.2.9/24".into(),
            " 10.1.0.0/16".into(),
            "2001:db8::/32".into(),
            "bogus".into(),
        ]);
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
    let (e, notes) = service_entry(&s, std::iter::empty(), None);
    assert_eq!(notes.skipped, 1, "the bad range");
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    assert_eq!(e.lb_ips, [ip("198.51.100.9")]);
    assert_eq!(e.external_ips, [ip("203.0.113.7"), ip("198.51.100.9")]);
    let ranges: Vec<String> = e
        .source_ranges_of(ip("198.51.100.9"))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, ["192.0.2.0/24", "10.1.0.0/16"], "host bits allowed");
    assert!(e.source_ranges_of(ip("203.0.113.7")).is_empty());
    assert!(e.source_ranges_of(ip("10.96.0.20")).is_empty());
    // A load balancer's address also listed in externalIPs: kube-proxy
    // matches it as an external IP first, from any source.
    if let Some(spec) = s.spec.as_mut() {
        spec.external_ips = Some(vec!["203.0.113.7".into(), "198.51.100.9".into()]);
    }
    let (e, _) = service_entry(&s, std::iter::empty(), None);
    assert!(e.source_ranges_of(ip("198.51.100.9")).is_empty());
}

/// Topology hints are read from each endpoint (zones and nodes), and an
/// endpoint without them has none.
#[test]
fn topology_hints_are_read_per_endpoint() {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
    let s = svc(
        "web",
        &["10.96.0.20"],
        &[("http", 80, "TCP", IntOrString::Int(8080))],
    );
    let mut sl = slice(
        "web-abc",
        "web",
        "IPv4",
        &[("http", 8080, "TCP")],
        &[
            ("10.244.7.5", "edge1", None, None, None),
            ("10.244.8.5", "edge2", None, None, None),
        ],
    );
    sl.endpoints[0].hints = Some(EndpointHints {
        for_zones: Some(vec![
            ForZone {
                name: "shop-a".into(),
            },
            ForZone {
                name: "shop-b".into(),
            },
        ]),
        for_nodes: Some(vec![ForNode {
            name: "edge1".into(),
        }]),
    });
    let (t, _) = table_of(&[s], &[sl], None);
    let e = t.lookup(sa("10.96.0.20:80"), Protocol::Tcp).unwrap();
    let hints: Vec<(&[String], &[String])> = e
        .endpoints
        .iter()
        .map(|e| (&e.zone_hints[..], &e.node_hints[..]))
        .collect();
    assert_eq!(
        hints,
        [
            (
                &["shop-a".to_string(), "shop-b".to_string()][..],
                &["edge1".to_string()][..]
            ),
            (&[][..], &[][..]),
        ]
    );
}

/// kube-proxy's watches leave out Services labelled
/// `service.kubernetes.io/service-proxy-name` or
/// `service.kubernetes.io/headless`: a ClusterIP Service carrying either
/// is left alone (`other_proxy`); a headless Service keeps its endpoints
/// for name lookups whatever it is labelled (DNS, not kube-proxy, serves
/// it).
#[test]
fn services_kube_proxy_does_not_watch_are_left_alone() {
    let labelled = |mut s: Service, k: &str| {
        s.metadata.labels = Some([(k.to_string(), String::new())].into());
        s
    };
    let port = [("http", 80, "TCP", IntOrString::Int(8080))];
    let dead = labelled(svc("dead", &["10.96.0.30"], &port), HEADLESS_LABEL);
    let mesh = labelled(
        svc("mesh", &["10.96.0.31"], &port),
        SERVICE_PROXY_NAME_LABEL,
    );
    let web = svc("web", &["10.96.0.32"], &port);
    let mut db = svc("db", &["None"], &port);
    if let Some(spec) = db.spec.as_mut() {
        spec.cluster_ips = Some(vec!["None".into()]);
    }
    let db = labelled(db, HEADLESS_LABEL);
    let left = |s: &Service| service_entry(s, std::iter::empty(), None).0.other_proxy;
    assert!(left(&dead), "a ClusterIP Service labelled headless");
    assert!(left(&mesh), "another proxy's");
    assert!(!left(&web));
    assert!(!left(&db), "a headless Service labelled headless");
}
