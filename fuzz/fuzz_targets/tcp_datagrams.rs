//! The TCP fallback's datagram stream as the relay reads it from an edge:
//! `tcp::YamuxConn::start` (the relay's side: it accepts the first stream
//! and checks its one-byte mark, `DATAGRAM_STREAM_MARK`), the datagram
//! reader it spawns (`tcp/driver.rs`, `datagram_reader`: a 2-byte
//! big-endian length, then that many bytes, again and again) and what the
//! sessions run on what it delivers, `udp::pump_datagrams` into a
//! `udp::FlowTable` (`FlowTable::dispatch`: `decode_datagram`, the flow
//! id, the flow's queue). All through public APIs: the fuzz input is the
//! stream's content, carried in hand-made yamux frames over an in-memory
//! pipe, exactly as a peer's yamux would send it.
//!
//! Input: byte 0 says how the stream arrives (bits 0-6: `n`, the stream
//! cut into yamux data frames of `n` bytes, or one frame for 0; bit 7: the
//! stream ends with a reset rather than a FIN); the rest is the stream:
//! the mark, then datagrams (2-byte length, 4-byte flow id, payload).
//!
//! Properties: no panic; the set-up succeeds exactly when the stream
//! starts with the mark; the pump ends once the stream ends (whatever it
//! held: a truncated last datagram is dropped); a length over
//! `MAX_TCP_DATAGRAM` (65,507) is refused, its bytes skipped, and counted
//! (`YamuxConn::datagrams_refused_oversize`: exactly the over-long lengths
//! read, the last one counted even when the stream ends inside it), the
//! stream going on; every complete datagram within the bound is delivered
//! to its flow, in order, a short one or an unknown flow's counted as
//! `dropped_unknown_flow`, one past a flow's queue of 256 as
//! `dropped_queue_full`, and so is one the reader dropped because the
//! connection's queue of 1,024 received datagrams was full (as a full
//! socket buffer would drop it; counted by the reader,
//! `YamuxConn::datagrams_dropped_queue_full`, and added by the pump): so
//! delivered + `dropped_unknown_flow` + `dropped_queue_full` is exactly
//! the number of datagrams sent, whatever the timing; the connection's
//! queue drops none of 1,024 or fewer, and when it dropped none delivery
//! and counts are exact per flow (otherwise each flow gets a subsequence
//! of its datagrams, in order, within the bounds those drops allow); no
//! single allocation exceeds the reader's bound of one
//! datagram of `MAX_TCP_DATAGRAM` bytes while the connection runs (an
//! over-long one is skipped without a buffer of its size).
//!
//! The stream ending while the connection stays up (every marked input
//! here) makes the reader close the connection ("peer ended the datagram
//! stream") once 3 s have passed without the connection ending of itself
//! (`tcp::mux`'s unit test
//! `a_peer_ending_the_datagram_stream_closes_the_connection`); the pump
//! returns once the connection has closed, so the target shortens that
//! grace to 10 ms (`tcp::set_datagram_stream_grace`, hidden, for this
//! target only) rather than wait 3 s per input.
//!
//! A stream without the mark is refused by the set-up, which then waits up
//! to 500 ms for the connection to end to report why: for those inputs the
//! edge's end of the pipe is closed once the frames are written, so the
//! wait ends at once (for the others it stays open: the connection is up
//! and only the datagram stream ends). A pump that did not end within 10 s
//! would be a panic, not a hang. `FUZZ_DEBUG=1` prints what
//! each input did.
#![no_main]

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_protocol::EDGE_FLOW_BIT;
use relay_transport::tcp::{YamuxConn, DATAGRAM_STREAM_MARK, MAX_TCP_DATAGRAM};
use relay_transport::udp::{pump_datagrams, FlowHandle, FlowTable, UdpStats};
use relay_transport::TunnelConn;
use tokio::io::AsyncWriteExt;

#[path = "watch_alloc.rs"]
mod watch_alloc;
use watch_alloc::{ARMED, LARGEST};

/// The reader's bound: one datagram of the largest size it carries (it
/// took up to 65,535, the largest 2-byte length).
const READER_BOUND: usize = MAX_TCP_DATAGRAM;

/// Inputs up to this size are checked against [`READER_BOUND`]: the
/// pipe's buffer and yamux's frame bodies grow with the input, and stay
/// well under the bound below it (libFuzzer's inputs here are ~8 KiB).
const CHECKED_INPUT: usize = 16 << 10;

/// The flows the relay has open: two of its own ids and one the edge
/// opened (`EDGE_FLOW_BIT`).
const FLOWS: [u32; 3] = [1, 2, EDGE_FLOW_BIT | 1];

