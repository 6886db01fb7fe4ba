//! The relay in Kubernetes mode, end to end on loopback: Node objects
//! decide what each edge may claim, edges configured with nothing but the
//! relay's address and their node name, the `EdgeTunnelReady` condition
//! and Events written back.
//!
//! No kube-apiserver can run on this machine: every test here runs against
//! `relay-kube-standin`, a stand-in that speaks the apiserver's REST shapes
//! (list + watch with resourceVersion, bookmarks, in-stream 410, server-side
//! apply on nodes/status, Events) — NOT a real apiserver. The relay reaches
//! it through an ordinary kubeconfig, so its production client path is the
//! one under test.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_lab::cluster::LabService;
use relay_lab::netns::Proto;
use relay_lab::{admin_get, connect_via, http_get, sessions, spawn_http};
use relay_protocol::{Cidr, RejectReason};
use relay_server::config::KubeSettings;
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;

/// Anything that should happen "within seconds".
const BOUND: Duration = Duration::from_secs(15);

/// Edge `i`'s node address (its InternalIP) and pod CIDR on loopback.
fn node_ip(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + i])
}

fn pod_cidr(i: u8) -> String {
    format!("127.1.{i}.0/24")
}

fn node_name(i: u8) -> String {
    format!("edge-{i}")
}

/// Node `edge-i` as a kubelet registers it (with an InternalDNS name, as
/// cloud providers' kubelets add).
fn node(i: u8) -> relay_kube_standin::k8s_openapi::api::core::v1::Node {
    let (ip, host) = (node_ip(i).to_string(), format!("edge-{i}.site.example"));
    let dns = format!("ip-{}.site.internal", ip.replace('.', "-"));
    kubelet_node(
        &node_name(i),
        &[&pod_cidr(i)],
        &[
            ("InternalIP", &ip),
            ("Hostname", &host),
            ("InternalDNS", &dns),
        ],
    )
}

struct KubeLab {
    standin: StandIn,
    pki: DevPki,
    relay: Relay,
}

/// A relay in Kubernetes mode pointed at `standin` through a kubeconfig
/// (no `[nodes]`), keeping its Node and Services caches in `cache_dir`
/// (`nodes.json`, `services.json`) if given.
fn relay_config(
    standin: &StandIn,
    pki: &DevPki,
    cache_dir: Option<&std::path::Path>,
) -> Result<RelayConfig> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.quic.keepalive = Duration::from_millis(500);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    // Offline edges' routes held, so their release by the directory (a
    // Node deleted) is seen.
    cfg.hold_offline_routes = true;
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout: Duration::from_secs(3),
        cache_file: cache_dir.map(|d| d.join("nodes.json")),
        services_cache_file: cache_dir.map(|d| d.join("services.json")),
        ..KubeSettings::default()
    });
    Ok(cfg)
}

