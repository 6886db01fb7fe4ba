//! Setting the matrix up: a service on every host, the cluster API with
//! one Service per cell target, cloud2 left to the route agent for its
//! edge routes, the relay in in-cluster mode, two edges behind their NATs
//! and the route agent. Every later phase assumes exactly this topology.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    edge_config, launch, relay_config, sa, services, start_edge, start_relay, Running, ADMIN_TOKEN,
    DNS, HTTP,
};
use relay_transport::devcerts::DevPki;

use crate::fallback;

/// The route protocol number the route agent marks its routes with, so
/// the cells can tell them from the lab's own.
pub(crate) const AGENT_PROTO: u8 = 250;

/// The NodePort of Service `web-edge1` (endpoint on edge1).
pub(crate) const NODE_PORT: u16 = 30080;
/// The NodePort of Service `web-cloud` (endpoint cpod1).
pub(crate) const NODE_PORT_CLOUD: u16 = 30081;
/// The NodePort of Service `web-edge2` (endpoint epod2).
pub(crate) const NODE_PORT_EDGE2: u16 = 30082;
/// The UDP NodePort of Service `dns-edge2` (endpoint epod2).
pub(crate) const NODE_PORT_DNS_EDGE2: u16 = 30053;

/// A ClusterIP in the lab's service range, `10.96.0.{last}:{port}`.
const fn cluster_ip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)), port)
}

// One endpoint per Service, so each cell knows which host must answer.
/// `web-edge1`: HTTP, endpoint epod1 (also NodePort [`NODE_PORT`]).
pub(crate) const SVC_EDGE1: SocketAddr = cluster_ip(20, HTTP);
/// `web-cloud`: HTTP, endpoint cpod1 on the relay node.
pub(crate) const SVC_CLOUD: SocketAddr = cluster_ip(10, HTTP);
/// `web-edge2`: HTTP, endpoint epod2.
pub(crate) const SVC_EDGE2: SocketAddr = cluster_ip(30, HTTP);
/// `dns-edge1`: UDP, endpoint epod1.
pub(crate) const DNS_EDGE1: SocketAddr = cluster_ip(21, DNS);
/// `dns-cloud`: UDP, endpoint cpod1 on the relay node.
pub(crate) const DNS_CLOUD: SocketAddr = cluster_ip(11, DNS);
/// `dns-edge2`: UDP, endpoint epod2.
pub(crate) const DNS_EDGE2: SocketAddr = cluster_ip(31, DNS);
// Endpoints on a node's own address (a hostNetwork pod's EndpointSlice
// entry is its node's InternalIP): the seed tables' "→ clusterIp" rows
// with a hostNetwork target.
/// `web-edge1-host`: HTTP, endpoint edge1's node address.
pub(crate) const SVC_EDGE1_HOST: SocketAddr = cluster_ip(22, HTTP);
/// `web-edge2-host`: HTTP, endpoint edge2's node address.
pub(crate) const SVC_EDGE2_HOST: SocketAddr = cluster_ip(32, HTTP);
/// `web-cloud2-host`: HTTP, endpoint cloud2's node address.
pub(crate) const SVC_CLOUD2_HOST: SocketAddr = cluster_ip(12, HTTP);
/// `web-edge2-cloud`: HTTP, two endpoints, epod2 and cpod1 (the one
/// Service with two): once edge2 leaves (its Node and endpoints still
/// Ready, as while an edge's kubelet reaches the apiserver but its tunnel
/// is down), the relay must pick cpod1 every time.
pub(crate) const SVC_EDGE2_CLOUD: SocketAddr = cluster_ip(33, HTTP);
/// `agent-local`: HTTP, `internalTrafficPolicy: Local`, endpoints epod1,
/// epod2 and cpod1 (a node agent's DaemonSet): each node's own answers.
pub(crate) const SVC_NODE_LOCAL: SocketAddr = cluster_ip(34, HTTP);
/// `agent-away`: the same with endpoints epod2 and cpod1 only: edge1's
/// kube-proxy drops it, and nothing may carry it elsewhere.
pub(crate) const SVC_NODE_LOCAL_AWAY: SocketAddr = cluster_ip(35, HTTP);
/// `web-sticky`: HTTP, `sessionAffinity: ClientIP`, endpoints epod1 and
/// epod2 (the lab's kube-proxy model does not keep affinity, so only the
/// relay node's clients, whose connections the relay picks for, use it).
pub(crate) const SVC_STICKY: SocketAddr = cluster_ip(36, HTTP);

