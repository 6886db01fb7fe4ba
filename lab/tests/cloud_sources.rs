//! Which forwarded traffic the relay node captures, in in-cluster mode,
//! when `tunnel_routes` lists the cloud's pod CIDRs and Service range but
//! not the cloud node subnet (as the deploy base does): the cloud Nodes'
//! own addresses are capture sources too, since their host processes (an
//! ingress controller on the host network, a kubelet probe) and what
//! their kube-proxy masquerades (a NodePort reached on that node) come
//! from them. The relay runs against the apiserver stand-in on the
//! apiserver host (relay-kube-standin, not a real kube-apiserver), whose
//! Nodes include cloud2 (pod CIDR 10.244.2.0/24, listed in
//! `tunnel_routes`: a cloud node).
//!
//! What must hold: cloud2's host reaches an edge pod through the relay; a
//! cloud LAN host that is no Node (the apiserver host) routing the same
//! prefix to the relay node gets no answer and is counted as refused by
//! source; a host on the Internet side reaches a Service with an edge
//! endpoint at its external IP (the relay node's public address), which
//! is captured from any source as a node port is; and with
//! `capture.sources` set to the cloud ranges alone, cloud2's host is
//! refused the same way, which shows what the default adds. Also: a load
//! balancer's IP with `loadBalancerSourceRanges` is captured only from
//! those ranges; a NodePort is captured on every address of the relay
//! node by default, and only on the listed ones with
//! `capture.node_port_addresses`.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 20 s (13 s here: the NodePort
//! left uncaptured is waited out).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    connect_refused, edge_config_in, http_from, netns_start, sa, services, start_edge, start_relay,
    within, Table, HTTP,
};
use relay_lab::sources::not_tunnelled;
use relay_protocol::Cidr;

/// The load-balancer Service's port (on the relay node's public address).
const LB_PORT: u16 = 8080;
/// The external-IP Service's node port.
const NODE_PORT: u16 = 30070;

/// Whether the relay's capture takes forwarded traffic from `ip`.
fn is_source(lab: &NetnsLab, ip: std::net::Ipv4Addr) -> Result<bool> {
    let set = lab.exec(
        Role::Relay,
        &["nft", "list", "set", "inet", "edge_relay", "src4"],
    )?;
    Ok(set.contains(&ip.to_string()))
}

