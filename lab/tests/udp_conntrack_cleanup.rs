//! Captured UDP streams against kube-proxy's real conntrack cleanup, in
//! the network-namespace lab with the relay in in-cluster mode against
//! the apiserver stand-in (relay-kube-standin, not a real kube-apiserver).
//!
//! The lab's kube-proxy runs `CleanStaleEntries` after every sync that
//! changes a UDP Service's endpoints ([`NetnsLab::sync_services`]): it
//! deletes every UDP entry whose original destination is a UDP Service's
//! ClusterIP:port and whose reply source is not one of its endpoints,
//! which every captured flow's entry is (its reply source is the capture
//! address). Before the fix, the next reply left un-NATed (from the
//! capture address; the client drops it) and made an entry of its own,
//! the client's next datagram collided with it and had its source port
//! remapped: the endpoint saw a second 5-tuple and the pushes to the
//! first were lost. Now the capture re-creates the entries of its open
//! flows as they are deleted.
//!
//! Two streams, each a client that sends a datagram every 300 ms and a
//! server that pushes to it every 50 ms: a cloud pod to a ClusterIP whose
//! endpoint is at an edge (the relay node's capture), and an edge pod to
//! a ClusterIP whose endpoint is in the cloud (the edge's capture).
//! Mid-stream an unrelated UDP Service's endpoints change. What must
//! hold: no gap over a second at the client, every datagram it receives
//! from the ClusterIP, and one source port at the server throughout.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 20 s.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{launch, netns_start, sa, start_relay, Running, Table, DNS};
use tokio::net::UdpSocket;

/// A Service whose endpoint is at edge2 (captured on the relay node).
const AT_EDGE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 66)), DNS);
/// A Service whose endpoint is cpod2 (captured on edge1).
const IN_CLOUD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 67)), DNS);
/// The unrelated Service whose endpoints change mid-stream.
const OTHER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 68)), DNS);

/// The pushing servers' port (the endpoints' target port).
const PUSH: u16 = 5354;
/// How often a server pushes.
const PUSH_EVERY: Duration = Duration::from_millis(50);
/// How often a client sends (its half of the stream).
const SEND_EVERY: Duration = Duration::from_millis(300);

/// How long each client runs, and when the unrelated Service changes.
const SPAN: Duration = Duration::from_secs(6);
const CHANGE_AT: Duration = Duration::from_secs(2);
/// The longest silence allowed at a client.
const MAX_GAP: Duration = Duration::from_secs(1);

/// The sources a server saw stream datagrams from.
type Seen = Arc<Mutex<BTreeSet<SocketAddr>>>;

/// A server on [`PUSH`]: answers a query `q` with `name:q` (readiness
/// probes), and pushes `name:push` every [`PUSH_EVERY`] to every source
/// that sent `sub` (recorded in the returned set).
fn pusher(lab: &NetnsLab, ns: Role, name: &'static str) -> Result<(Running, Seen)> {
    let seen: Seen = Arc::default();
    let subs = seen.clone();
    let r = launch(lab, ns, name, move |ready, stop| async move {
        let udp = Arc::new(UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, PUSH)).await?);
        let rx = udp.clone();
        let subs2 = subs.clone();
        let recv = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = rx.recv_from(&mut buf).await {
                if &buf[..n] == b"sub" {
                    subs2.lock().unwrap().insert(from);
                } else {
                    let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                    let _ = rx.send_to(reply.as_bytes(), from).await;
                }
            }
        });
        let push = tokio::spawn(async move {
            loop {
                tokio::time::sleep(PUSH_EVERY).await;
                let to: Vec<SocketAddr> = subs.lock().unwrap().iter().copied().collect();
                for a in to {
                    let _ = udp.send_to(format!("{name}:push").as_bytes(), a).await;
                }
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        recv.abort();
        push.abort();
        Ok(())
    })?;
    Ok((r, seen))
}

/// What a client received: when (since it started) and from where.
type Log = Vec<(Duration, SocketAddr)>;

/// A client in `ns` streaming with `vip` for [`SPAN`]: `sub` every
/// [`SEND_EVERY`] from one unconnected socket (so datagrams from any
/// source are seen), recording every datagram received.
fn streamer(lab: &NetnsLab, ns: Role, vip: SocketAddr) -> JoinHandle<Result<Log>> {
    lab.spawn_in(ns, move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        let t = Instant::now();
        let mut log = Vec::new();
        let mut buf = [0u8; 512];
        let mut tick = tokio::time::interval(SEND_EVERY);
        while t.elapsed() < SPAN {
            tokio::select! {
                _ = tick.tick() => {
                    s.send_to(b"sub", vip).await?;
                }
                r = s.recv_from(&mut buf) => {
                    let (_, from) = r?;
                    log.push((t.elapsed(), from));
                }
                _ = tokio::time::sleep(SPAN.saturating_sub(t.elapsed())) => {}
            }
        }
        Ok(log)
    })
}

