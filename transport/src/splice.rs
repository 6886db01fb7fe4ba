//! Copying bytes between a local socket and a tunnel stream.
//!
//! Semantics carried across the tunnel:
//! - half-close: EOF from one side becomes a FIN (QUIC `finish`, TCP
//!   `shutdown(Write)`) on the other, and the other direction keeps flowing;
//! - reset: an error on either side aborts both: the tunnel stream is reset
//!   and stopped, and the local socket is closed with an RST.
//!
//! Flow control is per stream: when the local writer stalls we stop reading
//! the tunnel stream, and the transport's per-stream window pushes back on
//! that stream only.
//!
//! Bounds: a splice that moves no byte either way for the idle bound
//! (default [`DEFAULT_IDLE_TIMEOUT`], see [`set_idle_timeout`]) is reset like
//! any other failure, so a half-open peer cannot hold a task, a socket and
//! a stream forever; local TCP sockets get keep-alive probes so a vanished
//! host is noticed by the kernel as well: dialled ones from [`dial_tcp`]
//! ([`tune_tcp`]), accepted ones from their listener ([`tune_listener`]).
//! [`splice`] sets no socket option itself: options set per connection
//! were 10 of the syscalls of every tunnelled connection (loadtest
//! `connect`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::conn::{BiStream, RecvHalf, SendHalf};
use relay_protocol::close_code::STREAM_RESET;

pub use crate::splice_local::splice_local;

/// Read size for the local → tunnel direction once a stream carries bulk
/// traffic. Each read is handed to the QUIC stream as one chunk (no copy),
/// so a bigger read means fewer syscalls and fewer chunks per GiB; the
/// chunk is freed when the peer acknowledges it.
const LOCAL_READ_BUF: usize = 64 * 1024;

/// Chunks taken from the tunnel stream at once and written to the local
/// socket with one `writev`: a QUIC packet carries ~1.4 KB, so one write
/// per chunk was one syscall per packet.
const GATHER: usize = 16;

/// Largest read of a stream until one fills it (then [`LOCAL_READ_BUF`]).
/// These reads go to a buffer on the stack and are copied out at their
/// size, so an idle stream holds no read buffer (loadtest `streams`: 16 KiB
/// up front cost ~19.5 KiB of relay memory per idle stream; a 2 KiB buffer
/// held while waiting, about 2 KiB per stream on each side).
pub(crate) const INITIAL_READ_BUF: usize = 2 * 1024;

/// Default idle bound of a spliced connection: no byte either way for this
/// long and the splice is reset. Kubernetes' own streaming bound: the
/// kubelet closes an idle `kubectl exec` or port-forward after 4 h
/// (`streamingConnectionIdleTimeout`) and `kubectl logs -f` never, and a
/// database pool keeps idle connections for hours; a shorter bound here
/// cut what the cluster would have kept. The kernel's keep-alive (below)
/// finds dead hosts within minutes, so this only bounds live peers that
/// both stay silent.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// TCP keep-alive on local sockets: first probe after this much silence.
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Interval between keep-alive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel declares the peer dead
/// (so a vanished peer is found after 60 s + 6 × 10 s = 2 min).
const KEEPALIVE_RETRIES: u32 = 6;

/// The idle bound in milliseconds (process-wide; see [`set_idle_timeout`]).
static IDLE_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_IDLE_TIMEOUT.as_millis() as u64);

/// Sets the idle bound of splices started from now on (process-wide: the
/// `[quic] stream_idle_timeout` setting of either binary, applied when its
/// endpoint is built). Zero is treated as one millisecond.
pub fn set_idle_timeout(d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    IDLE_TIMEOUT_MS.store(ms, Relaxed);
}

/// The idle bound splices started now get.
pub fn idle_timeout() -> Duration {
    Duration::from_millis(IDLE_TIMEOUT_MS.load(Relaxed))
}

