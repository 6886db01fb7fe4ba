//! Scale-out in the network-namespace lab: three `relay-server` processes
//! (replicas relay-1..3, a static `[replicas]` list) in the relay node,
//! each at its own WAN address (198.18.0.1-3, the address edges dial) with
//! its own CONNECT and admin ports on the cloud LAN, and both edges behind
//! their NATs, configured with relay-1's address only.
//!
//! Shown: every edge holds a session to each replica (each replica's admin
//! API lists both edges); CONNECT from the apiserver host through each
//! replica reaches each edge's pod; SIGKILL of relay-1 (the address the
//! edges were given) leaves the other two serving at once, on the same
//! sessions, and two 4 MiB transfers through relay-2 and relay-3 under
//! way at the kill finish byte-exact; relay-1 started again is joined by both edges within a bound.
//! On cloud2 the route agent (resilient multipath mode) routes each edge
//! pod CIDR through a resilient nexthop group of the three replicas (each
//! through its own LAN address 10.0.0.11-13 on the relay node); SIGKILL of
//! relay-1 takes it out of the groups within a bound, in place (same group
//! ids), and its return puts it back; the agent's exit removes it all.
//!
//! The replicas share one host here (one network namespace, three
//! addresses), so relay-installed capture (one nftables table per node) is
//! off; what differs per replica — address, sessions, registry — is what
//! the test is about. Needs root; skips loudly otherwise, and fails
//! instead of skipping under CI=true or REQUIRE_LAB=1.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::replicas::{
    add_wan_addresses, admin_port, all_edges_everywhere, connect_port, echo_through, fetch_via, id,
    replica_config, replica_edge_config, sessions, wan,
};
use relay_lab::route_agent;
use relay_lab::scenario::{
    echo_service, edge_metric, edge_readiness, lab_pki, relay_server_binary, sa, services,
    start_edge, within, RelayProcess, Running, ECHO, EDGE_STATUS, HTTP, QUIC_PORT,
};
use relay_protocol::Replica;

const REPLICAS: u8 = 3;

/// Replica `i`'s next hop as cloud2 sees it: its own LAN address.
fn via(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i)
}

/// Runs the route agent (resilient multipath) on cloud2.
fn start_agent(lab: &NetnsLab) -> Result<Running> {
    let replicas: Vec<_> = (1..=REPLICAS)
        .map(|i| (sa(netns::RELAY_LAN_IP, admin_port(i)), via(i)))
        .collect();
    route_agent::start(lab, Role::Cloud2, &replicas, Duration::from_millis(300))
}

/// On cloud2: prefix → (group id, member next hops).
fn groups(lab: &NetnsLab) -> Result<BTreeMap<String, (String, Vec<String>)>> {
    route_agent::groups(lab, Role::Cloud2)
}

/// The static replica set every relay of these tests advertises:
/// `relay-i` at its own WAN address.
fn replica_set() -> Vec<Replica> {
    relay_lab::replicas::wan_replica_set(REPLICAS)
}

