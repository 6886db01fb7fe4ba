//! UDP over the tunnel: flows set up on a stream, payloads carried as
//! datagrams tagged with the flow id (see `relay_protocol::datagram`).
//!
//! - [`FlowTable`]: per connection, flow id → bounded queue of payloads
//!   from the tunnel; [`pump_datagrams`] fills it from the connection.
//! - [`RedirectUdp`]: the capture side's socket: it receives redirected
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
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use relay_protocol::datagram::{decode_datagram, encode_datagram, DATAGRAM_HEADER_LEN};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

use crate::conn::{BiStream, TunnelConn};

/// Payloads queued per flow before new ones are dropped (and counted).
const FLOW_QUEUE: usize = 256;

/// Payload bytes queued from the tunnel across all flows of one session
/// (one [`FlowTable`]) before new ones are dropped (and counted as queue
/// full). Without it the bound was flows × `FLOW_QUEUE` × datagram size
/// (1,024 × 256 × ~1.4 KB ≈ 360 MiB per session).
pub const SESSION_UDP_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Largest UDP payload we read from a local socket.
const MAX_UDP: usize = 65_535;

/// Captured flows starting at once (conntrack lookup and stream open in
/// progress), per capture loop: each holds a netlink socket and a task, so
/// a flood of new sources must not open them without bound. A packet that
/// would start one more is dropped and counted (`dropped_starting`).
pub const MAX_STARTING_FLOWS: usize = 256;

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

/// The capture side's UDP socket (IPv4, `0.0.0.0:port`): receives
/// redirected packets together with the local address they were redirected
/// to, and answers from that address so conntrack un-NATs the reply.
pub struct RedirectUdp {
    sock: UdpSocket,
}

impl RedirectUdp {
    /// Binds `0.0.0.0:port` with `IP_RECVORIGDSTADDR`.
    pub fn bind(port: u16) -> std::io::Result<Self> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_address(true)?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)
            .map_err(std::io::Error::from)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        Ok(RedirectUdp {
            sock: UdpSocket::from_std(s.into())?,
        })
    }

    /// Receives one packet: `(payload, client, local address it arrived on)`.
    pub async fn recv(&self) -> std::io::Result<(Bytes, SocketAddrV4, SocketAddrV4)> {
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            self.sock.readable().await?;
            let fd = self.sock.as_raw_fd();
            match self
                .sock
                .try_io(tokio::io::Interest::READABLE, || recv_orig(fd, &mut buf))
            {
                // Exactly the payload: `Bytes::from` of the truncated
                // buffer kept its whole 64 KiB capacity per queued packet.
                Ok((n, src, dst)) => return Ok((Bytes::copy_from_slice(&buf[..n]), src, dst)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `payload` to `client` from the local address `from`.
    pub async fn send_from(
        &self,
        payload: &[u8],
        from: SocketAddrV4,
        client: SocketAddrV4,
    ) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
        let info = nix::libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: nix::libc::in_addr {
                s_addr: u32::from(*from.ip()).to_be(),
            },
            ipi_addr: nix::libc::in_addr { s_addr: 0 },
        };
        let to = SockaddrIn::from(client);
        loop {
            self.sock.writable().await?;
            let fd = self.sock.as_raw_fd();
            let r = self.sock.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(payload)];
                let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
                sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to)).map_err(std::io::Error::from)
            });
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where replies of one captured flow go: to `client`, from `local`.
pub struct Replier {
    sock: Arc<RedirectUdp>,
    local: SocketAddrV4,
    client: SocketAddrV4,
}

impl Replier {
    async fn send(&self, payload: &[u8]) {
        // A lost reply is what UDP promises anyway.
        if let Err(e) = self.sock.send_from(payload, self.local, self.client).await {
            debug!(error = %e, "udp reply");
        }
    }
}

fn recv_orig(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddrV4, SocketAddrV4)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let src = msg
        .address
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
        .ok_or_else(|| std::io::Error::other("packet without source address"))?;
    let mut dst = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(a) = c {
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            dst = Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)));
        }
    }
    let dst = dst.ok_or_else(|| std::io::Error::other("packet without original destination"))?;
    Ok((msg.bytes, src, dst))
}

/// Where a captured UDP packet's flow goes: the connection and its flow
/// table, chosen by the original destination.
pub type PickConn = dyn Fn(SocketAddr) -> Option<(TunnelConn, Arc<FlowTable>)> + Send + Sync;

/// Bounds for captured UDP flows.
#[derive(Debug, Clone)]
pub struct FlowLimits {
    /// Wait for the far side to accept a flow.
    pub open_timeout: Duration,
    /// A flow silent this long ends.
    pub idle: Duration,
    /// Mark for our reply sockets (see [`crate::capture`]).
    pub mark: u32,
}

