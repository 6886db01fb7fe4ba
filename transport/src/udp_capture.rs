//! The capture side of UDP: the socket redirected packets arrive on
//! ([`RedirectUdp`]) and the loop that turns them into flows through the
//! tunnel ([`serve_transparent_udp`]). Re-exported by [`crate::udp`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::conn::TunnelConn;

mod keep;
use crate::udp::{
    recv_with, run_local_flow, run_opened_flow, FlowTable, Stale, UdpStats, FLOW_QUEUE,
};

/// Captured flows starting at once (conntrack lookup and stream open in
/// progress), per capture loop: each holds a netlink socket and a task, so
/// a flood of new sources must not open them without bound. A packet that
/// would start one more is dropped and counted (`dropped_starting`).
pub const MAX_STARTING_FLOWS: usize = 256;

/// Where the kernel keeps conntrack's UDP timeouts (per network
/// namespace): how long an entry lives after its last packet, either way,
/// before it is a stream, and once it is one (see [`Activity::is_stream`]).
const CONNTRACK_UDP_TIMEOUT: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout";
const CONNTRACK_UDP_TIMEOUT_STREAM: &str =
    "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream";

/// The kernel's defaults for those, assumed when a file cannot be read.
pub(crate) const DEFAULT_CONNTRACK_UDP_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNTRACK_UDP_TIMEOUT_STREAM: Duration = Duration::from_secs(120);

/// conntrack's UDP timeouts in this thread's network namespace: (before a
/// stream, a stream), each its default when unreadable.
pub(crate) fn conntrack_udp_timeouts() -> (Duration, Duration) {
    let read = |path: &str, default: Duration| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| parse_timeout(&s))
            .unwrap_or(default)
    };
    (
        read(CONNTRACK_UDP_TIMEOUT, DEFAULT_CONNTRACK_UDP_TIMEOUT),
        read(
            CONNTRACK_UDP_TIMEOUT_STREAM,
            DEFAULT_CONNTRACK_UDP_TIMEOUT_STREAM,
        ),
    )
}

/// How long a captured flow may be quiet (no packet either way): the
/// configured bound, cut to end before the flow's conntrack entry would,
/// whose timeout depends on whether it has become a stream (see
/// `captured_idle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowIdle {
    /// While the flow is not a stream.
    pub(crate) unreplied: Duration,
    /// Once it is one.
    pub(crate) stream: Duration,
}

impl FlowIdle {
    /// `idle`, cut for conntrack's timeouts (before a stream, a stream).
    pub(crate) fn new(idle: Duration, (unreplied, stream): (Duration, Duration)) -> Self {
        FlowIdle {
            unreplied: captured_idle(idle, unreplied),
            stream: captured_idle(idle, stream),
        }
    }

    /// The bound for a flow whose activity is `a`.
    pub(crate) fn of(&self, a: &Activity) -> Duration {
        if a.is_stream() {
            self.stream
        } else {
            self.unreplied
        }
    }
}

fn parse_timeout(s: &str) -> Option<Duration> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs)
}

/// The idle bound of captured flows: `idle`, but shorter than conntrack's
/// UDP timeout `conntrack` (by a second, or by half of a timeout of 2 s or
/// less). A captured flow is keyed by its client address and learns its
/// original destination once; once conntrack forgets that destination,
/// the same client port sending elsewhere gets a new entry with the same
/// reply tuple (every flow is DNATed to one capture address), so its
/// packets would land on the old flow and go to the old destination, and
/// the old destination's answers would come back looking like the new
/// one's. Ending first (our stamps trail the kernel's refreshes by far
/// less than the margin) makes that packet start a flow of its own.
pub(crate) fn captured_idle(idle: Duration, conntrack: Duration) -> Duration {
    let margin = Duration::from_secs(1).min(conntrack / 2);
    idle.min(conntrack - margin)
}

/// Milliseconds on a monotonic clock shared by this process's flows: the
/// activity stamps of captured flows (see [`Activity`]).
pub(crate) fn clock_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How long after its start a captured flow with traffic both ways counts
/// as a stream (conntrack's rule for `IPS_ASSURED` on UDP: a packet more
/// than 2 s after the entry was made, once a reply was seen).
const STREAM_AFTER_MS: u64 = 2_000;

/// Slack on our side of that rule: our stamps are taken a little after the
/// kernel saw the packet (the client's when the capture loop reads it), so
/// a packet is counted only well past each threshold. Missing a stream
/// merely ends its flow at the shorter bound; taking a flow for one that
/// the kernel does not would let it outlive its entry.
const STREAM_SLACK_MS: u64 = 250;

