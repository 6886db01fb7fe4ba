//! Scale-out with Lease membership in the network-namespace lab: three
//! `relay-server` processes (relay-1..3) in Kubernetes mode, each holding a
//! `coordination.k8s.io/v1` Lease in the apiserver stand-in on the
//! apiserver host (10.0.0.3:6443, reached over the cloud LAN through a
//! kubeconfig, as `relay_lab::cluster::Cluster` serves it), and both edges
//! behind their NATs configured with relay-1's address only.
//!
//! Placement: the lab has one relay host, so the replicas share its
//! namespace, each at its own WAN address (198.18.0.i, advertised in its
//! Lease) with its own CONNECT and admin ports (`relay_lab::replicas`).
//!
//! Shown, with times printed:
//! 1. the edges learn every replica from the Leases and hold a session to
//!    each (every replica's admin API lists both edges);
//! 2. a fourth replica (a new Lease) is joined by every edge;
//! 3. that replica stopped with SIGTERM deletes its Lease, leaves every
//!    set, and the edges stop dialling it (an nftables counter on its
//!    address goes quiet); started again and SIGKILLed, its Lease expires
//!    (duration + skew margin) with the same result, and a survivor later
//!    deletes the expired Lease;
//! 4. the API unreachable (the apiserver host drops TCP 6443) for longer
//!    than a Lease lasts: every replica keeps the last set and every edge
//!    keeps every session; the Leases are renewed once it answers again;
//! 5. a rolling update (SIGTERM, start again, each replica in turn) with
//!    streams in flight: streams through the restarted replica shorter
//!    than the drain grace finish byte-exact, longer ones are cut at the
//!    grace (counted, cut time bounded), streams through the other
//!    replicas finish byte-exact on unchanged sessions, and no edge is
//!    ever without a session for longer than one backoff step (sampled
//!    from every admin API).
//!
//! Budget: about 60 s. Needs root; skips loudly otherwise, and fails
//! instead of skipping under CI=true or REQUIRE_LAB=1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::cluster::Cluster;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::replicas::{
    add_wan_addresses, all_edges_everywhere, connect_port, echo_through, fetch_via, id,
    replica_config, replica_edge_config, replica_ids, sessions, wan, SessionWatch,
};
use relay_lab::scenario::{
    echo_service, lab_pki, relay_server_binary, sa, services, start_edge, within, RelayProcess,
    Running, ECHO, HTTP, QUIC_PORT,
};
use relay_server::config::KubeSettings;
use relay_server::replicas::{LeaseSettings, ReplicaSettings, ReplicaSource};
use relay_transport::devcerts::DevPki;

/// The Leases' namespace.
const NS: &str = "edge-relay";
/// Replicas at the start; a fourth comes and goes.
const REPLICAS: u8 = 3;
/// The edges' longest backoff step.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Every replica's drain grace on SIGTERM.
const GRACE: Duration = Duration::from_secs(2);
/// The edges' QUIC idle timeout ([`replica_edge_config`]).
const EDGE_IDLE: Duration = Duration::from_secs(5);
/// Short Leases, so expiry and the outage fit the test's budget.
const LEASE: Duration = Duration::from_secs(3);
const SKEW: Duration = Duration::from_secs(1);

fn lease_settings() -> LeaseSettings {
    LeaseSettings {
        namespace: NS.into(),
        lease_duration: LEASE,
        renew_every: Duration::from_millis(500),
        skew_margin: SKEW,
        gc_after: Duration::from_secs(10),
    }
}

