//! Scale-out across hosts: three `relay-server` processes, one per relay
//! host (`relay`, `relay2`, `relay3`: separate cloud nodes on the cloud LAN
//! at 10.0.0.1/.12/.13 and on the WAN at 198.18.0.1-3), each with relay
//! capture on (its own `edge_relay` table on its own host) and a static
//! replica set, and three edges behind their NATs given relay-1's address
//! only (`LabOptions { relay_hosts: 3, sites: 3 }`).
//!
//! Shown, each as a row of `target/lab-replicas-hosts.txt`: before any
//! relay no relay host reaches an edge pod; every replica's admin API lists
//! all three edges; CONNECT through each replica reaches each edge pod;
//! captured traffic reaches each edge pod from each relay host's own host
//! network (its relay's capture takes it: the host has no other way
//! there), and from cloud2's pod through the route agent's resilient
//! groups over the three hosts (counted per host with nftables counters,
//! so each replica is seen carrying traffic to each edge); SIGKILL of
//! relay-1 during five 4 MiB transfers through the other two (CONNECT and
//! captured): those finish byte-exact on unchanged sessions, the killed
//! host's own connections fail at once, the route agent drops it within a
//! bound; relay-1 restarted serves again (capture reinstalled over what the
//! SIGKILL left); a rolling restart of all three while cloud2's pod loops
//! new connections to the edge pods: failures only within a bounded gap
//! after each stop (stated in the table), none after it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::client_loop::{self, ClientLoop, Event};
use relay_lab::netns::{self, LabOptions, NetnsLab, Role};
use relay_lab::replicas::{
    admin_port, all_edges_everywhere, connect_port, echo_over, echo_through, fetch_via, host, id,
    lan_ip, replica_config_on, replica_edge_config, sessions, wan,
};
use relay_lab::route_agent;
use relay_lab::scenario::{
    echo_service, fails_fast, http_from, relay_server_binary, sa, services, start_edge, within,
    RelayProcess, Running, Table, ECHO, HTTP, QUIC_PORT,
};
use relay_protocol::Replica;
use relay_transport::devcerts::DevPki;

const REPLICAS: u8 = 3;
const SITES: [u8; 3] = [1, 2, 3];
const PODS: [&str; 3] = ["epod1", "epod2", "epod3"];
/// The route agent's poll interval.
const AGENT_EVERY: Duration = Duration::from_millis(300);
/// How long after a replica is killed or told to stop new connections
/// from cloud2's pod may fail: the agent's poll interval, the admin call
/// that finds the replica gone, and the `ip` commands that change the
/// groups, with room for a loaded CI machine.
const GAP: Duration = Duration::from_secs(2);