/// `relay_transport`'s queue bounds (crate-private): the connection's
/// queue of received datagrams and the queue of each flow. Past them
/// datagrams are dropped, and counted.
const DATAGRAM_QUEUE: usize = 1024;
const FLOW_QUEUE: usize = 256;

/// yamux frame: version 0, type 0 (data), flags, stream id, length, body.
fn yamux_data(flags: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(12 + body.len());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&flags.to_be_bytes());
    // Stream 1: the first stream a yamux client (the edge) opens.
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}
const SYN: u16 = 1;
const FIN: u16 = 4;
const RST: u16 = 8;

/// The complete datagrams of `stream` (after the mark) within
/// `MAX_TCP_DATAGRAM`, as a straight parse finds them, a truncated last
/// one left out; and how many lengths over the bound it holds (the last
/// counted even if truncated: the reader counts a length when it reads
/// it).
fn datagrams(mut rest: &[u8]) -> (Vec<&[u8]>, usize) {
    let (mut out, mut oversize) = (Vec::new(), 0);
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        oversize += usize::from(len > MAX_TCP_DATAGRAM);
        let Some(d) = rest.get(2..2 + len) else { break };
        if len <= MAX_TCP_DATAGRAM {
            out.push(d);
        }
        rest = &rest[2 + len..];
    }
    (out, oversize)
}

/// The flow a datagram is for, if it is long enough to name one.
fn flow_of(d: &[u8]) -> Option<u32> {
    d.get(..4)
        .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
}

/// What a flow's queue holds now (a registered flow's queue never closes
/// while the table holds its sender, so an empty queue is `Pending`).
/// Unconstrained: tokio's cooperative budget would otherwise make a
/// receive `Pending` after about 128 in one poll of the task.
fn drain(h: &mut FlowHandle) -> Vec<Bytes> {
    let mut out = Vec::new();
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    loop {
        let mut f = std::pin::pin!(tokio::task::unconstrained(h.recv()));
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(Some(p)) => out.push(p),
            _ => return out,
        }
    }
}

/// Whether `sub` is `full` with some elements left out, order kept.
fn is_subsequence(sub: &[Bytes], full: &[&[u8]]) -> bool {
    let mut it = full.iter();
    sub.iter().all(|s| it.any(|f| f == s))
}

fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(how & 0x7f);
    let end = if how & 0x80 != 0 { RST } else { FIN };

    // The edge's yamux frames: the stream opened (SYN) with its first
    // bytes, the rest in frames of `cut` bytes, then the end.
    let mut wire = Vec::new();
    let mut chunks: Vec<&[u8]> = if cut == 0 || stream.is_empty() {
        vec![stream]
    } else {
        stream.chunks(cut).collect()
    };
    let first = chunks.remove(0);
    wire.extend(yamux_data(SYN, first));
    for c in chunks {
        wire.extend(yamux_data(0, c));
    }
    wire.extend(yamux_data(end, &[]));

    // See the module docs: 10 ms, not 3 s, before a connection whose
    // datagram stream ended closes for it.
    relay_transport::tcp::set_datagram_stream_grace(Duration::from_millis(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let checked = data.len() <= CHECKED_INPUT;
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(checked, Ordering::Relaxed);
    rt.block_on(async {
        let marked = stream.first() == Some(&DATAGRAM_STREAM_MARK);
        // With the mark, the edge's end of the pipe stays open throughout:
        // the connection is up, only the datagram stream ends.
        let (mut edge, relay) = tokio::io::duplex(1 << 20);
        edge.write_all(&wire).await.expect("pipe write");
        let edge = marked.then_some(edge);
        let remote = ([192, 0, 2, 1], 40000).into();
        let started = YamuxConn::start(
            relay,
            false,
            remote,
            (Vec::new(), None),
            Duration::from_secs(10),
        )
        .await;
        let conn = match started {
            Ok(c) => {
                assert!(marked, "datagram stream accepted without its mark");
                c
            }
            Err(e) => {
                assert!(!marked, "marked datagram stream refused: {e}");
                if debug() {
                    eprintln!("set-up refused: {e}");
                }
                return;
            }
        };

        let stats = Arc::new(UdpStats::default());
        let table = FlowTable::new(0, 16, false, stats.clone());
        let mut flows: Vec<FlowHandle> = FLOWS
            .iter()
            .map(|&id| table.register(Some(id)).expect("register"))
            .collect();
        tokio::time::timeout(
            Duration::from_secs(10),
            pump_datagrams(TunnelConn::Tcp(conn.clone()), table.clone()),
        )
        .await
        .expect("the pump did not end after the datagram stream ended");

        let (want, oversize) = datagrams(&stream[1..]);
        assert_eq!(
            conn.datagrams_refused_oversize() as usize,
            oversize,
            "datagrams refused for a length over {MAX_TCP_DATAGRAM}"
        );
        let got: Vec<Vec<Bytes>> = flows.iter_mut().map(drain).collect();
        let unknown = want
            .iter()
            .filter(|d| !flow_of(d).is_some_and(|id| FLOWS.contains(&id)))
            .count();
        let per_flow: Vec<Vec<&[u8]>> = FLOWS
            .iter()
            .map(|&id| {
                want.iter()
                    .filter(|d| flow_of(d) == Some(id))
                    .map(|d| &d[4..])
                    .collect()
            })
            .collect();
        let dropped_unknown = stats.dropped_unknown_flow.load(Ordering::Relaxed) as usize;
        let dropped_full = stats.dropped_queue_full.load(Ordering::Relaxed) as usize;
        // Dropped by the reader for a full connection queue; the pump has
        // added them to `dropped_queue_full`. Read after the pump ended,
        // which it does only once the reader has dropped its sender, done
        // with every datagram (the connection's handle, `conn`, keeps the
        // receiver: a send fails only for a full queue, never a closed
        // one).
        let dropped_conn = conn.datagrams_dropped_queue_full() as usize;
        if debug() {
            eprintln!(
                "{} datagrams in the stream ({} for no flow, {oversize} over-long); \
                 delivered per flow {:?}; dropped: unknown {dropped_unknown}, \
                 queue full {dropped_full} ({dropped_conn} of them at the \
                 connection's queue)",
                want.len(),
                unknown,
                got.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
        let delivered: usize = got.iter().map(Vec::len).sum();
        // Exactly, not `<=`: every complete datagram within the bound is
        // read (yamux hands over a stream's data before its FIN or reset),
        // then queued or dropped-and-counted by the reader; every queued
        // one is dispatched, and `dispatch` delivers it or counts it once,
        // as for no flow or as a flow's queue full (its 256, or the
        // table's 4 MiB of queued payloads, `SESSION_UDP_QUEUE_BYTES`, more
        // than any input here holds).
        assert_eq!(
            delivered + dropped_unknown + dropped_full,
            want.len(),
            "datagrams delivered and counted as dropped, against those sent \
             ({dropped_conn} dropped for the connection's full queue)"
        );
        assert!(
            dropped_conn <= dropped_full,
            "{dropped_conn} dropped for the connection's full queue, \
             {dropped_full} counted as queue full"
        );
        if want.len() <= DATAGRAM_QUEUE {
            // However slow the pump, the connection's queue holds them all.
            assert_eq!(
                dropped_conn, 0,
                "datagrams dropped by a queue of {DATAGRAM_QUEUE}"
            );
        }
        if dropped_conn == 0 {
            // Every datagram reached the table, in order, and a flow's
            // queue (drained only now) keeps its first `FLOW_QUEUE`.
            let mut excess = 0;
            for (g, w) in got.iter().zip(&per_flow) {
                let kept = w.len().min(FLOW_QUEUE);
                excess += w.len() - kept;
                assert_eq!(g.len(), kept, "payloads delivered to a flow");
                assert!(g.iter().zip(w).all(|(g, w)| g == w), "payloads differ");
            }
            assert_eq!(dropped_unknown, unknown, "datagrams for no flow");
            assert_eq!(
                dropped_full, excess,
                "datagrams dropped for a full flow queue"
            );
        } else {
            // Which datagrams the connection's queue dropped depends on
            // when the pump ran: `dropped_conn` of them, from any flow.
            for (g, w) in got.iter().zip(&per_flow) {
                assert!(g.len() <= FLOW_QUEUE, "a flow's queue past its bound");
                assert!(
                    g.len() >= w.len().saturating_sub(dropped_conn).min(FLOW_QUEUE),
                    "a flow got {} of its {} datagrams, {dropped_conn} dropped \
                     for the connection's full queue",
                    g.len(),
                    w.len()
                );
                assert!(
                    is_subsequence(g, w),
                    "payloads delivered out of order or made up"
                );
            }
            assert!(
                dropped_unknown <= unknown && dropped_unknown + dropped_conn >= unknown,
                "{dropped_unknown} datagrams counted for no flow of {unknown}, \
                 {dropped_conn} dropped for the connection's full queue"
            );
        }
        conn.close_now("fuzz: done");
        drop(edge);
    });
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    if debug() {
        eprintln!("largest allocation: {largest} bytes");
    }
    if checked {
        assert!(
            largest <= READER_BOUND,
            "an allocation of {largest} bytes (bound {READER_BOUND})"
        );
    }
    drop(rt);
});
