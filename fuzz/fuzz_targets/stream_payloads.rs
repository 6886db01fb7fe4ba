//! UDP payloads carried on a flow's stream (`datagram::StreamPayloads`:
//! a 2-byte big-endian length, then the payload), reassembled from chunks
//! cut where the input says, as `transport::udp` reads a QUIC or yamux
//! stream chunk by chunk.
//!
//! Input: one byte `n` (how many cut sizes follow, `n % 16`), those `n`
//! bytes (chunk sizes, used in turn; 0 delivers an empty chunk), then the
//! bytes of the stream.
//!
//! Properties: no panic; whatever the cuts, the payloads are exactly those
//! a straight parse of the whole stream finds, each re-encodes
//! (`encode_stream_payload`) to its bytes on the stream, and an incomplete
//! frame at the end yields nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_protocol::datagram::{encode_stream_payload, StreamPayloads, STREAM_PAYLOAD_HEADER_LEN};

/// The payloads of `wire` parsed in one piece, and where parsing stopped.
fn straight(wire: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while wire.len() - at >= STREAM_PAYLOAD_HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([wire[at], wire[at + 1]]));
        let start = at + STREAM_PAYLOAD_HEADER_LEN;
        if wire.len() - start < len {
            break;
        }
        out.push(&wire[start..start + len]);
        at = start + len;
    }
    (out, at)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (cuts, wire) = rest.split_at(n);

    let mut frames = StreamPayloads::default();
    let mut got = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < wire.len() {
        // The cut sizes in turn; after them (or with none), the rest.
        let size = match cuts.get(i % cuts.len().max(1)) {
            Some(&c) if i < 4 * cuts.len() => usize::from(c),
            _ => wire.len() - at,
        };
        i += 1;
        let end = (at + size).min(wire.len());
        frames.extend(&wire[at..end]);
        at = end;
        while let Some(p) = frames.next_payload() {
            got.push(p);
        }
    }
    assert!(frames.next_payload().is_none());

    let (want, parsed) = straight(wire);
    assert_eq!(got.len(), want.len());
    let mut pos = 0;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[..], *w);
        let framed = encode_stream_payload(g).expect("a received payload fits a frame");
        assert_eq!(&framed[..], &wire[pos..pos + framed.len()]);
        pos += framed.len();
    }
    assert_eq!(pos, parsed);
});