/// Turns on TCP keep-alive (60 s, then 6 probes 10 s apart) and disables
/// Nagle on a local TCP socket. Best effort: a socket that refuses is
/// still usable.
pub fn tune_tcp(s: &tokio::net::TcpStream) {
    tune(socket2::SockRef::from(s));
}

/// Sets what [`tune_tcp`] sets on a listener instead, once: Linux copies
/// keep-alive (with its timings) and `TCP_NODELAY` from a listening socket
/// to every socket it accepts, so accepted connections start tuned with no
/// syscall of their own. Best effort, as [`tune_tcp`].
pub fn tune_listener(l: &tokio::net::TcpListener) {
    tune(socket2::SockRef::from(l));
}

fn tune(sock: socket2::SockRef<'_>) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&ka);
    // Interactive traffic (kubectl exec) must not wait for Nagle.
    let _ = sock.set_tcp_nodelay(true);
}

/// Last time a splice moved a byte, shared by its two directions (both run
/// in one task; atomics only so the future stays `Send`); and how many
/// writes to the local socket since the last read from it.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    local_writes: AtomicU32,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            local_writes: AtomicU32::new(0),
        }
    }

    /// One more write to the local socket.
    fn wrote(&self) {
        self.local_writes.fetch_add(1, Relaxed);
    }

    /// A read from the local socket: whether more than one write went to
    /// it since the previous read (what came from the tunnel as one
    /// message, a request, reached the peer in parts).
    fn read_after_parts(&self) -> bool {
        self.local_writes.swap(0, Relaxed) > 1
    }

    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// Which way bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local socket into the tunnel.
    ToTunnel,
    /// From the tunnel to the local socket.
    FromTunnel,
}

/// Receives byte counts as they pass, so gauges are live during long streams.
pub trait Meter: Send + Sync {
    /// `bytes` more moved in `dir`.
    fn add(&self, dir: Direction, bytes: u64);
}

impl Meter for () {
    fn add(&self, _: Direction, _: u64) {}
}

/// A local socket a splice runs on: split into halves that the two
/// directions use at once, closed abortively (RST instead of FIN) after a
/// reset. TCP sockets come tuned (keep-alive, no Nagle): see the module
/// docs.
pub trait LocalStream: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    /// The half the local → tunnel direction reads.
    type Read: AsyncRead + Unpin + Send;
    /// The half the tunnel → local direction writes.
    type Write: AsyncWrite + Unpin + Send;

    /// Arranges for the next close to send a reset.
    fn set_abortive_close(&self);

    /// Splits the socket.
    fn halves(self) -> (Self::Read, Self::Write);

    /// Puts the halves back together and closes abortively.
    fn abort(read: Self::Read, write: Self::Write);

    /// Called after a read that emptied the receive queue: acknowledge
    /// what arrived now, not after the delayed-ACK timer. A peer that
    /// writes with Nagle's algorithm (no `TCP_NODELAY`) holds its next
    /// small write until the previous one is acknowledged, and the tunnel
    /// may hand it one request in two writes (the request crossed two
    /// QUIC packets): its answer to the first part then waits up to 40 ms
    /// for an ACK that Linux delays, hoping to piggyback it on data we do
    /// not send.
    fn ack_now(_read: &Self::Read) {}
}

impl LocalStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    fn set_abortive_close(&self) {
        // Failure only means the socket is already gone.
        let _ = self.set_zero_linger();
    }

    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    fn abort(read: Self::Read, write: Self::Write) {
        if let Ok(s) = read.reunite(write) {
            s.set_abortive_close();
        }
    }

    fn ack_now(read: &Self::Read) {
        // `TCP_QUICKACK` is not sticky: set after each read that drained
        // the socket, it sends a pending ACK at once. Failure only means
        // the socket is gone.
        let _ = socket2::SockRef::from(read.as_ref()).set_tcp_quickack(true);
    }
}

impl LocalStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;

    fn set_abortive_close(&self) {}

    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    fn abort(_: Self::Read, _: Self::Write) {}
}