/// Checks one stream: the client heard only `vip`, with no gap over
/// [`MAX_GAP`] from its first push to its end, and the server saw one
/// source.
fn judged(
    log: &[(Duration, SocketAddr)],
    seen: &BTreeSet<SocketAddr>,
    vip: SocketAddr,
) -> Result<String> {
    let strangers: BTreeSet<SocketAddr> =
        log.iter().map(|(_, f)| *f).filter(|f| *f != vip).collect();
    ensure!(
        strangers.is_empty(),
        "the client received from {strangers:?}, not only {vip}"
    );
    let first = log.first().map(|(t, _)| *t).context("nothing received")?;
    let mut times: Vec<Duration> = log.iter().map(|(t, _)| *t).collect();
    times.push(SPAN);
    let gap = times
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or_default();
    ensure!(
        gap <= MAX_GAP,
        "a gap of {gap:?} at the client (first push at {first:?}, {} received)",
        log.len()
    );
    ensure!(
        seen.len() == 1,
        "the server saw {} sources: {seen:?}",
        seen.len()
    );
    Ok(format!(
        "{} pushes, longest gap {gap:?}, one source {seen:?}",
        log.len()
    ))
}

#[test]
fn captured_udp_streams_survive_kube_proxys_conntrack_cleanup() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("captured UDP streams and kube-proxy's cleanup")? else {
        return Ok(());
    };
    let (_p1, seen_edge) = pusher(&lab, Role::Epod2, "epod2")?;
    let (_p2, seen_cloud) = pusher(&lab, Role::Cpod2, "cpod2")?;
    let cluster = Cluster::start(&lab)?;
    let svc = |name, vip, endpoints: &[(Ipv4Addr, &'static str)]| {
        let mut s = LabService::on_lab_ports("default", name, vip, Proto::Udp, endpoints);
        for (ep, _) in &mut s.endpoints {
            ep.set_port(PUSH);
        }
        s
    };
    let services = |other: &[(Ipv4Addr, &'static str)]| {
        [
            svc("at-edge", AT_EDGE, &[(netns::edge_pod_ip(2), "edge2")]),
            svc("in-cloud", IN_CLOUD, &[(netns::CPOD2_IP, "cloud2")]),
            svc("other", OTHER, other),
        ]
    };
    cluster.set_services(
        &lab,
        KubeProxyMode::Nftables,
        &services(&[(netns::CPOD2_IP, "cloud2")]),
    )?;
    let relay = start_relay(&lab, cluster.relay_config_in(&lab, &pki)?)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    relay_lab::scenario::until_udp_answered(
        &lab,
        &[(Role::Cpod1, AT_EDGE), (Role::Epod1, IN_CLOUD)],
    )?;
    let streams = [
        (
            "relay node's capture",
            "cpod1 ↔ 10.96.0.66 (epod2 pushes)",
            AT_EDGE,
            seen_edge,
            streamer(&lab, Role::Cpod1, AT_EDGE),
        ),
        (
            "edge's capture",
            "epod1 ↔ 10.96.0.67 (cpod2 pushes)",
            IN_CLOUD,
            seen_cloud,
            streamer(&lab, Role::Epod1, IN_CLOUD),
        ),
    ];
    std::thread::sleep(CHANGE_AT);
    let mut m = Table::new(&["case", "path", "result"]);
    // An unrelated UDP Service's endpoint moves: every node's kube-proxy
    // runs its conntrack cleanup.
    m.note(
        &["an unrelated UDP Service's endpoints change", "other"],
        cluster
            .set_services(
                &lab,
                KubeProxyMode::Nftables,
                &services(&[(netns::edge_pod_ip(1), "edge1")]),
            )
            .map(|()| "kube-proxy synced and cleaned on every node".to_string()),
    );
    for (case, path, vip, seen, h) in streams {
        let log = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        let seen = seen.lock().unwrap().clone();
        m.note(&[case, path], log.and_then(|l| judged(&l, &seen, vip)));
    }
    relay.stop()?;
    m.conclude("lab-udp-conntrack-cleanup.txt", t0)
}
