//! Framing of UDP payloads carried as unreliable datagrams.
//!
//! A datagram is a 4-byte big-endian flow id followed by the payload. The
//! flow id names a UDP flow set up on a stream beforehand. Over QUIC the
//! datagram is sent as is; over the TCP fallback it is additionally length
//! prefixed on a dedicated stream. No bincode here: this is the hot path.
//!
//! A payload too large for one datagram (larger than the path's QUIC
//! datagram, as IP fragmentation would carry it) travels on its flow's
//! stream instead, between peers that announced
//! [`capability::UDP_STREAM_PAYLOADS`](crate::capability::UDP_STREAM_PAYLOADS):
//! a 2-byte big-endian length and the payload ([`encode_stream_payload`],
//! [`StreamPayloads`]). UDP payloads are at most 65,535 bytes, so every
//! length is valid and the stream needs no other framing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of header in front of every datagram payload.
pub const DATAGRAM_HEADER_LEN: usize = 4;

/// A datagram too short to hold its header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("datagram of {0} bytes is shorter than its {DATAGRAM_HEADER_LEN}-byte header")]
pub struct ShortDatagram(pub usize);

/// Builds a datagram from a flow id and a payload.
pub fn encode_datagram(flow_id: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(DATAGRAM_HEADER_LEN + payload.len());
    b.put_u32(flow_id);
    b.put_slice(payload);
    b.freeze()
}

/// Splits a received datagram into its flow id and payload (no copy).
pub fn decode_datagram(mut d: Bytes) -> Result<(u32, Bytes), ShortDatagram> {
    if d.len() < DATAGRAM_HEADER_LEN {
        return Err(ShortDatagram(d.len()));
    }
    let head = d.split_to(DATAGRAM_HEADER_LEN);
    let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    Ok((id, d))
}

/// Bytes of length in front of every payload on a flow's stream.
pub const STREAM_PAYLOAD_HEADER_LEN: usize = 2;

/// A UDP payload framed for its flow's stream: `None` when it is longer
/// than a UDP payload can be (65,535 bytes).
pub fn encode_stream_payload(payload: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(payload.len()).ok()?;
    let mut b = BytesMut::with_capacity(STREAM_PAYLOAD_HEADER_LEN + payload.len());
    b.put_u16(len);
    b.put_slice(payload);
    Some(b.freeze())
}

/// Reassembles payloads from the chunks a flow's stream delivers (a frame
/// may span chunks, a chunk may hold several frames). Holds at most one
/// partial frame plus one chunk.
#[derive(Debug, Default)]
pub struct StreamPayloads {
    buf: BytesMut,
}

impl StreamPayloads {
    /// Appends bytes read from the stream.
    pub fn extend(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete payload, if one is buffered.
    pub fn next_payload(&mut self) -> Option<Bytes> {
        if self.buf.len() < STREAM_PAYLOAD_HEADER_LEN {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if self.buf.len() < STREAM_PAYLOAD_HEADER_LEN + len {
            return None;
        }
        self.buf.advance(STREAM_PAYLOAD_HEADER_LEN);
        Some(self.buf.split_to(len).freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_payloads_golden_split_and_joined() {
        let a = encode_stream_payload(b"abc").unwrap();
        assert_eq!(&a[..], &[0, 3, b'a', b'b', b'c']);
        let big = vec![7u8; 65_535];
        let b = encode_stream_payload(&big).unwrap();
        assert_eq!(&b[..2], &[0xff, 0xff]);
        assert_eq!(encode_stream_payload(&vec![0u8; 65_536]), None);
        let empty = encode_stream_payload(b"").unwrap();
        // All three frames, delivered in awkward pieces: one byte, then
        // the rest of the first frame and part of the second, then the end.
        let wire: Vec<u8> = [&a[..], &b[..], &empty[..]].concat();
        let mut r = StreamPayloads::default();
        let mut got = Vec::new();
        for piece in [&wire[..1], &wire[1..4000], &wire[4000..]] {
            r.extend(piece);
            while let Some(p) = r.next_payload() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"abc");
        assert_eq!(&got[1][..], &big[..]);
        assert!(got[2].is_empty());
        assert_eq!(r.next_payload(), None);
    }

    #[test]
    fn golden_and_round_trip() {
        let d = encode_datagram(0x0102_0304, b"hi");
        assert_eq!(&d[..], &[1, 2, 3, 4, b'h', b'i']);
        let (id, p) = decode_datagram(d).unwrap();
        assert_eq!((id, &p[..]), (0x0102_0304, &b"hi"[..]));
        assert_eq!(
            decode_datagram(Bytes::from_static(&[1, 2, 3])),
            Err(ShortDatagram(3))
        );
        let (id, p) = decode_datagram(Bytes::from_static(&[0, 0, 0, 9])).unwrap();
        assert_eq!((id, p.len()), (9, 0));
    }
}
