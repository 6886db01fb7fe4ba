//! Golden bytes: the exact encoding of every message, frozen. If one of
//! these fails, the wire format changed: bump `PROTOCOL_VERSION`, keep the
//! old decoder if needed, and update the bytes deliberately.
//!
//! Also proptest round trips (`decode(encode(m)) == m`) and the framing
//! invariant (`frame.len() == 4 + body.len()`, length prefix correct).

use proptest::prelude::*;
use relay_protocol::codec::{decode, encode, encode_frame};
use relay_protocol::*;
use std::net::{IpAddr, SocketAddr};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// Every message type, with representative values, and its frozen body.
fn golden() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let hello = ClientHello {
        version: 1,
        node: "edge-1".into(),
        routes: vec![
            cidr("10.244.7.0/24"),
            cidr("192.168.1.10/32"),
            cidr("fd00::/64"),
        ],
        primary_addr: Some("192.168.1.10".parse().unwrap()),
        capabilities: capability::TCP_STREAMS | capability::UDP_DATAGRAMS,
        agent: "e/1".into(),
        fallbacks: 2,
    };
    let accepted = HelloReply::Accepted(ServerHello {
        session_id: 0x0102_0304,
        generation: 300,
        relay_id: "r0".into(),
        keepalive_ms: 5000,
        idle_timeout_ms: 20000,
        tunnel_routes: vec![cidr("10.96.0.0/12")],
        capabilities: 1,
    });
    let rejected = HelloReply::Rejected(Rejection {
        reason: RejectReason::IdentityMismatch,
        message: "no".into(),
        relay_version: 1,
        retry_after_ms: Some(1000),
    });
    let open = StreamOpen {
        target: Target::Addr(SocketAddr::new("10.244.7.5".parse().unwrap(), 8080)),
        source: Some("[fd00::1]:40000".parse().unwrap()),
        l4: L4::Tcp,
    };
    let open_name = StreamOpen {
        target: Target::Name {
            host: "edge-1".into(),
            port: 10250,
        },
        source: None,
        l4: L4::Tcp,
    };
    vec![
        (
            "ClientHello",
            encode(&hello).unwrap(),
            "0106656467652d3103000af407001800c0a8010a2001fd000000000000000000000000000000400100c0a8010a0303652f3102",
        ),
        (
            "HelloReply::Accepted",
            encode(&accepted).unwrap(),
            "00fc04030201fb2c01027230fb8813fb204e01000a6000000c01",
        ),
        ("HelloReply::Rejected", encode(&rejected).unwrap(), "0101026e6f0101fbe803"),
        ("Control::Ping", encode(&Control::Ping { nonce: 7 }).unwrap(), "0007"),
        ("Control::Pong", encode(&Control::Pong { nonce: 300 }).unwrap(), "01fb2c01"),
        (
            "Control::RouteUpdate",
            encode(&Control::RouteUpdate {
                tunnel_routes: vec![cidr("10.96.0.0/12")],
            })
            .unwrap(),
            "0201000a6000000c",
        ),
        (
            "Control::GoAway",
            encode(&Control::GoAway {
                reason: "bye".into(),
                grace_ms: 30000,
            })
            .unwrap(),
            "0303627965fb3075",
        ),
        (
            "Control::RouteDelta",
            encode(&Control::RouteDelta {
                reset: false,
                add: vec![cidr("10.96.0.0/12")],
                remove: vec![cidr("10.244.9.0/24")],
                complete: true,
            })
            .unwrap(),
            "040001000a6000000c01000af409001801",
        ),
        (
            "Control::ServedRoutes",
            encode(&Control::ServedRoutes {
                routes: vec![cidr("10.244.7.0/24")],
                primary_addr: Some("192.168.1.10".parse().unwrap()),
            })
            .unwrap(),
            "0501000af40700180100c0a8010a",
        ),
        (
            "Control::ServiceDelta",
            encode(&Control::ServiceDelta {
                reset: true,
                upsert: vec![ServicePort {
                    key: ServiceKey {
                        vip: "10.96.0.20:80".parse().unwrap(),
                        udp: false,
                    },
                    remote: true,
                    local: vec!["10.244.7.5:8080".parse().unwrap()],
                }],
                remove: vec![ServiceKey {
                    vip: "10.96.0.10:53".parse().unwrap(),
                    udp: true,
                }],
                complete: true,
            })
            .unwrap(),
            "060101000a60001450000101000af40705fb901f01000a60000a350101",
        ),
        (
            "Control::Replicas",
            encode(&Control::Replicas {
                replicas: vec![Replica {
                    id: "r-1".into(),
                    addr: "198.18.0.2:8443".into(),
                }],
            })
            .unwrap(),
            "070103722d310f3139382e31382e302e323a38343433",
        ),
        (
            "Control::ServiceNames",
            encode(&Control::ServiceNames {
                reset: true,
                cluster_domain: "c.l".into(),
                upsert: vec![
                    ServiceName {
                        key: ServiceNameKey { namespace: "ns".into(), name: "web".into() },
                        kind: NameKind::ClusterIp(vec!["10.96.0.20".parse().unwrap()]),
                        ports: vec![NamePort { name: "http".into(), port: 80, protocol: NameProtocol::Tcp }],
                        endpoints: vec![],
                    },
                    ServiceName {
                        key: ServiceNameKey { namespace: "ns".into(), name: "db".into() },
                        kind: NameKind::Headless,
                        ports: vec![NamePort { name: "".into(), port: 5432, protocol: NameProtocol::Udp }],
                        endpoints: vec![NameEndpoint {
                            ip: "10.244.7.5".parse().unwrap(),
                            hostname: Some("db-0".into()),
                            ports: vec![5433],
                        }],
                    },
                ],
                remove: vec![ServiceNameKey { namespace: "a".into(), name: "b".into() }],
                complete: true,
            })
            .unwrap(),
            "080103632e6c02026e73037765620001000a600014010468747470500000026e73026462010100fb38150101000af40705010464622d3001fb3915010161016201",
        ),
        (
            "Control::Keepalive",
            encode(&Control::Keepalive { interval_ms: 8000 }).unwrap(),
            "09fb401f",
        ),
        (
            "Control::LanOverlaps",
            encode(&Control::LanOverlaps {
                routes: vec![cidr("192.168.0.0/16")],
            })
            .unwrap(),
            "0a0100c0a8000010",
        ),
        (
            "Control::Moving",
            encode(&Control::Moving { nonce: 7 }).unwrap(),
            "0b07",
        ),
        (
            "Control::CaptureStatus(failing)",
            encode(&Control::CaptureStatus {
                installed: false,
                error: "nft".into(),
            })
            .unwrap(),
            "0c00036e6674",
        ),
        (
            "Control::CaptureStatus(installed)",
            encode(&Control::capture_status(true, "ignored")).unwrap(),
            "0c0100",
        ),
        (
            "ServerHelloExt",
            encode(&ServerHelloExt {
                served_routes: vec![cidr("10.244.7.0/24")],
                primary_addr: None,
            })
            .unwrap(),
            "01000af407001800",
        ),
        (
            "Rejection(unknown_node)",
            encode(&HelloReply::Rejected(Rejection {
                reason: RejectReason::UnknownNode,
                message: String::new(),
                relay_version: 1,
                retry_after_ms: None,
            }))
            .unwrap(),
            "0107000100",
        ),
        (
            "CertRequest",
            encode(&bootstrap::CertRequest {
                version: 1,
                node: "e".into(),
                token: "t".into(),
                public_key: vec![0xaa],
            })
            .unwrap(),
            "010165017401aa",
        ),
        (
            "CertReply::Issued",
            encode(&bootstrap::CertReply::Issued(bootstrap::IssuedCert {
                cert_pem: "P".into(),
                not_after_unix: 1000,
                relay_time_unix: 7,
            }))
            .unwrap(),
            "000150fbe80307",
        ),
        (
            "StreamOpen(addr)",
            encode(&open).unwrap(),
            "00000af40705fb901f0101fd000000000000000000000000000001fb409c00",
        ),
        ("StreamOpen(name)", encode(&open_name).unwrap(), "0106656467652d31fb0a280000"),
        (
            "StreamOpen(udp)",
            encode(&StreamOpen {
                target: Target::Addr("10.244.7.5:53".parse().unwrap()),
                source: None,
                l4: L4::Udp { flow: 0x8000_0001 },
            })
            .unwrap(),
            "00000af40705350001fc01000080",
        ),
        ("StreamReply::ok", encode(&StreamReply::ok()).unwrap(), "0000"),
        (
            "StreamReply::denied",
            encode(&StreamReply::fail(StreamStatus::Denied, "x")).unwrap(),
            "040178",
        ),
    ]
}

