//! Who the destination sees, with `capture.preserve_source`, in the
//! network-namespace lab: each target answers with the peer address it
//! saw.
//!
//! edge1 keeps the client's address for everything it serves
//! (`preserve_source_served`: its pod CIDR and its host address), the relay
//! for the cloud pod CIDRs (`preserve_source`); edge2 keeps nothing (the control: its
//! pod sees edge2's bridge address, as every target did before). kube-proxy
//! is modelled on every node with its masquerade-by-mark rule (packets
//! carrying 0x4000 are masqueraded on the way out), the rule that would
//! rewrite a kept source if our own mark had that bit.
//!
//! Cells: cloud pods on both cloud nodes → edge1's pod (TCP and UDP), a
//! cloud pod → edge1's host, the apiserver host → edge1's pod through the
//! relay's CONNECT, edge1's pod → cloud pods on both cloud nodes, and
//! edge2's pod → edge1's pod (edge to edge, vouched for by the relay).
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Traffic stays inside the lab's namespaces.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config, lab_pki, launch, relay_config, sa, start_edge, start_relay, wait_captured, within,
    Running, CONNECT_PORT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The port every reporter listens on (TCP and UDP).
const REPORT: u16 = 9099;

/// A TCP and UDP reporter on `ip`:[`REPORT`] in `ns`: each connection
/// (datagram) is answered with the peer address it came from.
fn reporter(lab: &NetnsLab, ns: Role, ip: Ipv4Addr) -> Result<Running> {
    launch(lab, ns, "reporter", move |ready, stop| async move {
        let tcp = TcpListener::bind(sa(ip, REPORT)).await?;
        let udp = UdpSocket::bind(sa(ip, REPORT)).await?;
        let t = tokio::spawn(async move {
            while let Ok((mut s, peer)) = tcp.accept().await {
                let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
            }
        });
        let u = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(peer.ip().to_string().as_bytes(), peer).await;
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        t.abort();
        u.abort();
        Ok(())
    })
}

/// The address `target`'s reporter saw for a TCP connection from `ns`.
fn seen_tcp(lab: &NetnsLab, ns: Role, target: Ipv4Addr) -> Result<IpAddr> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let mut s = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(sa(target, REPORT)),
        )
        .await
        .context("connect timed out")??;
        read_peer(&mut s).await
    })
}

/// The address `target`'s reporter saw for a TCP connection the relay's
/// CONNECT endpoint opened for a client in `ns`.
fn seen_connect(lab: &NetnsLab, ns: Role, target: Ipv4Addr) -> Result<IpAddr> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let authority = sa(target, REPORT).to_string();
        let mut s =
            relay_lab::connect_via(sa(netns::RELAY_LAN_IP, CONNECT_PORT), &authority).await?;
        read_peer(&mut s).await
    })
}

async fn read_peer(s: &mut TcpStream) -> Result<IpAddr> {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .context("no answer")??;
    out.parse().with_context(|| format!("bad answer {out:?}"))
}

/// The address `target`'s reporter saw for a UDP datagram from `ns`.
fn seen_udp(lab: &NetnsLab, ns: Role, target: Ipv4Addr) -> Result<IpAddr> {
    lab.run_in(ns, Duration::from_secs(15), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(sa(target, REPORT)).await?;
        let mut buf = [0u8; 64];
        // The first datagram sets the flow up; retransmit as a resolver would.
        for _ in 0..3 {
            s.send(b"who").await?;
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
                let n = r?;
                let out = String::from_utf8_lossy(&buf[..n]).to_string();
                return out.parse().with_context(|| format!("bad answer {out:?}"));
            }
        }
        bail!("no UDP answer")
    })
}

