//! The seed matrix's UDP cells: a DNS-sized query and a reply naming the
//! host that answered, the same directions as the TCP cells; then one
//! datagram too large for the QUIC path, which must be dropped and counted
//! (never truncated), or carried over the TCP fallback.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{admin, sa, udp_from, Table, DNS};
use tokio::net::UdpSocket;

use crate::observe::edge1_session;
use crate::setup::{DNS_CLOUD, DNS_EDGE1, DNS_EDGE2};

/// UDP between pods, hosts and ClusterIPs across cloud and edges.
pub(crate) fn cells(lab: &NetnsLab, m: &mut Table) {
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    m.check(
        &["UDP cloud pod → edge pod", "cpod2 → 10.244.7.5:53/udp"],
        "epod1",
        udp_from(lab, Role::Cpod2, sa(epod1, DNS)),
    );
    m.check(
        &["UDP edge pod → cloud pod", "epod1 → 10.244.2.2:53/udp"],
        "cpod2",
        udp_from(lab, Role::Epod1, sa(netns::CPOD2_IP, DNS)),
    );
    m.check(
        &[
            "UDP edge pod → other edge's pod",
            "epod1 → 10.244.8.5:53/udp",
        ],
        "epod2",
        udp_from(lab, Role::Epod1, sa(epod2, DNS)),
    );
    m.check(
        &[
            "UDP cloud pod → ClusterIP (edge endpoint)",
            "cpod2 → 10.96.0.21:53/udp ⇒ 10.244.7.5",
        ],
        "epod1",
        udp_from(lab, Role::Cpod2, DNS_EDGE1),
    );
    m.check(
        &[
            "UDP cloud pod (relay node) → ClusterIP (edge endpoint)",
            "cpod1@relay → 10.96.0.21:53/udp ⇒ 10.244.7.5",
        ],
        "epod1",
        udp_from(lab, Role::Cpod1, DNS_EDGE1),
    );
    m.check(
        &[
            "UDP relay node host → ClusterIP (edge endpoint)",
            "relay (hostNetwork) → 10.96.0.31:53/udp ⇒ 10.244.8.5",
        ],
        "epod2",
        udp_from(lab, Role::Relay, DNS_EDGE2),
    );
    m.check(
        &[
            "UDP edge pod → ClusterIP (cloud endpoint)",
            "epod1 → 10.96.0.11:53/udp ⇒ 10.244.1.2",
        ],
        "cpod1",
        udp_from(lab, Role::Epod1, DNS_CLOUD),
    );
    m.check(
        &[
            "UDP edge pod → ClusterIP (other edge)",
            "epod1 → 10.96.0.31:53/udp ⇒ 10.244.8.5",
        ],
        "epod2",
        udp_from(lab, Role::Epod1, DNS_EDGE2),
    );
    m.check(
        &[
            "UDP edge host → ClusterIP (same edge)",
            "edge1 (hostNetwork) → 10.96.0.21:53/udp ⇒ 10.244.7.5",
        ],
        "epod1",
        udp_from(lab, Role::Edge1, DNS_EDGE1),
    );
}

/// Sends 3000 bytes from cpod2 to epod1's UDP responder; whether no reply
/// came within 2 s.
fn no_reply_to_3000_bytes(lab: &NetnsLab) -> Result<bool> {
    let epod1 = netns::edge_pod_ip(1);
    lab.run_in(Role::Cpod2, Duration::from_secs(10), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(sa(epod1, DNS)).await?;
        s.send(&[b'x'; 3000]).await?;
        let mut buf = [0u8; 4096];
        Ok(
            tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
                .await
                .is_err(),
        )
    })
}

/// The relay's metric line counting datagrams dropped as oversized (empty
/// when it has none).
fn oversize_drops(lab: &NetnsLab) -> Result<String> {
    admin(lab, "/metrics").map(|t| {
        t.lines()
            .find(|l| l.starts_with("relay_udp_dropped_total{reason=\"oversize\"}"))
            .unwrap_or_default()
            .to_string()
    })
}

/// Oversized UDP: counted and dropped, never silently truncated; the admin
/// API reports the effective payload size. Over QUIC a 3000-byte payload
/// is larger than the path's datagram and must be dropped and counted;
/// over the TCP fallback (`over_tcp`) datagrams carry up to 64 KiB, so the
/// same payload must arrive. Either way the admin API says which limit
/// applies.
pub(crate) fn oversized(lab: &NetnsLab, m: &mut Table, over_tcp: bool) {
    let big = no_reply_to_3000_bytes(lab);
    let counted = oversize_drops(lab);
    let max_payload = edge1_session(lab).map(|row| row.udp_max_payload);
    let (case, outcome) = if over_tcp {
        (
            "UDP 3000 bytes over TCP fallback: carried",
            match (big, counted, max_payload) {
                (Ok(false), Ok(c), Ok(max)) if c.ends_with(" 0") && max > 3000 => {
                    Ok(format!("replied; {c}; admin reports udp_max_payload {max}"))
                }
                (b, c, mp) => Err(anyhow::anyhow!(
                    "no-reply={b:?} metric={c:?} max_payload={mp:?}"
                )),
            },
        )
    } else {
        (
            "UDP larger than the path: dropped and counted",
            match (big, counted, max_payload) {
                (Ok(true), Ok(c), Ok(max)) if c.ends_with(" 1") && (1000..3000).contains(&max) => {
                    Ok(format!(
                        "no reply; {c}; admin reports udp_max_payload {max}"
                    ))
                }
                (b, c, mp) => Err(anyhow::anyhow!(
                    "no-reply={b:?} metric={c:?} max_payload={mp:?}"
                )),
            },
        )
    };
    m.note(&[case, "cpod2 → 10.244.7.5:53/udp, 3000 bytes"], outcome);
}
