//! Edge ↔ edge through the tunnel, many times, under CPU load: intermittent
//! failures seen outside (an edge → other-edge UDP query unanswered in 1
//! run of 5 through a port-randomising NAT; edge-1 → edge-2 TCP failing in
//! 1 matrix run of 4 on a busy machine) must not happen here.
//!
//! Both NATs masquerade with `fully-random` ports, spinning threads keep
//! every core busy, and each round opens new connections and new UDP flows
//! both ways (new source ports, so each is a new capture, conntrack lookup
//! and tunnel stream). A UDP query gets exactly one packet and no
//! retransmission, so a first packet lost while its flow starts counts as
//! a failure. Bounded: at most 1000 rounds or 30 s of rounds.
//!
//! Needs root; skips loudly otherwise, and fails instead under CI=true or
//! REQUIRE_LAB=1.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config, http_from, lab_pki, relay_config, sa, services, session, start_edge, start_relay,
    within, DNS, HTTP,
};
use tokio::net::UdpSocket;

const ROUNDS: usize = 1000;
const BUDGET: Duration = Duration::from_secs(30);

/// One UDP query, one packet, no retransmission: the reply must come
/// within 2 s and name `expect`.
fn udp_once(lab: &NetnsLab, from: Role, target: SocketAddr, expect: &str) -> Result<Duration> {
    let expect = expect.to_string();
    lab.run_in(from, Duration::from_secs(5), move || async move {
        let s = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, 0)).await?;
        s.connect(target).await?;
        let q = format!("q{:015}", rand::random::<u32>());
        let t = Instant::now();
        s.send(q.as_bytes()).await?;
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
            .await
            .context("no reply to the only packet")??;
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        if reply != format!("{expect}:{q}") {
            bail!("unexpected reply {reply:?}");
        }
        Ok(t.elapsed())
    })
}

#[test]
fn edge_to_edge_tcp_and_udp_repeated_under_cpu_load() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED edge ↔ edge repeated under load: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
    ];
    for site in netns::SITES {
        lab.nft(
            Role::nat(site)?,
            "flush chain ip natlab postrouting\n\
             add rule ip natlab postrouting oifname \"wan0\" masquerade fully-random\n",
        )?;
    }
    // The relay's defaults: each edge may open 256 streams at once, and
    // every UDP flow holds one until it has been idle for 60 s.
    let relay = start_relay(&lab, relay_config(&pki)?)?;
    let edge1 = start_edge(&lab, 1, edge_config(&pki, 1)?)?;
    let edge2 = start_edge(&lab, 2, edge_config(&pki, 2)?)?;
    let set = |role| lab.exec(role, &["nft", "list", "set", "inet", "edge_relay", "dst4"]);
    within(Duration::from_secs(10), || {
        Ok(set(Role::Edge1)?.contains("10.244.8.0/24")
            && set(Role::Edge2)?.contains("10.244.7.0/24"))
    })
    .context("edges' capture of each other not installed within 10 s")?;

    // The sessions must survive the run: a reconnect would fail every
    // cell in flight at once, the pattern reported from outside.
    let generations = || -> Result<Vec<u64>> {
        ["edge1", "edge2"]
            .iter()
            .map(|n| {
                session(&lab, n)?
                    .map(|r| r.generation)
                    .with_context(|| format!("{n} has no session"))
            })
            .collect()
    };
    let before = generations()?;

    // CPU load: one spinning thread per core and one more, for the whole
    // run (the machine's other work comes on top).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..=cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();

    let (epod1, epod2) = (netns::edge_pod_ip(1), netns::edge_pod_ip(2));
    let cells: [(&str, Role, SocketAddr, &str, bool); 4] = [
        (
            "TCP epod1 → epod2",
            Role::Epod1,
            sa(epod2, HTTP),
            "epod2",
            true,
        ),
        (
            "TCP epod2 → epod1",
            Role::Epod2,
            sa(epod1, HTTP),
            "epod1",
            true,
        ),
        (
            "UDP epod1 → epod2",
            Role::Epod1,
            sa(epod2, DNS),
            "epod2",
            false,
        ),
        (
            "UDP epod2 → epod1",
            Role::Epod2,
            sa(epod1, DNS),
            "epod1",
            false,
        ),
    ];
    let mut failures = Vec::new();
    let mut worst = [Duration::ZERO; 4];
    let mut rounds = 0;
    let t = Instant::now();
    while rounds < ROUNDS && t.elapsed() < BUDGET {
        for (i, (name, from, target, expect, tcp)) in cells.iter().enumerate() {
            let t0 = Instant::now();
            let r = if *tcp {
                http_from(&lab, *from, *target).and_then(|body| {
                    anyhow::ensure!(body.contains(expect), "answered by {body:?}");
                    Ok(t0.elapsed())
                })
            } else {
                udp_once(&lab, *from, *target, expect)
            };
            match r {
                Ok(d) => worst[i] = worst[i].max(d),
                Err(e) => failures.push(format!("round {rounds}: {name}: {e:#}")),
            }
        }
        rounds += 1;
    }
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    println!(
        "edge ↔ edge under load ({} spinning threads, fully-random NAT ports): {rounds} rounds × 4 \
         in {elapsed:.1?}, {} failures; slowest: {}",
        cores + 1,
        failures.len(),
        cells
            .iter()
            .zip(worst)
            .map(|(c, w)| format!("{} {w:.1?}", c.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let after = generations()?;
    edge1.stop()?;
    edge2.stop()?;
    relay.stop()?;
    assert!(rounds >= 10, "only {rounds} rounds within {BUDGET:?}");
    assert_eq!(before, after, "a session was replaced during the run");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
