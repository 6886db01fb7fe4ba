//! Where an edge sends the connections its pods open towards the cloud
//! when it holds a session to several relay replicas, in the
//! network-namespace lab: three `relay-server` processes (relay-1..3 at
//! 198.18.0.1-3, a static `[replicas]` list, as in `netns_replicas.rs`)
//! and edge1, configured with relay-1's address, with its capture on, so
//! epod1's connections to cpod1 (10.244.1.2, in the cloud ranges every
//! replica lists as tunnel routes) go through the tunnel: the primary
//! session (relay-1, the first by id) when nothing is wrong with it.
//!
//! Shown, with real processes and printed timings:
//!
//! 1. **Drain.** relay-1 gets SIGTERM with a 20 s drain grace, while a
//!    connection it carries (L0, an echo) keeps its drain open. During the
//!    drain every new epod1 → cpod1 connection succeeds and goes through
//!    relay-2 (each replica's `/v1/sessions` stream counters for edge1
//!    say which carried it), and an echo connection opened during the
//!    drain (L1) still echoes after relay-1 has exited: it was not cut at
//!    the grace, as L0 was.
//! 2. **Black hole.** With relay-1 gone, relay-2 is the primary; all UDP
//!    to and from its WAN address is dropped in the relay node (the
//!    process keeps running; nothing says it is gone). An epod1 → cpod1
//!    request every 0.5 s for 30 s, and every one succeeds through
//!    relay-3: until the edge finds relay-2's path quiet (nothing received
//!    for a keep-alive + 2 round trips + 2 s, sampled every second) each
//!    open goes to relay-2, hears nothing for the hedge delay (4 round
//!    trips, at least 1 s) and goes to relay-3 as well (so those requests
//!    take about a second more); from then on, to relay-3 at once; all
//!    well before the edge declares the path dead (3 keep-alives).
//!
//! Every process runs the default QUIC keep-alive (8 s) and idle timeout
//! (24 s), not the 1 s / 5 s of the other replica tests: at a 1 s
//! keep-alive the quiet limit (3 s) is no shorter than the dead-path bound
//! (2.9 s), so part 2 would not tell the two apart.
//!
//! `EDGE_CLIENT_BIN=/path/to/edge-client` runs edge1 as that binary (a
//! process in the edge host's namespace, configured by
//! `scenario::edge_toml`: the same relay address, capture, keep-alives and
//! status endpoint) instead of the library built with this test: how an
//! older build is checked against the same scenario.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use relay_lab::bulk::procs::NsChild;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::replicas::{
    add_wan_addresses, admin_port, id, replica_edge_config, wan, wan_replica_config,
    wan_replica_set,
};
use relay_lab::scenario::{
    echo_service, edge_config, edge_readiness, edge_toml, lab_pki, relay_server_binary, sa,
    services, start_edge, within, RelayProcess, Running, ADMIN_TOKEN, ECHO, HTTP,
};
use relay_lab::tempdir::TempDir;
use relay_protocol::Cidr;
use relay_server::admin::SessionRow;
use relay_transport::devcerts::DevPki;
use relay_transport::QuicTuning;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPLICAS: u8 = 3;

/// relay-1's drain grace: long enough to watch new connections during it.
const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// How often the edge samples a session's arrivals for quiet (the edge's
/// `HEARD_EVERY`).
const SAMPLING: Duration = Duration::from_secs(1);

/// Part 2's request pace and length.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_FOR: Duration = Duration::from_secs(30);
/// One request's bound: one through the black-holed replica hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How much longer than the edge's hedge delay a hedged request may take
/// (relay-3's dial and the HTTP exchange, on a busy machine).
const HEDGE_MARGIN: Duration = Duration::from_millis(1500);

/// The cloud service epod1 reaches: cpod1's HTTP page and echo.
fn cloud(port: u16) -> std::net::SocketAddr {
    sa(netns::CPOD1_IP, port)
}

