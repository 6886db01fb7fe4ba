//! Unit tests of the zone (which names, which answers) and of the query
//! handling before any socket (malformed input, truncation).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
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
        Outcome::Forward | Outcome::ForwardOr(_) => panic!("{name} {t} was forwarded"),
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
fn external_names_outside_the_cluster_are_forwarded_with_the_alias_to_fall_back_on() {
    let q = query("ext.shop.svc.cluster.local.", RecordType::A);
    let Outcome::ForwardOr(m) = zone().answer(&q) else {
        panic!("not forwarded")
    };
    let RData::CNAME(c) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(c.0.to_ascii(), "db.example.com.");
    // Whatever the type, in the answer section.
    let Outcome::ForwardOr(m) =
        zone().answer(&query("ext.shop.svc.cluster.local.", RecordType::SRV))
    else {
        panic!("not forwarded")
    };
    assert!(
        matches!(m.answers[..], [ref r] if matches!(r.data, RData::CNAME(_))),
        "{m:?}"
    );
    assert!(m.additionals.is_empty());
    // Asked for the CNAME itself: answered here, not followed, and a
    // positive answer (no SOA, as a NODATA would carry).
    let m = ask(&zone(), "ext.shop.svc.cluster.local.", RecordType::CNAME);
    assert!(
        matches!(m.answers[..], [ref r] if matches!(r.data, RData::CNAME(_))),
        "{m:?}"
    );
    assert!(m.authorities.is_empty(), "{m:?}");
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
        "10-244-7-5.nobody.pod.cluster.local.",
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
        Handled::Forward(..) => panic!("forwarded"),
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
    let whole = reply(handle(&s, &q, false));
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 100);
    // No EDNS: 512 bytes, the leading records that fit, TC set.
    let m = reply(handle(&s, &q, true));
    assert!(m.metadata.truncation);
    assert_eq!(m.queries.len(), 1);
    assert!((25..=30).contains(&m.answers.len()), "{}", m.answers.len());
    assert_eq!(m.answers[..], whole.answers[..m.answers.len()]);
}

#[test]
fn without_a_table_everything_is_forwarded() {
    let s = shared(None);
    let q = query("web.shop.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    assert!(matches!(handle(&s, &q, true), Handled::Forward(_, None)));
}

// On real sockets: a resolver on loopback, asked over UDP (and TCP), with
// a stand-in for the cluster DNS that records what it is asked.

/// The cluster DNS stand-in: answers `ext.shop.svc.cluster.local` A as
/// CoreDNS would (the alias, then the target's address 192.0.2.7), any
/// other question with A 192.0.2.1; or, `silent`, nothing (the cloud is
/// away).
struct Upstream {
    addr: std::net::SocketAddr,
    asked: Arc<std::sync::Mutex<Vec<(String, RecordType, DNSClass)>>>,
}

async fn upstream(silent: bool) -> Upstream {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(question) = q.queries.first().cloned() else {
                continue;
            };
            log.lock().unwrap().push((
                question.name().to_ascii().to_ascii_lowercase(),
                question.query_type(),
                question.query_class(),
            ));
            if silent {
                continue;
            }
            let mut m = Message::response(q.metadata.id, q.metadata.op_code);
            m.metadata.recursion_available = true;
            m.add_query(question.clone());
            let owner = question.name().clone();
            if owner
                .to_ascii()
                .eq_ignore_ascii_case("ext.shop.svc.cluster.local.")
            {
                let target = Name::from_ascii("db.example.com.").unwrap();
                m.add_answer(Record::from_rdata(
                    owner,
                    5,
                    RData::CNAME(CNAME(target.clone())),
                ));
                m.add_answer(Record::from_rdata(
                    target,
                    60,
                    RData::A(A::new(192, 0, 2, 7)),
                ));
            } else {
                m.add_answer(Record::from_rdata(
                    owner,
                    60,
                    RData::A(A::new(192, 0, 2, 1)),
                ));
            }
            let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
        }
    });
    Upstream { addr, asked }
}

impl Upstream {
    fn asked(&self) -> Vec<(String, RecordType, DNSClass)> {
        self.asked.lock().unwrap().clone()
    }
}