impl<S: LocalStream> LocalStream for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;

    fn set_abortive_close(&self) {
        self.get_ref().0.set_abortive_close()
    }

    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }

    fn abort(read: Self::Read, write: Self::Write) {
        read.unsplit(write).set_abortive_close();
    }
}

/// What a finished splice did.
#[derive(Debug, Default, Clone)]
pub struct SpliceOutcome {
    /// Bytes copied from the local socket into the tunnel.
    pub to_tunnel: u64,
    /// Bytes copied from the tunnel to the local socket.
    pub from_tunnel: u64,
    /// Why the splice was aborted, if it was (`None`: both sides closed cleanly).
    pub reset: Option<String>,
}

#[derive(Debug)]
pub(crate) struct PumpError {
    pub(crate) bytes: u64,
    pub(crate) what: String,
}

async fn pump_to_tunnel<R: AsyncRead + Unpin>(
    local: &mut R,
    ack_now: impl Fn(&R),
    send: &mut SendHalf,
    pending: &[u8],
    meter: &dyn Meter,
    act: &Activity,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    let fail = |bytes, side: &str, e: std::io::Error| PumpError {
        bytes,
        what: format!("{side}: {e}"),
    };
    if !pending.is_empty() {
        send.write_all(pending)
            .await
            .map_err(|e| fail(total, "tunnel write", e))?;
        total += pending.len() as u64;
        meter.add(Direction::ToTunnel, pending.len() as u64);
    }
    // Until a read fills INITIAL_READ_BUF, reads go to a buffer on the
    // stack and leave as a chunk of their own size: a waiting stream holds
    // no buffer, and a request costs one allocation of its size (a 2 KiB
    // one per read took glibc malloc's slow path: over its thread cache's
    // 1,032 bytes, and a consolidation of its fast bins each time). A read
    // that fills it means bulk traffic: from then on each read lands in a
    // fresh LOCAL_READ_BUF chunk that the QUIC stream keeps as is (no
    // copy).
    let mut size = INITIAL_READ_BUF;
    let mut buf = BytesMut::new();
    loop {
        let read = if size == INITIAL_READ_BUF {
            read_small(local).await
        } else {
            buf.reserve(size);
            local.read_buf(&mut buf).await.map(|_| buf.split().freeze())
        };
        let chunk = read.map_err(|e| fail(total, "local read", e))?;
        let n = chunk.len();
        if n == 0 {
            send.shutdown()
                .await
                .map_err(|e| fail(total, "tunnel finish", e))?;
            return Ok(total);
        }
        act.touch();
        let full = n >= size;
        // The peer may be answering a request it got in parts with
        // Nagle's algorithm on: see `LocalStream::ack_now`. Only then,
        // and only once its answer has been read up: an ACK of its own
        // on every read cost 11 % of the request rate (loadtest rr).
        if act.read_after_parts() && !full {
            ack_now(local);
        }
        send.write_chunk(chunk)
            .await
            .map_err(|e| fail(total, "tunnel write", e))?;
        total += n as u64;
        meter.add(Direction::ToTunnel, n as u64);
        if full && size < LOCAL_READ_BUF {
            size = LOCAL_READ_BUF;
        }
    }
}

/// One read of at most [`INITIAL_READ_BUF`] bytes into a buffer on the
/// stack (alive only while the read is polled), copied out at its size;
/// empty at end of stream.
async fn read_small<R: AsyncRead + Unpin>(local: &mut R) -> std::io::Result<Bytes> {
    std::future::poll_fn(|cx| {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); INITIAL_READ_BUF];
        let mut rb = tokio::io::ReadBuf::uninit(&mut space);
        std::task::ready!(std::pin::Pin::new(&mut *local).poll_read(cx, &mut rb))?;
        std::task::Poll::Ready(Ok(Bytes::copy_from_slice(rb.filled())))
    })
    .await
}

