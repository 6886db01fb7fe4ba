//! NodeDirectory against `relay-kube-standin`, a kube-apiserver stand-in
//! (real HTTPS, real list/watch framing), not a real apiserver.

mod common;

use common::{count, node, setup, wait_until, BOUND};
use relay_kube::{DirectoryOptions, NodeDirectory};

#[tokio::test]
async fn syncs_strips_managed_fields_and_follows_changes() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    standin.upsert_node(node("edge-2", &["10.244.2.0/24", "banana"], "192.168.1.12"));
    let dir = NodeDirectory::spawn(&client, &DirectoryOptions::default());
    assert!(!dir.is_synced());
    dir.wait_synced(BOUND).await.expect("synced");
    assert!(dir.is_synced());

    let c = dir.claims("edge-1").expect("edge-1 known");
    assert_eq!(c.pod_cidrs[0].to_string(), "10.244.1.0/24");
    assert_eq!(
        c.internal_ips,
        vec!["192.168.1.11".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(c.hostname.as_deref(), Some("edge-1.local"));
    // The bad entry is skipped and counted, the good one kept.
    assert_eq!(dir.claims("edge-2").unwrap().pod_cidrs.len(), 1);
    assert_eq!(dir.skipped_entries(), 1);
    // The stand-in's Nodes carry managedFields; the directory's do not.
    assert!(standin
        .node("edge-1")
        .unwrap()
        .metadata
        .managed_fields
        .is_some());
    assert!(dir
        .nodes()
        .iter()
        .all(|n| n.metadata.managed_fields.is_none()));
    assert_eq!(dir.nodes().len(), 2);

    // Added.
    let mut changes = dir.subscribe();
    standin.upsert_node(node("edge-3", &["10.244.3.0/24"], "192.168.1.13"));
    tokio::time::timeout(BOUND, changes.changed())
        .await
        .unwrap()
        .unwrap();
    wait_until("edge-3 added", BOUND, || dir.claims("edge-3").is_some()).await;
    // Changed pod CIDRs.
    standin.upsert_node(node("edge-1", &["10.244.9.0/24"], "192.168.1.11"));
    wait_until("edge-1 pod CIDR changed", BOUND, || {
        dir.claims("edge-1")
            .is_some_and(|c| c.pod_cidrs[0].to_string() == "10.244.9.0/24")
    })
    .await;
    // Deleted.
    assert!(standin.delete_node("edge-2"));
    wait_until("edge-2 deleted", BOUND, || dir.claims("edge-2").is_none()).await;
    assert_eq!(dir.nodes().len(), 2);
    // One list; everything else came over the watch.
    assert_eq!(count(&standin, "list nodes"), 1);
}

#[tokio::test]
async fn watch_expiry_rewatches_without_relisting() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let dir = NodeDirectory::spawn(
        &client,
        &DirectoryOptions {
            watch_timeout_secs: 1,
        },
    );
    dir.wait_synced(BOUND).await.unwrap();
    wait_until("three watches (each expires after 1 s)", BOUND, || {
        count(&standin, "watch nodes") >= 3
    })
    .await;
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    wait_until("edge-2 seen", BOUND, || dir.claims("edge-2").is_some()).await;
    assert_eq!(
        count(&standin, "list nodes"),
        1,
        "expiry must resume from the last resourceVersion"
    );
    // Bookmarks kept the resourceVersion moving: every re-watch resumed from a known one.
    assert!(
        standin.requests().iter().all(|r| r.status < 400),
        "{:?}",
        standin.requests()
    );
}

#[tokio::test]
async fn gone_in_stream_forces_a_relist_and_keeps_the_store() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    let dir = NodeDirectory::spawn(&client, &DirectoryOptions::default());
    dir.wait_synced(BOUND).await.unwrap();
    wait_until("watch open", BOUND, || standin.open_watches() == 1).await;
    let lists = count(&standin, "list nodes");

    standin.inject_gone();
    // A change the client can only learn by relisting (history was dropped).
    standin.upsert_node(node("edge-3", &["10.244.3.0/24"], "192.168.1.13"));
    let mut changes = dir.subscribe();
    let deadline = tokio::time::Instant::now() + BOUND;
    while dir.claims("edge-3").is_none() {
        // The store is never emptied while relisting.
        assert!(dir.claims("edge-1").is_some() && dir.claims("edge-2").is_some());
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::timeout(left, changes.changed())
            .await
            .expect("relisted within bound")
            .unwrap();
    }
    assert!(count(&standin, "list nodes") > lists, "a relist happened");
    assert_eq!(dir.nodes().len(), 3);
    assert!(dir.is_synced());
}

