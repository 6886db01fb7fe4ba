//! yamux over an established TLS stream.
//!
//! yamux does all its I/O inside `poll_next_inbound`, so one driver task
//! owns the connection and polls it without pause; other tasks ask it for
//! new streams and take inbound ones from a queue as deep as the number
//! of the peer's streams a side holds (so the driver never has to stop
//! polling).
//!
//! **Stream limits.** yamux (0.13) keeps one table of streams for both
//! directions and ends the whole connection when it is full: a local open
//! fails with `TooManyStreams` and its connection moves to cleanup (inside
//! yamux, whatever the caller does next), and a peer's new stream is
//! answered with a GOAWAY. So the table must never fill, and the counts
//! are kept below it here ([`LIMITS`]): a side opens at most
//! [`StreamLimits::outbound`] streams itself and an open past that waits
//! for one of them to end, as a QUIC open waits for stream credit (callers
//! bound the wait, as they do on QUIC); it holds at most
//! [`StreamLimits::inbound`] of the peer's (twice what a peer opens at
//! once: the peer's count drops when it lets a stream go, this side's
//! only once its own task has seen that), and a stream the peer opens past
//! that is reset on its own, the connection staying up (an older peer that
//! opens without a bound). A stream counts from its open (or its arrival)
//! until its last handle is dropped.
//!
//! **Memory.** yamux gives every stream a receive window of 256 KiB, fixed
//! by its specification (a peer may send that much on a new stream before
//! any window update), and the connection window may not be set below
//! table size × 256 KiB. It is set to exactly that, so no stream's window
//! grows past 256 KiB, and what one session can make this side buffer
//! (received, not yet read) is at most [`SESSION_RECEIVE_LIMIT`]: 1,024
//! streams × 256 KiB = 256 MiB; with peers that keep the bounds above,
//! (320 + 640) × 256 KiB = 240 MiB. (QUIC: `conn_window`, 8 MiB.)

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::budget::{SendBudget, MAX_FRAME};
use super::driver::{datagram_reader, datagram_writer, drive, DatagramStream, Incoming, Slots};
use crate::conn::{ConnLost, DatagramRefused};

/// First byte the edge writes on the datagram stream.
pub const DATAGRAM_STREAM_MARK: u8 = 0x44;

/// Largest datagram carried on the TCP transport (it is not bound by a
/// path MTU, but a flow's payload is still one UDP datagram).
pub const MAX_TCP_DATAGRAM: usize = 65_507;

/// Why a connection was closed when the peer ended its datagram stream
/// while the connection was otherwise up ([`YamuxConn::closed`] gives it;
/// see [`YamuxConn::datagram_stream_ended_by_peer`]). A well-behaved peer
/// never does: without the close, no datagram would arrive for the rest
/// of the connection. (Crate-private: `tcp.rs` does not re-export it; the
/// typed test is [`YamuxConn::datagram_stream_ended_by_peer`].)
pub(crate) const PEER_ENDED_DATAGRAM_STREAM: &str = "peer ended the datagram stream";

/// How many streams one connection holds; see the module's
/// documentation.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    /// yamux's own table (`max_num_streams`): streams of both directions
    /// together, including those whose handles were dropped and that
    /// yamux has not removed yet. Reaching it ends the connection.
    table: usize,
    /// Streams this side opened and still holds (its datagram and control
    /// streams included); an open past this waits.
    outbound: usize,
    /// Streams the peer opened that this side holds, queued or served;
    /// one past this is reset.
    inbound: usize,
}

/// The limits of every connection: `outbound` + `inbound` leaves 64 of
/// the table for dropped streams yamux has not removed yet (it does so
/// as it writes their reset or FIN).
const LIMITS: StreamLimits = StreamLimits {
    table: 1024,
    outbound: 320,
    inbound: 640,
};
const _: () = assert!(LIMITS.outbound * 2 <= LIMITS.inbound);
const _: () = assert!(LIMITS.outbound + LIMITS.inbound < LIMITS.table);

/// A stream's receive window: yamux's 256 KiB, and never more here (see
/// [`config`]).
const STREAM_WINDOW: usize = yamux::DEFAULT_CREDIT as usize;

/// The most one session on the TCP fallback can make this side buffer,
/// received and not yet read, all streams together: 256 MiB, a full table
/// of yamux streams (1,024) with each one's 256 KiB window filled. yamux's
/// windows are 256 KiB at least (its specification) and its connection
/// window may not be smaller than table × 256 KiB, so this bound goes with
/// the number of streams; QUIC's is `conn_window` (8 MiB).
pub const SESSION_RECEIVE_LIMIT: usize = LIMITS.table * STREAM_WINDOW;

/// Datagrams queued each way (to send, and received but not yet read)
/// before new ones are dropped, as UDP would.
const DATAGRAM_QUEUE: usize = 1024;

