//! The seed matrix's UDP cells: a DNS-sized query and a reply naming the
//! host that answered, the same directions as the TCP cells; then one
//! payload too large for the QUIC path's datagram, which must arrive whole
//! and be answered whole (on the flow's stream over QUIC, as a datagram
//! over the TCP fallback).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{metric, sa, udp_from, Table, DNS};
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

/// Sends 3000 bytes from `from` to the UDP responder of `pod` (whose
/// answers start with `name:`); the length of the answer when it came
/// within 2 s and is the full echo, else why not.
fn answer_to_3000_bytes(lab: &NetnsLab, from: Role, pod: Ipv4Addr, name: &str) -> Result<usize> {
    let head = format!("{name}:").into_bytes();
    lab.run_in(from, Duration::from_secs(10), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(sa(pod, DNS)).await?;
        s.send(&[b'x'; 3000]).await?;
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
        anyhow::ensure!(
            buf[..n].starts_with(&head) && buf[head.len()..n] == [b'x'; 3000],
            "answer of {n} bytes is not the full echo"
        );
        Ok(n)
    })
}

/// The relay's counters of payloads dropped as oversized and of payloads
/// carried on flow streams.
fn large_payload_counters(lab: &NetnsLab) -> Result<(f64, f64)> {
    Ok((
        metric(lab, "relay_udp_dropped_total{reason=\"oversize\"}")?,
        metric(lab, "relay_udp_stream_payloads_total")?,
    ))
}

/// UDP larger than the tunnel's datagram: carried whole, never truncated,
/// as IP fragmentation carries it between real pods; the admin API reports
/// the datagram limit. Over QUIC a 3000-byte payload is larger than the
/// path's datagram, so it and its 3006-byte answer travel on the flow's
/// stream (counted by the relay); over the TCP fallback (`over_tcp`)
/// datagrams carry up to 64 KiB, so neither needs the stream.
pub(crate) fn oversized(lab: &NetnsLab, m: &mut Table, over_tcp: bool) {
    let case = if over_tcp {
        "UDP 3000 bytes over TCP fallback: carried"
    } else {
        "UDP larger than the path's datagram: carried on the flow stream"
    };
    let before = large_payload_counters(lab);
    let answer = answer_to_3000_bytes(lab, Role::Cpod2, netns::edge_pod_ip(1), "epod1");
    let after = large_payload_counters(lab);
    let max_payload = edge1_session(lab).map(|row| row.udp_max_payload);
    let outcome = match (answer, before, after, max_payload) {
        (Ok(n), Ok((o0, c0)), Ok((o1, c1)), Ok(max)) => {
            let (oversize, carried) = (o1 - o0, c1 - c0);
            let seen = format!(
                "answered with {n} bytes; {carried} carried on the flow stream, {oversize} dropped as oversize; admin reports udp_max_payload {max}"
            );
            let ok = oversize == 0.0
                && if over_tcp {
                    max > 3000 && carried == 0.0
                } else {
                    (1000..3000).contains(&max) && carried >= 1.0
                };
            if ok {
                Ok(seen)
            } else {
                Err(anyhow::anyhow!(seen))
            }
        }
        (a, b, c, mp) => Err(anyhow::anyhow!(
            "answer={a:?} counters before={b:?} after={c:?} max_payload={mp:?}"
        )),
    };
    m.note(&[case, "cpod2 → 10.244.7.5:53/udp, 3000 bytes"], outcome);
    edge_to_edge_oversized(lab, m);
}

/// The same between two edges: the relay bridges their flows, and the
/// payload and its answer cross at least one QUIC leg (both without the
/// fallback, edge2's with it), so the relay carries them on a flow stream.
fn edge_to_edge_oversized(lab: &NetnsLab, m: &mut Table) {
    let before = large_payload_counters(lab);
    let answer = answer_to_3000_bytes(lab, Role::Epod1, netns::edge_pod_ip(2), "epod2");
    let after = large_payload_counters(lab);
    let outcome = match (answer, before, after) {
        (Ok(n), Ok((o0, c0)), Ok((o1, c1))) => {
            let (oversize, carried) = (o1 - o0, c1 - c0);
            let seen = format!(
                "answered with {n} bytes; {carried} carried on flow streams, {oversize} dropped as oversize"
            );
            if carried >= 1.0 && oversize == 0.0 {
                Ok(seen)
            } else {
                Err(anyhow::anyhow!(seen))
            }
        }
        (a, b, c) => Err(anyhow::anyhow!(
            "answer={a:?} counters before={b:?} after={c:?}"
        )),
    };
    m.note(
        &[
            "UDP edge pod → other edge's pod, larger than a datagram: carried",
            "epod1 → 10.244.8.5:53/udp, 3000 bytes",
        ],
        outcome,
    );
}
