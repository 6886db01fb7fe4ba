//! The edge's node-local resolver on a query from a pod (or anything that
//! reaches its address): hickory's `Message::from_vec`, then what
//! `dns::server::handle` and `reply` do with it (crate-private, so
//! mirrored here step by step): FORMERR for an unreadable query with a
//! readable header, nothing for a response, NOTIMP for another opcode,
//! FORMERR unless exactly one question, else `Zone::answer` from a fixed
//! table (every kind of Service: ClusterIP with both families, headless
//! with a named and an unnamed endpoint, ExternalName), encoded, with an
//! OPT record when the query had one, truncated past the UDP limit.
//!
//! Properties: no panic; a local answer is a response with the query's id
//! and question; every answer the resolver would send encodes, and a
//! local answer decodes again.
#![no_main]

use std::sync::OnceLock;

use edge_client::dns::zone::{Outcome, Zone};
use edge_client::dns::MAX_UDP_ANSWER;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use libfuzzer_sys::fuzz_target;
use relay_protocol::{NameEndpoint, NameKind, NamePort, NameProtocol, ServiceName, ServiceNameKey};

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
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
        z
    })
}

/// `server::reply`: the bytes sent for a local answer.
fn reply(query: &Message, mut resp: Message) -> Option<Vec<u8>> {
    if query.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP_ANSWER as u16);
        resp.set_edns(e);
    }
    let bytes = resp.to_vec().expect("a local answer encodes");
    let limit = usize::from(query.max_payload()).clamp(512, MAX_UDP_ANSWER);
    if bytes.len() > limit {
        return Some(
            resp.truncate()
                .to_vec()
                .expect("a truncated answer encodes"),
        );
    }
    Some(bytes)
}

/// `server::error`: an error answer with the query's question.
fn error(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.iter().cloned());
    m.to_vec().expect("an error answer encodes")
}

fuzz_target!(|bytes: &[u8]| {
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            if bytes.len() >= 12 && bytes[2] & 0x80 == 0 {
                let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .expect("FORMERR encodes");
            }
            return;
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return;
    }
    if msg.metadata.op_code != OpCode::Query {
        error(&msg, ResponseCode::NotImp);
        return;
    }
    if msg.queries.len() != 1 {
        error(&msg, ResponseCode::FormErr);
        return;
    }
    match zone().answer(&msg) {
        // A forward's fallback (an ExternalName's bare alias, sent when the
        // upstream cannot be asked) is an answer like the others.
        Outcome::Answer(resp) | Outcome::ForwardOr(resp) => {
            assert_eq!(resp.metadata.id, msg.metadata.id);
            assert_eq!(resp.metadata.message_type, MessageType::Response);
            assert_eq!(resp.queries, msg.queries);
            if let Some(out) = reply(&msg, resp) {
                let back = Message::from_vec(&out).expect("our answer decodes");
                assert_eq!(back.metadata.id, msg.metadata.id);
            }
        }
        Outcome::Forward => {
            // Forwarded as received; a failed forward answers SERVFAIL.
            error(&msg, ResponseCode::ServFail);
        }
    }
});