/// Serves captured UDP: each (client, redirected address) pair is one
/// flow, whose original destination conntrack tells once, opened on the
/// connection `pick` chooses; replies go back from the redirected address
/// so the kernel restores the original one. Packets for a destination no
/// session serves are dropped and counted. Runs until `stop`.
pub async fn serve_transparent_udp(
    sock: RedirectUdp,
    pick: Arc<PickConn>,
    limits: FlowLimits,
    stats: Arc<UdpStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    type Key = (SocketAddrV4, SocketAddrV4);
    // (generation, queue): a flow that ends removes its entry only if it is
    // still its own, not a successor's for the same key.
    type Local = Mutex<HashMap<Key, (u64, mpsc::Sender<Bytes>)>>;
    let local: Arc<Local> = Arc::default();
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // Poisoning would only mean a flow task panicked mid-update.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    let sock = Arc::new(sock);
    let starting = Arc::new(tokio::sync::Semaphore::new(MAX_STARTING_FLOWS));
    let mut generation = 0u64;
    loop {
        let (payload, client, here) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv() => match r {
                Ok(v) => v,
                Err(e) => {
                    debug!(error = %e, "captured udp recv");
                    continue;
                }
            },
        };
        let key = (client, here);
        let sent = lock(&local)
            .get(&key)
            .map(|(_, tx)| tx.try_send(payload.clone()));
        let payload = match sent {
            Some(Ok(())) => continue,
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                stats.dropped_queue_full.fetch_add(1, Relaxed);
                continue;
            }
            // The flow ended (idle); this packet starts a new one.
            Some(Err(mpsc::error::TrySendError::Closed(p))) => p,
            None => payload,
        };
        let Ok(permit) = starting.clone().try_acquire_owned() else {
            stats.dropped_starting.fetch_add(1, Relaxed);
            continue;
        };
        // The flow's queue is registered before its destination is known,
        // so packets arriving meanwhile wait in it (bounded) instead of
        // each starting a lookup; the lookup itself runs in the flow's
        // task, never in this loop, which keeps receiving for every flow.
        generation += 1;
        let my_gen = generation;
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(payload);
        lock(&local).insert(key, (my_gen, tx));
        let (local, limits, stats, pick) = (local.clone(), limits.clone(), stats.clone(), pick.clone());
        let reply = Replier {
            sock: sock.clone(),
            local: here,
            client,
        };
        tokio::spawn(async move {
            open_captured_flow(pick, rx, reply, limits, stats, permit).await;
            let mut g = lock(&local);
            if g.get(&key).is_some_and(|(gen, _)| *gen == my_gen) {
                g.remove(&key);
            }
        });
    }
}

/// The start of one captured flow: its original destination from
/// conntrack, the session `pick` chooses for it, a flow id, a stream
/// opened to the far side; then it runs until idle. A flow that cannot
/// start drops its queued packets, counted as `dropped_unknown_flow`.
async fn open_captured_flow(
    pick: Arc<PickConn>,
    rx: mpsc::Receiver<Bytes>,
    reply: Replier,
    limits: FlowLimits,
    stats: Arc<UdpStats>,
    starting: tokio::sync::OwnedSemaphorePermit,
) {
    let (client, here) = (reply.client, reply.local);
    let dst = match crate::conntrack::original_dst_udp(here, client).await {
        Ok(d) => SocketAddr::V4(d),
        Err(e) => {
            stats.dropped_unknown_flow.fetch_add(1, Relaxed);
            debug!(%client, %here, error = %e, "no conntrack entry for captured udp");
            return;
        }
    };
    let Some((conn, flows)) = pick(dst) else {
        stats.dropped_unknown_flow.fetch_add(1, Relaxed);
        debug!(%client, %dst, "no session for captured udp destination");
        return;
    };
    let Some(flow) = flows.register(None) else {
        debug!(%client, %dst, "udp flow cap reached");
        return;
    };
    let open = relay_protocol::StreamOpen {
        target: relay_protocol::Target::Addr(dst),
        source: Some(SocketAddr::V4(client)),
        l4: relay_protocol::L4::Udp { flow: flow.id },
    };
    let opened = crate::conn::open_stream(&conn, &open, limits.open_timeout).await;
    // Started (or refused): it no longer counts against new flows.
    drop(starting);
    match opened {
        Ok(bi) => run_opened_flow(bi, conn, flow, rx, reply, limits.idle, stats).await,
        Err(r) => {
            debug!(%client, %dst, reason = r.status.as_str(), msg = %r.message, "udp flow refused")
        }
    }
}