/// Services everywhere, each naming its host, so a cell can tell which
/// host answered.
pub(crate) fn start_services(lab: &NetnsLab) -> Result<Vec<Running>> {
    let mut svcs = Vec::new();
    for (role, name) in [
        // The relay node's host too: a hostNetwork target on the node the
        // relay runs on (seed rows edge → cloud-1, hostNetwork).
        (Role::Relay, "relay"),
        // A host on the Internet side (the WAN's gateway): edges reach it
        // through their site NAT, never through the tunnel.
        (Role::Wan, "wan"),
        (Role::Cpod1, "cpod1"),
        (Role::Cpod2, "cpod2"),
        (Role::Cloud2, "cloud2"),
        (Role::Epod1, "epod1"),
        (Role::Epod2, "epod2"),
        (Role::Edge1, "edge1"),
        (Role::Edge2, "edge2"),
    ] {
        svcs.push(services(lab, role, name)?);
    }
    Ok(svcs)
}

/// The cluster API (the apiserver stand-in on the apiserver host, not a
/// real kube-apiserver) holds the Nodes and the matrix's Services;
/// kube-proxy on every node (root namespaces) is programmed from the same
/// list, in `mode`.
pub(crate) fn start_cluster(lab: &NetnsLab, mode: KubeProxyMode) -> Result<Cluster> {
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let mut services: Vec<LabService> = [
        ("web-edge1", SVC_EDGE1, Proto::Tcp, epod1, "edge1"),
        ("web-cloud", SVC_CLOUD, Proto::Tcp, netns::CPOD1_IP, "relay"),
        ("web-edge2", SVC_EDGE2, Proto::Tcp, epod2, "edge2"),
        ("dns-edge1", DNS_EDGE1, Proto::Udp, epod1, "edge1"),
        ("dns-cloud", DNS_CLOUD, Proto::Udp, netns::CPOD1_IP, "relay"),
        ("dns-edge2", DNS_EDGE2, Proto::Udp, epod2, "edge2"),
        (
            "web-edge1-host",
            SVC_EDGE1_HOST,
            Proto::Tcp,
            netns::edge_host_ip(1),
            "edge1",
        ),
        (
            "web-edge2-host",
            SVC_EDGE2_HOST,
            Proto::Tcp,
            netns::edge_host_ip(2),
            "edge2",
        ),
        (
            "web-cloud2-host",
            SVC_CLOUD2_HOST,
            Proto::Tcp,
            netns::CLOUD2_LAN_IP,
            "cloud2",
        ),
    ]
    .into_iter()
    .map(|(name, vip, proto, ep, node)| {
        LabService::on_lab_ports("default", name, vip, proto, &[(ep, node)])
    })
    .collect();
    services.push(LabService::on_lab_ports(
        "default",
        "web-edge2-cloud",
        SVC_EDGE2_CLOUD,
        Proto::Tcp,
        &[(epod2, "edge2"), (netns::CPOD1_IP, "relay")],
    ));
    for (name, vip, eps) in [
        (
            "agent-local",
            SVC_NODE_LOCAL,
            &[
                (epod1, "edge1"),
                (epod2, "edge2"),
                (netns::CPOD1_IP, "relay"),
            ][..],
        ),
        (
            "agent-away",
            SVC_NODE_LOCAL_AWAY,
            &[(epod2, "edge2"), (netns::CPOD1_IP, "relay")][..],
        ),
    ] {
        let mut s = LabService::on_lab_ports("default", name, vip, Proto::Tcp, eps);
        s.internal_local = true;
        services.push(s);
    }
    let mut sticky = LabService::on_lab_ports(
        "default",
        "web-sticky",
        SVC_STICKY,
        Proto::Tcp,
        &[(epod1, "edge1"), (epod2, "edge2")],
    );
    sticky.client_ip_affinity = true;
    services.push(sticky);
    // Some are also NodePorts: every node's addresses take them.
    services[0].node_port = Some(NODE_PORT);
    services[1].node_port = Some(NODE_PORT_CLOUD);
    services[2].node_port = Some(NODE_PORT_EDGE2);
    services[5].node_port = Some(NODE_PORT_DNS_EDGE2);
    let cluster = Cluster::start(lab)?;
    cluster.set_services(lab, mode, &services)?;
    Ok(cluster)
}

