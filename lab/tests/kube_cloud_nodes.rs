//! A cloud worker added while the relay runs (cluster autoscaler,
//! `kubeadm join`), in the network-namespace lab with the relay in
//! Kubernetes mode: `tunnel_routes` lists the cloud nodes' subnet (the
//! cloud LAN), the Service range and the relay node's pod CIDR, not
//! cloud2's pod CIDR; Node `cloud2` (no labels, InternalIP on the cloud
//! LAN, pod CIDR 10.244.2.0/24) appears after the relay and the edge are
//! up. Within a bound, and with no restart or reconnect: the apiserver's
//! CONNECTs to the worker's kubelet and pod are dialled by the relay, the
//! edge's tunnel routes gain the worker's pod CIDR, and a pod on the edge
//! reaches the worker's pod through the tunnel; the Node deleted, the
//! edge's routes lose it.
//!
//! The loopback labs cannot show this: the relay never dials a loopback
//! address for anyone (policy rule 6), so a cloud pod must live on a real
//! network: here `cpod2` behind `cloud2`.
//!
//! No kube-apiserver can run on this machine: the API is
//! `relay-kube-standin`, a stand-in speaking the apiserver's REST shapes —
//! NOT a real kube-apiserver. Needs root; skips loudly otherwise, and fails
//! instead of skipping under CI=true or REQUIRE_LAB=1. Each row goes to
//! `target/lab-kube-cloud-nodes.txt`. Time budget: about 30 s.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeConfig, EdgeState};
use relay_kube_standin::kubelet_node;
use relay_lab::cluster::Cluster;
use relay_lab::edges::WatchedEdge;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    connect_from, http_from, sa, services, start_relay, Table, HTTP, KUBELET, QUIC_PORT,
};
use relay_protocol::Cidr;
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;

/// Anything that should happen "within seconds".
const BOUND: Duration = Duration::from_secs(10);

