//! UDP over the tunnel: flows set up on a stream, payloads carried as
//! datagrams tagged with the flow id (see `relay_protocol::datagram`).
//!
//! - [`FlowTable`]: per connection, flow id → bounded queue of payloads
//!   from the tunnel; [`pump_datagrams`] fills it from the connection.
//! - [`RedirectUdp`], [`serve_transparent_udp`] (in `udp_capture.rs`, re-exported
//!   here): the capture side's socket and loop: it receives redirected
//!   packets with the local address they were redirected to, looks up
//!   their original destination in conntrack once per flow, and answers
//!   from the redirected address so the kernel restores the original one.
//! - [`serve_target`]: the far side of a flow: a connected UDP socket to the
//!   target, datagrams both ways, ended by idleness or by the stream.
//! - [`run_opened_flow`]: the capture side of a flow once the far side
//!   accepted it.
//!
//! The loops that run one flow ([`serve_target`], [`run_local_flow`],
//! [`run_opened_flow`], [`bridge_flows`]) live in `udp/flows.rs`,
//! re-exported here.
//!
//! A payload larger than the path's datagram size travels on its flow's
//! stream instead, length-prefixed, when the peer announced
//! `capability::UDP_STREAM_PAYLOADS` (as IP fragmentation would carry it on
//! the real network; reliable and in order, so such payloads may lag the
//! flow's datagrams); towards an older peer it is counted and dropped.
//! Never truncated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use relay_protocol::datagram::{
    decode_datagram, encode_datagram, encode_stream_payload, StreamPayloads, DATAGRAM_HEADER_LEN,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

use crate::conn::{DatagramRefused, RecvHalf, SendHalf, TunnelConn};

pub use crate::udp_capture::{
    serve_transparent_udp, FlowIdle, FlowLimits, Pick, PickConn, Picked, RedirectUdp, Replier,
    MAX_STARTING_FLOWS,
};

mod flows;

pub use flows::{
    bridge_flows, connect_target, never_stale, run_local_flow, run_opened_flow, serve_target, Stale,
};

/// Payloads queued per flow before new ones are dropped (and counted).
pub(crate) const FLOW_QUEUE: usize = 256;

/// Payload bytes queued from the tunnel across all flows of one session
/// (one [`FlowTable`]) before new ones are dropped (and counted as queue
/// full). Without it the bound was flows × `FLOW_QUEUE` × datagram size
/// (1,024 × 256 × ~1.4 KB ≈ 360 MiB per session).
pub const SESSION_UDP_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Largest UDP payload we read from a local socket.
pub(crate) const MAX_UDP: usize = 65_535;

thread_local! {
    /// One receive buffer per thread, large enough for any UDP payload.
    /// Reads from local UDP sockets land here and leave as a copy of
    /// exactly the payload, so a flow waiting for its next datagram holds
    /// no buffer of its own (it held 64 KiB: a thousand flows at an edge
    /// kept 64 MiB) and a captured packet costs no 64 KiB allocation.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; MAX_UDP].into_boxed_slice());
}

/// Runs `read` on this thread's [`SCRATCH`] buffer and returns what it
/// read (`read` returns the byte count and anything else it learnt) as
/// exactly that many bytes. `read` must not block: it runs between a
/// socket's readiness and its next `.await`.
fn read_into_scratch<T>(
    read: impl FnOnce(&mut [u8]) -> std::io::Result<(usize, T)>,
) -> std::io::Result<(Bytes, T)> {
    SCRATCH.with_borrow_mut(|buf| {
        let (n, extra) = read(buf)?;
        Ok((Bytes::copy_from_slice(&buf[..n]), extra))
    })
}