/// cloud2 gets its edge routes from the route agent, not from the lab's
/// static routes: removes those, so cloud2's cells test the agent.
pub(crate) fn leave_cloud2_to_the_agent(lab: &NetnsLab) -> Result<()> {
    for r in [
        "10.244.7.0/24",
        "10.244.8.0/24",
        "192.168.1.0/24",
        "192.168.2.0/24",
    ] {
        lab.exec(Role::Cloud2, &["ip", "route", "del", r])?;
    }
    Ok(())
}

/// The relay and both edges, running.
pub(crate) struct Deployment {
    /// The relay (library) on the relay node.
    pub(crate) relay: Running,
    /// Edge client on edge1.
    pub(crate) edge1: Running,
    /// Edge client on edge2.
    pub(crate) edge2: Running,
    /// How long the relay and both edges took to be up (the report's
    /// footer; the UDP-blocked run's first cell).
    pub(crate) up: Duration,
    /// The relay's ping interval on the TCP fallback: it bounds how long a
    /// stale session stays after a NAT rebinding.
    pub(crate) relay_ping: Duration,
}

/// Starts the relay in in-cluster mode (Node objects decide claims,
/// Services are watched) and both edges; with `udp_blocked_at`, UDP is
/// blocked at that site's NAT first so its edge comes up over TCP.
pub(crate) fn start_relay_and_edges(
    lab: &NetnsLab,
    pki: &DevPki,
    cluster: &Cluster,
    udp_blocked_at: Option<u8>,
) -> Result<Deployment> {
    let mut cfg1 = edge_config(pki, 1)?;
    if let Some(site) = udp_blocked_at {
        fallback::block_udp(lab, site, &mut cfg1)?;
    }
    let t_up = Instant::now();
    let mut rcfg = relay_config(pki)?;
    rcfg.nodes.clear();
    rcfg.kubernetes = Some(cluster.relay_settings());
    let relay_ping = rcfg.quic.keepalive;
    let relay = start_relay(lab, rcfg)?;
    let edge1 = start_edge(lab, 1, cfg1)?;
    let edge2 = start_edge(lab, 2, edge_config(pki, 2)?)?;
    Ok(Deployment {
        relay,
        edge1,
        edge2,
        up: t_up.elapsed(),
        relay_ping,
    })
}

/// The route agent on cloud2, polling the relay's admin API every 200 ms.
pub(crate) fn start_agent(lab: &NetnsLab) -> Result<Running> {
    let cfg = relay_server::agent::AgentConfig {
        admin: sa(netns::RELAY_LAN_IP, 9090),
        token: Some(relay_server::Secret::new(ADMIN_TOKEN)),
        // Plain HTTP on the lab's private LAN (the relay allows it there).
        tls: None,
        interval: Duration::from_millis(200),
        proto: AGENT_PROTO,
    };
    launch(
        lab,
        Role::Cloud2,
        "route agent",
        move |ready, stop| async move {
            let token = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(relay_server::agent::run(
                cfg,
                relay_server::agent::Toward::Via(IpAddr::V4(netns::RELAY_LAN_IP)),
                token.clone(),
            ));
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            token.cancel();
            let _ = task.await;
            Ok(())
        },
    )
}