async fn pump_from_tunnel<W: AsyncWrite + Unpin>(
    recv: &mut RecvHalf,
    local: &mut W,
    meter: &dyn Meter,
    dir: Direction,
    act: &Activity,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    let fail = |bytes, side: &str, e: std::io::Error| PumpError {
        bytes,
        what: format!("{side}: {e}"),
    };
    let mut chunks: [Bytes; GATHER] = Default::default();
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(k)) => {
                act.touch();
                let n = write_marking_stall(recv, write_all_chunks(local, &mut chunks[..k]))
                    .await
                    .map_err(|e| fail(total, "local write", e))?;
                act.wrote();
                total += n;
                meter.add(dir, n);
            }
            Ok(None) => {
                local
                    .shutdown()
                    .await
                    .map_err(|e| fail(total, "local shutdown", e))?;
                return Ok(total);
            }
            Err(e) => return Err(fail(total, "tunnel read", e)),
        }
    }
}

/// Runs `write` (of data read from `recv`); once it has waited
/// [`crate::stall::STALL_AFTER`], marks `recv` stalled until it completes,
/// so what the stream holds meanwhile does not come out of its session's
/// shared receive window ([`crate::stall`]). A write done at once (the
/// usual case) costs one poll and no timer.
async fn write_marking_stall<T>(
    recv: &RecvHalf,
    write: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::pin!(write);
    if let std::task::Poll::Ready(r) =
        std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await
    {
        return r;
    }
    match tokio::time::timeout(crate::stall::STALL_AFTER, &mut write).await {
        Ok(r) => r,
        Err(_) => {
            let _stalled = recv.stalled();
            write.await
        }
    }
}

/// Writes every chunk (gathered: `writev` where the writer supports it)
/// and empties them; returns the byte count.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<u64> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let n = if w.is_write_vectored() && chunks.len() - first > 1 {
            let mut io: [std::io::IoSlice<'_>; GATHER] = [std::io::IoSlice::new(&[]); GATHER];
            let k = chunks.len() - first;
            for (slot, c) in io.iter_mut().zip(&chunks[first..]) {
                *slot = std::io::IoSlice::new(c);
            }
            w.write_vectored(&io[..k]).await?
        } else {
            w.write(&chunks[first]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let c = &mut chunks[first];
            let take = left.min(c.len());
            bytes::Buf::advance(c, take);
            left -= take;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    Ok(total as u64)
}

/// Runs both directions until each ends, stopping at the first failure or
/// when neither moved a byte for `idle`. Returns the outcome; the caller
/// aborts both sides if it was reset.
pub(crate) async fn both_ways(
    up: impl std::future::Future<Output = Result<u64, PumpError>>,
    down: impl std::future::Future<Output = Result<u64, PumpError>>,
    act: &Activity,
    idle: Duration,
) -> SpliceOutcome {
    let mut out = SpliceOutcome::default();
    tokio::pin!(up, down);
    // One timer per idle period, not per chunk: when it fires early
    // (bytes moved meanwhile) it is re-armed from the last activity.
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            () = &mut timer => {
                let due = act.last() + idle;
                if Instant::now() >= due {
                    out.reset = Some(format!("idle: no byte either way for {idle:?}"));
                    break;
                }
                timer.as_mut().reset(due);
            }
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(n) => out.to_tunnel = n,
                    Err(e) => { out.to_tunnel = e.bytes; out.reset = Some(e.what); break; }
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(n) => out.from_tunnel = n,
                    Err(e) => { out.from_tunnel = e.bytes; out.reset = Some(e.what); break; }
                }
            }
        }
    }
    out
}

