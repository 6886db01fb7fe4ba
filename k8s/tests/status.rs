//! StatusWriter and SessionEvents against `relay-kube-standin`, a
//! kube-apiserver stand-in (real HTTPS, server-side apply merged by
//! condition type per field manager), not a real apiserver.

mod common;

use std::time::Duration;

use common::{count, node, setup};
use k8s_openapi::api::core::v1::NodeCondition;
use relay_kube::{
    KubeError, SessionEvent, SessionEvents, StatusWriter, TunnelCondition, WriteOutcome,
    CONDITION_TYPE, FIELD_MANAGER, NOTE_LIMIT,
};

const CALL: Duration = Duration::from_secs(5);

fn up() -> TunnelCondition {
    TunnelCondition {
        ready: true,
        reason: "SessionUp".into(),
        message: "tunnel up over quic".into(),
    }
}

fn down() -> TunnelCondition {
    TunnelCondition {
        ready: false,
        reason: "NoSession".into(),
        message: "no tunnel session".into(),
    }
}

fn condition(standin: &relay_kube_standin::StandIn, t: &str) -> Option<NodeCondition> {
    standin
        .node("edge-1")?
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == t)
}

#[tokio::test]
async fn apply_keeps_kubelet_ready_and_skips_unchanged_writes() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let ready = NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kubelet is posting ready status".into()),
        ..Default::default()
    };
    standin
        .apply_conditions_as("edge-1", "kubelet", vec![ready.clone()])
        .unwrap();

    let writer = StatusWriter::new(&client, CALL);
    assert_eq!(
        writer.set("edge-1", &up()).await.unwrap(),
        WriteOutcome::Written
    );
    let ours = condition(&standin, CONDITION_TYPE).expect("our condition");
    assert_eq!(ours.status, "True");
    assert_eq!(ours.reason.as_deref(), Some("SessionUp"));
    assert_eq!(
        condition(&standin, "Ready"),
        Some(ready.clone()),
        "kubelet's Ready survives"
    );
    assert_eq!(
        standin.condition_owner("edge-1", "Ready").as_deref(),
        Some("kubelet")
    );
    assert_eq!(
        standin.condition_owner("edge-1", CONDITION_TYPE).as_deref(),
        Some(FIELD_MANAGER)
    );
    let patch = standin
        .requests()
        .into_iter()
        .find(|r| r.verb_resource() == "patch nodes/status")
        .unwrap();
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(patch.query.unwrap().contains("fieldManager=edge-relay"));

    // Same again: no request at all.
    let before = standin.requests().len();
    assert_eq!(
        writer.set("edge-1", &up()).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert_eq!(standin.requests().len(), before);

    // Flip: written, transition time moves; kubelet's Ready still there.
    assert_eq!(
        writer.set("edge-1", &down()).await.unwrap(),
        WriteOutcome::Written
    );
    let flipped = condition(&standin, CONDITION_TYPE).unwrap();
    assert_eq!(flipped.status, "False");
    assert!(flipped.last_transition_time >= ours.last_transition_time);
    assert_eq!(condition(&standin, "Ready"), Some(ready));
    assert_eq!(count(&standin, "patch nodes/status"), 2);
    assert_eq!(count(&standin, "get nodes/status"), 1);

    // A restarted relay (new writer) reads once and does not rewrite.
    let writer2 = StatusWriter::new(&client, CALL);
    assert_eq!(
        writer2.set("edge-1", &down()).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert_eq!(count(&standin, "patch nodes/status"), 2);
    assert_eq!(count(&standin, "get nodes/status"), 2);
    assert_eq!(condition(&standin, CONDITION_TYPE), Some(flipped));

    // Unknown node: typed error.
    let err = writer2.set("nope", &up()).await.unwrap_err();
    assert!(matches!(err, KubeError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn write_against_an_unreachable_apiserver_is_bounded() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    standin.set_unavailable(true);
    let writer = StatusWriter::new(&client, CALL);
    let started = std::time::Instant::now();
    assert!(writer.set("edge-1", &up()).await.is_err());
    assert!(started.elapsed() < CALL + Duration::from_secs(1));
    standin.set_unavailable(false);
    assert_eq!(
        writer.set("edge-1", &up()).await.unwrap(),
        WriteOutcome::Written
    );
}

#[tokio::test]
async fn session_events_are_created_then_deduplicated() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let events = SessionEvents::new(&client, Some("relay-0".into()), CALL);
    let up = SessionEvent::Up {
        note: "tunnel up over quic".into(),
    };
    events.publish("edge-1", &up).await.unwrap();
    let stored = standin.events();
    assert_eq!(stored.len(), 1);
    let e = &stored[0];
    assert_eq!(e["reason"], "EdgeSessionUp");
    assert_eq!(e["type"], "Normal");
    assert_eq!(e["regarding"]["kind"], "Node");
    assert_eq!(e["regarding"]["name"], "edge-1");
    assert_eq!(e["reportingController"], "edge-relay");
    assert_eq!(e["reportingInstance"], "relay-0");
    assert_eq!(e["metadata"]["namespace"], "default");
    assert_eq!(count(&standin, "create events"), 1);

    // The same event again becomes a series on the same object.
    events.publish("edge-1", &up).await.unwrap();
    let stored = standin.events();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["series"]["count"], 2);
    assert_eq!(count(&standin, "patch events"), 1);

    // A different event is a new object.
    let rejected = SessionEvent::Rejected {
        reason: "route_not_allowed".into(),
        note: "routes not owned by the node".into(),
    };
    events.publish("edge-1", &rejected).await.unwrap();
    assert_eq!(standin.events().len(), 2);
    assert!(standin
        .events()
        .iter()
        .any(|e| e["reason"] == "EdgeSessionRejected"
            && e["type"] == "Warning"
            && e["action"] == "route_not_allowed"));
}

/// Two rejections of one node for different reasons are two Events, each
/// with its own note: the recorder tells repeats by action, not note, so
/// with one action for every rejection the second was shown as a repeat
/// of the first, with the first's note.
#[tokio::test]
async fn rejections_for_different_reasons_are_different_events() {
    let (standin, client) = setup().await;
    let events = SessionEvents::new(&client, Some("relay-0".into()), CALL);
    let reject = |reason: &str, note: &str| SessionEvent::Rejected {
        reason: reason.into(),
        note: note.into(),
    };
    events
        .publish(
            "edge-1",
            &reject("route_not_allowed", "10.9.0.0/24 not allowed"),
        )
        .await
        .unwrap();
    events
        .publish(
            "edge-1",
            &reject("route_conflict", "10.1.0.0/24 is edge-2's"),
        )
        .await
        .unwrap();
    let mut notes: Vec<(String, String)> = standin
        .events()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["note"].as_str().unwrap().into(),
            )
        })
        .collect();
    notes.sort();
    assert_eq!(
        notes,
        [
            ("route_conflict".into(), "10.1.0.0/24 is edge-2's".into()),
            ("route_not_allowed".into(), "10.9.0.0/24 not allowed".into()),
        ]
    );
    assert_eq!(count(&standin, "patch events"), 0);
}

