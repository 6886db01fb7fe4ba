//! The relay while the apiserver is away or not listed yet (see
//! `kube.rs`): API trouble never drops live sessions; `/readyz` and
//! CONNECTs wait for the first list (kubelet traffic for the Nodes only);
//! a relay started while the API is down works from its caches.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube_standin::StandIn;
use relay_lab::cluster::LabService;
use relay_lab::netns::Proto;
use relay_lab::{admin_get, spawn_http};
use relay_protocol::RejectReason;
use relay_server::config::KubeSettings;
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;

use super::{
    connect_answer, eventually, fetch, node, node_ip, pod_cidr, rejected, relay_config, KubeLab,
    BOUND,
};

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn api_trouble_never_drops_live_sessions() -> Result<()> {
    let lab = KubeLab::start(1, &[]).await?;
    let e0 = lab.edge("edge-0")?;
    let (_, generation) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let same = |e: &EdgeClient| matches!(e.state(), EdgeState::Connected { generation: g, .. } if g == generation);
    // An in-stream 410 Gone forces a relist.
    lab.standin.inject_gone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(same(&e0), "410 dropped the session: {:?}", e0.state());
    // The API answers 503 for a while, then is unreachable, then returns.
    lab.standin.set_unavailable(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.standin.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        same(&e0),
        "an API outage dropped the session: {:?}",
        e0.state()
    );
    assert_eq!(lab.routes_of("edge-0").await?.map(|r| r.len()), Some(2));
    lab.standin.set_unavailable(false);
    lab.standin.start().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        same(&e0),
        "the API's return dropped the session: {:?}",
        e0.state()
    );
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn readyz_waits_for_the_first_list() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.set_unavailable(true);
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        ..KubeSettings::default()
    });
    let relay = Relay::spawn(cfg).await?;
    let admin = relay.admin_addr().context("admin")?;
    let (code, body) = admin_get(admin, "/readyz", None).await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not loaded yet"), "{body}");
    standin.set_unavailable(false);
    eventually("ready", async || {
        Ok((admin_get(admin, "/readyz", None).await?.0 == 200).then_some(()))
    })
    .await?;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A CONNECT that arrives before the first lists waits for them, then is
