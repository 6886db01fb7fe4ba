//! Pod prefixes from the CNI's own IPAM: an edge whose Node has no
//! `spec.podCIDRs` (Calico's IPAM ignores them; Cilium's cluster-pool
//! IPAM writes its ranges elsewhere) serves the blocks Calico's
//! `BlockAffinity` objects and the ranges its `CiliumNode` give it.
//!
//! No kube-apiserver can run on this machine: every test here runs against
//! `relay-kube-standin`, a stand-in speaking the apiserver's REST shapes
//! (list + watch of BlockAffinities and CiliumNodes once a test installs
//! their CRD, 404 before) — NOT a real apiserver, nor a real Calico or
//! Cilium. The relay reaches it through an ordinary kubeconfig, so its
//! production client path is the one under test.
//!
//! The first two tests run on loopback; the third in the network-namespace
//! lab (needs root; skips loudly otherwise, fails instead under CI=true or
//! REQUIRE_LAB=1), a row of `target/lab-kube-ipam.txt`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube_standin::crds::{block_affinity, cilium_node};
use relay_kube_standin::{kubelet_node, Crd, StandIn};
use relay_lab::cluster::Cluster;
use relay_lab::edges::WatchedEdge;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    captured_prefixes, http_from, sa, services, session, start_relay, wait_captured, within, Table,
    HTTP, QUIC_PORT,
};
use relay_lab::{connect_via, http_get, sessions, spawn_http};
use relay_protocol::Cidr;
use relay_server::config::KubeSettings;
use relay_server::{Relay, RelayConfig};
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;

/// Anything that should happen "within seconds".
const BOUND: Duration = Duration::from_secs(15);

fn node_ip(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + i])
}

/// Node `edge-i` as a kubelet registers it, with `pod_cidrs`.
fn node(i: u8, pod_cidrs: &[&str]) -> relay_kube_standin::k8s_openapi::api::core::v1::Node {
    kubelet_node(
        &format!("edge-{i}"),
        pod_cidrs,
        &[("InternalIP", &node_ip(i).to_string())],
    )
}

/// A relay in Kubernetes mode on loopback pointed at `standin`, with
/// `127.9.0.0/16` as its cloud range.
async fn relay(standin: &StandIn, pki: &DevPki) -> Result<Relay> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.quic.keepalive = Duration::from_millis(500);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.tunnel_routes = vec!["127.9.0.0/16".parse()?];
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout: Duration::from_secs(3),
        ..KubeSettings::default()
    });
    Ok(Relay::spawn(cfg).await?)
}

fn edge(relay: &Relay, pki: &DevPki, node: &str) -> Result<EdgeClient> {
    let cfg = EdgeConfig::new(
        node,
        relay.quic_addr().to_string(),
        "localhost",
        pki.node_material(node)?,
    );
    ensure!(cfg.routes.is_empty() && cfg.primary_addr.is_none());
    Ok(EdgeClient::spawn(cfg))
}

async fn routes_of(relay: &Relay, node: &str) -> Result<Option<Vec<Cidr>>> {
    let admin = relay.admin_addr().context("admin listener")?;
    Ok(sessions(admin)
        .await?
        .into_iter()
        .find(|s| s.node == node)
        .map(|s| {
            let mut r = s.routes;
            r.sort();
            r
        }))
}

fn served(e: &EdgeClient) -> Vec<Cidr> {
    match e.state() {
        EdgeState::Connected { served_routes, .. } => {
            let mut r = served_routes.clone();
            r.sort();
            r
        }
        _ => Vec::new(),
    }
}

/// Polls `f` every 50 ms until it yields `Some`, at most `BOUND`.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(start.elapsed() < BOUND, "{what}: not within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cidrs(v: &[&str]) -> Vec<Cidr> {
    let mut v: Vec<Cidr> = v.iter().map(|c| c.parse().expect("a CIDR")).collect();
    v.sort();
    v
}