/// A resolver on loopback serving `services` (cluster.local), forwarding
/// to `up` within 300 ms.
async fn resolver(up: &Upstream, services: Vec<ServiceName>) -> super::Resolver {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let state =
        std::env::temp_dir().join(format!("edge-dns-unit-{}-{nanos}.json", std::process::id()));
    let mut c = super::DnsConfig::new(up.addr, state);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.forward_timeout = Duration::from_millis(300);
    let r = super::Resolver::spawn(c, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    r.replace_table("cluster.local", services);
    r
}

/// Sends `q` over UDP and waits (3 s at most) for the answer.
async fn over_udp(r: &super::Resolver, q: &Message) -> Message {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&q.to_vec().unwrap(), r.local_addr())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), s.recv_from(&mut buf))
        .await
        .expect("no answer within 3 s")
        .unwrap();
    assert!(n <= super::MAX_UDP_ANSWER, "{n} bytes over UDP");
    Message::from_vec(&buf[..n]).unwrap()
}

async fn udp(r: &super::Resolver, name: &str, t: RecordType) -> Message {
    over_udp(r, &query(name, t)).await
}

/// The answer section as text, `type data` per record.
fn texts(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| format!("{} {}", r.record_type(), r.data))
        .collect()
}

fn alias(name: &str, target: &str) -> ServiceName {
    svc(name, NameKind::ExternalName(target.into()), &[], vec![])
}