/// decided on what they say: an edge's pod address is the edge's (502, no
/// session), where before the lists nothing claimed it and the relay
/// judged it as a cloud address. Past the bound (the dial timeout), 503.
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn connect_waits_for_the_first_list() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.upsert_node(node(0));
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let relay_with = |dial: Duration| -> Result<RelayConfig> {
        let mut cfg = RelayConfig::loopback(pki.relay_material()?);
        cfg.limits.dial_timeout = dial;
        cfg.kubernetes = Some(KubeSettings {
            edge_address_ranges: relay_lab::loopback_node_ranges(),
            kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
            ..KubeSettings::default()
        });
        Ok(cfg)
    };
    // Lists answered after 1 s: the CONNECT sent at once waits for them.
    standin.set_latency(Duration::from_secs(1), Duration::ZERO);
    let relay = Relay::spawn(relay_with(Duration::from_secs(10))?).await?;
    let pod = format!("{}:80", pod_cidr(0).replace(".0/24", ".5"));
    let t = std::time::Instant::now();
    let (code, line) = connect_answer(relay.connect_addr().context("connect")?, &pod).await?;
    ensure!(
        code == 502 && line.contains("belongs to edge node edge-0"),
        "CONNECT {pod} before the first list: {code} {line}"
    );
    ensure!(
        t.elapsed() >= Duration::from_millis(900),
        "answered before the lists"
    );
    relay.shutdown(Duration::from_secs(1)).await;

    // No API at all: 503 within the bound, not a hang.
    standin.set_latency(Duration::ZERO, Duration::ZERO);
    standin.set_unavailable(true);
    let relay = Relay::spawn(relay_with(Duration::from_secs(1))?).await?;
    let t = std::time::Instant::now();
    let (code, line) = connect_answer(relay.connect_addr().context("connect")?, &pod).await?;
    ensure!(code == 503 && line.contains("not_ready"), "{code} {line}");
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "503 after {:?}",
        t.elapsed()
    );
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A Service watch that cannot load (no RBAC on EndpointSlices) keeps
/// `/readyz` at 503 and makes CONNECTs to Service addresses wait their
/// bound, but not kubelet traffic: `CONNECT <node>:<port>` and the node's
/// address need only the Nodes. Stand-in, not a real apiserver (see the
/// module doc): it enforces these rules as kube-apiserver's RBAC does.
#[tokio::test]
async fn kubelet_connects_do_not_wait_for_services() -> Result<()> {
    use relay_kube_standin::PolicyRule;
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.upsert_node(node(0));
    // Everything but the discovery group (EndpointSlices).
    let rule = |groups: &[&str]| PolicyRule {
        api_groups: groups.iter().map(|g| g.to_string()).collect(),
        resources: vec!["*".into()],
        verbs: vec!["*".into()],
        resource_names: Vec::new(),
        non_resource_urls: Vec::new(),
        namespace: None,
    };
    standin.set_rbac(Some(vec![rule(&[
        "",
        "events.k8s.io",
        "coordination.k8s.io",
        "authentication.k8s.io",
    ])]));
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.limits.dial_timeout = Duration::from_secs(1);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        ..KubeSettings::default()
    });
    let relay = Relay::spawn(cfg).await?;
    let (web, _w) = spawn_http(SocketAddr::new(node_ip(0), 0), "edge-0 kubelet").await?;
    let e0 = EdgeClient::spawn(EdgeConfig::new(
        "edge-0",
        relay.quic_addr().to_string(),
        "localhost",
        pki.node_material("edge-0")?,
    ));
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let connect = relay.connect_addr().context("connect")?;
    for authority in [
        format!("edge-0:{}", web.port()),
        format!("edge-0.site.example:{}", web.port()),
        SocketAddr::new(node_ip(0), web.port()).to_string(),
    ] {
        let t = std::time::Instant::now();
        assert_eq!(
            fetch(connect, &authority).await?,
            "edge-0 kubelet",
            "{authority}"
        );
        ensure!(
            t.elapsed() < Duration::from_millis(900),
            "CONNECT {authority} waited {:?} for the Service watch",
            t.elapsed()
        );
    }
    // A ClusterIP-like address no node claims waits for the Services, in
    // vain: 503 after the bound.
    let (code, line) = connect_answer(connect, "10.96.0.10:53").await?;
    ensure!(code == 503 && line.contains("not_ready"), "{code} {line}");
    let (code, body) = admin_get(relay.admin_addr().context("admin")?, "/readyz", None).await?;
    // It says why, briefly: the watch's 403, not the apiserver's words.
    ensure!(
        code == 503 && body.contains("last watch error: endpointslices: HTTP 403 Forbidden"),
        "{code} {body}"
    );
    ensure!(!body.contains("system:serviceaccount"), "{body}");
    e0.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A relay whose container restarts while the apiserver is unreachable