/// What one captured flow did when ([`clock_ms`]), shared by the capture
/// loop (packets from the client) and the flow's [`Replier`] (replies):
/// conntrack refreshes its entry on packets either way, so the flow's idle
/// timer goes by both, and so does eviction at `FlowLimits::max_flows`.
#[derive(Debug)]
pub(crate) struct Activity {
    start: u64,
    last: AtomicU64,
    /// When the first reply went out (`u64::MAX`: none yet).
    first_reply: AtomicU64,
    /// The flow's original destination, once conntrack told it: what its
    /// entry is created again with if something deletes it (`keep.rs`).
    dst: OnceLock<SocketAddrV4>,
}

impl Activity {
    pub(crate) fn new(now: u64) -> Self {
        Activity {
            start: now,
            last: AtomicU64::new(now),
            first_reply: AtomicU64::new(u64::MAX),
            dst: OnceLock::new(),
        }
    }

    /// Whether a reply went out.
    fn replied(&self) -> bool {
        self.first_reply.load(Relaxed) != u64::MAX
    }

    /// A packet from the client at `now`.
    pub(crate) fn client(&self, now: u64) {
        self.last.fetch_max(now, Relaxed);
    }

    /// A reply sent to the client at `now`.
    pub(crate) fn reply(&self, now: u64) {
        self.first_reply.fetch_min(now, Relaxed);
        self.last.fetch_max(now, Relaxed);
    }

    /// Whether conntrack has made the flow's entry a stream (`ASSURED`,
    /// kept `nf_conntrack_udp_timeout_stream` after each packet): a packet
    /// either way after the first reply was seen and more than 2 s after
    /// the entry was made (`nf_conntrack_udp_packet`; the first reply
    /// itself does not count). Once so, always so: `last` only grows.
    pub(crate) fn is_stream(&self) -> bool {
        let first_reply = self.first_reply.load(Relaxed);
        let last = self.last.load(Relaxed);
        first_reply != u64::MAX
            && last > first_reply.saturating_add(STREAM_SLACK_MS)
            && last > self.start + STREAM_AFTER_MS + STREAM_SLACK_MS
    }

    /// How long since the flow's last packet, either way.
    pub(crate) fn quiet_for(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.last.load(Relaxed)))
    }

    /// Eviction order, least first: flows that are not streams (no reply,
    /// or nothing after their first 2 s: a DNS query and its answer)
    /// before streams, as conntrack's early drop spares assured entries;
    /// then the longest quiet. A server pushing every 100 ms after one
    /// subscribe is a stream and stays; by last activity alone a burst of
    /// queries within one push interval still closed it.
    pub(crate) fn eviction_rank(&self) -> (bool, u64) {
        (self.is_stream(), self.last.load(Relaxed))
    }
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
        let fd = self.sock.as_raw_fd();
        // Exactly the payload, read through the thread's scratch buffer:
        // no 64 KiB allocation per packet, and a queued packet keeps only
        // its own size (`Bytes::from` of a truncated 64 KiB buffer kept
        // all of it).
        let (payload, (src, dst)) = recv_with(&self.sock, |buf| {
            self.sock.try_io(tokio::io::Interest::READABLE, || {
                recv_orig(fd, buf).map(|(n, src, dst)| (n, (src, dst)))
            })
        })
        .await?;
        Ok((payload, src, dst))
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

/// Where replies of one captured flow go: to `client`, from `local`; each
/// reply sent is stamped on the flow's activity (see `Activity`), which
/// the flow's idle timer and eviction at `FlowLimits::max_flows` go by.
pub struct Replier {
    sock: Arc<RedirectUdp>,
    local: SocketAddrV4,
    client: SocketAddrV4,
    activity: Arc<Activity>,
}

impl Replier {
    pub(crate) async fn send(&self, payload: &[u8]) {
        // A lost reply is what UDP promises anyway. One that never left
        // (no route) refreshed no conntrack entry: no stamp.
        match self.sock.send_from(payload, self.local, self.client).await {
            Ok(()) => {
                self.activity.reply(clock_ms());
            }
            Err(e) => debug!(error = %e, "udp reply"),
        }
    }

    /// How long since the flow's last packet, either way.
    pub(crate) fn quiet_for(&self) -> Duration {
        self.activity.quiet_for()
    }