#[test]
fn three_replicas_on_three_hosts_with_three_edges() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED netns_replicas_hosts: {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let bin = relay_server_binary()?;
    let lab = NetnsLab::with_options(LabOptions {
        relay_hosts: REPLICAS,
        sites: 3,
        ..LabOptions::default()
    })?;
    let mut table = Table::new(&["check", "from", "through", "result"]);
    // Before any relay: a relay host's route to an edge pod is its default
    // route, which the upstream gateway refuses.
    for i in 1..=REPLICAS {
        let h = host(&lab, i);
        let r = fails_fast(
            &lab,
            h,
            sa(netns::edge_pod_ip(1), HTTP),
            Duration::from_secs(2),
        );
        table.note(
            &["no relay yet: epod1 unreachable", h.as_str(), "-"],
            r.map(|d| format!("fails in {:.3}s", d.as_secs_f64())),
        );
    }
    let pki = DevPki::generate(&["relay.lab"], &["edge1", "edge2", "edge3"])?;
    let mut relays = start_relays(&lab, &bin, &pki)?;
    let mut running: Vec<Running> = Vec::new();
    for site in SITES {
        let pod = Role::epod(site)?;
        running.push(services(&lab, pod, PODS[usize::from(site - 1)])?);
        running.push(echo_service(&lab, pod)?);
        let cfg = replica_edge_config(&pki, site, Duration::from_secs(1))?;
        running.push(start_edge(&lab, site, cfg)?);
    }
    let all: Vec<u8> = (1..=REPLICAS).collect();
    let joined = within(Duration::from_secs(20), || all_edges_everywhere(&lab, &all))
        .context("every edge on every replica")?;
    for i in 1..=REPLICAS {
        let s = sessions(&lab, i)?;
        let nodes: Vec<&str> = s.keys().map(String::as_str).collect();
        table.push(
            &["admin API lists every edge", "apiserver", &id(i)],
            format!(
                "{} ({:.2}s after the edges started)",
                nodes.join(", "),
                joined.as_secs_f64()
            ),
            nodes == ["edge1", "edge2", "edge3"],
        );
    }
    for i in 1..=REPLICAS {
        for site in SITES {
            let got = fetch_via(&lab, i, sa(netns::edge_pod_ip(site), HTTP));
            table.check(
                &["CONNECT", "apiserver", &id(i)],
                PODS[usize::from(site - 1)],
                got,
            );
        }
    }
    for i in 1..=REPLICAS {
        for site in SITES {
            // Capture follows the sessions: give it a moment after they are up.
            let target = sa(netns::edge_pod_ip(site), HTTP);
            let got = eventually(Duration::from_secs(5), || {
                http_from(&lab, host(&lab, i), target)
            });
            table.check(
                &["captured, host network", host(&lab, i).as_str(), &id(i)],
                PODS[usize::from(site - 1)],
                got,
            );
        }
    }

    // cloud2's pod through the route agent's groups over the three hosts.
    // The kernel's default multipath hash is L3 (addresses only), which
    // would pin all of cpod2's flows to one edge pod on one replica; L4
    // spreads its connections over the replicas, as on nodes set up for
    // ECMP.
    lab.exec(
        Role::Cloud2,
        &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"],
    )?;
    let targets: Vec<_> = (1..=REPLICAS)
        .map(|i| (sa(lan_ip(&lab, i), admin_port(i)), lan_ip(&lab, i)))
        .collect();
    let agent = route_agent::start(&lab, Role::Cloud2, &targets, AGENT_EVERY)?;
    let prefixes: Vec<String> = SITES
        .iter()
        .map(|s| netns::edge_pod_cidr(*s).to_string())
        .collect();
    let via =
        |r: &[u8]| -> Vec<String> { r.iter().map(|i| lan_ip(&lab, *i).to_string()).collect() };
    let three = via(&all);
    let t = within(Duration::from_secs(10), || {
        route_agent::all_through(&lab, Role::Cloud2, &prefixes, &three)
    })
    .context("route agent: groups of all three hosts")?;
    table.push(
        &["route agent: 3 prefixes via groups of 3", "cloud2", "-"],
        format!("ok ({:.2}s after start)", t.as_secs_f64()),
        true,
    );
    syn_counters(&lab)?;
    const FLOWS: usize = 30;
    let spread = lab.run_in(Role::Cpod2, Duration::from_secs(30), || async {
        for n in 0..FLOWS * SITES.len() {
            let site = SITES[n % SITES.len()];
            client_loop::get(sa(netns::edge_pod_ip(site), HTTP)).await?;
        }
        Ok(())
    });
    table.note(
        &["captured, pod via groups", "cpod2", "any"],
        spread.map(|()| format!("{} connections, every one answered", FLOWS * SITES.len())),
    );
    for i in 1..=REPLICAS {
        let counts = read_syn_counters(&lab, host(&lab, i))?;
        for site in SITES {
            let n = counts[usize::from(site - 1)];
            table.push(
                &["captured, pod via groups", "cpod2", &id(i)],
                format!(
                    "{n} of {FLOWS} connections to {}",
                    PODS[usize::from(site - 1)]
                ),
                n > 0,
            );
        }
    }

    // From here on cloud2's pod loops new connections to the edge pods.
    let client = ClientLoop::start(&lab, Role::Cpod2, &SITES);
    let mut events: Vec<Event> = Vec::new();
    kill_one(
        &lab,
        &mut relays,
        &mut table,
        &prefixes,
        &three,
        &mut events,
    )?;

    // Rolling restart: SIGTERM (drain), start again, every edge back on
    // it and the agent's groups whole again, then the next.
    let t_roll = Instant::now();
    for i in 1..=REPLICAS {
        let r = &mut relays[usize::from(i - 1)];
        events.push(Event::new(format!("SIGTERM {}", id(i))));
        let took = r.terminate(Duration::from_secs(10))?;
        let gone = !captures(&lab, host(&lab, i))?;
        r.spawn()?;
        let back = within(Duration::from_secs(15), || all_edges_everywhere(&lab, &[i]))?;
        let grouped = within(Duration::from_secs(5), || {
            route_agent::all_through(&lab, Role::Cloud2, &prefixes, &three)
        })?;
        table.push(
            &["rolling restart", host(&lab, i).as_str(), &id(i)],
            format!(
                "exited {:.2}s after SIGTERM, capture table {}; all edges back {:.2}s and in every group {:.2}s after it was ready",
                took.as_secs_f64(),
                if gone { "removed" } else { "LEFT" },
                back.as_secs_f64(),
                grouped.as_secs_f64()
            ),
            gone,
        );
    }
    let roll = t_roll.elapsed();
    let report = client.finish(&events, GAP)?;
    for row in &report.rows {
        table.push(&[&row.0, "cpod2", "groups"], row.1.clone(), row.2 <= GAP);
    }
    table.push(
        &["client loop, whole run", "cpod2", "groups"],
        format!(
            "{} requests, {} failed, every failure and stall (> 0.9 s) within {:.1}s of a kill or SIGTERM; slowest {:.2}s; rolling restart took {:.1}s",
            report.total,
            report.failed,
            GAP.as_secs_f64(),
            report.slowest.as_secs_f64(),
            roll.as_secs_f64()
        ) + &if report.outside_detail.is_empty() {
            String::new()
        } else {
            format!("; OUTSIDE: {:?}", report.outside_detail)
        },
        report.outside == 0 && report.total > 100,
    );

    agent.stop()?;
    let left = lab.exec(Role::Cloud2, &["ip", "nexthop", "show"])?;
    table.push(
        &["route agent exit: nexthops removed", "cloud2", "-"],
        if left.trim().is_empty() {
            "ok".into()
        } else {
            format!("LEFT: {left}")
        },
        left.trim().is_empty(),
    );
    drop(running);
    for (i, r) in relays.iter_mut().enumerate() {
        r.terminate(Duration::from_secs(10))?;
        ensure!(
            !captures(&lab, host(&lab, i as u8 + 1))?,
            "capture left on relay host {}",
            i + 1
        );
    }
    let footer = format!(
        "{} of {} rows passed; netns_replicas_hosts in {:.1}s",
        table.passed(),
        table.rows.len(),
        t0.elapsed().as_secs_f64()
    );
    table.publish("lab-replicas-hosts.txt", &footer);
    ensure!(
        table.failed().is_empty(),
        "failed rows: {:?}",
        table.failed()
    );
    Ok(())
}

