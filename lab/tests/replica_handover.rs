//! Relay replicas and the routes other edges see of an edge, while its
//! sessions come and go.
//!
//! - A bootstrap handover is make-before-break: an edge configured with an
//!   address that is no replica's advertised one (a load balancer's)
//!   first holds a bootstrap session on replica A, then direct sessions to
//!   every replica; A registers the direct session over the bootstrap one,
//!   so neither replica ever withdraws the edge's routes (every other edge
//!   whose traffic goes through A would lose them for a dial and a
//!   handshake), and the superseded bootstrap session never comes back to
//!   supersede the direct one, even when the relay's close of it reaches
//!   the edge well before the direct session's hello reply. Loopback,
//!   in-process relays: each replica's registry is watched at every
//!   change.
//! - A peer edge's session ending on one replica (the primary of the edge
//!   looking at it) while another replica serves it throughout leaves the
//!   peer captured and reachable: capture installs the union of what every
//!   connected relay lists, and each captured connection or UDP flow goes
//!   through a relay that lists its destination. Network-namespace lab
//!   (capture needs it): a pod behind edge1 keeps reaching a pod behind
//!   edge2, TCP and UDP, while replica 1 has withdrawn edge2 and edge2
//!   cannot get back to it.
//!
//! Run: `REQUIRE_LAB=1 cargo test -p relay-lab --test replica_handover`
//! (the second test needs root, and skips loudly without it unless
//! `REQUIRE_LAB=1` or `CI=true`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::netns::{self, Role};
use relay_lab::replicas::{add_wan_addresses, admin_port, replica_edge_config, wan};
use relay_lab::scenario::{
    http_from, netns_start, sa, services, start_edge, start_relay, udp_from, within, ADMIN_TOKEN,
    DNS, HTTP, QUIC_PORT,
};
use relay_lab::{edge_config, edge_ip, edge_name};
use relay_protocol::{Cidr, Replica};
use relay_server::Relay;
use relay_transport::devcerts::DevPki;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A free UDP port on 127.0.0.1 (static peers need addresses up front).
fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A UDP forwarder on 127.0.0.1 to `to` that passes what goes out at once
/// and delays what comes back by `delay`: a replica's advertised address
/// on a slower path than the load balancer's. Runs until `stop`.
async fn slow_path(to: SocketAddr, delay: Duration, stop: CancellationToken) -> Result<SocketAddr> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    tokio::spawn(async move {
        // One upstream socket per client, as a NAT would.
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_535];
        loop {
            let (n, from) = tokio::select! {
                _ = stop.cancelled() => return,
                r = front.recv_from(&mut buf) => match r {
                    Ok(v) => v,
                    Err(_) => return,
                },
            };
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    if u.connect(to).await.is_err() {
                        continue;
                    }
                    let u = Arc::new(u);
                    ups.insert(from, u.clone());
                    let (back, front, stop) = (u.clone(), front.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65_535];
                        loop {
                            let n = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = back.recv(&mut b) => match r {
                                    Ok(n) => n,
                                    Err(_) => return,
                                },
                            };
                            let (pkt, front) = (b[..n].to_vec(), front.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = front.send_to(&pkt, from).await;
                            });
                        }
                    });
                    u
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    Ok(addr)
}

/// Watches one relay's registry for `node`'s route `route`, looking at
/// every change it makes (not a poll that a quick withdraw and re-add
/// could fall between): whether the route was ever there, and every time
/// it went away after that.
struct RouteWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(bool, Vec<Duration>)>,
}

impl RouteWatch {
    fn start(relay: &Relay, node: &str, route: Cidr) -> RouteWatch {
        let shared = relay.shared().clone();
        let node = node.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let task = tokio::spawn(async move {
            let mut changes = shared.registry.subscribe();
            let t0 = Instant::now();
            let (mut seen, mut lost) = (false, Vec::new());
            // Bounded whatever the test does.
            while !st.load(SeqCst) && t0.elapsed() < Duration::from_secs(60) {
                changes.borrow_and_update();
                let there = shared.registry.routes_of(&node).contains(&route);
                if seen && !there {
                    lost.push(t0.elapsed());
                }
                seen |= there;
                let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
            }
            (seen, lost)
        });
        RouteWatch { stop, task }
    }

