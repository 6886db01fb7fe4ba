//! The deploy manifests' RBAC (`deploy/kubernetes/base/rbac.yaml`) against
//! the calls the relay really makes in Kubernetes mode.
//!
//! Every test here runs against `relay-kube-standin` enforcing the rules
//! of the relay's ClusterRole and of its Role in the edge namespace (the
//! Role's rules match only in that namespace, as its RoleBinding grants
//! them; 403 `Forbidden` for any request the rules do not allow,
//! classified as kube-apiserver's RBAC authorizer does) — NOT a real
//! apiserver. The relay reaches it through an ordinary kubeconfig, so its
//! production client path is the one checked.
//!
//! 1. With exactly the manifests' rules, a full session lifecycle (edge up
//!    with a certificate obtained by token bootstrap, condition written,
//!    event published, reconnect folded into an event series, Node changed,
//!    Node deleted, a Calico block and a Cilium range created after the
//!    relay listed their resources served to the edge, Calico's
//!    strictAffinity read once its block was known) and the service
//!    directory's watches (Services and
//!    EndpointSlices listed, then a change watched) pass with zero 403s:
//!    the rules are enough.
//! 2. With any one verb of any one rule removed (and with any whole rule
//!    removed, and with the Role in another namespace), the same scenario
//!    fails and at least one 403 is seen: no rule, and no verb, is unused,
//!    and the Role is in the namespace the relay reads. A rule no test
//!    needs fails here.
//! 3. Pods are readable in the edge namespace only: a pod GET in another
//!    namespace, as the relay's user with its pod reader, is answered 403.
//!
//! The Service watch is checked on a `ServiceDirectory` this test runs
//! beside the relay, as the same user through the same kind of kubeconfig
//! (the relay starts one of its own with `kubernetes.services`): the calls
//! are the ones relay-kube makes, whoever owns the directory, and the test
//! can tell when each step has happened.

use relay_lab::TempDir;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use std::sync::Arc;

use edge_client::config::{BootstrapConfig, Identity};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube::{
    ClientOptions, KubeClientConfig, KubeError, PodReader, Protocol, ServiceDirectory,
    ServiceDirectoryOptions,
};
use relay_kube_standin::crds::{block_affinity, cilium_node, ipam_config};
use relay_kube_standin::k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use relay_kube_standin::k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use relay_kube_standin::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use relay_kube_standin::{
    cluster_role_rules, daemonset_pod, kubelet_node, role_rules, Crd, PolicyRule, StandIn,
};
use relay_lab::sessions;
use relay_protocol::Cidr;
use relay_server::config::{BootstrapSettings, KubeSettings};
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;
use relay_transport::issue::NodeIssuer;
use relay_transport::tls::certs_from_pem;

const RBAC_YAML: &str = include_str!("../../deploy/kubernetes/base/rbac.yaml");
/// The name of both the relay's ClusterRole and its Role.
const ROLE: &str = "edge-relay:relay-server";
/// The edge namespace: the edge-client pods' and service account's, where
/// the relay reads pods (`[bootstrap] service_account`, and here
/// `BootstrapSettings::namespace`).
const EDGE_NS: &str = "edge-relay";

/// The ClusterRole's rules, then the Role's (each limited to the Role's
/// namespace, which must be the edge namespace).
fn manifest_rules() -> Vec<PolicyRule> {
    let mut rules =
        cluster_role_rules(RBAC_YAML, ROLE).expect("rbac.yaml has the relay's ClusterRole");
    let role = role_rules(RBAC_YAML, ROLE).expect("rbac.yaml has the relay's Role");
    assert!(
        !role.is_empty() && role.iter().all(|r| r.namespace.as_deref() == Some(EDGE_NS)),
        "the relay's Role must be in the edge namespace {EDGE_NS}: {role:?}"
    );
    rules.extend(role);
    rules
}

fn node_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 2])
}

