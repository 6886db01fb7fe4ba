//! The relay node's own NodePorts asked for through the tunnel: an edge
//! pod or edge host dialling the relay node's address on a node port
//! (routed to the tunnel when `tunnel_routes` lists the cloud nodes'
//! subnet, as the README recommends), and a CONNECT client doing the
//! same, by address or by the relay node's name. The relay resolves the port itself, as the relay node's
//! kube-proxy would: dialled from the relay's own marked socket, that
//! kube-proxy would DNAT it to any endpoint, and one on an edge would go
//! out the relay node's default route and hang.

use relay_lab::netns::{NetnsLab, Role, RELAY_LAN_IP};
use relay_lab::scenario::{connect_from, http_from, sa, udp_from, Table};

use crate::setup::{NODE_PORT_DNS_EDGE2, NODE_PORT_EDGE2};

/// One cell per client kind, each to a node port whose only endpoint is
/// on edge2 (so a wrong path hangs rather than answering by luck).
pub(crate) fn cells(lab: &NetnsLab, m: &mut Table) {
    let np = sa(RELAY_LAN_IP, NODE_PORT_EDGE2);
    m.check(
        &[
            "edge pod → relay node's NodePort (other edge's endpoint)",
            "epod1 → 10.0.0.1:30082 ⇒ 10.244.8.5",
        ],
        "epod2",
        http_from(lab, Role::Epod1, np),
    );
    m.check(
        &[
            "edge host → relay node's NodePort (other edge's endpoint)",
            "edge1 (hostNetwork) → 10.0.0.1:30082 ⇒ 10.244.8.5",
        ],
        "epod2",
        http_from(lab, Role::Edge1, np),
    );
    m.check(
        &[
            "UDP edge pod → relay node's NodePort (other edge's endpoint)",
            "epod1 → 10.0.0.1:30053/udp ⇒ 10.244.8.5",
        ],
        "epod2",
        udp_from(lab, Role::Epod1, sa(RELAY_LAN_IP, NODE_PORT_DNS_EDGE2)),
    );
    m.check(
        &[
            "CONNECT → relay node's NodePort (edge endpoint)",
            "apiserver → CONNECT 10.0.0.1:30082 ⇒ 10.244.8.5",
        ],
        "epod2",
        connect_from(lab, Role::Apiserver, "10.0.0.1:30082"),
    );
    // By the relay node's name (a cloud Node): the same resolution, not a
    // dial of its address (which its kube-proxy would DNAT to epod2 and
    // the main table send out the default route: a hang).
    m.check(
        &[
            "CONNECT → relay node's NodePort by node name (edge endpoint)",
            "apiserver → CONNECT relay:30082 ⇒ 10.244.8.5",
        ],
        "epod2",
        connect_from(lab, Role::Apiserver, "relay:30082"),
    );
}