#[test]
fn three_replicas_every_edge_on_each_and_sigkill_of_one() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let bin = relay_server_binary()?;
    let lab = NetnsLab::new()?;
    // Two more public addresses on the relay node's WAN interface.
    add_wan_addresses(&lab, 2..=REPLICAS)?;
    // One LAN address per replica: the next hops the route agent uses.
    for i in 1..=REPLICAS {
        let a = format!("{}/24", via(i));
        lab.exec(Role::Relay, &["ip", "addr", "add", &a, "dev", "lan0"])?;
    }
    let pki = lab_pki()?;
    let set = replica_set();
    let mut relays = Vec::new();
    for i in 1..=REPLICAS {
        let cfg = relay_lab::replicas::wan_replica_config(&pki, i, &set)?;
        relays.push(RelayProcess::start_named(&lab, &id(i), &bin, &pki, &cfg)?);
    }
    let mut pods: Vec<Running> = Vec::new();
    let mut edges: Vec<Running> = Vec::new();
    for site in netns::SITES {
        pods.push(services(
            &lab,
            Role::epod(site)?,
            if site == 1 { "epod1" } else { "epod2" },
        )?);
        pods.push(echo_service(&lab, Role::epod(site)?)?);
        // Only relay-1's address: the rest comes from the replica set.
        let cfg = replica_edge_config(&pki, site, Duration::from_secs(1))?;
        edges.push(start_edge(&lab, site, cfg)?);
    }
    let all: Vec<u8> = (1..=REPLICAS).collect();
    let joined = within(Duration::from_secs(20), || all_edges_everywhere(&lab, &all))
        .context("every edge on every replica")?;
    println!(
        "every edge on each of {REPLICAS} replicas {:.2}s after the edges started",
        joined.as_secs_f64()
    );

    // Any replica reaches any edge.
    for i in 1..=REPLICAS {
        for site in netns::SITES {
            let target = sa(netns::edge_pod_ip(site), HTTP);
            let body = fetch_via(&lab, i, target)
                .with_context(|| format!("CONNECT via relay-{i} to epod{site}"))?;
            ensure!(
                body.ends_with(&format!("epod{site}")),
                "relay-{i} → epod{site}: {body}"
            );
        }
    }
    println!("CONNECT through each replica to each edge pod: 6/6 ok");

    // The route agent on cloud2: one resilient group per edge pod CIDR,
    // with all three replicas.
    let agent = start_agent(&lab)?;
    let pod_cidrs: Vec<String> = netns::SITES
        .iter()
        .map(|s| netns::edge_pod_cidr(*s).to_string())
        .collect();
    let three: Vec<String> = (1..=REPLICAS).map(|i| via(i).to_string()).collect();
    let full = |g: &BTreeMap<String, (String, Vec<String>)>, want: &[String]| {
        pod_cidrs.iter().all(|c| {
            g.get(c).is_some_and(|(_, m)| {
                let mut m = m.clone();
                m.sort();
                m == want
            })
        })
    };
    within(Duration::from_secs(10), || Ok(full(&groups(&lab)?, &three)))
        .context("route agent: groups with all three replicas")?;
    let group_ids = |lab: &NetnsLab| -> Result<Vec<String>> {
        let g = groups(lab)?;
        Ok(pod_cidrs.iter().map(|c| g[c].0.clone()).collect())
    };
    let ids_before = group_ids(&lab)?;
    println!(
        "route agent: {} edge pod CIDRs via resilient groups of 3 replicas",
        pod_cidrs.len()
    );

    // SIGKILL relay-1, the only address the edges were configured with.
    let before: Vec<_> = (2..=REPLICAS)
        .map(|i| sessions(&lab, i))
        .collect::<Result<_>>()?;
    // Long transfers through relay-2 and relay-3 (to each edge's echo
    // service) are under way when relay-1 dies; they must finish intact.
    let transfers = lab.spawn_in(Role::Apiserver, || async {
        let one = |i: u8, site: u8| {
            echo_through(
                sa(netns::RELAY_LAN_IP, connect_port(i)),
                sa(netns::edge_pod_ip(site), ECHO),
                4 << 20,
                Duration::from_secs(2),
            )
        };
        let (a, b) = tokio::join!(one(2, 1), one(3, 2));
        a.context("relay-2 → epod1")?;
        b.context("relay-3 → epod2")?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(700));
    relays[0].kill9()?;
    let t_kill = Instant::now();
    for i in 2..=REPLICAS {
        for site in netns::SITES {
            let target = sa(netns::edge_pod_ip(site), HTTP);
            fetch_via(&lab, i, target)
                .with_context(|| format!("relay-{i} → epod{site} right after relay-1's SIGKILL"))?;
        }
    }
    println!(
        "after SIGKILL of relay-1: 4/4 CONNECTs through relay-2 and relay-3 done {:.2}s after the kill",
        t_kill.elapsed().as_secs_f64()
    );
    let after: Vec<_> = (2..=REPLICAS)
        .map(|i| sessions(&lab, i))
        .collect::<Result<_>>()?;
    ensure!(
        before == after,
        "sessions on the survivors changed: {before:?} → {after:?}"
    );
    let two: Vec<String> = (2..=REPLICAS).map(|i| via(i).to_string()).collect();
    within(Duration::from_secs(3), || Ok(full(&groups(&lab)?, &two)))
        .context("route agent: relay-1 out of the groups")?;
    println!(
        "route agent: relay-1 out of every group {:.2}s after the kill (poll interval 0.3s)",
        t_kill.elapsed().as_secs_f64()
    );
    ensure!(
        group_ids(&lab)? == ids_before,
        "groups replaced rather than changed in place"
    );
    transfers
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?
        .context("transfers through the survivors while relay-1 was killed")?;
    println!(
        "two 4 MiB echo transfers through relay-2 and relay-3, under way at the kill: byte-exact"
    );

    // relay-1 comes back (same address): both edges rejoin it.
    relays[0].spawn()?;
    let rejoined = within(Duration::from_secs(15), || all_edges_everywhere(&lab, &[1]))
        .context("edges rejoin relay-1")?;
    println!(
        "relay-1 restarted: both edges rejoined it {:.2}s after it was ready",
        rejoined.as_secs_f64()
    );
    for site in netns::SITES {
        fetch_via(&lab, 1, sa(netns::edge_pod_ip(site), HTTP))
            .with_context(|| format!("relay-1 → epod{site} after its restart"))?;
    }
    within(Duration::from_secs(3), || Ok(full(&groups(&lab)?, &three)))
        .context("route agent: relay-1 back in the groups")?;
    ensure!(
        group_ids(&lab)? == ids_before,
        "groups replaced on relay-1's return"
    );
    rolling_restart(&lab, &mut relays)?;
    agent.stop()?;
    let left = lab.exec(Role::Cloud2, &["ip", "nexthop", "show"])?;
    ensure!(
        left.trim().is_empty(),
        "route agent left nexthops behind: {left}"
    );
    ensure!(groups(&lab)?.is_empty(), "route agent left routes behind");
    for e in edges {
        e.stop()?;
    }
    for p in pods {
        p.stop()?;
    }
    drop(relays);
    println!("netns_replicas done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// A rolling restart (SIGTERM, start again) of every replica in turn while
/// a client on the apiserver host loops CONNECT + GET to both edge pods
/// through a replica that is not being restarted: no request may fail, and
/// each restarted replica must be rejoined by both edges within a bound.
fn rolling_restart(lab: &NetnsLab, relays: &mut [RelayProcess]) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
    use std::sync::Arc;
    let avoid = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (a, st, o, f) = (avoid.clone(), stop.clone(), ok.clone(), failed.clone());
    let client = lab.spawn_in(Role::Apiserver, move || async move {
        let mut n = 0u64;
        let mut failures = Vec::new();
        while !st.load(SeqCst) {
            // The first replica that is not being restarted.
            let skip = a.load(SeqCst);
            let via = (1..=REPLICAS).find(|i| *i != skip).unwrap_or(1);
            let site = netns::SITES[(n % 2) as usize];
            n += 1;
            let proxy = sa(netns::RELAY_LAN_IP, connect_port(via));
            let target = sa(netns::edge_pod_ip(site), HTTP).to_string();
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let s = relay_lab::connect_via(proxy, &target).await?;
                let (code, _) = relay_lab::http_get(s, "pod", "/", None).await?;
                ensure!(code == 200, "HTTP {code}");
                Ok(())
            })
            .await;
            match r {
                Ok(Ok(())) => {
                    o.fetch_add(1, SeqCst);
                }
                Ok(Err(e)) => {
                    f.fetch_add(1, SeqCst);
                    failures.push(format!("via relay-{via} to epod{site}: {e:#}"));
                }
                Err(_) => {
                    f.fetch_add(1, SeqCst);
                    failures.push(format!("via relay-{via} to epod{site}: timeout"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(failures)
    });
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 1..=REPLICAS {
        avoid.store(i, SeqCst);
        // Requests already under way through relay-i finish first.
        std::thread::sleep(Duration::from_millis(300));
        let r = &mut relays[usize::from(i - 1)];
        r.terminate(Duration::from_secs(10))
            .with_context(|| format!("relay-{i} stopping"))?;
        r.spawn()
            .with_context(|| format!("relay-{i} starting again"))?;
        let back = within(Duration::from_secs(15), || all_edges_everywhere(lab, &[i]))
            .with_context(|| format!("edges rejoin relay-{i} after its restart"))?;
        worst = worst.max(back);
    }
    stop.store(true, SeqCst);
    let failures = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let (ok, failed) = (ok.load(SeqCst), failed.load(SeqCst));
    println!(
        "rolling restart of {REPLICAS} replicas in {:.1}s: {ok} requests through the others, {failed} failed; each restarted replica rejoined by both edges within {:.2}s",
        t0.elapsed().as_secs_f64(),
        worst.as_secs_f64()
    );
    ensure!(
        failed == 0,
        "requests failed during the rolling restart: {failures:?}"
    );
    ensure!(ok > 20, "too few requests to mean anything: {ok}");
    Ok(())
}

/// Counts the tunnel's packets through NAT `nat`'s WAN interface, both
/// ways: what a carrier bills, IP and UDP (or TCP) headers included, and
/// nothing of the lab's own chatter on that link (ARP, IPv6 router
/// solicitations, which a cellular uplink does not carry and which are a
/// third of an idle minute's frames here). The tunnel is QUIC and the TCP
/// fallback to the relay's port; besides the totals, the TCP fallback's
/// share, and the packets that open an attempt (QUIC Initials, TCP SYNs).
/// Read with [`wan_bytes`] and [`tunnel_counters`].
fn count_tunnel_bytes(lab: &NetnsLab, nat: Role) -> Result<()> {
    lab.nft(
        nat,
        &format!(
            r#"table inet idlebytes {{
                counter down {{}}
                counter up {{}}
                counter tcp_down {{}}
                counter tcp_up {{}}
                counter initials {{}}
                counter syns {{}}
                chain forward {{
                    type filter hook forward priority -10; policy accept;
                    iifname "wan0" meta l4proto {{ tcp, udp }} th sport {QUIC_PORT} counter name "down"
                    oifname "wan0" meta l4proto {{ tcp, udp }} th dport {QUIC_PORT} counter name "up"
                    iifname "wan0" tcp sport {QUIC_PORT} counter name "tcp_down"
                    oifname "wan0" tcp dport {QUIC_PORT} counter name "tcp_up"
                    oifname "wan0" udp dport {QUIC_PORT} @th,64,8 & 0xf0 == 0xc0 counter name "initials"
                    oifname "wan0" tcp dport {QUIC_PORT} tcp flags & (syn | ack) == syn counter name "syns"
                }}
            }}"#
        ),
    )
}

/// Every counter of [`count_tunnel_bytes`]'s table at NAT `nat` so far:
/// name → (packets, bytes).
fn tunnel_counters(lab: &NetnsLab, nat: Role) -> Result<BTreeMap<String, (u64, u64)>> {
    let out = lab.exec(
        nat,
        &[
            "nft",
            "-j",
            "list",
            "counters",
            "table",
            "inet",
            "idlebytes",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut counters = BTreeMap::new();
    for c in v["nftables"].as_array().into_iter().flatten() {
        let c = &c["counter"];
        if let (Some(name), Some(packets), Some(bytes)) = (
            c["name"].as_str(),
            c["packets"].as_u64(),
            c["bytes"].as_u64(),
        ) {
            counters.insert(name.to_string(), (packets, bytes));
        }
    }
    Ok(counters)
}

/// The tunnel's bytes through NAT `nat`'s WAN interface (received, sent)
/// so far; see [`count_tunnel_bytes`].
fn wan_bytes(lab: &NetnsLab, nat: Role) -> Result<(u64, u64)> {
    let c = tunnel_counters(lab, nat)?;
    let bytes = |name: &str| {
        c.get(name)
            .map(|(_, b)| *b)
            .with_context(|| format!("counter {name} at {nat:?}: {c:?}"))
    };
    Ok((bytes("down")?, bytes("up")?))
}

/// What an idle edge's uplink carries with three replicas, with the
/// default keep-alives (8 s): the tunnel's packets through its NAT's WAN
/// interface over 60 s, extrapolated to a day. Bounded loosely (a session
/// re-established every few seconds would blow it) and the sessions must
/// not change during the window.
#[test]
fn idle_bytes_per_edge_per_day_with_three_replicas() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas idle bytes: {skip}");
        return Ok(());
    }
    // A longer window for the benchmark figure (a control ping per replica
    // every two minutes): IDLE_BYTES_WINDOW_SECS=600.
    idle_bytes(None, window_from_env("IDLE_BYTES_WINDOW_SECS", 60))
}

/// A benchmark's window: `var` in seconds, else `default_secs`.
fn window_from_env(var: &str, default_secs: u64) -> Duration {
    let secs = std::env::var(var).ok().and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(default_secs))
}

/// The same with the keep-alives a metered uplink would configure on both
/// sides (`quic.keepalive = "25s"`, under the usual 30 s CGNAT binding
/// timeout, and `quic.idle_timeout = "60s"`), over 100 s (four pings).
/// A benchmark, not a CI test (100 s): `cargo test -p relay-lab --test
/// netns_replicas metered -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: 100 s"]
fn idle_bytes_per_edge_per_day_with_metered_keepalives() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas metered idle bytes: {skip}");
        return Ok(());
    }
    let keepalives = (Duration::from_secs(25), Duration::from_secs(60));
    idle_bytes(Some(keepalives), Duration::from_secs(100))
}

