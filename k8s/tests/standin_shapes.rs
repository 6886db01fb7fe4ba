//! The stand-in's own apiserver behaviours that relay-kube relies on,
//! driven with a plain `kube` client against `relay-kube-standin` (a
//! kube-apiserver stand-in, not a real apiserver): resuming a watch from a
//! compacted resourceVersion is an in-stream 410, a server-side apply that
//! touches another manager's condition without force is a 409, an Event
//! whose note is over 1024 bytes is a 422, a kubelet's Node update keeps
//! the conditions another manager applied.

mod common;

use common::{init_tracing, node, BOUND};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;
use relay_kube_standin::StandIn;
use serde_json::json;

async fn raw_client(standin: &StandIn) -> kube::Client {
    let kc = Kubeconfig::read_from(standin.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_is_gone() {
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let nodes: Api<Node> = Api::all(raw_client(&standin).await);
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let list = nodes.list(&Default::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    // Resuming from the list's resourceVersion sees later changes.
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    standin.upsert_node(node("edge-2", &["10.244.2.0/24"], "192.168.1.12"));
    let first = tokio::time::timeout(BOUND, stream.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Some(WatchEvent::Added(n)) if n.metadata.name.as_deref() == Some("edge-2"))
    );
    drop(stream);

    // After compaction the same resourceVersion is too old.
    standin.inject_gone();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(BOUND, stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_over_another_managers_condition_conflicts_without_force() {
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let nodes: Api<Node> = Api::all(raw_client(&standin).await);
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let ready = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "edge-1"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    nodes
        .patch_status(
            "edge-1",
            &PatchParams::apply("kubelet"),
            &Patch::Apply(&ready),
        )
        .await
        .unwrap();
    let mine = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "edge-1"},
        "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    let err = nodes
        .patch_status(
            "edge-1",
            &PatchParams::apply("edge-relay"),
            &Patch::Apply(&mine),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );
    // With force the ownership moves.
    nodes
        .patch_status(
            "edge-1",
            &PatchParams::apply("edge-relay").force(),
            &Patch::Apply(&mine),
        )
        .await
        .unwrap();
    assert_eq!(
        standin.condition_owner("edge-1", "Ready").as_deref(),
        Some("edge-relay")
    );
    // managedFields record both managers' entries as the apiserver would.
    let n = nodes.get_status("edge-1").await.unwrap();
    let managers: Vec<_> = n
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"edge-relay".to_string()), "{managers:?}");
}

/// Against the stand-in, not a real apiserver: Nodes, Services and
/// EndpointSlices share one resourceVersion sequence (as in etcd), and a
/// watch of one collection resumed from a resourceVersion sees only its
/// own kind's later events, in order.
#[tokio::test]
async fn watches_of_each_collection_see_only_their_kind() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let client = raw_client(&standin).await;
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client);
    let svc = |name: &str| -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}}))
        .unwrap()
    };
    let slice = |name: &str| -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.7.5"]}]}))
        .unwrap()
    };
    standin.upsert_service(svc("web"));
    let rv = services
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    assert_eq!(
        slices.list(&Default::default()).await.unwrap().items.len(),
        0
    );
    // Interleaved changes of all three kinds after `rv`.
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    standin.upsert_endpointslice(slice("web-1"));
    standin.upsert_service(svc("api"));
    assert!(standin.delete_endpointslice("shop", "web-1"));
    let names = |evs: Vec<String>| evs.join(" ");
    let mut seen = Vec::new();
    let mut stream = services
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(BOUND, stream.try_next()).await {
        match ev {
            WatchEvent::Added(s) => seen.push(format!("+{}", s.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected service watch event {other:?}"),
        }
    }
    assert_eq!(names(seen), "+api");
    let mut seen = Vec::new();
    let mut stream = slices
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(BOUND, stream.try_next()).await {
        match ev {
            WatchEvent::Added(s) => seen.push(format!("+{}", s.metadata.name.unwrap())),
            WatchEvent::Deleted(s) => seen.push(format!("-{}", s.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected slice watch event {other:?}"),
        }
    }
    assert_eq!(names(seen), "+web-1 -web-1");
    assert_eq!(standin.service_counts(), (2, 0));
}

/// events.k8s.io/v1 validation: a note over 1024 bytes (`NoteLengthLimit`)
/// is refused with 422, on create and on update; 1024 is accepted.
#[tokio::test]
async fn an_event_note_over_1024_bytes_is_refused() {
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(raw_client(&standin).await, "default");
    let event = |name: &str, note: String| {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "eventTime": "2025-01-01T00:00:00.000000Z",
            "reportingController": "edge-relay", "reportingInstance": "relay-0",
            "action": "route_not_allowed", "reason": "EdgeSessionRejected",
            "type": "Warning", "note": note,
            "regarding": {"kind": "Node", "name": "edge-1", "apiVersion": "v1"},
        }))
        .unwrap()
    };
    let refused = events
        .create(&Default::default(), &event("long", "€".repeat(342)))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.message.contains("note")),
        "{refused:?}"
    );
    events
        .create(&Default::default(), &event("at-limit", "x".repeat(1024)))
        .await
        .unwrap();
    let patch = json!({"note": "y".repeat(1025)});
    let refused = events
        .patch("at-limit", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 422),
        "{refused:?}"
    );
    assert_eq!(standin.events().len(), 1);
    assert_eq!(standin.events()[0]["note"], "x".repeat(1024));
}

/// A kubelet's update of its Node (its own conditions, images, heartbeats)
/// replaces its conditions and leaves the one the relay applied, as the
/// apiserver merges a kubelet's status patch by condition type.
#[tokio::test]
async fn a_kubelet_update_keeps_the_relays_applied_condition() {
    init_tracing();
    let standin = StandIn::spawn().await.unwrap();
    let nodes: Api<Node> = Api::all(raw_client(&standin).await);
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let ours = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "edge-1"},
        "status": {"conditions": [{"type": relay_kube::CONDITION_TYPE, "status": "True"}]}});
    nodes
        .patch_status(
            "edge-1",
            &PatchParams::apply(relay_kube::FIELD_MANAGER),
            &Patch::Apply(&ours),
        )
        .await
        .unwrap();
    let mut update = node("edge-1", &["10.244.1.0/24"], "192.168.1.11");
    let st = update.status.as_mut().unwrap();
    assert!(st.conditions.iter().flatten().any(|c| c.type_ == "Ready"));
    for c in st.conditions.iter_mut().flatten() {
        if c.type_ == "Ready" {
            c.status = "False".into();
        }
    }
    standin.upsert_node(update);
    let got = nodes.get_status("edge-1").await.unwrap();
    let conditions = got.status.unwrap().conditions.unwrap();
    let status_of = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status.as_str())
    };
    assert_eq!(status_of(relay_kube::CONDITION_TYPE), Some("True"));
    assert_eq!(status_of("Ready"), Some("False"), "the kubelet's own");
    assert_eq!(
        conditions
            .iter()
            .filter(|c| c.type_ == relay_kube::CONDITION_TYPE)
            .count(),
        1
    );
    assert_eq!(
        standin
            .condition_owner("edge-1", relay_kube::CONDITION_TYPE)
            .as_deref(),
        Some(relay_kube::FIELD_MANAGER)
    );
}