/// (the kubelet restarts it without the control plane) admits edges on
/// the Node claims it cached, and still refuses a node the cache does not
/// hold, and resolves a Service with an endpoint at an edge, by name and
/// by ClusterIP, from the Services it cached; without the caches it
/// refuses every edge until the first list.
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_relay_started_while_the_api_is_down_works_from_its_caches() -> Result<()> {
    let lab = KubeLab::start(2, &["edge-9"]).await?;
    let cache = std::env::temp_dir().join(format!("relay-caches-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    // Service shop/web: one endpoint, a pod on edge-1.
    let pod: IpAddr = pod_cidr(1).replace(".0/24", ".5").parse()?;
    let (web, _w) = spawn_http(SocketAddr::new(pod, 0), "web on edge-1").await?;
    let vip: SocketAddr = "10.96.0.30:80".parse()?;
    let service = LabService {
        endpoints: vec![(web, "edge-1")],
        ..LabService::on_lab_ports("shop", "web", vip, Proto::Tcp, &[])
    };
    let (svc, slice) = service.objects();
    lab.standin.upsert_service(svc);
    lab.standin.upsert_endpointslice(slice);
    let first = Relay::spawn(relay_config(&lab.standin, &lab.pki, Some(&cache))?).await?;
    let e0 = lab.edge_of(&first, "edge-0")?;
    e0.wait_connected(BOUND)
        .await
        .context("edge-0 on the first relay")?;
    eventually("the caches written", async || {
        let nodes = std::fs::read_to_string(cache.join("nodes.json")).unwrap_or_default();
        let services = std::fs::read_to_string(cache.join("services.json")).unwrap_or_default();
        Ok((nodes.contains("\"edge-0\"")
            && nodes.contains("\"edge-1\"")
            && services.contains("\"web-1\""))
        .then_some(()))
    })
    .await?;
    e0.shutdown().await;
    first.shutdown(Duration::from_secs(1)).await;
    lab.standin.set_unavailable(true);

    let restarted = Relay::spawn(relay_config(&lab.standin, &lab.pki, Some(&cache))?).await?;
    let e1 = lab.edge_of(&restarted, "edge-1")?;
    let t = std::time::Instant::now();
    e1.wait_connected(BOUND)
        .await
        .with_context(|| format!("edge-1 on the restarted relay: {:?}", e1.state()))?;
    eprintln!(
        "restarted with the API down: edge-1 admitted after {:?}",
        t.elapsed()
    );
    let (_, ready) = admin_get(restarted.admin_addr().context("admin")?, "/readyz", None).await?;
    ensure!(ready.contains("nodes from the cache written"), "{ready}");
    ensure!(ready.contains("services from the cache written"), "{ready}");
    let connect = restarted.connect_addr().context("connect")?;
    for target in ["web.shop.svc.cluster.local:80".to_string(), vip.to_string()] {
        assert_eq!(fetch(connect, &target).await?, "web on edge-1", "{target}");
    }
    let ghost = lab.edge_of(&restarted, "edge-9")?;
    let r = eventually("edge-9 refused", async || Ok(rejected(&ghost))).await?;
    assert_eq!(r, RejectReason::UnknownNode);
    ghost.shutdown().await;
    e1.shutdown().await;
    restarted.shutdown(Duration::from_secs(1)).await;

    // The same restart without the caches: refused until the first list.
    let bare = Relay::spawn(relay_config(&lab.standin, &lab.pki, None)?).await?;
    let e1 = lab.edge_of(&bare, "edge-1")?;
    let r = eventually("edge-1 refused without the cache", async || {
        Ok(rejected(&e1))
    })
    .await?;
    assert_eq!(r, RejectReason::Overloaded);
    e1.shutdown().await;
    bare.shutdown(Duration::from_secs(1)).await;
    lab.standin.set_unavailable(false);
    lab.relay.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

/// A SIGTERM while a handshake waits for the first Node list: the
/// handshake, let through once the list arrives, is refused as the relay
/// is shutting down (the edge is told so), not registered as a session
/// the shutdown's drain never saw and then waited for to the end of its
/// grace. Before, this shutdown took the whole grace (20 s) plus a second.
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_handshake_waiting_for_the_first_list_when_shutdown_begins_is_refused() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    standin.upsert_node(node(0));
    let pki = DevPki::generate(&["localhost"], &["edge-0"])?;
    // Lists answered after 3 s: the edge's handshake waits for them in
    // the claim (up to half the handshake timeout, 5 s).
    standin.set_latency(Duration::from_secs(3), Duration::ZERO);
    let relay = Relay::spawn(relay_config(&standin, &pki, None)?).await?;
    let shared = relay.shared().clone();
    let started = std::time::Instant::now();
    let e0 = EdgeClient::spawn(EdgeConfig::new(
        "edge-0",
        relay.quic_addr().to_string(),
        "localhost",
        pki.node_material("edge-0")?,
    ));
    // The hello is checked within milliseconds; the claim then waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        shared.registry.get("edge-0").is_none() && !shared.directory.is_synced(),
        "the handshake did not wait for the list"
    );
    let grace = Duration::from_secs(20);
    let t = std::time::Instant::now();
    let stopping = tokio::spawn(relay.shutdown(grace));
    eventually(
        "the waiting handshake refused as shutting down",
        async || Ok((rejected(&e0) == Some(RejectReason::ShuttingDown)).then_some(())),
    )
    .await?;
    ensure!(
        started.elapsed() >= Duration::from_secs(2),
        "refused before the list arrived: the handshake did not wait in the claim"
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .context("shutdown waited for a session its drain did not know of")??;
    ensure!(
        t.elapsed() < grace,
        "shutdown took {:?}, its whole grace",
        t.elapsed()
    );
    ensure!(
        shared.registry.get("edge-0").is_none(),
        "edge-0 registered during the shutdown"
    );
    e0.shutdown().await;
    Ok(())
}
