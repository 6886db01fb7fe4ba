//! Pods wired as Calico (and Cilium) wire them, in the namespace lab
//! (`LabOptions::routed_pods`): no `cni0` bridge with the pods' gateway
//! address, but a routed veth per pod whose node end has no IPv4 address
//! and answers the pod's ARP for `169.254.1.1` by proxy ARP. Every packet
//! a pod sends arrives on an interface without an address, where nft's
//! `redirect` (which takes the receiving interface's first address) drops
//! it; capture translates to an address of its own on `lo` instead.
//!
//! What must hold, in in-cluster mode against the apiserver stand-in
//! (relay-kube-standin, not a real kube-apiserver), with the lab's
//! kube-proxy model on every node: from an edge pod, a cloud pod over TCP
//! and UDP, the other edge's pod, and a ClusterIP whose endpoint is a
//! cloud pod; from a pod on the relay node, an edge pod over TCP and UDP
//! and a ClusterIP whose endpoint is an edge pod.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 15 s.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, LabOptions, Proto, Role};
use relay_lab::scenario::{
    http_from, netns_start_with, sa, services, start_relay, udp_from, wait_captured, within, Table,
    DNS, HTTP,
};

#[test]
fn pods_on_routed_veths_without_addresses_are_captured() -> Result<()> {
    let options = LabOptions {
        routed_pods: true,
        ..LabOptions::default()
    };
    let Some((t0, lab, pki)) = netns_start_with("routed pods", options)? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    let cluster = Cluster::start(&lab)?;
    let (epod1, epod2) = (netns::edge_pod_ip(1), netns::edge_pod_ip(2));
    let to_edge = LabService::on_lab_ports(
        "default",
        "at-edge",
        sa(Ipv4Addr::new(10, 96, 0, 90), HTTP),
        Proto::Tcp,
        &[(epod2, "edge2")],
    );
    let to_cloud = LabService::on_lab_ports(
        "default",
        "in-cloud",
        sa(Ipv4Addr::new(10, 96, 0, 91), HTTP),
        Proto::Tcp,
        &[(netns::CPOD2_IP, "cloud2")],
    );
    cluster.set_services(
        &lab,
        KubeProxyMode::Iptables,
        &[to_edge.clone(), to_cloud.clone()],
    )?;
    let relay = start_relay(&lab, cluster.relay_config_without_cloud_lan(&lab, &pki)?)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    let mut m = Table::new(&["case", "path", "result"]);
    let up = within(Duration::from_secs(15), || {
        Ok(http_from(&lab, Role::Cloud2, sa(epod1, HTTP)).is_ok()
            && http_from(&lab, Role::Cloud2, sa(epod2, HTTP)).is_ok())
    });
    m.note(
        &["both edges up", "cloud2's host → each edge pod"],
        up.map(|d| format!("after {d:?}")),
    );
    let cpod2 = netns::CPOD2_IP;
    // The node whose capture takes the first packet: the relay's
    // capture is behind the wait above, an edge's (installed from the
    // route list it is sent, possibly after that) is waited for here.
    for (case, from, node, to, want, udp) in [
        (
            "edge pod → cloud pod, TCP",
            Role::Epod1,
            Role::Edge1,
            cpod2,
            "cpod2",
            false,
        ),
        (
            "edge pod → cloud pod, UDP",
            Role::Epod1,
            Role::Edge1,
            cpod2,
            "cpod2",
            true,
        ),
        (
            "edge pod → other edge's pod",
            Role::Epod1,
            Role::Edge1,
            epod2,
            "epod2",
            false,
        ),
        (
            "relay node's pod → edge pod, TCP",
            Role::Cpod1,
            Role::Relay,
            epod1,
            "epod1",
            false,
        ),
        (
            "relay node's pod → edge pod, UDP",
            Role::Cpod1,
            Role::Relay,
            epod2,
            "epod2",
            true,
        ),
    ] {
        let path = format!("{} → {to}", from.as_str());
        let got = wait_captured(&lab, node, to, Duration::from_secs(10)).and_then(|_| match udp {
            false => http_from(&lab, from, sa(to, HTTP)),
            true => udp_from(&lab, from, sa(to, DNS))
                .map(|r| r.split(':').next().unwrap_or_default().to_string()),
        });
        m.check(&[case, &path], want, got);
    }
    m.check(
        &[
            "relay node's pod → ClusterIP, edge endpoint",
            "cpod1 → 10.96.0.90 ⇒ epod2",
        ],
        "epod2",
        http_from(&lab, Role::Cpod1, to_edge.vip),
    );
    m.check(
        &[
            "edge pod → ClusterIP, cloud endpoint",
            "epod1 → 10.96.0.91 ⇒ cpod2",
        ],
        "cpod2",
        http_from(&lab, Role::Epod1, to_cloud.vip),
    );
    relay.stop()?;
    m.conclude("lab-routed-pods.txt", t0)
}