#[tokio::test]
async fn outage_keeps_the_last_known_store_and_recovers() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let dir = NodeDirectory::spawn(&client, &DirectoryOptions::default());
    dir.wait_synced(BOUND).await.unwrap();

    // 503 for everything.
    standin.set_unavailable(true);
    wait_until("a watch error during the 503 outage", BOUND, || {
        dir.watch_errors() >= 1
    })
    .await;
    assert!(dir.claims("edge-1").is_some(), "store kept during outage");
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    standin.set_unavailable(false);
    wait_until("edge-2 seen after the 503 outage", BOUND, || {
        dir.claims("edge-2").is_some()
    })
    .await;

    // Unreachable: listener gone, connections dropped.
    let errors = dir.watch_errors();
    standin.stop();
    wait_until("a watch error while unreachable", BOUND, || {
        dir.watch_errors() > errors
    })
    .await;
    assert!(dir.claims("edge-1").is_some() && dir.claims("edge-2").is_some());
    assert!(dir.is_synced());
    standin.delete_node("edge-1");
    standin.start().await.unwrap();
    wait_until("edge-1 deletion seen after restart", BOUND, || {
        dir.claims("edge-1").is_none()
    })
    .await;
    assert!(dir.claims("edge-2").is_some());
}

/// A watch whose connection stalls silently (nothing arrives, not even a
/// bookmark, yet nothing closes it: an apiserver load balancer failing
/// over without a reset) is ended by the client's read timeout, and the
/// watcher's new watch brings the change it missed. The stand-in's held
/// watches are that stall; a new watch gets its backlog first. With a
/// read timeout longer than the test, the change stays unseen (control).
#[tokio::test]
async fn a_silently_stalled_watch_is_replaced_after_the_read_timeout() {
    let (standin, _) = setup().await;
    let config = relay_kube::KubeClientConfig::Kubeconfig {
        path: standin.kubeconfig_path().to_path_buf(),
        context: None,
    };
    let options = |read: std::time::Duration| relay_kube::ClientOptions {
        read_timeout: read,
        ..relay_kube::ClientOptions::default()
    };
    let quick = config
        .client(&options(std::time::Duration::from_secs(3)))
        .await
        .expect("client");
    let slow = config
        .client(&options(std::time::Duration::from_secs(120)))
        .await
        .expect("client");
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let opts = DirectoryOptions {
        watch_timeout_secs: 2,
    };
    let healed = NodeDirectory::spawn(&quick, &opts);
    let stuck = NodeDirectory::spawn(&slow, &opts);
    healed.wait_synced(BOUND).await.expect("synced");
    stuck.wait_synced(BOUND).await.expect("synced");
    standin.hold_watches(true);
    // A watch already waiting for an event sends that one before it sees
    // the hold: one event first, then the watches stall.
    standin.upsert_node(node("edge-0", &["10.244.0.0/24"], "192.168.1.10"));
    wait_until("edge-0 seen", BOUND, || {
        healed.claims("edge-0").is_some() && stuck.claims("edge-0").is_some()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    let t = std::time::Instant::now();
    wait_until("edge-2 through a new watch", BOUND, || {
        healed.claims("edge-2").is_some()
    })
    .await;
    let took = t.elapsed();
    assert!(
        stuck.claims("edge-2").is_none(),
        "the control saw edge-2 through a held watch"
    );
    eprintln!("a stalled watch replaced; the change seen after {took:?}");
    standin.hold_watches(false);
}

/// The directory keeps of each Node only what the relay reads (the
/// stand-in's Nodes are as large as real ones: images, nodeInfo, the
/// kubelet's conditions, KBs of annotations), computes from it what it
/// computes from the whole Node, and tells its subscribers only of
/// changes to that: a kubelet's status report (heartbeats, images, its
/// conditions) or the relay's own condition changing wakes nobody, a pod
/// CIDR or an address change does.
#[tokio::test]
async fn keeps_only_what_it_reads_and_wakes_only_for_claim_changes() {
    use relay_kube::nodes::{COMMUNITY_LABEL_PREFIX, EDGE_ROLE_LABEL, ZONE_LABEL};
    use relay_kube::{node_claims, says_ready, CONDITION_TYPE, FIELD_MANAGER};
    let (standin, client) = setup().await;
    let labelled = |mut n: k8s_openapi::api::core::v1::Node| {
        let l = n.metadata.labels.get_or_insert_with(Default::default);
        l.insert(EDGE_ROLE_LABEL.into(), String::new());
        l.insert(ZONE_LABEL.into(), "shop-a".into());
        l.insert(format!("{COMMUNITY_LABEL_PREFIX}shops"), String::new());
        n
    };
    standin.upsert_node(labelled(node("edge-1", &["10.244.1.0/24"], "192.168.1.11")));
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    let ours = |status: &str| k8s_openapi::api::core::v1::NodeCondition {
        type_: CONDITION_TYPE.into(),
        status: status.into(),
        reason: Some("SessionUp".into()),
        message: Some("tunnel up".into()),
        ..Default::default()
    };
    standin
        .apply_conditions_as("edge-1", FIELD_MANAGER, vec![ours("True")])
        .unwrap();
    let whole = standin.node("edge-1").unwrap();
    let status = whole.status.clone().unwrap();
    assert_eq!(
        status.images.as_ref().map(Vec::len),
        Some(50),
        "a real Node's size"
    );
    assert!(status.node_info.is_some() && whole.metadata.annotations.is_some());
    assert!(serde_json::to_vec(&whole).unwrap().len() > 10_000);

    let dir = NodeDirectory::spawn(&client, &DirectoryOptions::default());
    dir.wait_synced(BOUND).await.expect("synced");
    let stored = |name: &str| {
        dir.nodes()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .expect("stored")
    };
    // What the directory computes is what the whole Nodes give.
    let same_as_whole = |names: &[&str]| {
        let all = dir.all_claims();
        assert_eq!(all.keys().collect::<Vec<_>>(), names);
        for (name, claims) in &all {
            let whole = standin.node(name).unwrap();
            assert_eq!(claims, &node_claims(&whole).0, "{name}");
            assert_eq!(says_ready(&stored(name)), says_ready(&whole), "{name}");
        }
    };
    same_as_whole(&["edge-1", "edge-2"]);
    let c = dir.claims("edge-1").unwrap();
    assert!(c.edge && c.zone.as_deref() == Some("shop-a") && c.communities.len() == 1);
    for n in dir.nodes() {
        let status = n.status.clone().unwrap_or_default();
        assert!(
            status.images.is_none() && status.node_info.is_none(),
            "{n:?}"
        );
        assert!(status.capacity.is_none() && status.allocatable.is_none());
        assert!(status
            .conditions
            .iter()
            .flatten()
            .all(|c| c.type_ == CONDITION_TYPE));
        assert!(n.metadata.annotations.is_none() && n.metadata.managed_fields.is_none());
        let labels: Vec<&String> = n.metadata.labels.iter().flatten().map(|(k, _)| k).collect();
        assert!(
            !labels
                .iter()
                .any(|k| k.as_str() == "kubernetes.io/hostname"),
            "{labels:?}"
        );
    }
    assert!(says_ready(&stored("edge-1")));

    let changes = dir.subscribe();
    let at = || *changes.borrow();
    let start = at();
    // Status reports: heartbeats and images change, the kubelet's Ready
    // flips, the relay writes its condition down.
    for round in 0..3 {
        for name in ["edge-1", "edge-2"] {
            let mut n = standin.node(name).unwrap();
            n.metadata.managed_fields = None;
            let st = n.status.as_mut().unwrap();
            st.images.as_mut().unwrap().rotate_left(round + 1);
            st.images.as_mut().unwrap().truncate(45 - round);
            for c in st.conditions.iter_mut().flatten() {
                c.last_heartbeat_time = None;
                if c.type_ == "Ready" {
                    c.status = if round % 2 == 0 { "False" } else { "True" }.into();
                }
            }
            st.conditions
                .as_mut()
                .unwrap()
                .retain(|c| c.type_ != CONDITION_TYPE);
            standin.upsert_node(n);
        }
    }
    standin
        .apply_conditions_as("edge-1", FIELD_MANAGER, vec![ours("False")])
        .unwrap();
    wait_until("the relay's condition down in the store", BOUND, || {
        !says_ready(&stored("edge-1"))
    })
    .await;
    // A marker after them: once it is seen, so are they (one watch, in order).
    standin.upsert_node(node("edge-9", &["10.244.9.0/24"], "192.168.1.19"));
    wait_until("edge-9", BOUND, || dir.claims("edge-9").is_some()).await;
    assert_eq!(at(), start + 1, "only the new node was a change");
    same_as_whole(&["edge-1", "edge-2", "edge-9"]);

    // A pod CIDR change is one.
    let mut n = standin.node("edge-1").unwrap();
    n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.8.0/24".into()]);
    standin.upsert_node(n);
    wait_until("edge-1's new pod CIDR", BOUND, || {
        dir.claims("edge-1")
            .is_some_and(|c| c.pod_cidrs[0].to_string() == "10.244.8.0/24")
    })
    .await;
    assert_eq!(at(), start + 2);
    // An address change is one.
    let mut n = standin.node("edge-2").unwrap();
    n.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "192.168.1.22".into();
    standin.upsert_node(n);
    wait_until("edge-2's new address", BOUND, || {
        dir.claims("edge-2")
            .is_some_and(|c| c.internal_ips[0].to_string() == "192.168.1.22")
    })
    .await;
    assert_eq!(at(), start + 3);
    same_as_whole(&["edge-1", "edge-2", "edge-9"]);
}