/// Replica `i` on relay host `i`, every one with capture on, a static set
/// naming the others, and short timings (keep-alive 1 s, drain 0.5 s).
fn start_relays(lab: &NetnsLab, bin: &std::path::Path, pki: &DevPki) -> Result<Vec<RelayProcess>> {
    let set: Vec<Replica> = (1..=REPLICAS)
        .map(|i| Replica {
            id: id(i),
            addr: sa(wan(i), QUIC_PORT).to_string(),
        })
        .collect();
    let mut relays = Vec::new();
    for i in 1..=REPLICAS {
        let mut cfg = replica_config_on(lab, pki, i)?;
        ensure!(cfg.capture.is_some(), "replica {i} without capture");
        cfg.quic.keepalive = Duration::from_secs(1);
        cfg.quic.idle_timeout = Duration::from_secs(5);
        cfg.limits.drain_grace = Duration::from_millis(500);
        cfg.replicas = Some(relay_lab::replicas::static_peers(
            &set,
            &id(i),
            sa(wan(i), QUIC_PORT).to_string(),
        ));
        relays.push(RelayProcess::start_on(
            lab,
            host(lab, i),
            &id(i),
            bin,
            pki,
            &cfg,
        )?);
    }
    Ok(relays)
}

/// SIGKILL of relay-1 (the address every edge was given) while five 4 MiB
/// echo transfers run through relay-2 and relay-3, CONNECT and captured.
fn kill_one(
    lab: &NetnsLab,
    relays: &mut [RelayProcess],
    table: &mut Table,
    prefixes: &[String],
    three: &[String],
    events: &mut Vec<Event>,
) -> Result<()> {
    const MIB4: usize = 4 << 20;
    let over = Duration::from_secs(2);
    let echo = |site: u8| sa(netns::edge_pod_ip(site), ECHO);
    let proxy = |i: u8| sa(lan_ip(lab, i), connect_port(i));
    let (p2, p3) = (proxy(2), proxy(3));
    let via_connect = lab.spawn_in(Role::Apiserver, move || async move {
        let (a, b, c) = tokio::join!(
            echo_through(p2, echo(1), MIB4, over),
            echo_through(p3, echo(2), MIB4, over),
            echo_through(p2, echo(3), MIB4, over)
        );
        Ok([
            a.map(|()| "relay-2 → epod1"),
            b.map(|()| "relay-3 → epod2"),
            c.map(|()| "relay-2 → epod3"),
        ])
    });
    let captured = |h: Role, site: u8| {
        lab.spawn_in(h, move || async move {
            let s = tokio::net::TcpStream::connect(echo(site)).await?;
            echo_over(s, MIB4, over).await
        })
    };
    let (c2, c3) = (captured(Role::Relay2, 3), captured(Role::Relay3, 1));
    let before: Vec<_> = (2..=REPLICAS)
        .map(|i| sessions(lab, i))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(700));
    events.push(Event::new("SIGKILL relay-1".into()));
    relays[0].kill9()?;
    let t_kill = Instant::now();
    // Its host: the capture table outlives the process (nothing ran at
    // exit) and sends the host's connections to a port nobody listens on.
    let left = captures(lab, Role::Relay)?;
    let r = fails_fast(
        lab,
        Role::Relay,
        sa(netns::edge_pod_ip(1), HTTP),
        Duration::from_secs(1),
    );
    table.note(
        &[
            "after SIGKILL: own host's new connection",
            "relay",
            "relay-1 (dead)",
        ],
        r.map(|d| {
            format!(
                "fails in {:.3}s (capture table {})",
                d.as_secs_f64(),
                if left { "left by the SIGKILL" } else { "gone" }
            )
        }),
    );
    for i in 2..=REPLICAS {
        for site in SITES {
            let got = fetch_via(lab, i, sa(netns::edge_pod_ip(site), HTTP));
            table.check(
                &["after SIGKILL: CONNECT", "apiserver", &id(i)],
                PODS[usize::from(site - 1)],
                got,
            );
        }
    }
    let two: Vec<String> = three[1..].to_vec();
    let out = within(Duration::from_secs(3), || {
        route_agent::all_through(lab, Role::Cloud2, prefixes, &two)
    });
    table.note(
        &["after SIGKILL: relay-1 out of every group", "cloud2", "-"],
        out.map(|_| {
            format!(
                "{:.2}s after the kill (poll {:.1}s)",
                t_kill.elapsed().as_secs_f64(),
                AGENT_EVERY.as_secs_f64()
            )
        }),
    );
    for r in via_connect
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??
    {
        table.note(
            &["4 MiB echo across the SIGKILL", "apiserver", "CONNECT"],
            r.map(|w| format!("{w}: byte-exact")),
        );
    }
    for (h, j, what) in [
        ("relay2", c2, "relay-2 → epod3"),
        ("relay3", c3, "relay-3 → epod1"),
    ] {
        let r = j
            .join()
            .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?;
        table.note(
            &["4 MiB echo across the SIGKILL", h, "captured"],
            r.map(|()| format!("{what}: byte-exact")),
        );
    }
    let after: Vec<_> = (2..=REPLICAS)
        .map(|i| sessions(lab, i))
        .collect::<Result<_>>()?;
    table.push(
        &[
            "after SIGKILL: sessions on the others",
            "apiserver",
            "relay-2, relay-3",
        ],
        if before == after {
            "unchanged".into()
        } else {
            format!("CHANGED: {before:?} → {after:?}")
        },
        before == after,
    );
    // Back on its address: the edges rejoin, its capture is reinstalled
    // over what the SIGKILL left, the agent puts it back.
    let ready = relays[0].spawn()?;
    let back = within(Duration::from_secs(15), || all_edges_everywhere(lab, &[1]))?;
    let got = eventually(Duration::from_secs(5), || {
        http_from(lab, Role::Relay, sa(netns::edge_pod_ip(1), HTTP))
    });
    table.check(
        &["restarted: captured, host network", "relay", "relay-1"],
        "epod1",
        got,
    );
    let grouped = within(Duration::from_secs(5), || {
        route_agent::all_through(lab, Role::Cloud2, prefixes, three)
    })?;
    table.push(
        &[
            "restarted: edges back, in every group",
            "apiserver",
            "relay-1",
        ],
        format!(
            "ready in {:.2}s; all edges back {:.2}s, in every group {:.2}s after",
            ready.as_secs_f64(),
            back.as_secs_f64(),
            grouped.as_secs_f64()
        ),
        true,
    );
    Ok(())
}

