//! Services whose endpoints change under load, in the network-namespace
//! lab with kube-proxy where it really runs (nftables mode, so its chains
//! at -110 are present) and the relay in in-cluster mode against the
//! apiserver stand-in on the apiserver host (relay-kube-standin, not a real
//! kube-apiserver):
//! - an endpoint moves from one edge to the other while clients loop on
//!   the relay node (captured there) and on an edge (captured at the edge,
//!   resolved by the relay): no request hangs, a request may fail (fast)
//!   only while the change spreads, and answers come from the new edge
//!   within a bound;
//! - a Service left without endpoints is refused fast, from both places;
//! - an edge keeps using its own endpoint of a Service with the relay
//!   stopped, and its node-local resolver (`[dns]`, fed by the relay's
//!   `ServiceNames`) keeps answering cluster names, asked with real `dig`
//!   (also a headless Service without ports, whose name answers with its
//!   pods, and which CONNECT reaches by name), and after a restart with the
//!   relay still away it starts from the table it saved and keeps using its
//!   own endpoint;
//! - after a relay and an edge restart, the Service is served again
//!   within a bound.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Bounded: about 15 s.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    edge_config, fails_fast, http_from, lab_pki, relay_config, sa, services, start_edge,
    start_relay, udp_from, DNS, HTTP,
};

fn web(name: &'static str, vip: SocketAddr, endpoints: &[(Ipv4Addr, &'static str)]) -> LabService {
    LabService::on_lab_ports("shop", name, vip, Proto::Tcp, endpoints)
}

/// One request of a loop: when it started, how long it took, the answer.
type Sample = (Duration, Duration, Result<String>);

