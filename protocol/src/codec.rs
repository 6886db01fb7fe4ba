//! The one module that knows the byte encoding: serde + bincode 2 with a
//! fixed configuration, inside length-delimited frames.
//!
//! A frame is a 4-byte big-endian length `n` followed by `n` bytes of
//! bincode (`standard()` configuration: little-endian, variable-length
//! integers). `n` is checked against [`MAX_FRAME_LEN`] *before* any buffer
//! is allocated, and bincode itself runs with the same byte limit, so a
//! hostile peer can make us allocate at most one frame's worth.
//!
//! Two ways to read frames, for two situations:
//! - [`read_frame`] reads exactly one frame and not a byte more. Used for a
//!   data stream's header, after which the stream carries raw bytes that
//!   must not be swallowed by a read-ahead buffer.
//! - [`frame_codec`] is a `tokio_util` codec for streams that carry frames
//!   only (the control stream). Its `FramedRead` is cancellation-safe, so it
//!   can sit in a `select!` loop, which `read_frame` cannot.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Largest frame body either side sends or accepts (64 KiB): far above any
/// real hello (thousands of routes), far below what would hurt the relay.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of length prefix in front of every frame body.
pub const FRAME_HEADER_LEN: usize = 4;

type Config = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_LEN>>;

/// The fixed bincode configuration. Changing it changes the wire format;
/// the golden tests in `tests/golden.rs` will say so.
const fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encoding or decoding a message body failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The message could not be encoded (it is larger than a frame).
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The bytes are not a valid message of the expected type.
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// A valid message was followed by bytes that belong to nothing
    /// (only from [`decode_exact`]).
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    /// The encoded message does not fit in a frame.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended cleanly before a frame started.
    #[error("stream closed")]
    Closed,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The announced length is above the limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame's body is not a valid message.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Encodes a message body (no length prefix).
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, CodecError> {
    let body = bincode::serde::encode_to_vec(msg, config())?;
    if body.len() > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(body)
}

/// Decodes a message body. Bytes after the message are ignored: they are
/// where a newer peer appends fields (see [`decode_with_rest`] and
/// `docs/architecture.md`, "Evolving the protocol"), so an older decoder
/// still reads the fields it knows.
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<M, CodecError> {
    decode_with_rest(body).map(|(msg, _)| msg)
}

/// Decodes a message body and returns the bytes after it: empty from a
/// peer of this version, appended fields from a newer one.
pub fn decode_with_rest<M: DeserializeOwned>(body: &[u8]) -> Result<(M, &[u8]), CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, config())?;
    Ok((msg, &body[used..]))
}

/// Decodes a message body that must end exactly where the message does
/// (fuzzing and tests that check an encoding is canonical).
pub fn decode_exact<M: DeserializeOwned>(body: &[u8]) -> Result<M, CodecError> {
    let (msg, rest) = decode_with_rest(body)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Reads the variant index at the start of an encoded enum (how bincode
/// writes every enum: a variable-length `u32`), so a receiver can tell a
/// message kind it does not know from a malformed one.
pub fn peek_variant(body: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(body, config())
        .ok()
        .map(|(v, _)| v)
}

/// A control frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message this build knows.
    Known {
        /// The message.
        msg: crate::Control,
        /// Bytes after it (fields appended by a newer peer), ignored.
        extra: usize,
    },
    /// A message kind added after this build (its variant index); the
    /// receiver ignores it and counts it.
    Unknown {
        /// The variant index.
        variant: u32,
    },
}

/// Decodes a control frame, telling a newer peer's message kinds from
/// garbage: a variant index past [`crate::Control::VARIANTS`] is
/// [`Incoming::Unknown`], anything else undecodable is an error.
pub fn decode_control(body: &[u8]) -> Result<Incoming, CodecError> {
    match peek_variant(body) {
        Some(variant) if variant >= crate::Control::VARIANTS => Ok(Incoming::Unknown { variant }),
        _ => {
            let (msg, rest) = decode_with_rest(body)?;
            Ok(Incoming::Known {
                msg,
                extra: rest.len(),
            })
        }
    }
}

/// Reads only the leading `u16` of a hello: the protocol version. Lets a
/// relay give a typed "unsupported version" answer to a hello whose other
/// fields it cannot decode.
pub fn peek_version(body: &[u8]) -> Option<u16> {
    bincode::serde::decode_from_slice::<u16, _>(body, config())
        .ok()
        .map(|(v, _)| v)
}

/// Encodes a message as a complete frame (length prefix + body).
pub fn encode_frame<M: Serialize>(msg: &M) -> Result<Bytes, CodecError> {
    let body = encode(msg)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    // encode() guarantees body.len() <= MAX_FRAME_LEN, which fits in u32.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out.into())
}

/// Writes one frame with a single `write_all`, so header and body leave in
/// one packet where the transport allows.
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
    M: Serialize,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame's body, exactly, refusing lengths above `max` before
/// allocating. Not cancellation-safe: use [`frame_codec`] inside `select!`.
pub async fn read_frame_bytes<R>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut len = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(body)
}