/// Runs three replicas and one idle edge, `keepalives` (keep-alive, idle
/// timeout) on every process or the defaults, and prints what the edge's
/// WAN carried over `window`, per day.
fn idle_bytes(keepalives: Option<(Duration, Duration)>, window: Duration) -> Result<()> {
    relay_lab::init();
    let bin = relay_server_binary()?;
    let lab = NetnsLab::new()?;
    add_wan_addresses(&lab, 2..=REPLICAS)?;
    let pki = lab_pki()?;
    let set = replica_set();
    let mut relays = Vec::new();
    for i in 1..=REPLICAS {
        // Defaults for every timing but the keep-alives asked for: this is
        // the figure a site pays.
        let mut cfg = replica_config(&pki, i)?;
        if let Some((keepalive, idle)) = keepalives {
            cfg.quic.keepalive = keepalive;
            cfg.quic.idle_timeout = idle;
        }
        let me = cfg.relay_id.clone();
        cfg.replicas = Some(relay_lab::replicas::static_peers(
            &set,
            &me,
            sa(wan(i), QUIC_PORT).to_string(),
        ));
        relays.push(RelayProcess::start_named(&lab, &me, &bin, &pki, &cfg)?);
    }
    // Defaults for every timing here too.
    let mut cfg = relay_lab::scenario::edge_config(&pki, 1)?;
    if let Some((keepalive, idle)) = keepalives {
        cfg.quic.keepalive = keepalive;
        cfg.quic.idle_timeout = idle;
    }
    cfg.relay = sa(wan(1), QUIC_PORT).to_string();
    cfg.capture = None;
    cfg.transport = edge_client::TransportMode::Quic;
    let edge = start_edge(&lab, 1, cfg)?;
    within(Duration::from_secs(20), || {
        Ok((1..=REPLICAS).all(|i| sessions(&lab, i).is_ok_and(|s| s.contains_key("edge1"))))
    })
    .context("edge1 on every replica")?;
    // Let the handshakes' packets drain from the counters' window.
    std::thread::sleep(Duration::from_secs(2));
    let ids = |lab: &NetnsLab| -> Result<Vec<u64>> {
        (1..=REPLICAS)
            .map(|i| Ok(sessions(lab, i)?["edge1"]))
            .collect()
    };
    let before_ids = ids(&lab)?;
    count_tunnel_bytes(&lab, Role::Nat1)?;
    let (rx0, tx0) = wan_bytes(&lab, Role::Nat1)?;
    std::thread::sleep(window);
    let (rx1, tx1) = wan_bytes(&lab, Role::Nat1)?;
    ensure!(
        ids(&lab)? == before_ids,
        "a session was re-established during the window"
    );
    let per_day = |b: u64| b as f64 * 86_400.0 / window.as_secs_f64();
    let (up, down) = (per_day(tx1 - tx0), per_day(rx1 - rx0));
    println!(
        "idle edge, 3 replicas, keep-alives {}: {:.1} MB/day up + {:.1} MB/day down = {:.1} MB/day ({:.1} MB/day per replica)",
        keepalives.map_or("default".to_string(), |(k, i)| format!("{k:?} (idle timeout {i:?})")),
        up / 1e6,
        down / 1e6,
        (up + down) / 1e6,
        (up + down) / 1e6 / f64::from(REPLICAS)
    );
    ensure!(up + down > 0.0, "no keep-alive traffic at all?");
    ensure!(
        up + down < 100e6,
        "idle traffic far above keep-alives: {:.1} MB/day",
        (up + down) / 1e6
    );
    edge.stop()?;
    drop(relays);
    Ok(())
}

