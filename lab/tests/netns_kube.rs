//! The relay as a Kubernetes component in the network-namespace lab: the
//! relay on the relay node reaches the API over the cloud LAN at the
//! apiserver host (10.0.0.3:6443), edges behind their masquerading NATs
//! are configured with nothing but the relay's WAN address and their node
//! name, and the Node objects decide what each may claim.
//!
//! No kube-apiserver can run on this machine: the API is
//! `relay-kube-standin` (list + watch with resourceVersion, bookmarks,
//! in-stream 410, server-side apply on nodes/status, Events, TokenReview,
//! Pods), a stand-in speaking the apiserver's REST shapes — NOT a real
//! kube-apiserver. The relay reaches it through an ordinary kubeconfig,
//! so its production client path is the one under test.
//!
//! Shown here, each as a row of `target/lab-kube.txt`: claims refused for
//! a node with no Node object and outside the Node's ranges (typed); both
//! edges admitted from their Nodes with no `[nodes]` table and traffic
//! through the relay's capture reaching their pods; the condition and
//! Events in the API; a pod CIDR change followed on the relay and on the
//! other edge without a reconnect; a 410, a 503 spell, a restarted API and
//! an unreachable API (packets dropped) leaving live sessions alone, while
//! a node that appeared during the outage waits and is admitted after it;
//! a deleted Node losing its session and routes; and, in the second test,
//! an edge holding only a projected token obtaining its certificate over
//! the NAT, connecting, renewing, and a token bound to one node never
//! yielding another node's certificate.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 40 s each.

use relay_lab::TempDir;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use edge_client::config::{BootstrapConfig, Identity};
use edge_client::{EdgeConfig, EdgeState};
use relay_kube_standin::{daemonset_pod, kubelet_node};
use relay_lab::cluster::{edge_node, Cluster};
use relay_lab::edges::WatchedEdge;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    admin, captured_prefixes, http_from, sa, services, session, start_relay, within, Table, HTTP,
    QUIC_PORT,
};
use relay_protocol::{Cidr, RejectReason};
use relay_server::config::BootstrapSettings;
use relay_server::RelayConfig;
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;
use relay_transport::issue::NodeIssuer;
use relay_transport::tls::{cert_names_node, certs_from_pem};

/// Anything that should happen "within seconds".
const BOUND: Duration = Duration::from_secs(20);
/// Namespace, service account and DaemonSet of the edge-client pods.
const NS: &str = "edge-relay";
const EDGE_SA: &str = "edge-client";

/// An edge configured as in a cluster: the relay's address and the node
/// name, nothing else (no routes, no primary address); capture on unless
/// another client already captures in that namespace.
fn edge_cfg(pki: &DevPki, node: &str, capture: bool) -> Result<EdgeConfig> {
    let mut cfg = EdgeConfig::new(
        node,
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        pki.node_material(node)?,
    );
    ensure!(cfg.routes.is_empty() && cfg.primary_addr.is_none());
    cfg.capture = capture.then(CaptureConfig::default);
    Ok(cfg)
}

/// The relay in in-cluster mode: the lab relay with its `[nodes]` table
/// removed and the stand-in's kubeconfig.
fn relay_cfg(pki: &DevPki, cluster: &Cluster) -> Result<RelayConfig> {
    let mut cfg = relay_lab::scenario::relay_config(pki)?;
    cfg.nodes.clear();
    cfg.kubernetes = Some(cluster.relay_settings());
    Ok(cfg)
}

/// `name value` of one sample on the relay's /metrics (0 when absent).
fn metric(lab: &NetnsLab, sample: &str) -> Result<u64> {
    let m = admin(lab, "/metrics")?;
    Ok(m.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0))
}

/// The prefixes an edge's capture sends into the tunnel now.
fn edge_captures(lab: &NetnsLab, site: u8) -> Result<String> {
    lab.exec(
        Role::edge(site)?,
        &["nft", "list", "set", "inet", "edge_relay", "dst4"],
    )
}

/// Waits until the relay node captures edge `site`'s pod CIDR (the edge
/// reports its session before the relay has installed its routes).
fn captured(lab: &NetnsLab, site: u8) -> Result<Duration> {
    let cidr = netns::edge_pod_cidr(site).to_string();
    within(BOUND, || Ok(captured_prefixes(lab)?.contains(&cidr)))
}

/// `node`'s session generation on the relay, if it has a session.
fn generation(lab: &NetnsLab, node: &str) -> Result<Option<u64>> {
    Ok(session(lab, node)?.map(|r| r.generation))
}