/// Edge1 as in a cluster: the relay's address and its node name, capture
/// on (its pods' traffic to the tunnel routes goes through the tunnel).
fn edge_cfg(pki: &DevPki) -> Result<EdgeConfig> {
    let mut cfg = EdgeConfig::new(
        "edge1",
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        pki.node_material("edge1")?,
    );
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

/// Edge1's tunnel routes as the relay sent them, with the session's
/// generation.
fn tunnel_routes(e: &WatchedEdge) -> Option<(u64, Vec<Cidr>)> {
    match e.state() {
        EdgeState::Connected {
            generation,
            tunnel_routes,
            ..
        } => Some((generation, tunnel_routes)),
        _ => None,
    }
}

/// Waits until edge `e`'s tunnel routes hold `cidr` (`held`) or not, in
/// the session of generation `g` (no reconnect); how long it took.
fn routes_follow(e: &WatchedEdge, g: u64, cidr: Cidr, held: bool) -> Result<Duration> {
    let (_, t) = within(|| {
        let (gen, routes) = tunnel_routes(e).context("no session")?;
        ensure!(gen == g, "reconnected: generation {g} → {gen}");
        ensure!(routes.contains(&cidr) == held, "{routes:?}");
        Ok(())
    })?;
    Ok(t)
}

/// Polls `f` every 50 ms until it succeeds, at most [`BOUND`]; returns its
/// answer and how long it took (the last error past the bound).
fn within<T>(mut f: impl FnMut() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok((v, t.elapsed())),
            Err(e) if t.elapsed() > BOUND => return Err(e.context(format!("not within {BOUND:?}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_cloud_worker_added_later_is_reached_without_a_restart() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED kube_cloud_nodes: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let lab = NetnsLab::with_prefix("kc")?;
    let _svcs = [
        services(&lab, Role::Cpod2, "cpod2")?,
        services(&lab, Role::Cloud2, "cloud2")?,
        services(&lab, Role::Epod1, "epod1")?,
    ];
    let pki = DevPki::generate(&["relay.lab"], &["edge1"])?;
    let cluster = Cluster::start(&lab)?;
    // The worker is not a Node yet.
    ensure!(cluster.standin().delete_node("cloud2"), "no Node cloud2");
    let mut cfg = cluster.relay_config_in(&lab, &pki)?;
    let worker_pods: Cidr = netns::CPOD2_CIDR.parse()?;
    cfg.tunnel_routes.retain(|c| *c != worker_pods);
    let lan: Cidr = netns::CLOUD_LAN.parse()?;
    ensure!(
        cfg.tunnel_routes.contains(&lan),
        "tunnel_routes list the cloud nodes' subnet"
    );
    let _relay = start_relay(&lab, cfg)?;
    let e1 = WatchedEdge::start(&lab, Role::Edge1, edge_cfg(&pki)?)?;
    let g = e1.connected(BOUND)?;
    let mut m = Table::new(&["case", "what", "result"]);
    let cpod2 = sa(netns::CPOD2_IP, HTTP);

    m.note(
        &[
            "before: not a tunnel route, not reached",
            "edge1 routes; epod1 → cpod2",
        ],
        (|| {
            let (_, routes) = tunnel_routes(&e1).context("no session")?;
            ensure!(!routes.contains(&worker_pods), "{routes:?}");
            if let Ok(body) = http_from(&lab, Role::Epod1, cpod2) {
                bail!("epod1 reached cpod2 already: {body}");
            }
            Ok(format!("{} routes, no {worker_pods}", routes.len()))
        })(),
    );

    // The worker joins: no labels, InternalIP on the cloud LAN (inside
    // tunnel_routes: the evidence that it is in the cloud), pod CIDR
    // outside tunnel_routes.
    let cloud2 = netns::CLOUD2_LAN_IP.to_string();
    cluster.standin().upsert_node(kubelet_node(
        "cloud2",
        &[netns::CPOD2_CIDR],
        &[("InternalIP", &cloud2)],
    ));
    let joined = Instant::now();
    let pod_authority: &'static str = Box::leak(format!("{cpod2}").into_boxed_str());
    let kubelet_authority: &'static str = Box::leak(format!("cloud2:{KUBELET}").into_boxed_str());
    m.check(
        &[
            "(i) CONNECT to the worker's pod, dialled by the relay",
            &format!("apiserver → CONNECT {pod_authority}"),
        ],
        "cpod2",
        within(|| connect_from(&lab, Role::Apiserver, pod_authority)).map(|(b, _)| b),
    );
    m.check(
        &[
            "(i) CONNECT to the worker's kubelet by name",
            &format!("apiserver → CONNECT {kubelet_authority}"),
        ],
        "cloud2-kubelet",
        within(|| connect_from(&lab, Role::Apiserver, kubelet_authority)).map(|(b, _)| b),
    );
    m.note(
        &[
            "(ii) the edge is sent the worker's pod CIDR, no reconnect",
            "edge1: tunnel_routes",
        ],
        routes_follow(&e1, g, worker_pods, true).map(|_| {
            format!(
                "{worker_pods} after {:?}, generation {g} kept",
                joined.elapsed()
            )
        }),
    );
    m.check(
        &[
            "(iii) an edge pod reaches the worker's pod",
            &format!("epod1 → {cpod2}"),
        ],
        "cpod2",
        // Once the edge's capture holds the range (it follows the routes
        // the edge was sent): a SYN sent before went out through the NAT,
        // and its retries follow that conntrack entry.
        within(|| {
            let set = lab.exec(
                Role::Edge1,
                &["nft", "list", "set", "inet", "edge_relay", "dst4"],
            )?;
            ensure!(set.contains(netns::CPOD2_CIDR), "edge1 captures {set}");
            Ok(())
        })
        .and_then(|_| within(|| http_from(&lab, Role::Epod1, cpod2)))
        .map(|(b, _)| b),
    );
    m.note(
        &["all within the bound of the Node's arrival", "elapsed"],
        (joined.elapsed() < BOUND)
            .then(|| format!("{:?}", joined.elapsed()))
            .context(format!("{:?}", joined.elapsed())),
    );

    // The Node deleted: the edge's routes lose the range, no reconnect.
    ensure!(cluster.standin().delete_node("cloud2"), "no Node cloud2");
    m.note(
        &[
            "Node deleted: the range leaves the edge's routes",
            "edge1: tunnel_routes",
        ],
        routes_follow(&e1, g, worker_pods, false).map(|t| format!("after {t:?}")),
    );

    let footer = format!(
        "{} of {} cells passed in {:?} (apiserver: relay-kube-standin, not a real kube-apiserver)",
        m.passed(),
        m.rows.len(),
        t0.elapsed()
    );
    m.publish("lab-kube-cloud-nodes.txt", &footer);
    let failed = m.failed();
    if !failed.is_empty() {
        bail!("failed: {failed:?}");
    }
    Ok(())
}
