//! ServiceDirectory against `relay-kube-standin`, a kube-apiserver
//! stand-in (real HTTPS, real list/watch framing), not a real apiserver.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{count, setup, wait_until, BOUND};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use relay_kube::services::SERVICE_NAME_LABEL;
use relay_kube::{DirectoryOptions, Protocol, ServiceDirectory, ServiceDirectoryOptions};

fn service(name: &str, cluster_ip: &str, port: i32, proto: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("main".into()),
                port,
                protocol: Some(proto.into()),
                target_port: Some(IntOrString::String("main".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(
    name: &str,
    svc: &str,
    port: i32,
    proto: &str,
    eps: &[(&str, &str, Option<bool>)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("main".into()),
            port: Some(port),
            protocol: Some(proto.into()),
            ..Default::default()
        }]),
        endpoints: eps
            .iter()
            .map(|(ip, node, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                node_name: Some(node.to_string()),
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn endpoints(dir: &ServiceDirectory, vip: &str, p: Protocol) -> Option<Vec<SocketAddr>> {
    dir.with_table(|t| {
        t.lookup(sa(vip), p)
            .map(|e| e.endpoints.iter().map(|e| e.addr()).collect())
    })
}

/// Against the stand-in, not a real apiserver: add, change, delete, and a
/// 503 outage during which the last table keeps serving.
#[tokio::test]
async fn follows_services_and_slices_and_keeps_the_table_through_outages() {
    let (standin, client) = setup().await;
    standin.upsert_service(service("web", "10.96.0.20", 80, "TCP"));
    standin.upsert_endpointslice(slice(
        "web-1",
        "web",
        8080,
        "TCP",
        &[("10.244.7.5", "edge1", None)],
    ));
    let dir = ServiceDirectory::spawn(&client, &ServiceDirectoryOptions::default());
    dir.wait_synced(BOUND).await.expect("synced");
    assert_eq!(
        endpoints(&dir, "10.96.0.20:80", Protocol::Tcp),
        Some(vec![sa("10.244.7.5:8080")])
    );
    assert!(dir.with_table(|t| t.resolve("web.shop.svc.cluster.local").is_some()));

    // A UDP Service arrives before its slice: an entry with no endpoints,
    // then the endpoints.
    standin.upsert_service(service("dns", "10.96.0.10", 53, "UDP"));
    wait_until("dns entry", BOUND, || {
        endpoints(&dir, "10.96.0.10:53", Protocol::Udp) == Some(vec![])
    })
    .await;
    standin.upsert_endpointslice(slice(
        "dns-1",
        "dns",
        5353,
        "UDP",
        &[
            ("10.244.8.5", "edge2", Some(true)),
            ("10.244.8.6", "edge2", Some(false)),
        ],
    ));
    wait_until("dns endpoints", BOUND, || {
        endpoints(&dir, "10.96.0.10:53", Protocol::Udp) == Some(vec![sa("10.244.8.5:5353")])
    })
    .await;
    // Unknown nodes: kept, counted.
    dir.set_known_nodes(Some(["edge1".to_string()].into()));
    assert!(dir.unknown_node_endpoints() >= 2);
    assert_eq!(
        endpoints(&dir, "10.96.0.10:53", Protocol::Udp),
        Some(vec![sa("10.244.8.5:5353")])
    );

    // The API goes away: the last known table keeps serving.
    standin.set_unavailable(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(dir.watch_errors() >= 1, "the outage was noticed");
    assert_eq!(
        endpoints(&dir, "10.96.0.20:80", Protocol::Tcp),
        Some(vec![sa("10.244.7.5:8080")])
    );
    standin.set_unavailable(false);
    // Changes made while it was away arrive after the relist.
    assert!(standin.delete_endpointslice("shop", "web-1"));
    assert!(standin.delete_service("shop", "dns"));
    wait_until("changes after the outage", BOUND, || {
        endpoints(&dir, "10.96.0.20:80", Protocol::Tcp) == Some(vec![])
            && endpoints(&dir, "10.96.0.10:53", Protocol::Udp).is_none()
    })
    .await;
    assert_eq!(dir.object_counts(), (1, 1));
    assert!(count(&standin, "list services") >= 1);
    assert!(count(&standin, "list endpointslices") >= 1);
}

/// 10,000 EndpointSlice updates in a burst (100 slices rewritten 100 times,
/// plus churn of short-lived slices): the directory ends with exactly the
/// live objects and the last version of each, however many watch events
/// it lost to the stand-in's bounded history (it relists then). Runs
/// against the stand-in, not a real apiserver.
#[tokio::test]
async fn a_burst_of_ten_thousand_slice_updates_stays_bounded() {
    let (standin, client) = setup().await;
    for i in 0..100 {
        standin.upsert_service(service(
            &format!("s{i}"),
            &format!("10.96.1.{i}"),
            80,
            "TCP",
        ));
    }
    let dir = ServiceDirectory::spawn(
        &client,
        &ServiceDirectoryOptions {
            watch: DirectoryOptions {
                watch_timeout_secs: 290,
            },
            ..Default::default()
        },
    );
    dir.wait_synced(BOUND).await.expect("synced");
    let t = Instant::now();
    let mut updates = 0;
    for round in 0..100u32 {
        for i in 0..100u32 {
            let ready = round % 2 == 1; // the last round (99) is ready
            let ip = format!("10.244.{}.{}", 7 + i % 2, 10 + round % 200);
            standin.upsert_endpointslice(slice(
                &format!("s{i}-a"),
                &format!("s{i}"),
                8080,
                "TCP",
                &[
                    (&ip, "edge1", Some(ready)),
                    ("10.244.9.9", "edge2", Some(true)),
                ],
            ));
            updates += 1;
        }
        // Churn: a slice that lives for one round.
        if round > 0 {
            standin.delete_endpointslice("shop", &format!("tmp-{}", round - 1));
        }
        standin.upsert_endpointslice(slice(&format!("tmp-{round}"), "s0", 8080, "TCP", &[]));
        tokio::task::yield_now().await;
    }
    standin.delete_endpointslice("shop", "tmp-99");
    assert!(updates >= 10_000);
    let expected_last = "10.244.8.109:8080"; // round 99, s1 → 10.244.(7+1).(10+99)
    wait_until("the burst has settled", Duration::from_secs(60), || {
        dir.object_counts() == (100, 100)
            && endpoints(&dir, "10.96.1.1:80", Protocol::Tcp)
                .is_some_and(|e| e.contains(&sa(expected_last)) && e.len() == 2)
    })
    .await;
    let size = dir.with_table(|t| (t.services_len(), t.cluster_ip_len()));
    assert_eq!(size, (100, 100), "table size equals the live objects");
    assert_eq!(standin.service_counts(), (100, 100));
    let relists = count(&standin, "list endpointslices");
    eprintln!(
        "burst of {updates} slice updates settled in {:?} (loose, not asserted); \
         endpointslice lists: {relists}, watch errors: {}",
        t.elapsed(),
        dir.watch_errors()
    );
    let edges: BTreeSet<String> = ["edge2".to_string()].into();
    assert_eq!(
        dir.with_table(|t| t.ports_with_endpoints_on(&edges)).len(),
        100
    );
}