/// Both live sessions kept their generation and the data path works.
fn sessions_untouched(lab: &NetnsLab, gens: &[(&str, u64)]) -> Result<String> {
    for (node, g) in gens {
        let now = generation(lab, node)?;
        ensure!(now == Some(*g), "{node}: generation {now:?}, was {g}");
    }
    let body = http_from(lab, Role::Cpod1, sa(netns::edge_pod_ip(1), HTTP))?;
    ensure!(body.contains("epod1"), "cpod1 → epod1: {body}");
    Ok("sessions kept, cpod1 → epod1 works".into())
}

#[test]
fn nodes_decide_claims_over_the_lab_network() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_kube: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let lab = NetnsLab::with_prefix("k8")?;
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
    ];
    let pki = DevPki::generate(&["relay.lab"], &["edge1", "edge2", "edge9"])?;
    let cluster = Cluster::start(&lab)?;
    let _relay = start_relay(&lab, relay_cfg(&pki, &cluster)?)?;
    let mut m = Table::new(&["case", "what", "result"]);

    // Refusals first, from edge1's host behind its NAT (no capture: they
    // never get a session to capture for).
    let ghost = WatchedEdge::start(&lab, Role::Edge1, edge_cfg(&pki, "edge9", false)?)?;
    m.note(
        &["no Node object → refused", "edge9 (CA-signed, no Node)"],
        ghost.rejected(BOUND).and_then(|(r, msg)| {
            ensure!(r == RejectReason::UnknownNode, "{r:?}: {msg}");
            Ok(format!("{r:?}: {msg}"))
        }),
    );
    ghost.stop()?;
    let mut greedy_cfg = edge_cfg(&pki, "edge1", false)?;
    greedy_cfg.routes = vec!["10.244.0.0/16".parse()?];
    let greedy = WatchedEdge::start(&lab, Role::Edge1, greedy_cfg)?;
    m.note(
        &[
            "claim outside the Node → refused",
            "edge1 claims 10.244.0.0/16",
        ],
        greedy.rejected(BOUND).and_then(|(r, msg)| {
            ensure!(r == RejectReason::RouteNotAllowed, "{r:?}: {msg}");
            Ok(format!("{r:?}: {msg}"))
        }),
    );
    greedy.stop()?;
    m.note(
        &[
            "refusals counted, no session",
            "relay /metrics, /v1/sessions",
        ],
        (|| {
            let unknown = metric(
                &lab,
                "relay_handshake_failures_total{reason=\"unknown_node\"}",
            )?;
            ensure!(unknown >= 1, "unknown_node not counted");
            ensure!(
                admin(&lab, "/v1/sessions")?.trim() == "[]",
                "a session exists"
            );
            Ok(format!("unknown_node {unknown}"))
        })(),
    );

    // Both edges, configured with only the relay address.
    let e1 = WatchedEdge::start(&lab, Role::Edge1, edge_cfg(&pki, "edge1", true)?)?;
    let e2 = WatchedEdge::start(&lab, Role::Edge2, edge_cfg(&pki, "edge2", true)?)?;
    let g1 = e1.connected(BOUND)?;
    let g2 = e2.connected(BOUND)?;
    for site in netns::SITES {
        let node = format!("edge{site}");
        let want = {
            let mut w = vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(netns::edge_host_ip(site))),
            ];
            w.sort();
            w
        };
        m.note(
            &["routes from the Node", &format!("{node}: admin row")],
            session(&lab, &node).and_then(|r| {
                let mut got = r.context("no session")?.routes;
                got.sort();
                ensure!(got == want, "{got:?}, want {want:?}");
                Ok(format!("{got:?}"))
            }),
        );
        let pod = netns::edge_pod_ip(site);
        m.check(
            &[
                "cloud pod (relay node) → edge pod",
                &format!("cpod1 → {pod}"),
            ],
            &format!("epod{site}"),
            captured(&lab, site).and_then(|_| http_from(&lab, Role::Cpod1, sa(pod, HTTP))),
        );
    }
    let served = e1.wait(BOUND, |s| match s {
        EdgeState::Connected { served_routes, .. } => Some(served_routes.clone()),
        _ => None,
    })?;
    m.note(
        &["edge learns what it serves", "edge1: served_routes"],
        (served.contains(&netns::edge_pod_cidr(1)) && served.len() == 2)
            .then(|| format!("{served:?}"))
            .context(format!("{served:?}")),
    );
    m.note(
        &["condition True, by our field manager", "Node edge1 status"],
        within(BOUND, || {
            Ok(cluster
                .condition("edge1")
                .is_some_and(|(s, r, _)| s == "True" && r == "SessionUp"))
        })
        .and_then(|_| {
            let owner = cluster
                .standin()
                .condition_owner("edge1", "EdgeTunnelReady");
            ensure!(owner.as_deref() == Some("edge-relay"), "owner {owner:?}");
            let msg = cluster.condition("edge1").map(|c| c.2).unwrap_or_default();
            Ok(msg)
        }),
    );
    m.note(
        &["EdgeSessionUp event", "events.k8s.io in the API"],
        within(BOUND, || {
            Ok(cluster
                .standin()
                .events()
                .iter()
                .any(|e| e["reason"] == "EdgeSessionUp" && e["regarding"]["name"] == "edge2"))
        })
        .map(|_| "for edge2".to_string()),
    );

    // edge2's pod CIDR changes: the relay captures the new range, edge1
    // (same community) sends it into the tunnel, no reconnect; then back.
    let moved = "10.244.88.0/24";
    let with_cidr = |cidr: &str| {
        let mut n = edge_node(&lab, 2);
        if let Some(spec) = n.spec.as_mut() {
            spec.pod_cidrs = Some(vec![cidr.to_string()]);
            spec.pod_cidr = Some(cidr.to_string());
        }
        n
    };
    cluster.standin().upsert_node(with_cidr(moved));
    m.note(
        &[
            "pod CIDR changed → routes follow",
            "relay nft set, edge1 nft set",
        ],
        within(BOUND, || {
            let relay = captured_prefixes(&lab)?;
            Ok(relay.contains(moved)
                && !relay.contains("10.244.8.0/24")
                && edge_captures(&lab, 1)?.contains(moved))
        })
        .and_then(|d| {
            let now = e2.wait(BOUND, |s| match s {
                EdgeState::Connected {
                    served_routes,
                    generation,
                    ..
                } if served_routes.contains(&moved.parse().ok()?) => Some(*generation),
                _ => None,
            })?;
            ensure!(now == g2, "edge2 reconnected ({g2} → {now})");
            Ok(format!("after {d:?}, edge2 told, same generation"))
        }),
    );
    cluster.standin().upsert_node(edge_node(&lab, 2));
    m.check(
        &["pod CIDR back → traffic flows", "cpod1 → 10.244.8.5"],
        "epod2",
        // The relay's capture, and edge2's own list of what it serves (it
        // refuses a target outside it), each updated on its own.
        captured(&lab, 2)
            .and_then(|_| {
                let back = netns::edge_pod_cidr(2);
                e2.wait(BOUND, |s| match s {
                    EdgeState::Connected { served_routes, .. } if served_routes.contains(&back) => {
                        Some(())
                    }
                    _ => None,
                })
            })
            .and_then(|_| http_from(&lab, Role::Cpod1, sa(netns::edge_pod_ip(2), HTTP))),
    );

    // API trouble never drops live sessions.
    let gens = [("edge1", g1), ("edge2", g2)];
    cluster.standin().inject_gone();
    std::thread::sleep(Duration::from_secs(1));
    m.note(
        &["410 Gone in the watch", "relist"],
        sessions_untouched(&lab, &gens),
    );
    cluster.standin().set_unavailable(true);
    std::thread::sleep(Duration::from_secs(2));
    cluster.standin().set_unavailable(false);
    m.note(
        &["API answers 503 for 2 s", "sessions"],
        sessions_untouched(&lab, &gens),
    );
    m.note(
        &["API restarts (down 2 s)", "stand-in stopped, served again"],
        cluster
            .restart_apiserver(&lab, Duration::from_secs(2))
            .and_then(|_| sessions_untouched(&lab, &gens)),
    );
    // Unreachable: packets to :6443 dropped. A Node that appears in the
    // meantime is unknown to the relay: its edge is refused and retries.
    cluster.blackhole(&lab, true)?;
    let t_out = Instant::now();
    cluster.standin().upsert_node(kubelet_node(
        "edge9",
        &["10.244.9.0/24"],
        &[("InternalIP", "192.168.1.99")],
    ));
    let late = WatchedEdge::start(&lab, Role::Edge1, edge_cfg(&pki, "edge9", false)?)?;
    let refused = late.rejected(BOUND);
    std::thread::sleep(Duration::from_secs(5).saturating_sub(t_out.elapsed()));
    m.note(
        &["API unreachable for 5 s", "sessions"],
        sessions_untouched(&lab, &gens),
    );
    m.note(
        &[
            "node new during the outage waits",
            "edge9, Node added while unreachable",
        ],
        refused.and_then(|(r, _)| {
            ensure!(r == RejectReason::UnknownNode, "{r:?}");
            Ok(format!("{r:?} while the API is unreachable"))
        }),
    );
    cluster.blackhole(&lab, false)?;
    let t_back = Instant::now();
    m.note(
        &["… and is admitted once the API is back", "edge9"],
        late.connected(Duration::from_secs(40))
            .map(|_| format!("after {:?}", t_back.elapsed())),
    );
    late.stop()?;

    // The Node is deleted: session closed, routes withdrawn, refused.
    let t_del = Instant::now();
    cluster.standin().delete_node("edge2");
    m.note(
        &["Node deleted → session closed", "admin row, relay nft set"],
        within(BOUND, || {
            Ok(generation(&lab, "edge2")?.is_none()
                && !captured_prefixes(&lab)?.contains("10.244.8.0/24"))
        })
        .map(|d| format!("after {d:?}")),
    );
    m.note(
        &["… and its reconnect refused", "edge2"],
        e2.rejected(BOUND).and_then(|(r, msg)| {
            ensure!(r == RejectReason::UnknownNode, "{r:?}: {msg}");
            Ok(format!("{r:?} {:?} after the delete", t_del.elapsed()))
        }),
    );
    e2.stop()?;
    let t_stop = Instant::now();
    e1.stop()?;
    m.note(
        &["edge gone → condition False", "Node edge1 status"],
        within(BOUND, || {
            Ok(cluster
                .condition("edge1")
                .is_some_and(|(s, r, _)| s == "False" && r == "NoSession"))
        })
        .map(|_| {
            format!(
                "NoSession {:?} after the edge began to stop",
                t_stop.elapsed()
            )
        }),
    );
    finish(&m, "lab-kube.txt", t0)
}