impl KubeLab {
    /// A stand-in holding Nodes `edge-0..edge-{n-1}`, and a relay in
    /// Kubernetes mode pointed at it through a kubeconfig (no `[nodes]`).
    async fn start(n: u8, extra_certs: &[&str]) -> Result<KubeLab> {
        relay_lab::init();
        let standin = StandIn::spawn().await?;
        for i in 0..n {
            standin.upsert_node(node(i));
        }
        let mut names: Vec<String> = (0..n).map(node_name).collect();
        names.extend(extra_certs.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = DevPki::generate(&["localhost"], &refs)?;
        let relay = Relay::spawn(relay_config(&standin, &pki, None)?).await?;
        Ok(KubeLab {
            standin,
            pki,
            relay,
        })
    }

    /// An edge configured with only the relay's address and its node name.
    fn edge(&self, node: &str) -> Result<EdgeClient> {
        self.edge_of(&self.relay, node)
    }

    /// [`KubeLab::edge`], to another relay.
    fn edge_of(&self, relay: &Relay, node: &str) -> Result<EdgeClient> {
        let cfg = EdgeConfig::new(
            node,
            relay.quic_addr().to_string(),
            "localhost",
            self.pki.node_material(node)?,
        );
        ensure!(cfg.routes.is_empty() && cfg.primary_addr.is_none());
        Ok(EdgeClient::spawn(cfg))
    }

    fn admin(&self) -> SocketAddr {
        self.relay.admin_addr().expect("admin listener")
    }

    fn connect(&self) -> SocketAddr {
        self.relay.connect_addr().expect("connect listener")
    }

    /// The routes the relay serves for `node`'s session, if it has one.
    async fn routes_of(&self, node: &str) -> Result<Option<Vec<Cidr>>> {
        Ok(sessions(self.admin())
            .await?
            .into_iter()
            .find(|s| s.node == node)
            .map(|s| s.routes))
    }

    /// `EdgeTunnelReady` on `node` as stored: (status, reason, message).
    fn condition(&self, node: &str) -> Option<(String, String, String)> {
        relay_lab::cluster::condition_of(&self.standin, node)
    }
}

/// Polls `f` every 50 ms until it yields `Some`, at most `BOUND`.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(start.elapsed() < BOUND, "{what}: not within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fetch(connect: SocketAddr, authority: &str) -> Result<String> {
    let s = connect_via(connect, authority).await?;
    let (code, body) = http_get(s, "x", "/", None).await?;
    ensure!(code == 200, "{authority}: HTTP {code}");
    // spawn_http answers "hello from <name>".
    Ok(body.trim().trim_start_matches("hello from ").to_string())
}

fn rejected(e: &EdgeClient) -> Option<RejectReason> {
    match e.state() {
        EdgeState::Rejected { reason, .. } => Some(reason),
        _ => None,
    }
}