/// Stub resolvers (glibc, musl) do not chase a CNAME themselves: an
/// ExternalName answer must carry the target's addresses. A target in the
/// cluster is followed here (bounded, loops cut); one outside is forwarded
/// (the cluster DNS chases it), and with the cloud away the bare alias is
/// the answer.
#[tokio::test]
async fn external_names_are_followed_to_addresses() {
    let up = upstream(false).await;
    let mut table = sample();
    table.push(alias("ext-in", "web.shop.svc.cluster.local"));
    table.push(alias("ext-2", "ext-in.shop.svc.cluster.local."));
    table.push(alias("ext-gone", "nope.shop.svc.cluster.local"));
    table.push(alias("loop-a", "loop-b.shop.svc.cluster.local"));
    table.push(alias("loop-b", "loop-a.shop.svc.cluster.local"));
    let r = resolver(&up, table.clone()).await;

    let m = udp(&r, "ext-in.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        texts(&m),
        ["CNAME web.shop.svc.cluster.local.", "A 10.96.0.20"]
    );
    assert_eq!(m.answers[1].name.to_ascii(), "web.shop.svc.cluster.local.");
    let m = udp(&r, "ext-2.shop.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(
        texts(&m),
        [
            "CNAME ext-in.shop.svc.cluster.local.",
            "CNAME web.shop.svc.cluster.local.",
            "AAAA fd00::20"
        ]
    );
    // A target that does not exist: the alias, and NXDOMAIN for the end
    // of the chain (RFC 6604).
    let m = udp(&r, "ext-gone.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(texts(&m), ["CNAME nope.shop.svc.cluster.local."]);
    // A loop ends, with each alias once.
    let m = udp(&r, "loop-a.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(texts(&m).len(), 2, "{m:?}");
    assert!(up.asked().is_empty(), "{:?}", up.asked());

    // Outside the cluster: the cluster DNS's whole chain.
    let m = udp(&r, "ext.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(texts(&m), ["CNAME db.example.com.", "A 192.0.2.7"]);
    assert_eq!(up.asked()[0].0, "ext.shop.svc.cluster.local.");
    r.shutdown().await;

    // The cloud away: the bare alias, after the forward timeout.
    let away = upstream(true).await;
    let r = resolver(&away, table).await;
    let m = udp(&r, "ext.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(texts(&m), ["CNAME db.example.com."]);
    assert_eq!(away.asked().len(), 1);
    // In the cluster needs no cloud.
    let m = udp(&r, "ext-in.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(texts(&m).len(), 2);
    r.shutdown().await;
}

fn big(n: usize) -> ServiceName {
    let eps: Vec<NameEndpoint> = (0..n)
        .map(|i| ep(&format!("10.244.8.{i}"), None, &[80]))
        .collect();
    svc(
        "big",
        NameKind::Headless,
        &[("http", 80, NameProtocol::Tcp)],
        eps,
    )
}

/// A UDP answer too large for the client keeps the leading records that
/// fit, with TC: musl before 1.2.4 never retries over TCP and uses what
/// it got (as CoreDNS answers). The additional section goes first, and
/// alone costs no TC.
#[tokio::test]
async fn a_truncated_answer_keeps_the_records_that_fit() {
    let up = upstream(true).await;
    let r = resolver(&up, vec![big(100)]).await;
    // No EDNS: 512 bytes.
    let m = udp(&r, "big.shop.svc.cluster.local.", RecordType::A).await;
    assert!(m.metadata.truncation);
    assert!((25..=30).contains(&m.answers.len()), "{}", m.answers.len());
    let want: Vec<IpAddr> = (0..m.answers.len())
        .map(|i| format!("10.244.8.{i}").parse().unwrap())
        .collect();
    assert_eq!(addrs(&m), want, "the leading records, in order");
    // EDNS 4096: our limit, 1,232.
    let mut q = query("big.shop.svc.cluster.local.", RecordType::A);
    let mut e = hickory_proto::op::Edns::new();
    e.set_max_payload(4096);
    q.set_edns(e);
    let m = over_udp(&r, &q).await;
    assert!(m.metadata.truncation && m.edns.is_some());
    assert!((60..100).contains(&m.answers.len()), "{}", m.answers.len());
    // SRV: 100 records do not fit either; 7 endpoints' do without their
    // addresses (no TC then: a client can ask for those).
    let m = udp(
        &r,
        "_http._tcp.big.shop.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert!(m.metadata.truncation && !m.answers.is_empty());
    assert!(m.additionals.is_empty());
    r.shutdown().await;
    let r = resolver(&up, vec![big(7)]).await;
    let m = udp(
        &r,
        "_http._tcp.big.shop.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert!(!m.metadata.truncation);
    assert_eq!((m.answers.len(), m.additionals.len()), (7, 0));
    let mut q = query("_http._tcp.big.shop.svc.cluster.local.", RecordType::SRV);
    q.set_edns(hickory_proto::op::Edns::new());
    q.edns.as_mut().unwrap().set_max_payload(1232);
    let m = over_udp(&r, &q).await;
    assert_eq!(
        (m.answers.len(), m.additionals.len()),
        (7, 7),
        "room for all"
    );
    r.shutdown().await;
}

/// `a-b-c-d.ns.pod.<domain>` is answered from the name itself (CoreDNS's
/// default `pods insecure`), so it works with the cloud away.
#[tokio::test]
async fn pod_names_answer_their_address_without_the_cloud() {
    let up = upstream(true).await;
    let r = resolver(&up, sample()).await;
    let m = udp(&r, "10-244-7-5.shop.pod.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.244.7.5".parse::<IpAddr>().unwrap()]);
    let m = udp(&r, "10-244-7-5.shop.pod.cluster.local.", RecordType::AAAA).await;
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let m = udp(&r, "fd00--7-5.Shop.pod.cluster.local.", RecordType::AAAA).await;
    assert_eq!(addrs(&m), ["fd00::7:5".parse::<IpAddr>().unwrap()]);
    for bad in [
        "10-244-7.shop.pod.cluster.local.",
        "10-244-7-500.shop.pod.cluster.local.",
        "web.shop.pod.cluster.local.",
    ] {
        let m = udp(&r, bad, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{bad}");
    }
    let m = udp(&r, "shop.pod.cluster.local.", RecordType::A).await;
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert!(up.asked().is_empty(), "{:?}", up.asked());
    // A namespace the table knows no Service of may still have pods.
    let m = udp(&r, "10-244-7-5.other.pod.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(up.asked().len(), 1);
    r.shutdown().await;
}

/// The relay sends at most 100 endpoints and 32 ports per Service: a
/// per-pod or SRV name missing from a Service cut there may exist, so it
/// is forwarded rather than denied.
#[tokio::test]
async fn names_past_the_relays_caps_are_forwarded() {
    use relay_protocol::ServiceName as S;
    let up = upstream(false).await;
    let mut many_ports = svc(
        "ports",
        NameKind::ClusterIp(vec!["10.96.0.30".parse().unwrap()]),
        &[],
        vec![],
    );
    many_ports.ports = (0..S::MAX_PORTS)
        .map(|i| NamePort {
            name: format!("p{i}"),
            port: 1000 + i as u16,
            protocol: NameProtocol::Tcp,
        })
        .collect();
    let mut small = big(S::MAX_ENDPOINTS - 1);
    small.key.name = "small".into();
    let r = resolver(&up, vec![big(S::MAX_ENDPOINTS), small, many_ports]).await;
    let m = udp(&r, "10-244-9-1.big.shop.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addrs(&m), ["192.0.2.1".parse::<IpAddr>().unwrap()]);
    let m = udp(
        &r,
        "_more._tcp.ports.shop.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        up.asked().iter().map(|a| a.0.as_str()).collect::<Vec<_>>(),
        [
            "10-244-9-1.big.shop.svc.cluster.local.",
            "_more._tcp.ports.shop.svc.cluster.local."
        ]
    );
    // Held names still answer here; a Service below the cap is complete.
    let m = udp(&r, "10-244-8-7.big.shop.svc.cluster.local.", RecordType::A).await;
    assert!(m.metadata.authoritative && addrs(&m).len() == 1);
    let m = udp(
        &r,
        "10-244-9-1.small.shop.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.asked().len(), 2);
    r.shutdown().await;
}

fn with_edns(mut q: Message, version: u8, dnssec_ok: bool) -> Message {
    let mut e = hickory_proto::op::Edns::new();
    e.set_max_payload(1232);
    e.set_version(version);
    e.set_dnssec_ok(dnssec_ok);
    q.set_edns(e);
    q
}

/// EDNS (RFC 6891, RFC 3225): the DO bit is echoed, a version other than
/// 0 is answered BADVERS, and error answers carry an OPT record too.
#[tokio::test]
async fn edns_answers_echo_do_refuse_other_versions_and_keep_opt_in_errors() {
    let up = upstream(true).await;
    let r = resolver(&up, sample()).await;
    let q = query("web.shop.svc.cluster.local.", RecordType::A);
    let m = over_udp(&r, &with_edns(q.clone(), 0, true)).await;
    assert_eq!(addrs(&m).len(), 1);
    assert!(m.edns.as_ref().unwrap().flags().dnssec_ok);
    let m = over_udp(&r, &with_edns(q.clone(), 0, false)).await;
    assert!(!m.edns.as_ref().unwrap().flags().dnssec_ok);
    let m = over_udp(&r, &with_edns(q.clone(), 1, false)).await;
    // BADVERS is 16, which hickory reads back as its twin BADSIG.
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.answers.is_empty());
    assert_eq!(m.edns.as_ref().unwrap().version(), 0);
    let mut notify = with_edns(q.clone(), 0, true);
    notify.metadata.op_code = OpCode::Notify;
    let m = over_udp(&r, &notify).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert!(m.edns.as_ref().unwrap().flags().dnssec_ok, "{m:?}");
    // A failed forward's SERVFAIL too.
    let m = over_udp(
        &r,
        &with_edns(query("example.com.", RecordType::A), 0, false),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.edns.is_some());
    r.shutdown().await;
}

/// The table is class IN data: a cluster name asked in another class
/// goes to the upstream. The apex's SOA is an answer.
#[tokio::test]
async fn other_classes_are_forwarded_and_the_apex_soa_is_answered() {
    let up = upstream(false).await;
    let r = resolver(&up, sample()).await;
    let mut q = query("web.shop.svc.cluster.local.", RecordType::A);
    q.queries[0].set_query_class(DNSClass::CH);
    let m = over_udp(&r, &q).await;
    assert!(!m.metadata.authoritative);
    assert_eq!(
        up.asked(),
        [(
            "web.shop.svc.cluster.local.".to_string(),
            RecordType::A,
            DNSClass::CH
        )]
    );
    let m = udp(&r, "Cluster.Local.", RecordType::SOA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        matches!(m.answers[..], [ref s] if matches!(s.data, RData::SOA(_))
            && s.name.to_ascii() == "Cluster.Local."),
        "{m:?}"
    );
    assert!(m.authorities.is_empty());
    // Other types at the apex: NODATA as before.
    let m = udp(&r, "cluster.local.", RecordType::A).await;
    assert!(m.answers.is_empty());
    assert!(matches!(m.authorities[0].data, RData::SOA(_)));
    r.shutdown().await;
}

/// `ip` as its reverse name: `d.c.b.a.in-addr.arpa.` or 32 nibbles then
/// `ip6.arpa.` (what `dig -x` asks).
fn arpa(ip: &str) -> String {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|o| format!("{o:02x}")).collect();
            let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            format!("{}.ip6.arpa.", nibbles.join("."))
        }
    }
}

/// The PTR targets of an answer, as text.
fn ptrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::PTR(p) => p.0.to_ascii(),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Reverse lookups of the table's addresses answer at the edge, as
/// CoreDNS's do (`kubernetes … in-addr.arpa ip6.arpa`): a ClusterIP (either
/// family) gives the Service's name, a headless endpoint's address its
/// per-pod name under each Service it serves; so they work with the cloud
/// away. Before, every reverse name was forwarded (SERVFAIL here).
#[tokio::test]
async fn ptr_of_cluster_ips_and_endpoints_answers_without_the_cloud() {
    let away = upstream(true).await;
    let mut table = sample();
    // db-0's pod is also behind a second headless Service.
    table.push(svc(
        "db-peers",
        NameKind::Headless,
        &[],
        vec![ep("10.244.7.5", None, &[])],
    ));
    // A ClusterIP and a headless endpoint over IPv6.
    table.push(svc(
        "v6",
        NameKind::Headless,
        &[],
        vec![ep("fd00:244::6", None, &[])],
    ));
    let r = resolver(&away, table).await;
    for (ip, want) in [
        ("10.96.0.20", vec!["web.shop.svc.cluster.local."]),
        ("fd00::20", vec!["web.shop.svc.cluster.local."]),
        (
            "10.244.7.5",
            vec![
                "db-0.db.shop.svc.cluster.local.",
                "10-244-7-5.db-peers.shop.svc.cluster.local.",
            ],
        ),
        ("10.244.7.7", vec!["10-244-7-7.db.shop.svc.cluster.local."]),
        (
            "fd00:244::6",
            vec!["fd00-244--6.v6.shop.svc.cluster.local."],
        ),
    ] {
        let name = arpa(ip);
        let m = udp(&r, &name, RecordType::PTR).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{ip}");
        assert!(m.metadata.authoritative, "{ip}");
        let mut got = ptrs(&m);
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "{ip}");
        assert!(m
            .answers
            .iter()
            .all(|a| a.ttl == super::zone::TTL && a.name.to_ascii() == name));
    }
    // Case is the asker's (resolvers that randomise it check the echo).
    let upper = arpa("fd00::20").to_ascii_uppercase();
    let m = udp(&r, &upper, RecordType::PTR).await;
    assert_eq!(ptrs(&m), ["web.shop.svc.cluster.local."]);
    assert_eq!(m.answers[0].name.to_ascii(), upper);
    let m = udp(&r, "20.0.96.10.IN-ADDR.ARPA.", RecordType::PTR).await;
    assert_eq!(ptrs(&m), ["web.shop.svc.cluster.local."]);
    // The IPv4-mapped form of a ClusterIP names it too (CoreDNS reads it
    // as the IPv4 address).
    let m = udp(&r, &arpa("::ffff:10.96.0.20"), RecordType::PTR).await;
    assert_eq!(ptrs(&m), ["web.shop.svc.cluster.local."]);
    assert!(away.asked().is_empty(), "{:?}", away.asked());
    r.shutdown().await;
}

/// `name` with its labels taken as raw bytes (`+20` and `0/25` are no
/// host names, which `Name::from_ascii` refuses).
fn raw(name: &str) -> Name {
    let labels: Vec<&[u8]> = name
        .trim_end_matches('.')
        .split('.')
        .map(str::as_bytes)
        .collect();
    Name::from_labels(labels).unwrap()
}

/// Only PTR of an address the table holds is answered: an unknown
/// address, a partial or malformed reverse name, another type or class
/// falls through to the upstream (CoreDNS's `fallthrough in-addr.arpa
/// ip6.arpa`), which owns the rest of the reverse tree; a held address
/// beside them is still answered here.
#[tokio::test]
async fn other_reverse_names_fall_through_to_the_upstream() {
    let up = upstream(false).await;
    let r = resolver(&up, sample()).await;
    let v6 = arpa("fd00::20");
    let forwarded: Vec<(String, RecordType)> = vec![
        (arpa("10.96.0.99"), RecordType::PTR),
        (arpa("fd00::99"), RecordType::PTR),
        ("0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        ("in-addr.arpa.".into(), RecordType::PTR),
        ("020.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        ("+20.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        ("256.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        ("x.20.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        ("0/25.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        (v6[2..].to_string(), RecordType::PTR),
        (format!("0.{v6}"), RecordType::PTR),
        (v6.replacen('2', "g", 1), RecordType::PTR),
        (v6.replacen("2.", "22.", 1), RecordType::PTR),
        ("20.0.96.10.in-addr.arpa.".into(), RecordType::A),
        ("20.0.96.10.in-addr.arpa.".into(), RecordType::TXT),
    ];
    for (name, t) in &forwarded {
        let mut q = query(".", *t);
        q.queries[0].set_name(raw(name));
        let m = over_udp(&r, &q).await;
        assert!(!m.metadata.authoritative, "{name} {t}: answered here");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        // A held address, between them: here.
        let m = udp(&r, &arpa("10.96.0.20"), RecordType::PTR).await;
        assert_eq!(ptrs(&m), ["web.shop.svc.cluster.local."], "after {name}");
    }
    let mut ch = query(&arpa("10.96.0.20"), RecordType::PTR);
    ch.queries[0].set_query_class(DNSClass::CH);
    assert!(!over_udp(&r, &ch).await.metadata.authoritative);
    let mut want: Vec<(String, RecordType, DNSClass)> = forwarded
        .into_iter()
        .map(|(n, t)| (raw(&n).to_ascii().to_ascii_lowercase(), t, DNSClass::IN))
        .collect();
    want.push((arpa("10.96.0.20"), RecordType::PTR, DNSClass::CH));
    assert_eq!(up.asked(), want);
    r.shutdown().await;
}

/// Queries pipelined on one TCP connection (RFC 7766 6.2.1.1) are served
/// concurrently: a cluster name asked after a name whose forward hangs
/// (the cloud away) is answered at once, not after the forward's
/// timeout; and a client that closes its side after asking still gets
/// every answer. Before, the connection was served one query at a time.
#[tokio::test]
async fn pipelined_tcp_queries_are_not_held_up_by_a_forward() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that takes TCP connections and never answers (a
    // refused connection would fail the forward at once).
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let away = Upstream {
        addr: hang.local_addr().unwrap(),
        asked: Arc::default(),
    };
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = hang.accept().await {
            held.push(c);
        }
    });
    let r = resolver(&away, sample()).await;
    let mut s = tokio::net::TcpStream::connect(r.local_addr())
        .await
        .unwrap();
    let mut out = Vec::new();
    for (id, name) in [
        (1u16, "example.com."),
        (2, "web.shop.svc.cluster.local."),
        (3, "db-0.db.shop.svc.cluster.local."),
    ] {
        let mut q = query(name, RecordType::A);
        q.metadata.id = id;
        let b = q.to_vec().unwrap();
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(&b);
    }
    // All three in one write, then the client's side closed.
    s.write_all(&out).await.unwrap();
    s.shutdown().await.unwrap();
    let t = std::time::Instant::now();
    let mut got = Vec::new();
    for _ in 0..3 {
        let len = tokio::time::timeout(Duration::from_secs(3), s.read_u16())
            .await
            .expect("an answer within 3 s")
            .unwrap();
        let mut b = vec![0u8; usize::from(len)];
        s.read_exact(&mut b).await.unwrap();
        let m = Message::from_vec(&b).unwrap();
        got.push((m.metadata.id, m.metadata.response_code, t.elapsed()));
    }
    assert_eq!(
        got.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        [
            (2, ResponseCode::NoError),
            (3, ResponseCode::NoError),
            (1, ResponseCode::ServFail)
        ],
        "{got:?}"
    );
    // The local answers at once, the forward's SERVFAIL after its 300 ms.
    assert!(got[1].2 < Duration::from_millis(200), "{got:?}");
    assert!(got[2].2 >= Duration::from_millis(250), "{got:?}");
    // Everything answered: the resolver closes the connection.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
        .await
        .expect("closed after the last answer")
        .unwrap();
    assert_eq!(n, 0);
    r.shutdown().await;
}