#[test]
fn cloud_nodes_host_addresses_are_capture_sources() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("cloud node sources")? else {
        return Ok(());
    };
    let _svcs = [services(&lab, Role::Epod1, "epod1")?];
    let cluster = Cluster::start(&lab)?;
    let epod1 = sa(netns::edge_pod_ip(1), HTTP);
    // A Service on epod1 whose external IP is the relay node's public
    // address (as `externalIPs` and MetalLB's L2 addresses are a node's).
    let mut web = LabService::on_lab_ports(
        "default",
        "web-ext",
        sa(Ipv4Addr::new(10, 96, 0, 70), HTTP),
        Proto::Tcp,
        &[(netns::edge_pod_ip(1), "edge1")],
    );
    web.external_ips = vec![netns::RELAY_WAN_IP];
    web.node_port = Some(NODE_PORT);
    // A LoadBalancer Service on epod1 whose ingress IP is the relay node's
    // public address too, open only to the WAN gateway's address
    // (`loadBalancerSourceRanges`, kube-proxy's firewall).
    let mut lb = LabService::on_lab_ports(
        "default",
        "web-lb",
        sa(Ipv4Addr::new(10, 96, 0, 71), LB_PORT),
        Proto::Tcp,
        &[(netns::edge_pod_ip(1), "edge1")],
    );
    lb.lb_ips = vec![netns::RELAY_WAN_IP];
    // Overlapping ranges, as operators write them (nft refuses overlapping
    // set elements: they must be merged, or the capture update fails).
    lb.lb_source_ranges = vec!["198.18.0.254/32", "198.18.0.252/30"];
    cluster.set_services(&lab, KubeProxyMode::Iptables, &[web, lb])?;
    let mut m = Table::new(&["case", "path", "result"]);

    let relay = start_relay(&lab, cluster.relay_config_without_cloud_lan(&lab, &pki)?)?;
    let edge1 = start_edge(&lab, 1, edge_config_in(&lab, &pki, 1)?)?;
    let ready = within(Duration::from_secs(10), || {
        Ok(is_source(&lab, netns::CLOUD2_LAN_IP)? && http_from(&lab, Role::Cpod2, epod1).is_ok())
    });
    m.note(
        &[
            "cloud2 (a cloud Node) is a capture source",
            "relay: nft set src4",
        ],
        ready.map(|d| format!("10.0.0.2 listed after {d:?}")),
    );
    m.check(
        &[
            "cloud node host → edge pod",
            "cloud2 (10.0.0.2) → 10.244.7.5",
        ],
        "epod1",
        http_from(&lab, Role::Cloud2, epod1),
    );
    m.note(
        &[
            "cloud LAN host that is no Node → edge pod: not tunnelled",
            "apiserver (10.0.0.3) via relay → 10.244.7.5",
        ],
        not_tunnelled(
            &lab,
            Role::Apiserver,
            netns::RELAY_LAN_IP,
            Role::Relay,
            epod1,
            Proto::Tcp,
        ),
    );
    m.check(
        &[
            "Internet host → a Service's external IP on the relay node",
            "wan (198.18.0.254) → 198.18.0.1:80 ⇒ 10.244.7.5",
        ],
        "epod1",
        within(Duration::from_secs(5), || {
            Ok(http_from(&lab, Role::Wan, sa(netns::RELAY_WAN_IP, HTTP)).is_ok())
        })
        .and_then(|_| http_from(&lab, Role::Wan, sa(netns::RELAY_WAN_IP, HTTP))),
    );
    let lb_at = sa(netns::RELAY_WAN_IP, LB_PORT);
    m.check(
        &[
            "Internet host inside loadBalancerSourceRanges → the load balancer's IP",
            "wan (198.18.0.254) → 198.18.0.1:8080 ⇒ 10.244.7.5",
        ],
        "epod1",
        within(Duration::from_secs(5), || {
            Ok(http_from(&lab, Role::Wan, lb_at).is_ok())
        })
        .and_then(|_| http_from(&lab, Role::Wan, lb_at)),
    );
    m.note(
        &[
            "CONNECT from outside loadBalancerSourceRanges to the load balancer's IP: refused",
            "cloud2 (10.0.0.2) CONNECT 198.18.0.1:8080",
        ],
        connect_refused(
            &lab,
            Role::Cloud2,
            "198.18.0.1:8080",
            Duration::from_secs(3),
            "loadBalancerSourceRanges",
        )
        .map(|d| format!("502 in {d:?}")),
    );
    let nat1 = Role::nat(1)?;
    m.check(
        &[
            "Internet host outside loadBalancerSourceRanges → the load balancer's IP: not tunnelled",
            "nat1 (198.18.0.11) → 198.18.0.1:8080",
        ],
        "refused",
        // Not captured, and nothing else listens there: the relay node's
        // kernel resets it (kube-proxy's firewall would drop it).
        match http_from(&lab, nat1, lb_at) {
            Ok(body) => Ok(format!("answered {body:?}")),
            Err(e) if format!("{e:#}").contains("Connection refused") => Ok("refused".into()),
            Err(e) => Err(e),
        },
    );
    m.check(
        &[
            "Internet host → the relay node's WAN address on a NodePort (every address by default)",
            "wan (198.18.0.254) → 198.18.0.1:30070 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(&lab, Role::Wan, sa(netns::RELAY_WAN_IP, NODE_PORT)),
    );
    edge1.stop()?;
    relay.stop()?;

    // Control: sources set to the cloud ranges alone, and node ports taken
    // on the cloud LAN address only (as kube-proxy's --nodeport-addresses).
    let mut cfg = cluster.relay_config_without_cloud_lan(&lab, &pki)?;
    let ranges = cfg.tunnel_routes.iter().copied().collect();
    if let Some(c) = cfg.capture.as_mut() {
        c.sources = Some(ranges);
        c.node_port_addresses = Some([Cidr::host(netns::RELAY_LAN_IP.into())].into());
    }
    let relay = start_relay(&lab, cfg)?;
    let _edge1 = start_edge(&lab, 1, edge_config_in(&lab, &pki, 1)?)?;
    let up = within(Duration::from_secs(10), || {
        Ok(http_from(&lab, Role::Cpod2, epod1).is_ok())
    });
    m.note(
        &[
            "control: capture.sources = tunnel_routes → cloud2 host refused",
            "cloud2 (10.0.0.2) via relay → 10.244.7.5",
        ],
        up.and_then(|_| {
            not_tunnelled(
                &lab,
                Role::Cloud2,
                netns::RELAY_LAN_IP,
                Role::Relay,
                epod1,
                Proto::Tcp,
            )
        }),
    );
    m.check(
        &[
            "node_port_addresses = the LAN address: cloud host → it on the NodePort",
            "cloud2 (10.0.0.2) → 10.0.0.1:30070 ⇒ 10.244.7.5",
        ],
        "epod1",
        // The restarted relay captures node ports once its Service watch
        // has listed them, apart from its edges' routes (waited for above).
        within(Duration::from_secs(5), || {
            let np = lab.exec(
                Role::Relay,
                &["nft", "list", "set", "inet", "edge_relay", "np4"],
            );
            Ok(np.is_ok_and(|s| s.contains(&format!("tcp . {NODE_PORT}"))))
        })
        .and_then(|_| http_from(&lab, Role::Cloud2, sa(netns::RELAY_LAN_IP, NODE_PORT))),
    );
    m.check(
        &[
            "node_port_addresses = the LAN address: the WAN address's NodePort not captured",
            "wan (198.18.0.254) → 198.18.0.1:30070",
        ],
        "not answered",
        match http_from(&lab, Role::Wan, sa(netns::RELAY_WAN_IP, NODE_PORT)) {
            Ok(body) => Ok(format!("answered {body:?}")),
            Err(_) => Ok("not answered".into()),
        },
    );
    relay.stop()?;
    m.conclude("lab-cloud-sources.txt", t0)
}
