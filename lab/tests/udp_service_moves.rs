//! A UDP client that keeps one socket (a metrics agent, a syslog or
//! statsd sender) while its Service's endpoint moves, in the
//! network-namespace lab with kube-proxy in every node's root namespace
//! and the relay in in-cluster mode against the apiserver stand-in on the
//! apiserver host (relay-kube-standin, not a real kube-apiserver).
//!
//! kube-proxy deletes the conntrack entries of a UDP endpoint that leaves
//! its Service, so such a client's next datagram is balanced again. A
//! captured flow must do the same: it ends when the endpoint it was picked
//! for is no longer listed, and the next datagram is picked again. Shown
//! for the three places a flow is picked: the relay node's capture (a
//! cloud pod on the relay node, the endpoint moving from one edge to the
//! other, so the relay node keeps capturing the Service: a change of what
//! it captures deletes the Service's UDP conntrack entries anyway), the
//! relay for a flow an edge captured (an edge pod, the endpoint moving
//! from the other edge to the cloud), and an edge's own endpoint (an edge
//! pod, its node's endpoint leaving). The old endpoint keeps answering
//! throughout, so a flow that stays on it is seen.
//!
//! The converse, in the second test: an endpoint whose pod is terminating
//! but still serving, while a ready one serves new flows, keeps the flows
//! already bound to it (kube-proxy's conntrack cleanup spares flows to any
//! serving endpoint), until it leaves the EndpointSlice; shown for the
//! relay node's capture and for a flow an edge captured.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 30 s for both (about 18 s here).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_kube_standin::k8s_openapi::api::discovery::v1::EndpointConditions;
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    netns_start, services, start_relay, udp_client, Running, Table, UdpSample, DNS,
};

/// `moving`: one endpoint, epod2 (on edge2), then cpod2 (in the cloud).
const MOVING: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 60)), DNS);
/// `moving-edges`: one endpoint, epod2, then epod1 (on edge1).
const MOVING_EDGES: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 62)), DNS);
/// `moving-local`: epod2 and cpod2, then cpod2 alone; edge2 serves its own
/// endpoint itself while it has one.
const MOVING_LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 61)), DNS);

/// How long each client sends, and when the endpoints change.
const SPAN: Duration = Duration::from_secs(5);
const MOVE_AT: Duration = Duration::from_millis(1500);
/// The move must be seen within this.
const BOUND: Duration = Duration::from_secs(3);

/// A client in `ns` querying `vip` for [`SPAN`] (see [`udp_client`]).
fn client(lab: &NetnsLab, ns: Role, vip: SocketAddr) -> JoinHandle<Result<Vec<UdpSample>>> {
    udp_client(lab, ns, vip, SPAN)
}

/// Checks a client's log: answered by `old` before the move, by `new`
/// within [`BOUND`] after it, never by `old` after the first answer from
/// `new`, and at most one query unanswered after that.
fn judged(log: &[UdpSample], old: &str, new: &str) -> Result<String> {
    let by = |t: &Duration, who: &str| {
        log.iter()
            .any(|(at, w)| at < t && w.as_deref() == Some(who))
    };
    ensure!(
        by(&MOVE_AT, old),
        "never answered by {old} before the move: {log:?}"
    );
    let first_new = log
        .iter()
        .find(|(_, w)| w.as_deref() == Some(new))
        .map(|(t, _)| *t)
        .with_context(|| format!("never answered by {new}: {log:?}"))?;
    let after: Vec<&UdpSample> = log.iter().filter(|(t, _)| *t > first_new).collect();
    let stale = after
        .iter()
        .filter(|(_, w)| w.as_deref() == Some(old))
        .count();
    ensure!(
        stale == 0,
        "{stale} answers from {old} after {new} answered: {log:?}"
    );
    let lost = after.iter().filter(|(_, w)| w.is_none()).count();
    ensure!(
        lost <= 1,
        "{lost} queries unanswered after the move: {log:?}"
    );
    let took = first_new.saturating_sub(MOVE_AT);
    ensure!(took <= BOUND, "moved after {took:?} (bound {BOUND:?})");
    Ok(format!(
        "{new} answered {took:?} after the move, {} queries since, {lost} lost",
        after.len()
    ))
}

/// The three pods answering UDP queries with their names.
fn responders(lab: &NetnsLab) -> Result<[Running; 3]> {
    Ok([
        services(lab, Role::Epod1, "epod1")?,
        services(lab, Role::Epod2, "epod2")?,
        services(lab, Role::Cpod2, "cpod2")?,
    ])
}