#[test]
fn new_cloud_bound_connections_leave_a_draining_or_quiet_primary() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas_primary: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let bin = relay_server_binary()?;
    let lab = NetnsLab::new()?;
    add_wan_addresses(&lab, 2..=REPLICAS)?;
    let pki = lab_pki()?;
    let set = wan_replica_set(REPLICAS);
    let defaults = QuicTuning::default();
    let mut relays = Vec::new();
    for i in 1..=REPLICAS {
        let mut cfg = wan_replica_config(&pki, i, &set)?;
        cfg.quic.keepalive = defaults.keepalive;
        cfg.quic.idle_timeout = defaults.idle_timeout;
        if i == 1 {
            cfg.limits.drain_grace = DRAIN_GRACE;
        }
        // The cloud ranges are tunnel routes: the edge captures them.
        for c in [netns::CPOD1_CIDR, netns::CPOD2_CIDR, netns::CLOUD_LAN] {
            let c: Cidr = c.parse()?;
            ensure!(
                cfg.tunnel_routes.contains(&c),
                "relay-{i} does not list {c}: {:?}",
                cfg.tunnel_routes
            );
        }
        relays.push(RelayProcess::start_named(&lab, &id(i), &bin, &pki, &cfg)?);
    }
    let cpod = [
        services(&lab, Role::Cpod1, "cpod1")?,
        echo_service(&lab, Role::Cpod1)?,
    ];

    // edge1: the replica tests' edge (relay-1's address only, QUIC, short
    // backoff) with its capture on and the default keep-alives.
    let mut cfg = replica_edge_config(&pki, 1, Duration::from_secs(1))?;
    cfg.capture = edge_config(&pki, 1)?.capture;
    ensure!(cfg.capture.is_some(), "edge_config has capture off");
    cfg.quic.keepalive = defaults.keepalive;
    cfg.quic.idle_timeout = defaults.idle_timeout;
    cfg.status_listen = Some(relay_lab::scenario::EDGE_STATUS);
    let keepalive = cfg.quic.keepalive;
    let certs = TempDir::new("netns-replicas-primary")?;
    let edge = Edge::start(&lab, &pki, cfg, certs.path())?;
    let joined = within(Duration::from_secs(20), || {
        Ok((1..=REPLICAS).all(|i| edge1_row(&lab, i).is_ok_and(|r| r.is_some())))
    })
    .context("edge1 on every replica")?;
    // Capture in place: epod1 reaches cpod1 through the tunnel.
    within(Duration::from_secs(10), || Ok(get_cloud(&lab).is_ok())).with_context(|| {
        format!(
            "epod1 → cpod1 through the tunnel: {:?}; edge1 on relay-1: {:?}",
            get_cloud(&lab),
            edge1_row(&lab, 1).map(|r| r.map(|r| (r.capture_installed, r.capture_error)))
        )
    })?;
    let primary = within(Duration::from_secs(5), || {
        Ok(primary(&lab)?.as_deref() == Some("relay-1"))
    })
    .map(|_| "relay-1")
    .with_context(|| {
        format!(
            "edge1's primary is not relay-1: {:?}",
            edge_readiness(&lab, 1)
        )
    })?;
    println!(
        "edge1 ({}) connected, on each of {REPLICAS} replicas {:.2}s later; capture on, epod1 → cpod1 through the tunnel; /readyz: primary {primary}",
        edge.what(),
        joined.as_secs_f64()
    );

    drain(&lab, &mut relays)?;
    black_hole(&lab, keepalive, defaults.idle_timeout)?;

    edge.stop()?;
    for p in cpod {
        p.stop()?;
    }
    drop(relays);
    println!(
        "netns_replicas_primary done in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Part 1: SIGTERM of relay-1, the primary, with a connection through it
/// holding its drain open for the grace.
fn drain(lab: &NetnsLab, relays: &mut [RelayProcess]) -> Result<()> {
    let l0 = Held::open(lab, "L0")?;
    let r1 = edge1_row(lab, 1)?.context("edge1's session on relay-1")?;
    ensure!(
        r1.open_streams >= 1,
        "L0 is not on relay-1 (the primary): {} streams open there",
        r1.open_streams
    );
    let before = streams(lab)?;
    let (first, _) = relays.split_at_mut(1);
    let relay1 = &mut first[0];
    std::thread::scope(|s| -> Result<()> {
        let sigterm = Instant::now();
        let term = s.spawn(move || relay1.terminate(DRAIN_GRACE + Duration::from_secs(15)));
        // The edge has the GOAWAY when relay-1 says edge1's session
        // drains; its admin API may stop at once (it stops accepting before
        // it sends GOAWAY): then half a second more.
        let mut said = None;
        while sigterm.elapsed() < Duration::from_secs(2) {
            match edge1_row(lab, 1) {
                Ok(Some(r)) if r.draining => {
                    said = Some("edge1's session there draining");
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(500));
                    said = Some("its admin API closed");
                    break;
                }
            }
        }
        println!(
            "relay-1 SIGTERM (drain grace {}s): {} after {:.2}s",
            DRAIN_GRACE.as_secs(),
            said.unwrap_or("no sign of the drain"),
            sigterm.elapsed().as_secs_f64()
        );
        // L1: opened during the drain, to outlive it.
        let l1 = Held::open(lab, "L1")?;
        let opened_l1 = sigterm.elapsed();
        let mut requests = 0u64;
        let mut latencies = Vec::new();
        while sigterm.elapsed() < DRAIN_GRACE * 3 / 5 {
            let t = Instant::now();
            get_cloud(lab).with_context(|| {
                format!(
                    "epod1 → cpod1 {:.2}s into relay-1's drain",
                    sigterm.elapsed().as_secs_f64()
                )
            })?;
            latencies.push(t.elapsed());
            requests += 1;
            std::thread::sleep(PROBE_EVERY);
        }
        let during = streams(lab)?;
        let carried = |i: u8| delta(&before, &during, i);
        println!(
            "during relay-1's drain ({:.1}s after SIGTERM): {requests}/{requests} epod1 → cpod1 requests ok (slowest {:.0} ms) + L1 opened at {:.2}s; edge1 streams opened since SIGTERM: relay-1 {}, relay-2 {}, relay-3 {}",
            sigterm.elapsed().as_secs_f64(),
            latencies.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64() * 1e3,
            opened_l1.as_secs_f64(),
            carried(1).map_or("(admin API gone)".into(), |n| n.to_string()),
            carried(2).map_or("?".into(), |n| n.to_string()),
            carried(3).map_or("?".into(), |n| n.to_string()),
        );
        ensure!(
            carried(2).is_some_and(|n| n > requests),
            "relay-2 did not carry the {requests} requests and L1"
        );
        ensure!(
            matches!(carried(1), None | Some(0)),
            "new connections went to the draining relay-1"
        );
        ensure!(
            !l0.is_done() && !l1.is_done(),
            "L0 or L1 ended during the drain"
        );

        let took = term
            .join()
            .map_err(|_| anyhow!("terminate thread panicked"))?
            .context("relay-1 draining")?;
        let exited = Instant::now();
        println!("relay-1 exited {:.2}s after SIGTERM", took.as_secs_f64());
        ensure!(
            took + Duration::from_secs(1) >= DRAIN_GRACE,
            "relay-1 exited after {took:?}, before its grace: did L0 hold its drain?"
        );
        // L1 keeps echoing after relay-1 has gone.
        let rounds = l1.rounds();
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            l1.rounds() > rounds,
            "L1 stopped echoing once relay-1 exited"
        );
        let l1 = l1.finish()?;
        let l0 = l0.finish()?;
        ensure!(
            l1.cut.is_none(),
            "L1, opened during the drain, was cut: {:?}",
            l1.cut
        );
        println!(
            "L1 (opened {:.2}s into the drain): still echoing {:.2}s after relay-1 exited, {} round trips, never cut",
            opened_l1.as_secs_f64(),
            exited.elapsed().as_secs_f64(),
            l1.rounds
        );
        match &l0.cut {
            Some(why) => println!(
                "L0 (through relay-1, opened before SIGTERM): cut {:.2}s after SIGTERM ({why}), after {} round trips",
                l0.ended.duration_since(sigterm).as_secs_f64(),
                l0.rounds
            ),
            None => println!("L0 (through relay-1): not cut (unexpected)"),
        }
        Ok(())
    })?;
    within(Duration::from_secs(10), || {
        Ok(primary(lab)?.as_deref() == Some("relay-2"))
    })
    .context("edge1's primary after relay-1 left")?;
    Ok(())
}

