//! What relay-kube asks of the API, observed on `relay-kube-standin` (a
//! kube-apiserver stand-in, not a real apiserver): the set of RBAC
//! attributes its calls need, and the client's bearer token being checked.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::{node, setup, wait_until, BOUND};
use relay_kube::{
    ClientOptions, DirectoryOptions, KubeClientConfig, KubeError, NodeDirectory, SessionEvent,
    SessionEvents, StatusWriter, TokenReviewError, TokenReviewer, TunnelCondition, AUDIENCE,
};

const CALL: Duration = Duration::from_secs(5);

#[tokio::test]
async fn every_call_is_one_of_the_documented_rbac_rules() {
    let (standin, client) = setup().await;
    standin.upsert_node(node("edge-1", &["10.244.1.0/24"], "192.168.1.11"));
    let dir = NodeDirectory::spawn(&client, &DirectoryOptions::default());
    dir.wait_synced(BOUND).await.unwrap();
    let writer = StatusWriter::new(&client, CALL);
    let cond = TunnelCondition {
        ready: true,
        reason: "SessionUp".into(),
        message: "up".into(),
    };
    writer.set("edge-1", &cond).await.unwrap();
    let events = SessionEvents::new(&client, None, CALL);
    let up = SessionEvent::Up { note: "up".into() };
    events.publish("edge-1", &up).await.unwrap();
    events.publish("edge-1", &up).await.unwrap();
    let token = standin.mint_token("edge-1", "p", "u", AUDIENCE, SystemTime::now() + CALL);
    TokenReviewer::new(&client, CALL)
        .review(&token)
        .await
        .unwrap();
    wait_until("watch open", BOUND, || standin.open_watches() == 1).await;

    let seen: BTreeSet<String> = standin
        .requests()
        .iter()
        .map(|r| {
            let a = r.attrs.as_ref().expect("only resource requests");
            format!(
                "{}/{}{} {}",
                a.group,
                a.resource,
                a.subresource
                    .as_ref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                a.verb
            )
        })
        .collect();
    let expected: BTreeSet<String> = [
        "/nodes list",
        "/nodes watch",
        "/nodes/status get",
        "/nodes/status patch",
        "events.k8s.io/events create",
        "events.k8s.io/events patch",
        "authentication.k8s.io/tokenreviews create",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, expected);
    // Events land in "default" (Nodes are cluster-scoped); nothing else is namespaced.
    for r in standin.requests() {
        let a = r.attrs.unwrap();
        assert_eq!(a.namespace.is_some(), a.resource == "events", "{a:?}");
    }
}

#[tokio::test]
async fn a_wrong_bearer_token_is_refused() {
    let (standin, _) = setup().await;
    let text = std::fs::read_to_string(standin.kubeconfig_path()).unwrap();
    let mut kc: serde_json::Value = serde_json::from_str(&text).unwrap();
    kc["users"][0]["user"]["token"] = "wrong".into();
    let path = standin
        .kubeconfig_path()
        .with_file_name("kubeconfig-wrong-token");
    std::fs::write(&path, kc.to_string()).unwrap();
    let client = KubeClientConfig::Kubeconfig {
        path,
        context: None,
    }
    .client(&ClientOptions::default())
    .await
    .unwrap();
    let err = TokenReviewer::new(&client, CALL)
        .review("t")
        .await
        .unwrap_err();
    match err {
        TokenReviewError::Api(KubeError::Api { status, .. }) => assert_eq!(status, Some(401)),
        other => panic!("expected 401, got {other}"),
    }
    assert_eq!(standin.requests()[0].status, 401);
}

#[tokio::test]
async fn a_missing_kubeconfig_is_a_config_error() {
    let err = KubeClientConfig::Kubeconfig {
        path: "/nonexistent/kubeconfig".into(),
        context: None,
    }
    .client(&ClientOptions::default())
    .await
    .expect_err("no client without a kubeconfig");
    assert!(matches!(err, KubeError::Config(_)), "{err}");
}