/// Splices `local` and the tunnel stream `bi` until both directions end.
/// `pending` holds bytes already read from `local` (after a CONNECT header)
/// that must go first. Returns byte counts and whether it was reset. A TCP
/// `local` must come tuned ([`dial_tcp`], or a listener tuned with
/// [`tune_listener`]).
pub async fn splice<L: LocalStream>(
    local: L,
    pending: &[u8],
    bi: BiStream,
    meter: &dyn Meter,
) -> SpliceOutcome {
    let BiStream { mut send, mut recv } = bi;
    let act = Activity::new();
    let (mut lr, mut lw) = local.halves();
    let out = both_ways(
        pump_to_tunnel(&mut lr, L::ack_now, &mut send, pending, meter, &act),
        pump_from_tunnel(&mut recv, &mut lw, meter, Direction::FromTunnel, &act),
        &act,
        idle_timeout(),
    )
    .await;
    if out.reset.is_some() {
        send.reset(STREAM_RESET);
        recv.stop(STREAM_RESET);
        L::abort(lr, lw);
    }
    out
}

/// Splices two tunnel streams (an edge-to-edge hairpin through the relay).
/// `to_tunnel` counts bytes from `a` into `b`; a reset on either side
/// resets both.
pub async fn splice_tunnels(a: BiStream, b: BiStream, meter: &dyn Meter) -> SpliceOutcome {
    let BiStream {
        send: mut a_send,
        recv: mut a_recv,
    } = a;
    let BiStream {
        send: mut b_send,
        recv: mut b_recv,
    } = b;
    let act = Activity::new();
    let out = both_ways(
        pump_from_tunnel(&mut a_recv, &mut b_send, meter, Direction::ToTunnel, &act),
        pump_from_tunnel(&mut b_recv, &mut a_send, meter, Direction::FromTunnel, &act),
        &act,
        idle_timeout(),
    )
    .await;
    if out.reset.is_some() {
        for s in [&mut a_send, &mut b_send] {
            s.reset(STREAM_RESET);
        }
        for r in [&mut a_recv, &mut b_recv] {
            r.stop(STREAM_RESET);
        }
    }
    out
}