/// A yamux stream with tokio's I/O traits, counted against its
/// connection's stream limits until dropped.
#[derive(Debug)]
pub struct TcpStreamHalf {
    // Dropped first: yamux learns of the drop before the slot is free.
    io: Compat<yamux::Stream>,
    /// The connection's end, once for reads and once for writes (each
    /// keeps the waker of the task polling it). When this side closes the
    /// connection (a session superseded, kicked, or judged dead), yamux
    /// 0.13 closes it gracefully without waking its streams, so a read
    /// waiting for data or a write waiting for window would wait until
    /// the stream's idle bound (an hour): instead, a stream with nothing
    /// left to give fails with a reset once the connection has ended.
    ended: [Pin<Box<WaitForCancellationFutureOwned>>; 2],
    /// The connection's budget of data queued inside yamux
    /// ([`super::budget`]); `None` for the session's control stream,
    /// which is exempt so it never waits a round behind bulk data.
    budget: Option<Arc<SendBudget>>,
    /// Nothing written yet: the stream's first write (the session's
    /// stream header: an open, or the reply to one) is exempt too, so a
    /// new stream is set up at once even while uploads fill the budget.
    fresh: bool,
    _slot: OwnedSemaphorePermit,
}

impl TcpStreamHalf {
    fn new(
        s: yamux::Stream,
        close: &CancellationToken,
        slot: OwnedSemaphorePermit,
        budget: Option<Arc<SendBudget>>,
    ) -> Self {
        let end = || Box::pin(close.clone().cancelled_owned());
        TcpStreamHalf {
            io: s.compat(),
            ended: [end(), end()],
            budget,
            fresh: true,
            _slot: slot,
        }
    }
}

/// `p`, unless it is pending and the connection has ended (`end`): then
/// a reset. What yamux still holds for the stream (data received, an end
/// of stream) comes first.
fn unless_ended<T>(
    end: &mut Pin<Box<WaitForCancellationFutureOwned>>,
    cx: &mut Context<'_>,
    p: Poll<std::io::Result<T>>,
) -> Poll<std::io::Result<T>> {
    match p {
        Poll::Pending if end.as_mut().poll(cx).is_ready() => Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "tunnel connection closed",
        ))),
        p => p,
    }
}

impl AsyncRead for TcpStreamHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let p = Pin::new(&mut this.io).poll_read(cx, buf);
        unless_ended(&mut this.ended[0], cx, p)
    }
}

impl AsyncWrite for TcpStreamHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(b) = this.budget.as_ref().filter(|_| !this.fresh) {
            if b.poll_room(cx).is_pending() {
                return unless_ended(&mut this.ended[1], cx, Poll::Pending);
            }
        }
        // Reserved before yamux queues the frame, which the connection's
        // task may write at once; what yamux did not take is given back.
        let reserved = buf.len().min(MAX_FRAME);
        if let Some(b) = &this.budget {
            b.reserve(reserved);
        }
        let p = Pin::new(&mut this.io).poll_write(cx, buf);
        let taken = match &p {
            Poll::Ready(Ok(n)) => {
                this.fresh = false;
                (*n).min(reserved)
            }
            _ => 0,
        };
        if let Some(b) = &this.budget {
            if taken < reserved {
                b.written(reserved - taken);
            }
        }
        unless_ended(&mut this.ended[1], cx, p)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let p = Pin::new(&mut this.io).poll_flush(cx);
        unless_ended(&mut this.ended[1], cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let p = Pin::new(&mut this.io).poll_shutdown(cx);
        unless_ended(&mut this.ended[1], cx, p)
    }
}

pub(super) type OpenReply = oneshot::Sender<Result<yamux::Stream, String>>;

/// A stream the peer opened, with its slot among [`StreamLimits::inbound`].
pub(super) type Inbound = (yamux::Stream, OwnedSemaphorePermit);

/// One TLS+TCP+yamux tunnel connection.
#[derive(Debug)]
pub struct YamuxConn {
    open: mpsc::Sender<OpenReply>,
    /// Slots for streams this side opens ([`StreamLimits::outbound`]);
    /// closed when the connection ends.
    outbound: Arc<Semaphore>,
    inbound: Mutex<mpsc::Receiver<Inbound>>,
    dgram_out: mpsc::Sender<Bytes>,
    dgram_in: Mutex<mpsc::Receiver<Bytes>>,
    remote: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    close: CancellationToken,
    closed: watch::Receiver<Option<String>>,
    reason: std::sync::Mutex<Option<String>>,
    /// Bytes read from the peer so far (decrypted: yamux frames).
    received: Arc<std::sync::atomic::AtomicU64>,
    /// What data streams may queue inside yamux ([`super::budget`]).
    budget: Arc<SendBudget>,
    /// Whether this side is the edge (it opens the control stream).
    client: bool,
    /// Set once the session's control stream exists: the first stream
    /// the edge opens after the datagram stream, the first the relay
    /// accepts after it.
    control_given: std::sync::atomic::AtomicBool,
    /// What the datagram stream's reader saw of the peer.
    datagrams: Arc<DatagramStream>,
}

/// yamux's configuration for `limits`: its table, and the smallest
/// connection window yamux takes for it (the initial 256 KiB per stream),
/// so no stream's window is ever raised above that.
fn config(limits: &StreamLimits) -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(limits.table);
    c.set_max_connection_receive_window(Some(limits.table * STREAM_WINDOW));
    c
}

impl YamuxConn {
    /// Runs yamux over an established TLS stream. The edge (`client`)
    /// opens and marks the datagram stream; the relay accepts it (bounded
    /// by `timeout`).
    pub async fn start<S>(
        io: S,
        client: bool,
        remote: SocketAddr,
        peer: (Vec<CertificateDer<'static>>, Option<Vec<u8>>),
        timeout: Duration,
    ) -> Result<Arc<YamuxConn>, ConnLost>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start_with(LIMITS, io, client, remote, peer, timeout).await
    }