/// A UDP Service `default/name` at `vip` with `endpoints` on the lab's
/// ports.
fn udp_svc(
    name: &'static str,
    vip: SocketAddr,
    endpoints: &[(Ipv4Addr, &'static str)],
) -> LabService {
    LabService::on_lab_ports("default", name, vip, Proto::Udp, endpoints)
}

#[test]
fn a_udp_flow_follows_its_service_endpoint() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("UDP flows following their Service")? else {
        return Ok(());
    };
    let _svcs = responders(&lab)?;
    let cluster = Cluster::start(&lab)?;
    let epod2 = netns::edge_pod_ip(2);
    cluster.set_services(
        &lab,
        KubeProxyMode::Nftables,
        &[
            udp_svc("moving", MOVING, &[(epod2, "edge2")]),
            udp_svc("moving-edges", MOVING_EDGES, &[(epod2, "edge2")]),
            udp_svc(
                "moving-local",
                MOVING_LOCAL,
                &[(epod2, "edge2"), (netns::CPOD2_IP, "cloud2")],
            ),
        ],
    )?;
    let relay = start_relay(&lab, cluster.relay_config_in(&lab, &pki)?)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    // Capture holds both Services everywhere once the sessions got their
    // Service tables: wait until each client is answered once.
    relay_lab::scenario::until_udp_answered(
        &lab,
        &[
            (Role::Cpod1, MOVING_EDGES),
            (Role::Epod1, MOVING),
            (Role::Epod2, MOVING_LOCAL),
        ],
    )?;

    let clients = [
        (
            "relay node's capture",
            "cpod1 → 10.96.0.62:53 (epod2, then epod1)",
            "epod1",
            client(&lab, Role::Cpod1, MOVING_EDGES),
        ),
        (
            "the relay, for an edge's flow",
            "epod1 → 10.96.0.60:53 (epod2, then cpod2)",
            "cpod2",
            client(&lab, Role::Epod1, MOVING),
        ),
        (
            "an edge's own endpoint",
            "epod2 → 10.96.0.61:53 (epod2 and cpod2, then cpod2)",
            "cpod2",
            client(&lab, Role::Epod2, MOVING_LOCAL),
        ),
    ];
    std::thread::sleep(MOVE_AT);
    cluster.set_services(
        &lab,
        KubeProxyMode::Nftables,
        &[
            udp_svc("moving", MOVING, &[(netns::CPOD2_IP, "cloud2")]),
            udp_svc(
                "moving-edges",
                MOVING_EDGES,
                &[(netns::edge_pod_ip(1), "edge1")],
            ),
            udp_svc("moving-local", MOVING_LOCAL, &[(netns::CPOD2_IP, "cloud2")]),
        ],
    )?;
    let mut m = Table::new(&["case", "path", "result"]);
    for (place, path, new, handle) in clients {
        let log = handle
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        m.note(
            &[&format!("one socket follows its endpoint: {place}"), path],
            log.and_then(|l| judged(&l, "epod2", new)),
        );
    }
    relay.stop()?;
    m.conclude("lab-udp-service-moves.txt", t0)
}

/// `draining-edges`: epod2; then epod2 terminating (still serving) and
/// epod1 ready; then epod1 alone.
const DRAINING_EDGES: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 63)), DNS);
/// `draining-cloud`: the same with cpod2 as the new endpoint.
const DRAINING_CLOUD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 64)), DNS);

/// When the old endpoint starts terminating, and when it leaves.
const DRAIN_AT: Duration = Duration::from_millis(1500);
const GONE_AT: Duration = Duration::from_millis(4000);
const DRAIN_SPAN: Duration = Duration::from_millis(7000);

/// Checks a client's log: answered by `old` alone until [`GONE_AT`] (at
/// most one query lost), then by `new` within [`BOUND`].
fn kept_until_gone(log: &[UdpSample], old: &str, new: &str) -> Result<String> {
    let before: Vec<&UdpSample> = log.iter().filter(|(t, _)| *t < GONE_AT).collect();
    let others: Vec<&&UdpSample> = before
        .iter()
        .filter(|(_, w)| w.as_deref().is_some_and(|w| w != old))
        .collect();
    ensure!(
        others.is_empty(),
        "answered by another endpoint while {old} still served: {others:?} in {log:?}"
    );
    let lost = before.iter().filter(|(_, w)| w.is_none()).count();
    ensure!(
        lost <= 1,
        "{lost} queries unanswered while {old} served: {log:?}"
    );
    ensure!(
        before
            .iter()
            .any(|(t, w)| *t > DRAIN_AT && w.as_deref() == Some(old)),
        "never answered by {old} while it was terminating: {log:?}"
    );
    let first_new = log
        .iter()
        .find(|(t, w)| *t >= GONE_AT && w.as_deref() == Some(new))
        .map(|(t, _)| *t)
        .with_context(|| format!("never answered by {new} after {old} left: {log:?}"))?;
    let took = first_new.saturating_sub(GONE_AT);
    ensure!(took <= BOUND, "moved after {took:?} (bound {BOUND:?})");
    Ok(format!(
        "{old} kept while terminating; {new} answered {took:?} after {old} left"
    ))
}

