//! An edge node without kube-proxy (`kube_proxy = false` in its config),
//! in the network-namespace lab: edge1's `ip kube-proxy` table is removed
//! after the lab's kube-proxy programmed every node, as on a node that
//! runs none (k3s with `--disable-kube-proxy`, an edge whose Service
//! proxy was left out). The relay runs in in-cluster mode against the
//! apiserver stand-in on the apiserver host (relay-kube-standin, not a
//! real kube-apiserver).
//!
//! What must hold: a ClusterIP whose only endpoint is on edge1 still
//! answers from edge1 (edge1 captures it and dials its own endpoint, the
//! relay is not asked), a ClusterIP with its endpoint on the other edge
//! still goes through the relay; and with the default (`kube_proxy =
//! true`) the first fails, which shows what the setting is for.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    edge_config_in, fails_fast, http_from, netns_start, relay_config_in, service_resolutions,
    services, start_edge, start_relay, Table, HTTP,
};

/// `own-edge1`: endpoint epod1 (all on edge1).
const SVC_OWN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40)), HTTP);
/// `on-edge2`: endpoint epod2 (elsewhere).
const SVC_OTHER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 41)), HTTP);
/// `etp-local`: a NodePort Service with `externalTrafficPolicy: Local`,
/// endpoint epod1.
const SVC_ETP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 42)), HTTP);
/// Its node port.
const ETP_NODE_PORT: u16 = 30042;

/// Waits (at most 5 s) until edge1's capture holds the own Service's
/// port in nft set `set` (`svcskip4`: left to kube-proxy; `svc4`:
/// captured): capture applies the Service table once the session sent it.
fn in_set(lab: &NetnsLab, set: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let listing = lab.exec(
            Role::Edge1,
            &["nft", "list", "set", "inet", "edge_relay", set],
        )?;
        if listing.contains("10.96.0.40") {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(5) {
            bail!("10.96.0.40 not in {set} after 5 s: {listing}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_edge_without_kube_proxy_serves_its_own_services() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("edge without kube-proxy")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
    ];
    let cluster = Cluster::start(&lab)?;
    let one = |name, vip, ep: Ipv4Addr, node| {
        LabService::on_lab_ports("default", name, vip, Proto::Tcp, &[(ep, node)])
    };
    let mut etp = one("etp-local", SVC_ETP, netns::edge_pod_ip(1), "edge1");
    etp.node_port = Some(ETP_NODE_PORT);
    etp.external_local = true;
    cluster.set_services(
        &lab,
        KubeProxyMode::Iptables,
        &[
            one("own-edge1", SVC_OWN, netns::edge_pod_ip(1), "edge1"),
            one("on-edge2", SVC_OTHER, netns::edge_pod_ip(2), "edge2"),
            etp,
        ],
    )?;
    // edge1 runs no kube-proxy.
    lab.exec(Role::Edge1, &["nft", "delete", "table", "ip", "kube-proxy"])?;

    let mut rcfg = relay_config_in(&lab, &pki)?;
    rcfg.nodes.clear();
    rcfg.kubernetes = Some(cluster.relay_settings());
    let relay = start_relay(&lab, rcfg)?;
    let _edge2 = start_edge(&lab, 2, edge_config_in(&lab, &pki, 2)?)?;
    let mut m = Table::new(&["case", "path", "result"]);

    // The default first: the node's own Service is left to a kube-proxy
    // that is not there.
    let edge1 = start_edge(&lab, 1, edge_config_in(&lab, &pki, 1)?)?;
    in_set(&lab, "svcskip4")?;
    m.note(
        &[
            "default (kube_proxy = true): own Service left to no one",
            "edge1 (hostNetwork) → 10.96.0.40 ⇒ 10.244.7.5",
        ],
        fails_fast(&lab, Role::Edge1, SVC_OWN, Duration::from_secs(10))
            .map(|d| format!("failed in {d:?}")),
    );
    edge1.stop()?;

    let mut cfg = edge_config_in(&lab, &pki, 1)?;
    cfg.kube_proxy = false;
    let _edge1 = start_edge(&lab, 1, cfg)?;
    in_set(&lab, "svc4")?;
    let before = service_resolutions(&lab)?;
    m.check(
        &[
            "kube_proxy = false: own Service served by edge1 itself",
            "edge1 (hostNetwork) → 10.96.0.40 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(&lab, Role::Edge1, SVC_OWN),
    );
    m.note(
        &[
            "… without asking the relay",
            "relay_service_resolutions_total",
        ],
        service_resolutions(&lab).and_then(|after| {
            anyhow::ensure!(after == before, "{before} → {after}");
            Ok("unchanged".into())
        }),
    );
    m.check(
        &[
            "kube_proxy = false: other edge's Service through the relay",
            "edge1 (hostNetwork) → 10.96.0.41 ⇒ 10.244.8.5",
        ],
        "epod2",
        http_from(&lab, Role::Edge1, SVC_OTHER),
    );
    let at_edge1 = SocketAddr::new(IpAddr::V4(lab.edge_host_ip(1)), ETP_NODE_PORT);
    m.check(
        &[
            "kube_proxy = false: externalTrafficPolicy Local NodePort from the site LAN",
            "nat1 (192.168.1.1) → 192.168.1.10:30042 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(&lab, Role::nat(1)?, at_edge1),
    );
    relay.stop()?;
    m.conclude("lab-no-kube-proxy.txt", t0)
}
