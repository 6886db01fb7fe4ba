//! The edge's node-local resolver on a query from a pod (or anything that
//! reaches its address): the resolver's own decision
//! (`edge_client::dns::fuzzing::Handler`, which calls `dns::server::handle`,
//! the function the UDP and TCP loops call) on the bytes as a datagram
//! and as a TCP message, answering from a fixed table (every kind of
//! Service: ClusterIP with both families, headless with a named and an
//! unnamed endpoint, ExternalName), and for a forward what the client
//! gets when the upstream cannot be asked.
//!
//! Properties: no panic; every reply is a response with the query's id
//! that decodes again, and, when the query parsed, with its question;
//! nothing is sent only for bytes that are not a readable query; a UDP
//! answer to one question fits the client's size (512 bytes without
//! EDNS, at most `MAX_UDP_ANSWER`), a TCP one fits its 2-byte length.
#![no_main]

use std::sync::OnceLock;

use edge_client::dns::fuzzing::{Decision, Handler};
use edge_client::dns::zone::Zone;
use edge_client::dns::MAX_UDP_ANSWER;
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use relay_protocol::{NameEndpoint, NameKind, NamePort, NameProtocol, ServiceName, ServiceNameKey};

fn handler() -> &'static Handler {
    static HANDLER: OnceLock<Handler> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let key = |ns: &str, name: &str| ServiceNameKey {
            namespace: ns.into(),
            name: name.into(),
        };
        let port = |name: &str, port, protocol| NamePort {
            name: name.into(),
            port,
            protocol,
        };
        let services = vec![
            ServiceName {
                key: key("shop", "web"),
                kind: NameKind::ClusterIp(vec![
                    "10.96.0.20".parse().unwrap(),
                    "fd00:96::20".parse().unwrap(),
                ]),
                ports: vec![
                    port("http", 80, NameProtocol::Tcp),
                    port("", 8080, NameProtocol::Tcp),
                    port("dns", 53, NameProtocol::Udp),
                ],
                endpoints: vec![],
            },
            ServiceName {
                key: key("shop", "db"),
                kind: NameKind::Headless,
                ports: vec![port("pg", 5432, NameProtocol::Tcp)],
                endpoints: vec![
                    NameEndpoint {
                        ip: "10.244.7.5".parse().unwrap(),
                        hostname: Some("db-0".into()),
                        ports: vec![5433],
                    },
                    NameEndpoint {
                        ip: "fd00:244::6".parse().unwrap(),
                        hostname: None,
                        ports: vec![0],
                    },
                ],
            },
            ServiceName {
                key: key("kube-system", "ext"),
                kind: NameKind::ExternalName("db.example.com".into()),
                ports: vec![port("sctp", 9, NameProtocol::Sctp)],
                endpoints: vec![],
            },
        ];
        let z = Zone::new("cluster.local", services, 7);
        assert_eq!(z.len(), 3);
        Handler::new(Some(z))
    })
}

/// Checks one reply to `bytes` (`msg`: them parsed, if they parse).
fn check_reply(bytes: &[u8], msg: Option<&Message>, out: &[u8], udp: bool) {
    let back = Message::from_vec(out).expect("a reply decodes");
    assert_eq!(back.metadata.message_type, MessageType::Response);
    assert_eq!(back.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
    let Some(msg) = msg else {
        return;
    };
    assert_eq!(back.queries, msg.queries);
    if udp && msg.queries.len() == 1 {
        let limit = usize::from(msg.max_payload()).clamp(512, MAX_UDP_ANSWER);
        assert!(
            out.len() <= limit,
            "{} bytes over UDP, limit {limit}",
            out.len()
        );
    }
    assert!(out.len() <= usize::from(u16::MAX));
}

fuzz_target!(|bytes: &[u8]| {
    let msg = Message::from_vec(bytes).ok();
    let query = msg
        .as_ref()
        .is_some_and(|m| m.metadata.message_type == MessageType::Query);
    for udp in [true, false] {
        match handler().handle(bytes, udp) {
            Decision::Reply(out) => check_reply(bytes, msg.as_ref(), &out, udp),
            Decision::Forward { query: q, failed } => {
                // Only a readable query is forwarded, as it came.
                assert!(query, "forwarded what is not a query");
                assert_eq!(Some(&*q), msg.as_ref());
                let out = failed.expect("a failed forward answers");
                check_reply(bytes, msg.as_ref(), &out, udp);
            }
            // Never a readable query: only garbage and responses.
            Decision::Drop => assert!(!query, "a query left unanswered"),
        }
    }
});
