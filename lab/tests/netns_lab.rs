//! The network-namespace lab's topology behaves as documented: it builds
//! and tears down (even on panic), the reachability facts hold before any
//! tunnel exists (also with both sites on one LAN range), ClusterIP DNAT
//! works, and the fault knobs bite.
//! Skips loudly without root (fails instead under REQUIRE_LAB=1 / CI=true).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, KubeProxyMode, KubeService, LabOptions, NetnsLab, Proto, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

/// Connect (and answer) bound: failures must show up within this.
const CONNECT: Duration = Duration::from_millis(1500);

fn lab() -> Option<NetnsLab> {
    if netns::require_root().is_some() {
        return None;
    }
    let lab = NetnsLab::new().expect("build netns lab");
    println!("lab {} built in {:?}", lab.tag(), lab.build_time());
    Some(lab)
}

fn listed_namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_gone(names: &[String]) {
    let listed = listed_namespaces();
    let left: Vec<&String> = names
        .iter()
        .filter(|n| {
            listed
                .lines()
                .any(|l| l.split(' ').next() == Some(n.as_str()))
        })
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// A TCP server in `role`'s namespace answering each connection with
/// `"{name} peer={peer}\n"`; stops when the returned sender is dropped
/// (or after 60 s at the latest).
struct Server {
    _stop: oneshot::Sender<()>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping `_stop` first (field order) ends the accept loop.
        let _ = self.thread.take();
    }
}

fn serve_tcp(lab: &NetnsLab, role: Role, addr: SocketAddr, name: &str) -> Server {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let name = name.to_string();
    let thread = lab.spawn_in(role, move || async move {
        let l = match TcpListener::bind(addr).await {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("bind {addr}: {e}")));
                return Ok(());
            }
        };
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut stop_rx => return Ok(()),
                _ = &mut deadline => return Ok(()),
                r = l.accept() => {
                    let (mut s, peer) = r?;
                    let _ = s.write_all(format!("{name} peer={peer}\n").as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            }
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("server {role}: {e}"),
        Err(_) => panic!("server {role} not ready: {:?}", thread.join()),
    }
    Server {
        _stop: stop_tx,
        thread: Some(thread),
    }
}

/// Connects from `role` to `addr` and reads the greeting, all within
/// [`CONNECT`]; returns the greeting and how long the attempt took.
fn tcp_from(lab: &NetnsLab, role: Role, addr: SocketAddr) -> (Result<String>, Duration) {
    let start = Instant::now();
    let r = lab.run_in(role, CONNECT, move || async move {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok(text)
    });
    (r, start.elapsed())
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn expect_ok(lab: &NetnsLab, from: Role, to: SocketAddr) -> String {
    let (r, took) = tcp_from(lab, from, to);
    let text = r.unwrap_or_else(|e| panic!("{from} -> {to} should work: {e:#}"));
    println!("{from} -> {to}: ok in {took:?}: {}", text.trim());
    text
}

fn expect_fail(lab: &NetnsLab, from: Role, to: SocketAddr) {
    let (r, took) = tcp_from(lab, from, to);
    match r {
        Ok(text) => panic!("{from} -> {to} should fail, got {text:?}"),
        Err(e) => println!("{from} -> {to}: fails in {took:?}: {e:#}"),
    }
    assert!(
        took < CONNECT + Duration::from_secs(1),
        "{from} -> {to} took {took:?}"
    );
}

#[test]
fn builds_and_tears_down() {
    let Some(lab) = lab() else { return };
    let names = lab.namespaces();
    assert_eq!(names.len(), Role::ALL.len());
    let listed = listed_namespaces();
    for n in &names {
        assert!(
            listed.contains(n.as_str()),
            "{n} missing from ip netns list"
        );
    }
    // Interface names inside the namespaces are short and fixed.
    let links = lab
        .exec(Role::Relay, &["ip", "-br", "link"])
        .expect("ip link");
    for ifname in ["lan0", "wan0", "cni0", "vpod"] {
        assert!(links.contains(ifname), "relay lacks {ifname}: {links}");
    }
    let start = Instant::now();
    drop(lab);
    println!("teardown took {:?}", start.elapsed());
    assert_gone(&names);
}

#[test]
fn panic_still_removes_namespaces() {
    if netns::require_root().is_some() {
        return;
    }
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = NetnsLab::new().expect("build netns lab");
        names = lab.namespaces();
        panic!("deliberate panic with the lab alive");
    }));
    assert!(r.is_err());
    assert!(!names.is_empty());
    assert_gone(&names);
}