/// A note over the apiserver's 1024 bytes (a rejection listing a node's
/// allowed prefixes) is cut, not refused with 422 and lost.
#[tokio::test]
async fn a_long_note_is_cut_to_the_limit() {
    let (standin, client) = setup().await;
    let events = SessionEvents::new(&client, Some("relay-0".into()), CALL);
    let allowed: Vec<String> = (0..200).map(|i| format!("10.{i}.0.0/16")).collect();
    let note = format!("route_not_allowed: may serve only {}", allowed.join(", "));
    assert!(note.len() > NOTE_LIMIT);
    events
        .publish(
            "edge-1",
            &SessionEvent::Rejected {
                reason: "route_not_allowed".into(),
                note: note.clone(),
            },
        )
        .await
        .unwrap();
    let stored = standin.events();
    let kept = stored[0]["note"].as_str().unwrap();
    assert!(kept.len() <= NOTE_LIMIT && kept.ends_with('…'));
    assert!(note.starts_with(kept.trim_end_matches('…')));
}

/// A writer's memory of what it wrote is stale once another writer (the
/// replica that wrote the node while it was in the set) has written the
/// node: equal to the new state, it skips the write and the node keeps
/// the other's `True`. `forget_all` (called when the replica set changes)
/// makes it read the Node again and write.
#[tokio::test]
async fn a_writer_forgets_what_another_may_have_written() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let a = StatusWriter::new(&client, CALL);
    let b = StatusWriter::new(&client, CALL);
    assert_eq!(
        a.set("edge-1", &down()).await.unwrap(),
        WriteOutcome::Written
    );
    assert_eq!(b.set("edge-1", &up()).await.unwrap(), WriteOutcome::Written);
    assert_eq!(
        a.set("edge-1", &down()).await.unwrap(),
        WriteOutcome::Unchanged
    );
    assert_eq!(condition(&standin, CONDITION_TYPE).unwrap().status, "True");
    a.forget_all();
    assert_eq!(
        a.set("edge-1", &down()).await.unwrap(),
        WriteOutcome::Written
    );
    assert_eq!(condition(&standin, CONDITION_TYPE).unwrap().status, "False");
}
