//! Unit tests of the zone (which names, which answers) and of the query
//! handling before any socket (malformed input, truncation).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use relay_protocol::{NameEndpoint, NameKind, NamePort, NameProtocol, ServiceName, ServiceNameKey};
use tokio::sync::{watch, Semaphore};

use super::server::{handle, DnsStats, Handled, Shared};
use super::zone::{Outcome, Zone};

fn svc(
    name: &str,
    kind: NameKind,
    ports: &[(&str, u16, NameProtocol)],
    eps: Vec<NameEndpoint>,
) -> ServiceName {
    ServiceName {
        key: ServiceNameKey {
            namespace: "shop".into(),
            name: name.into(),
        },
        kind,
        ports: ports
            .iter()
            .map(|(n, p, proto)| NamePort {
                name: n.to_string(),
                port: *p,
                protocol: *proto,
            })
            .collect(),
        endpoints: eps,
    }
}

fn ep(ip: &str, hostname: Option<&str>, ports: &[u16]) -> NameEndpoint {
    NameEndpoint {
        ip: ip.parse().unwrap(),
        hostname: hostname.map(String::from),
        ports: ports.to_vec(),
    }
}

/// The table the tests (and the integration test's expectations) use.
pub(crate) fn sample() -> Vec<ServiceName> {
    use NameProtocol::*;
    vec![
        svc(
            "web",
            NameKind::ClusterIp(vec![
                "10.96.0.20".parse().unwrap(),
                "fd00::20".parse().unwrap(),
            ]),
            &[("http", 80, Tcp), ("dns", 53, Udp), ("", 9000, Tcp)],
            vec![],
        ),
        svc(
            "db",
            NameKind::Headless,
            &[("pg", 5432, Tcp)],
            vec![
                ep("10.244.7.5", Some("db-0"), &[5432]),
                ep("10.244.7.6", Some("db-1"), &[5433]),
                ep("10.244.7.7", None, &[5432]),
            ],
        ),
        svc(
            "ext",
            NameKind::ExternalName("db.example.com".into()),
            &[],
            vec![],
        ),
    ]
}