/// Dials a TCP target with a bound, mapping failures to the reason a
/// caller should report. Used by the edge (to its targets) and by the
/// relay (to cloud targets). A non-zero `mark` tags the socket so the
/// host's capture rules let it pass (see [`crate::capture`]); `from`, the
/// original client's address, is the source the target sees (see
/// [`crate::capture::CaptureConfig::keep_source`]), else this host's.
pub async fn dial_tcp(
    addr: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
    timeout: Duration,
    mark: u32,
) -> Result<tokio::net::TcpStream, relay_protocol::StreamReply> {
    use relay_protocol::{StreamReply, StreamStatus};
    let connect = async {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        crate::capture::mark_socket(socket2::SockRef::from(&sock), mark)?;
        if let Some(from) = from {
            crate::capture::bind_foreign(socket2::SockRef::from(&sock), from)?;
        }
        sock.connect(addr).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(StreamReply::fail(
            StreamStatus::Timeout,
            format!("connect {addr}: no answer within {timeout:?}"),
        )),
        Ok(Err(e)) => {
            let status = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => StreamStatus::Refused,
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    StreamStatus::Unreachable
                }
                std::io::ErrorKind::TimedOut => StreamStatus::Timeout,
                _ => StreamStatus::Error,
            };
            Err(StreamReply::fail(status, format!("connect {addr}: {e}")))
        }
        Ok(Ok(s)) => {
            tune_tcp(&s);
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;

    /// Neither direction moves a byte: the splice is reset after the bound.
    #[tokio::test(start_paused = true)]
    async fn idle_splice_is_reset_after_the_bound() {
        let act = Activity::new();
        let t0 = Instant::now();
        let out = both_ways(pending(), pending(), &act, Duration::from_secs(3600)).await;
        assert!(out.reset.as_deref().unwrap_or("").starts_with("idle"));
        assert_eq!(t0.elapsed(), Duration::from_secs(3600));
    }

    /// Traffic defers the bound: it counts from the last byte, not the start.
    #[tokio::test(start_paused = true)]
    async fn activity_defers_the_idle_bound() {
        let act = Activity::new();
        let t0 = Instant::now();
        let up = async {
            tokio::time::sleep(Duration::from_secs(1800)).await;
            act.touch();
            pending::<Result<u64, PumpError>>().await
        };
        let out = both_ways(up, pending(), &act, Duration::from_secs(3600)).await;
        assert!(out.reset.is_some());
        assert_eq!(t0.elapsed(), Duration::from_secs(1800 + 3600));
    }

    /// Both ends of a yamux connection over an in-memory pipe: a tunnel
    /// for splices in tests (the TCP fallback's streams).
    async fn yamux_pair() -> (
        std::sync::Arc<crate::tcp::YamuxConn>,
        std::sync::Arc<crate::tcp::YamuxConn>,
    ) {
        use crate::tcp::YamuxConn;
        let (a, b) = tokio::io::duplex(256 * 1024);
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 9).into();
        let t = Duration::from_secs(5);
        let (ca, cb) = tokio::join!(
            YamuxConn::start(a, true, addr, (Vec::new(), None), t),
            YamuxConn::start(b, false, addr, (Vec::new(), None), t)
        );
        (ca.unwrap(), cb.unwrap())
    }

    /// A real splice (loopback TCP on one side, a yamux stream on the
    /// other) whose peers both fall silent is reset by a short bound.
    #[tokio::test]
    async fn silent_peers_do_not_hold_a_splice() {
        // The far side never accepts: yamux announces a stream with its
        // first bytes, and nobody sends any. `cb` stays alive, silent.
        let (ca, _cb) = yamux_pair().await;
        let opened = ca.open_bi().await;
        let (s, r) = opened.unwrap();
        let bi = BiStream {
            send: SendHalf::Tcp(s),
            recv: RecvHalf::Tcp(r),
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_peer, local) = tokio::join!(
            tokio::net::TcpStream::connect(l.local_addr().unwrap()),
            async { l.accept().await.unwrap().0 }
        );
        set_idle_timeout(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(10), splice(local, &[], bi, &()))
            .await
            .expect("an idle splice must end");
        set_idle_timeout(DEFAULT_IDLE_TIMEOUT);
        assert!(
            out.reset.as_deref().unwrap_or("").starts_with("idle"),
            "{out:?}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }

    /// What a local socket sends crosses whole and in order, the bytes
    /// read with the header first: a small read (copied off the stack),
    /// then reads that fill the small buffer and switch to bulk chunks;
    /// the socket's FIN ends the tunnel stream and the far end's FIN
    /// reaches the socket.
    #[tokio::test]
    async fn small_reads_then_bulk_cross_whole_and_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ca, cb) = yamux_pair().await;
        let (s, r) = ca.open_bi().await.unwrap();
        let bi = BiStream {
            send: SendHalf::Tcp(s),
            recv: RecvHalf::Tcp(r),
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (peer, local) = tokio::join!(
            tokio::net::TcpStream::connect(l.local_addr().unwrap()),
            async { l.accept().await.unwrap().0 }
        );
        let mut peer = peer.unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let spliced = tokio::spawn(async move { splice(local, b"head", bi, &()).await });
        let far = tokio::spawn(async move {
            let (mut send, mut recv) = cb.accept_bi().await.unwrap();
            let mut got = Vec::new();
            recv.read_to_end(&mut got).await.unwrap();
            send.shutdown().await.unwrap();
            got
        });
        peer.write_all(&data[..100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        peer.write_all(&data[100..]).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.unwrap();
        let got = far.await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..] == data[..], "bytes differ or missing");
        assert!(back.is_empty());
        let out = spliced.await.unwrap();
        assert!(out.reset.is_none(), "{out:?}");
        assert_eq!(out.to_tunnel, 4 + data.len() as u64);
    }

    /// Only a read after more than one write asks for an ACK at once.
    #[test]
    fn an_ack_is_asked_for_only_after_a_write_in_parts() {
        let act = Activity::new();
        assert!(!act.read_after_parts(), "nothing written");
        act.wrote();
        assert!(!act.read_after_parts(), "one write: a whole request");
        act.wrote();
        act.wrote();
        assert!(act.read_after_parts(), "a request in two writes");
        assert!(!act.read_after_parts(), "counted from the last read");
    }

    /// A request the tunnel delivers in two parts, to a service that
    /// answers each read as it comes with Nagle's algorithm on (no
    /// `TCP_NODELAY`, the socket default): the second part of the answer
    /// waits for the ACK of the first, which the splice's socket would
    /// delay by 40 ms or more (Linux's delayed-ACK minimum) once the
    /// exchange is interactive. `LocalStream::ack_now` sends it at once.
    /// Real sockets on loopback and a yamux stream as the tunnel. The bound
    /// is on the median of five requests, each about 8 ms with the ACK
    /// sent at once (the service's own pauses) and 45 ms or more without
    /// (seen with `ack_now` disabled).
    #[tokio::test]
    async fn a_request_in_parts_is_not_held_by_the_delayed_ack() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The service: echoes each read after a pause, Nagle on.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let svc_addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                tokio::time::sleep(Duration::from_millis(3)).await;
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let local = dial_tcp(svc_addr, None, Duration::from_secs(5), 0)
            .await
            .unwrap();
        let (relay_side, client_side) = yamux_pair().await;
        // The client at the far end of the tunnel opens the stream; yamux
        // announces it with its first bytes, so the splice starts once the
        // first request is sent.
        let (cs, cr) = client_side.open_bi().await.unwrap();
        let (mut send, mut recv) = (SendHalf::Tcp(cs), RecvHalf::Tcp(cr));
        // Sends `parts` 1 ms apart (so the splice writes them to the
        // service apart) and reads the whole answer; how long it took.
        async fn exchange(send: &mut SendHalf, recv: &mut RecvHalf, parts: &[&[u8]]) -> Duration {
            let t0 = std::time::Instant::now();
            let mut total = 0;
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                send.write_all(p).await.unwrap();
                send.flush().await.unwrap();
                total += p.len();
            }
            let mut back = vec![0u8; total];
            tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut back))
                .await
                .expect("the answer came")
                .unwrap();
            t0.elapsed()
        }
        send.write_all(&[b'w'; 1024]).await.unwrap();
        send.flush().await.unwrap();
        let (s, r) = relay_side.accept_bi().await.unwrap();
        let bi = BiStream {
            send: SendHalf::Tcp(s),
            recv: RecvHalf::Tcp(r),
        };
        tokio::spawn(async move { splice(local, &[], bi, &()).await });
        let mut first = vec![0u8; 1024];
        recv.read_exact(&mut first).await.unwrap();
        // Whole requests until the exchange is interactive (Linux acks the
        // first segments of a connection at once, then starts delaying).
        for _ in 0..30 {
            exchange(&mut send, &mut recv, &[&[b'w'; 1024]]).await;
        }
        let mut took = Vec::new();
        for _ in 0..5 {
            let t = exchange(&mut send, &mut recv, &[&[b'a'; 512], &[b'b'; 512]]).await;
            took.push(t);
        }
        took.sort();
        eprintln!("requests in two parts answered in {took:?}");
        assert!(
            took[2] < Duration::from_millis(30),
            "held by the delayed ACK: {took:?}"
        );
    }

    #[tokio::test]
    async fn accepted_and_dialled_tcp_sockets_get_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dialled = dial_tcp(addr, None, Duration::from_secs(5), 0)
            .await
            .unwrap();
        let (untuned, _) = l.accept().await.unwrap();
        assert!(socket2::SockRef::from(&dialled).keepalive().unwrap());
        assert!(socket2::SockRef::from(&dialled).tcp_nodelay().unwrap());
        assert!(!socket2::SockRef::from(&untuned).keepalive().unwrap());
        // Sockets accepted after the listener is tuned inherit the options.
        tune_listener(&l);
        let _dialled = dial_tcp(addr, None, Duration::from_secs(5), 0)
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        assert!(s.tcp_nodelay().unwrap());
    }
}