fn node(pod_cidr: &str) -> relay_kube_standin::k8s_openapi::api::core::v1::Node {
    let ip = node_ip().to_string();
    kubelet_node(
        "edge-0",
        &[pod_cidr],
        &[("InternalIP", &ip), ("Hostname", "edge-0.site.example")],
    )
}

/// The edge-client DaemonSet's pod on edge-0, in the edge namespace: the
/// pod the bootstrap token is bound to.
fn edge_pod() -> relay_kube_standin::k8s_openapi::api::core::v1::Pod {
    daemonset_pod(
        EDGE_NS,
        "edge-client-0",
        "uid-0",
        "edge-0",
        "edge-client",
        "edge-client",
    )
}

/// A ClusterIP Service `shop/<name>` on `vip` (TCP, port named `main`)
/// with its EndpointSlice: one endpoint `ep` on edge-0, target port 8080.
fn service_with_slice(name: &str, vip: std::net::SocketAddr, ep: &str) -> (Service, EndpointSlice) {
    let meta = |n: &str| ObjectMeta {
        namespace: Some("shop".into()),
        name: Some(n.into()),
        ..Default::default()
    };
    let svc = Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.ip().to_string()),
            cluster_ips: Some(vec![vip.ip().to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("main".into()),
                port: i32::from(vip.port()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    let mut slice_meta = meta(&format!("{name}-x1"));
    slice_meta.labels = Some(
        [(
            relay_kube::services::SERVICE_NAME_LABEL.to_string(),
            name.to_string(),
        )]
        .into(),
    );
    let slice = EndpointSlice {
        metadata: slice_meta,
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("main".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: vec![Endpoint {
            addresses: vec![ep.into()],
            node_name: Some("edge-0".into()),
            ..Default::default()
        }],
    };
    (svc, slice)
}

/// Polls `f` every 50 ms until it yields `Some`, at most `bound`.
async fn eventually<T>(
    bound: Duration,
    mut f: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(start.elapsed() < bound, "not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How one run of the lifecycle went.
struct Outcome {
    /// The step that failed, with its error; `None` when all passed.
    failed: Option<(&'static str, String)>,
    /// `verb resource[/sub]` of every request answered 403.
    forbidden: Vec<String>,
}

/// The session lifecycle against a stand-in enforcing `rules`, each step
/// bounded by `bound`.
async fn lifecycle(rules: Vec<PolicyRule>, bound: Duration) -> Result<Outcome> {
    let standin = StandIn::spawn_with_rbac(rules).await?;
    standin.upsert_node(node("127.1.0.0/24"));
    // Calico and Cilium installed: the relay probes (list) and watches
    // both IPAM resources.
    standin.install_crd(Crd::CalicoBlockAffinities);
    standin.install_crd(Crd::CiliumNodes);
    // Calico's IPAM configuration, strictAffinity true: read (get, that
    // one object) once a confirmed block is known.
    standin.upsert_custom(Crd::CalicoIpamConfigs, ipam_config(Some(true)));
    standin.upsert_pod(edge_pod());
    let token = standin.mint_token(
        "edge-0",
        "edge-client-0",
        "uid-0",
        "edge-relay", // the audience
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    // The edge has no certificate: it bootstraps one with its token (token
    // review, the pod read), so those rules are exercised too.
    let pki = DevPki::generate(&["localhost"], &[])?;
    let (ca_cert, ca_key) = pki.ca_pem_pair();
    let dir = TempDir(std::env::temp_dir().join(format!(
        "rbac-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    )));
    std::fs::create_dir_all(&dir.0)?;
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, token)?;
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.bootstrap = Some(BootstrapSettings {
        issuer: Arc::new(NodeIssuer::from_pem(
            &ca_cert,
            &ca_key,
            Duration::from_secs(3600),
        )?),
        issuer_cert: certs_from_pem(ca_cert.as_bytes(), "ca")?.remove(0),
        namespace: EDGE_NS.into(),
        service_account: "edge-client".into(),
        daemonsets: vec!["edge-client".into()],
    });
    cfg.quic.keepalive = Duration::from_millis(500);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout: Duration::from_secs(3),
        ..KubeSettings::default()
    });
    let relay = Relay::spawn(cfg).await?;
    let admin = relay.admin_addr().context("admin listener")?;
    let edge = || -> Result<EdgeClient> {
        let placeholder = DevPki::generate(&["localhost"], &["edge-0"])?.node_material("edge-0")?;
        let mut cfg = EdgeConfig::new(
            "edge-0",
            relay.quic_addr().to_string(),
            "localhost",
            placeholder,
        );
        cfg.identity = Identity::Bootstrap(BootstrapConfig {
            token_file: token_file.clone(),
            // A fresh state directory each time: every edge up bootstraps.
            state_dir: dir.0.join(format!("state-{}", rand::random::<u32>())),
            relay_ca: certs_from_pem(pki.ca_cert.as_bytes(), "ca")?,
        });
        Ok(EdgeClient::spawn(cfg))
    };
    let condition = || {
        standin
            .node("edge-0")
            .and_then(|n| n.status?.conditions)
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == "EdgeTunnelReady"))
            .map(|c| c.status)
    };
    let up_event = |min_count: u64| {
        standin.events().into_iter().find(|e| {
            e["reason"] == "EdgeSessionUp"
                && e.pointer("/series/count")
                    .and_then(|c| c.as_u64())
                    .unwrap_or(1)
                    >= min_count
        })
    };
    let routes_of = async || -> Result<Option<Vec<Cidr>>> {
        Ok(sessions(admin)
            .await?
            .into_iter()
            .find(|s| s.node == "edge-0")
            .map(|s| s.routes))
    };

    let mut step = "edge up";
    let mut edges = Vec::new();
    let run = async {
        // Edge up: a certificate from the token (tokenreviews create, pods
        // get), then the Node list (nodes list).
        let e = edge()?;
        e.wait_connected(bound).await.context("not connected")?;
        edges.push(e);
        // Condition written: first use GETs nodes/status, then applies.
        step = "condition written";
        eventually(bound, async || {
            Ok((condition().as_deref() == Some("True")).then_some(()))
        })
        .await?;
        // Event published: events create.
        step = "event published";
        eventually(bound, async || Ok(up_event(1).map(|_| ()))).await?;
        // The edge goes and comes back: condition False, and the repeated
        // "up" is folded into the first event's series (events patch).
        step = "edge down and back, event series";
        if let Some(e) = edges.pop() {
            e.shutdown().await;
        }
        eventually(bound, async || {
            Ok((condition().as_deref() == Some("False")).then_some(()))
        })
        .await?;
        let e = edge()?;
        e.wait_connected(bound).await.context("not reconnected")?;
        edges.push(e);
        eventually(bound, async || Ok(up_event(2).map(|_| ()))).await?;
        // Node changed: the watch delivers it, routes follow.
        step = "node changed";
        let new: Cidr = "127.1.77.0/24".parse()?;
        standin.upsert_node(node("127.1.77.0/24"));
        eventually(bound, async || {
            Ok(routes_of().await?.filter(|r| r.contains(&new)).map(|_| ()))
        })
        .await?;
        // The CNI's IPAM objects, created after the relay listed them
        // (blockaffinities and ciliumnodes list, then watch): served.
        step = "calico block watched";
        let block: Cidr = "127.1.78.0/26".parse()?;
        standin.upsert_custom(
            Crd::CalicoBlockAffinities,
            block_affinity("edge-0", "127.1.78.0/26", "confirmed", false),
        );
        eventually(bound, async || {
            Ok(routes_of()
                .await?
                .filter(|r| r.contains(&block))
                .map(|_| ()))
        })
        .await?;
        // With the block known, Calico's IPAMConfig is read: strict, so
        // /readyz has nothing to say about it (whether or not it is
        // ready: the service rules' removals make it 503).
        step = "calico strictAffinity read";
        let strict = "relay_ipam_calico_strict_affinity{state=\"strict\"} 1";
        eventually(bound, async || {
            let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
            Ok(m.lines().any(|l| l == strict).then_some(()))
        })
        .await?;
        let (_, body) = relay_lab::admin_get(admin, "/readyz", None).await?;
        ensure!(!body.contains("strictAffinity"), "readyz: {body}");
        step = "cilium range watched";
        let range: Cidr = "127.1.79.0/24".parse()?;
        standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-0", &["127.1.79.0/24"]));
        eventually(bound, async || {
            Ok(routes_of()
                .await?
                .filter(|r| r.contains(&range))
                .map(|_| ()))
        })
        .await?;
        // Node deleted: the watch delivers it, the session closes.
        step = "node deleted";
        standin.delete_node("edge-0");
        eventually(bound, async || {
            Ok(routes_of().await?.is_none().then_some(()))
        })
        .await?;
        if let Some(e) = edges.first() {
            eventually(bound, async || {
                Ok(matches!(e.state(), EdgeState::Rejected { .. }).then_some(()))
            })
            .await
            .context("reconnect not refused")?;
        }
        // The service directory: LIST of Services and EndpointSlices
        // (services list, endpointslices list) ...
        step = "services listed";
        let web: std::net::SocketAddr = "10.96.0.10:80".parse()?;
        let (svc, slice) = service_with_slice("web", web, "10.244.7.5");
        standin.upsert_service(svc);
        standin.upsert_endpointslice(slice);
        let client = KubeClientConfig::Kubeconfig {
            path: standin.kubeconfig_path().to_path_buf(),
            context: None,
        }
        .client(&ClientOptions::default())
        .await?;
        let services = ServiceDirectory::spawn(&client, &ServiceDirectoryOptions::default());
        let endpoint_of = |vip| {
            services.with_table(|t| {
                t.lookup(vip, Protocol::Tcp)
                    .and_then(|e| e.endpoints.first().map(|e| e.addr()))
            })
        };
        services.wait_synced(bound).await?;
        ensure!(
            endpoint_of(web) == Some("10.244.7.5:8080".parse()?),
            "web: {:?}",
            endpoint_of(web)
        );
        // ... then WATCH from there (services watch, endpointslices
        // watch): a Service and a slice created afterwards arrive. Both
        // are needed: the entry has its endpoint only once both came.
        step = "service change watched";
        let api: std::net::SocketAddr = "10.96.0.11:443".parse()?;
        let (svc, slice) = service_with_slice("api", api, "10.244.7.6");
        standin.upsert_service(svc);
        standin.upsert_endpointslice(slice);
        let want = Some("10.244.7.6:8080".parse()?);
        eventually(bound, async || Ok((endpoint_of(api) == want).then_some(()))).await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let failed = run.err().map(|e| (step, format!("{e:#}")));
    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    let forbidden = standin
        .forbidden()
        .iter()
        .map(|r| r.verb_resource())
        .collect();
    Ok(Outcome { failed, forbidden })
}

/// Stand-in enforcing the manifests' RBAC, not a real apiserver (see the
/// module doc).
#[tokio::test]
async fn the_manifests_rbac_allows_the_whole_session_lifecycle() -> Result<()> {
    relay_lab::init();
    let rules = manifest_rules();
    assert!(!rules.is_empty());
    let o = lifecycle(rules, Duration::from_secs(15)).await?;
    if let Some((step, e)) = &o.failed {
        bail!("step {step:?} failed: {e}; 403s: {:?}", o.forbidden);
    }
    assert!(o.forbidden.is_empty(), "403s: {:?}", o.forbidden);
    Ok(())
}

/// Stand-in enforcing the manifests' RBAC minus one verb or one rule, not
/// a real apiserver (see the module doc).
#[tokio::test]
async fn every_rule_and_every_verb_of_the_manifests_rbac_is_needed() -> Result<()> {
    relay_lab::init();
    let rules = manifest_rules();
    // Variants: each verb of each rule removed, then each whole rule, then
    // the Role's rules moved out of the edge namespace.
    let mut variants: Vec<(String, Vec<PolicyRule>)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for v in &r.verbs {
            let mut less = rules.clone();
            less[i].verbs.retain(|x| x != v);
            if less[i].verbs.is_empty() {
                less.remove(i);
            }
            variants.push((format!("{v} {}", r.resources.join(",")), less));
        }
    }
    for (i, r) in rules.iter().enumerate() {
        let mut less = rules.clone();
        less.remove(i);
        variants.push((format!("rule {}", r.describe()), less));
    }
    // The Role's rules in a namespace the relay does not read: as good as
    // none, so the Role must be in the edge namespace.
    for (i, r) in rules.iter().enumerate() {
        if r.namespace.is_some() {
            let mut moved = rules.clone();
            moved[i].namespace = Some("elsewhere".into());
            variants.push((
                format!(
                    "the {} Role in its namespace (moved)",
                    r.resources.join(",")
                ),
                moved,
            ));
        }
    }
    // Concurrently, each against its own stand-in and relay on loopback.
    let runs = variants
        .into_iter()
        .map(|(name, less)| async move { (name, lifecycle(less, Duration::from_secs(6)).await) });
    let mut report = Vec::new();
    let mut unused = Vec::new();
    for (name, o) in futures::future::join_all(runs).await {
        let o = o?;
        let step = o.failed.as_ref().map_or("none (passed)", |(s, _)| *s);
        let mut seen = o.forbidden.clone();
        seen.dedup();
        report.push(format!(
            "  without {name:<58} fails at {step:<34} 403: {seen:?}"
        ));
        if o.failed.is_none() || o.forbidden.is_empty() {
            unused.push(name);
        }
    }
    eprintln!("RBAC removals (stand-in):\n{}", report.join("\n"));
    assert!(
        unused.is_empty(),
        "removals with no failure or no 403 (unneeded rules): {unused:?}"
    );
    Ok(())
}

/// Stand-in enforcing the manifests' RBAC, not a real apiserver (see the
/// module doc): the relay's pod reader, as the relay's user, reads the
/// edge-client pod in the edge namespace, and a pod GET anywhere else is
/// answered 403 (recorded by the stand-in), even for a pod that exists.
#[tokio::test]
async fn a_pod_outside_the_edge_namespace_is_forbidden_to_the_relay() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn_with_rbac(manifest_rules()).await?;
    standin.upsert_pod(edge_pod());
    standin.upsert_pod(daemonset_pod(
        "kube-system",
        "kube-proxy-0",
        "uid-1",
        "edge-0",
        "kube-proxy",
        "kube-proxy",
    ));
    let client = KubeClientConfig::Kubeconfig {
        path: standin.kubeconfig_path().to_path_buf(),
        context: None,
    }
    .client(&ClientOptions::default())
    .await?;
    let timeout = Duration::from_secs(5);
    // In the edge namespace (what the bootstrap reads): allowed.
    let here = PodReader::new(&client, EDGE_NS, timeout)
        .get("edge-client-0")
        .await?;
    ensure!(
        here.as_ref().and_then(|p| p.uid.as_deref()) == Some("uid-0"),
        "edge pod: {here:?}"
    );
    ensure!(
        standin.forbidden().is_empty(),
        "403s: {:?}",
        standin.forbidden()
    );
    // Anywhere else: forbidden, not merely absent.
    match PodReader::new(&client, "kube-system", timeout)
        .get("kube-proxy-0")
        .await
    {
        Err(KubeError::Api {
            status: Some(403), ..
        }) => {}
        other => bail!("a pod in kube-system was not forbidden to the relay: {other:?}"),
    }
    let forbidden: Vec<(String, String)> = standin
        .forbidden()
        .iter()
        .map(|r| (r.verb_resource(), r.path.clone()))
        .collect();
    ensure!(
        forbidden
            == [(
                "get pods".to_string(),
                "/api/v1/namespaces/kube-system/pods/kube-proxy-0".to_string()
            )],
        "403s: {forbidden:?}"
    );
    Ok(())
}
