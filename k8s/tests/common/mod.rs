//! Shared setup for the tests, which run against `relay-kube-standin`, a
//! kube-apiserver stand-in on loopback, not a real apiserver.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
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
    let hostname = format!("{name}.local");
    relay_kube_standin::kubelet_node(
        name,
        pod_cidrs,
        &[("InternalIP", internal_ip), ("Hostname", &hostname)],
    )
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
