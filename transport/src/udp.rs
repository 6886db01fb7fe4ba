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
//! Payloads larger than the path's datagram size are counted and dropped,
//! never fragmented or truncated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use relay_protocol::datagram::{decode_datagram, encode_datagram, DATAGRAM_HEADER_LEN};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

use crate::conn::{BiStream, TunnelConn};

pub use crate::udp_capture::{
    serve_transparent_udp, FlowLimits, PickConn, Picked, RedirectUdp, Replier, MAX_STARTING_FLOWS,
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

/// Counters shared by every flow of one side.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Flows currently open.
    pub flows_open: AtomicU64,
    /// Flows opened since start.
    pub flows_total: AtomicU64,
    /// Payloads dropped because they exceed the path's datagram size.
    pub dropped_oversize: AtomicU64,
    /// Payloads dropped because a flow's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Datagrams for no known flow (a flow that just ended).
    pub dropped_unknown_flow: AtomicU64,
    /// New flows refused because of the per-session flow cap.
    pub refused_cap: AtomicU64,
    /// Captured packets that would have started a flow while
    /// [`MAX_STARTING_FLOWS`] were already starting (a flood of new
    /// sources); dropped.
    pub dropped_starting: AtomicU64,
    /// Captured flows closed early to make room for a new one
    /// (`FlowLimits::max_flows`).
    pub evicted: AtomicU64,
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
        self.table.lock().remove(&self.id);
        self.table.stats.flows_open.fetch_sub(1, Relaxed);
    }
}

impl FlowTable {
    /// A table whose locally opened ids carry `id_bit` (0 for the relay,
    /// `EDGE_FLOW_BIT` for the edge), holding at most `cap` flows.
    pub fn new(id_bit: u32, cap: usize, stats: Arc<UdpStats>) -> Arc<Self> {
        Arc::new(FlowTable {
            flows: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            next: AtomicU32::new(1),
            id_bit,
            cap,
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
pub async fn pump_datagrams(conn: TunnelConn, table: Arc<FlowTable>) {
    while let Ok(d) = conn.read_datagram().await {
        table.dispatch(d);
    }
}

/// The largest UDP payload `conn` can carry in one datagram now.
pub fn max_payload(conn: &TunnelConn) -> usize {
    conn.max_datagram_size()
        .map(|m| m.saturating_sub(DATAGRAM_HEADER_LEN))
        .unwrap_or(0)
}

/// Sends a payload on flow `id`, dropping (counted) what does not fit.
pub fn send_payload(conn: &TunnelConn, id: u32, payload: &[u8], stats: &UdpStats) {
    if payload.len() > max_payload(conn) {
        stats.dropped_oversize.fetch_add(1, Relaxed);
        debug!(
            len = payload.len(),
            max = max_payload(conn),
            "oversized UDP payload dropped"
        );
        return;
    }
    // A full send buffer or a closing connection loses the datagram, as
    // UDP would.
    let _ = conn.send_datagram(encode_datagram(id, payload));
}

/// Waits until the flow's stream ends (the peer finished or reset it, or
/// the connection died). Anything else read on it is ignored.
async fn stream_closed(bi: &mut BiStream) {
    while let Ok(Some(_)) = bi.recv.read_chunk().await {}
}

/// The far side of a flow: relays between the tunnel and a UDP socket
/// connected to `target` until `idle` passes without traffic or the
/// stream ends. Finishes the stream on the way out.
pub async fn serve_target(
    mut bi: BiStream,
    conn: TunnelConn,
    mut flow: FlowHandle,
    sock: UdpSocket,
    idle: Duration,
    stats: Arc<UdpStats>,
) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        tokio::select! {
            _ = stream_closed(&mut bi) => break,
            p = flow.recv() => match p {
                // A send error (ICMP unreachable) is the target's answer;
                // keep the flow, as a UDP client would.
                Some(p) => { let _ = sock.send(&p).await; }
                None => break,
            },
            r = sock.recv(&mut buf) => match r {
                Ok(n) => send_payload(&conn, flow.id, &buf[..n], &stats),
                Err(e) => debug!(error = %e, "udp target socket"),
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
}

/// The capture side of a flow the far side accepted: payloads from the
/// local client (`from_client`) go out as datagrams; datagrams for the flow
/// go back to the client through `reply`. Ends on idleness, when the far
/// side ends the stream, or when the listener drops `from_client`.
pub async fn run_opened_flow(
    mut bi: BiStream,
    conn: TunnelConn,
    mut flow: FlowHandle,
    mut from_client: mpsc::Receiver<Bytes>,
    reply: Replier,
    idle: Duration,
    stats: Arc<UdpStats>,
) {
    loop {
        tokio::select! {
            _ = stream_closed(&mut bi) => break,
            p = from_client.recv() => match p {
                Some(p) => send_payload(&conn, flow.id, &p, &stats),
                None => break,
            },
            p = flow.recv() => match p {
                Some(p) => reply.send(&p).await,
                None => break,
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
}

/// Bridges two flows (edge to edge through the relay): datagrams of flow
/// `a` on `a_conn` go out as flow `b` on `b_conn`, and back.
pub async fn bridge_flows(
    (mut a_bi, a_conn, mut a): (BiStream, TunnelConn, FlowHandle),
    (mut b_bi, b_conn, mut b): (BiStream, TunnelConn, FlowHandle),
    idle: Duration,
    stats: Arc<UdpStats>,
) {
    loop {
        tokio::select! {
            _ = stream_closed(&mut a_bi) => break,
            _ = stream_closed(&mut b_bi) => break,
            p = a.recv() => match p {
                Some(p) => send_payload(&b_conn, b.id, &p, &stats),
                None => break,
            },
            p = b.recv() => match p {
                Some(p) => send_payload(&a_conn, a.id, &p, &stats),
                None => break,
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    for bi in [&mut a_bi, &mut b_bi] {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
    }
}

/// A UDP socket connected to `target`, marked so capture lets it pass.
pub async fn connect_target(target: SocketAddr, mark: u32) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    crate::capture::mark_socket(socket2::SockRef::from(&s), mark)?;
    s.set_nonblocking(true)?;
    s.bind(&bind.into())?;
    let sock = UdpSocket::from_std(s.into())?;
    sock.connect(target).await?;
    Ok(sock)
}