    /// [`YamuxConn::start`] with given stream limits (tests play an
    /// unbounded peer with them).
    async fn start_with<S>(
        limits: StreamLimits,
        io: S,
        client: bool,
        remote: SocketAddr,
        (certs, alpn): (Vec<CertificateDer<'static>>, Option<Vec<u8>>),
        timeout: Duration,
    ) -> Result<Arc<YamuxConn>, ConnLost>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mode = if client {
            yamux::Mode::Client
        } else {
            yamux::Mode::Server
        };
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let budget = Arc::new(SendBudget::default());
        let io = super::counted::Counted {
            inner: io,
            read: received.clone(),
            written: budget.clone(),
        };
        let conn = yamux::Connection::new(io.compat(), config(&limits), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        // Never full: it holds no more than the inbound slots.
        let (in_tx, in_rx) = mpsc::channel(limits.inbound);
        let (closed_tx, closed_rx) = watch::channel(None);
        let close = CancellationToken::new();
        let outbound = Arc::new(Semaphore::new(limits.outbound));
        let slots = Slots {
            outbound: outbound.clone(),
            inbound: Arc::new(Semaphore::new(limits.inbound)),
        };
        let inbound = Incoming {
            queue: in_tx,
            slots: slots.inbound.clone(),
            reset: 0,
        };
        let datagrams = Arc::new(DatagramStream::default());
        tokio::spawn(drive(
            conn,
            open_rx,
            inbound,
            close.clone(),
            (closed_tx, slots),
            datagrams.clone(),
        ));
        let (dgram_out, out_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let (in_dgram_tx, in_dgram_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let me = Arc::new(YamuxConn {
            open: open_tx,
            outbound,
            inbound: Mutex::new(in_rx),
            dgram_out,
            dgram_in: Mutex::new(in_dgram_rx),
            remote,
            certs,
            alpn,
            close,
            closed: closed_rx,
            reason: std::sync::Mutex::new(None),
            received,
            budget,
            client,
            control_given: std::sync::atomic::AtomicBool::new(false),
            datagrams,
        });
        let setup = async {
            if client {
                let mut s = me.open_raw(false).await?;
                s.write_all(&[DATAGRAM_STREAM_MARK])
                    .await
                    .map_err(|e| ConnLost(e.to_string()))?;
                s.flush().await.map_err(|e| ConnLost(e.to_string()))?;
                Ok(s)
            } else {
                let mut s = me.accept_raw(false).await?;
                let mut mark = [0u8; 1];
                s.read_exact(&mut mark)
                    .await
                    .map_err(|e| ConnLost(e.to_string()))?;
                if mark[0] != DATAGRAM_STREAM_MARK {
                    return Err(ConnLost("first stream is not the datagram stream".into()));
                }
                Ok(s)
            }
        };
        let dstream = match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // The stream only says the connection is closed; the
                // driver knows why (a TLS alert refusing our certificate
                // arrives this way: TLS 1.3 lets the client write before
                // the server has checked its certificate). Bounded: a
                // connection still open is closed below.
                let why = tokio::time::timeout(Duration::from_millis(500), me.closed()).await;
                me.close_now(&e.0);
                return Err(match why {
                    Ok(why) if !e.0.contains(&why) => ConnLost(format!("{}: {why}", e.0)),
                    _ => e,
                });
            }
            Err(_) => {
                me.close_now("datagram stream setup timed out");
                return Err(ConnLost("datagram stream setup timed out".into()));
            }
        };
        let (r, w) = tokio::io::split(dstream);
        tokio::spawn(datagram_writer(w, out_rx, me.close.clone()));
        tokio::spawn(datagram_reader(
            r,
            in_dgram_tx,
            me.close.clone(),
            (me.datagrams.clone(), remote),
        ));
        Ok(me)
    }

    /// Opens a stream once this side has fewer than
    /// [`StreamLimits::outbound`] open; until then it waits (the
    /// semaphore is closed when the connection ends, which ends the wait).
    async fn open_raw(&self, control: bool) -> Result<TcpStreamHalf, ConnLost> {
        let slot = self
            .outbound
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.lost())?;
        let (tx, rx) = oneshot::channel();
        self.open.send(tx).await.map_err(|_| self.lost())?;
        let s = rx.await.map_err(|_| self.lost())?.map_err(ConnLost)?;
        Ok(TcpStreamHalf::new(
            s,
            &self.close,
            slot,
            self.budget_for(control),
        ))
    }

    /// The budget a new stream writes under: none for the control stream.
    fn budget_for(&self, control: bool) -> Option<Arc<SendBudget>> {
        (!control).then(|| self.budget.clone())
    }

    /// Whether the next stream this side opens (`opening`) or accepts is
    /// the session's control stream (see `control_given`).
    fn takes_control(&self, opening: bool) -> bool {
        opening == self.client
            && !self
                .control_given
                .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    async fn accept_raw(&self, control: bool) -> Result<TcpStreamHalf, ConnLost> {
        let (s, slot) = self
            .inbound
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| self.lost())?;
        Ok(TcpStreamHalf::new(
            s,
            &self.close,
            slot,
            self.budget_for(control),
        ))
    }

    fn lost(&self) -> ConnLost {
        ConnLost(
            self.closed
                .borrow()
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        )
    }