#[test]
fn reachability_before_any_tunnel() {
    let Some(lab) = lab() else { return };

    // Edge host -> relay's public address works through the NAT, and the
    // relay sees the NAT's address.
    let _relay = serve_tcp(&lab, Role::Relay, sa(Ipv4Addr::UNSPECIFIED, 7000), "relay");
    let text = expect_ok(&lab, Role::Edge1, sa(netns::RELAY_WAN_IP, 7000));
    assert!(
        text.starts_with(&format!("relay peer={}:", netns::nat_wan_ip(1))),
        "{text}"
    );
    let text = expect_ok(&lab, Role::Edge2, sa(netns::RELAY_WAN_IP, 7000));
    assert!(
        text.starts_with(&format!("relay peer={}:", netns::nat_wan_ip(2))),
        "{text}"
    );

    // Nothing reaches an edge host from outside: no route on the relay,
    // and no port forwarding at the NAT.
    let _edge1 = serve_tcp(&lab, Role::Edge1, sa(Ipv4Addr::UNSPECIFIED, 7001), "edge1");
    expect_fail(&lab, Role::Relay, sa(netns::edge_host_ip(1), 7001));
    expect_fail(&lab, Role::Relay, sa(netns::nat_wan_ip(1), 7001));

    // Cloud pod to cloud pod across nodes (host-gw routes), no SNAT.
    let _cpod1 = serve_tcp(&lab, Role::Cpod1, sa(netns::CPOD1_IP, 8080), "cpod1");
    let text = expect_ok(&lab, Role::Cpod2, sa(netns::CPOD1_IP, 8080));
    assert!(
        text.starts_with(&format!("cpod1 peer={}:", netns::CPOD2_IP)),
        "{text}"
    );
    expect_ok(&lab, Role::Apiserver, sa(netns::CPOD1_IP, 8080));

    // Edge host to its own pod.
    let _epod1 = serve_tcp(&lab, Role::Epod1, sa(netns::edge_pod_ip(1), 9000), "epod1");
    let text = expect_ok(&lab, Role::Edge1, sa(netns::edge_pod_ip(1), 9000));
    assert!(text.starts_with("epod1 "), "{text}");

    // Cloud -> edge pod is routed to the relay node, which has no tunnel
    // yet; the other edge site cannot reach it either.
    expect_fail(&lab, Role::Cloud2, sa(netns::edge_pod_ip(1), 9000));
    expect_fail(&lab, Role::Cpod2, sa(netns::edge_pod_ip(1), 9000));
    expect_fail(&lab, Role::Epod2, sa(netns::edge_pod_ip(1), 9000));

    // Edge pod -> cloud pod: the edge side has no route to the cloud.
    let _cpod2 = serve_tcp(&lab, Role::Cpod2, sa(netns::CPOD2_IP, 8080), "cpod2");
    expect_fail(&lab, Role::Epod1, sa(netns::CPOD2_IP, 8080));
    expect_fail(&lab, Role::Edge1, sa(netns::CPOD2_IP, 8080));

    // kube-proxy ClusterIP: DNAT in the nodes' root namespaces, for pods
    // (prerouting) and host processes (output, over the default route).
    let vip = sa(Ipv4Addr::new(10, 96, 0, 10), 80);
    let vip2 = sa(Ipv4Addr::new(10, 96, 0, 11), 443);
    let vip3 = sa(Ipv4Addr::new(10, 96, 0, 12), 80);
    lab.sync_services(
        KubeProxyMode::Iptables,
        &[
            KubeService::new(
                "default/a:http",
                vip,
                Proto::Tcp,
                &[sa(netns::CPOD1_IP, 8080)],
            )
            .expect("service a"),
            KubeService::new(
                "default/b:https",
                vip2,
                Proto::Tcp,
                &[sa(netns::CPOD1_IP, 8080)],
            )
            .expect("service b"),
            KubeService::new(
                "default/c:http",
                vip3,
                Proto::Tcp,
                &[sa(netns::CPOD1_IP, 8080), sa(netns::CPOD2_IP, 8080)],
            )
            .expect("service c"),
        ],
    )
    .expect("kube-proxy sync");
    // Two endpoints: numgen picks each, connection by connection.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let text = expect_ok(&lab, Role::Cloud2, vip3);
        seen.insert(text.split(' ').next().unwrap_or_default().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both endpoints of {vip3}: {seen:?}");
    let text = expect_ok(&lab, Role::Cpod2, vip);
    assert!(text.starts_with("cpod1 "), "{text}");
    let text = expect_ok(&lab, Role::Cloud2, vip2);
    assert!(text.starts_with("cpod1 "), "{text}");
    // Regenerated whole: a Service gone is gone on every node.
    lab.sync_services(
        KubeProxyMode::Nftables,
        &[KubeService::new("default/b:https", vip2, Proto::Tcp, &[]).expect("service b")],
    )
    .expect("kube-proxy resync");
    expect_fail(&lab, Role::Cpod2, vip);
    expect_fail(&lab, Role::Cloud2, vip2);
    let rules = lab.kube_proxy_rules(Role::Edge2).expect("edge2 rules");
    assert!(rules.contains("has no endpoints"), "{rules}");
    assert!(
        rules.contains("priority dstnat - 10") || rules.contains("-110"),
        "{rules}"
    );
}

/// Sends one datagram from `role` to `to` and waits for the echo.
/// With repeated LANs both sites are numbered alike but stay separate
/// networks: each edge host reaches its own NAT at the shared gateway
/// address, each NAT shows the relay its own WAN address, and nothing from
/// the cloud reaches the shared host address before a tunnel exists.
#[test]
fn repeated_lans_are_separate_networks_with_one_numbering() {
    if netns::require_root().is_some() {
        return;
    }
    let lab = NetnsLab::with_options(LabOptions {
        repeated_lans: true,
        ..LabOptions::default()
    })
    .expect("build netns lab with repeated LANs");
    println!("lab {} built in {:?}", lab.tag(), lab.build_time());
    let (host, gw) = (lab.edge_host_ip(1), lab.nat_lan_ip(1));
    assert_eq!(host, Ipv4Addr::new(192, 168, 1, 10));
    assert_eq!((lab.edge_host_ip(2), lab.nat_lan_ip(2)), (host, gw));
    assert_eq!(lab.edge_lan_cidr(2).to_string(), "192.168.1.0/24");
    // The cloud nodes' route to the one LAN range exists once.
    let routes = lab
        .exec(Role::Cloud2, &["ip", "-4", "route"])
        .expect("cloud2 routes");
    assert_eq!(routes.matches("192.168.1.0/24 via").count(), 1, "{routes}");
    assert!(!routes.contains("192.168.2.0/24"), "{routes}");

    let _nat1 = serve_tcp(&lab, Role::Nat1, sa(gw, 7002), "nat1");
    let _nat2 = serve_tcp(&lab, Role::Nat2, sa(gw, 7002), "nat2");
    for (edge, nat) in [(Role::Edge1, "nat1"), (Role::Edge2, "nat2")] {
        let text = expect_ok(&lab, edge, sa(gw, 7002));
        assert!(text.starts_with(&format!("{nat} peer={host}:")), "{text}");
    }
    let _relay = serve_tcp(&lab, Role::Relay, sa(Ipv4Addr::UNSPECIFIED, 7000), "relay");
    for site in netns::SITES {
        let text = expect_ok(
            &lab,
            Role::edge(site).unwrap(),
            sa(netns::RELAY_WAN_IP, 7000),
        );
        assert!(
            text.starts_with(&format!("relay peer={}:", netns::nat_wan_ip(site))),
            "{text}"
        );
    }
    let _edge1 = serve_tcp(&lab, Role::Edge1, sa(Ipv4Addr::UNSPECIFIED, 7001), "edge1");
    expect_fail(&lab, Role::Cloud2, sa(host, 7001));
    let names = lab.namespaces();
    drop(lab);
    assert_gone(&names);
}

fn udp_roundtrip(lab: &NetnsLab, role: Role, to: SocketAddr) -> Result<()> {
    lab.run_in(role, CONNECT, move || async move {
        let s = UdpSocket::bind("0.0.0.0:0").await?;
        s.send_to(b"ping", to).await?;
        let mut buf = [0u8; 16];
        let (n, _) = s.recv_from(&mut buf).await?;
        anyhow::ensure!(&buf[..n] == b"ping", "bad echo");
        Ok(())
    })
}

#[test]
fn faults_bite_and_heal() {
    let Some(lab) = lab() else { return };
    let _relay = serve_tcp(&lab, Role::Relay, sa(netns::RELAY_WAN_IP, 7000), "relay");
    let (udp_stop, mut udp_stop_rx) = oneshot::channel::<()>();
    let udp = lab.spawn_in(Role::Relay, move || async move {
        let s = UdpSocket::bind(sa(netns::RELAY_WAN_IP, 7000)).await?;
        let mut buf = [0u8; 64];
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut udp_stop_rx => return Ok(()),
                _ = &mut deadline => return Ok(()),
                r = s.recv_from(&mut buf) => {
                    let (n, peer) = r?;
                    s.send_to(&buf[..n], peer).await?;
                }
            }
        }
    });
    let relay_udp = sa(netns::RELAY_WAN_IP, 7000);
    // The echo socket may not be bound yet: retry a few times.
    let mut ok = false;
    for _ in 0..5 {
        if udp_roundtrip(&lab, Role::Edge1, relay_udp).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "UDP edge1 -> relay should work before the fault");

    lab.block_udp(1).expect("block_udp");
    assert!(udp_roundtrip(&lab, Role::Edge1, relay_udp).is_err());
    expect_ok(&lab, Role::Edge1, relay_udp); // TCP unaffected
    udp_roundtrip(&lab, Role::Edge2, relay_udp).expect("other site unaffected");
    lab.clear_nat_faults(1).expect("clear_nat_faults");
    udp_roundtrip(&lab, Role::Edge1, relay_udp).expect("UDP after unblock");

    // NAT rebinding: the relay sees the new public address.
    let new_ip = Ipv4Addr::new(198, 18, 0, 21);
    lab.change_masquerade_addr(1, new_ip).expect("rebind");
    let text = expect_ok(&lab, Role::Edge1, relay_udp);
    assert!(text.starts_with(&format!("relay peer={new_ip}:")), "{text}");
    lab.change_masquerade_addr(1, netns::nat_wan_ip(1))
        .expect("restore masquerade");
    let text = expect_ok(&lab, Role::Edge1, relay_udp);
    assert!(
        text.starts_with(&format!("relay peer={}:", netns::nat_wan_ip(1))),
        "{text}"
    );
    lab.flush_conntrack(1).expect("flush conntrack");

    // Edge uplink down and back.
    lab.link_down(1).expect("link down");
    expect_fail(&lab, Role::Edge1, relay_udp);
    lab.link_up(1).expect("link up");
    expect_ok(&lab, Role::Edge1, relay_udp);

    drop(udp_stop);
    udp.join().expect("udp echo thread").expect("udp echo");
}
