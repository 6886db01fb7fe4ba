//! The negative cells: capture is restricted by source. A device on
//! edge1's LAN (the site router, 192.168.1.1) routing a cloud pod through
//! edge1, and a WAN host routing an edge pod to the relay's public
//! address, must get no answer, and the node's capture must count them
//! refused (`relay_lab::sources::not_tunnelled`).

use relay_lab::netns::{self, NetnsLab, Proto, Role};
use relay_lab::scenario::{sa, Table, DNS, HTTP};

/// One cell per (source, node, target, protocol) that must not be tunnelled.
pub(crate) fn cells(lab: &NetnsLab, m: &mut Table) {
    let epod1 = netns::edge_pod_ip(1);
    let host1 = netns::edge_host_ip(1);
    for (case, path, from, via, node, target, proto) in [
        (
            "LAN host at an edge site → cloud pod: not tunnelled",
            "nat1 (192.168.1.1) via edge1 → 10.244.2.2:80",
            Role::Nat1,
            host1,
            Role::Edge1,
            sa(netns::CPOD2_IP, HTTP),
            Proto::Tcp,
        ),
        (
            "LAN host at an edge site → cloud pod UDP: not tunnelled",
            "nat1 (192.168.1.1) via edge1 → 10.244.2.2:53/udp",
            Role::Nat1,
            host1,
            Role::Edge1,
            sa(netns::CPOD2_IP, DNS),
            Proto::Udp,
        ),
        (
            "WAN host → edge pod via the relay: not tunnelled",
            "wan (198.18.0.254) via relay → 10.244.7.5:80",
            Role::Wan,
            netns::RELAY_WAN_IP,
            Role::Relay,
            sa(epod1, HTTP),
            Proto::Tcp,
        ),
    ] {
        m.note(
            &[case, path],
            relay_lab::sources::not_tunnelled(lab, from, via, node, target, proto),
        );
    }
}