/// Publishes the table and fails if any row failed.
fn finish(m: &Table, file: &str, t0: Instant) -> Result<()> {
    let footer = format!(
        "{} of {} cells passed in {:?} (apiserver: relay-kube-standin, not a real kube-apiserver)",
        m.passed(),
        m.rows.len(),
        t0.elapsed()
    );
    m.publish(file, &footer);
    let failed = m.failed();
    if !failed.is_empty() {
        bail!("failed: {failed:?}");
    }
    Ok(())
}

/// An edge holding only `token` (and the relay's CA): no certificate.
fn token_edge(pki: &DevPki, dir: &Path, node: &str, token: &str) -> Result<(EdgeConfig, PathBuf)> {
    let token_file = dir.join(format!("{node}-token"));
    std::fs::write(&token_file, token)?;
    let state_dir = dir.join(format!("{node}-state"));
    // EdgeConfig::new wants an identity: replaced by the bootstrap below.
    let placeholder = DevPki::generate(&["x"], &[node])?.node_material(node)?;
    let mut cfg = EdgeConfig::new(
        node,
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        placeholder,
    );
    cfg.identity = Identity::Bootstrap(BootstrapConfig {
        token_file,
        state_dir: state_dir.clone(),
        relay_ca: certs_from_pem(pki.ca_cert.as_bytes(), "ca")?,
    });
    cfg.capture = Some(CaptureConfig::default());
    Ok((cfg, state_dir))
}