fn zone() -> Zone {
    Zone::new("cluster.local", sample(), 7)
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

fn ask(z: &Zone, name: &str, t: RecordType) -> Message {
    match z.answer(&query(name, t)) {
        Outcome::Answer(m) => m,
        Outcome::Forward => panic!("{name} {t} was forwarded"),
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
}

#[test]
fn cluster_ip_services_answer_their_address_per_family() {
    let z = zone();
    let m = ask(&z, "web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_available);
    assert_eq!(addrs(&m), ["10.96.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.answers[0].ttl, super::zone::TTL);
    let m = ask(&z, "web.shop.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(addrs(&m), ["fd00::20".parse::<IpAddr>().unwrap()]);
    // Names are case-insensitive; the answer keeps the asker's spelling
    // (resolvers that randomise case check it).
    let m = ask(&z, "WEB.Shop.SVC.cluster.LOCAL.", RecordType::A);
    assert_eq!(addrs(&m).len(), 1);
    assert_eq!(m.answers[0].name.to_ascii(), "WEB.Shop.SVC.cluster.LOCAL.");
    // A type the name has no data of: NODATA with the SOA.
    let m = ask(&z, "web.shop.svc.cluster.local.", RecordType::MX);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert!(matches!(m.authorities[0].data, RData::SOA(_)));
}

#[test]
fn headless_services_answer_their_endpoints_and_per_pod_names() {
    let z = zone();
    let m = ask(&z, "db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m).len(), 3);
    let m = ask(&z, "db-1.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), ["10.244.7.6".parse::<IpAddr>().unwrap()]);
    // No hostname: the address with dashes, as CoreDNS names it.
    let m = ask(&z, "10-244-7-7.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), ["10.244.7.7".parse::<IpAddr>().unwrap()]);
    let m = ask(&z, "db-9.db.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Per-pod names exist only under headless Services.
    let m = ask(&z, "db-0.web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn a_headless_service_without_ports_answers_addresses_and_no_srv() {
    let z = Zone::new(
        "cluster.local",
        vec![svc(
            "peers",
            NameKind::Headless,
            &[],
            vec![
                ep("10.244.7.8", Some("peers-0"), &[]),
                ep("10.244.8.8", None, &[]),
            ],
        )],
        7,
    );
    let m = ask(&z, "peers.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(
        addrs(&m),
        [
            "10.244.7.8".parse::<IpAddr>().unwrap(),
            "10.244.8.8".parse().unwrap()
        ]
    );
    let m = ask(&z, "peers-0.peers.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), ["10.244.7.8".parse::<IpAddr>().unwrap()]);
    // No port, no SRV record: NODATA.
    let m = ask(&z, "peers.shop.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
}

#[test]
fn srv_names_give_ports_and_targets() {
    let z = zone();
    let m = ask(
        &z,
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(m.answers.len(), 1);
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(
        (srv.port, srv.target.to_ascii().as_str()),
        (80, "web.shop.svc.cluster.local.")
    );
    // The target's addresses ride along in the additional section.
    assert_eq!(m.additionals.len(), 2, "{:?}", m.additionals);
    // The wrong protocol, or no such port: NXDOMAIN.
    for n in [
        "_http._udp.web.shop.svc.cluster.local.",
        "_x._tcp.web.shop.svc.cluster.local.",
    ] {
        assert_eq!(
            ask(&z, n, RecordType::SRV).metadata.response_code,
            ResponseCode::NXDomain,
            "{n}"
        );
    }
    // Headless: one record per endpoint, with that endpoint's target port.
    let m = ask(&z, "_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV);
    let mut got: Vec<(u16, String)> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.port, s.target.to_ascii()),
            other => panic!("{other:?}"),
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (5432, "10-244-7-7.db.shop.svc.cluster.local.".to_string()),
            (5432, "db-0.db.shop.svc.cluster.local.".to_string()),
            (5433, "db-1.db.shop.svc.cluster.local.".to_string()),
        ]
    );
    assert_eq!(m.additionals.len(), 3);
    // SRV on the Service name itself: every named port (the unnamed one
    // has no SRV name).
    assert_eq!(
        ask(&z, "web.shop.svc.cluster.local.", RecordType::SRV)
            .answers
            .len(),
        2
    );
}

#[test]
fn external_names_are_aliases() {
    let m = ask(&zone(), "ext.shop.svc.cluster.local.", RecordType::A);
    let RData::CNAME(c) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(c.0.to_ascii(), "db.example.com.");
    // Whatever the type, in the answer section.
    let m = ask(&zone(), "ext.shop.svc.cluster.local.", RecordType::SRV);
    assert!(
        matches!(m.answers[..], [ref r] if matches!(r.data, RData::CNAME(_))),
        "{m:?}"
    );
    assert!(m.additionals.is_empty());
}

#[test]
fn unknown_cluster_names_are_nxdomain_and_the_rest_is_forwarded() {
    let z = zone();
    for n in [
        "nope.shop.svc.cluster.local.",
        "web.other.svc.cluster.local.",
        "other.svc.cluster.local.",
        "foo.cluster.local.",
        // What a pod's search list makes of outside names (ndots:5).
        "example.com.shop.svc.cluster.local.",
        "example.com.svc.cluster.local.",
        "example.com.cluster.local.",
    ] {
        let m = ask(&z, n, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{n}");
        assert!(
            matches!(m.authorities[0].data, RData::SOA(_)),
            "{n}: negative answers carry the SOA"
        );
    }
    for n in [
        "cluster.local.",
        "svc.cluster.local.",
        "shop.svc.cluster.local.",
    ] {
        let m = ask(&z, n, RecordType::A);
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0),
            "{n}"
        );
    }
    for n in [
        "example.com.",
        "10-244-7-5.shop.pod.cluster.local.",
        "xcluster.local.",
        "local.",
        ".",
    ] {
        assert!(
            matches!(z.answer(&query(n, RecordType::A)), Outcome::Forward),
            "{n}"
        );
    }
    // Another cluster domain.
    let z = Zone::new("corp.example", sample(), 1);
    assert_eq!(
        addrs(&ask(&z, "web.shop.svc.corp.example.", RecordType::A)).len(),
        1
    );
    assert!(matches!(
        z.answer(&query("web.shop.svc.cluster.local.", RecordType::A)),
        Outcome::Forward
    ));
}

fn shared(zone: Option<Zone>) -> Shared {
    Shared {
        zone: watch::Sender::new(zone.map(Arc::new)),
        upstream: "127.0.0.1:9".parse().unwrap(),
        forward_timeout: Duration::from_secs(1),
        forwards: Arc::new(Semaphore::new(1)),
        stats: Arc::new(DnsStats::default()),
        clients: std::sync::RwLock::new(None),
    }
}

fn reply(h: Handled) -> Message {
    match h {
        Handled::Reply(b) => Message::from_vec(&b).unwrap(),
        Handled::Forward(_) => panic!("forwarded"),
        Handled::Drop => panic!("dropped"),
    }
}

/// Once the edge's clients are known, a peer that is neither one of them
/// nor this node (a device on the site's LAN) may not ask; before, anyone
/// may.
#[test]
fn only_this_node_and_its_clients_may_ask() {
    use super::server::may_ask;
    let s = shared(None);
    let lan: std::net::IpAddr = "192.0.2.50".parse().unwrap();
    let pod: std::net::IpAddr = "10.244.7.5".parse().unwrap();
    assert!(may_ask(&s, lan), "clients not known yet");
    *s.clients.write().unwrap() = Some(Arc::new(vec!["10.244.7.0/24".parse().unwrap()]));
    assert!(!may_ask(&s, lan));
    assert!(may_ask(&s, pod));
    assert!(may_ask(&s, "::ffff:10.244.7.5".parse().unwrap()));
    assert!(may_ask(&s, "127.0.0.1".parse().unwrap()));
}

#[test]
fn bad_input_gets_formerr_or_nothing_never_a_panic() {
    let s = shared(Some(zone()));
    // A readable query header, then garbage: FORMERR with the same id.
    let mut b = query("web.shop.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    b[0..2].copy_from_slice(&0x1234u16.to_be_bytes());
    b.truncate(20);
    let m = reply(handle(&s, &b, true));
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // Too short for a header, or a response: dropped.
    assert!(matches!(handle(&s, &[1, 2, 3], true), Handled::Drop));
    let mut resp = query("web.shop.svc.cluster.local.", RecordType::A);
    resp.metadata.message_type = MessageType::Response;
    assert!(matches!(
        handle(&s, &resp.to_vec().unwrap(), true),
        Handled::Drop
    ));
    // Two questions: FORMERR; another opcode: NOTIMP.
    let mut two = query("web.shop.svc.cluster.local.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("db.shop.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        reply(handle(&s, &two.to_vec().unwrap(), true))
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let mut notify = query("web.shop.svc.cluster.local.", RecordType::A);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        reply(handle(&s, &notify.to_vec().unwrap(), true))
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    // Random bytes of every length: whatever happens, no panic.
    let mut x: u32 = 0x9e37_79b9;
    for len in 0..600 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = handle(&s, &bytes, true);
    }
}

#[test]
fn big_udp_answers_are_truncated_and_whole_over_tcp() {
    let eps: Vec<NameEndpoint> = (0..100u8)
        .map(|i| ep(&format!("10.244.8.{i}"), None, &[80]))
        .collect();
    let big = svc(
        "big",
        NameKind::Headless,
        &[("http", 80, NameProtocol::Tcp)],
        eps,
    );
    let s = shared(Some(Zone::new("cluster.local", [big], 1)));
    let q = query("big.shop.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    let m = reply(handle(&s, &q, true));
    assert!(m.metadata.truncation && m.answers.is_empty());
    assert_eq!(m.queries.len(), 1);
    let m = reply(handle(&s, &q, false));
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
}

#[test]
fn without_a_table_everything_is_forwarded() {
    let s = shared(None);
    let q = query("web.shop.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    assert!(matches!(handle(&s, &q, true), Handled::Forward(_)));
}
