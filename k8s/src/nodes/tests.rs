use super::*;
use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

fn node(name: &str, cidrs: &[&str], addrs: &[(&str, &str)]) -> Node {
    Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

#[test]
fn claims_from_a_dual_stack_node() {
    let n = node(
        "edge-1",
        &["10.244.1.0/24", "fd00:10:244:1::/64"],
        &[
            ("InternalIP", "192.168.1.10"),
            ("InternalIP", "fd00::10"),
            ("ExternalIP", "203.0.113.7"),
            ("Hostname", "edge-1.shop.example"),
            ("InternalDNS", "ip-192-168-1-10.shop.internal"),
            ("ExternalDNS", "edge-1.shops.example.com"),
            ("InternalDNS", "ip-192-168-1-10.shop.internal"),
        ],
    );
    let (c, issues) = node_claims(&n);
    assert!(issues.is_empty());
    assert_eq!(c.pod_cidrs.len(), 2);
    assert_eq!(c.pod_cidrs[0].to_string(), "10.244.1.0/24");
    assert_eq!(c.internal_ips.len(), 2);
    assert_eq!(
        c.external_ips,
        vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(c.hostname.as_deref(), Some("edge-1.shop.example"));
    assert_eq!(
        c.dns_names,
        ["ip-192-168-1-10.shop.internal", "edge-1.shops.example.com"]
    );
    assert_eq!(c.zone, None, "no zone label");
    let mut zoned = n.clone();
    zoned.metadata.labels = Some([(ZONE_LABEL.to_string(), "shop-a".to_string())].into());
    assert_eq!(node_claims(&zoned).0.zone.as_deref(), Some("shop-a"));
}

#[test]
fn edges_are_told_by_their_label_or_the_relays_condition() {
    let plain = node("cloud-1", &["10.244.0.0/24"], &[("InternalIP", "10.0.0.2")]);
    assert!(!node_claims(&plain).0.edge, "no label, no condition: cloud");
    let mut labelled = plain.clone();
    labelled.metadata.labels = Some([(EDGE_ROLE_LABEL.to_string(), String::new())].into());
    assert!(node_claims(&labelled).0.edge);
    let mut other_label = plain.clone();
    other_label.metadata.labels = Some(
        [(
            "node-role.kubernetes.io/control-plane".to_string(),
            String::new(),
        )]
        .into(),
    );
    let (c, _) = node_claims(&other_label);
    assert!(!c.edge && c.control_plane);
    // Other edge tools' labels, by value.
    for (key, value, edge, cloud) in [
        ("openyurt.io/is-edge-worker", "true", true, false),
        ("openyurt.io/is-edge-worker", "false", false, true),
        ("superedge.io/node-edge", "enable", true, false),
        ("superedge.io/node-edge", "disable", false, false),
    ] {
        let mut n = plain.clone();
        n.metadata.labels = Some([(key.to_string(), value.to_string())].into());
        let (c, _) = node_claims(&n);
        assert_eq!((c.edge, c.cloud_label), (edge, cloud), "{key}={value}");
    }
    assert!(!node_claims(&labelled).0.control_plane);
    let mut connected_once = plain.clone();
    if let Some(st) = connected_once.status.as_mut() {
        st.conditions = Some(vec![k8s_openapi::api::core::v1::NodeCondition {
            type_: crate::CONDITION_TYPE.to_string(),
            status: "False".into(),
            ..Default::default()
        }]);
    }
    assert!(
        node_claims(&connected_once).0.edge,
        "our condition, even False"
    );
}

/// Only labels a kubelet cannot set on its own Node make a community
/// member; the old, self-settable prefix is reported and ignored.
#[test]
fn communities_come_only_from_labels_kubelets_cannot_set() {
    let mut n = node("edge-3", &["10.244.3.0/24"], &[]);
    n.metadata.labels = Some(
        [
            (format!("{COMMUNITY_LABEL_PREFIX}shops"), String::new()),
            (format!("{SELF_SET_COMMUNITY_PREFIX}depots"), String::new()),
        ]
        .into(),
    );
    let (c, issues) = node_claims(&n);
    assert_eq!(c.communities, ["shops".to_string()].into());
    assert_eq!(
        issues,
        [ClaimIssue::SelfSetCommunity {
            node: "edge-3".into(),
            label: format!("{SELF_SET_COMMUNITY_PREFIX}depots"),
        }]
    );
    assert!(issues[0].to_string().contains(COMMUNITY_LABEL_PREFIX));
}

#[test]
fn bad_entries_are_skipped_and_reported() {
    let n = node(
        "edge-2",
        &["10.244.2.0/24", "10.244.2.1/24", "banana", "10.0.0.1"],
        &[("InternalIP", "not-an-ip"), ("InternalIP", "10.0.0.2")],
    );
    let (c, issues) = node_claims(&n);
    assert_eq!(c.pod_cidrs.len(), 1);
    assert_eq!(c.internal_ips.len(), 1);
    assert_eq!(issues.len(), 4, "{issues:?}");
    assert!(matches!(issues[0], ClaimIssue::BadPodCidr { .. }));
    assert!(matches!(issues[3], ClaimIssue::BadAddress { .. }));
}

/// A Node as a kubelet reports it (the stand-in's: images, nodeInfo,
/// capacities, the kubelet's conditions, a few KB of annotations) with
/// `labels` added and the relay's condition saying `ours`.
fn real_node(name: &str, labels: &[(&str, &str)], ours: Option<&str>) -> Node {
    let mut n = relay_kube_standin::kubelet_node(
        name,
        &["10.244.4.0/24", "fd00:10:244:4::/64"],
        &[
            ("InternalIP", "192.168.4.10"),
            ("ExternalIP", "203.0.113.4"),
            ("Hostname", "edge-4.shop.example"),
            ("InternalDNS", "ip-192-168-4-10.shop.internal"),
        ],
    );
    let l = n.metadata.labels.get_or_insert_with(Default::default);
    l.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let st = n.status.get_or_insert_with(Default::default);
    if let Some(status) = ours {
        st.conditions.get_or_insert_with(Vec::new).push(
            k8s_openapi::api::core::v1::NodeCondition {
                type_: crate::CONDITION_TYPE.into(),
                status: status.into(),
                reason: Some("SessionUp".into()),
                message: Some("tunnel up over quic".into()),
                ..Default::default()
            },
        );
    }
    n.spec.get_or_insert_with(Default::default).taints =
        Some(vec![k8s_openapi::api::core::v1::Taint {
            key: "node.kubernetes.io/unreachable".into(),
            effect: "NoExecute".into(),
            ..Default::default()
        }]);
    n
}

/// Every label [`node_claims`] reads, one per case, with the relay's
/// condition absent, `False` and `True`: the trimmed Node gives the
/// same claims and issues, and the same [`says_ready`](crate::says_ready),
/// as the whole one, and keeps nothing else.
#[test]
fn trimming_keeps_what_the_claims_and_the_sweep_read() {
    let community = format!("{COMMUNITY_LABEL_PREFIX}shops");
    let self_set = format!("{SELF_SET_COMMUNITY_PREFIX}depots");
    let mut cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![(EDGE_ROLE_LABEL, "")],
        vec![(ZONE_LABEL, "shop-a")],
        vec![(ZONE_LABEL, "")],
        vec![(community.as_str(), "")],
        vec![(self_set.as_str(), "x")],
        vec![(COMMUNITY_LABEL_PREFIX, "")],
    ];
    for key in CONTROL_PLANE_LABELS {
        cases.push(vec![(key, "")]);
    }
    for (key, value) in OTHER_EDGE_LABELS.into_iter().chain(CLOUD_LABELS) {
        cases.push(vec![(key, value)]);
        cases.push(vec![(key, "other")]);
    }
    for labels in &cases {
        for ours in [None, Some("False"), Some("True")] {
            let whole = real_node("edge-4", labels, ours);
            let mut trimmed = whole.clone();
            trim(&mut trimmed);
            let what = format!("{labels:?}, condition {ours:?}");
            assert_eq!(node_claims(&trimmed), node_claims(&whole), "{what}");
            assert_eq!(
                crate::says_ready(&trimmed),
                crate::says_ready(&whole),
                "{what}"
            );
            assert_eq!(trimmed.metadata.name.as_deref(), Some("edge-4"));
            let kept: Vec<&String> = trimmed
                .metadata
                .labels
                .iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            assert!(
                kept.iter().all(|k| labels.iter().any(|(l, _)| l == k)),
                "{what}: {kept:?}"
            );
            assert_eq!(kept.len(), labels.len(), "{what}");
            let bare = Node {
                metadata: ObjectMeta {
                    name: trimmed.metadata.name.clone(),
                    labels: trimmed.metadata.labels.clone(),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            };
            assert_eq!(
                trimmed.metadata, bare.metadata,
                "{what}: other metadata kept"
            );
            let spec = trimmed.spec.clone().unwrap_or_default();
            assert_eq!(
                spec,
                NodeSpec {
                    pod_cidr: Some("10.244.4.0/24".into()),
                    pod_cidrs: whole.spec.as_ref().and_then(|s| s.pod_cidrs.clone()),
                    ..NodeSpec::default()
                }
            );
            let status = trimmed.status.clone().unwrap_or_default();
            let whole_status = whole.status.clone().unwrap_or_default();
            assert!(whole_status.images.is_some() && whole_status.node_info.is_some());
            assert_eq!(
                status,
                NodeStatus {
                    addresses: whole_status.addresses.clone(),
                    conditions: whole_status
                        .conditions
                        .clone()
                        .map(|cs| cs
                            .into_iter()
                            .filter(|c| c.type_ == crate::CONDITION_TYPE)
                            .collect::<Vec<_>>())
                        .filter(|cs| !cs.is_empty()),
                    ..NodeStatus::default()
                },
                "{what}"
            );
        }
    }
}

fn inner() -> (Inner, reflector::store::Writer<Node>) {
    Inner::new()
}

/// A kubelet's status report (heartbeats, images, its own conditions)
/// and the relay's condition flipping leave the claims as they were:
/// no change to report. A pod CIDR or an address change does.
#[test]
fn only_a_change_of_claims_is_a_change() {
    let (inner, _) = inner();
    let labels = [(EDGE_ROLE_LABEL, "")];
    let mut n = real_node("edge-4", &labels, Some("True"));
    trim(&mut n);
    assert!(inner.update(&n), "a new node");
    assert!(!inner.update(&n), "the same node again");
    let mut report = real_node("edge-4", &labels, Some("False"));
    if let Some(st) = report.status.as_mut() {
        if let Some(images) = st.images.as_mut() {
            images.truncate(10);
        }
        for c in st.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
            if c.type_ == "Ready" {
                c.status = "False".into();
            }
        }
    }
    trim(&mut report);
    assert!(!inner.update(&report), "a status report");
    let mut moved = report.clone();
    if let Some(s) = moved.spec.as_mut() {
        s.pod_cidrs = Some(vec!["10.244.5.0/24".into()]);
    }
    assert!(inner.update(&moved), "a pod CIDR change");
    let mut readdressed = moved.clone();
    if let Some(st) = readdressed.status.as_mut() {
        st.addresses.get_or_insert_with(Vec::new)[0].address = "192.168.4.11".into();
    }
    assert!(inner.update(&readdressed), "an address change");
    assert!(inner.remove(&readdressed));
    assert!(!inner.remove(&readdressed), "already gone");
}

/// A relist that brings the same Nodes changes nothing; one without a
/// Node, or with a Node's claims changed, does.
#[test]
fn a_relist_is_a_change_only_when_claims_differ() {
    let (inner, mut writer) = inner();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut n = real_node(&format!("edge-{i}"), &[], None);
            trim(&mut n);
            n
        })
        .collect();
    let relist = |writer: &mut reflector::store::Writer<Node>, nodes: &[Node]| {
        writer.apply_watcher_event(&watcher::Event::Init);
        for n in nodes {
            writer.apply_watcher_event(&watcher::Event::InitApply(n.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    };
    relist(&mut writer, &nodes);
    assert!(inner.rebuild(), "the first list");
    relist(&mut writer, &nodes);
    assert!(!inner.rebuild(), "the same Nodes");
    relist(&mut writer, &nodes[..2]);
    assert!(inner.rebuild(), "a Node gone");
    assert_eq!(inner.claims.read().unwrap().len(), 2);
    let mut changed = nodes[..2].to_vec();
    if let Some(s) = changed[1].spec.as_mut() {
        s.pod_cidrs = Some(vec!["10.244.7.0/24".into()]);
    }
    relist(&mut writer, &changed);
    assert!(inner.rebuild(), "a Node's claims changed");
}

/// Not a check (ignored, it asserts nothing): what the store of
/// 10,000 stand-in Nodes (as large as real ones) costs the process,
/// after the first list and at the peak of a relist (the new store
/// is built beside the old). Each variant in its own process:
/// `cargo test -p relay-kube --lib -- --ignored --exact --nocapture
/// nodes::tests::store_of_10000_real_nodes_trimmed` (and `_whole`,
/// Nodes stored as they come, managedFields stripped).
#[test]
#[ignore]
fn store_of_10000_real_nodes_trimmed() {
    measure_store("trimmed", trim);
}

/// See [`store_of_10000_real_nodes_trimmed`].
#[test]
#[ignore]
fn store_of_10000_real_nodes_whole() {
    measure_store("whole", |n| n.metadata.managed_fields = None);
}

fn measure_store(what: &str, keep: fn(&mut Node)) {
    const NODES: usize = 10_000;
    let mib = |field: &str| -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    };
    let (store, mut writer) = reflector::store::<Node>();
    let list = |writer: &mut reflector::store::Writer<Node>| {
        writer.apply_watcher_event(&watcher::Event::Init);
        for i in 0..NODES {
            let mut n = relay_kube_standin::kubelet_node(
                &format!("edge-{i:05}"),
                &[&format!("10.{}.{}.0/24", 64 + i / 256, i % 256)],
                &[(
                    "InternalIP",
                    &format!("192.168.{}.{}", i / 250, i % 250 + 1),
                )],
            );
            keep(&mut n);
            writer.apply_watcher_event(&watcher::Event::InitApply(n));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    };
    let base = mib("VmRSS:");
    list(&mut writer);
    let listed = mib("VmRSS:") - base;
    list(&mut writer);
    let peak = mib("VmHWM:") - base;
    assert_eq!(store.state().len(), NODES);
    let json: usize = store
        .state()
        .iter()
        .map(|n| serde_json::to_vec(n.as_ref()).map_or(0, |v| v.len()))
        .sum();
    eprintln!(
        "{NODES} Nodes, {what}: {listed:.1} MiB after the list, {peak:.1} MiB at a relist's peak \
         (RSS over the start); {:.1} KiB of JSON each",
        json as f64 / NODES as f64 / 1024.0
    );
}

#[test]
fn legacy_single_pod_cidr_is_used_when_the_list_is_empty() {
    let mut n = node("edge-3", &[], &[]);
    if let Some(s) = n.spec.as_mut() {
        s.pod_cidr = Some("10.244.3.0/24".into());
    }
    let (c, _) = node_claims(&n);
    assert_eq!(c.pod_cidrs.len(), 1);
    assert_eq!(c.hostname, None);
}
