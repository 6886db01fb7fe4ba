//! The IPv6 refusal: its script and skip set, and, in network namespaces
//! of the test's own, what it refuses and what it leaves alone.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::*;

fn cidrs(v: &[&str]) -> BTreeSet<Cidr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

thread_local! {
    /// How many of this thread's next installs of the refusal fail as a
    /// kernel without ICMPv6 reject makes them fail (see [`install`]).
    static REFUSED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether this install of the refusal fails (one of the failures a test
/// asked for on its thread: the namespace tests' captures run on theirs).
pub(super) fn refused_by_the_kernel() -> bool {
    REFUSED.with(|n| {
        let left = n.get();
        n.set(left.saturating_sub(1));
        left > 0
    })
}

/// A counter listing without a packet count reads as nothing, not as 0:
/// the edge takes a lower reading for a counter made anew, and would add
/// the last one to its total again.
#[test]
fn an_unreadable_counter_is_no_reading() {
    let listing =
        "table inet edge_relay {\n\tcounter v6_refused {\n\t\tpackets 3 bytes 180\n\t}\n}\n";
    assert_eq!(counter_reading(listing), Some(3));
    assert_eq!(counter_reading("packets 0 bytes 0"), Some(0));
    for bad in [
        "",
        "table inet edge_relay { }",
        "packets lots bytes 9",
        "packets",
    ] {
        assert_eq!(counter_reading(bad), None, "{bad:?}");
    }
}

/// The routes the refusal leaves alone, from a real `ip -6 -j route`
/// listing (iproute2 6.x): unicast ones, a host route as a `/128`, a
/// multipath one; not the default routes, nor `unreachable`, `blackhole`,
/// a route on `lo` or link-local.
#[test]
fn routed_ipv6_is_the_main_tables_unicast_routes_but_the_default() {
    let listing = r#"[{"dst":"64:ff9b::/96","dev":"lo","metric":1024,"flags":[],"pref":"medium"},{"dst":"2001:db8:1::5","dev":"a0","metric":1024,"flags":[],"pref":"medium"},{"dst":"2001:db8:aa::/64","metric":1024,"flags":[],"pref":"medium","nexthops":[{"gateway":"fd00:5::fe","dev":"a0","weight":1,"flags":[]},{"gateway":"fd00:5::fd","dev":"a0","weight":1,"flags":[]}]},{"type":"blackhole","dst":"2001:db8:beef::/48","dev":"lo","metric":1024,"flags":[],"pref":"medium"},{"dst":"2001:db8:cafe:77::/64","gateway":"fd00:5::ff","dev":"a0","metric":1024,"flags":[],"pref":"medium"},{"type":"unreachable","dst":"2001:db8:dead::/48","dev":"lo","metric":1024,"flags":[],"pref":"medium"},{"dst":"fd00:5::/64","dev":"a0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},{"dst":"fe80::/64","dev":"a0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},{"dst":"default","gateway":"fd00:5::ff","dev":"a0","metric":1024,"flags":[],"pref":"medium"},{"dst":"::/0","gateway":"fd00:5::fe","dev":"a0","metric":2000,"flags":[],"pref":"medium"}]"#;
    assert_eq!(
        parse_routes6(listing).unwrap(),
        cidrs(&[
            "2001:db8:1::5/128",
            "2001:db8:aa::/64",
            "2001:db8:cafe:77::/64",
            "fd00:5::/64",
        ])
    );
    assert_eq!(parse_routes6("").unwrap(), BTreeSet::new());
    assert_eq!(parse_routes6("[]\n").unwrap(), BTreeSet::new());
    assert!(parse_routes6("default via fd00:5::ff dev a0").is_err());
}

/// `skip6`: the IPv6 skips and IPv6 peers (as `/128`s); IPv4 ones and
/// IPv4-mapped peers are IPv4's business.
#[test]
fn skip_set_is_the_ipv6_skips_and_peers() {
    let skip = cidrs(&["10.244.7.0/24", "fd00:44::/64"]);
    let peers: BTreeSet<IpAddr> = ["2001:db8::7", "::ffff:10.0.0.1", "10.0.0.2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        skip_set(&skip, &peers),
        cidrs(&["fd00:44::/64", "2001:db8::7/128"])
    );
}

#[test]
fn script_refuses_in_both_hooks_and_skips_our_own_mark() {
    let s = script("edge_relay", 0x1070);
    assert!(s.starts_with("table inet edge_relay {"), "{s}");
    for line in [
        "chain v6_fwd { type filter hook forward priority filter; policy accept;",
        "chain v6_out { type filter hook output priority filter; policy accept;",
        "meta mark 0x1070 return",
        "ip6 daddr { ::1, fe80::/10, ff00::/8, 64:ff9b::/96, 64:ff9b:1::/48 } return",
        "ip6 daddr @dst6 ip6 saddr @src6 meta l4proto tcp counter name v6_refused reject with tcp reset",
        "ip6 daddr @dst6 counter name v6_refused reject with icmpx admin-prohibited",
    ] {
        assert!(s.lines().any(|l| l == line), "{line} missing in:\n{s}");
    }
}

/// An edge in a namespace of its own, with two more: the site, which
/// holds the edge's IPv6 default route and owns an address inside the
/// tunnel's IPv6 prefix (a site network reusing the cloud's range), and a
/// pod behind the edge (forwarded traffic). Everything lives in the
/// thread's namespaces and goes with them.
mod netns {
    use std::fs::File;
    use std::io::ErrorKind;
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use nix::sched::{setns, unshare, CloneFlags};

    use super::*;
    use crate::capture::tests::netns::in_netns;
    use crate::test_netns::ip;

    /// The site's address inside the tunnel's IPv6 prefix.
    const LEAK: &str = "2001:db8:cafe::10";
    /// A tunnel peer's address inside that prefix (the relay, say).
    const PEER: &str = "2001:db8:cafe::99";
    /// The site router, on the edge's connected IPv6 LAN.
    const ROUTER: &str = "fd00:5::ff";
    /// How long a refusal may take to be "at once".
    const AT_ONCE: Duration = Duration::from_secs(1);

    fn this_ns() -> File {
        File::open("/proc/thread-self/ns/net").unwrap()
    }

    /// A fresh network namespace; the thread is back in `home` after.
    fn new_ns(home: &File) -> File {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare");
        let ns = this_ns();
        setns(home, CloneFlags::CLONE_NEWNET).expect("setns home");
        ns
    }

    /// Runs `f` in `ns` (sockets it makes stay there), then back home.
    fn within<T>(ns: &File, home: &File, f: impl FnOnce() -> T) -> T {
        setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
        let r = f();
        setns(home, CloneFlags::CLONE_NEWNET).expect("setns home");
        r
    }

    /// `ns` as a path `ip link set ... netns` opens.
    fn ns_path(ns: &File) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
    }

    fn ips(cmds: &[&str]) {
        for c in cmds {
            ip(&c.split(' ').collect::<Vec<_>>());
        }
    }

    fn at(addr: &str, port: u16) -> SocketAddr {
        SocketAddr::new(addr.parse().unwrap(), port)
    }

    /// The edge's namespace (the calling thread's), the site's and the
    /// pod's, and the site's TCP listener on port 80 (non-blocking, every
    /// address: `LEAK`, `PEER`, its LAN and link-local ones).
    struct Lab {
        edge: File,
        site: File,
        pod: File,
        tcp: TcpListener,
    }

    /// Sets up the namespaces of [`Lab`] (see the module docs): the site
    /// holds the edge's IPv6 default route and owns `LEAK` and `PEER`,
    /// and routes its replies to the pod back through the edge, so that a
    /// leak is seen.
    fn lab() -> Lab {
        let edge = this_ns();
        let (site, pod) = (new_ns(&edge), new_ns(&edge));
        let forwarding = "/proc/sys/net/ipv6/conf/all/forwarding";
        std::fs::write(forwarding, "1").unwrap();
        ips(&[
            "link add site0 type veth peer name site1",
            &format!("link set site1 netns {}", ns_path(&site)),
            "link add pod0 type veth peer name pod1",
            &format!("link set pod1 netns {}", ns_path(&pod)),
            "-6 addr add fd00:5::1/64 dev site0 nodad",
            "-6 addr add fe80::1/64 dev site0 nodad",
            "link set site0 up",
            "-6 addr add fd00:44::1/64 dev pod0 nodad",
            "link set pod0 up",
            "-6 route add default via fd00:5::ff dev site0",
        ]);
        let tcp = within(&site, &edge, || {
            ips(&[
                "link set lo up",
                "-6 addr add fd00:5::ff/64 dev site1 nodad",
                "-6 addr add fe80::2/64 dev site1 nodad",
                "link set site1 up",
                &format!("-6 addr add {LEAK}/128 dev lo"),
                &format!("-6 addr add {PEER}/128 dev lo"),
                // Replies to the pod, so that a leak is seen.
                "-6 route add fd00:44::/64 via fd00:5::1 dev site1",
            ]);
            let tcp = TcpListener::bind("[::]:80").unwrap();
            tcp.set_nonblocking(true).unwrap();
            tcp
        });
        within(&pod, &edge, || {
            ips(&[
                "link set lo up",
                "-6 addr add fd00:44::2/64 dev pod1 nodad",
                "link set pod1 up",
                "-6 route add default via fd00:44::1 dev pod1",
            ]);
        });
        Lab {
            edge,
            site,
            pod,
            tcp,
        }
    }

    /// What an edge's plan gives capture in [`Lab`].
    struct Plan {
        want: BTreeSet<Cidr>,
        skip: BTreeSet<Cidr>,
        served: BTreeSet<Cidr>,
        peers: BTreeSet<IpAddr>,
    }

    /// The tunnel's IPv6 prefixes (a cloud range reused by the site, and
    /// one holding the edge's LAN and pod CIDR) and an IPv4 one, the pod
    /// CIDR it serves and the LAN it sits on exempt, and a peer.
    fn plan() -> Plan {
        Plan {
            // (A /64 inside the /48: the sets get the minimal cover.)
            want: cidrs(&[
                "10.99.0.0/16",
                "2001:db8:cafe::/48",
                "2001:db8:cafe:1::/64",
                "fd00::/16",
            ]),
            skip: cidrs(&["10.244.7.0/24", "fd00:44::/64", "fd00:5::/64"]),
            served: cidrs(&["10.244.7.0/24", "fd00:44::/64"]),
            peers: [PEER.parse().unwrap()].into(),
        }
    }

    use crate::test_netns::connect;

    /// Refused at once: a reset, not a timeout (the connect is bounded).
    fn assert_refused(what: &str, r: (Result<(), ErrorKind>, Duration)) {
        crate::test_netns::assert_refused(what, r, AT_ONCE);
    }

    /// Takes the connections waiting on `l`: how many there were.
    /// What the refusal never refuses reaches the site (five accepted
    /// connections): the edge's LAN inside the prefix, from the edge and
    /// from the pod (`from_pod`); link-local; a tunnel peer; a socket
    /// carrying `own_mark`.
    fn left_alone(
        from_pod: &dyn Fn(SocketAddr) -> (Result<(), ErrorKind>, Duration),
        own_mark: u32,
    ) {
        assert_eq!(connect(at(ROUTER, 80)).0, Ok(()), "edge → its LAN");
        assert_eq!(from_pod(at(ROUTER, 80)).0, Ok(()), "pod → the LAN");
        let scope = nix::net::if_::if_nametoindex("site0").unwrap();
        let link = SocketAddrV6::new("fe80::2".parse::<Ipv6Addr>().unwrap(), 80, 0, scope);
        assert_eq!(connect(link.into()).0, Ok(()), "edge → link-local");
        assert_eq!(connect(at(PEER, 80)).0, Ok(()), "edge → a tunnel peer");
        let ours =
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        ours.set_mark(own_mark).unwrap();
        let to = at(LEAK, 80);
        ours.connect_timeout(&to.into(), Duration::from_secs(2))
            .expect("our own marked socket is not refused");
    }

    fn accepted(l: &TcpListener) -> usize {
        let mut n = 0;
        // Connected on the client's side means queued here already.
        while l.accept().is_ok() {
            n += 1;
        }
        n
    }

    /// A connected UDP socket's send and the reply it waits for (1 s):
    /// `Ok` for an answer, else the error kind.
    fn udp_exchange(s: &UdpSocket) -> Result<(), ErrorKind> {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send(b"q").map_err(|e| e.kind())?;
        let mut b = [0u8; 8];
        s.recv(&mut b).map(drop).map_err(|e| e.kind())
    }

    /// What the refusal refuses, checked from the edge (output) and the
    /// pod (forwarded), TCP and UDP: at once, nothing at the site (`tcp`
    /// its listener), counted. The count.
    async fn refused(
        cap: &Capture,
        tcp: &TcpListener,
        pod_udp: &UdpSocket,
        pod: &File,
        edge: &File,
    ) -> u64 {
        assert_refused("edge → the tunnel prefix", connect(at(LEAK, 80)));
        let from_pod = within(pod, edge, || connect(at(LEAK, 80)));
        assert_refused("pod → the tunnel prefix", from_pod);
        assert_eq!(accepted(tcp), 0, "a refused connection reached the site");
        let s = UdpSocket::bind("[::]:0").unwrap();
        let t0 = Instant::now();
        let sent = s.send_to(b"q", at(LEAK, 53)).map_err(|e| e.kind());
        assert_eq!(
            sent,
            Err(ErrorKind::PermissionDenied),
            "the edge's datagram"
        );
        let got = udp_exchange(pod_udp);
        assert_eq!(got, Err(ErrorKind::PermissionDenied), "the pod's datagram");
        assert!(
            t0.elapsed() < AT_ONCE,
            "UDP refused after {:?}",
            t0.elapsed()
        );
        let counted = cap.refused_ipv6().await.unwrap();
        assert!(counted >= 4, "v6_refused counted {counted}");
        counted
    }

    /// The edge's capture is told the tunnel's IPv6 prefixes: without the
    /// refusal (how capture was) the edge's and a pod's connections to
    /// one of them leave by the default route and reach the site, which
    /// owns that address; with it, TCP is reset and UDP refused at once,
    /// nothing reaches the site, and the counter counts. The edge's IPv6
    /// LAN inside the prefix, link-local addresses, a tunnel peer and our
    /// own sockets still reach the site, and a repair puts it all back.
    #[test]
    fn ipv6_tunnel_prefixes_are_refused_not_leaked() {
        in_netns(|| {
            Box::pin(async {
                let Lab {
                    edge,
                    site,
                    pod,
                    tcp,
                } = lab();
                // Bound to the address, so that its answers come from it.
                let udp = within(&site, &edge, || UdpSocket::bind(at(LEAK, 53)).unwrap());
                // The site answers each datagram (for the pod's exchange).
                let answer = udp.try_clone().unwrap();
                let (stop, stopped) = std::sync::mpsc::channel::<()>();
                let echo = std::thread::spawn(move || {
                    answer
                        .set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    let mut b = [0u8; 64];
                    let mut got = 0;
                    while stopped.try_recv().is_err() {
                        if let Ok((n, from)) = answer.recv_from(&mut b) {
                            got += 1;
                            let _ = answer.send_to(&b[..n], from);
                        }
                    }
                    got
                });
                let pod_udp = within(&pod, &edge, || {
                    let s = UdpSocket::bind("[::]:0").unwrap();
                    s.connect(at(LEAK, 53)).unwrap();
                    s
                });
                let from_pod = |to: SocketAddr| within(&pod, &edge, || connect(to));

                let Plan {
                    want,
                    skip,
                    served,
                    peers,
                } = plan();

                // Without the refusal (capture as it was): the leak.
                let mut cap = Capture::install(CaptureConfig::default()).await.unwrap();
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_eq!(connect(at(LEAK, 80)).0, Ok(()), "the edge did not leak");
                assert_eq!(from_pod(at(LEAK, 80)).0, Ok(()), "the pod did not leak");
                assert_eq!(accepted(&tcp), 2, "the site did not get the leaks");
                assert_eq!(udp_exchange(&pod_udp), Ok(()), "the pod's UDP did not leak");

                cap.refuse_ipv6().await;
                assert!(cap.refuses_ipv6(), "the kernel refused the rules");
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_eq!(cap.refused_ipv6().await, Some(0));
                let counted = refused(&cap, &tcp, &pod_udp, &pod, &edge).await;

                // Left alone: the edge's LAN inside the prefix, from the
                // edge and from the pod; link-local; the peer; our mark.
                left_alone(&from_pod, cap.config().own_mark);
                assert_eq!(accepted(&tcp), 5, "the site did not get what is left alone");
                assert_eq!(
                    cap.refused_ipv6().await,
                    Some(counted),
                    "counted what passed"
                );

                // Something removes capture: the repair's install puts the
                // refusal back (the counter starts again).
                ip(&["-4", "rule", "del", "pref", "7100"]);
                assert!(cap.repair().await.unwrap());
                assert!(cap.refuses_ipv6());
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                refused(&cap, &tcp, &pod_udp, &pod, &edge).await;
                cap.teardown().await;
                let _ = stop.send(());
                let answered = echo.join().unwrap();
                assert_eq!(answered, 1, "the site got refused datagrams");
            })
        });
    }

    /// The held table's listing, `None` when there is none.
    fn held_listing() -> Option<String> {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "inet", "edge_relay_held"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An edge's capture, refusing the IPv6 tunnel prefixes when `refuse`,
    /// with the plan applied and a hold of a minute.
    async fn running(refuse: bool) -> Capture {
        let Plan {
            want,
            skip,
            served,
            peers,
        } = plan();
        let cfg = CaptureConfig {
            hold_after_exit: Duration::from_secs(60),
            ..CaptureConfig::default()
        };
        let mut cap = Capture::install(cfg).await.unwrap();
        if refuse {
            cap.refuse_ipv6().await;
            assert!(cap.refuses_ipv6(), "the kernel refused the rules");
        }
        cap.apply_sources(&served).await.unwrap();
        cap.apply(&want, &skip, &peers).await.unwrap();
        cap
    }

    /// Between two edge processes (`hold_after_exit`) the tunnel's IPv6
    /// prefixes are refused as while one runs. A stop whose capture did
    /// not refuse them (how the held table always was) leaves IPv4
    /// refusals only, and the edge's and a pod's connections to one of
    /// them leave by the default route and reach the site. A stop whose
    /// capture refused them leaves them refused too: TCP reset at once,
    /// from the edge and from the pod, nothing at the site, IPv4 still
    /// refused; what the refusal left alone (the edge's LAN inside the
    /// prefix, link-local, a tunnel peer, our own sockets) still reaches
    /// the site; the prefixes time out with the hold. The next start
    /// keeps them until its first apply, which takes them over. A stop
    /// with IPv6 prefixes alone (nothing captured) holds them too.
    #[test]
    fn a_stopped_edge_holds_the_ipv6_refusal() {
        in_netns(|| {
            Box::pin(async {
                let Lab {
                    edge,
                    site: _site,
                    pod,
                    tcp,
                } = lab();
                let from_pod = |to: SocketAddr| within(&pod, &edge, || connect(to));
                let ipv4 = at("10.99.1.1", 80);

                // Without the refusal: the held table is IPv4 only, and
                // IPv6 leaks between the processes.
                running(false).await.stop().await;
                let listing = held_listing().expect("no held table after the stop");
                assert!(!listing.contains("ipv6_addr"), "{listing}");
                assert_refused("edge → IPv4, held", connect(ipv4));
                assert_eq!(connect(at(LEAK, 80)).0, Ok(()), "the edge did not leak");
                assert_eq!(from_pod(at(LEAK, 80)).0, Ok(()), "the pod did not leak");
                assert_eq!(accepted(&tcp), 2, "the site did not get the leaks");

                // With it (the next start takes the IPv4-only table over).
                let cap = running(true).await;
                assert!(held_listing().is_none(), "the apply left the held table");
                assert_refused("edge → the tunnel prefix, running", connect(at(LEAK, 80)));
                cap.stop().await;
                assert_refused("edge → the tunnel prefix, held", connect(at(LEAK, 80)));
                let held_pod = from_pod(at(LEAK, 80));
                assert_refused("pod → the tunnel prefix, held", held_pod);
                assert_refused("edge → IPv4, held", connect(ipv4));
                assert_eq!(accepted(&tcp), 0, "a held refusal reached the site");
                let listing = held_listing().expect("no held table after the stop");
                for set in ["set dst6", "set skip6", "set src6"] {
                    assert!(listing.contains(set), "{set} missing in:\n{listing}");
                }
                let dst6 = std::process::Command::new("nft")
                    .args(["list", "set", "inet", "edge_relay_held", "dst6"])
                    .output()
                    .unwrap();
                let dst6 = String::from_utf8_lossy(&dst6.stdout);
                assert!(
                    dst6.contains("2001:db8:cafe::/48")
                        && !dst6.contains("2001:db8:cafe:1::")
                        && dst6.contains("expires"),
                    "dst6 does not hold the prefixes' cover for the hold:\n{dst6}"
                );

                // Left alone while held, as while running.
                left_alone(&from_pod, CaptureConfig::default().own_mark);
                assert_eq!(accepted(&tcp), 5, "the site did not get what is left alone");

                // The next start: still refused between its install (and
                // its own refusal, empty yet) and its first apply.
                let cfg = CaptureConfig {
                    hold_after_exit: Duration::from_secs(60),
                    ..CaptureConfig::default()
                };
                let mut cap = Capture::install(cfg).await.unwrap();
                cap.refuse_ipv6().await;
                assert!(
                    held_listing().is_some(),
                    "the install removed the held table"
                );
                let before_apply = from_pod(at(LEAK, 80));
                assert_refused("pod → the tunnel prefix, before the apply", before_apply);
                let Plan {
                    want,
                    skip,
                    served,
                    peers,
                } = plan();
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert!(
                    held_listing().is_none(),
                    "the first apply left the held table"
                );
                let after_apply = from_pod(at(LEAK, 80));
                assert_refused("pod → the tunnel prefix, after the apply", after_apply);
                assert_eq!(accepted(&tcp), 0, "a refused connection reached the site");

                // Only IPv6 prefixes (no IPv4 captured): held all the same.
                let want6 = cidrs(&["2001:db8:cafe::/48"]);
                cap.apply(&want6, &skip, &peers).await.unwrap();
                assert!(cap.installed().is_empty());
                cap.stop().await;
                assert_refused("edge → the tunnel prefix, IPv6 only", connect(at(LEAK, 80)));
                assert!(held_listing().is_some(), "no held table for IPv6 alone");
                assert_eq!(accepted(&tcp), 0, "a held refusal reached the site");
            })
        });
    }

    /// The site's address inside NAT64's well-known prefix (192.0.2.1 as
    /// an IPv6-only site's DNS64 gives it to the edge's host processes).
    const NAT64: &str = "64:ff9b::c000:201";

    /// An IPv6-only site behind NAT64, with a tunnel route as wide as
    /// `::/0`: the edge's connections to NAT64's prefix (what DNS64 gives
    /// for every IPv4 name) are left alone, running and held after a
    /// stop, while the rest of the tunnel's IPv6 is refused. Without
    /// NAT64's prefixes in `NEVER` the connection is reset.
    #[test]
    fn nat64_prefixes_are_never_refused() {
        in_netns(|| {
            Box::pin(async {
                let Lab {
                    edge, site, tcp, ..
                } = lab();
                within(&site, &edge, || {
                    ips(&[&format!("-6 addr add {NAT64}/128 dev lo")])
                });
                let Plan {
                    skip,
                    served,
                    peers,
                    ..
                } = plan();
                let want = cidrs(&["10.99.0.0/16", "::/0"]);
                let cfg = CaptureConfig {
                    hold_after_exit: Duration::from_secs(60),
                    ..CaptureConfig::default()
                };
                let mut cap = Capture::install(cfg).await.unwrap();
                cap.refuse_ipv6().await;
                assert!(cap.refuses_ipv6(), "the kernel refused the rules");
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_eq!(connect(at(NAT64, 80)).0, Ok(()), "edge → NAT64, running");
                assert_refused("edge → the tunnel prefix, running", connect(at(LEAK, 80)));
                cap.stop().await;
                assert_eq!(connect(at(NAT64, 80)).0, Ok(()), "edge → NAT64, held");
                assert_refused("edge → the tunnel prefix, held", connect(at(LEAK, 80)));
                assert_eq!(
                    accepted(&tcp),
                    2,
                    "the site did not get the NAT64 connections"
                );
            })
        });
    }

    /// A refusal whose first install fails (as on a kernel without
    /// ICMPv6 reject: the failure is the test's, `REFUSED`) leaves capture
    /// running without it, and IPv6 leaking; the next repair (the edge's
    /// 10 s tick) installs it, and the next apply fills it: refused. Its
    /// chains deleted by something else are noticed by
    /// [`Capture::missing`], and the repair puts them back.
    #[test]
    fn a_failed_refusal_is_installed_again_by_the_repair() {
        in_netns(|| {
            Box::pin(async {
                let Lab { tcp, .. } = lab();
                let Plan {
                    want,
                    skip,
                    served,
                    peers,
                } = plan();
                let mut cap = Capture::install(CaptureConfig::default()).await.unwrap();
                REFUSED.with(|n| n.set(1));
                cap.refuse_ipv6().await;
                assert!(!cap.refuses_ipv6(), "the test's refusal did not fail");
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_eq!(connect(at(LEAK, 80)).0, Ok(()), "the edge did not leak");
                assert_eq!(accepted(&tcp), 1, "the site did not get the leak");
                assert_eq!(cap.refused_ipv6().await, None);

                // The tick: nothing of capture missing, the refusal tried
                // again (not a repair of capture).
                assert!(cap.missing().await.is_empty());
                assert!(!cap.repair().await.unwrap(), "counted as a repair");
                assert!(cap.refuses_ipv6(), "the repair did not install the refusal");
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_refused("edge → the tunnel prefix, retried", connect(at(LEAK, 80)));
                let counted = cap.refused_ipv6().await;
                assert!(counted.is_some_and(|n| n >= 1), "counted {counted:?}");

                // Its chains deleted (not the table): noticed, put back.
                for chain in ["v6_fwd", "v6_out"] {
                    let out = std::process::Command::new("nft")
                        .args(["delete", "chain", "inet", "edge_relay", chain])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "nft delete chain {chain}: {out:?}");
                }
                assert_eq!(connect(at(LEAK, 80)).0, Ok(()), "the chains were not gone");
                assert_eq!(cap.missing().await, ["IPv6 refusal"]);
                assert!(cap.repair().await.unwrap(), "not repaired");
                assert!(cap.refuses_ipv6());
                cap.apply_sources(&served).await.unwrap();
                cap.apply(&want, &skip, &peers).await.unwrap();
                assert_refused("edge → the tunnel prefix, repaired", connect(at(LEAK, 80)));
                assert_eq!(accepted(&tcp), 1, "a refused connection reached the site");
                cap.teardown().await;
            })
        });
    }
}
