//! The frame codec: `read_frame_bytes` over an in-memory reader with a
//! fuzzed limit, and `frame_codec()` over a `BytesMut`, frame after frame.
//!
//! Properties: no panic; a frame body is never longer than the limit; no
//! single allocation made while decoding exceeds the frame limit (or 64
//! bytes of bookkeeping, for tiny limits; plus, for the codec, what the
//! input buffer itself already holds); both decoders agree frame by frame.
#![no_main]

use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_protocol::codec::{frame_codec, read_frame_bytes, FRAME_HEADER_LEN};
use relay_protocol::{FrameError, MAX_FRAME_LEN};
use tokio_util::codec::Decoder;

#[path = "watch_alloc.rs"]
mod watch_alloc;
use watch_alloc::{ARMED, LARGEST};

/// Allocations this small are bookkeeping, whatever the frame limit.
const SMALL: usize = 64;

/// Largest allocation made by `f`.
fn watched<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let out = f();
    ARMED.store(false, Ordering::Relaxed);
    (out, LARGEST.load(Ordering::Relaxed))
}

/// An in-memory reader never returns `Pending`, so one poll completes.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory read returned Pending"),
    }
}

fuzz_target!(|data: &[u8]| {
    // First two bytes: the caller's limit (0..=65535, clamped to
    // MAX_FRAME_LEN inside); the rest: the stream.
    let (limit, wire) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };

    // read_frame_bytes with the fuzzed limit, until the stream fails.
    let mut r = wire;
    loop {
        let (res, largest) = watched(|| now(read_frame_bytes(&mut r, limit)));
        // Beyond the body, only bookkeeping allocates (the boxed
        // `io::Error` of an early end of stream: 24 bytes).
        assert!(
            largest <= limit.min(MAX_FRAME_LEN).max(SMALL),
            "allocated {largest} bytes with a {limit}-byte limit"
        );
        match res {
            Ok(body) => assert!(body.len() <= limit.min(MAX_FRAME_LEN)),
            Err(FrameError::TooLarge { len, max }) => {
                assert!(len > max && max == limit.min(MAX_FRAME_LEN));
                break;
            }
            Err(FrameError::Closed | FrameError::Truncated) => break,
            Err(e) => panic!("unexpected error from an in-memory reader: {e}"),
        }
    }

    // The codec over a buffer holding the whole stream, frame by frame,
    // against read_frame_bytes at the protocol limit.
    let mut codec = frame_codec();
    let mut buf = BytesMut::from(wire);
    let mut r = wire;
    loop {
        let (res, largest) = watched(|| codec.decode(&mut buf));
        assert!(
            largest <= 2 * wire.len() + MAX_FRAME_LEN + FRAME_HEADER_LEN,
            "codec allocated {largest} bytes for a {}-byte input",
            wire.len()
        );
        let left = r.len();
        let direct = now(read_frame_bytes(&mut r, MAX_FRAME_LEN));
        match (res, direct) {
            (Ok(Some(frame)), Ok(body)) => {
                assert!(frame.len() <= MAX_FRAME_LEN);
                assert_eq!(&frame[..], &body[..]);
            }
            (Err(_), Err(FrameError::TooLarge { .. })) => break,
            (Ok(None), Err(end @ (FrameError::Closed | FrameError::Truncated))) => {
                // At the end of the stream the codec reports leftovers as
                // an error when read_frame_bytes saw a truncation, except
                // for a stream ending right after a frame header: the codec
                // has consumed the header and its buffer is empty, so
                // tokio-util's decode_eof sees a clean end (documented in
                // docs/fuzzing.md).
                let rest = codec.decode_eof(&mut buf);
                match end {
                    FrameError::Closed => assert!(matches!(rest, Ok(None)), "{rest:?}"),
                    _ if left == FRAME_HEADER_LEN => assert!(matches!(rest, Ok(None)), "{rest:?}"),
                    _ => assert!(rest.is_err(), "truncated, yet decode_eof: {rest:?}"),
                }
                break;
            }
            (c, d) => panic!("codec and read_frame_bytes disagree: {c:?} vs {d:?}"),
        }
    }
});