#[test]
fn every_message_encodes_to_its_golden_bytes() {
    let mut wrong = Vec::new();
    for (name, got, want) in golden() {
        if hex(&got) != want {
            wrong.push(format!("{name}: got {}, frozen {want}", hex(&got)));
        }
    }
    assert!(
        wrong.is_empty(),
        "wire format changed:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn golden_bytes_decode_back() {
    // Spot-check that the frozen bytes are also what we decode.
    let bytes = |h: &str| {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let g = golden();
    let hello: ClientHello = decode(&bytes(g[0].2)).unwrap();
    assert_eq!(hello.node, "edge-1");
    assert_eq!(hello.routes[2], cidr("fd00::/64"));
    let r: HelloReply = decode(&bytes(g[2].2)).unwrap();
    assert!(matches!(
        r,
        HelloReply::Rejected(Rejection {
            reason: RejectReason::IdentityMismatch,
            ..
        })
    ));
    assert_eq!(codec::peek_version(&bytes(g[0].2)), Some(1));
}

#[test]
fn frames_prefix_the_body_length() {
    let f = encode_frame(&Control::Ping { nonce: 7 }).unwrap();
    assert_eq!(hex(&f), "000000020007");
}

#[test]
fn invalid_cidrs_do_not_decode() {
    // 10.0.0.1/24 has host bits: a peer cannot smuggle a non-canonical route.
    let bad = [0x00, 10, 0, 0, 1, 24];
    assert!(decode::<Cidr>(&bad).is_err());
    let too_long = [0x00, 10, 0, 0, 0, 33];
    assert!(decode::<Cidr>(&too_long).is_err());
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn arb_cidr() -> impl Strategy<Value = Cidr> {
    (arb_ip(), any::<u8>()).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 33 } else { 129 };
        Cidr::containing(ip, len % max).unwrap()
    })
}

