//! Shared setup for the tests, which run against `relay-kube-standin`, a
//! kube-apiserver stand-in on loopback, not a real apiserver.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use relay_kube::{ClientOptions, KubeClient, KubeClientConfig};
use relay_kube_standin::StandIn;

/// Bound for anything that should happen "within seconds".
pub const BOUND: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A stand-in and a client built the production way (kubeconfig → Client).
pub async fn setup() -> (StandIn, KubeClient) {
    init_tracing();
    let standin = StandIn::spawn().await.expect("stand-in starts");
    let client = KubeClientConfig::Kubeconfig {
        path: standin.kubeconfig_path().to_path_buf(),
        context: None,
    }
    .client(&ClientOptions::default())
    .await
    .expect("client from kubeconfig");
    (standin, client)
}

/// A Node as a kubelet registers it.
pub fn node(name: &str, pod_cidrs: &[&str], internal_ip: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|s| s.to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: internal_ip.into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: format!("{name}.local"),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// Polls `f` every 20 ms until it holds, at most `bound`; panics naming
/// `what` otherwise.
pub async fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + bound;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests whose `verb resource[/sub]` is `vr`.
pub fn count(standin: &StandIn, vr: &str) -> usize {
    standin
        .requests()
        .iter()
        .filter(|r| r.verb_resource() == vr)
        .count()
}
