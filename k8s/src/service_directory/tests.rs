use super::*;
use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn service(i: u32) -> Service {
    let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    Service {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(format!("svc-{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Objects kept for a cache (trimmed, through JSON) rebuild the same
/// table in a directory seeded with them; what the table does not
/// read (annotations) is not kept.
#[test]
fn objects_kept_for_a_cache_rebuild_the_same_table() {
    use crate::services::tests::{slice, svc};
    use crate::services::Protocol;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let inner = Arc::new(Inner::new("cluster.local"));
    let mut web = svc(
        "web",
        &["10.96.0.10"],
        &[("http", 80, "TCP", IntOrString::Int(8080))],
    );
    web.metadata.annotations = Some(
        [(
            "kubectl.kubernetes.io/last-applied-configuration".to_string(),
            "x".repeat(1_000),
        )]
        .into(),
    );
    let eps = [("10.244.7.5", "edge-1", Some(true), None, None)];
    let slices = vec![slice(
        "web-1",
        "web",
        "IPv4",
        &[("http", 8080, "TCP")],
        &eps,
    )];
    inner.relisted_services(vec![web]);
    inner.relisted_slices(slices);
    let dir = ServiceDirectory {
        inner,
        tasks: Vec::new(),
    };
    let json = serde_json::to_string(&dir.objects()).unwrap();
    assert!(!json.contains("last-applied"), "{json}");
    let back: ServiceObjects = serde_json::from_str(&json).unwrap();
    assert_eq!(back, dir.objects());
    let seeded = Inner::new("cluster.local");
    seeded.relisted_services(back.services);
    seeded.relisted_slices(back.slices);
    let vip = "10.96.0.10:80".parse().unwrap();
    let entry = seeded
        .table
        .read()
        .unwrap()
        .lookup(vip, Protocol::Tcp)
        .cloned();
    assert_eq!(entry.as_ref(), dir.table().lookup(vip, Protocol::Tcp));
    let endpoints: Vec<_> = entry.unwrap().endpoints.iter().map(|e| e.addr()).collect();
    assert_eq!(endpoints, ["10.244.7.5:8080".parse().unwrap()]);
}

/// Services and slices are held trimmed (no annotations, only the
/// labels read, no endpoint `targetRef`), and the entries built from
/// them are those of the whole objects, through single changes and
/// relists alike.
#[test]
fn objects_are_held_trimmed_and_build_the_same_entries() {
    use crate::services::tests::{slice, svc};
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut web = svc(
        "web",
        &["10.96.0.10"],
        &[("http", 80, "TCP", IntOrString::Int(8080))],
    );
    let mut mesh = svc(
        "mesh",
        &["10.96.0.11"],
        &[("http", 80, "TCP", IntOrString::Int(8080))],
    );
    let big = [(
        "kubectl.kubernetes.io/last-applied-configuration".to_string(),
        "x".repeat(4_000),
    )];
    for (s, proxy) in [(&mut web, None), (&mut mesh, Some("mesh"))] {
        s.metadata.annotations = Some(big.clone().into());
        let l = s.metadata.labels.get_or_insert_with(Default::default);
        l.insert("app.kubernetes.io/name".into(), "shop".into());
        l.extend(proxy.map(|p| (SERVICE_PROXY_NAME_LABEL.to_string(), p.to_string())));
        s.metadata.uid = Some("uid-1".into());
    }
    let eps = [("10.244.7.5", "edge-1", Some(true), None, None)];
    let mut slices = vec![
        slice("web-1", "web", "IPv4", &[("http", 8080, "TCP")], &eps),
        slice("mesh-1", "mesh", "IPv4", &[("http", 8080, "TCP")], &eps),
    ];
    for sl in &mut slices {
        sl.metadata.annotations = Some(big.clone().into());
        let l = sl.metadata.labels.get_or_insert_with(Default::default);
        l.insert("app.kubernetes.io/name".into(), "shop".into());
        l.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            "endpointslice-controller.k8s.io".into(),
        );
        for e in &mut sl.endpoints {
            e.target_ref = Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some("web-7d9f8c6b5-x2x9q".into()),
                namespace: Some("shop".into()),
                uid: Some("0b6c3a0e-6f1a-4b53-9a43-8d8f0d4a1c11".into()),
                ..Default::default()
            });
        }
    }
    let whole_entry = |name: &str| {
        let s = [&web, &mesh]
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap();
        let mine = slices
            .iter()
            .filter(|sl| owner_of(sl).is_some_and(|o| o.1 == name));
        service_entry(s, mine, None).0
    };
    let check = |dir: &ServiceDirectory| {
        let o = dir.objects();
        assert_eq!((o.services.len(), o.slices.len()), (2, 2));
        for s in &o.services {
            assert!(
                s.metadata.annotations.is_none(),
                "a Service's annotations held"
            );
            assert_eq!(s.metadata.uid, None);
            let labels: Vec<&String> = s.metadata.labels.iter().flatten().map(|(k, _)| k).collect();
            assert!(
                labels.iter().all(|k| *k == SERVICE_PROXY_NAME_LABEL),
                "{labels:?}"
            );
        }
        for sl in &o.slices {
            assert!(
                sl.metadata.annotations.is_none(),
                "a slice's annotations held"
            );
            let labels: Vec<&String> = sl
                .metadata
                .labels
                .iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(labels, [SERVICE_NAME_LABEL]);
            assert!(sl.endpoints.iter().all(|e| e.target_ref.is_none()));
        }
        for name in ["web", "mesh"] {
            let held = o
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .unwrap();
            let mine = o
                .slices
                .iter()
                .filter(|sl| owner_of(sl).is_some_and(|k| k.1 == name));
            assert_eq!(
                service_entry(held, mine, None).0,
                whole_entry(name),
                "{name}"
            );
        }
        assert!(whole_entry("mesh").other_proxy && !whole_entry("web").other_proxy);
    };
    let relisted = ServiceDirectory {
        inner: Arc::new(Inner::new("cluster.local")),
        tasks: Vec::new(),
    };
    relisted
        .inner
        .relisted_services(vec![web.clone(), mesh.clone()]);
    relisted.inner.relisted_slices(slices.clone());
    check(&relisted);
    let applied = ServiceDirectory {
        inner: Arc::new(Inner::new("cluster.local")),
        tasks: Vec::new(),
    };
    for s in [&web, &mesh] {
        applied.inner.apply_service(s.clone());
    }
    for sl in &slices {
        applied.inner.apply_slice(sl.clone());
    }
    check(&applied);
    for vip in ["10.96.0.10:80", "10.96.0.11:80"] {
        let vip = vip.parse().unwrap();
        let tcp = crate::services::Protocol::Tcp;
        let entry = applied.table().lookup(vip, tcp).cloned();
        assert!(entry.is_some());
        assert_eq!(entry.as_ref(), relisted.table().lookup(vip, tcp));
    }
}

/// A relist rebuilds the table aside: a reader looping beside it never
/// sees fewer Services than there are (it saw an empty table when the
/// table was emptied and refilled in place).
#[test]
fn a_relist_never_shows_a_half_built_table() {
    const N: usize = 2_000;
    let inner = Arc::new(Inner::new("cluster.local"));
    inner.relisted_services((0..N as u32).map(service).collect());
    assert_eq!(inner.table.read().unwrap().services_len(), N);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (inner, stop) = (inner.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut min, mut reads) = (usize::MAX, 0u64);
            while !stop.load(Ordering::Relaxed) {
                min = min.min(inner.table.read().unwrap().services_len());
                reads += 1;
            }
            (min, reads)
        })
    };
    for _ in 0..20 {
        inner.relisted_slices(Vec::new());
    }
    stop.store(true, Ordering::Relaxed);
    let (min, reads) = reader.join().unwrap();
    assert!(reads > 0);
    assert_eq!(min, N, "a reader saw {min} of {N} Services during a relist");
}

/// A Service is held with the two labels kube-proxy's watches exclude
/// (the table reads both) and none other; a slice with its Service's name.
#[test]
fn trimming_keeps_the_labels_the_table_reads() {
    let mut s = service(1);
    s.metadata.labels = Some(
        [
            (SERVICE_PROXY_NAME_LABEL, "mesh"),
            (HEADLESS_LABEL, ""),
            ("app.kubernetes.io/name", "shop"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into(),
    );
    trim_service(&mut s);
    let kept: Vec<String> = s.metadata.labels.unwrap().into_keys().collect();
    assert_eq!(kept, [HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL]);
    let mut bare = service(2);
    trim_service(&mut bare);
    assert_eq!(bare.metadata.labels, None, "no empty map for no label");
}