/// Reads and decodes one frame (see [`read_frame_bytes`]).
pub async fn read_frame<R, M>(r: &mut R) -> Result<M, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
    M: DeserializeOwned,
{
    let body = read_frame_bytes(r, MAX_FRAME_LEN).await?;
    Ok(decode(&body)?)
}

/// A `tokio_util` codec producing the same frames as [`encode_frame`], with
/// the length limit enforced on the header before buffering the body.
pub fn frame_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(FRAME_HEADER_LEN)
        .big_endian()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Initial read buffer of [`control_reader`]: control messages are small
/// (a ping is a few bytes), and the buffer grows to the frame being read.
pub const CONTROL_READ_CAPACITY: usize = 512;

/// Frames ([`frame_codec`]) read from a session's control stream, with a
/// small initial buffer: `FramedRead::new` starts at 8 KiB, which every
/// idle session would hold (7.3 KiB of the relay's ~75 KiB per idle
/// session, heap-profiled).
pub fn control_reader<R: AsyncRead>(r: R) -> FramedRead<R, LengthDelimitedCodec> {
    FramedRead::with_capacity(r, frame_codec(), CONTROL_READ_CAPACITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Control, StreamReply, StreamStatus};
    use futures_like::next_frame;

    /// Minimal `FramedRead` driver without pulling `futures` into the crate.
    mod futures_like {
        use bytes::BytesMut;
        use tokio_util::codec::Decoder;

        pub(super) fn next_frame(buf: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
            super::frame_codec().decode(buf)
        }
    }

    #[tokio::test]
    async fn frame_round_trip_and_no_over_read() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &StreamReply::ok()).await.unwrap();
        wire.extend_from_slice(b"raw bytes after the header");
        let mut r = &wire[..];
        let reply: StreamReply = read_frame(&mut r).await.unwrap();
        assert_eq!(reply.status, StreamStatus::Ok);
        // read_frame must leave the raw payload untouched.
        assert_eq!(r, b"raw bytes after the header");
    }

    #[tokio::test]
    async fn closed_truncated_and_oversized() {
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_frame::<_, Control>(&mut r).await,
            Err(FrameError::Closed)
        ));
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame::<_, Control>(&mut r).await,
            Err(FrameError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 9, 1];
        assert!(matches!(
            read_frame::<_, Control>(&mut r).await,
            Err(FrameError::Truncated)
        ));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<_, Control>(&mut r).await,
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
        let mut r: &[u8] = &[0, 0, 0, 100];
        assert!(matches!(
            read_frame_bytes(&mut r, 10).await,
            Err(FrameError::TooLarge { len: 100, max: 10 })
        ));
    }

    #[test]
    fn codec_agrees_with_encode_frame_and_limits() {
        let frame = encode_frame(&Control::Ping { nonce: 7 }).unwrap();
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let body = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(
            decode::<Control>(&body).unwrap(),
            Control::Ping { nonce: 7 }
        );
        let mut huge = bytes::BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(next_frame(&mut huge).is_err());
    }

    #[test]
    fn trailing_bytes_are_returned_not_rejected() {
        let mut body = encode(&Control::Pong { nonce: 1 }).unwrap();
        body.extend_from_slice(&[7, 8]);
        // A newer peer's appended fields: the known message still decodes.
        assert_eq!(
            decode::<Control>(&body).unwrap(),
            Control::Pong { nonce: 1 }
        );
        let (_, rest) = decode_with_rest::<Control>(&body).unwrap();
        assert_eq!(rest, &[7, 8]);
        assert!(matches!(
            decode_exact::<Control>(&body),
            Err(CodecError::TrailingBytes(2))
        ));
    }

    #[test]
    fn unknown_control_kinds_are_told_from_garbage() {
        // The first variant past this build's, with some payload: a newer
        // peer's message.
        let next = crate::Control::VARIANTS;
        assert_eq!(
            decode_control(&[next as u8, 1, 2, 3]).unwrap(),
            Incoming::Unknown { variant: next }
        );
        let mut body = encode(&Control::Ping { nonce: 5 }).unwrap();
        body.push(0xaa);
        assert_eq!(
            decode_control(&body).unwrap(),
            Incoming::Known {
                msg: Control::Ping { nonce: 5 },
                extra: 1
            }
        );
        // A known variant with a broken body is still an error.
        assert!(decode_control(&[2, 0xff]).is_err());
        assert!(decode_control(&[]).is_err());
    }

    #[test]
    fn variant_index_is_peeked() {
        let body = encode(&Control::Pong { nonce: 1 }).unwrap();
        assert_eq!(peek_variant(&body), Some(1));
        assert_eq!(peek_variant(&[]), None);
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let msg = Control::GoAway {
            reason: "x".repeat(MAX_FRAME_LEN + 1),
            grace_ms: 0,
        };
        assert!(encode(&msg).is_err());
    }
}