/// Stand-in, not a real apiserver (see the module doc). Communities from
/// Node labels: two edges see each other's routes only while both carry
/// the same `node-restriction.kubernetes.io/edge-relay-community-<name>`
/// label; the change reaches the edges without a reconnect.
#[tokio::test]
async fn node_labels_put_edges_in_communities() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let e0 = lab.edge("edge-0")?;
    let e1 = lab.edge("edge-1")?;
    let (_, g0) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    e1.wait_connected(BOUND).await.context("edge-1 connects")?;
    let other: Cidr = pod_cidr(1).parse()?;
    let sees = |e: &EdgeClient| match e.state() {
        EdgeState::Connected { tunnel_routes, .. } => tunnel_routes.contains(&other),
        _ => false,
    };
    // No community anywhere: isolated (give the feed time to say so).
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(!sees(&e0), "edge-0 sees edge-1 without a community");
    let label = |i: u8, on: bool| {
        let mut n = node(i);
        if on {
            n.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(
                    format!("{}shops", relay_kube::COMMUNITY_LABEL_PREFIX),
                    String::new(),
                );
        }
        n
    };
    lab.standin.upsert_node(label(0, true));
    lab.standin.upsert_node(label(1, true));
    eventually("edge-0 sees edge-1's pods", async || {
        Ok(sees(&e0).then_some(()))
    })
    .await?;
    lab.standin.upsert_node(label(1, false));
    eventually("edge-0 no longer sees them", async || {
        Ok((!sees(&e0)).then_some(()))
    })
    .await?;
    let (_, g) = e0.wait_connected(BOUND).await.context("still connected")?;
    assert_eq!(g, g0, "no reconnect");
    e0.shutdown().await;
    e1.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn nodes_decide_claims_for_edges_configured_with_only_the_relay_address() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let (web, _w) = spawn_http(SocketAddr::new(node_ip(0), 0), "edge-0 kubelet").await?;
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let want: Vec<Cidr> = vec![pod_cidr(0).parse()?, Cidr::host(node_ip(0))];
    let mut got = lab.routes_of("edge-0").await?.context("session")?;
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted, "routes come from the Node");
    // The edge learned what it serves from the relay, and serves it.
    let EdgeState::Connected { served_routes, .. } = e0.state() else {
        panic!("not connected")
    };
    assert_eq!(served_routes.len(), 2);
    assert_eq!(
        fetch(
            lab.connect(),
            &SocketAddr::new(node_ip(0), web.port()).to_string()
        )
        .await?,
        "edge-0 kubelet"
    );
    // By Node name, by its Hostname address, which differs from the name,
    // and by its InternalDNS name (kube-apiserver's choice when its
    // --kubelet-preferred-address-types puts InternalDNS first).
    assert_eq!(
        fetch(lab.connect(), &format!("edge-0:{}", web.port())).await?,
        "edge-0 kubelet"
    );
    assert_eq!(
        fetch(
            lab.connect(),
            &format!("edge-0.site.example:{}", web.port())
        )
        .await?,
        "edge-0 kubelet"
    );
    let dns = format!(
        "ip-{}.site.internal",
        node_ip(0).to_string().replace('.', "-")
    );
    assert_eq!(
        fetch(lab.connect(), &format!("{dns}:{}", web.port())).await?,
        "edge-0 kubelet"
    );
    // The condition and an event, written by the relay's field manager.
    let (status, reason, msg) =
        eventually("condition True", async || Ok(lab.condition("edge-0"))).await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SessionUp"),
        "{msg}"
    );
    assert!(msg.contains("over quic via relay relay-0"), "{msg}");
    assert_eq!(
        lab.standin
            .condition_owner("edge-0", "EdgeTunnelReady")
            .as_deref(),
        Some("edge-relay")
    );
    eventually("an EdgeSessionUp event", async || {
        Ok(lab
            .standin
            .events()
            .iter()
            .any(|e| e["reason"] == "EdgeSessionUp" && e["regarding"]["name"] == "edge-0")
            .then_some(()))
    })
    .await?;
    let (code, _) = admin_get(lab.admin(), "/readyz", None).await?;
    assert_eq!(code, 200);
    // The edge goes: condition False.
    e0.shutdown().await;
    let (status, reason, _) = eventually("condition False", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn unknown_nodes_and_claims_outside_the_node_are_refused_typed() -> Result<()> {
    let lab = KubeLab::start(1, &["edge-9"]).await?;
    // A certificate the CA signed, but no Node object of that name.
    let ghost = lab.edge("edge-9")?;
    let r = eventually("edge-9 rejected", async || Ok(rejected(&ghost))).await?;
    assert_eq!(r, RejectReason::UnknownNode);
    // A claim outside the Node's podCIDRs and addresses.
    let mut cfg = EdgeConfig::new(
        "edge-0",
        lab.relay.quic_addr().to_string(),
        "localhost",
        lab.pki.node_material("edge-0")?,
    );
    cfg.routes = vec!["10.0.0.0/8".parse()?];
    let greedy = EdgeClient::spawn(cfg);
    let r = eventually("edge-0 rejected", async || Ok(rejected(&greedy))).await?;
    assert_eq!(r, RejectReason::RouteNotAllowed);
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    assert!(
        m.contains("relay_handshake_failures_total{reason=\"unknown_node\"}"),
        "{m}"
    );
    assert!(sessions(lab.admin()).await?.is_empty());
    ghost.shutdown().await;
    greedy.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// An edge's kubelet writes its Node's addresses: those that cannot be
/// its own (the metadata address, a public one, another node's pod
/// address) are not routed to it, so its sessions serve only its pod CIDR
/// and its own address, and a CONNECT to the metadata address is refused
/// rather than sent to the edge. Stand-in, not a real apiserver (see the
/// module doc).
#[tokio::test]
async fn addresses_an_edge_cannot_have_are_not_routed_to_it() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let mut n = node(0);
    let other_pod = pod_cidr(1).replace(".0/24", ".9");
    if let Some(st) = n.status.as_mut() {
        for ip in ["169.254.169.254", "8.8.8.8", other_pod.as_str()] {
            st.addresses.get_or_insert_with(Vec::new).push(
                relay_kube_standin::k8s_openapi::api::core::v1::NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                },
            );
        }
    }
    lab.standin.upsert_node(n);
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let mut got = lab.routes_of("edge-0").await?.context("session")?;
    got.sort();
    let mut want: Vec<Cidr> = vec![pod_cidr(0).parse()?, Cidr::host(node_ip(0))];
    want.sort();
    assert_eq!(got, want, "only the pod CIDR and the edge's own address");
    let (code, line) = connect_answer(lab.connect(), "169.254.169.254:80").await?;
    ensure!(
        code != 200 && !line.contains("edge-0"),
        "CONNECT to the metadata address: {code} {line}"
    );
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A name that is both one a node reports (its Hostname `edge-0.shop`)
/// and a Service's (`edge-0` in namespace `shop`) goes to neither: the
/// apiserver's kubelet traffic must not go to whoever may create Services
/// in that namespace, nor a Service's to a node. The node stays reachable
/// by its Node name, the Service by its `.svc` name, even when an edge's
/// kubelet lists that among its Node's names. Stand-in, not a real
/// apiserver (see the module doc).
#[tokio::test]
async fn a_name_a_node_reports_and_a_service_has_goes_to_neither() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let mut n = node(0);
    if let Some(a) = n.status.as_mut().and_then(|st| st.addresses.as_mut()) {
        for a in a.iter_mut().filter(|a| a.type_ == "Hostname") {
            a.address = "edge-0.shop".into();
        }
        // And the edge's kubelet claims the Service's own name.
        a.push(
            relay_kube_standin::k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalDNS".into(),
                address: "edge-0.shop.svc".into(),
            },
        );
    }
    lab.standin.upsert_node(n);
    let (kubelet, _k) = spawn_http(SocketAddr::new(node_ip(0), 0), "edge-0 kubelet").await?;
    let impostor_ip: IpAddr = pod_cidr(1).replace(".0/24", ".7").parse()?;
    let (impostor, _i) = spawn_http(SocketAddr::new(impostor_ip, 0), "impostor").await?;
    let service = LabService {
        endpoints: vec![(impostor, "edge-1")],
        ..LabService::on_lab_ports(
            "shop",
            "edge-0",
            SocketAddr::new("10.96.0.31".parse()?, kubelet.port()),
            Proto::Tcp,
            &[],
        )
    };
    let (svc, slice) = service.objects();
    lab.standin.upsert_service(svc);
    lab.standin.upsert_endpointslice(slice);
    let (e0, e1) = (lab.edge("edge-0")?, lab.edge("edge-1")?);
    e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    e1.wait_connected(BOUND).await.context("edge-1 connects")?;
    let by_service = format!("edge-0.shop.svc:{}", kubelet.port());
    let answer = eventually("the Service listed", async || {
        Ok(fetch(lab.connect(), &by_service).await.ok())
    })
    .await?;
    assert_eq!(
        answer, "impostor",
        "the Service's own name still reaches it"
    );
    for reported in ["edge-0.shop", "Edge-0.Shop."] {
        let reported = format!("{reported}:{}", kubelet.port());
        let (code, line) = connect_answer(lab.connect(), &reported).await?;
        ensure!(
            code == 502 && line.contains("both a name node edge-0 reports and a Service's"),
            "CONNECT {reported}: {code} {line}"
        );
    }
    let missing = format!("nosuch.shop.svc:{}", kubelet.port());
    let (code, line) = connect_answer(lab.connect(), &missing).await?;
    ensure!(
        code == 502 && line.contains("no Service named nosuch.shop.svc"),
        "CONNECT {missing}: {code} {line}"
    );
    let by_node = format!("edge-0:{}", kubelet.port());
    assert_eq!(fetch(lab.connect(), &by_node).await?, "edge-0 kubelet");
    e0.shutdown().await;
    e1.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn routes_follow_the_node_and_a_deleted_node_loses_its_session() -> Result<()> {
    let lab = KubeLab::start(1, &[]).await?;
    let e0 = lab.edge("edge-0")?;
    let (_, generation) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    // The pod CIDR changes: routes follow, on both sides, with no reconnect.
    let mut n = node(0);
    let new_cidr = "127.1.77.0/24";
    if let Some(spec) = n.spec.as_mut() {
        spec.pod_cidrs = Some(vec![new_cidr.to_string()]);
        spec.pod_cidr = Some(new_cidr.to_string());
    }
    lab.standin.upsert_node(n.clone());
    let new: Cidr = new_cidr.parse()?;
    eventually("relay routes follow", async || {
        Ok(lab.routes_of("edge-0").await?.filter(|r| r.contains(&new)))
    })
    .await?;
    eventually("edge learns what it serves", async || {
        Ok(match e0.state() {
            EdgeState::Connected {
                served_routes,
                generation: g,
                ..
            } if served_routes.contains(&new) => Some(g),
            _ => None,
        })
    })
    .await
    .map(|g| assert_eq!(g, generation, "no reconnect"))?;
    // The Node is deleted: session closed, routes gone, within seconds.
    lab.standin.delete_node("edge-0");
    eventually("session closed", async || {
        Ok(lab.routes_of("edge-0").await?.is_none().then_some(()))
    })
    .await?;
    let (_, routes) = admin_get(lab.admin(), "/v1/routes", None).await?;
    assert_eq!(routes.trim(), "[]", "{routes}");
    // The plain listing never shows the routes held for an offline edge:
    // the listing with them must lose edge-0's too (a deleted Node's
    // prefixes are released, not held: `offline.rs`).
    eventually("edge-0's held routes released", async || {
        let (code, body) = admin_get(lab.admin(), "/v1/routes?offline=1", None).await?;
        ensure!(code == 200, "GET /v1/routes?offline=1: {code} {body}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body)?;
        Ok((!rows.iter().any(|r| r["node"] == "edge-0")).then_some(()))
    })
    .await?;
    let r = eventually("reconnect refused", async || Ok(rejected(&e0))).await?;
    assert_eq!(r, RejectReason::UnknownNode);
    // The Node comes back under the same name and spec (re-registered)
    // before the down was written (the writer holds a node's writes 5 s
    // apart and folds down and up into one): the new Node gets its
    // condition although the writer's cache remembers the old Node's
    // "True" (the new session's message differs: its start and the
    // edge's address are in it).
    lab.standin.upsert_node(n);
    eventually("the recreated Node's condition", async || {
        Ok(lab
            .condition("edge-0")
            .filter(|(status, reason, _)| status == "True" && reason == "SessionUp"))
    })
    .await?;
    e0.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

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

/// The answer to a CONNECT: `(status, status line)`.
async fn connect_answer(connect: SocketAddr, authority: &str) -> Result<(u16, String)> {
    match connect_via(connect, authority).await {
        Ok(_) => Ok((200, String::new())),
        Err(e) => {
            let r = e.downcast::<relay_lab::Refused>()?;
            Ok((r.code, r.status_line))
        }
    }
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

/// Two sites with the same LAN and the same node address: both up, pods
/// of both routed, the shared address routed for neither, each node
/// reachable by name. Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn two_sites_with_the_same_node_address_both_work() -> Result<()> {
    let lab = KubeLab::start(0, &["shop-a", "shop-b"]).await?;
    let shared_ip = "127.0.0.9";
    for (name, pod) in [("shop-a", "127.2.1.0/24"), ("shop-b", "127.2.2.0/24")] {
        lab.standin
            .upsert_node(kubelet_node(name, &[pod], &[("InternalIP", shared_ip)]));
    }
    let a = lab.edge("shop-a")?;
    let b = lab.edge("shop-b")?;
    a.wait_connected(BOUND).await.context("shop-a")?;
    b.wait_connected(BOUND).await.context("shop-b")?;
    for (name, pod) in [("shop-a", "127.2.1.0/24"), ("shop-b", "127.2.2.0/24")] {
        let routes = lab.routes_of(name).await?.context("session")?;
        assert_eq!(routes, vec![pod.parse::<Cidr>()?], "{name}: pod CIDR only");
    }
    let rows = sessions(lab.admin()).await?;
    let shared_host = Cidr::host(shared_ip.parse()?);
    assert!(
        rows.iter().all(|r| r.ambiguous == vec![shared_host]),
        "{rows:?}"
    );
    // Pods of both sites, by address.
    let (pa, _t1) = spawn_http("127.2.1.5:0".parse()?, "pod of shop-a").await?;
    let (pb, _t2) = spawn_http("127.2.2.5:0".parse()?, "pod of shop-b").await?;
    assert_eq!(
        fetch(lab.connect(), &pa.to_string()).await?,
        "pod of shop-a"
    );
    assert_eq!(
        fetch(lab.connect(), &pb.to_string()).await?,
        "pod of shop-b"
    );
    // The shared address by address: refused (it would be a coin toss)...
    let (kubelet, _t3) = spawn_http(format!("{shared_ip}:0").parse()?, "a kubelet").await?;
    assert!(connect_via(lab.connect(), &kubelet.to_string())
        .await
        .is_err());
    // ...by name: each node through its own session.
    for name in ["shop-a", "shop-b"] {
        let before = sessions(lab.admin())
            .await?
            .into_iter()
            .find(|r| r.node == name)
            .context("row")?
            .streams_total;
        fetch(lab.connect(), &format!("{name}:{}", kubelet.port())).await?;
        let after = sessions(lab.admin())
            .await?
            .into_iter()
            .find(|r| r.node == name)
            .context("row")?
            .streams_total;
        assert_eq!(after, before + 1, "{name} carried its own by-name stream");
    }
    let (_, msg) = eventually("condition names the shared address", async || {
        Ok(lab.condition("shop-a").filter(|c| c.0 == "True"))
    })
    .await
    .map(|c| (c.0, c.2))?;
    assert!(msg.contains(&format!("{shared_ip}/32")), "{msg}");
    a.shutdown().await;
    b.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Bad Nodes: one with no pod CIDR yet (registered before IPAM gave it
/// one) serves its addresses only; one whose pod CIDR overlaps another
/// Node's is refused, typed and counted, while the first keeps its
/// session. Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn nodes_without_or_with_overlapping_pod_cidrs() -> Result<()> {
    let lab = KubeLab::start(1, &["edge-1", "edge-2"]).await?;
    // edge-1's range overlaps edge-0's 127.1.0.0/24.
    lab.standin.upsert_node(kubelet_node(
        "edge-1",
        &["127.1.0.128/25"],
        &[("InternalIP", &node_ip(1).to_string())],
    ));
    lab.standin.upsert_node(kubelet_node(
        "edge-2",
        &[],
        &[("InternalIP", &node_ip(2).to_string())],
    ));
    let e0 = lab.edge("edge-0")?;
    let (_, g0) = e0.wait_connected(BOUND).await.context("edge-0 connects")?;
    let e1 = lab.edge("edge-1")?;
    let r = eventually("edge-1 rejected", async || Ok(rejected(&e1))).await?;
    assert_eq!(r, RejectReason::RouteConflict);
    let EdgeState::Rejected { message, .. } = e1.state() else {
        panic!("not rejected")
    };
    assert!(message.contains("overlaps 127.1.0.0/24"), "{message}");
    let e2 = lab.edge("edge-2")?;
    e2.wait_connected(BOUND).await.context("edge-2 connects")?;
    assert_eq!(
        lab.routes_of("edge-2").await?,
        Some(vec![Cidr::host(node_ip(2))]),
        "no pod CIDR: its address only"
    );
    // IPAM gives it one later: added without a reconnect.
    let (_, g2) = e2.wait_connected(BOUND).await.context("edge-2")?;
    lab.standin.upsert_node(node(2));
    let cidr: Cidr = pod_cidr(2).parse()?;
    eventually("the pod CIDR is added", async || {
        Ok(lab.routes_of("edge-2").await?.filter(|r| r.contains(&cidr)))
    })
    .await?;
    assert_eq!(e2.wait_connected(BOUND).await.map(|c| c.1), Some(g2));
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    assert!(
        m.contains("relay_handshake_failures_total{reason=\"route_conflict\"}"),
        "{m}"
    );
    let (_, g) = e0.wait_connected(BOUND).await.context("edge-0 kept")?;
    assert_eq!(g, g0, "edge-0 kept its session");
    for e in [e0, e1, e2] {
        e.shutdown().await;
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
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

/// A tunnel that goes down while the apiserver answers 503 has its
/// condition written once the apiserver is back (the failed write used to
/// be dropped, the Node left `True` until the node's next change).
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_condition_that_failed_during_an_api_outage_is_written_after_it() -> Result<()> {
    let lab = KubeLab::start(1, &[]).await?;
    let e0 = lab.edge("edge-0")?;
    e0.wait_connected(BOUND).await.context("edge-0")?;
    eventually("condition True", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "True"))
    })
    .await?;
    lab.standin.set_unavailable(true);
    e0.shutdown().await;
    // The write of False is tried, and refused, while the API is down.
    eventually("a failed condition write counted", async || {
        let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
        Ok(m.lines()
            .find_map(|l| {
                l.strip_prefix("relay_node_condition_write_failures_total ")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|n| *n > 0))
    })
    .await?;
    assert_eq!(
        lab.condition("edge-0").map(|c| c.0).as_deref(),
        Some("True")
    );
    lab.standin.set_unavailable(false);
    let back = std::time::Instant::now();
    let (status, reason, _) = eventually("condition False after the outage", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    eprintln!(
        "condition False {:?} after the API came back",
        back.elapsed()
    );
    // The outage shows in the metrics, where readiness (the last known
    // objects in use) does not.
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    for watch in ["nodes", "services"] {
        let line = format!("relay_kube_watch_errors_total{{watch=\"{watch}\"}} ");
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
            .with_context(|| format!("no {line} in {m}"))?;
        ensure!(n > 0, "{line}{n}");
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A node flapping (its edge connecting and leaving over and over) does
/// not storm the API: condition writes paced per node, Events within the
/// node's budget, the excess counted; the condition ends at the node's
/// final state; another node's session is untouched. Stand-in, not a real
/// apiserver (see the module doc).
#[tokio::test]
async fn a_flapping_node_does_not_storm_the_api() -> Result<()> {
    let lab = KubeLab::start(2, &[]).await?;
    let steady = lab.edge("edge-1")?;
    let (_, g1) = steady.wait_connected(BOUND).await.context("edge-1")?;
    const FLAPS: usize = 60;
    let t = std::time::Instant::now();
    for i in 0..FLAPS {
        let e = lab.edge("edge-0")?;
        e.wait_connected(BOUND)
            .await
            .with_context(|| format!("flap {i}"))?;
        e.shutdown().await;
        // About 200 flaps a minute: paced writes show over several
        // hold-off periods.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let flapping = t.elapsed();
    let (status, reason, _) = eventually("condition False at the end", async || {
        Ok(lab.condition("edge-0").filter(|c| c.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NoSession"));
    // Let a held write (if any) land before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let requests = lab.standin.requests();
    let writes = requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/edge-0/status")
        .count();
    let events = requests
        .iter()
        .filter(|r| r.path.contains("/events") && r.method != "GET")
        .count();
    // One write per 5 s hold-off at most, plus the first and the last.
    let bound = 2 + (flapping.as_secs_f64() / 5.0).ceil() as usize;
    assert!(
        writes <= bound,
        "{writes} condition writes for {FLAPS} flaps in {flapping:?} (bound {bound})"
    );
    // The node's event budget (edge-1 published one more).
    assert!(
        events <= 22,
        "{events} event requests for {FLAPS} flaps in {flapping:?}"
    );
    let (_, m) = admin_get(lab.admin(), "/metrics", None).await?;
    let sample = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        sample("relay_events_dropped_total{reason=\"rate_limited\"}") > 0,
        "{m}"
    );
    assert!(sample("relay_node_condition_coalesced_total") > 0, "{m}");
    assert_eq!(
        sample("relay_node_condition_writes_total") as usize,
        writes + 1,
        "edge-1's one write and edge-0's"
    );
    let (_, g) = steady.wait_connected(BOUND).await.context("edge-1 kept")?;
    assert_eq!(g, g1, "the steady node kept its session");
    assert_eq!(lab.routes_of("edge-0").await?, None);
    println!("{FLAPS} flaps in {flapping:?}: {writes} condition writes, {events} event requests");
    steady.shutdown().await;
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Many edges connecting at once get their conditions and Events written
/// side by side, not one request at a time (one at a time, 1,000 edges
/// left their Nodes saying "down" for 16 s after all were connected, at
/// 10 ms per write), with at most the relay's bound in flight, and never
/// two requests for one node's condition at once (its writes stay in
/// order). The stand-in answers each write after 100 ms, as an apiserver
/// waits for etcd, so requests that run together overlap for certain.
#[tokio::test]
async fn conditions_of_many_nodes_are_written_side_by_side_within_a_bound() -> Result<()> {
    const N: u8 = 40;
    let lab = KubeLab::start(N, &[]).await?;
    lab.standin
        .set_latency(Duration::from_millis(20), Duration::from_millis(100));
    let edges = (0..N)
        .map(|i| lab.edge(&node_name(i)))
        .collect::<Result<Vec<_>>>()?;
    for (i, e) in edges.iter().enumerate() {
        e.wait_connected(BOUND)
            .await
            .with_context(|| format!("edge-{i}"))?;
    }
    eventually("every condition True", async || {
        Ok((0..N)
            .all(|i| lab.condition(&node_name(i)).is_some_and(|c| c.0 == "True"))
            .then_some(()))
    })
    .await?;
    let requests = lab.standin.requests();
    let status: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/nodes/") && r.path.ends_with("/status"))
        .collect();
    let events: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/events") && r.method == "POST")
        .collect();
    // Most requests in flight at once, as the stand-in served them.
    let most = |rs: &[&relay_kube_standin::RequestRecord]| {
        rs.iter()
            .map(|a| {
                rs.iter()
                    .filter(|b| a.started >= b.started && a.started < b.answered)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    let (cond_most, event_most) = (most(&status), most(&events));
    println!(
        "{} condition requests, at most {cond_most} at once; {} event requests, at most {event_most} at once",
        status.len(),
        events.len()
    );
    assert!(
        (2..=relay_server::k8s::CONDITION_WRITERS).contains(&cond_most),
        "condition requests at once: {cond_most}"
    );
    assert!(
        (2..=relay_server::k8s::EVENT_WRITERS).contains(&event_most),
        "event requests at once: {event_most}"
    );
    for (i, a) in status.iter().enumerate() {
        for b in &status[i + 1..] {
            assert!(
                a.path != b.path || !a.overlaps(b),
                "two requests for {} at once",
                a.path
            );
        }
    }
    for e in edges {
        e.shutdown().await;
    }
    lab.relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
