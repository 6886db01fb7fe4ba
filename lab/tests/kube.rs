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
//!
//! The tests live by concern: here, Nodes deciding claims and routes;
//! in `tests/kube/` (a subdirectory, so cargo does not take the modules
//! for test binaries of their own), `addresses` (which addresses and
//! names reach a node), `availability` (the relay before the first list
//! and while the API is away), `conditions` (the condition and Events
//! written back) and `stale_conditions` (a `True` no session backs, after
//! a relay died; the "down" of a relay that stops). The lab set-up here
//! serves them all.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_lab::{admin_get, connect_via, http_get, sessions, spawn_http};
use relay_protocol::{Cidr, RejectReason};
use relay_server::config::KubeSettings;
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;

#[path = "kube/addresses.rs"]
mod addresses;
#[path = "kube/availability.rs"]
mod availability;
#[path = "kube/conditions.rs"]
mod conditions;
#[path = "kube/stale_conditions.rs"]
mod stale_conditions;

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