/// Part 2: relay-2 (now the primary) black-holed; epod1 → cpod1 every
/// [`PROBE_EVERY`] for [`PROBE_FOR`].
fn black_hole(lab: &NetnsLab, keepalive: Duration, idle_timeout: Duration) -> Result<()> {
    let r2 = edge1_row(lab, 2)?.context("edge1's session on relay-2")?;
    let rtt = Duration::from_secs_f64(r2.rtt_ms / 1e3);
    // The edge's quiet limit (`quiet_after`: keep-alive + 2 RTT + 1 s +
    // one sampling period), one more sampling period (the last sample that
    // saw arrivals may be a period after them), a request's spacing and a
    // margin.
    let quiet = keepalive + rtt * 2 + Duration::from_secs(1) + SAMPLING;
    let bound = quiet + SAMPLING + PROBE_EVERY + Duration::from_millis(2500);
    // The edge's dead-path bound on QUIC: 3 keep-alives (less a tenth, from
    // the last arrival), or QUIC's idle timeout when shorter.
    let dead_bound = (keepalive * 3).min(idle_timeout);
    // The edge's hedge delay (`capture::hedge::hedge_after`).
    let hedge = (rtt * 4).max(Duration::from_secs(1));
    let before = streams(lab)?;
    let w = wan(2);
    lab.nft(
        Role::Relay,
        &format!(
            r#"table inet primary_blackhole {{
                chain input {{ type filter hook input priority -300; ip daddr {w} meta l4proto udp drop; }}
                chain output {{ type filter hook output priority -300; ip saddr {w} meta l4proto udp drop; }}
            }}"#
        ),
    )?;
    let dark = Instant::now();
    println!(
        "relay-2 (primary) black-holed (UDP to and from {w} dropped in the relay node; the process runs); quiet limit {:.2}s (keep-alive {}s + 2 × RTT {:.2} ms + 2 s), relay-3 picked first from {:.2}s at the latest; hedge delay {:.2}s; dead-path bound {}s",
        quiet.as_secs_f64(),
        keepalive.as_secs(),
        rtt.as_secs_f64() * 1e3,
        bound.as_secs_f64(),
        hedge.as_secs_f64(),
        dead_bound.as_secs()
    );
    // Meanwhile: when edge1's primary stops being relay-2 (its path
    // declared dead).
    let stop = AtomicBool::new(false);
    let (results, dead_at) = std::thread::scope(|s| -> Result<_> {
        let watcher = s.spawn(|| {
            while !stop.load(SeqCst) {
                if let Ok(Some(p)) = primary(lab) {
                    if p != "relay-2" {
                        return Some((dark.elapsed(), p));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            None
        });
        let results = lab.run_in(
            Role::Epod1,
            PROBE_FOR + PROBE_TIMEOUT + Duration::from_secs(10),
            move || async move {
                let start = tokio::time::Instant::now();
                let mut tasks = Vec::new();
                let n = PROBE_FOR.as_millis() / PROBE_EVERY.as_millis();
                for k in 0..u32::try_from(n)? {
                    tokio::time::sleep_until(start + PROBE_EVERY * k).await;
                    let at = dark.elapsed();
                    tasks.push((at, tokio::spawn(get_cloud_async())));
                }
                let mut out = Vec::new();
                for (at, t) in tasks {
                    out.push((at, t.await?.map_err(|e| format!("{e:#}"))));
                }
                Ok(out)
            },
        );
        // Give the watcher a little longer to see the declaration.
        let dead_wait = Instant::now();
        while dark.elapsed() < dead_bound + Duration::from_secs(3)
            && dead_wait.elapsed() < Duration::from_secs(5)
            && !watcher.is_finished()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, SeqCst);
        let dead_at = watcher.join().map_err(|_| anyhow!("watcher panicked"))?;
        Ok((results?, dead_at))
    })?;
    let after = streams(lab)?;
    lab.exec(
        Role::Relay,
        &["nft", "delete", "table", "inet", "primary_blackhole"],
    )?;

    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let took = |r: &std::result::Result<Duration, String>| r.as_ref().ok().copied();
    // Requests started well before the quiet limit go to relay-2 and are
    // hedged to relay-3; those after the bound go to relay-3 at once.
    let early: Vec<Duration> = results
        .iter()
        .filter(|(at, _)| *at + SAMPLING < quiet)
        .filter_map(|(_, r)| took(r))
        .collect();
    let late: Vec<Duration> = results
        .iter()
        .filter(|(at, _)| *at > bound)
        .filter_map(|(_, r)| took(r))
        .collect();
    let ms =
        |d: Option<&Duration>| d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
    println!(
        "{} requests over {}s: {} failed ({}); before the quiet limit {} took {} to {}; after the bound {} took {} to {}",
        results.len(),
        PROBE_FOR.as_secs(),
        failed.len(),
        failed
            .first()
            .map_or(String::new(), |(at, e)| format!(
                "first at {:.2}s: {}",
                at.as_secs_f64(),
                e.as_ref().err().map_or("", |e| e.as_str())
            )),
        early.len(),
        ms(early.iter().min()),
        ms(early.iter().max()),
        late.len(),
        ms(late.iter().min()),
        ms(late.iter().max()),
    );
    match &dead_at {
        Some((at, p)) => println!(
            "edge1 declared relay-2's path dead {:.2}s after the black hole (primary now {p}); dead-path bound {}s",
            at.as_secs_f64(),
            dead_bound.as_secs()
        ),
        None => println!(
            "edge1 had not declared relay-2's path dead {:.1}s after the black hole",
            dark.elapsed().as_secs_f64()
        ),
    }
    let carried = |i: u8| delta(&before, &after, i);
    println!(
        "edge1 streams opened during the black hole: relay-2 {}, relay-3 {}",
        carried(2).map_or("(session gone)".into(), |n| n.to_string()),
        carried(3).map_or("?".into(), |n| n.to_string()),
    );
    ensure!(
        failed.is_empty(),
        "{} of {} requests failed during the black hole: {:?}",
        failed.len(),
        results.len(),
        failed
    );
    ensure!(
        !early.is_empty() && !late.is_empty(),
        "requests before the quiet limit: {}, after the bound: {}",
        early.len(),
        late.len()
    );
    // Each open on relay-2 waited the hedge delay for anything to arrive
    // before going to relay-3 as well: the black hole took, and no request
    // waited for the quiet limit.
    ensure!(
        early.iter().all(|t| *t >= hedge && *t <= hedge + HEDGE_MARGIN),
        "before the quiet limit, requests took {early:?}, not the hedge delay {hedge:?} (to {:?} more)",
        HEDGE_MARGIN
    );
    ensure!(
        late.iter().all(|t| *t < hedge),
        "after the quiet limit, requests took {late:?}: relay-2 was still picked first (hedge delay {hedge:?})"
    );
    let ok = results.len();
    ensure!(
        carried(3).is_some_and(|n| n >= ok as u64),
        "relay-3 did not carry the {ok} requests"
    );
    ensure!(
        matches!(carried(2), None | Some(0)),
        "relay-2 saw streams while black-holed"
    );
    println!(
        "every request succeeded: {} hedged to relay-3 (about {:.1}s each), the rest sent there once relay-2's path was quiet",
        early.len(),
        hedge.as_secs_f64()
    );
    Ok(())
}

/// edge1 in-process (`scenario::start_edge`) or, with `EDGE_CLIENT_BIN`,
/// that binary as a process.
enum Edge {
    InProcess(Running),
    Process(NsChild, PathBuf),
}

impl Edge {
    fn start(
        lab: &NetnsLab,
        pki: &DevPki,
        cfg: edge_client::EdgeConfig,
        dir: &std::path::Path,
    ) -> Result<Self> {
        let Some(bin) = std::env::var_os("EDGE_CLIENT_BIN").map(PathBuf::from) else {
            return Ok(Edge::InProcess(start_edge(lab, 1, cfg)?));
        };
        // What the process is told, from `edge_toml` (relay-1's address,
        // QUIC, capture, the status endpoint): check it matches `cfg`.
        ensure!(cfg.relay == sa(netns::RELAY_WAN_IP, relay_lab::scenario::QUIC_PORT).to_string());
        ensure!(cfg.relay == sa(wan(1), relay_lab::scenario::QUIC_PORT).to_string());
        let defaults = QuicTuning::default();
        ensure!(
            cfg.quic.keepalive == defaults.keepalive
                && cfg.quic.idle_timeout == defaults.idle_timeout
        );
        let certs = dir.join("certs");
        pki.write_to(&certs)?;
        let toml = edge_toml(
            lab,
            1,
            &certs,
            "\n[backoff]\ninitial = \"200ms\"\nmax = \"1s\"\n",
        );
        let mut child = NsChild::edge(lab, 1, &bin, &toml, dir)?;
        within(Duration::from_secs(15), || {
            child.check_alive()?;
            Ok(edge_readiness(lab, 1).is_ok_and(|(ready, _)| ready))
        })
        .with_context(|| format!("{} did not connect", bin.display()))?;
        Ok(Edge::Process(child, bin))
    }

    fn what(&self) -> String {
        match self {
            Edge::InProcess(_) => "in-process, this build".into(),
            Edge::Process(_, bin) => format!("process {}", bin.display()),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Edge::InProcess(r) => r.stop(),
            Edge::Process(mut c, _) => {
                c.check_alive()?;
                drop(c);
                Ok(())
            }
        }
    }
}

/// edge1's session row on replica `i` (`GET /v1/sessions`, from the
/// apiserver host); `None` when it has none there.
fn edge1_row(lab: &NetnsLab, i: u8) -> Result<Option<SessionRow>> {
    let admin = sa(netns::RELAY_LAN_IP, admin_port(i));
    let rows = lab.run_in(
        Role::Apiserver,
        Duration::from_secs(5),
        move || async move {
            tokio::time::timeout(
                Duration::from_secs(2),
                relay_lab::sessions_as(admin, Some(ADMIN_TOKEN)),
            )
            .await
            .context("admin API timed out")?
        },
    )?;
    Ok(rows.into_iter().find(|r| r.node == "edge1"))
}

/// Streams edge1's session has opened on each replica (index `i - 1`);
/// `None` where the replica does not answer or edge1 has no session.
fn streams(lab: &NetnsLab) -> Result<Vec<Option<(u64, u64)>>> {
    Ok((1..=REPLICAS)
        .map(|i| {
            edge1_row(lab, i)
                .ok()
                .flatten()
                .map(|r| (r.session_id, r.streams_total))
        })
        .collect())
}

/// Streams opened on replica `i` between two [`streams`] readings, on the
/// same session; `None` when either reading has none.
fn delta(before: &[Option<(u64, u64)>], after: &[Option<(u64, u64)>], i: u8) -> Option<u64> {
    let k = usize::from(i - 1);
    match (before[k], after[k]) {
        (Some((s0, n0)), Some((s1, n1))) if s0 == s1 => Some(n1 - n0),
        _ => None,
    }
}

/// The relay edge1's `/readyz` names (its primary session's), `None`
/// while it is not connected.
fn primary(lab: &NetnsLab) -> Result<Option<String>> {
    let (ready, body) = edge_readiness(lab, 1)?;
    Ok(ready
        .then(|| {
            body.split("with relay ")
                .nth(1)
                .map(|r| r.trim().to_string())
        })
        .flatten())
}

/// One HTTP request from epod1 to cpod1 (captured, through the tunnel).
fn get_cloud(lab: &NetnsLab) -> Result<()> {
    lab.run_in(
        Role::Epod1,
        PROBE_TIMEOUT + Duration::from_secs(2),
        || async { get_cloud_async().await.map(|_| ()) },
    )
}

/// One request; how long it took.
async fn get_cloud_async() -> Result<Duration> {
    let target = cloud(HTTP);
    let start = Instant::now();
    tokio::time::timeout(PROBE_TIMEOUT, async move {
        let s = TcpStream::connect(target).await?;
        let (code, body) = relay_lab::http_get(s, &target.to_string(), "/", None).await?;
        ensure!(code == 200, "HTTP {code}");
        ensure!(body.trim_end().ends_with("cpod1"), "body {body:?}");
        Ok(start.elapsed())
    })
    .await
    .with_context(|| format!("no answer within {PROBE_TIMEOUT:?}"))?
}

/// How a [`Held`] connection ended.
struct HeldEnd {
    ended: Instant,
    rounds: u64,
    /// Why it was cut; `None` when it was closed by the test.
    cut: Option<String>,
}

/// A long-lived echo connection from epod1 to cpod1: 16 bytes there and
/// back every 250 ms until finished or cut.
struct Held {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    join: std::thread::JoinHandle<Result<HeldEnd>>,
}

impl Held {
    /// Opens it and waits for its first round trip.
    fn open(lab: &NetnsLab, name: &'static str) -> Result<Held> {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (st, n) = (stop.clone(), rounds.clone());
        let (tx, rx) = mpsc::channel();
        let join = lab.spawn_in(Role::Epod1, move || async move {
            let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(cloud(ECHO)))
                .await
                .context("connect timed out")??;
            let (mut r, mut w) = s.into_split();
            let mut buf = [0u8; 16];
            let cut = loop {
                if st.load(SeqCst) {
                    break None;
                }
                let msg = format!("{:016}", n.load(SeqCst));
                let round = async {
                    w.write_all(msg.as_bytes()).await?;
                    r.read_exact(&mut buf).await?;
                    ensure!(buf == msg.as_bytes(), "echo differs");
                    Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(3), round).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Some(format!("{e:#}")),
                    Err(_) => break Some("no echo within 3s".into()),
                }
                if n.fetch_add(1, SeqCst) == 0 {
                    let _ = tx.send(());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            Ok(HeldEnd {
                ended: Instant::now(),
                rounds: n.load(SeqCst),
                cut,
            })
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(Held { stop, rounds, join }),
            Err(_) => {
                stop.store(true, SeqCst);
                let end = join
                    .join()
                    .map_err(|_| anyhow!("{name} panicked"))?
                    .with_context(|| format!("{name}: epod1 → cpod1 echo"))?;
                bail!("{name}: no first echo: {:?}", end.cut)
            }
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(SeqCst)
    }

    fn is_done(&self) -> bool {
        self.join.is_finished()
    }

    fn finish(self) -> Result<HeldEnd> {
        self.stop.store(true, SeqCst);
        self.join
            .join()
            .map_err(|_| anyhow!("echo thread panicked"))?
    }
}