    /// Opens a stream, split for the session layer.
    pub async fn open_bi(&self) -> Result<(TcpSend, TcpRecv), ConnLost> {
        Ok(split(self.open_raw(self.takes_control(true)).await?))
    }

    /// Accepts the next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(TcpSend, TcpRecv), ConnLost> {
        Ok(split(self.accept_raw(self.takes_control(false)).await?))
    }

    /// Queues a datagram; dropped when the queue is full (as UDP would).
    pub fn send_datagram(&self, d: Bytes) -> Result<(), DatagramRefused> {
        if d.len() > MAX_TCP_DATAGRAM {
            return Err(DatagramRefused::TooLarge);
        }
        self.dgram_out.try_send(d).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DatagramRefused::QueueFull,
            mpsc::error::TrySendError::Closed(_) => DatagramRefused::Closed,
        })
    }

    /// Receives the next datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnLost> {
        self.dgram_in
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| self.lost())
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The application protocol negotiated in the TLS handshake.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.alpn.clone()
    }

    /// The peer's verified certificate chain.
    pub fn peer_certs(&self) -> Vec<CertificateDer<'static>> {
        self.certs.clone()
    }

    /// Closes the connection (yamux GOAWAY, then TCP close).
    pub fn close_now(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.close.cancel();
    }

    /// Bytes read from the peer so far (decrypted: yamux frames): grows
    /// whenever anything arrives, data, window updates or control.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Datagrams the peer sent with a length over [`MAX_TCP_DATAGRAM`]
    /// (no sender writes one): refused, their bytes skipped, the stream
    /// going on. Per connection; `udp::pump_datagrams` adds them to the
    /// process's `udp_dropped_total{reason="malformed"}`.
    pub fn datagrams_refused_oversize(&self) -> u64 {
        self.datagrams
            .oversize
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Datagrams the peer sent that were dropped on arrival because this
    /// side's queue of received datagrams (1,024) was full, as a full
    /// socket buffer drops them: nothing took them in time. Per
    /// connection; `udp::pump_datagrams` adds them to the process's
    /// `udp_dropped_total{reason="queue_full"}`.
    pub fn datagrams_dropped_queue_full(&self) -> u64 {
        self.datagrams
            .queue_full
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the connection was closed because the peer ended its
    /// datagram stream (FIN or reset) while the connection was otherwise
    /// up; [`YamuxConn::closed`] then says "peer ended the datagram
    /// stream" (unless this side had closed it first for a reason of its own). A
    /// stream ended by the connection's own end (a TLS alert, the peer
    /// closing) never counts: its reason is the one reported.
    pub fn datagram_stream_ended_by_peer(&self) -> bool {
        self.datagrams
            .ended_by_peer
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.clone();
        let why = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "connection closed".into(),
        };
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or(why)
    }
}

/// The write half of a yamux stream.
pub type TcpSend = tokio::io::WriteHalf<TcpStreamHalf>;
/// The read half of a yamux stream.
pub type TcpRecv = tokio::io::ReadHalf<TcpStreamHalf>;