/// Requests `vip` from `ns` every 50 ms for `span`, calling `during` once
/// at `at`.
fn loop_requests(
    lab: &NetnsLab,
    ns: Role,
    vip: SocketAddr,
    span: Duration,
    at: Duration,
    mut during: impl FnMut() -> Result<()>,
) -> Result<Vec<Sample>> {
    let t = Instant::now();
    let mut done = false;
    let mut out = Vec::new();
    while t.elapsed() < span {
        if !done && t.elapsed() >= at {
            during()?;
            done = true;
        }
        let start = t.elapsed();
        let r = http_from(lab, ns, vip);
        out.push((start, t.elapsed() - start, r));
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(out)
}

/// Checks a loop's answers: a request may fail only while the change
/// spreads (starting in `[at, at + bound]`) and then only fast (a reset,
/// never a hang: `FAST`); after the first answer from `new`, every answer
/// is from `new`, and that comes within `bound`. Returns how long the move
/// took and how many requests failed (fast) on the way.
fn moved(
    what: &str,
    log: &[Sample],
    at: Duration,
    new: &str,
    bound: Duration,
) -> Result<(Duration, usize)> {
    const FAST: Duration = Duration::from_secs(1);
    let bad: Vec<String> = log
        .iter()
        .filter(|(t, d, r)| r.is_err() && (*t < at || *t > at + bound || *d > FAST))
        .map(|(t, d, r)| {
            format!(
                "{t:?} (took {d:?}): {:#}",
                r.as_ref().err().map(|e| e.to_string()).unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "{what}: requests failed outside the move, or slowly: {bad:?}"
    );
    let first_new = log
        .iter()
        .find(|(_, _, r)| r.as_ref().is_ok_and(|b| b.contains(new)))
        .map(|(t, _, _)| *t);
    let Some(first_new) = first_new else {
        anyhow::bail!("{what}: never answered by {new}");
    };
    let stragglers = log
        .iter()
        .filter(|(t, _, r)| *t > first_new && r.as_ref().is_ok_and(|b| !b.contains(new)))
        .count();
    ensure!(
        stragglers == 0,
        "{what}: {stragglers} answers from the old endpoint after the move"
    );
    let took = first_new.saturating_sub(at);
    ensure!(
        took <= bound,
        "{what}: moved after {took:?} (bound {bound:?})"
    );
    Ok((took, log.iter().filter(|(_, _, r)| r.is_err()).count()))
}

#[test]
fn endpoints_move_between_edges_under_load_and_edges_keep_local_endpoints_offline() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED service moves: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let mut hosts = Vec::new();
    for (role, name) in [
        (Role::Cpod1, "cpod1"),
        (Role::Epod1, "epod1"),
        (Role::Epod2, "epod2"),
    ] {
        hosts.push(services(&lab, role, name)?);
    }
    let epod1 = netns::edge_pod_ip(1);
    let epod2 = netns::edge_pod_ip(2);
    let mover = sa(Ipv4Addr::new(10, 96, 0, 40), HTTP);
    let mixed = sa(Ipv4Addr::new(10, 96, 0, 50), HTTP);
    // UDP with an endpoint on edge1 and one in the cloud (each answers its
    // name).
    let mixed_udp = sa(Ipv4Addr::new(10, 96, 0, 53), DNS);
    let cluster = Cluster::start(&lab)?;
    let mode = KubeProxyMode::Nftables;
    let set = |mover_eps: &[(Ipv4Addr, &'static str)]| {
        cluster.set_services(
            &lab,
            mode,
            &[
                web("mover", mover, mover_eps),
                web(
                    "mixed",
                    mixed,
                    &[(epod1, "edge1"), (netns::CPOD1_IP, "relay")],
                ),
                LabService::on_lab_ports(
                    "shop",
                    "mixed-udp",
                    mixed_udp,
                    Proto::Udp,
                    &[(epod1, "edge1"), (netns::CPOD1_IP, "relay")],
                ),
            ],
        )
    };
    set(&[(epod1, "edge1")])?;
    let mut rcfg = relay_config(&pki)?;
    rcfg.nodes.clear();
    rcfg.kubernetes = Some(cluster.relay_settings());
    let relay = start_relay(&lab, rcfg)?;
    // edge1 runs the node-local resolver on its loopback (the lab has no
    // dummy interface for 169.254.20.10); upstream: a cluster DNS address
    // (only asked for names the table does not answer).
    let state = std::env::temp_dir().join(format!("lab-dns-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let mut cfg1 = edge_config(&pki, 1)?;
    let mut dns =
        edge_client::dns::DnsConfig::new(sa(Ipv4Addr::new(10, 96, 0, 10), 53), state.clone());
    dns.listen = sa(Ipv4Addr::LOCALHOST, 53);
    cfg1.dns = Some(dns);
    let capture_file =
        std::env::temp_dir().join(format!("lab-capture-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&capture_file);
    cfg1.capture_state_file = Some(capture_file.clone());
    // Short, so the test sees the held rules lapse (default 10 minutes).
    let hold = Duration::from_secs(4);
    if let Some(c) = cfg1.capture.as_mut() {
        c.hold_after_exit = hold;
    }
    let edge1 = start_edge(&lab, 1, cfg1.clone())?;
    let edge2 = start_edge(&lab, 2, edge_config(&pki, 2)?)?;
    // Everything is installed asynchronously: wait for both paths.
    relay_lab::scenario::within(Duration::from_secs(10), || {
        Ok(
            http_from(&lab, Role::Cpod1, mover).is_ok_and(|b| b.contains("epod1"))
                && http_from(&lab, Role::Epod2, mover).is_ok_and(|b| b.contains("epod1")),
        )
    })?;

    // The endpoint moves from edge1 to edge2 while the relay node's pod
    // loops (captured on the relay node), then back while edge1's host
    // loops (first captured at edge1 and resolved by the relay to edge2's
    // pod, then left to edge1's own kube-proxy; a host, not edge1's pod:
    // a pod reaching a Service backed by itself needs the CNI's hairpin
    // mode, which is not this product's business).
    let at = Duration::from_millis(500);
    let bound = Duration::from_secs(2);
    let span = Duration::from_secs(3);
    let log = loop_requests(&lab, Role::Cpod1, mover, span, at, || {
        set(&[(epod2, "edge2")])
    })?;
    let (took, failed) = moved("relay node pod", &log, at, "epod2", bound)?;
    eprintln!(
        "relay node pod: moved to epod2 after {took:?}, {} requests, {failed} failed fast",
        log.len()
    );
    let log = loop_requests(&lab, Role::Edge1, mover, span, at, || {
        set(&[(epod1, "edge1")])
    })?;
    // Back on edge1's own pod: edge1 must stop capturing the port (all its
    // endpoints are local now) and its kube-proxy serves it.
    let (took, failed) = moved("edge1 host", &log, at, "epod1", bound)?;
    eprintln!(
        "edge1 host: moved to epod1 after {took:?}, {} requests, {failed} failed fast",
        log.len()
    );

    // No endpoint at all: refused fast from the relay node and from an edge.
    set(&[])?;
    std::thread::sleep(Duration::from_millis(500));
    for ns in [Role::Cpod1, Role::Epod2] {
        let d = fails_fast(&lab, ns, mover, Duration::from_secs(1))?;
        eprintln!("{ns}: no endpoints refused in {d:?}");
    }

    // The mixed UDP Service from the relay node's host: captured there,
    // the relay picks either endpoint (drawn at random for each flow: 24
    // queries miss one of two once in 8 million), the cloud one reached
    // from the relay's own socket; every query answered at the first send.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let t = std::time::Instant::now();
        let u = udp_from(&lab, Role::Relay, mixed_udp)?;
        ensure!(
            t.elapsed() < Duration::from_secs(2),
            "relay node, UDP: {u} answered only after {:?} (a retransmission)",
            t.elapsed()
        );
        seen.insert(u);
        if seen.len() == 2 {
            break;
        }
    }
    ensure!(
        seen.len() == 2,
        "relay node, UDP: answered by {seen:?}, not by both endpoints"
    );
    // The mixed Services from edge1's host: its own endpoint, every time,
    // also with the relay stopped (the edge dials it itself; for UDP too).
    for _ in 0..5 {
        let b = http_from(&lab, Role::Edge1, mixed)?;
        ensure!(b.contains("epod1"), "relay up: answered by {b}");
        let u = udp_from(&lab, Role::Edge1, mixed_udp)?;
        ensure!(u == "epod1", "relay up, UDP: answered by {u}");
    }
    // Names at the edge, from the relay's table: the ClusterIP and, for a
    // name the cluster does not have, NXDOMAIN (answered locally).
    let dig = |name: &str| -> Result<String> {
        lab.exec(
            Role::Edge1,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                "@127.0.0.1",
                name,
                "A",
            ],
        )
        .map(|o| o.trim().to_string())
    };
    let named = relay_lab::scenario::within(Duration::from_secs(5), || {
        Ok(dig("mixed.shop.svc.cluster.local")? == "10.96.0.50")
    });
    ensure!(
        named.is_ok(),
        "the edge resolver never answered mixed.shop: {:?}",
        dig("mixed.shop.svc.cluster.local")
    );
    let nx = lab.exec(
        Role::Edge1,
        &[
            "dig",
            "+time=2",
            "+tries=1",
            "@127.0.0.1",
            "nope.shop.svc.cluster.local",
            "A",
        ],
    )?;
    ensure!(nx.contains("NXDOMAIN"), "unknown cluster name: {nx}");
    // A headless Service without ports (the EndpointSlice lists its pods
    // with no port): its name answers with every ready pod and a pod's
    // own name with that pod, as the cluster DNS does; CONNECT by its name
    // reaches a pod on the port asked.
    let (peers, slice) = relay_lab::cluster::headless_without_ports(
        "shop",
        "peers",
        &[
            (epod1.into(), Some("peers-0"), "edge1"),
            (epod2.into(), None, "edge2"),
        ],
    );
    cluster.declare(peers, slice);
    let want = format!("{epod1}\n{epod2}");
    let sorted = |s: String| {
        let mut l: Vec<&str> = s.lines().collect();
        l.sort();
        l.join("\n")
    };
    let portless = relay_lab::scenario::within(Duration::from_secs(5), || {
        Ok(sorted(dig("peers.shop.svc.cluster.local")?) == want)
    });
    ensure!(
        portless.is_ok(),
        "a headless Service without ports: {:?}, want {want:?}",
        dig("peers.shop.svc.cluster.local")
    );
    ensure!(
        dig("peers-0.peers.shop.svc.cluster.local")? == epod1.to_string(),
        "a pod's own name under it"
    );
    let via = relay_lab::scenario::connect_from(&lab, Role::Apiserver, "peers.shop:80")?;
    ensure!(
        via.contains("epod1") || via.contains("epod2"),
        "CONNECT peers.shop:80 answered by {via}"
    );
    relay.stop()?;
    for _ in 0..5 {
        let b = http_from(&lab, Role::Edge1, mixed)?;
        ensure!(b.contains("epod1"), "relay stopped: answered by {b}");
        let u = udp_from(&lab, Role::Edge1, mixed_udp)?;
        ensure!(u == "epod1", "relay stopped, UDP: answered by {u}");
    }
    ensure!(
        dig("mover.shop.svc.cluster.local")? == "10.96.0.40",
        "relay stopped: the edge resolver no longer answers"
    );
    // edge1 restarted while the relay is away: it starts from the capture
    // state it saved, so the mixed Service is still captured and served by
    // its own endpoint (without it kube-proxy picks either endpoint, and
    // the cloud one is out of reach: about every other request would
    // fail), and its pods' connections to cloud pods are still captured
    // and reset at once, not sent out by the default route.
    let cfg_table = cfg1
        .capture
        .as_ref()
        .map(|c| c.nft_table.clone())
        .context("edge1 captures")?;
    edge1.stop()?;
    let stopped = Instant::now();
    ensure!(
        capture_file.exists(),
        "edge1 saved no capture state at {}",
        capture_file.display()
    );
    // Stopped cleanly (a rollout's old pod), edge1 leaves rules that refuse
    // what it captured for `hold_after_exit`: until the next process comes,
    // a pod's connection to a cloud pod is refused at once, not sent out by
    // the default route (where it timed out after 5 s); then they lapse.
    let held = fails_fast(
        &lab,
        Role::Epod1,
        sa(netns::CPOD1_IP, HTTP),
        Duration::from_secs(1),
    )
    .context("edge1 stopped: a pod's connection to a cloud pod")?;
    // In a table of their own, which the next start keeps until its
    // capture is in place again.
    let held_table = format!("{cfg_table}_held");
    let held_set = || {
        lab.exec(
            Role::Edge1,
            &["nft", "list", "set", "inet", &held_table, "dst4"],
        )
    };
    ensure!(
        held_set()?.contains("10.244."),
        "edge1 stopped: the held set lacks the cloud pod range: {}",
        held_set()?
    );
    let lapsed = relay_lab::scenario::within(hold + Duration::from_secs(4), || {
        Ok(!held_set()?.contains("elements"))
    })
    .context("the held rules did not lapse")?;
    eprintln!(
        "edge1 stopped: a cloud pod refused in {held:?}; the held rules lapsed {:?} after the stop (hold {hold:?}, checked within {lapsed:?})",
        stopped.elapsed()
    );
    let edge1 =
        relay_lab::scenario::launch(&lab, Role::Edge1, "edge1", move |ready, stop| async move {
            let edge = edge_client::EdgeClient::start(cfg1).await?;
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            edge.shutdown().await;
            Ok(())
        })?;
    // Its capture is installed from the saved table moments after start
    // (a request before that is kube-proxy's to place).
    let local = relay_lab::scenario::within(Duration::from_secs(5), || {
        // Our service set (kube-proxy's own rules name the ClusterIP too).
        let table = &cfg_table;
        let set = lab.exec(Role::Edge1, &["nft", "list", "set", "inet", table, "svc4"])?;
        Ok(set.contains(&mixed.ip().to_string()))
    })
    .context("edge1 restarted with the relay away: the mixed Service is not captured")?;
    relay_lab::scenario::within(Duration::from_secs(5), || {
        Ok(lab
            .exec(Role::Edge1, &["nft", "list", "table", "inet", &held_table])
            .is_err())
    })
    .context("the restarted edge kept the held rules")?;
    for _ in 0..10 {
        let b = http_from(&lab, Role::Edge1, mixed)?;
        ensure!(
            b.contains("epod1"),
            "restarted with the relay away: answered by {b}"
        );
        let u = udp_from(&lab, Role::Edge1, mixed_udp)?;
        ensure!(
            u == "epod1",
            "restarted with the relay away, UDP: answered by {u}"
        );
    }
    let reset = fails_fast(
        &lab,
        Role::Epod1,
        sa(netns::CPOD1_IP, HTTP),
        Duration::from_secs(1),
    )
    .context("edge1 restarted with the relay away: a pod's connection to a cloud pod")?;
    eprintln!(
        "edge1 restarted with the relay away: captured after {local:?}, its own endpoint 10 of 10, a cloud pod refused in {reset:?}"
    );

    // Restarts: a new relay process state (capture reinstalled from the
    // API's Services) and a restarted edge2 serve the moved endpoint again.
    set(&[(epod2, "edge2")])?;
    let mut rcfg = relay_config(&pki)?;
    rcfg.nodes.clear();
    rcfg.kubernetes = Some(cluster.relay_settings());
    let relay = start_relay(&lab, rcfg)?;
    edge2.stop()?;
    let edge2 = start_edge(&lab, 2, edge_config(&pki, 2)?)?;
    let back = relay_lab::scenario::within(Duration::from_secs(10), || {
        Ok(
            http_from(&lab, Role::Cpod1, mover).is_ok_and(|b| b.contains("epod2"))
                && http_from(&lab, Role::Edge1, mover).is_ok_and(|b| b.contains("epod2")),
        )
    })?;
    eprintln!("after a relay and an edge restart: served again within {back:?}");
    relay.stop()?;
    edge1.stop()?;
    edge2.stop()?;
    drop(hosts);
    drop(cluster);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&capture_file);
    Ok(())
}
