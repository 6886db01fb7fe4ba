//! The seed matrix's TCP cells: cloud → edge, from the apiserver (its
//! CONNECT egress and its host), edge → cloud and edge → edge, each an HTTP
//! page that names the host that served it, so a cell fails on a wrong
//! endpoint as well as on no answer.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use relay_lab::cluster::Cluster;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    connect_from, connect_refused, http_from, sa, service_resolutions, udp_from, Table, HTTP,
};

use crate::setup::{
    NODE_PORT, NODE_PORT_CLOUD, NODE_PORT_DNS_EDGE2, NODE_PORT_EDGE2, SVC_CLOUD, SVC_CLOUD2_HOST,
    SVC_EDGE1, SVC_EDGE1_HOST, SVC_EDGE2, SVC_EDGE2_HOST,
};

/// Cloud → edge by address: pods and hosts of the cloud (on the relay node
/// and off it) reach edge pods and an edge node, the plain routing case.
pub(crate) fn cloud_to_edge(lab: &NetnsLab, m: &mut Table) {
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let host1 = netns::edge_host_ip(1);
    m.check(
        &["cloud pod → edge pod", "cpod2@cloud2 → 10.244.7.5"],
        "epod1",
        http_from(lab, Role::Cpod2, sa(epod1, HTTP)),
    );
    m.check(
        &[
            "cloud pod (relay node) → edge pod",
            "cpod1@relay → 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Cpod1, sa(epod1, HTTP)),
    );
    m.check(
        &["cloud host → edge pod", "cloud2 (hostNetwork) → 10.244.7.5"],
        "epod1",
        http_from(lab, Role::Cloud2, sa(epod1, HTTP)),
    );
    m.check(
        &[
            "relay node host → edge pod",
            "relay (hostNetwork, local) → 10.244.8.5",
        ],
        "epod2",
        http_from(lab, Role::Relay, sa(epod2, HTTP)),
    );
    m.check(
        &["cloud pod → edge node", "cpod2 → 192.168.1.10"],
        "edge1",
        http_from(lab, Role::Cpod2, sa(host1, HTTP)),
    );
    let host2 = netns::edge_host_ip(2);
    m.check(
        &[
            "cloud pod (relay node) → edge node",
            "cpod1@relay → 192.168.2.10",
        ],
        "edge2",
        http_from(lab, Role::Cpod1, sa(host2, HTTP)),
    );
    m.check(
        &["cloud host → edge pod", "cloud2 (hostNetwork) → 10.244.8.5"],
        "epod2",
        http_from(lab, Role::Cloud2, sa(epod2, HTTP)),
    );
}

/// Cloud → edge through kube-proxy's Services (ClusterIP and NodePort):
/// wherever kube-proxy would DNAT to an edge pod, the tunnel must still
/// carry it, including on the relay node where capture goes first.
pub(crate) fn cloud_to_edge_services(lab: &NetnsLab, m: &mut Table) {
    m.check(
        &[
            "cloud pod → ClusterIP (edge endpoint)",
            "cpod2 → 10.96.0.20 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Cpod2, SVC_EDGE1),
    );
    m.check(
        &[
            "cloud host → ClusterIP (edge endpoint)",
            "cloud2 (hostNetwork) → 10.96.0.20 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Cloud2, SVC_EDGE1),
    );
    // On the relay node, capture takes the ClusterIP port ahead of
    // kube-proxy (which would DNAT to the edge pod in the same hook) and
    // the relay picks the endpoint.
    m.check(
        &[
            "cloud pod (relay node) → ClusterIP (edge endpoint)",
            "cpod1@relay → 10.96.0.20 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Cpod1, SVC_EDGE1),
    );
    m.check(
        &[
            "relay node host → ClusterIP (edge endpoint)",
            "relay (hostNetwork) → 10.96.0.20 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Relay, SVC_EDGE1),
    );
    // NodePort on the relay node: kube-proxy would DNAT it to the edge pod
    // in the same hook; capture takes the node's own address and port
    // first and the relay picks the endpoint.
    m.check(
        &[
            "cloud host → relay node's NodePort (edge endpoint)",
            "cloud2 → 10.0.0.1:30080 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Cloud2, sa(netns::RELAY_LAN_IP, NODE_PORT)),
    );
    m.check(
        &[
            "relay node host → its own NodePort (edge endpoint)",
            "relay (hostNetwork) → 10.0.0.1:30080 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Relay, sa(netns::RELAY_LAN_IP, NODE_PORT)),
    );
    m.check(
        &[
            "apiserver host → ClusterIP (edge endpoint)",
            "apiserver (hostNetwork) → 10.96.0.30 ⇒ 10.244.8.5",
        ],
        "epod2",
        http_from(lab, Role::Apiserver, SVC_EDGE2),
    );
    // A hostNetwork endpoint: the EndpointSlice names the edge node's own
    // address, which the edge serves.
    m.check(
        &[
            "cloud pod (relay node) → ClusterIP (edge hostNetwork endpoint)",
            "cpod1@relay → 10.96.0.32 ⇒ 192.168.2.10",
        ],
        "edge2",
        http_from(lab, Role::Cpod1, SVC_EDGE2_HOST),
    );
    m.check(
        &[
            "cloud pod → ClusterIP (edge hostNetwork endpoint)",
            "cpod2 → 10.96.0.22 ⇒ 192.168.1.10",
        ],
        "edge1",
        http_from(lab, Role::Cpod2, SVC_EDGE1_HOST),
    );
}

/// The apiserver's ways to the edges: its CONNECT egress (by node name,
/// pod address, Service name and ClusterIP) and its host's own routes.
pub(crate) fn from_apiserver(lab: &NetnsLab, m: &mut Table) {
    let epod1 = netns::edge_pod_ip(1);
    m.check(
        &[
            "apiserver → edge kubelet (CONNECT)",
            "apiserver → CONNECT edge1:10250",
        ],
        "edge1-kubelet",
        connect_from(lab, Role::Apiserver, "edge1:10250"),
    );
    m.check(
        &[
            "apiserver → edge pod (CONNECT)",
            "apiserver → CONNECT 10.244.8.5:80",
        ],
        "epod2",
        connect_from(lab, Role::Apiserver, "10.244.8.5:80"),
    );
    // CONNECT by Service name (the apiserver dials webhooks and aggregated
    // APIs as svc.ns.svc:port through the same egress): edge endpoints
    // through their edge, cloud endpoints dialled by the relay.
    m.check(
        &[
            "apiserver → Service name (edge endpoint, CONNECT)",
            "apiserver → CONNECT web-edge2.default.svc.cluster.local:80",
        ],
        "epod2",
        connect_from(
            lab,
            Role::Apiserver,
            "web-edge2.default.svc.cluster.local:80",
        ),
    );
    m.check(
        &[
            "apiserver → Service name (cloud endpoint, CONNECT)",
            "apiserver → CONNECT web-cloud.default.svc:80",
        ],
        "cpod1",
        connect_from(lab, Role::Apiserver, "web-cloud.default.svc:80"),
    );
    m.check(
        &[
            "apiserver → ClusterIP (edge endpoint, CONNECT)",
            "apiserver → CONNECT 10.96.0.20:80",
        ],
        "epod1",
        connect_from(lab, Role::Apiserver, "10.96.0.20:80"),
    );
    m.check(
        &[
            "apiserver host → edge pod",
            "apiserver (hostNetwork) → 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Apiserver, sa(epod1, HTTP)),
    );
    from_apiserver_to_the_cloud(lab, m);
}

/// The egress selector sends the apiserver's cloud traffic to the relay
/// too (`kubectl logs` of a cloud pod, webhooks and aggregated APIs by
/// address): the relay dials cloud Nodes and cloud ranges itself, never
/// its own listeners.
fn from_apiserver_to_the_cloud(lab: &NetnsLab, m: &mut Table) {
    for (case, path, authority, answer) in [
        (
            "apiserver → cloud kubelet by node name (CONNECT)",
            "apiserver → CONNECT cloud2:10250",
            "cloud2:10250",
            "cloud2-kubelet",
        ),
        (
            "apiserver → relay node's own kubelet (CONNECT)",
            "apiserver → CONNECT 10.0.0.1:10250",
            "10.0.0.1:10250",
            "relay-kubelet",
        ),
        (
            "apiserver → cloud pod (CONNECT)",
            "apiserver → CONNECT 10.244.2.2:80",
            "10.244.2.2:80",
            "cpod2",
        ),
    ] {
        m.check(
            &[case, path],
            answer,
            connect_from(lab, Role::Apiserver, authority),
        );
    }
    m.note(
        &[
            "apiserver → the relay's own admin listener (CONNECT) refused",
            "apiserver → CONNECT 10.0.0.1:9090",
        ],
        connect_refused(
            lab,
            Role::Apiserver,
            "10.0.0.1:9090",
            Duration::from_secs(1),
            "relay_itself",
        )
        .map(|d| format!("403 relay_itself in {d:?}")),
    );
}

/// Edge → cloud: edge pods and hosts reach cloud pods, a cloud node and
/// ClusterIPs with cloud endpoints.
pub(crate) fn edge_to_cloud(lab: &NetnsLab, m: &mut Table) {
    m.check(
        &["edge pod → cloud pod (relay node)", "epod1 → 10.244.1.2"],
        "cpod1",
        http_from(lab, Role::Epod1, sa(netns::CPOD1_IP, HTTP)),
    );
    m.check(
        &["edge pod → cloud pod", "epod1 → 10.244.2.2"],
        "cpod2",
        http_from(lab, Role::Epod1, sa(netns::CPOD2_IP, HTTP)),
    );
    m.check(
        &["edge host → cloud pod", "edge1 (hostNetwork) → 10.244.2.2"],
        "cpod2",
        http_from(lab, Role::Edge1, sa(netns::CPOD2_IP, HTTP)),
    );
    m.check(
        &["edge pod → cloud node", "epod2 → 10.0.0.2"],
        "cloud2",
        http_from(lab, Role::Epod2, sa(netns::CLOUD2_LAN_IP, HTTP)),
    );
    m.check(
        &[
            "edge pod → ClusterIP (cloud endpoint)",
            "epod1 → 10.96.0.10 ⇒ 10.244.1.2",
        ],
        "cpod1",
        http_from(lab, Role::Epod1, SVC_CLOUD),
    );
    m.check(
        &[
            "edge host → ClusterIP (cloud endpoint)",
            "edge1 (hostNetwork) → 10.96.0.10 ⇒ 10.244.1.2",
        ],
        "cpod1",
        http_from(lab, Role::Edge1, SVC_CLOUD),
    );
    edge_to_cloud_mirrored(lab, m);
}

/// The seed tables' edge → cloud rows the cells above leave out: the
/// second edge as the source, the relay node's own address as a
/// hostNetwork target (a port that is not one of the relay's listeners),
/// and a ClusterIP whose endpoint is a cloud node's address.
fn edge_to_cloud_mirrored(lab: &NetnsLab, m: &mut Table) {
    let relay_host = sa(netns::RELAY_LAN_IP, HTTP);
    let cloud2_host = sa(netns::CLOUD2_LAN_IP, HTTP);
    for (case, path, from, target, answer) in [
        (
            "edge host → cloud pod (relay node)",
            "edge1 (hostNetwork) → 10.244.1.2",
            Role::Edge1,
            sa(netns::CPOD1_IP, HTTP),
            "cpod1",
        ),
        (
            "edge host → cloud pod (relay node)",
            "edge2 (hostNetwork) → 10.244.1.2",
            Role::Edge2,
            sa(netns::CPOD1_IP, HTTP),
            "cpod1",
        ),
        (
            "edge host → cloud pod",
            "edge2 (hostNetwork) → 10.244.2.2",
            Role::Edge2,
            sa(netns::CPOD2_IP, HTTP),
            "cpod2",
        ),
        (
            "edge host → ClusterIP (cloud endpoint)",
            "edge2 (hostNetwork) → 10.96.0.10 ⇒ 10.244.1.2",
            Role::Edge2,
            SVC_CLOUD,
            "cpod1",
        ),
        (
            "edge pod → cloud pod (relay node)",
            "epod2 → 10.244.1.2",
            Role::Epod2,
            sa(netns::CPOD1_IP, HTTP),
            "cpod1",
        ),
        (
            "edge pod → ClusterIP (cloud endpoint)",
            "epod2 → 10.96.0.10 ⇒ 10.244.1.2",
            Role::Epod2,
            SVC_CLOUD,
            "cpod1",
        ),
        (
            "edge pod → relay node (hostNetwork)",
            "epod1 → 10.0.0.1:80",
            Role::Epod1,
            relay_host,
            "relay",
        ),
        (
            "edge pod → relay node (hostNetwork)",
            "epod2 → 10.0.0.1:80",
            Role::Epod2,
            relay_host,
            "relay",
        ),
        (
            "edge pod → cloud node",
            "epod1 → 10.0.0.2",
            Role::Epod1,
            cloud2_host,
            "cloud2",
        ),
        (
            "edge pod → ClusterIP (cloud hostNetwork endpoint)",
            "epod1 → 10.96.0.12 ⇒ 10.0.0.2",
            Role::Epod1,
            SVC_CLOUD2_HOST,
            "cloud2",
        ),
        (
            "edge pod → ClusterIP (cloud hostNetwork endpoint)",
            "epod2 → 10.96.0.12 ⇒ 10.0.0.2",
            Role::Epod2,
            SVC_CLOUD2_HOST,
            "cloud2",
        ),
    ] {
        m.check(&[case, path], answer, http_from(lab, from, target));
    }
}

/// Edge → edge through the relay: pods, a node and ClusterIPs whose
/// endpoint runs on the other edge.
pub(crate) fn edge_to_edge(lab: &NetnsLab, m: &mut Table) {
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let host1 = netns::edge_host_ip(1);
    m.check(
        &["edge pod → other edge's pod", "epod1 → 10.244.8.5"],
        "epod2",
        http_from(lab, Role::Epod1, sa(epod2, HTTP)),
    );
    m.check(
        &[
            "edge host → other edge's pod",
            "edge2 (hostNetwork) → 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Edge2, sa(epod1, HTTP)),
    );
    m.check(
        &["edge pod → other edge's node", "epod2 → 192.168.1.10"],
        "edge1",
        http_from(lab, Role::Epod2, sa(host1, HTTP)),
    );
    // The edge captures the port (an endpoint elsewhere) ahead of its own
    // kube-proxy; the relay picks the endpoint and opens a stream to the
    // edge that runs it.
    m.check(
        &[
            "edge pod → ClusterIP (other edge)",
            "epod1 → 10.96.0.30 ⇒ 10.244.8.5",
        ],
        "epod2",
        http_from(lab, Role::Epod1, SVC_EDGE2),
    );
    m.check(
        &[
            "edge host → ClusterIP (other edge)",
            "edge2 (hostNetwork) → 10.96.0.20 ⇒ 10.244.7.5",
        ],
        "epod1",
        http_from(lab, Role::Edge2, SVC_EDGE1),
    );
    // The same the other way, and hostNetwork endpoints on the other edge.
    let host2 = netns::edge_host_ip(2);
    for (case, path, from, target, answer) in [
        (
            "edge host → other edge's pod",
            "edge1 (hostNetwork) → 10.244.8.5",
            Role::Edge1,
            sa(epod2, HTTP),
            "epod2",
        ),
        (
            "edge pod → other edge's node",
            "epod1 → 192.168.2.10",
            Role::Epod1,
            sa(host2, HTTP),
            "edge2",
        ),
        (
            "edge pod → ClusterIP (other edge's hostNetwork endpoint)",
            "epod2 → 10.96.0.22 ⇒ 192.168.1.10",
            Role::Epod2,
            SVC_EDGE1_HOST,
            "edge1",
        ),
        (
            "edge pod → ClusterIP (other edge's hostNetwork endpoint)",
            "epod1 → 10.96.0.32 ⇒ 192.168.2.10",
            Role::Epod1,
            SVC_EDGE2_HOST,
            "edge2",
        ),
    ] {
        m.check(&[case, path], answer, http_from(lab, from, target));
    }
}

/// A Node with no evidence of being in the cloud (no control-plane label,
/// pod CIDR and address outside `tunnel_routes`) and none of being an edge
/// either (no label, never connected): an edge that was never started. A
/// CONNECT to it must fail at once, as to any edge without a session; had
/// the relay taken it for a cloud node it would dial 192.168.3.10 itself
/// and fail only after its dial timeout.
pub(crate) fn unlabelled_edge_node(lab: &NetnsLab, cluster: &Cluster, m: &mut Table) {
    cluster
        .standin()
        .upsert_node(relay_kube_standin::kubelet_node(
            "edge3",
            &["10.244.9.0/24"],
            &[("InternalIP", "192.168.3.10")],
        ));
    // The relay's Node watch settles within 100 ms of a change.
    std::thread::sleep(Duration::from_secs(1));
    m.note(
        &[
            "apiserver → a Node that is neither cloud nor connected (CONNECT) fails fast",
            "apiserver → CONNECT edge3:10250",
        ],
        connect_refused(
            lab,
            Role::Apiserver,
            "edge3:10250",
            Duration::from_secs(1),
            "no_route",
        )
        .map(|d| format!("502 no_route in {d:?}")),
    );
}

/// The Internet from an edge with capture on: what is not a tunnel route
/// leaves by the site's own default route and NAT (the relay would refuse
/// to dial it: outside the cloud ranges), TCP and UDP, from a pod and
/// from the node.
pub(crate) fn edge_to_internet(lab: &NetnsLab, m: &mut Table) {
    let wan = netns::WAN_GW;
    for (case, path, from) in [
        (
            "edge pod → Internet host",
            "epod1 → 198.18.0.254:80",
            Role::Epod1,
        ),
        (
            "edge host → Internet host",
            "edge2 (hostNetwork) → 198.18.0.254:80",
            Role::Edge2,
        ),
    ] {
        m.check(&[case, path], "wan", http_from(lab, from, sa(wan, HTTP)));
    }
    m.check(
        &[
            "edge pod → Internet host UDP",
            "epod2 → 198.18.0.254:53/udp",
        ],
        "wan",
        udp_from(lab, Role::Epod2, sa(wan, relay_lab::scenario::DNS)),
    );
}

/// [`http_from`], and an error if the relay resolved a Service meanwhile
/// (the connection went through it).
fn http_not_resolved(lab: &NetnsLab, from: Role, target: SocketAddr) -> Result<String> {
    let before = service_resolutions(lab);
    let answer = http_from(lab, from, target);
    let after = service_resolutions(lab);
    match (before, after) {
        (Ok(b), Ok(a)) if a == b => answer,
        (b, a) => Err(anyhow::anyhow!(
            "went through the relay: resolutions {b:?} → {a:?} (answer {answer:?})"
        )),
    }
}

/// Every endpoint on the asking edge: left to its own kube-proxy (not
/// captured, not even by the service range among the tunnel routes), so
/// nothing goes through the relay.
pub(crate) fn same_edge_stays_local(lab: &NetnsLab, m: &mut Table) {
    // (From the edge host: a pod reaching a Service backed by itself
    // needs the CNI's hairpin mode, which is not this product's business.)
    m.check(
        &[
            "edge host → ClusterIP (same edge) stays local",
            "edge1 (hostNetwork) → 10.96.0.20 ⇒ 10.244.7.5, relay resolutions unchanged",
        ],
        "epod1",
        http_not_resolved(lab, Role::Edge1, SVC_EDGE1),
    );
}

/// NodePorts on an edge node, reached from the site's LAN (the site
/// router nat1, as a device in the shop would). edge1's kube-proxy would
/// DNAT a node port to an endpoint it cannot reach (another site's pod, a
/// cloud pod) and send it out by the site's default route; edge1 captures
/// its own node ports first and the relay picks the endpoint. A node port
/// whose endpoints are all on edge1 stays with edge1's kube-proxy. A
/// cloud pod dialling edge1's address on a node port (as a load balancer
/// in front of every node's NodePort does) has it resolved by the relay,
/// edge1's endpoints first: edge1's own socket to its own address would
/// be DNATed by its kube-proxy to an endpoint it cannot reach.
pub(crate) fn edge_node_ports(lab: &NetnsLab, m: &mut Table) {
    let host1 = netns::edge_host_ip(1);
    for (case, path, from, port, answer) in [
        (
            "cloud pod → edge node's NodePort (other edge's endpoint)",
            "cpod2 → 192.168.1.10:30082 ⇒ 10.244.8.5",
            Role::Cpod2,
            NODE_PORT_EDGE2,
            "epod2",
        ),
        (
            "cloud pod → edge node's NodePort (cloud endpoint)",
            "cpod2 → 192.168.1.10:30081 ⇒ 10.244.1.2",
            Role::Cpod2,
            NODE_PORT_CLOUD,
            "cpod1",
        ),
        (
            "LAN host at an edge site → edge node's NodePort (other edge's endpoint)",
            "nat1 → 192.168.1.10:30082 ⇒ 10.244.8.5",
            Role::Nat1,
            NODE_PORT_EDGE2,
            "epod2",
        ),
        (
            "LAN host at an edge site → edge node's NodePort (cloud endpoint)",
            "nat1 → 192.168.1.10:30081 ⇒ 10.244.1.2",
            Role::Nat1,
            NODE_PORT_CLOUD,
            "cpod1",
        ),
    ] {
        m.check(&[case, path], answer, http_from(lab, from, sa(host1, port)));
    }
    m.check(
        &[
            "UDP LAN host at an edge site → edge node's NodePort (other edge's endpoint)",
            "nat1 → 192.168.1.10:30053/udp ⇒ 10.244.8.5",
        ],
        "epod2",
        udp_from(lab, Role::Nat1, sa(host1, NODE_PORT_DNS_EDGE2)),
    );
    m.check(
        &[
            "LAN host at an edge site → edge node's NodePort (same edge) stays local",
            "nat1 → 192.168.1.10:30080 ⇒ 10.244.7.5, relay resolutions unchanged",
        ],
        "epod1",
        http_not_resolved(lab, Role::Nat1, sa(host1, NODE_PORT)),
    );
}