/// Stand-in, not a real apiserver (see the module doc). Two edges whose
/// Nodes have no pod CIDR: edge-0 is served its confirmed Calico block
/// (not its pending one, nor blocks inside `tunnel_routes` or another
/// node's pod CIDR), edge-1 its CiliumNode's range; the relay routes a
/// CONNECT to a pod address in the block to edge-0; a block confirmed
/// later reaches the edge without a reconnect.
#[tokio::test]
async fn edges_without_pod_cidrs_serve_their_calico_blocks_and_cilium_ranges() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.upsert_node(node(0, &[]));
    standin.upsert_node(node(1, &[]));
    standin.upsert_node(node(2, &["127.1.2.0/24"]));
    let ba = |node: &str, cidr: &str, state: &str| {
        standin.upsert_custom(
            Crd::CalicoBlockAffinities,
            block_affinity(node, cidr, state, false),
        );
    };
    ba("edge-0", "127.1.0.0/26", "confirmed");
    ba("edge-0", "127.1.0.64/26", "pending");
    // Not edge-0's to take: inside the cloud's range, inside edge-2's.
    ba("edge-0", "127.9.1.0/26", "confirmed");
    ba("edge-0", "127.1.2.0/26", "confirmed");
    standin.upsert_custom(Crd::CiliumNodes, cilium_node("edge-1", &["127.1.1.0/24"]));
    let pki = DevPki::generate(&["localhost"], &["edge-0", "edge-1"])?;
    let relay = relay(&standin, &pki).await?;
    let (web, _w) = spawn_http(SocketAddr::new("127.1.0.5".parse()?, 0), "pod in block").await?;

    let e0 = edge(&relay, &pki, "edge-0")?;
    let (_, g0) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let want0 = cidrs(&["127.1.0.0/26", "127.0.0.2/32"]);
    assert_eq!(routes_of(&relay, "edge-0").await?, Some(want0.clone()));
    assert_eq!(served(&e0), want0, "the edge learns (and captures) it");
    let e1 = edge(&relay, &pki, "edge-1")?;
    e1.wait_connected(BOUND).await.context("edge-1 connects")?;
    let want1 = cidrs(&["127.1.1.0/24", "127.0.0.3/32"]);
    assert_eq!(routes_of(&relay, "edge-1").await?, Some(want1.clone()));
    assert_eq!(served(&e1), want1);

    // The two blocks not taken are named where operators look: the
    // session's admin row (and so the Node condition) and a gauge.
    let admin = relay.admin_addr().context("admin listener")?;
    let row = sessions(admin)
        .await?
        .into_iter()
        .find(|s| s.node == "edge-0")
        .context("edge-0's row")?;
    assert_eq!(row.refused_ranges, cidrs(&["127.1.2.0/26", "127.9.1.0/26"]));
    let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
    for line in [
        // edge-0's two, and node 2's pod CIDR: set where most Nodes have
        // none (the CNI allocates), it is vetted as a block is, and it
        // overlaps edge-0's block (neither is taken: neither is sure).
        "relay_ipam_prefixes_refused 3",
        "relay_ipam_source_state{resource=\"blockaffinities.crd.projectcalico.org\",state=\"listed\"} 1",
        "relay_ipam_source_state{resource=\"ciliumnodes.cilium.io\",state=\"listed\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }

    // The relay routes the block's addresses to edge-0.
    let connect = relay.connect_addr().context("connect listener")?;
    let s = connect_via(connect, &web.to_string()).await?;
    let (code, body) = http_get(s, "x", "/", None).await?;
    assert_eq!(
        (code, body.trim()),
        (200, "hello from pod in block"),
        "CONNECT {web}"
    );

    // The Node condition names them too.
    let message = || {
        relay_lab::cluster::condition_of(&standin, "edge-0")
            .map(|(_, _, m)| m)
            .unwrap_or_default()
    };
    eventually("the condition names the refused blocks", async || {
        Ok(message()
            .ends_with("through the tunnel): 127.1.2.0/26, 127.9.1.0/26")
            .then_some(()))
    })
    .await?;

    // The pending block is confirmed, another block is refused: the first
    // served, the second named in the condition, without a reconnect.
    ba("edge-0", "127.1.0.64/26", "confirmed");
    ba("edge-0", "127.9.2.0/26", "confirmed");
    let want0 = cidrs(&["127.1.0.0/26", "127.1.0.64/26", "127.0.0.2/32"]);
    eventually("the confirmed block served", async || {
        Ok((served(&e0) == want0).then_some(()))
    })
    .await?;
    eventually("the condition follows the directory", async || {
        Ok(message()
            .ends_with("through the tunnel): 127.1.2.0/26, 127.9.1.0/26, 127.9.2.0/26")
            .then_some(()))
    })
    .await
    .with_context(message)?;
    assert_eq!(e0.wait_connected(BOUND).await.map(|c| c.1), Some(g0));
    for e in [e0, e1] {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc). Without Calico's
/// or Cilium's CRDs the relay works as before (the Node's pod CIDR and
/// address), asks for each resource once at start, and watches neither.
#[tokio::test]
async fn a_cluster_without_the_crds_works_as_before_and_is_asked_once() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.upsert_node(node(0, &["127.1.0.0/24"]));
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let relay = relay(&standin, &pki).await?;
    let e0 = edge(&relay, &pki, "edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    assert_eq!(
        routes_of(&relay, "edge-0").await?,
        Some(cidrs(&["127.1.0.0/24", "127.0.0.2/32"]))
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = |vr: &str| {
        standin
            .requests()
            .iter()
            .filter(|r| r.verb_resource() == vr)
            .map(|r| r.status)
            .collect::<Vec<_>>()
    };
    assert_eq!(asked("list blockaffinities"), [404]);
    assert_eq!(asked("list ciliumnodes"), [404]);
    assert!(asked("watch blockaffinities").is_empty());
    assert!(asked("watch ciliumnodes").is_empty());
    e0.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in enforcing the manifests' RBAC without the BlockAffinity rule,
/// not a real apiserver (see the module doc): the relay is ready (Nodes'
/// pod CIDRs still route) and says in `/readyz` and `/metrics` that
/// Calico's blocks cannot be read, so an operator whose edges' pods are
/// unreachable on a Calico cluster sees why without reading logs.
#[tokio::test]
async fn an_unreadable_ipam_resource_shows_in_readyz_and_metrics() -> Result<()> {
    use relay_kube_standin::cluster_role_rules;
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    let mut rules = cluster_role_rules(
        include_str!("../../deploy/kubernetes/base/rbac.yaml"),
        "edge-relay:relay-server",
    )?;
    let before = rules.len();
    rules.retain(|r| !r.resources.iter().any(|x| x == "blockaffinities"));
    ensure!(rules.len() + 1 == before, "one rule names blockaffinities");
    standin.set_rbac(Some(rules));
    standin.install_crd(Crd::CalicoBlockAffinities);
    standin.upsert_node(node(0, &["127.1.0.0/24"]));
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let relay = relay(&standin, &pki).await?;
    let admin = relay.admin_addr().context("admin listener")?;
    let body = eventually("ready", async || {
        let (code, body) = relay_lab::admin_get(admin, "/readyz", None).await?;
        Ok((code == 200).then_some(body))
    })
    .await?;
    ensure!(
        body.contains(
            "CNI IPAM pod ranges not (yet) read: blockaffinities.crd.projectcalico.org forbidden"
        ),
        "readyz: {body}"
    );
    ensure!(!body.contains("ciliumnodes"), "absent is not news: {body}");
    let (_, m) = relay_lab::admin_get(admin, "/metrics", None).await?;
    for line in [
        "relay_ipam_source_state{resource=\"blockaffinities.crd.projectcalico.org\",state=\"forbidden\"} 1",
        "relay_ipam_source_state{resource=\"blockaffinities.crd.projectcalico.org\",state=\"listed\"} 0",
        "relay_ipam_source_state{resource=\"ciliumnodes.cilium.io\",state=\"absent\"} 1",
        "relay_kube_watch_errors_total{watch=\"ipam\"} 0",
    ] {
        ensure!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    // The Node's own pod CIDR still routes.
    let e0 = edge(&relay, &pki, "edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    assert_eq!(
        routes_of(&relay, "edge-0").await?,
        Some(cidrs(&["127.1.0.0/24", "127.0.0.2/32"]))
    );
    e0.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Namespace lab, stand-in (not a real apiserver): edge1's Node has no
/// pod CIDR, Calico's BlockAffinity gives it the /26 its pod is in; the
/// relay node captures that block, edge1 is served it, and a cloud pod
/// reaches the edge pod (and the edge pod the cloud pod, through the
/// edge's capture).
#[test]
fn a_cloud_pod_reaches_an_edge_pod_in_a_calico_block() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED kube_ipam: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let lab = NetnsLab::with_prefix("ki")?;
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Cpod1, "cpod1")?,
    ];
    let pki = DevPki::generate(&["relay.lab"], &["edge1"])?;
    let cluster = Cluster::start(&lab)?;
    let block = cluster.calico_block_for(&lab, 1)?;
    let mut cfg = relay_lab::scenario::relay_config(&pki)?;
    cfg.nodes.clear();
    cfg.kubernetes = Some(cluster.relay_settings());
    let _relay = start_relay(&lab, cfg)?;
    let mut ecfg = EdgeConfig::new(
        "edge1",
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        pki.node_material("edge1")?,
    );
    ecfg.capture = Some(CaptureConfig::default());
    let e1 = WatchedEdge::start(&lab, Role::Edge1, ecfg)?;
    let mut m = Table::new(&["case", "what", "result"]);
    let want = {
        let mut w = vec![block, Cidr::host(IpAddr::V4(netns::edge_host_ip(1)))];
        w.sort();
        w
    };
    m.note(
        &["block served", "edge1: admin row"],
        e1.connected(BOUND).and_then(|_| {
            let mut got = session(&lab, "edge1")?.context("no session")?.routes;
            got.sort();
            ensure!(got == want, "{got:?}, want {want:?}");
            Ok(format!("{got:?}"))
        }),
    );
    let pod = netns::edge_pod_ip(1);
    m.check(
        &[
            "cloud pod (relay node) → edge pod",
            &format!("cpod1 → {pod}"),
        ],
        "epod1",
        within(BOUND, || {
            Ok(captured_prefixes(&lab)?.contains(&block.to_string()))
        })
        .and_then(|_| http_from(&lab, Role::Cpod1, sa(pod, HTTP))),
    );
    m.check(
        &[
            "edge pod → cloud pod (edge capture)",
            &format!("epod1 → {}", netns::CPOD1_IP),
        ],
        "cpod1",
        // edge1's capture of the cloud's ranges comes from the route list
        // it is sent, possibly after it reported itself connected.
        wait_captured(&lab, Role::Edge1, netns::CPOD1_IP, BOUND)
            .and_then(|_| http_from(&lab, Role::Epod1, sa(netns::CPOD1_IP, HTTP))),
    );
    let footer = format!(
        "{} of {} cells passed in {:?} (apiserver: relay-kube-standin, not a real kube-apiserver)",
        m.passed(),
        m.rows.len(),
        t0.elapsed()
    );
    m.publish("lab-kube-ipam.txt", &footer);
    let failed = m.failed();
    if !failed.is_empty() {
        bail!("failed: {failed:?}");
    }
    Ok(())
}