/// What a relay that stays unreachable costs an edge's uplink in reconnect
/// attempts, per day, at both backoff caps in one run: edge1 with the
/// long-outage tier off (`backoff.long_after = 0`: the 8 s `max`) and
/// edge2 with it from 1 s (the 60 s `long_max` from its second delay on),
/// side by side against one relay, everything else at the defaults
/// (transport `auto`: each attempt a 3 s QUIC attempt, then the TCP
/// fallback's 10 s). With both sessions up, the relay node drops
/// everything on its WAN interface, both ways: no ICMP, no RST, a dead
/// relay behind a carrier. Each edge's tunnel packets (QUIC and TCP to the
/// relay's port) are counted at its NAT's WAN interface once its backoff
/// is at its cap, from one failed attempt to the first failure after
/// `RECONNECT_BYTES_WINDOW_SECS` (default 300) more, so the count is of
/// whole attempt-and-delay cycles. A benchmark, not a CI test (about 7
/// minutes at the default window): `REQUIRE_LAB=1 cargo test -p relay-lab
/// --test netns_replicas reconnect_bytes -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: about 7 minutes"]
fn reconnect_bytes_per_edge_per_day_with_the_relay_unreachable() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas reconnect bytes: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let window = window_from_env("RECONNECT_BYTES_WINDOW_SECS", 300);
    let bin = relay_server_binary()?;
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    // One relay, no replica set, default timings.
    let relay = RelayProcess::start_named(&lab, &id(1), &bin, &pki, &replica_config(&pki, 1)?)?;
    // Per edge: its `long_after`, and the attempt number `/readyz` shows
    // when the delay at the steady cap starts (the delays' caps after a
    // lost session are 0.5, 1, 2, 4 s, then 8; with the tier from 1 s, the
    // second delay is already past it).
    let mut runs = [
        Outage::new(1, "8 s cap (long_after = 0)", Duration::ZERO, 5),
        Outage::new(2, "60 s cap (long_after = 1s)", Duration::from_secs(1), 2),
    ];
    let mut edges = Vec::new();
    for r in &runs {
        let mut cfg = relay_lab::scenario::edge_config(&pki, r.site)?;
        cfg.relay = sa(wan(1), QUIC_PORT).to_string();
        cfg.capture = None;
        cfg.status_listen = Some(EDGE_STATUS);
        cfg.backoff.long_after = r.long_after;
        ensure!(cfg.transport == edge_client::TransportMode::Auto);
        edges.push(start_edge(&lab, r.site, cfg)?);
    }
    within(Duration::from_secs(20), || {
        Ok(sessions(&lab, 1).is_ok_and(|s| s.contains_key("edge1") && s.contains_key("edge2")))
    })
    .context("both edges on the relay")?;
    for r in &runs {
        count_tunnel_bytes(&lab, Role::nat(r.site)?)?;
    }
    lab.nft(
        Role::Relay,
        r#"table inet blackhole {
            chain input { type filter hook input priority -300; iifname "wan0" drop; }
            chain output { type filter hook output priority -300; oifname "wan0" drop; }
        }"#,
    )?;
    let dark = Instant::now();
    println!(
        "relay black-holed; counting each edge's tunnel over at least {}s once its backoff is at its cap",
        window.as_secs()
    );
    let limit = window + Duration::from_secs(300);
    while runs.iter().any(|r| r.end.is_none()) {
        ensure!(dark.elapsed() < limit, "not done within {limit:?}");
        for r in runs.iter_mut().filter(|r| r.end.is_none()) {
            r.poll(&lab, dark, window)?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut up_per_day = Vec::new();
    for r in &runs {
        let (start, end) = r.marks()?;
        let secs = end.at.duration_since(start.at).as_secs_f64();
        let attempts = end.attempt - start.attempt;
        let d = |name: &str, bytes: bool| -> Result<u64> {
            let pick = |c: &BTreeMap<String, (u64, u64)>| {
                c.get(name)
                    .map(|(p, b)| if bytes { *b } else { *p })
                    .with_context(|| format!("counter {name}"))
            };
            Ok(pick(&end.counters)? - pick(&start.counters)?)
        };
        let (up, down, tcp_up) = (d("up", true)?, d("down", true)?, d("tcp_up", true)?);
        let per_day = |b: u64| b as f64 * 86_400.0 / secs;
        let per_attempt = |b: u64| b as f64 / f64::from(attempts);
        println!(
            "relay unreachable, edge{} at the {}: {attempts} attempts in {secs:.0}s (one every {:.1}s, {} fell back to TCP), {} QUIC Initials and {} TCP SYNs sent; {:.0} bytes up per attempt ({:.0} UDP + {:.0} TCP); {:.2} MB/day up + {:.2} MB/day down",
            r.site,
            r.label,
            secs / f64::from(attempts),
            end.fallbacks - start.fallbacks,
            d("initials", false)?,
            d("syns", false)?,
            per_attempt(up),
            per_attempt(up - tcp_up),
            per_attempt(tcp_up),
            per_day(up) / 1e6,
            per_day(down) / 1e6,
        );
        ensure!(attempts >= 2, "edge{}: {attempts} attempts", r.site);
        ensure!(up > 0, "edge{}: nothing sent while reconnecting", r.site);
        ensure!(down == 0, "edge{}: the black-holed relay answered", r.site);
        up_per_day.push(per_day(up));
    }
    ensure!(
        up_per_day[1] < up_per_day[0],
        "the 60 s cap cost no less than the 8 s cap: {up_per_day:?} bytes/day"
    );
    for e in edges {
        e.stop()?;
    }
    drop(relay);
    Ok(())
}

/// One edge's part of
/// [`reconnect_bytes_per_edge_per_day_with_the_relay_unreachable`].
struct Outage {
    site: u8,
    label: &'static str,
    long_after: Duration,
    /// The attempt `/readyz` shows when the counting starts.
    steady_from: u32,
    /// Whether the edge has lost its session yet.
    lost: bool,
    start: Option<Mark>,
    /// The attempt shown when the window had passed: the count ends when
    /// the next one shows.
    at_window: Option<u32>,
    end: Option<Mark>,
}

/// The counters when an attempt of the edge had just failed.
struct Mark {
    at: Instant,
    attempt: u32,
    fallbacks: u64,
    counters: BTreeMap<String, (u64, u64)>,
}

impl Outage {
    fn new(site: u8, label: &'static str, long_after: Duration, steady_from: u32) -> Self {
        Outage {
            site,
            label,
            long_after,
            steady_from,
            lost: false,
            start: None,
            at_window: None,
            end: None,
        }
    }

    /// Looks at the edge once: the attempt `/readyz` shows is published
    /// as the attempt before it fails, when the backoff delay starts, so a
    /// change of it is the end of an attempt (a delay follows, at least
    /// 0.8 s at these caps: the counters then hold the whole attempt).
    fn poll(&mut self, lab: &NetnsLab, dark: Instant, window: Duration) -> Result<()> {
        let site = self.site;
        let (ready, body) = edge_readiness(lab, site)?;
        if ready {
            ensure!(
                !self.lost && dark.elapsed() < Duration::from_secs(120),
                "edge{site} connected with the relay black-holed: {body}"
            );
            return Ok(());
        }
        self.lost = true;
        let attempt: u32 = body
            .strip_prefix("connecting: attempt ")
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("edge{site}'s /readyz: {body}"))?;
        let mark = |attempt| -> Result<Mark> {
            Ok(Mark {
                at: Instant::now(),
                attempt,
                fallbacks: edge_metric(lab, site, "edge_fallbacks_total")? as u64,
                counters: tunnel_counters(lab, Role::nat(site)?)?,
            })
        };
        match (&self.start, self.at_window) {
            (None, _) if attempt >= self.steady_from => self.start = Some(mark(attempt)?),
            (None, _) => {}
            (Some(s), None) if s.at.elapsed() >= window => self.at_window = Some(attempt),
            (Some(_), Some(w)) if attempt > w => self.end = Some(mark(attempt)?),
            _ => {}
        }
        Ok(())
    }

    fn marks(&self) -> Result<(&Mark, &Mark)> {
        self.start
            .as_ref()
            .zip(self.end.as_ref())
            .with_context(|| format!("edge{}: no complete count", self.site))
    }
}