/// Whether `h` has the relay's capture table.
fn captures(lab: &NetnsLab, h: Role) -> Result<bool> {
    Ok(lab
        .exec(h, &["nft", "list", "tables"])?
        .contains("edge_relay"))
}

/// Retries `f` until it succeeds or `limit` has passed; the last result.
fn eventually(limit: Duration, mut f: impl FnMut() -> Result<String>) -> Result<String> {
    let t = Instant::now();
    loop {
        let r = f();
        if r.is_ok() || t.elapsed() >= limit {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// On every relay host, a counter per edge pod of cpod2's connection
/// attempts (SYNs) arriving there: which replica the groups sent each to.
fn syn_counters(lab: &NetnsLab) -> Result<()> {
    let mut rules = String::new();
    for site in SITES {
        rules += &format!(
            "ip saddr {} ip daddr {} tcp flags & (syn | ack) == syn counter comment \"{}\"\n",
            netns::CPOD2_IP,
            netns::edge_pod_ip(site),
            PODS[usize::from(site - 1)]
        );
    }
    for h in lab.relay_hosts() {
        lab.nft(
            h,
            &format!("table ip hostslab {{\n chain pre {{\n type filter hook prerouting priority -300; policy accept;\n{rules} }}\n}}\n"),
        )?;
    }
    Ok(())
}

/// The counters of [`syn_counters`] on `h`, by site.
fn read_syn_counters(lab: &NetnsLab, h: Role) -> Result<[u64; 3]> {
    let text = lab.exec(h, &["nft", "list", "chain", "ip", "hostslab", "pre"])?;
    let mut out = [0; 3];
    for (k, pod) in PODS.iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("comment \"{pod}\"")))
            .with_context(|| format!("no counter for {pod}: {text}"))?;
        let w: Vec<&str> = line.split_whitespace().collect();
        out[k] = w
            .windows(2)
            .find(|p| p[0] == "packets")
            .and_then(|p| p[1].parse().ok())
            .with_context(|| format!("no packet count: {line}"))?;
    }
    Ok(out)
}