fn split(s: TcpStreamHalf) -> (TcpSend, TcpRecv) {
    let (r, w) = tokio::io::split(s);
    (w, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// A guard on waits that must end (never a measure of speed).
    const GUARD: Duration = Duration::from_secs(120);

    /// Both ends of a connection over an in-memory pipe, as the edge
    /// (`client`) and the relay would run them.
    async fn pair(client: StreamLimits, server: StreamLimits) -> (Arc<YamuxConn>, Arc<YamuxConn>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let remote = ([192, 0, 2, 1], 1).into();
        let t = Duration::from_secs(10);
        let (c, s) = tokio::join!(
            YamuxConn::start_with(client, a, true, remote, (Vec::new(), None), t),
            YamuxConn::start_with(server, b, false, remote, (Vec::new(), None), t)
        );
        (c.unwrap(), s.unwrap())
    }

    fn is_up(c: &YamuxConn) -> bool {
        c.closed().now_or_never().is_none()
    }

    /// This side closing the connection (a session superseded, kicked or
    /// judged dead) ends its own streams with a reset: a read waiting for
    /// data and a write waiting for the peer's window, on both ends. yamux
    /// wakes neither on a local close; they waited for an hour.
    #[tokio::test]
    async fn a_local_close_resets_waiting_reads_and_writes() {
        let (c, s) = pair(LIMITS, LIMITS).await;
        let (mut cw, mut cr) = c.open_bi().await.unwrap();
        cw.write_all(b"x").await.unwrap();
        cw.flush().await.unwrap();
        let (sw, mut sr) = s.accept_bi().await.unwrap();
        let mut x = [0u8; 1];
        sr.read_exact(&mut x).await.unwrap();
        // A read waiting for data the peer never sends, and a write past
        // the peer's 256 KiB window (it never reads again).
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            cr.read(&mut buf).await
        });
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            loop {
                cw.write_all(&chunk).await?;
                cw.flush().await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!reader.is_finished() && !writer.is_finished(), "both wait");
        c.close_now("test: superseded");
        let r = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the waiting read ends")
            .unwrap();
        assert!(r.is_err() || r.as_ref().is_ok_and(|n| *n == 0), "{r:?}");
        let w = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the waiting write ends")
            .unwrap();
        assert!(w.is_err(), "{w:?}");
        // The peer's stream ends too (its side learns from the close).
        let mut buf = [0u8; 64];
        let p = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sr.read(&mut buf).await {
                    Ok(n) if n > 0 => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the peer's read ends");
        drop((sw, p));
    }

    /// The fallback's datagram queue says why it refused one: too large,
    /// full (the writer cannot run between these sends: one thread, no
    /// yield), or the connection ended.
    #[tokio::test]
    async fn datagram_refusals_say_why() {
        let (c, _s) = pair(LIMITS, LIMITS).await;
        let big = Bytes::from(vec![0u8; MAX_TCP_DATAGRAM + 1]);
        assert_eq!(c.send_datagram(big), Err(DatagramRefused::TooLarge));
        let d = Bytes::from_static(b"d");
        for _ in 0..DATAGRAM_QUEUE {
            c.send_datagram(d.clone()).unwrap();
        }
        assert_eq!(c.send_datagram(d.clone()), Err(DatagramRefused::QueueFull));
        c.close_now("test");
        tokio::time::timeout(GUARD, c.closed()).await.unwrap();
        tokio::time::timeout(GUARD, async {
            while c.send_datagram(d.clone()) != Err(DatagramRefused::Closed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a closed connection refuses datagrams as closed");
    }

    /// A yamux data frame (version 0, type 0) on stream 1, the first
    /// stream a client (the edge) opens.
    fn yamux_data(flags: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0];
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    }
    const SYN: u16 = 1;
    const FIN: u16 = 4;
    const RST: u16 = 8;

    /// `len`, then `body`: one datagram as it travels on the stream.
    fn framed(len: usize, body: &[u8]) -> Vec<u8> {
        let mut f = u16::try_from(len).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    /// The relay's side of a connection whose edge is played by hand with
    /// yamux frames: the datagram stream opened with its mark, then
    /// `stream`, in frames of 16 KiB. The edge's end of the pipe is
    /// returned, open: the connection stays up.
    async fn relay_with_hand_made_edge(stream: &[u8]) -> (Arc<YamuxConn>, tokio::io::DuplexStream) {
        let (mut edge, relay) = tokio::io::duplex(1 << 20);
        let mut wire = yamux_data(SYN, &[DATAGRAM_STREAM_MARK]);
        for chunk in stream.chunks(16 << 10) {
            wire.extend(yamux_data(0, chunk));
        }
        edge.write_all(&wire).await.unwrap();
        let remote = ([192, 0, 2, 1], 1).into();
        let c = YamuxConn::start(relay, false, remote, (Vec::new(), None), GUARD)
            .await
            .unwrap();
        (c, edge)
    }

    /// A datagram length over `MAX_TCP_DATAGRAM` (no sender writes one)
    /// is refused: its bytes are skipped, it is counted, and the datagrams
    /// after it arrive, the connection up. One of exactly the largest
    /// size still arrives. Before, lengths up to 65,535 were delivered.
    #[tokio::test]
    async fn an_over_long_datagram_is_refused_and_counted() {
        let mut stream = framed(MAX_TCP_DATAGRAM + 1, &vec![1u8; MAX_TCP_DATAGRAM + 1]);
        stream.extend(framed(usize::from(u16::MAX), &[2u8; u16::MAX as usize]));
        stream.extend(framed(MAX_TCP_DATAGRAM, &vec![3u8; MAX_TCP_DATAGRAM]));
        stream.extend(framed(5, b"after"));
        let (c, _edge) = relay_with_hand_made_edge(&stream).await;
        let largest = tokio::time::timeout(GUARD, c.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(largest.len(), MAX_TCP_DATAGRAM, "the largest carried");
        assert!(largest.iter().all(|&b| b == 3));
        let next = tokio::time::timeout(GUARD, c.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&next[..], b"after");
        assert_eq!(c.datagrams_refused_oversize(), 2);
        assert!(is_up(&c));
        assert!(!c.datagram_stream_ended_by_peer());
    }

    /// A peer that ends the datagram stream (FIN or reset) while the
    /// connection is up: what it sent before still arrives, the pump ends
    /// at once, and once `DATAGRAM_STREAM_GRACE` has passed without the
    /// connection ending of itself, this side closes it with that reason
    /// (the peer sees it closed), so the session is set up again. Before,
    /// the connection stayed up with no datagram reaching this side again.
    #[tokio::test]
    async fn a_peer_ending_the_datagram_stream_closes_the_connection() {
        for end in [FIN, RST] {
            let (c, mut edge) = relay_with_hand_made_edge(&framed(6, b"before")).await;
            let got = tokio::time::timeout(GUARD, c.read_datagram())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got[..], b"before");
            let t = std::time::Instant::now();
            edge.write_all(&yamux_data(end, &[])).await.unwrap();
            let pumped = tokio::time::timeout(GUARD, c.read_datagram())
                .await
                .expect("the pump ends with the stream");
            assert!(pumped.is_err(), "{pumped:?}");
            assert!(is_up(&c), "closed before the grace");
            let why = tokio::time::timeout(
                super::super::driver::DATAGRAM_STREAM_GRACE + Duration::from_secs(10),
                c.closed(),
            )
            .await
            .expect("the connection is closed within the grace");
            assert_eq!(why, PEER_ENDED_DATAGRAM_STREAM, "flags {end}");
            assert!(c.datagram_stream_ended_by_peer());
            assert!(t.elapsed() >= super::super::driver::DATAGRAM_STREAM_GRACE);
            // The peer's end sees the connection close (GOAWAY, then EOF).
            let mut rest = Vec::new();
            tokio::time::timeout(GUARD, edge.read_to_end(&mut rest))
                .await
                .expect("the peer's end is closed")
                .unwrap();
        }
    }

    /// `udp::pump_datagrams` over such a connection counts, in the
    /// process's UDP stats (`udp_dropped_total{reason="malformed"}`,
    /// `udp_datagram_streams_ended_total`), the over-long datagrams the
    /// reader skipped and the connection closed for the peer ending its
    /// datagram stream.
    #[tokio::test]
    async fn the_pump_counts_over_long_datagrams_and_an_ended_stream() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut stream = framed(MAX_TCP_DATAGRAM + 1, &vec![1u8; MAX_TCP_DATAGRAM + 1]);
        stream.extend(framed(5, b"after"));
        let (c, mut edge) = relay_with_hand_made_edge(&stream).await;
        let stats = Arc::new(crate::udp::UdpStats::default());
        let table = crate::udp::FlowTable::new(0, 16, false, stats.clone());
        let pump = tokio::spawn(crate::udp::pump_datagrams(
            crate::conn::TunnelConn::Tcp(c.clone()),
            table,
        ));
        // "after" is for no flow; it reaches the table after the skip.
        let t = std::time::Instant::now();
        while stats.dropped_unknown_flow.load(Relaxed) == 0 {
            assert!(t.elapsed() < GUARD, "the pump never saw the datagram");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.dropped_malformed.load(Relaxed), 1);
        assert_eq!(stats.datagram_streams_ended.load(Relaxed), 0);
        edge.write_all(&yamux_data(FIN, &[])).await.unwrap();
        tokio::time::timeout(super::super::driver::DATAGRAM_STREAM_GRACE + GUARD, pump)
            .await
            .expect("the pump ends once the connection is closed")
            .unwrap();
        assert_eq!(stats.datagram_streams_ended.load(Relaxed), 1);
        assert_eq!(stats.dropped_malformed.load(Relaxed), 1);
    }

    /// `n` datagrams as the edge sends them on the datagram stream, each
    /// its 4-byte index (a flow id no flow has), in one yamux frame: yamux
    /// hands the whole frame to the stream at once (well within its
    /// 256 KiB window for the `n` used here).
    fn burst(n: usize) -> Vec<u8> {
        let mut stream = Vec::with_capacity(n * 6);
        for i in 0..n {
            stream.extend(framed(4, &u32::try_from(i).unwrap().to_be_bytes()));
        }
        assert!(stream.len() < STREAM_WINDOW);
        yamux_data(0, &stream)
    }

    /// Datagrams the reader has handled so far: queued for the pump, or
    /// dropped for a full queue.
    fn handled(c: &YamuxConn) -> usize {
        let queued = c.dgram_in.try_lock().map(|q| q.len()).unwrap_or(0);
        queued + c.datagrams_dropped_queue_full() as usize
    }

    /// Waits until the reader has handled `n` datagrams.
    async fn until_handled(c: &YamuxConn, n: usize) {
        tokio::time::timeout(GUARD, async {
            while handled(c) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the reader handled {} of {n}", handled(c)));
    }

    /// A burst past the queue of received datagrams (1,024) while nothing
    /// reads them: the first 1,024 are kept, in order, and every one lost
    /// is counted, exactly sent − received. Before, they were dropped
    /// uncounted.
    #[tokio::test]
    async fn datagrams_dropped_for_a_full_queue_are_counted() {
        const SENT: usize = 3 * DATAGRAM_QUEUE + 17;
        let (c, mut edge) = relay_with_hand_made_edge(&[]).await;
        edge.write_all(&burst(SENT)).await.unwrap();
        until_handled(&c, SENT).await;
        // Everything queued: the reader has handled the whole burst.
        let mut received = Vec::new();
        while !c.dgram_in.lock().await.is_empty() {
            received.push(c.read_datagram().await.unwrap());
        }
        assert_eq!(received.len(), DATAGRAM_QUEUE);
        for (i, d) in received.iter().enumerate() {
            assert_eq!(&d[..], &u32::try_from(i).unwrap().to_be_bytes());
        }
        assert_eq!(
            c.datagrams_dropped_queue_full(),
            (SENT - received.len()) as u64
        );
        assert!(is_up(&c));
    }

    /// `udp::pump_datagrams` adds those drops to the process's UDP stats
    /// (`udp_dropped_total{reason="queue_full"}`, the reason QUIC's full
    /// send queue is counted under): with the pump started after the
    /// burst, the kept datagrams reach the table (no flow takes them) and
    /// the rest are counted as queue full, together exactly what was sent.
    #[tokio::test]
    async fn the_pump_counts_datagrams_dropped_for_a_full_queue() {
        use std::sync::atomic::Ordering::Relaxed;
        const SENT: usize = 2 * DATAGRAM_QUEUE + 5;
        let (c, mut edge) = relay_with_hand_made_edge(&[]).await;
        edge.write_all(&burst(SENT)).await.unwrap();
        until_handled(&c, SENT).await;
        let stats = Arc::new(crate::udp::UdpStats::default());
        let table = crate::udp::FlowTable::new(0, 16, false, stats.clone());
        let pump = tokio::spawn(crate::udp::pump_datagrams(
            crate::conn::TunnelConn::Tcp(c.clone()),
            table,
        ));
        tokio::time::timeout(GUARD, async {
            while (stats.dropped_unknown_flow.load(Relaxed) as usize) < DATAGRAM_QUEUE {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the pump never took the queued datagrams");
        assert_eq!(
            stats.dropped_queue_full.load(Relaxed) as usize,
            SENT - DATAGRAM_QUEUE
        );
        let shown = stats.render_prometheus("relay");
        let line = format!(
            "relay_udp_dropped_total{{reason=\"queue_full\"}} {}\n",
            SENT - DATAGRAM_QUEUE
        );
        assert!(shown.contains(&line), "{shown}");
        c.close_now("test: done");
        tokio::time::timeout(GUARD, pump).await.unwrap().unwrap();
        assert_eq!(
            (stats.dropped_unknown_flow.load(Relaxed) + stats.dropped_queue_full.load(Relaxed))
                as usize,
            SENT
        );
    }

    /// While the reader works through a burst yamux already holds (here
    /// 20,000 datagrams, one frame), another task on the same thread runs
    /// between its steps: a task sampling how far the reader got sees it
    /// part-way, many times, and never more than a few hundred datagrams
    /// on between two of its turns. Before, the reader took the whole
    /// burst in one poll (yamux never returns `Pending` while it holds
    /// data), and the sampler saw nothing between none and all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_of_datagrams_does_not_starve_the_thread() {
        const SENT: usize = 20_000;
        let (c, mut edge) = relay_with_hand_made_edge(&[]).await;
        let sampler = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut samples = vec![handled(&c)];
                while *samples.last().unwrap() < SENT {
                    tokio::task::yield_now().await;
                    samples.push(handled(&c));
                }
                samples
            })
        };
        edge.write_all(&burst(SENT)).await.unwrap();
        let samples = tokio::time::timeout(GUARD, sampler)
            .await
            .expect("the reader never handled the burst")
            .unwrap();
        let part_way = samples.iter().filter(|&&n| 0 < n && n < SENT).count();
        let largest_step = samples.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            part_way >= SENT / 1024 && largest_step <= 1024,
            "{part_way} samples part-way, the largest step {largest_step} datagrams"
        );
    }

    /// The connection's own end ends the datagram stream too, and its
    /// reason is the one reported, never "peer ended the datagram stream":
    /// the peer's TCP close, a yamux protocol error, and a peer closing
    /// its connection (its yamux ends the datagram stream, then sends its
    /// GOAWAY). (A TLS alert refusing the certificate: `tcp::dial`'s
    /// `a_refused_certificate_is_named_wherever_the_refusal_lands`.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connections_own_end_is_not_taken_for_the_datagram_streams() {
        // Past the reader's grace: a reader that took the stream's end for
        // the peer's doing would have marked it by then.
        let settle = super::super::driver::DATAGRAM_STREAM_GRACE + Duration::from_millis(500);
        // The peer's TCP close.
        let (c, edge) = relay_with_hand_made_edge(&framed(1, b"x")).await;
        drop(edge);
        let why = tokio::time::timeout(GUARD, c.closed()).await.unwrap();
        assert_eq!(why, "closed by peer");
        tokio::time::sleep(settle).await;
        assert!(!c.datagram_stream_ended_by_peer());
        assert_eq!(c.closed().await, "closed by peer");
        // A frame yamux cannot take (version 9).
        let (c, mut edge) = relay_with_hand_made_edge(&framed(1, b"x")).await;
        edge.write_all(&[9; 12]).await.unwrap();
        let why = tokio::time::timeout(GUARD, c.closed()).await.unwrap();
        assert_ne!(why, PEER_ENDED_DATAGRAM_STREAM);
        tokio::time::sleep(settle).await;
        assert!(!c.datagram_stream_ended_by_peer());
        assert_eq!(c.closed().await, why);
        // A real peer closing its connection, ten times (one wait past the
        // grace for all).
        let mut pairs = Vec::new();
        for _ in 0..10 {
            let (c, s) = pair(LIMITS, LIMITS).await;
            c.close_now("test: kicked");
            let why = tokio::time::timeout(GUARD, s.closed()).await.unwrap();
            assert_eq!(why, "closed by peer");
            pairs.push((c, s));
        }
        tokio::time::sleep(settle).await;
        for (c, s) in pairs {
            assert!(!s.datagram_stream_ended_by_peer());
            assert_eq!(c.closed().await, "test: kicked");
        }
    }

    /// 5,000 streams opened at once (yamux refused the 4,097th and the
    /// whole connection ended): the first ones open, each answered with a
    /// byte and held; the rest wait, and open as the earlier ones close.
    /// The connection stays up throughout.
    #[tokio::test]
    async fn opens_past_the_bound_wait_for_streams_to_close() {
        const OPENS: usize = 5000;
        let (c, s) = pair(LIMITS, LIMITS).await;
        // The accepting side answers a byte, then serves the stream until
        // the opener closes it, and closes its side too (as a splice does).
        let acceptor = s.clone();
        tokio::spawn(async move {
            while let Ok((mut w, mut r)) = acceptor.accept_bi().await {
                tokio::spawn(async move {
                    let _ = w.write_all(b"k").await;
                    let _ = w.flush().await;
                    let mut buf = [0u8; 16];
                    while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = w.shutdown().await;
                });
            }
        });
        // Every open is a task; an opened stream is held until the test
        // releases it, then closed both ways.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        for i in 0..OPENS {
            let (c, done) = (c.clone(), done_tx.clone());
            tokio::spawn(async move {
                let opened = async {
                    let (mut w, mut r) = c.open_bi().await.map_err(|e| e.0)?;
                    w.write_all(b"x").await.map_err(|e| e.to_string())?;
                    w.flush().await.map_err(|e| e.to_string())?;
                    let mut k = [0u8; 1];
                    r.read_exact(&mut k).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((w, r))
                }
                .await;
                let (mut w, mut r) = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = done.send((i, Err(e)));
                        return;
                    }
                };
                let (release, released) = oneshot::channel::<()>();
                let _ = done.send((i, Ok(release)));
                let _ = released.await;
                let _ = w.shutdown().await;
                let mut buf = [0u8; 16];
                while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
        // The datagram stream holds one of the opener's slots.
        let room = LIMITS.outbound - 1;
        let (mut opened, mut rounds) = (0, 0);
        while opened < OPENS {
            rounds += 1;
            assert!(
                rounds <= OPENS / room + 1,
                "{opened} opened in {rounds} rounds"
            );
            let mut held = Vec::new();
            for _ in 0..room.min(OPENS - opened) {
                let (i, r) = tokio::time::timeout(GUARD, done_rx.recv())
                    .await
                    .expect("an open with room never completed")
                    .unwrap();
                held.push(r.unwrap_or_else(|e| panic!("open {i} failed: {e}")));
            }
            opened += held.len();
            // Every slot is taken, so no other open can have completed: the
            // rest are waiting, and the connection is up.
            assert!(
                done_rx.try_recv().is_err(),
                "more than {room} streams opened at once"
            );
            assert!(
                is_up(&c) && is_up(&s),
                "connection ended after {opened} opens"
            );
            // Closing them lets the next ones open.
            for release in held {
                let _ = release.send(());
            }
        }
        assert_eq!(opened, OPENS);
        assert!(is_up(&c) && is_up(&s));
    }

    /// A peer that opens without a bound (an older edge, or a relay of an
    /// older release) more streams than yamux's table holds: the ones past
    /// this side's inbound slots are reset, one by one, and the connection
    /// stays up (yamux used to end it, for every stream and route).
    #[tokio::test]
    async fn a_peer_opening_past_the_bound_gets_resets_not_a_dead_connection() {
        let unbounded = StreamLimits {
            table: 4096,
            outbound: 4096,
            inbound: 4096,
        };
        let opens = LIMITS.table + 100;
        let (c, s) = pair(unbounded, LIMITS).await;
        // The accepting side answers a byte and holds every stream (a
        // target that never finishes).
        let acceptor = s.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut w, r)) = acceptor.accept_bi().await {
                let _ = w.write_all(b"k").await;
                let _ = w.flush().await;
                held.push((w, r));
            }
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..opens {
            let c = c.clone();
            tasks.spawn(async move {
                let (mut w, mut r) = c.open_bi().await.map_err(|e| e.0)?;
                w.write_all(b"x").await.map_err(|e| e.to_string())?;
                w.flush().await.map_err(|e| e.to_string())?;
                let mut k = [0u8; 1];
                r.read_exact(&mut k).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((w, r))
            });
        }
        let (mut held, mut reset) = (Vec::new(), 0);
        for _ in 0..opens {
            let r = tokio::time::timeout(GUARD, tasks.join_next())
                .await
                .expect("an open neither answered nor reset")
                .unwrap()
                .unwrap();
            match r {
                Ok(s) => held.push(s),
                Err(_) => reset += 1,
            }
        }
        // The datagram stream holds one of the acceptor's slots.
        assert_eq!(held.len(), LIMITS.inbound - 1);
        assert_eq!(reset, opens - held.len());
        assert!(is_up(&c) && is_up(&s), "{:?}", s.closed().now_or_never());
    }

    /// What one session can make this side buffer is bounded by yamux's
    /// configuration: its table of streams and a connection window that
    /// leaves no stream more than the initial 256 KiB. The bounds kept on
    /// the streams fit in the table.
    #[test]
    fn a_sessions_receive_buffers_are_bounded_by_the_configuration() {
        let c = format!("{:?}", config(&LIMITS));
        let setting = |name: &str| -> usize {
            let at = c.find(name).unwrap_or_else(|| panic!("{name} in {c}")) + name.len();
            let digits: String = c[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or_else(|_| panic!("{name} in {c}"))
        };
        let table = setting("max_num_streams: ");
        let window = setting("max_connection_receive_window: Some(");
        // yamux raises a stream's window only out of the connection window
        // beyond table × 256 KiB: there is none, so no stream buffers more
        // than its first 256 KiB, and all of them together the window.
        assert_eq!(window, table * 256 * 1024, "{c}");
        assert_eq!(window, SESSION_RECEIVE_LIMIT);
        assert!(window <= 256 << 20, "{window} bytes per session");
        // The streams both sides may hold fit in the table.
        assert!(LIMITS.outbound + LIMITS.inbound < table, "{c}");
    }
}