fn arb_target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (arb_ip(), any::<u16>()).prop_map(|(ip, p)| Target::Addr(SocketAddr::new(ip, p))),
        ("[a-z0-9.-]{0,64}", any::<u16>()).prop_map(|(host, port)| Target::Name { host, port }),
    ]
}

fn arb_status() -> impl Strategy<Value = StreamStatus> {
    prop::sample::select(StreamStatus::ALL.to_vec())
}

proptest! {
    #[test]
    fn hello_round_trips(
        version: u16,
        node in ".{0,64}",
        routes in prop::collection::vec(arb_cidr(), 0..50),
        primary in prop::option::of(arb_ip()),
        capabilities: u32,
        agent in ".{0,32}",
    ) {
        let h = ClientHello { version, node, routes, primary_addr: primary, capabilities, agent, fallbacks: capabilities.rotate_left(7) };
        let body = encode(&h).unwrap();
        prop_assert_eq!(decode::<ClientHello>(&body).unwrap(), h.clone());
        prop_assert_eq!(codec::peek_version(&body), Some(version));
        let frame = encode_frame(&h).unwrap();
        prop_assert_eq!(frame.len(), 4 + body.len());
        prop_assert_eq!(u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize, body.len());
    }

    #[test]
    fn stream_messages_round_trip(
        target in arb_target(),
        source in prop::option::of((arb_ip(), any::<u16>()).prop_map(|(i, p)| SocketAddr::new(i, p))),
        status in arb_status(),
        message in ".{0,100}",
    ) {
        let open = StreamOpen { target: target.clone(), source, l4: L4::Tcp };
        prop_assert_eq!(decode::<StreamOpen>(&encode(&open).unwrap()).unwrap(), open);
        let udp = StreamOpen { target, source, l4: L4::Udp { flow: status as u32 | EDGE_FLOW_BIT } };
        prop_assert_eq!(decode::<StreamOpen>(&encode(&udp).unwrap()).unwrap(), udp);
        let reply = StreamReply { status, message };
        prop_assert_eq!(decode::<StreamReply>(&encode(&reply).unwrap()).unwrap(), reply);
    }

    #[test]
    fn control_round_trips(nonce: u64, routes in prop::collection::vec(arb_cidr(), 0..20), reason in ".{0,50}", grace: u32) {
        for m in [
            Control::Ping { nonce },
            Control::Pong { nonce },
            Control::RouteUpdate { tunnel_routes: routes.clone() },
            Control::GoAway { reason: reason.clone(), grace_ms: grace },
            Control::ServedRoutes { routes: routes.clone(), primary_addr: None },
            Control::ServiceDelta {
                reset: nonce % 2 == 0,
                upsert: routes.iter().map(|c| ServicePort {
                    key: ServiceKey { vip: SocketAddr::new(c.addr(), grace as u16), udp: nonce % 3 == 0 },
                    remote: grace % 3 == 0,
                    local: vec![SocketAddr::new(c.addr(), 1)],
                }).collect(),
                remove: routes.iter().map(|c| ServiceKey { vip: SocketAddr::new(c.addr(), 53), udp: true }).collect(),
                complete: grace % 2 == 0,
            },
            Control::Replicas { replicas: vec![Replica { id: reason.clone(), addr: format!("r:{grace}") }] },
            Control::RouteDelta { reset: nonce % 2 == 0, add: routes.clone(), remove: routes.clone(), complete: grace % 2 == 0 },
            Control::CaptureStatus { installed: nonce % 2 == 0, error: reason.clone() },
            Control::capture_status(grace % 2 == 0, &reason),
        ] {

            prop_assert_eq!(decode::<Control>(&encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn garbage_never_panics_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ClientHello>(&bytes);
        let _ = decode::<HelloReply>(&bytes);
        let _ = decode::<Control>(&bytes);
        let _ = decode::<StreamOpen>(&bytes);
        let _ = decode::<StreamReply>(&bytes);
        let _ = codec::peek_version(&bytes);
    }
}

#[test]
fn a_full_route_delta_of_ipv6_prefixes_fits_a_frame() {
    let v6: Vec<Cidr> = (0..Control::MAX_ROUTES_PER_DELTA as u128)
        .map(|i| Cidr::new(IpAddr::V6((0xfd00u128 << 112 | i << 64).into()), 64).unwrap())
        .collect();
    let msg = Control::RouteDelta {
        reset: true,
        add: v6[..1000].to_vec(),
        remove: v6[1000..].to_vec(),
        complete: false,
    };
    let body = encode(&msg).unwrap();
    assert!(body.len() <= codec::MAX_FRAME_LEN, "{} bytes", body.len());
}

#[test]
fn route_deltas_split_any_change_into_bounded_frames() {
    let many: Vec<Cidr> = (0..10_000u32)
        .map(|i| Cidr::new(IpAddr::V4((0x0a00_0000 | i << 8).into()), 24).unwrap())
        .collect();
    let frames = Control::route_deltas(true, many[..7000].to_vec(), many[7000..].to_vec());
    let (mut added, mut removed, mut completes) = (Vec::new(), Vec::new(), 0);
    for (i, f) in frames.iter().enumerate() {
        let Control::RouteDelta {
            reset,
            add,
            remove,
            complete,
        } = f
        else {
            panic!("not a delta")
        };
        assert_eq!(*reset, i == 0, "only the first frame resets");
        assert!(add.len() + remove.len() <= Control::MAX_ROUTES_PER_DELTA);
        assert_eq!(
            *complete,
            i == frames.len() - 1,
            "only the last frame completes"
        );
        added.extend_from_slice(add);
        removed.extend_from_slice(remove);
        completes += usize::from(*complete);
        encode(f).unwrap();
    }
    assert_eq!(frames.len(), 5);
    assert_eq!(completes, 1);
    assert_eq!(added, many[..7000]);
    assert_eq!(removed, many[7000..]);
    // Removals lead: the first frame carries only removals here.
    let Control::RouteDelta { add, remove, .. } = &frames[0] else {
        unreachable!()
    };
    assert!(add.is_empty() && remove.len() == Control::MAX_ROUTES_PER_DELTA);
    assert_eq!(Control::route_deltas(false, vec![], vec![]).len(), 1);
}

/// What a peer one version older than this build sent and accepted is
/// frozen above; this checks the other direction of a rollout: frames a
/// newer peer may send (new message kinds, fields appended to known
/// messages) are read by this build without an error.
#[test]
fn newer_peers_frames_are_tolerated() {
    let mut hello = encode(&ClientHello {
        version: 1,
        node: "edge-1".into(),
        routes: vec![],
        primary_addr: None,
        capabilities: capability::ALL | 1 << 30,
        agent: "e/9".into(),
        fallbacks: 0,
    })
    .unwrap();
    hello.extend_from_slice(&[0x03, 0xaa, 0xbb, 0xcc]);
    let h: ClientHello = decode(&hello).unwrap();
    assert_eq!(h.node, "edge-1");
    let mut open = encode(&StreamOpen {
        target: Target::Addr("10.0.0.1:80".parse().unwrap()),
        source: None,
        l4: L4::Tcp,
    })
    .unwrap();
    open.push(0x42);
    assert!(decode::<StreamOpen>(&open).is_ok());
    assert_eq!(
        codec::decode_control(&[Control::VARIANTS as u8, 0, 1]).unwrap(),
        codec::Incoming::Unknown {
            variant: Control::VARIANTS
        }
    );
}

#[test]
fn service_deltas_stay_inside_a_frame() {
    // 3,000 IPv6 ports with the most local endpoints each: worst case.
    let port = |i: u32| ServicePort {
        key: ServiceKey {
            vip: SocketAddr::new(IpAddr::V6((0xfd00u128 << 112 | i as u128).into()), 443),
            udp: i.is_multiple_of(2),
        },
        remote: true,
        local: (0..100u16)
            .map(|p| SocketAddr::new(IpAddr::V6((0xfd01u128 << 112).into()), p))
            .collect(),
    };
    let upsert: Vec<ServicePort> = (0..3000).map(port).collect();
    let remove: Vec<ServiceKey> = (5000..9000).map(|i| port(i).key).collect();
    let frames = Control::service_deltas(true, upsert, remove.clone());
    assert!(frames.len() > 10, "{} frames", frames.len());
    let (mut ups, mut rms) = (0, Vec::new());
    for (i, f) in frames.iter().enumerate() {
        let body = encode(f).unwrap();
        assert!(
            body.len() <= codec::MAX_FRAME_LEN,
            "frame {i}: {} bytes",
            body.len()
        );
        let Control::ServiceDelta {
            reset,
            upsert,
            remove,
            complete,
        } = f
        else {
            panic!("not a service delta")
        };
        assert_eq!(*reset, i == 0);
        assert_eq!(*complete, i == frames.len() - 1);
        assert!(upsert
            .iter()
            .all(|p| p.local.len() == ServicePort::MAX_LOCAL));
        ups += upsert.len();
        rms.extend(remove.iter().copied());
    }
    assert_eq!((ups, rms), (3000, remove));
    assert_eq!(
        Control::service_deltas(false, Vec::new(), Vec::new()),
        vec![Control::ServiceDelta {
            reset: false,
            upsert: vec![],
            remove: vec![],
            complete: true
        }]
    );
}

#[test]
fn service_names_stay_inside_a_frame_and_cut_to_the_caps() {
    // 400 headless Services, each past the caps (200 endpoints with long
    // hostnames, 40 ports): worst case per entry.
    let label = |c: char, i: usize| format!("{}{i}", c.to_string().repeat(55));
    let svc = |i: usize| ServiceName {
        key: ServiceNameKey {
            namespace: label('n', i),
            name: label('s', i),
        },
        kind: NameKind::Headless,
        ports: (0..40)
            .map(|p| NamePort {
                name: label('p', p),
                port: p as u16,
                protocol: NameProtocol::Tcp,
            })
            .collect(),
        endpoints: (0..200)
            .map(|e| NameEndpoint {
                ip: IpAddr::V6((0xfd00u128 << 112 | e as u128).into()),
                hostname: Some(label('h', e)),
                ports: vec![65535; 40],
            })
            .collect(),
    };
    let mut bad = svc(9999);
    bad.key.name = "a.b".into();
    let mut upsert: Vec<ServiceName> = (0..400).map(svc).collect();
    upsert.push(bad);
    let remove: Vec<ServiceNameKey> = (0..3000).map(|i| svc(i).key).collect();
    let frames = Control::service_names(true, "cluster.local", upsert, remove.clone());
    let (mut ups, mut rms) = (0, Vec::new());
    for (i, f) in frames.iter().enumerate() {
        let body = encode(f).unwrap();
        assert!(
            body.len() <= codec::MAX_FRAME_LEN,
            "frame {i}: {} bytes",
            body.len()
        );
        let Control::ServiceNames {
            reset,
            cluster_domain,
            upsert,
            remove,
            complete,
        } = f
        else {
            panic!("not ServiceNames")
        };
        assert_eq!((*reset, *complete), (i == 0, i == frames.len() - 1));
        assert_eq!(cluster_domain, "cluster.local");
        for s in upsert {
            assert_eq!(s.ports.len(), ServiceName::MAX_PORTS);
            assert_eq!(s.endpoints.len(), ServiceName::MAX_ENDPOINTS);
            assert!(s
                .endpoints
                .iter()
                .all(|e| e.ports.len() == ServiceName::MAX_PORTS));
        }
        ups += upsert.len();
        rms.extend(remove.iter().cloned());
    }
    // The invalid name is left out; everything else arrives.
    assert_eq!((ups, rms), (400, remove));
    assert_eq!(Control::service_names(false, "c", vec![], vec![]).len(), 1);
}

proptest! {
    #[test]
    fn service_names_round_trip(
        reset: bool,
        complete: bool,
        domain in "[a-z.]{0,30}",
        names in prop::collection::vec(arb_service_name(), 0..8),
        remove in prop::collection::vec(("[a-z0-9-]{1,20}", "[a-z0-9-]{1,20}"), 0..8),
    ) {
        let remove: Vec<ServiceNameKey> = remove.into_iter().map(|(namespace, name)| ServiceNameKey { namespace, name }).collect();
        let m = Control::ServiceNames { reset, cluster_domain: domain.clone(), upsert: names.clone(), remove: remove.clone(), complete };
        prop_assert_eq!(decode::<Control>(&encode(&m).unwrap()).unwrap(), m);
        // The splitter keeps every valid entry and its own bound holds.
        for s in &names {
            prop_assert!(encode(s).unwrap().len() <= s.max_encoded_len());
        }
        let frames = Control::service_names(reset, &domain, names.clone(), remove.clone());
        let mut got = Vec::new();
        for f in &frames {
            let Control::ServiceNames { upsert, .. } = f else { unreachable!() };
            got.extend(upsert.iter().cloned());
            prop_assert!(encode(f).unwrap().len() <= codec::MAX_FRAME_LEN);
        }
        let want: Vec<ServiceName> = names
            .into_iter()
            .filter(ServiceName::is_valid)
            .map(|mut s| {
                s.clamp();
                s
            })
            .collect();
        prop_assert_eq!(got, want);
    }
}

fn arb_service_name() -> impl Strategy<Value = ServiceName> {
    let kind = prop_oneof![
        prop::collection::vec(arb_ip(), 0..3).prop_map(NameKind::ClusterIp),
        Just(NameKind::Headless),
        "[a-z.]{0,40}".prop_map(NameKind::ExternalName),
    ];
    let port = ("[a-z-]{0,15}", any::<u16>(), 0..3u8).prop_map(|(name, port, p)| NamePort {
        name,
        port,
        protocol: [NameProtocol::Tcp, NameProtocol::Udp, NameProtocol::Sctp][p as usize],
    });
    let ep = (
        arb_ip(),
        prop::option::of("[a-z0-9-]{0,10}"),
        prop::collection::vec(any::<u16>(), 0..4),
    )
        .prop_map(|(ip, hostname, ports)| NameEndpoint {
            ip,
            hostname,
            ports,
        });
    (
        "[a-z0-9-]{0,12}",
        "[a-z0-9-]{1,12}",
        kind,
        prop::collection::vec(port, 0..4),
        prop::collection::vec(ep, 0..6),
    )
        .prop_map(|(namespace, name, kind, ports, endpoints)| ServiceName {
            key: ServiceNameKey { namespace, name },
            kind,
            ports,
            endpoints,
        })
}

proptest! {
    #[test]
    fn service_names_never_panic_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut b = bytes;
        b.insert(0, 8);
        if let Ok(Control::ServiceNames { upsert, .. }) = decode::<Control>(&b) {
            for s in upsert {
                let _ = s.is_valid();
            }
        }
    }
}

#[test]
fn control_variant_indices_are_frozen() {
    // Index 7 is Replicas, 8 ServiceNames, 9 Keepalive, 10 LanOverlaps,
    // 11 Moving, 12 CaptureStatus: frozen once released.
    let m = Control::ServiceNames {
        reset: false,
        cluster_domain: String::new(),
        upsert: vec![],
        remove: vec![],
        complete: true,
    };
    assert_eq!(encode(&m).unwrap()[0], 8);
    let m = Control::Keepalive { interval_ms: 8000 };
    assert_eq!(encode(&m).unwrap()[0], 9);
    let m = Control::LanOverlaps { routes: vec![] };
    assert_eq!(encode(&m).unwrap()[0], 10);
    let m = Control::Moving { nonce: 1 };
    assert_eq!(encode(&m).unwrap()[0], 11);
    let m = Control::capture_status(false, "e");
    assert_eq!(encode(&m).unwrap()[0], 12);
    assert_eq!(Control::VARIANTS, 13);
}

/// An edge's capture report: the error is bounded (an `nft -f` failure
/// can quote a whole ruleset) at a character boundary, trimmed, and
/// empty while installed; the new bit is announced by this build and is
/// a bit of its own.
#[test]
fn capture_status_is_bounded_and_has_its_own_bit() {
    let long = format!(
        "  {}é{}\n",
        "x".repeat(Control::MAX_CAPTURE_ERROR - 1),
        "y".repeat(100)
    );
    let Control::CaptureStatus { installed, error } = Control::capture_status(false, &long) else {
        panic!("not CaptureStatus")
    };
    assert!(!installed);
    // "é" is two bytes straddling the bound: cut before it.
    assert_eq!(error, "x".repeat(Control::MAX_CAPTURE_ERROR - 1));
    let short = Control::capture_status(false, " nft: Operation not supported\n");
    assert_eq!(
        short,
        Control::CaptureStatus {
            installed: false,
            error: "nft: Operation not supported".into()
        }
    );
    assert_eq!(
        Control::capture_status(true, "old error"),
        Control::CaptureStatus {
            installed: true,
            error: String::new()
        }
    );
    // The longest report: the bound plus variant, flag and length (5).
    let m = Control::capture_status(false, &"\u{10ffff}".repeat(1000));
    assert!(encode(&m).unwrap().len() <= Control::MAX_CAPTURE_ERROR + 5);
    // The bit is frozen once released: the one after MOVES, announced
    // by this build.
    assert_eq!(capability::CAPTURE_STATUS, capability::MOVES << 1);
    assert_eq!(
        capability::ALL & capability::CAPTURE_STATUS,
        capability::CAPTURE_STATUS
    );
}