/// The next datagram `read` takes from `sock` once it is readable, exactly
/// its bytes (read through [`read_into_scratch`]); `read` must clear the
/// socket's readiness when it finds nothing (`try_recv`, `try_io`).
/// Cancel-safe: the datagram is taken from the socket and returned within
/// one poll.
pub(crate) async fn recv_with<T>(
    sock: &UdpSocket,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<(usize, T)>,
) -> std::io::Result<(Bytes, T)> {
    loop {
        sock.readable().await?;
        match read_into_scratch(&mut read) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// The next datagram from a connected UDP socket (see [`recv_with`]).
async fn recv_datagram(sock: &UdpSocket) -> std::io::Result<Bytes> {
    let (payload, ()) = recv_with(sock, |buf| sock.try_recv(buf).map(|n| (n, ()))).await?;
    Ok(payload)
}

/// Bound on writing one payload to its flow's stream. QUIC flow control
/// stalls the write only when the peer has stopped reading the flow; the
/// flow then ends (its stream may hold part of a frame) and the client's
/// next packet starts a new one.
pub const STREAM_PAYLOAD_WRITE_LIMIT: Duration = Duration::from_secs(1);

/// Counters shared by every flow of one side.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Flows currently open.
    pub flows_open: AtomicU64,
    /// Flows opened since start.
    pub flows_total: AtomicU64,
    /// Payloads dropped because they exceed the path's datagram size and
    /// the peer cannot take them on the flow's stream.
    pub dropped_oversize: AtomicU64,
    /// Payloads too large for a datagram sent on their flow's stream.
    pub stream_payloads: AtomicU64,
    /// Flows ended because a payload could not be written to their stream
    /// within [`STREAM_PAYLOAD_WRITE_LIMIT`].
    pub stream_payload_stalls: AtomicU64,
    /// Payloads dropped because a queue was full: a flow's, or the
    /// connection's datagram send queue (QUIC's drops its oldest), or its
    /// queue of received datagrams (QUIC's drops its oldest, the TCP
    /// fallback's the newest).
    pub dropped_queue_full: AtomicU64,
    /// Datagrams for no known flow (a flow that just ended).
    pub dropped_unknown_flow: AtomicU64,
    /// Payloads not sent because the tunnel connection had ended (the
    /// flow's task had not yet seen it).
    pub dropped_closed: AtomicU64,
    /// New flows refused because of the per-session flow cap.
    pub refused_cap: AtomicU64,
    /// Captured packets that would have started a flow while
    /// [`MAX_STARTING_FLOWS`] were already starting (a flood of new
    /// sources); dropped.
    pub dropped_starting: AtomicU64,
    /// Captured flows closed early to make room for a new one
    /// (`FlowLimits::max_flows`).
    pub evicted: AtomicU64,
    /// Conntrack entries of open captured flows created again after
    /// something else deleted them (kube-proxy's stale-entry cleanup).
    pub conntrack_restored: AtomicU64,
    /// Such entries that could not be created again (the flow's replies
    /// then leave un-NATed until the client's next datagram).
    pub conntrack_restore_failed: AtomicU64,
    /// Datagrams the peer sent on the TCP fallback with a length past the
    /// most a sender writes (`tcp::MAX_TCP_DATAGRAM`): skipped.
    pub dropped_malformed: AtomicU64,
    /// TCP-fallback connections closed because the peer ended its
    /// datagram stream while the connection was up (see
    /// `tcp::YamuxConn::datagram_stream_ended_by_peer`).
    pub datagram_streams_ended: AtomicU64,
}

impl UdpStats {
    /// The counters in the Prometheus text format, every name starting
    /// with `prefix` (`relay`, `edge`).
    pub fn render_prometheus(&self, prefix: &str) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        for (name, kind, help, v) in [
            ("udp_flows", "gauge", "UDP flows open.", &self.flows_open),
            (
                "udp_flows_total",
                "counter",
                "UDP flows opened.",
                &self.flows_total,
            ),
            (
                "udp_flows_evicted_total",
                "counter",
                "Captured UDP flows closed early to make room for a new one.",
                &self.evicted,
            ),
            (
                "udp_conntrack_restored_total",
                "counter",
                "Conntrack entries of open captured UDP flows created again after something else (kube-proxy's cleanup) deleted them.",
                &self.conntrack_restored,
            ),
            (
                "udp_conntrack_restore_failed_total",
                "counter",
                "Conntrack entries of open captured UDP flows that could not be created again after a deletion.",
                &self.conntrack_restore_failed,
            ),
            (
                "udp_stream_payloads_total",
                "counter",
                "UDP payloads too large for a datagram, carried on their flow's stream.",
                &self.stream_payloads,
            ),
            (
                "udp_datagram_streams_ended_total",
                "counter",
                "TCP-fallback connections closed because the peer ended its datagram stream while the connection was up (no UDP would have crossed it).",
                &self.datagram_streams_ended,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}\n{prefix}_{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP {prefix}_udp_dropped_total UDP payloads dropped, by reason.\n# TYPE {prefix}_udp_dropped_total counter"
        );
        for (reason, v) in [
            ("oversize", &self.dropped_oversize),
            ("stream_stalled", &self.stream_payload_stalls),
            ("queue_full", &self.dropped_queue_full),
            ("unknown_flow", &self.dropped_unknown_flow),
            ("closed", &self.dropped_closed),
            ("flow_cap", &self.refused_cap),
            ("starting", &self.dropped_starting),
            ("malformed", &self.dropped_malformed),
        ] {
            let _ = writeln!(
                o,
                "{prefix}_udp_dropped_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        o
    }
}

/// Flow id → queue of payloads from the tunnel, for one connection.
#[derive(Debug)]
pub struct FlowTable {
    flows: Mutex<HashMap<u32, mpsc::Sender<Bytes>>>,
    /// Payload bytes queued in all flows (see [`SESSION_UDP_QUEUE_BYTES`]).
    queued: AtomicUsize,
    next: AtomicU32,
    id_bit: u32,
    cap: usize,
    /// The peer takes oversized payloads on a flow's stream.
    stream_payloads: bool,
    /// Counters.
    pub stats: Arc<UdpStats>,
}

/// A registered flow: its id and its queue; unregisters on drop.
pub struct FlowHandle {
    /// The flow id.
    pub id: u32,
    /// Payloads from the tunnel.
    rx: mpsc::Receiver<Bytes>,
    table: Arc<FlowTable>,
}

impl FlowHandle {
    /// Whether the peer takes payloads too large for a datagram on this
    /// flow's stream (it announced `UDP_STREAM_PAYLOADS`).
    pub fn stream_payloads(&self) -> bool {
        self.table.stream_payloads
    }

    /// The next payload from the tunnel; `None` once the flow is gone.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let p = self.rx.recv().await?;
        self.table.queued.fetch_sub(p.len(), Relaxed);
        Some(p)
    }
}

impl Drop for FlowHandle {
    fn drop(&mut self) {
        // Payloads still queued leave the session's budget with the flow.
        self.rx.close();
        while let Ok(p) = self.rx.try_recv() {
            self.table.queued.fetch_sub(p.len(), Relaxed);
        }
        {
            let mut flows = self.table.lock();
            flows.remove(&self.id);
            crate::memory::shrink_sparse(&mut flows);
        }
        self.table.stats.flows_open.fetch_sub(1, Relaxed);
    }
}

impl FlowTable {
    /// A table whose locally opened ids carry `id_bit` (0 for the relay,
    /// `EDGE_FLOW_BIT` for the edge), holding at most `cap` flows;
    /// `stream_payloads`: the peer announced `UDP_STREAM_PAYLOADS`.
    pub fn new(id_bit: u32, cap: usize, stream_payloads: bool, stats: Arc<UdpStats>) -> Arc<Self> {
        Arc::new(FlowTable {
            flows: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            next: AtomicU32::new(1),
            id_bit,
            cap,
            stream_payloads,
            stats,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::Sender<Bytes>>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a flow we open (a fresh id) or one the peer opened (`id`).
    /// `None` when the table is at its cap or the id is taken.
    pub fn register(self: &Arc<Self>, id: Option<u32>) -> Option<FlowHandle> {
        let mut g = self.lock();
        if g.len() >= self.cap {
            self.stats.refused_cap.fetch_add(1, Relaxed);
            return None;
        }
        let id = match id {
            Some(id) => id,
            None => loop {
                // Wraps after 2^31 flows; skips ids still in use.
                let n = self.next.fetch_add(1, Relaxed) & !relay_protocol::EDGE_FLOW_BIT;
                let id = n | self.id_bit;
                if !g.contains_key(&id) {
                    break id;
                }
            },
        };
        if g.contains_key(&id) {
            return None;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        g.insert(id, tx);
        self.stats.flows_open.fetch_add(1, Relaxed);
        self.stats.flows_total.fetch_add(1, Relaxed);
        Some(FlowHandle {
            id,
            rx,
            table: self.clone(),
        })
    }

    /// Delivers a datagram from the tunnel to its flow (dropping, counted,
    /// when the flow is unknown or its queue is full).
    pub fn dispatch(&self, d: Bytes) {
        let Ok((id, payload)) = decode_datagram(d) else {
            self.stats.dropped_unknown_flow.fetch_add(1, Relaxed);
            return;
        };
        let tx = self.lock().get(&id).cloned();
        match tx {
            Some(tx) => {
                let len = payload.len();
                if self.queued.fetch_add(len, Relaxed) + len > SESSION_UDP_QUEUE_BYTES {
                    self.queued.fetch_sub(len, Relaxed);
                    self.stats.dropped_queue_full.fetch_add(1, Relaxed);
                    return;
                }
                // A copy of its own: the datagram is a slice of a received
                // batch (up to 64 KiB) that a queued slice would keep alive.
                if tx.try_send(Bytes::copy_from_slice(&payload)).is_err() {
                    self.queued.fetch_sub(len, Relaxed);
                    self.stats.dropped_queue_full.fetch_add(1, Relaxed);
                }
            }
            None => {
                self.stats.dropped_unknown_flow.fetch_add(1, Relaxed);
            }
        }
    }

    /// Flows open in this table.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads datagrams from `conn` into `table` until the connection ends.
/// On the TCP fallback it also ends when the peer ends the datagram
/// stream; the connection is then closed too, unless it ended of itself
/// (see `tcp::YamuxConn::datagram_stream_ended_by_peer`), so the session
/// is set up again rather than carrying on without UDP.
///
/// It also counts, in `table`'s stats, the datagrams the connection
/// received but dropped before they were read: on QUIC those its full
/// receive buffer dropped (`QuicRxDrops`); on the TCP fallback those
/// its reader skipped as over-long or dropped for a full queue (as they
/// are seen, and when the pump ends) and, once the connection has
/// closed, whether it was closed for the peer ending the datagram stream.
pub async fn pump_datagrams(conn: TunnelConn, table: Arc<FlowTable>) {
    let mut seen = ReaderDrops::default();
    let mut quic = QuicRxDrops::default();
    let ended = loop {
        match quic.next(&conn, &table.stats).await {
            Ok(d) => {
                table.dispatch(d);
                count_reader_drops(&conn, &table.stats, &mut seen);
            }
            Err(e) => break e,
        }
    };
    // quinn hands out what it buffered before the error: all read. After
    // a close of our own it still counts frames that arrive, which it
    // never buffers: those would be taken for dropped.
    if !conn.closed_locally() {
        if let Some(received) = conn.datagram_frames_received() {
            quic.settle(received, &table.stats);
        }
    }
    count_reader_drops(&conn, &table.stats, &mut seen);
    debug!(reason = %ended.0, "datagram pump ended");
    if let TunnelConn::Tcp(c) = &conn {
        c.closed().await;
        count_reader_drops(&conn, &table.stats, &mut seen);
        if c.datagram_stream_ended_by_peer() {
            table.stats.datagram_streams_ended.fetch_add(1, Relaxed);
        }
    }
}

/// Adds to `stats` what `conn`'s TCP-fallback reader dropped since
/// `seen` (which it updates): datagrams skipped as over-long
/// (`malformed`), and datagrams dropped because the connection's queue of
/// received datagrams was full (`queue_full`).
fn count_reader_drops(conn: &TunnelConn, stats: &UdpStats, seen: &mut ReaderDrops) {
    if let TunnelConn::Tcp(c) = conn {
        let now = ReaderDrops {
            oversize: c.datagrams_refused_oversize(),
            queue_full: c.datagrams_dropped_queue_full(),
        };
        // Called per datagram: the shared counters are touched only when
        // something was dropped.
        if now.oversize != seen.oversize {
            stats
                .dropped_malformed
                .fetch_add(now.oversize.saturating_sub(seen.oversize), Relaxed);
        }
        if now.queue_full != seen.queue_full {
            stats
                .dropped_queue_full
                .fetch_add(now.queue_full.saturating_sub(seen.queue_full), Relaxed);
        }
        *seen = now;
    }
}

/// The datagrams a QUIC connection's receive buffer dropped (quinn drops
/// the oldest when a new one does not fit, and counts nothing): the
/// DATAGRAM frames it received, less those read, looked at when its
/// buffer is empty, so that none still waiting to be read is taken for
/// dropped: when a read finds nothing waiting after some were (a backlog,
/// the only time drops happen, has just been read up), or after
/// [`Self::EVERY`] reads, and when the connection has ended. A datagram
/// arriving between the look at the count and the one at the buffer is
/// counted at a later look. Under a load that never lets the buffer
/// empty, its drops are counted once it does.
#[derive(Debug, Default)]
struct QuicRxDrops {
    /// Datagrams read from the connection.
    delivered: u64,
    /// Drops already added to the stats.
    counted: u64,
    /// Reads since the last look.
    since: u64,
    /// A read since the last look found a datagram waiting.
    backlog: bool,
}

impl QuicRxDrops {
    /// Reads between two looks without a backlog (the count takes the
    /// connection's lock).
    const EVERY: u64 = 16;

    /// The next datagram from `conn`, looking at its drops first when its
    /// buffer is empty and a look is due (QUIC only; the TCP fallback's
    /// reader counts its own).
    async fn next(
        &mut self,
        conn: &TunnelConn,
        stats: &UdpStats,
    ) -> Result<Bytes, crate::conn::ConnLost> {
        use futures::FutureExt;
        let TunnelConn::Quic(_) = conn else {
            return conn.read_datagram().await;
        };
        // quinn's read checks its buffer first and keeps nothing when
        // dropped unfinished: polling it once without waiting loses nothing.
        let got = match conn.read_datagram().now_or_never() {
            Some(r) => {
                self.backlog = true;
                r
            }
            None if self.backlog || self.since >= Self::EVERY => {
                let received = conn.datagram_frames_received().unwrap_or(0);
                match conn.read_datagram().now_or_never() {
                    Some(r) => r,
                    None => {
                        self.settle(received, stats);
                        self.backlog = false;
                        self.since = 0;
                        conn.read_datagram().await
                    }
                }
            }
            None => conn.read_datagram().await,
        };
        if got.is_ok() {
            self.delivered += 1;
            self.since += 1;
        }
        got
    }

    /// `received` was the connection's count of DATAGRAM frames before
    /// its buffer was seen empty: adds the drops it shows to `stats`.
    fn settle(&mut self, received: u64, stats: &UdpStats) {
        let dropped = received.saturating_sub(self.delivered);
        if dropped > self.counted {
            stats
                .dropped_queue_full
                .fetch_add(dropped - self.counted, Relaxed);
            self.counted = dropped;
        }
    }
}

/// The TCP-fallback reader's drop counts already added to the stats.
#[derive(Default)]
struct ReaderDrops {
    oversize: u64,
    queue_full: u64,
}

/// The largest UDP payload `conn` can carry in one datagram now.
pub fn max_payload(conn: &TunnelConn) -> usize {
    conn.max_datagram_size()
        .map(|m| m.saturating_sub(DATAGRAM_HEADER_LEN))
        .unwrap_or(0)
}

/// The flow must end: a payload could not be written to its stream.
#[derive(Debug)]
pub struct StreamStalled;

/// Sends a payload on `flow`: as a datagram when it fits; otherwise on the
/// flow's stream (`stream`) when the peer takes it there, else dropped and
/// counted. A datagram the connection cannot queue is lost, as UDP would
/// lose it, and counted by why: `dropped_queue_full` (on QUIC, queueing
/// one larger than the room left drops the oldest queued, quinn's rule, so
/// what waits stays fresh: one each time at least), `dropped_oversize`
/// (the path's MTU shrank since the size check) or `dropped_closed` (the
/// connection ended). `Err` when the stream write failed or stalled (see
/// [`STREAM_PAYLOAD_WRITE_LIMIT`]): the caller ends the flow.
pub async fn send_payload(
    conn: &TunnelConn,
    flow: &FlowHandle,
    stream: &mut SendHalf,
    payload: &[u8],
    stats: &UdpStats,
) -> Result<(), StreamStalled> {
    let max = max_payload(conn);
    if payload.len() <= max {
        let d = encode_datagram(flow.id, payload);
        let full = conn
            .datagram_send_space()
            .is_some_and(|room| room < d.len());
        let counter = match conn.send_datagram(d) {
            Ok(()) if full => Some(&stats.dropped_queue_full),
            Ok(()) => None,
            Err(DatagramRefused::QueueFull) => Some(&stats.dropped_queue_full),
            Err(DatagramRefused::TooLarge) => Some(&stats.dropped_oversize),
            Err(DatagramRefused::Closed) => Some(&stats.dropped_closed),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Relaxed);
        }
        return Ok(());
    }
    let frame = match encode_stream_payload(payload) {
        Some(frame) if flow.stream_payloads() => frame,
        _ => {
            stats.dropped_oversize.fetch_add(1, Relaxed);
            debug!(len = payload.len(), max, "oversized UDP payload dropped");
            return Ok(());
        }
    };
    match tokio::time::timeout(STREAM_PAYLOAD_WRITE_LIMIT, stream.write_chunk(frame)).await {
        Ok(Ok(())) => {
            stats.stream_payloads.fetch_add(1, Relaxed);
            Ok(())
        }
        Ok(Err(_)) => Err(StreamStalled),
        Err(_) => {
            stats.stream_payload_stalls.fetch_add(1, Relaxed);
            debug!(
                flow = flow.id,
                "UDP payload stalled on its flow's stream; flow ends"
            );
            Err(StreamStalled)
        }
    }
}

/// The next payload the peer sent on a flow's stream (those too large for
/// a datagram); `None` once the stream ends, the peer finished or reset it
/// or the connection died. Cancel-safe: bytes read stay in `frames`.
async fn stream_payload(recv: &mut RecvHalf, frames: &mut StreamPayloads) -> Option<Bytes> {
    loop {
        if let Some(p) = frames.next_payload() {
            return Some(p);
        }
        match recv.read_chunk().await {
            Ok(Some(chunk)) => frames.extend(&chunk),
            Ok(None) | Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one session's flows may hold from the tunnel is bounded as a
    /// whole ([`SESSION_UDP_QUEUE_BYTES`]), whatever the number of flows
    /// and their queues: past it datagrams are dropped and counted; a
    /// payload taken, or a flow closed with payloads still queued, gives
    /// its bytes back. And a queued payload is a copy of exactly its
    /// bytes, not a slice keeping the received datagram's buffer alive.
    #[tokio::test]
    async fn the_session_queue_is_bounded_in_bytes_and_holds_copies() {
        let stats = Arc::new(UdpStats::default());
        let table = FlowTable::new(0, 64, false, stats.clone());
        let mut a = table.register(Some(1)).expect("flow 1");
        let b = table.register(Some(2)).expect("flow 2");
        let payload = vec![7u8; 60_000];
        let fits = SESSION_UDP_QUEUE_BYTES / payload.len();
        for i in 0..100 {
            // Alternating flows: the budget is the session's, not a flow's.
            let id = if i % 2 == 0 { 1 } else { 2 };
            table.dispatch(encode_datagram(id, &payload));
        }
        let dropped = stats.dropped_queue_full.load(Relaxed);
        assert_eq!(dropped, (100 - fits) as u64, "{fits} fit in the budget");
        assert_eq!(table.queued.load(Relaxed), fits * payload.len());
        // One taken: room for one more.
        let d = encode_datagram(1, &payload);
        let range = d.as_ptr() as usize..d.as_ptr() as usize + d.len();
        let got = a.recv().await.expect("a payload");
        assert_eq!(got.len(), payload.len());
        table.dispatch(d.clone());
        assert_eq!(stats.dropped_queue_full.load(Relaxed), dropped, "it fit");
        // Flow 2 closed with its payloads queued: they leave the budget.
        drop(b);
        let left = table.queued.load(Relaxed);
        assert!(
            left <= fits.div_ceil(2) * payload.len(),
            "{left} still queued"
        );
        // The payload queued last is its own copy, not a slice of `d`.
        let mut last = None;
        while table.queued.load(Relaxed) > 0 {
            last = a.recv().await;
        }
        let last = last.expect("payloads of flow 1");
        assert!(
            !range.contains(&(last.as_ptr() as usize)),
            "the queued payload points into the received datagram"
        );
        assert_eq!(table.queued.load(Relaxed), 0);
    }
}