#[test]
fn targets_see_the_original_client_where_preserve_source_is_set() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED source_address: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let (epod1, epod2) = (netns::edge_pod_ip(1), netns::edge_pod_ip(2));
    let edge1_host = netns::edge_host_ip(1);
    let _reporters = [
        reporter(&lab, Role::Epod1, epod1)?,
        reporter(&lab, Role::Epod2, epod2)?,
        reporter(&lab, Role::Edge1, edge1_host)?,
        reporter(&lab, Role::Cpod1, netns::CPOD1_IP)?,
        reporter(&lab, Role::Cpod2, netns::CPOD2_IP)?,
    ];

    let mut rcfg = relay_config(&pki)?;
    if let Some(c) = rcfg.capture.as_mut() {
        c.preserve_source = vec![netns::CPOD1_CIDR.parse()?, netns::CPOD2_CIDR.parse()?];
    }
    let _relay = start_relay(&lab, rcfg)?;
    // edge1 as a DaemonSet would configure every edge: whatever it serves
    // (here its pod CIDR and its host address) sees the client.
    let mut e1 = edge_config(&pki, 1)?;
    if let Some(c) = e1.capture.as_mut() {
        c.preserve_served = true;
    }
    let _edge1 = start_edge(&lab, 1, e1)?;
    let _edge2 = start_edge(&lab, 2, edge_config(&pki, 2)?)?;
    // Both edges' routes installed on the relay node before the first cell.
    within(Duration::from_secs(10), || {
        let dst = relay_lab::scenario::captured_prefixes(&lab)?;
        Ok(dst.contains(&netns::edge_pod_cidr(1).to_string())
            && dst.contains(&netns::edge_pod_cidr(2).to_string()))
    })
    .context("edge routes never captured on the relay node")?;
    // And the edges' capture of what their pods ask below, installed from
    // the route lists they are sent (possibly after they reported
    // themselves connected).
    for (node, to) in [
        (Role::Edge1, netns::CPOD1_IP),
        (Role::Edge1, netns::CPOD2_IP),
        (Role::Edge2, epod1),
    ] {
        wait_captured(&lab, node, to, Duration::from_secs(10))?;
    }

    let ip = |a: Ipv4Addr| IpAddr::V4(a);
    let cells: Vec<(&str, Result<IpAddr>, IpAddr)> = vec![
        (
            "cpod1 → epod1 (TCP)",
            seen_tcp(&lab, Role::Cpod1, epod1),
            ip(netns::CPOD1_IP),
        ),
        (
            "cpod2 → epod1 (TCP, from the other cloud node)",
            seen_tcp(&lab, Role::Cpod2, epod1),
            ip(netns::CPOD2_IP),
        ),
        (
            "cpod1 → epod1 (UDP)",
            seen_udp(&lab, Role::Cpod1, epod1),
            ip(netns::CPOD1_IP),
        ),
        (
            "cpod1 → edge1's host (TCP)",
            seen_tcp(&lab, Role::Cpod1, edge1_host),
            ip(netns::CPOD1_IP),
        ),
        (
            "apiserver → epod1 (CONNECT)",
            seen_connect(&lab, Role::Apiserver, epod1),
            ip(netns::APISERVER_IP),
        ),
        (
            "epod1 → cpod1 (TCP, a pod on the relay node)",
            seen_tcp(&lab, Role::Epod1, netns::CPOD1_IP),
            ip(epod1),
        ),
        (
            "epod1 → cpod2 (TCP)",
            seen_tcp(&lab, Role::Epod1, netns::CPOD2_IP),
            ip(epod1),
        ),
        (
            "epod1 → cpod2 (UDP)",
            seen_udp(&lab, Role::Epod1, netns::CPOD2_IP),
            ip(epod1),
        ),
        (
            "epod2 → epod1 (TCP, edge to edge)",
            seen_tcp(&lab, Role::Epod2, epod1),
            ip(epod2),
        ),
        (
            "cpod1 → epod2 (TCP; edge2 keeps nothing: its bridge address)",
            seen_tcp(&lab, Role::Cpod1, epod2),
            ip(netns::edge_pod_gw(2)),
        ),
    ];
    let mut failed = Vec::new();
    for (cell, got, want) in cells {
        match got {
            Ok(seen) if seen == want => println!("ok   {cell}: {seen}"),
            Ok(seen) => failed.push(format!("{cell}: saw {seen}, want {want}")),
            Err(e) => failed.push(format!("{cell}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("cells failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}