#[test]
fn a_token_only_edge_gets_its_certificate_over_the_lab_network() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_kube bootstrap: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let lab = NetnsLab::with_prefix("kb")?;
    let _svc = services(&lab, Role::Epod1, "epod1")?;
    let cluster = Cluster::start(&lab)?;
    for site in netns::SITES {
        cluster.standin().upsert_pod(daemonset_pod(
            NS,
            &format!("edge-client-{site}"),
            &format!("uid-{site}"),
            &format!("edge{site}"),
            EDGE_SA,
            "edge-client",
        ));
    }
    // No node certificates anywhere: the relay issues them, 30 s each so
    // renewal (at 0.6 to 0.8 of the lifetime) happens within the test.
    let pki = DevPki::generate(&["relay.lab"], &[])?;
    let (ca_cert, ca_key) = pki.ca_pem_pair();
    let mut rcfg = relay_cfg(&pki, &cluster)?;
    rcfg.bootstrap = Some(BootstrapSettings {
        issuer: Arc::new(NodeIssuer::from_pem(
            &ca_cert,
            &ca_key,
            Duration::from_secs(30),
        )?),
        issuer_cert: certs_from_pem(ca_cert.as_bytes(), "ca")?.remove(0),
        namespace: NS.into(),
        service_account: EDGE_SA.into(),
        daemonsets: vec!["edge-client".into()],
    });
    let _relay = start_relay(&lab, rcfg)?;
    let dir = TempDir(std::env::temp_dir().join(format!(
        "netns-kube-bootstrap-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    )));
    std::fs::create_dir_all(&dir.0)?;
    let token = |node: &str, pod: &str, uid: &str| {
        cluster.standin().mint_token(
            node,
            pod,
            uid,
            "edge-relay",
            SystemTime::now() + Duration::from_secs(3600),
        )
    };
    let mut m = Table::new(&["case", "what", "result"]);

    // Node edge1's token presented from edge2's host, claiming edge2.
    let (cfg, thief_state) = token_edge(
        &pki,
        &dir.0,
        "edge2",
        &token("edge1", "edge-client-1", "uid-1"),
    )?;
    let thief = WatchedEdge::start(&lab, Role::Edge2, cfg)?;
    m.note(
        &[
            "token of edge1 never yields edge2's certificate",
            "edge2 host",
        ],
        thief.rejected(BOUND).and_then(|(r, msg)| {
            ensure!(r == RejectReason::IdentityMismatch, "{r:?}: {msg}");
            ensure!(
                !thief_state.join("edge2.pem").exists(),
                "a certificate was written"
            );
            Ok(format!("{r:?}: {msg}"))
        }),
    );
    thief.stop()?;

    let (cfg, state) = token_edge(
        &pki,
        &dir.0,
        "edge1",
        &token("edge1", "edge-client-1", "uid-1"),
    )?;
    let t_edge = Instant::now();
    let e1 = WatchedEdge::start(&lab, Role::Edge1, cfg)?;
    let first = e1.connected(BOUND);
    m.note(
        &["token only → certificate → session", "edge1 behind nat1"],
        first
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|_| {
                let pem = std::fs::read_to_string(state.join("edge1.pem"))?;
                let der = certs_from_pem(pem.as_bytes(), "kept")?;
                ensure!(cert_names_node(&der[0], "edge1"), "not named edge1");
                ensure!(!cert_names_node(&der[0], "edge2"), "also names edge2");
                Ok(format!("connected after {:?}", t_edge.elapsed()))
            }),
    );
    m.check(
        &["cloud pod (relay node) → edge pod", "cpod1 → 10.244.7.5"],
        "epod1",
        captured(&lab, 1)
            .and_then(|_| http_from(&lab, Role::Cpod1, sa(netns::edge_pod_ip(1), HTTP))),
    );
    let pem = std::fs::read_to_string(state.join("edge1.pem")).unwrap_or_default();
    m.note(
        &[
            "renews before expiry, routes kept",
            "relay nft set every 20 ms",
        ],
        first.and_then(|g| renewal(&lab, &e1, g, &state.join("edge1.pem"), &pem)),
    );
    e1.stop()?;
    finish(&m, "lab-kube-bootstrap.txt", t0)
}

/// Waits (at most 45 s) for edge1's session to move to a renewed
/// certificate, polling the relay node's captured prefixes every 20 ms
/// meanwhile: edge1's pod CIDR must never be absent, and the pod must
/// answer afterwards.
fn renewal(lab: &NetnsLab, e1: &WatchedEdge, g: u64, cert: &Path, pem: &str) -> Result<String> {
    let t = Instant::now();
    let cidr = netns::edge_pod_cidr(1).to_string();
    let mut gap = None;
    let mut moved = None;
    while t.elapsed() < Duration::from_secs(45) {
        if !captured_prefixes(lab)?.contains(&cidr) {
            gap.get_or_insert(t.elapsed());
        }
        match (moved, e1.state()) {
            (None, EdgeState::Connected { generation, .. }) if generation > g => {
                moved = Some((t.elapsed(), generation))
            }
            (Some((at, _)), _) if t.elapsed() > at + Duration::from_secs(1) => break,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (at, g2) = moved.context("no renewed session within 45 s")?;
    if let Some(gap) = gap {
        bail!("{cidr} absent from the relay's capture at {gap:?} (session moved at {at:?})");
    }
    // One move, not a move then a reconnect.
    let now = e1.connected(Duration::ZERO)?;
    ensure!(now == g2, "moved to generation {g2}, then {now}");
    ensure!(
        std::fs::read_to_string(cert)? != pem,
        "the certificate was not replaced"
    );
    let issued = metric(lab, "relay_bootstrap_total{outcome=\"issued\"}")?;
    ensure!(issued == 2, "issued {issued}");
    let body = http_from(lab, Role::Cpod1, sa(netns::edge_pod_ip(1), HTTP))?;
    ensure!(body.contains("epod1"), "after renewal: {body}");
    Ok(format!(
        "generation {g} → {g2} after {at:?}, {cidr} never absent, 2 issued, cpod1 → epod1 works"
    ))
}
