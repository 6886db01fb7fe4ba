//! Framing of UDP payloads carried as unreliable datagrams.
//!
//! A datagram is a 4-byte big-endian flow id followed by the payload. The
//! flow id names a UDP flow set up on a stream beforehand. Over QUIC the
//! datagram is sent as is; over the TCP fallback it is additionally length
//! prefixed on a dedicated stream. No bincode here: this is the hot path.

use bytes::{BufMut, Bytes, BytesMut};

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

#[cfg(test)]
mod tests {
    use super::*;

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