#[test]
fn a_udp_flow_keeps_a_terminating_endpoint_while_it_serves() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("UDP flows draining with their endpoint")? else {
        return Ok(());
    };
    let _svcs = responders(&lab)?;
    let cluster = Cluster::start(&lab)?;
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let first = [
        udp_svc("draining-edges", DRAINING_EDGES, &[(epod2, "edge2")]),
        udp_svc("draining-cloud", DRAINING_CLOUD, &[(epod2, "edge2")]),
    ];
    let then = [
        udp_svc("draining-edges", DRAINING_EDGES, &[(epod1, "edge1")]),
        udp_svc(
            "draining-cloud",
            DRAINING_CLOUD,
            &[(netns::CPOD2_IP, "cloud2")],
        ),
    ];
    cluster.set_services(&lab, KubeProxyMode::Nftables, &first)?;
    let relay = start_relay(&lab, cluster.relay_config_in(&lab, &pki)?)?;
    let _edges = relay_lab::scenario::start_edges(&lab, &pki)?;
    relay_lab::scenario::until_udp_answered(
        &lab,
        &[(Role::Cpod1, DRAINING_EDGES), (Role::Epod1, DRAINING_CLOUD)],
    )?;
    let clients = [
        (
            "relay node's capture",
            "cpod1 → 10.96.0.63:53 (epod2, epod2 terminating + epod1, epod1)",
            "epod1",
            udp_client(&lab, Role::Cpod1, DRAINING_EDGES, DRAIN_SPAN),
        ),
        (
            "the relay, for an edge's flow",
            "epod1 → 10.96.0.64:53 (epod2, epod2 terminating + cpod2, cpod2)",
            "cpod2",
            udp_client(&lab, Role::Epod1, DRAINING_CLOUD, DRAIN_SPAN),
        ),
    ];
    let started = Instant::now();
    std::thread::sleep(DRAIN_AT);
    // The rollout: the new pod ready, the old one terminating and still
    // serving, in one slice as the EndpointSlice controller writes it;
    // kube-proxy programs the ready one only for new flows.
    for (old, new) in first.iter().zip(&then) {
        let (svc, mut slice) = new.objects();
        let (_, old_slice) = old.objects();
        slice
            .endpoints
            .extend(old_slice.endpoints.into_iter().map(|mut e| {
                e.conditions = Some(EndpointConditions {
                    ready: Some(false),
                    serving: Some(true),
                    terminating: Some(true),
                });
                e
            }));
        cluster.declare(svc, slice);
    }
    let kp = then
        .iter()
        .map(LabService::kube_proxy)
        .collect::<Result<Vec<_>>>()?;
    lab.sync_services(KubeProxyMode::Nftables, &kp)?;
    // New flows go to the ready endpoint meanwhile: the relay saw the
    // change (else the old flows staying would prove nothing).
    let mut m = Table::new(&["case", "path", "result"]);
    for (ns, vip, new) in [
        (Role::Cpod1, DRAINING_EDGES, "epod1"),
        (Role::Epod1, DRAINING_CLOUD, "cpod2"),
    ] {
        m.note(
            &[
                &format!("a new flow during the drain: {ns}"),
                &vip.to_string(),
            ],
            relay_lab::scenario::within(Duration::from_secs(2), || {
                Ok(relay_lab::scenario::udp_from(&lab, ns, vip).ok().as_deref() == Some(new))
            })
            .map(|t| format!("answered by {new} after {t:?}")),
        );
    }
    // A margin past GONE_AT: the clients' clocks started a little after
    // `started`.
    let gone = GONE_AT + Duration::from_millis(150);
    std::thread::sleep(gone.saturating_sub(started.elapsed()));
    cluster.set_services(&lab, KubeProxyMode::Nftables, &then)?;
    for (place, path, new, handle) in clients {
        let log = handle
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        m.note(
            &[
                &format!("one socket keeps a terminating endpoint: {place}"),
                path,
            ],
            log.and_then(|l| kept_until_gone(&l, "epod2", new)),
        );
    }
    relay.stop()?;
    m.conclude("lab-udp-service-drains.txt", t0)
}
