//! kube-proxy's UDP conntrack cleanup against captured flows, in the
//! network-namespace lab with the relay in in-cluster mode against the
//! apiserver stand-in (relay-kube-standin, not a real kube-apiserver).
//!
//! Whenever a UDP Service's endpoints change anywhere in the cluster,
//! kube-proxy (iptables, IPVS and nftables modes alike) deletes the UDP
//! conntrack entries whose original destination is a UDP Service address
//! and whose reply source is not one of its endpoints. A captured flow's
//! entry is such an entry: its reply source is the capture address. The
//! lab's kube-proxy model runs that cleanup after a sync that changes a
//! UDP Service's endpoints (see `udp_conntrack_cleanup.rs`); here the test
//! deletes the entries the way it does (`conntrack -D -p udp --orig-dst <ClusterIP>
//! --reply-src <capture address>`) in the middle of a client's flow, on
//! the relay node (a pod there, the endpoint at an edge) and on an edge (an
//! edge pod, the endpoint in the cloud).
//!
//! What must hold: the client, which keeps one connected socket, is
//! answered again by the ClusterIP within a second, and every query after
//! that is answered. The responders answer each query twice, the second
//! time 50 ms later, so a reply is in flight when the entries go: it
//! leaves the capture listener with no entry to translate it, and the
//! client's socket drops it; the client's next datagram is translated
//! again. (An audit expected that stray reply's own entry to clash with
//! the client's next datagram and keep the flow dark until it expired;
//! on this kernel (6.18) it does not: nothing is lost but the reply in
//! flight.)
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 15 s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    launch, netns_start, sa, start_relay, udp_client, Running, Table, UdpSample, DNS,
};
use relay_transport::capture_config::DEFAULT_REDIRECT_ADDRESS;
use tokio::net::UdpSocket;

/// A Service whose endpoint is at edge2 (captured on the relay node).
const AT_EDGE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 64)), DNS);
/// A Service whose endpoint is cpod2 (captured on edge1).
const IN_CLOUD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 65)), DNS);

/// The port of [`twice`], the endpoints' target port.
const TWICE: u16 = 5353;

/// A UDP responder on [`TWICE`] that answers every query twice: at once,
/// and again 50 ms later (as a server that pushes more than one datagram
/// per request does). The second answers keep replies in flight most of
/// the time, so the deletion lands between a query and a reply, where
/// kube-proxy's cleanup in a real cluster lands sooner or later.
fn twice(lab: &NetnsLab, ns: Role, name: &'static str) -> Result<Running> {
    launch(lab, ns, name, move |ready, stop| async move {
        let udp = std::sync::Arc::new(UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, TWICE)).await?);
        let h = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from).await;
                let (udp, reply) = (udp.clone(), reply.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = udp.send_to(reply.as_bytes(), from).await;
                });
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        h.abort();
        Ok(())
    })
}

/// How long each client sends, and when the entries are deleted.
const SPAN: Duration = Duration::from_secs(4);
const REAP_AT: Duration = Duration::from_millis(1500);
/// Answered again within this after the deletion.
const BOUND: Duration = Duration::from_secs(1);

/// A client in `ns` querying `vip` for [`SPAN`] (see [`udp_client`]).
fn client(lab: &NetnsLab, ns: Role, vip: SocketAddr) -> JoinHandle<Result<Vec<UdpSample>>> {
    udp_client(lab, ns, vip, SPAN)
}

/// Checks a client's log: answered before the deletion, and every query
/// sent from [`BOUND`] after it on.
fn judged(log: &[UdpSample], reaped: Duration) -> Result<String> {
    ensure!(
        log.iter().any(|(t, who)| *t < reaped && who.is_some()),
        "never answered before the deletion: {log:?}"
    );
    let late: Vec<&UdpSample> = log.iter().filter(|(t, _)| *t >= reaped + BOUND).collect();
    let lost = late.iter().filter(|(_, who)| who.is_none()).count();
    ensure!(
        !late.is_empty() && lost == 0,
        "{lost} of {} queries unanswered from {BOUND:?} after the deletion on: {log:?}",
        late.len()
    );
    let gap = log
        .iter()
        .filter(|(t, who)| *t >= reaped && who.is_none())
        .count();
    Ok(format!(
        "answered again; {gap} queries lost right after, {} answered since",
        late.len()
    ))
}

/// Deletes, in `node`, the UDP conntrack entries of `vip` whose reply
/// source is the capture address, as kube-proxy's cleanup does.
fn reap(lab: &NetnsLab, node: Role, vip: SocketAddr) -> Result<String> {
    lab.exec(
        node,
        &[
            "conntrack",
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            &vip.ip().to_string(),
            "--reply-src",
            &DEFAULT_REDIRECT_ADDRESS.to_string(),
        ],
    )
    .with_context(|| format!("conntrack -D in {node}"))
}

#[test]
fn a_captured_udp_flow_survives_kube_proxys_conntrack_cleanup() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("captured UDP flows and kube-proxy's cleanup")? else {
        return Ok(());
    };
    let _svcs = [
        twice(&lab, Role::Epod2, "epod2")?,
        twice(&lab, Role::Cpod2, "cpod2")?,
    ];
    let cluster = Cluster::start(&lab)?;
    let svc = |name, vip, endpoints: &[(Ipv4Addr, &'static str)]| {
        let mut s = LabService::on_lab_ports("default", name, vip, Proto::Udp, endpoints);
        for (ep, _) in &mut s.endpoints {
            ep.set_port(TWICE);
        }
        s
    };
    cluster.set_services(
        &lab,
        KubeProxyMode::Nftables,
        &[
            svc("at-edge", AT_EDGE, &[(netns::edge_pod_ip(2), "edge2")]),
            svc("in-cloud", IN_CLOUD, &[(netns::CPOD2_IP, "cloud2")]),
        ],
    )?;
    let relay = start_relay(&lab, cluster.relay_config_in(&lab, &pki)?)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    relay_lab::scenario::until_udp_answered(
        &lab,
        &[(Role::Cpod1, AT_EDGE), (Role::Epod1, IN_CLOUD)],
    )?;
    let started = Instant::now();
    let clients = [
        (
            "relay node's capture",
            "cpod1 → 10.96.0.64:53 (epod2), entries deleted on the relay node",
            client(&lab, Role::Cpod1, AT_EDGE),
        ),
        (
            "edge's capture",
            "epod1 → 10.96.0.65:53 (cpod2), entries deleted on edge1",
            client(&lab, Role::Epod1, IN_CLOUD),
        ),
    ];
    std::thread::sleep(REAP_AT);
    let reaped = started.elapsed();
    let mut m = Table::new(&["case", "path", "result"]);
    for (node, vip) in [(Role::Relay, AT_EDGE), (Role::Edge1, IN_CLOUD)] {
        m.note(
            &["kube-proxy's cleanup, as conntrack -D", node.as_str()],
            reap(lab_ref(&lab), node, vip).map(|out| out.trim().to_string()),
        );
    }
    for (case, path, h) in clients {
        let log = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        m.note(&[case, path], judged(&log, reaped));
    }
    relay.stop()?;
    m.conclude("lab-udp-reaped.txt", t0)
}

/// `lab`, for a closure that borrows it while client threads run.
fn lab_ref(lab: &NetnsLab) -> &NetnsLab {
    lab
}