    /// How long the flow may be quiet now (see [`FlowIdle::of`]).
    pub(crate) fn idle_bound(&self, idle: &FlowIdle) -> Duration {
        idle.of(&self.activity)
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

/// Where a captured UDP flow goes, chosen by its original destination.
pub struct Picked {
    /// The connection to open the flow on.
    pub conn: TunnelConn,
    /// That connection's flow table.
    pub flows: Arc<FlowTable>,
    /// The target the flow names: the original destination, or the
    /// endpoint the picker chose for it (a ClusterIP resolved by the relay).
    pub target: SocketAddr,
    /// Ends the flow early when that choice goes stale.
    pub stale: Stale,
}

/// Where a captured UDP flow goes.
pub enum Pick {
    /// Through the tunnel.
    Tunnel(Picked),
    /// Straight to the target from a socket of ours, not through a tunnel:
    /// an edge's own endpoint of a Service (which then also answers while
    /// the relay is unreachable), or, on the relay, a Service's cloud
    /// endpoint; the flow ends early when that choice goes stale.
    Local(SocketAddr, Stale),
}

/// Chooses a captured UDP flow's way from its original destination; `None`
/// drops the flow's packets (counted).
pub type PickConn = dyn Fn(SocketAddr) -> Option<Pick> + Send + Sync;

/// Bounds for captured UDP flows.
#[derive(Debug, Clone)]
pub struct FlowLimits {
    /// Wait for the far side to accept a flow.
    pub open_timeout: Duration,
    /// A flow silent this long (no packet either way) ends; captured flows
    /// end a second before conntrack's UDP timeout when that is shorter
    /// (see [`serve_transparent_udp`]).
    pub idle: Duration,
    /// Mark for our reply sockets (see [`crate::capture`]).
    pub mark: u32,
    /// Captured flows open at once; a new one past this closes the flow
    /// idle the longest, packets either way (counted in
    /// `UdpStats::evicted`). Each flow holds a
    /// tunnel stream until it is idle for `idle`, so on the edge this must
    /// stay below the streams the relay grants (its `quic.max_streams`):
    /// a resolver sending each query from a new port would otherwise use
    /// up the credit, and every new TCP connection would wait for it.
    pub max_flows: usize,
}

/// A captured flow's key: (client, redirected address).
type Key = (SocketAddrV4, SocketAddrV4);

/// One open captured flow in the capture loop's table. The generation
/// lets a flow that ends remove its entry only if it is still its own,
/// not a successor's for the same key; the flow with the lowest
/// `Activity::eviction_rank` is evicted first.
struct FlowEntry {
    generation: u64,
    tx: mpsc::Sender<Bytes>,
    activity: Arc<Activity>,
}

/// The capture loop's table of open flows.
type Local = Mutex<HashMap<Key, FlowEntry>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning would only mean a flow task panicked mid-update.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The table as the conntrack keeper sees it: a flow counts while its
/// queue is open and it is within its idle bound (past it, the flow is
/// ending and its entry may expire).
struct OpenFlows {
    table: Arc<Local>,
    idle: FlowIdle,
}

impl OpenFlows {
    fn live(&self, (client, here): Key, e: &FlowEntry) -> Option<keep::LiveFlow> {
        let a = &e.activity;
        let quiet = a.quiet_for();
        (!e.tx.is_closed() && quiet < self.idle.of(a)).then(|| keep::LiveFlow {
            client,
            here,
            dst: a.dst.get().copied(),
            quiet,
            age: Duration::from_millis(clock_ms().saturating_sub(a.start)),
            replied: a.replied(),
            stream: a.is_stream(),
        })
    }
}

impl keep::LiveFlows for OpenFlows {
    fn get(&self, client: SocketAddrV4, here: SocketAddrV4) -> Option<keep::LiveFlow> {
        let t = lock(&self.table);
        t.get(&(client, here))
            .and_then(|e| self.live((client, here), e))
    }

    fn all(&self) -> Vec<keep::LiveFlow> {
        let t = lock(&self.table);
        t.iter().filter_map(|(k, e)| self.live(*k, e)).collect()
    }
}

/// Serves captured UDP: each (client, redirected address) pair is one
/// flow, whose original destination conntrack tells once, opened on the
/// connection `pick` chooses; replies go back from the redirected address
/// so the kernel restores the original one. Packets for a destination no
/// session serves are dropped and counted. A flow idle for
/// `limits.idle` ends, or a second before conntrack's UDP timeout in this
/// network namespace (`nf_conntrack_udp_timeout`, read once here) when
/// that is shorter: a flow must not outlive its conntrack entry (see
/// `captured_idle`). Meanwhile the flows' conntrack entries are kept: one
/// that something else deletes (kube-proxy's stale-entry cleanup deletes
/// them all whenever a UDP Service's endpoints change) is created again
/// at once, so replies keep being un-NATed and the client keeps its port
/// (`keep.rs`; counted in `UdpStats::conntrack_restored`). Runs until
/// `stop`.
pub async fn serve_transparent_udp(
    sock: RedirectUdp,
    pick: Arc<PickConn>,
    limits: FlowLimits,
    stats: Arc<UdpStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let conntrack = conntrack_udp_timeouts();
    let idle = FlowIdle::new(limits.idle, conntrack);
    if idle.unreplied < limits.idle {
        info!(
            unreplied = ?idle.unreplied,
            stream = ?idle.stream,
            configured = ?limits.idle,
            conntrack = ?conntrack,
            "captured UDP flows end before conntrack forgets them"
        );
    }
    let local: Arc<Local> = Arc::default();
    // The keeper of the flows' conntrack entries ends with this loop.
    let keeper_stop = stop.child_token();
    let _keeper = keeper_stop.clone().drop_guard();
    match sock.sock.local_addr() {
        Ok(a) => {
            let flows = Arc::new(OpenFlows {
                table: local.clone(),
                idle,
            });
            tokio::spawn(keep::keep_entries(
                flows,
                a.port(),
                conntrack,
                stats.clone(),
                keeper_stop,
            ));
        }
        Err(e) => debug!(error = %e, "capture socket address; conntrack entries not kept"),
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
        let now = clock_ms();
        let payload = {
            let mut flows = lock(&local);
            match flows.get(&key) {
                None => payload,
                Some(e) => {
                    e.activity.client(now);
                    match e.tx.try_send(payload) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            stats.dropped_queue_full.fetch_add(1, Relaxed);
                            continue;
                        }
                        // The flow is ending (idle, stale, stream ended: it
                        // closes its queue first); this packet starts a new
                        // one, in place of the old entry (which must not
                        // count against `max_flows` and evict a live flow).
                        Err(mpsc::error::TrySendError::Closed(p)) => {
                            flows.remove(&key);
                            p
                        }
                    }
                }
            }
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
        let activity = Arc::new(Activity::new(now));
        {
            let mut flows = lock(&local);
            // Make room: closing a flow's queue ends its task, which
            // finishes its stream and returns the stream's credit. A flow
            // already ending (its queue closed, its stream being shut)
            // goes first: it holds a slot and serves nobody.
            while flows.len() >= limits.max_flows.max(1) {
                let Some(oldest) = flows
                    .iter()
                    .min_by_key(|(_, e)| (!e.tx.is_closed(), e.activity.eviction_rank()))
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                flows.remove(&oldest);
                stats.evicted.fetch_add(1, Relaxed);
            }
            flows.insert(
                key,
                FlowEntry {
                    generation: my_gen,
                    tx,
                    activity: activity.clone(),
                },
            );
        }
        let (local, limits, stats, pick) =
            (local.clone(), limits.clone(), stats.clone(), pick.clone());
        let reply = Replier {
            sock: sock.clone(),
            local: here,
            client,
            activity,
        };
        tokio::spawn(async move {
            open_captured_flow(pick, rx, reply, (limits, idle), stats, permit).await;
            let mut g = lock(&local);
            if g.get(&key).is_some_and(|e| e.generation == my_gen) {
                g.remove(&key);
                crate::memory::shrink_sparse(&mut g);
            }
        });
    }
}

/// The start of one captured flow: its original destination from
/// conntrack, the session `pick` chooses for it, a flow id, a stream
/// opened to the far side (or a socket connected to a target reached
/// directly); then it runs until idle. A flow that cannot start drops its
/// queued packets, counted as `dropped_unknown_flow`.
async fn open_captured_flow(
    pick: Arc<PickConn>,
    rx: mpsc::Receiver<Bytes>,
    reply: Replier,
    (limits, idle): (FlowLimits, FlowIdle),
    stats: Arc<UdpStats>,
    starting: tokio::sync::OwnedSemaphorePermit,
) {
    let (client, here) = (reply.client, reply.local);
    let dst = match crate::conntrack::original_dst_udp(here, client).await {
        Ok(d) => {
            let _ = reply.activity.dst.set(d);
            SocketAddr::V4(d)
        }
        Err(e) => {
            stats.dropped_unknown_flow.fetch_add(1, Relaxed);
            debug!(%client, %here, error = %e, "no conntrack entry for captured udp");
            return;
        }
    };
    let Picked {
        conn,
        flows,
        target,
        stale,
    } = match pick(dst) {
        Some(Pick::Tunnel(p)) => p,
        Some(Pick::Local(ep, stale)) => {
            let sock = crate::udp::connect_target(ep, None, limits.mark).await;
            drop(starting);
            match sock {
                Ok(sock) => run_local_flow(sock, rx, reply, idle, stale, stats).await,
                Err(e) => debug!(%client, %dst, %ep, error = %e, "local udp endpoint"),
            }
            return;
        }
        None => {
            stats.dropped_unknown_flow.fetch_add(1, Relaxed);
            debug!(%client, %dst, "no session for captured udp destination");
            return;
        }
    };
    let Some(flow) = flows.register(None) else {
        debug!(%client, %dst, "udp flow cap reached");
        return;
    };
    let open = relay_protocol::StreamOpen {
        target: relay_protocol::Target::Addr(target),
        source: Some(SocketAddr::V4(client)),
        l4: relay_protocol::L4::Udp { flow: flow.id },
    };
    let opened = crate::conn::open_stream(&conn, &open, limits.open_timeout).await;
    // Started (or refused): it no longer counts against new flows.
    drop(starting);
    match opened {
        Ok(bi) => run_opened_flow((bi, conn, flow), rx, reply, idle, stale, stats).await,
        Err(r) => {
            debug!(%client, %dst, reason = r.status.as_str(), msg = %r.message, "udp flow refused")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_flows_end_before_their_conntrack_entry() {
        let s = Duration::from_secs;
        // The default: 30 s conntrack, 60 s configured.
        assert_eq!(captured_idle(s(60), s(30)), s(29));
        // A configured bound already shorter stays.
        assert_eq!(captured_idle(s(10), s(30)), s(10));
        assert_eq!(captured_idle(s(29), s(30)), s(29));
        // Tiny timeouts keep a bound above zero and below the timeout.
        assert_eq!(captured_idle(s(60), s(2)), s(1));
        assert_eq!(captured_idle(s(60), s(1)), Duration::from_millis(500));
    }

    #[test]
    fn the_sysctl_is_read_as_seconds_or_not_at_all() {
        assert_eq!(parse_timeout("30\n"), Some(Duration::from_secs(30)));
        assert_eq!(parse_timeout(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("0\n"), None);
        assert_eq!(parse_timeout(""), None);
        assert_eq!(parse_timeout("x"), None);
        // Whatever the host says, something sane comes back.
        let (unreplied, stream) = conntrack_udp_timeouts();
        assert!(unreplied > Duration::ZERO && stream > Duration::ZERO);
    }

    #[test]
    fn eviction_spares_streams_then_the_recently_active() {
        // A push flow: one subscribe at 0, pushes until 2,950.
        let push = Activity::new(0);
        push.client(0);
        for t in (100..3_000).step_by(100) {
            push.reply(t);
        }
        // DNS flows: a query and its answer, after the last push.
        let dns = |t| {
            let a = Activity::new(t);
            a.reply(t + 5);
            a
        };
        let (d1, d2) = (dns(2_910), dns(2_920));
        let mut all = [("push", &push), ("d1", &d1), ("d2", &d2)];
        all.sort_by_key(|(_, a)| a.eviction_rank());
        assert_eq!(all.map(|(n, _)| n), ["d1", "d2", "push"]);
        // Unanswered for 3 s: not a stream, however long it sends.
        let unanswered = Activity::new(0);
        unanswered.client(3_000);
        assert!(!unanswered.eviction_rank().0);
        // The first reply alone, however late, does not make a stream
        // (the kernel counts packets after it); one packet after it does.
        let older = Activity::new(0);
        older.reply(2_500);
        assert!(!older.is_stream());
        older.client(2_800);
        assert!(older.is_stream());
        // Among streams, the one quiet longer goes first.
        assert!(older.eviction_rank() < push.eviction_rank());
    }

    /// A flow's bound follows its conntrack entry's: 29 s before it is a
    /// stream, 119 s after (the defaults, 60 s configured: 60 s).
    #[test]
    fn a_stream_keeps_the_longer_bound() {
        let s = Duration::from_secs;
        let idle = FlowIdle::new(s(60), (s(30), s(120)));
        assert_eq!((idle.unreplied, idle.stream), (s(29), s(60)));
        let idle = FlowIdle::new(s(300), (s(30), s(120)));
        let a = Activity::new(0);
        a.client(0);
        a.reply(10);
        assert_eq!(idle.of(&a), s(29), "a query and its answer");
        a.client(1_000);
        assert_eq!(idle.of(&a), s(29), "within the first 2 s");
        a.client(2_500);
        assert_eq!(idle.of(&a), s(119), "a stream");
    }

    #[test]
    fn the_activity_clock_is_monotonic() {
        let a = clock_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock_ms() >= a + 5);
    }
}