/// Replica `i` in Kubernetes mode against `cluster`, members by Lease.
fn start_replica(
    lab: &NetnsLab,
    cluster: &Cluster,
    bin: &std::path::Path,
    pki: &DevPki,
    i: u8,
) -> Result<RelayProcess> {
    let mut cfg = replica_config(pki, i)?;
    // Node objects decide what an edge may claim: no [nodes] table.
    cfg.nodes.clear();
    cfg.kubernetes = Some(KubeSettings {
        api_timeout: Duration::from_secs(2),
        services: false,
        ..cluster.relay_settings()
    });
    cfg.quic.keepalive = Duration::from_secs(1);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.limits.drain_grace = GRACE;
    cfg.replicas = Some(ReplicaSettings {
        advertise: sa(wan(i), QUIC_PORT).to_string(),
        source: ReplicaSource::Leases(lease_settings()),
    });
    RelayProcess::start_named(lab, &id(i), bin, pki, &cfg)
}

/// Whether every one of `on` tells its edges exactly `want`.
fn sets_are(lab: &NetnsLab, on: &[u8], want: &[u8]) -> Result<bool> {
    let want: Vec<String> = want.iter().map(|i| id(*i)).collect();
    for i in on {
        if replica_ids(lab, *i).ok().as_ref() != Some(&want) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// UDP packets that reached the relay node for replica `i`'s QUIC address
/// (counted by [`PROBE`]): the edges' dial attempts and session traffic.
fn packets_to(lab: &NetnsLab, i: u8) -> Result<u64> {
    let out = lab.exec(
        Role::Relay,
        &["nft", "list", "chain", "inet", "probe", "in"],
    )?;
    let line = out
        .lines()
        .find(|l| l.contains(&format!("ip daddr {}", wan(i))))
        .with_context(|| format!("no counter for {}: {out}", wan(i)))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    w.windows(2)
        .find(|p| p[0] == "packets")
        .and_then(|p| p[1].parse().ok())
        .with_context(|| format!("no packet count in {line:?}"))
}

const PROBE: &str = "table inet probe {
  chain in {
    type filter hook input priority -10; policy accept;
    ip daddr 198.18.0.4 udp dport 8443 counter
  }
}";

/// After replica `i` left every set: from `quiet_from` on, the edges no
/// longer dial it (no packet to its address over three backoff steps).
/// An edge keeps a session that is up until the relay closes it (its
/// drain) or it times out (a killed relay: the edge's idle timeout), so
/// the caller picks the instant by which that has happened.
fn edges_stop_dialling(lab: &NetnsLab, i: u8, quiet_from: Instant) -> Result<()> {
    std::thread::sleep(quiet_from.saturating_duration_since(Instant::now()));
    let before = packets_to(lab, i)?;
    std::thread::sleep(BACKOFF_MAX * 3);
    let after = packets_to(lab, i)?;
    ensure!(
        after == before,
        "edges still dial {} after it left the set: {} packets in {:?}",
        id(i),
        after - before,
        BACKOFF_MAX * 3
    );
    Ok(())
}

#[test]
fn lease_membership_in_the_lab_join_leave_api_outage_and_rollout_with_streams() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_leases: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let bin = relay_server_binary()?;
    let lab = NetnsLab::new()?;
    add_wan_addresses(&lab, 2..=REPLICAS + 1)?;
    lab.nft(Role::Relay, PROBE)?;
    let cluster = Cluster::start(&lab)?;
    let standin = cluster.standin();
    let pki = lab_pki()?;
    let mut relays = Vec::new();
    for i in 1..=REPLICAS {
        relays.push(start_replica(&lab, &cluster, &bin, &pki, i)?);
    }
    let three: Vec<u8> = (1..=REPLICAS).collect();
    let t = within(Duration::from_secs(15), || sets_are(&lab, &three, &three))
        .context("three Leases, one set on every replica")?;
    println!(
        "3 replicas see each other through Leases {:.2}s after the last started",
        t.as_secs_f64()
    );
    let leases = standin.leases(NS);
    for i in 1..=REPLICAS {
        let addr = leases
            .get(&id(i))
            .and_then(|l| l.metadata.annotations.as_ref())
            .and_then(|a| a.get(relay_kube::ADDRESS_ANNOTATION))
            .with_context(|| format!("{}'s Lease or its address: {leases:?}", id(i)))?;
        ensure!(
            *addr == sa(wan(i), QUIC_PORT).to_string(),
            "{}: {addr}",
            id(i)
        );
    }

    let mut pods: Vec<Running> = Vec::new();
    let mut edges: Vec<Running> = Vec::new();
    let t_edges = Instant::now();
    for site in netns::SITES {
        let name = if site == 1 { "epod1" } else { "epod2" };
        pods.push(services(&lab, Role::epod(site)?, name)?);
        pods.push(echo_service(&lab, Role::epod(site)?)?);
        let cfg = replica_edge_config(&pki, site, BACKOFF_MAX)?;
        ensure!(cfg.quic.idle_timeout == EDGE_IDLE);
        edges.push(start_edge(&lab, site, cfg)?);
    }
    within(Duration::from_secs(20), || {
        all_edges_everywhere(&lab, &three)
    })
    .context("every edge on every replica")?;
    println!(
        "1. both edges (given relay-1's address only) on all 3 Lease-discovered replicas {:.2}s after they started",
        t_edges.elapsed().as_secs_f64()
    );
    for i in 1..=REPLICAS {
        for site in netns::SITES {
            let body = fetch_via(&lab, i, sa(netns::edge_pod_ip(site), HTTP))
                .with_context(|| format!("CONNECT via {} to epod{site}", id(i)))?;
            ensure!(body.ends_with(&format!("epod{site}")), "{}: {body}", id(i));
        }
    }

    // 2. A fourth replica: a new Lease.
    let mut four = start_replica(&lab, &cluster, &bin, &pki, 4)?;
    let t = within(Duration::from_secs(15), || all_edges_everywhere(&lab, &[4]))
        .context("every edge joins relay-4")?;
    println!(
        "2. relay-4 (new Lease) joined by both edges {:.2}s after it was ready",
        t.as_secs_f64()
    );
    let with4: Vec<u8> = (1..=4).collect();
    within(Duration::from_secs(5), || sets_are(&lab, &with4, &with4))
        .context("relay-4 in every set")?;

    // 3a. SIGTERM: the Lease goes first.
    let before = survivors_sessions(&lab, &three)?;
    let t_term = Instant::now();
    four.terminate(Duration::from_secs(10))?;
    let exit = t_term.elapsed();
    ensure!(
        !standin.leases(NS).contains_key("relay-4"),
        "relay-4's Lease outlived its graceful stop"
    );
    within(Duration::from_secs(5), || sets_are(&lab, &three, &three))
        .context("relay-4 out of every set after SIGTERM")?;
    println!(
        "3. relay-4 SIGTERM: exited in {:.2}s with its Lease deleted, out of every set {:.2}s after the signal",
        exit.as_secs_f64(),
        t_term.elapsed().as_secs_f64()
    );
    // The set reaches the edges over their sessions: a moment.
    let settled = Instant::now() + Duration::from_millis(500);
    edges_stop_dialling(&lab, 4, settled).context("after relay-4's SIGTERM")?;
    // 3b. SIGKILL: nothing deletes the Lease; it expires.
    four.spawn()?;
    within(Duration::from_secs(15), || all_edges_everywhere(&lab, &[4]))
        .context("every edge rejoins relay-4")?;
    four.kill9()?;
    let t_kill = Instant::now();
    let at_kill = packets_to(&lab, 4)?;
    within(LEASE + SKEW + Duration::from_secs(5), || {
        sets_are(&lab, &three, &three)
    })
    .context("relay-4 out of every set after SIGKILL")?;
    let gone = t_kill.elapsed();
    ensure!(
        gone + Duration::from_millis(200) >= LEASE + SKEW - Duration::from_millis(500),
        "relay-4 left the set before its Lease could have expired ({gone:?})"
    );
    let dialled = packets_to(&lab, 4)? - at_kill;
    ensure!(
        dialled > 0,
        "the probe saw no dial attempt to the dead relay-4"
    );
    println!(
        "   relay-4 SIGKILL: Lease expired, out of every set {:.2}s after the kill (duration {}s + margin {}s); {dialled} packets dialled it meanwhile",
        gone.as_secs_f64(),
        LEASE.as_secs(),
        SKEW.as_secs()
    );
    // The edges' sessions to the dead relay-4 end at their idle timeout.
    let settled = t_kill + EDGE_IDLE + Duration::from_millis(500);
    edges_stop_dialling(&lab, 4, settled).context("after relay-4's SIGKILL")?;
    ensure!(
        survivors_sessions(&lab, &three)? == before,
        "sessions on relay-1..3 changed while relay-4 came and went"
    );
    println!("   edges stopped dialling relay-4 both times; sessions on relay-1..3 unchanged");

    // 4. The API unreachable for longer than a Lease lasts.
    api_outage(
        &lab,
        &cluster,
        &three,
        LEASE + SKEW + Duration::from_secs(3),
    )?;

    // The expired relay-4 Lease is collected by a survivor (gc_after 10 s).
    within(Duration::from_secs(20), || {
        Ok(!standin.leases(NS).contains_key("relay-4"))
    })
    .context("relay-4's expired Lease collected")?;
    println!(
        "   relay-4's expired Lease deleted by a survivor {:.1}s after the kill (gc_after 10s)",
        t_kill.elapsed().as_secs_f64()
    );

    // 5. Rolling update with streams in flight.
    if let Err(e) = rollout_with_streams(&lab, &mut relays) {
        // The replicas' directories go with them: show their logs first.
        for (i, r) in relays.iter().enumerate() {
            eprintln!(
                "--- relay-{} log ---\n{}",
                i + 1,
                relay_lab::last_lines(&r.log(), 60)
            );
        }
        return Err(e);
    }

    for e in edges {
        e.stop()?;
    }
    for p in pods {
        p.stop()?;
    }
    drop(relays);
    drop(four);
    println!("netns_leases done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Every replica's sessions: replica → node → session id.
fn survivors_sessions(lab: &NetnsLab, on: &[u8]) -> Result<Vec<BTreeMap<String, u64>>> {
    on.iter().map(|i| sessions(lab, *i)).collect()
}

/// Drops TCP to the stand-in on the apiserver host for `outage`, sampling
/// every replica's set and sessions meanwhile: none may change. Then the
/// Leases must be renewed again.
fn api_outage(lab: &NetnsLab, cluster: &Cluster, on: &[u8], outage: Duration) -> Result<()> {
    let before = survivors_sessions(lab, on)?;
    lab.nft(
        Role::Apiserver,
        "table inet outage {\n  chain in {\n    type filter hook input priority -10; policy accept;\n    tcp dport 6443 drop\n  }\n}",
    )?;
    let t = Instant::now();
    let mut samples = 0u32;
    let mut check = || -> Result<()> {
        while t.elapsed() < outage {
            ensure!(
                sets_are(lab, on, on)?,
                "a replica's set changed {:.1}s into the API outage",
                t.elapsed().as_secs_f64()
            );
            ensure!(
                survivors_sessions(lab, on)? == before,
                "sessions changed {:.1}s into the API outage",
                t.elapsed().as_secs_f64()
            );
            samples += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    let r = check();
    // Whatever happened: the API comes back.
    lab.nft(Role::Apiserver, "delete table inet outage")?;
    r?;
    let back = Instant::now();
    let renewed = |name: &str| -> Option<std::time::SystemTime> {
        let l = cluster.standin().leases(NS).remove(name)?;
        let t = l.spec?.renew_time?;
        Some(std::time::UNIX_EPOCH + Duration::from_micros(t.0.as_microsecond().try_into().ok()?))
    };
    let back_wall = std::time::SystemTime::now();
    let t_renew = within(Duration::from_secs(20), || {
        Ok(on
            .iter()
            .all(|i| renewed(&id(*i)).is_some_and(|r| r >= back_wall)))
    })
    .context("Leases renewed after the outage")?;
    // And it stays whole: fresh Leases arrive with the watch, which
    // reconnects after the API does.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        let seen: Vec<Vec<String>> = on
            .iter()
            .map(|i| replica_ids(lab, *i))
            .collect::<Result<_>>()?;
        ensure!(
            sets_are(lab, on, on)?,
            "a set changed {:.2}s after the API came back: {seen:?}",
            back.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "4. API unreachable for {:.1}s (Lease {}s + margin {}s): {samples} samples, set and sessions of all {} replicas unchanged; every Lease renewed {:.2}s after the API came back",
        outage.as_secs_f64(),
        LEASE.as_secs(),
        SKEW.as_secs(),
        on.len(),
        t_renew.as_secs_f64()
    );
    Ok(())
}

/// How one stream through the restarted replica ended.
#[derive(Debug)]
enum Outcome {
    /// Ran its course, byte-exact.
    Finished,
    /// Cut at this instant (EOF, error or silence) after `rounds` good
    /// round trips.
    Cut(Instant, u64),
}

/// A long-lived echo loop through `proxy`: 1 KiB out and back every 50 ms
/// for `max`, each round checked. Ends `Cut` at the first failure.
async fn ping_loop(proxy: SocketAddr, target: SocketAddr, max: Duration) -> Result<Outcome> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = relay_lab::connect_via(proxy, &target.to_string()).await?;
    let t = Instant::now();
    let mut rounds = 0u64;
    while t.elapsed() < max {
        let out: Vec<u8> = (0..1024u32).map(|b| (b as u64 ^ rounds) as u8).collect();
        let mut back = vec![0u8; out.len()];
        let ok = async {
            s.write_all(&out).await?;
            s.read_exact(&mut back).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(1), ok).await {
            Ok(Ok(())) if back == out => rounds += 1,
            Ok(Ok(())) => anyhow::bail!("echo differs in round {rounds}"),
            // Silence counts from when the round began.
            Err(_) => {
                return Ok(Outcome::Cut(
                    Instant::now() - Duration::from_secs(1),
                    rounds,
                ))
            }
            Ok(Err(_)) => return Ok(Outcome::Cut(Instant::now(), rounds)),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Outcome::Finished)
}

/// SIGTERM and restart of every replica in turn, with streams in flight
/// through the one restarted (short ones and ones longer than the drain
/// grace) and through the others.
fn rollout_with_streams(lab: &NetnsLab, relays: &mut [RelayProcess]) -> Result<()> {
    let watch = SessionWatch::start(lab, (1..=REPLICAS).collect(), Duration::from_millis(100));
    let t0 = Instant::now();
    let (mut short_ok, mut long_cut, mut long_done, mut survivor_ok) = (0, 0, 0, 0);
    let mut cut_after: Vec<Duration> = Vec::new();
    let mut worst_rejoin = Duration::ZERO;
    for r in 1..=REPLICAS {
        let others: Vec<u8> = (1..=REPLICAS).filter(|i| *i != r).collect();
        let before = survivors_sessions(lab, &others)?;
        let o = others.clone();
        let streams = lab.spawn_in(Role::Apiserver, move || async move {
            let proxy = |i: u8| sa(netns::RELAY_LAN_IP, connect_port(i));
            let echo = |site: u8| sa(netns::edge_pod_ip(site), ECHO);
            let mut short = Vec::new();
            let mut long = Vec::new();
            let mut surv = Vec::new();
            for site in netns::SITES {
                // Done 1 s in; the SIGTERM comes at 0.3 s, grace 2 s.
                short.push(echo_through(
                    proxy(r),
                    echo(site),
                    256 << 10,
                    Duration::from_secs(1),
                ));
                // Would run 8 s: longer than the grace.
                long.push(ping_loop(proxy(r), echo(site), Duration::from_secs(8)));
                for i in &o {
                    // Spans the whole restart of r.
                    surv.push(echo_through(
                        proxy(*i),
                        echo(site),
                        2 << 20,
                        GRACE + Duration::from_secs(3),
                    ));
                }
            }
            let (a, b, c) = tokio::join!(
                futures::future::join_all(short),
                futures::future::join_all(long),
                futures::future::join_all(surv)
            );
            Ok((a, b, c))
        });
        std::thread::sleep(Duration::from_millis(300));
        let t_term = Instant::now();
        let exit = relays[usize::from(r - 1)]
            .terminate(GRACE + Duration::from_secs(8))
            .with_context(|| format!("{} stopping", id(r)))?;
        relays[usize::from(r - 1)].spawn()?;
        let back = within(Duration::from_secs(15), || all_edges_everywhere(lab, &[r]))
            .with_context(|| format!("edges rejoin {}", id(r)))?;
        worst_rejoin = worst_rejoin.max(back);
        let (short, long, surv) = streams
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        for (k, s) in short.into_iter().enumerate() {
            s.with_context(|| format!("short stream {k} through {} during its drain", id(r)))?;
            short_ok += 1;
        }
        for s in long {
            match s.with_context(|| format!("long stream through {}", id(r)))? {
                Outcome::Finished => long_done += 1,
                Outcome::Cut(at, rounds) => {
                    ensure!(rounds > 0, "a long stream through {} never ran", id(r));
                    long_cut += 1;
                    cut_after.push(at.saturating_duration_since(t_term));
                }
            }
        }
        for (k, s) in surv.into_iter().enumerate() {
            s.with_context(|| format!("stream {k} through a survivor while {} restarted", id(r)))?;
            survivor_ok += 1;
        }
        ensure!(
            survivors_sessions(lab, &others)? == before,
            "sessions on the survivors changed while {} restarted",
            id(r)
        );
        println!(
            "   {}: SIGTERM → exit {:.2}s, rejoined by both edges {:.2}s after it was ready",
            id(r),
            exit.as_secs_f64(),
            back.as_secs_f64()
        );
    }
    let report = watch.finish()?;
    let total = t0.elapsed();
    cut_after.sort();
    println!(
        "5. rolling update of {REPLICAS} replicas with streams in flight ({:.1}s, drain grace {}s):\n   \
         through the restarted replica: {short_ok} short streams (1 s) finished byte-exact; {long_cut} long ones (8 s) cut {:.2}-{:.2}s after SIGTERM, {long_done} finished\n   \
         through the other replicas: {survivor_ok} streams of 2 MiB byte-exact, sessions unchanged; rejoin worst {:.2}s\n   \
         sessions sampled {} rounds: longest time an edge had no session at all {:?}, fewest replicas an edge was on {:?}",
        total.as_secs_f64(),
        GRACE.as_secs(),
        cut_after.first().copied().unwrap_or_default().as_secs_f64(),
        cut_after.last().copied().unwrap_or_default().as_secs_f64(),
        worst_rejoin.as_secs_f64(),
        report.rounds,
        report.longest_without,
        report.fewest
    );
    // The drain's promise: in-flight streams get the grace, no more (plus
    // the close and the process's exit).
    ensure!(
        long_done == 0,
        "a stream outlived its replica's drain grace"
    );
    ensure!(
        long_cut == usize::from(REPLICAS) * netns::SITES.len(),
        "cut: {long_cut}"
    );
    for c in &cut_after {
        ensure!(
            *c + Duration::from_millis(100) >= GRACE && *c <= GRACE + Duration::from_millis(1500),
            "a long stream was cut {c:?} after SIGTERM (grace {GRACE:?})"
        );
    }
    ensure!(
        report.rounds > 20,
        "too few session samples: {}",
        report.rounds
    );
    for (edge, gap) in &report.longest_without {
        ensure!(
            *gap <= BACKOFF_MAX,
            "{edge} was without any session for {gap:?} (one backoff step: {BACKOFF_MAX:?})"
        );
    }
    ensure!(
        report
            .fewest
            .values()
            .all(|n| *n >= usize::from(REPLICAS) - 1),
        "an edge was on fewer than {} replicas at once: {:?}",
        REPLICAS - 1,
        report.fewest
    );
    Ok(())
}