    /// Whether the route was ever there, and when it went away after.
    async fn finish(self) -> Result<(bool, Vec<Duration>)> {
        self.stop.store(true, SeqCst);
        Ok(self.task.await?)
    }
}

/// Node → generation on one replica.
async fn generations(admin: SocketAddr) -> Result<std::collections::BTreeMap<String, u64>> {
    Ok(relay_lab::sessions(admin)
        .await?
        .into_iter()
        .map(|r| (r.node, r.generation))
        .collect())
}

/// Two replicas, edge 0 on both (configured with replica 0's advertised
/// address), then edge 1 configured with another address of replica 0
/// (its "load balancer"): its bootstrap session on replica 0 hands over to
/// a direct one, and neither replica withdraws edge 1's route meanwhile.
/// Before the fix the bootstrap session was closed before the direct one
/// to its replica was dialled: replica 0 withdrew edge 1's route at every
/// start, for a dial and a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_handover_never_withdraws_the_edges_routes() -> Result<()> {
    relay_lab::init();
    let edges = 2;
    let names: Vec<String> = (0..edges).map(edge_name).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &refs)?;
    let ports = [free_udp_port()?, free_udp_port()?];
    // Each replica advertises an address whose answers come 40 ms late
    // (the load balancer's path to replica 0 is quick), so when the
    // direct session to replica 0 registers, the close of the bootstrap
    // session it supersedes reaches the edge well before the hello reply
    // of any direct session: a bootstrap loop that dialled again then (at
    // once: edge 1's backoff is under 1 ms) would register over the
    // direct session, be superseded by it in turn, and again.
    let stop = CancellationToken::new();
    let mut set = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let slow = slow_path(
            SocketAddr::from(([127, 0, 0, 1], *port)),
            Duration::from_millis(40),
            stop.clone(),
        )
        .await?;
        set.push(Replica {
            id: format!("relay-{i}"),
            addr: slow.to_string(),
        });
    }
    let relays = relay_lab::replicas::loopback_replicas(&pki, edges, &set, &ports).await?;
    let admins: Vec<SocketAddr> = relays.iter().map(|r| r.admin_addr().unwrap()).collect();
    let edge_cfg = |i: usize, relay: SocketAddr| -> Result<edge_client::EdgeConfig> {
        let mut cfg = edge_config(&pki, i, relay)?;
        cfg.transport = edge_client::TransportMode::Quic;
        cfg.backoff.initial = Duration::from_millis(100);
        cfg.backoff.max = Duration::from_millis(500);
        cfg.handshake_timeout = Duration::from_secs(2);
        cfg.quic.keepalive = Duration::from_millis(500);
        Ok(cfg)
    };
    let on_both = |node: &'static str| {
        let admins = admins.clone();
        async move {
            let t = Instant::now();
            loop {
                let mut all = true;
                for a in &admins {
                    all &= generations(*a).await?.contains_key(node);
                }
                if all {
                    return Ok::<_, anyhow::Error>(t.elapsed());
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "{node} not on both replicas within 10s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let edge0 = EdgeClient::spawn(edge_cfg(0, set[0].addr.parse()?)?);
    on_both("edge-0").await?;

    // Edge 1's route, watched on both replicas from before it starts.
    let route = Cidr::host(edge_ip(1));
    let watches: Vec<RouteWatch> = relays
        .iter()
        .map(|r| RouteWatch::start(r, "edge-1", route))
        .collect();
    let lb = SocketAddr::from(([127, 0, 0, 9], ports[0]));
    let mut cfg1 = edge_cfg(1, lb)?;
    // A superseded bootstrap loop that dialled again would do so at once
    // (full jitter under 1 ms), long before the supervisor sees the direct
    // session up.
    cfg1.backoff.initial = Duration::from_millis(1);
    let edge1 = EdgeClient::spawn(cfg1);
    let took = on_both("edge-1").await?;
    println!("edge-1 on both replicas {took:?} after start");
    // Past the handover: the sessions stay put for 1.5 s (a superseded
    // bootstrap session coming back would supersede the direct one on
    // replica 0, and that one in turn).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = [generations(admins[0]).await?, generations(admins[1]).await?];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = [generations(admins[0]).await?, generations(admins[1]).await?];
    let mut lost = Vec::new();
    for (i, w) in watches.into_iter().enumerate() {
        let (seen, gone) = w.finish().await?;
        ensure!(seen, "relay-{i} never had edge-1's route {route}");
        if !gone.is_empty() {
            lost.push(format!(
                "relay-{i} withdrew edge-1's route {route} {} time(s), at {gone:?} after the watch began",
                gone.len()
            ));
        }
    }
    ensure!(lost.is_empty(), "{}", lost.join("; "));
    ensure!(
        settled == later,
        "the sessions did not stay put after the handover: {settled:?} → {later:?}"
    );
    // The bootstrap session, then one direct session per replica: nothing
    // was established twice.
    let established = edge1
        .stats()
        .sessions
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        established == 3,
        "edge-1 established {established} sessions, not 3 (bootstrap + 2 direct)"
    );
    ensure!(
        matches!(edge1.state(), EdgeState::Connected { .. }),
        "{:?}",
        edge1.state()
    );
    println!("no replica withdrew edge-1's route during the handover; 3 sessions established");
    for e in [edge0, edge1] {
        e.shutdown().await;
    }
    for r in relays {
        r.shutdown(Duration::from_millis(200)).await;
    }
    stop.cancel();
    Ok(())
}

/// `DELETE /v1/sessions/{node}` on replica `i`'s admin API, from the
/// relay node.
fn kick(lab: &netns::NetnsLab, i: u8, node: &'static str) -> Result<()> {
    let admin = sa(netns::RELAY_LAN_IP, admin_port(i));
    let (code, body) = lab.run_in(Role::Relay, Duration::from_secs(5), move || async move {
        let s = tokio::net::TcpStream::connect(admin).await?;
        relay_lab::http_request(
            s,
            "DELETE",
            "admin",
            &format!("/v1/sessions/{node}"),
            Some(ADMIN_TOKEN),
        )
        .await
    })?;
    ensure!(
        (200..300).contains(&code),
        "DELETE {node} on relay-{i}: HTTP {code}: {body}"
    );
    Ok(())
}

/// Two replicas; edge1 (capture on) and edge2 each on both, both
/// configured with replica 1's address, so replica 1 is edge1's primary.
/// Edge2's session on replica 1 is closed by the operator and edge2 kept
/// from coming back to it; replica 1 withdraws edge2's routes, replica 2
/// keeps serving them. For 3 s a pod behind edge1 keeps reaching edge2's
/// pod, TCP and UDP, every time. Before the fix edge1 captured only what
/// its primary listed, so the first attempt already went out of edge1's
/// default route and failed.
#[test]
fn a_peer_withdrawn_by_the_primary_replica_stays_reachable_through_the_other() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("replica_handover: peer withdrawn by one replica")?
    else {
        return Ok(());
    };
    add_wan_addresses(&lab, [2])?;
    let set = relay_lab::replicas::wan_replica_set(2);
    let mut relays = Vec::new();
    for i in 1..=2u8 {
        let cfg = relay_lab::replicas::wan_replica_config(&pki, i, &set)?;
        relays.push(start_relay(&lab, cfg).with_context(|| format!("relay-{i}"))?);
    }
    let _pod = services(&lab, Role::Epod2, "epod2")?;
    let mut edges = Vec::new();
    for site in netns::SITES {
        let mut cfg = replica_edge_config(&pki, site, Duration::from_secs(1))?;
        if site == 1 {
            // Capture on the edge whose pod connects.
            cfg.capture = Some(relay_transport::capture::CaptureConfig::default());
        }
        edges.push(start_edge(&lab, site, cfg)?);
    }
    let sessions = |i: u8| relay_lab::replicas::sessions(&lab, i);
    within(Duration::from_secs(20), || {
        Ok((1..=2).all(|i| sessions(i).is_ok_and(|s| s.len() == 2)))
    })
    .context("both edges on both replicas")?;
    let epod2 = sa(netns::edge_pod_ip(2), HTTP);
    let epod2_udp = sa(netns::edge_pod_ip(2), DNS);
    within(Duration::from_secs(10), || {
        Ok(http_from(&lab, Role::Epod1, epod2).is_ok_and(|b| b.contains("epod2")))
    })
    .context("epod1 → epod2 through the tunnel before anything happens")?;
    ensure!(
        udp_from(&lab, Role::Epod1, epod2_udp)? == "epod2",
        "epod1 → epod2 UDP"
    );

    // Edge2 cannot reach replica 1 any more (its QUIC packets dropped on
    // the relay node), and replica 1's operator closes its session there:
    // replica 1 withdraws edge2's routes (no hold_offline_routes), replica
    // 2 keeps serving them.
    let nat2 = netns::nat_wan_ip(2);
    lab.nft(
        Role::Relay,
        &format!(
            r#"table inet handover_block {{
                chain input {{
                    type filter hook input priority -10; policy accept;
                    ip saddr {nat2} ip daddr {} udp dport {QUIC_PORT} drop
                }}
            }}"#,
            wan(1)
        ),
    )?;
    kick(&lab, 1, "edge2")?;
    within(Duration::from_secs(5), || {
        Ok(!sessions(1)?.contains_key("edge2"))
    })
    .context("relay-1 lets edge2 go")?;
    ensure!(
        sessions(2)?.contains_key("edge2"),
        "relay-2 lost edge2 as well"
    );
    // Time for relay-1's route update to reach edge1 and its capture.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let (mut tcp, mut udp) = (0, 0);
    while t.elapsed() < Duration::from_secs(3) {
        let body = http_from(&lab, Role::Epod1, epod2).with_context(|| {
            format!(
                "epod1 → epod2 {:.1}s after relay-1 withdrew edge2 ({tcp} fetches had worked)",
                t.elapsed().as_secs_f64()
            )
        })?;
        ensure!(body.contains("epod2"), "epod1 → epod2: {body}");
        tcp += 1;
        let name = udp_from(&lab, Role::Epod1, epod2_udp).with_context(|| {
            format!(
                "epod1 → epod2 UDP {:.1}s after relay-1 withdrew edge2",
                t.elapsed().as_secs_f64()
            )
        })?;
        ensure!(name == "epod2", "epod1 → epod2 UDP: {name}");
        udp += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    if sessions(1)?.contains_key("edge2") {
        bail!("edge2 got back to relay-1 during the check: the block did not hold");
    }
    println!(
        "relay-1 withdrew edge2: {tcp} fetches and {udp} UDP queries epod1 → epod2 over 3s, all through relay-2"
    );

    // Edge2 may come back: it rejoins replica 1.
    lab.exec(
        Role::Relay,
        &["nft", "delete", "table", "inet", "handover_block"],
    )?;
    within(Duration::from_secs(15), || {
        Ok(sessions(1)?.contains_key("edge2"))
    })
    .context("edge2 rejoins relay-1")?;
    let body = http_from(&lab, Role::Epod1, epod2)?;
    ensure!(body.contains("epod2"), "epod1 → epod2 at the end: {body}");
    for e in edges {
        e.stop()?;
    }
    for r in relays {
        r.stop()?;
    }
    println!(
        "replica_handover peer routes done in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
