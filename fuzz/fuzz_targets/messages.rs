//! Every bincode message decoder of the wire format on the same bytes:
//! `decode::<ClientHello | HelloReply | ServerHelloExt | StreamOpen |
//! StreamReply | CertRequest | CertReply | Cidr>`, `decode_control` (all
//! 13 `Control` kinds), `peek_version`, `peek_variant`, the datagram
//! header, and `ServerHelloExt` after an accepting `HelloReply` as the edge
//! reads it (`decode_with_rest`, then the rest).
//!
//! Properties: no panic; anything that decodes re-encodes (within a frame)
//! and decodes exactly to the same value, and that encoding is a fixed
//! point; the peeks agree with the full decoders; an unknown control kind
//! is one whose variant index is past `Control::VARIANTS`; a
//! `CertRequest`'s `Debug` does not depend on its token. On what decodes,
//! the first things the receivers do with it: the relay bounds a
//! `CaptureStatus` error (`EdgeCapture::reported`), the edge applies a
//! `ServiceDelta` to its table and builds its resolver's zone from a
//! `ServiceNames` (valid entries, clamped) and answers a query per name.
#![no_main]

use std::collections::BTreeMap;
use std::fmt::Debug;

use bytes::Bytes;
use edge_client::dns::zone::{Outcome, Zone};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;
use relay_protocol::bootstrap::{CertReply, CertRequest};
use relay_protocol::codec::{
    decode, decode_control, decode_exact, decode_with_rest, encode, peek_variant, peek_version,
};
use relay_protocol::datagram::{
    decode_datagram, encode_datagram, ShortDatagram, DATAGRAM_HEADER_LEN,
};
use relay_protocol::{
    Cidr, ClientHello, Control, HelloReply, Incoming, ServerHelloExt, ServiceName, StreamOpen,
    StreamReply, MAX_FRAME_LEN,
};
use relay_server::status::EdgeCapture;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as `M`; on success checks the round trip and returns it.
fn round_trip<M>(data: &[u8]) -> Option<M>
where
    M: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let (msg, rest) = decode_with_rest::<M>(data).ok()?;
    let used = data.len() - rest.len();
    assert!(used <= MAX_FRAME_LEN);
    let bytes = encode(&msg).expect("a decoded message re-encodes");
    // Canonical encodings are never longer than what was accepted.
    assert!(bytes.len() <= used, "{} > {used} for {msg:?}", bytes.len());
    let again: M = decode_exact(&bytes).expect("the re-encoding decodes");
    assert_eq!(again, msg);
    assert_eq!(encode(&again).expect("encodes"), bytes);
    Some(msg)
}

/// What the edge's resolver does with a `ServiceNames` frame (as
/// `NamesBatch::frame` then `Resolver::replace_table`): invalid entries
/// ignored, the rest clamped, a zone built; then one query per name.
fn names_zone(cluster_domain: &str, upsert: &[ServiceName]) {
    let mut kept = Vec::new();
    for s in upsert.iter().filter(|s| s.is_valid()) {
        let mut s = s.clone();
        s.clamp();
        assert!(s.is_valid(), "clamping made {s:?} invalid");
        assert!(s.ports.len() <= ServiceName::MAX_PORTS);
        assert!(s.endpoints.len() <= ServiceName::MAX_ENDPOINTS);
        kept.push(s);
    }
    let zone = Zone::new(cluster_domain, kept.iter().cloned(), 1);
    assert!(zone.len() <= kept.len());
    for s in kept.iter().take(4) {
        let name = format!("{}.{}.svc.{}.", s.key.name, s.key.namespace, zone.domain());
        let Ok(name) = Name::from_ascii(&name) else {
            continue;
        };
        for qtype in [RecordType::A, RecordType::SRV] {
            let mut q = Message::query();
            q.add_query(Query::query(name.clone(), qtype));
            if let Outcome::Answer(resp) = zone.answer(&q) {
                let _ = resp.to_vec();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Handshake, both ways.
    if let Some(hello) = round_trip::<ClientHello>(data) {
        assert_eq!(peek_version(data), Some(hello.version));
    }
    round_trip::<HelloReply>(data);
    if let Ok((HelloReply::Accepted(_), rest)) = decode_with_rest::<HelloReply>(data) {
        // The edge reads the extension from what follows the reply.
        if !rest.is_empty() {
            round_trip::<ServerHelloExt>(rest);
        }
    }
    round_trip::<ServerHelloExt>(data);

    // Data streams.
    round_trip::<StreamOpen>(data);
    round_trip::<StreamReply>(data);
    if let Some(c) = round_trip::<Cidr>(data) {
        assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
    }

    // Certificate bootstrap (the relay reads requests from peers with no
    // certificate; see also the `bootstrap` target).
    if let Some(req) = round_trip::<CertRequest>(data) {
        let same_size = CertRequest {
            token: "#".repeat(req.token.len()),
            ..req.clone()
        };
        assert_eq!(format!("{req:?}"), format!("{same_size:?}"));
    }
    round_trip::<CertReply>(data);

    // Control frames: known, unknown (newer peer) or an error.
    let control = round_trip::<Control>(data);
    match decode_control(data) {
        Ok(Incoming::Known { msg, extra }) => {
            assert_eq!(Some(&msg), control.as_ref());
            let used = data.len() - extra;
            assert_eq!(decode::<Control>(&data[..used]).ok(), Some(msg));
        }
        Ok(Incoming::Unknown { variant }) => {
            assert!(variant >= Control::VARIANTS);
            assert_eq!(peek_variant(data), Some(variant));
            assert!(control.is_none());
        }
        Err(_) => assert!(control.is_none()),
    }
    if control.is_some() {
        assert!(peek_variant(data).is_some_and(|v| v < Control::VARIANTS));
    }
    match &control {
        Some(Control::CaptureStatus { installed, error }) => {
            let kept = EdgeCapture::reported(*installed, error);
            assert!(kept.error.len() <= Control::MAX_CAPTURE_ERROR);
            assert_eq!(kept.installed, *installed);
            assert!(!kept.installed || kept.error.is_empty());
            assert!(error.trim().starts_with(kept.error.as_str()));
        }
        Some(
            msg @ Control::ServiceDelta {
                upsert,
                remove,
                complete,
                ..
            },
        ) => {
            let mut table = BTreeMap::new();
            assert_eq!(msg.apply_service_delta(&mut table), Some(*complete));
            for k in remove {
                assert!(table.contains_key(k) == upsert.iter().any(|p| p.key == *k));
            }
            for p in upsert {
                assert!(table.contains_key(&p.key));
            }
        }
        Some(Control::ServiceNames {
            cluster_domain,
            upsert,
            ..
        }) => names_zone(cluster_domain, upsert),
        _ => {}
    }

    // Datagram header.
    match decode_datagram(Bytes::copy_from_slice(data)) {
        Ok((flow, payload)) => {
            assert_eq!(&encode_datagram(flow, &payload)[..], data);
            assert_eq!(payload.len(), data.len() - DATAGRAM_HEADER_LEN);
        }
        Err(ShortDatagram(n)) => assert!(n == data.len() && n < DATAGRAM_HEADER_LEN),
    }
});
