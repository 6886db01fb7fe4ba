//! Topology hints on a Service with endpoints at an edge and in the cloud,
//! in in-cluster mode against the apiserver stand-in (relay-kube-standin,
//! not a real kube-apiserver), each site its own zone
//! (`topology.kubernetes.io/zone`: edge1 `shop1`, edge2 `shop2`, the cloud
//! nodes `cloud`), as the EndpointSlice controller hints endpoints for
//! `trafficDistribution: PreferClose`: cpod2 (on cloud2) for zones `cloud`
//! and `shop1` (shop1 has no endpoint of its own), epod2 for `shop2`.
//!
//! What must hold, picks being kube-proxy's for the asking node:
//! - edge1's pod reaches cpod2 every time, never epod2 (without hints:
//!   about half the connections cross to the other site);
//! - a pod on the relay node (zone `cloud`, `kubernetes.node_name`) reaches
//!   cpod2 every time, and the relay node leaves the port to kube-proxy
//!   (not in the capture set: its hints keep cloud clients in the cloud).
//!   The lab's kube-proxy model knows no hints: it is programmed with what
//!   kube-proxy on a `cloud` node would use, cpod2 alone.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 15 s.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use relay_kube_standin::k8s_openapi::api::core::v1::Node;
use relay_kube_standin::k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
use relay_lab::cluster::{edge_node, Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{http_from, netns_start, sa, services, start_relay, within, Table, HTTP};

/// Connections per cell: with two endpoints picked in turn, the chance
/// that none crosses to the wrong one by luck is 2^-12.
const TRIES: usize = 12;

/// Labels `node` (as the stand-in holds it) with zone `zone`.
fn zone(cluster: &Cluster, mut node: Node, zone: &str) {
    node.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(relay_kube::nodes::ZONE_LABEL.into(), zone.into());
    cluster.standin().upsert_node(node);
}

/// Whether each of [`TRIES`] connections from `from` to `vip` was
/// answered by `want`: `want` repeated, else who answered.
fn all_from(lab: &NetnsLab, from: Role, vip: SocketAddr, want: &str) -> Result<String> {
    let who: Vec<String> = (0..TRIES)
        .map(|_| http_from(lab, from, vip))
        .collect::<Result<_>>()?;
    Ok(
        match who
            .iter()
            .all(|w| w.strip_prefix("hello from ") == Some(want))
        {
            true => format!("{TRIES} × {want}"),
            false => format!("answered by {who:?}"),
        },
    )
}

#[test]
fn picks_follow_zone_hints_at_the_edge_and_on_the_relay_node() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("topology hints")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod2, "epod2")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    let cluster = Cluster::start(&lab)?;
    for site in netns::SITES {
        zone(&cluster, edge_node(&lab, site), &format!("shop{site}"));
    }
    for cloud in ["relay", "cloud2"] {
        let node = cluster.standin().node(cloud).context("cloud node")?;
        zone(&cluster, node, "cloud");
    }
    let vip = sa(Ipv4Addr::new(10, 96, 0, 80), HTTP);
    let (epod2, cpod2) = (netns::edge_pod_ip(2), netns::CPOD2_IP);
    let web = LabService::on_lab_ports(
        "default",
        "web-near",
        vip,
        Proto::Tcp,
        &[(epod2, "edge2"), (cpod2, "cloud2")],
    );
    let (svc, mut slice) = web.objects();
    for e in &mut slice.endpoints {
        let zones: &[&str] = match e.node_name.as_deref() {
            Some("edge2") => &["shop2"],
            _ => &["cloud", "shop1"],
        };
        e.hints = Some(EndpointHints {
            for_zones: Some(
                zones
                    .iter()
                    .map(|z| ForZone {
                        name: z.to_string(),
                    })
                    .collect(),
            ),
            for_nodes: None,
        });
    }
    cluster.declare(svc, slice);
    // What kube-proxy on a `cloud` node programs with these hints.
    let cloud_view =
        LabService::on_lab_ports("default", "web-near", vip, Proto::Tcp, &[(cpod2, "cloud2")]);
    lab.sync_services(KubeProxyMode::Iptables, &[cloud_view.kube_proxy()?])?;

    let mut cfg = cluster.relay_config_without_cloud_lan(&lab, &pki)?;
    if let Some(k) = cfg.kubernetes.as_mut() {
        k.node_name = Some("relay".into());
    }
    let _relay = start_relay(&lab, cfg)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    let mut m = Table::new(&["case", "path", "result"]);
    let up = within(Duration::from_secs(15), || {
        Ok(http_from(&lab, Role::Epod1, vip).is_ok()
            && http_from(&lab, Role::Cpod2, sa(epod2, HTTP)).is_ok())
    });
    m.note(
        &["both edges up, the Service fed", "epod1 → VIP"],
        up.map(|d| format!("after {d:?}")),
    );

    let want = format!("{TRIES} × cpod2");
    m.check(
        &[
            "edge1 (zone shop1, no endpoint of its own) → VIP",
            "hinted: cpod2 only, never epod2",
        ],
        &want,
        all_from(&lab, Role::Epod1, vip, "cpod2"),
    );
    let captured = lab.exec(
        Role::Relay,
        &["nft", "list", "set", "inet", "edge_relay", "svc4"],
    )?;
    m.check(
        &[
            "relay node (zone cloud): port left to kube-proxy",
            "nft set svc4 without the VIP",
        ],
        "not captured",
        Ok(match captured.contains(&vip.ip().to_string()) {
            true => format!("captured: {captured}"),
            false => "not captured".into(),
        }),
    );
    m.check(
        &["relay node's pod → VIP", "hinted: cpod2 only"],
        &want,
        all_from(&lab, Role::Cpod1, vip, "cpod2"),
    );
    m.conclude("lab-topology.txt", t0)
}
