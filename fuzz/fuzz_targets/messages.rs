//! Every message decoder of the wire format on the same bytes:
//! `decode::<ClientHello | HelloReply | StreamOpen | StreamReply | Cidr>`,
//! `decode_control`, `peek_version`, `peek_variant` and the datagram header.
//!
//! Properties: no panic; anything that decodes re-encodes (within a frame)
//! and decodes exactly to the same value, and that encoding is a fixed
//! point; the peeks agree with the full decoders; an unknown control kind
//! is one whose variant index is past `Control::VARIANTS`.
#![no_main]

use std::fmt::Debug;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_protocol::codec::{
    decode, decode_control, decode_exact, decode_with_rest, encode, peek_variant, peek_version,
};
use relay_protocol::datagram::{
    decode_datagram, encode_datagram, ShortDatagram, DATAGRAM_HEADER_LEN,
};
use relay_protocol::{
    Cidr, ClientHello, Control, HelloReply, Incoming, StreamOpen, StreamReply, MAX_FRAME_LEN,
};
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

fuzz_target!(|data: &[u8]| {
    if let Some(hello) = round_trip::<ClientHello>(data) {
        assert_eq!(peek_version(data), Some(hello.version));
    }
    round_trip::<HelloReply>(data);
    round_trip::<StreamOpen>(data);
    round_trip::<StreamReply>(data);
    if let Some(c) = round_trip::<Cidr>(data) {
        assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
    }

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

    // Datagram header.
    match decode_datagram(Bytes::copy_from_slice(data)) {
        Ok((flow, payload)) => {
            assert_eq!(&encode_datagram(flow, &payload)[..], data);
            assert_eq!(payload.len(), data.len() - DATAGRAM_HEADER_LEN);
        }
        Err(ShortDatagram(n)) => assert!(n == data.len() && n < DATAGRAM_HEADER_LEN),
    }
});
