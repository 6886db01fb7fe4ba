//! The tasks one yamux connection runs: the driver that owns the
//! connection and keeps it polled (opening streams, queueing the peer's
//! within their slots), and the datagram stream's writer and reader.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::mux::{Inbound, OpenReply, TcpStreamHalf, MAX_TCP_DATAGRAM, PEER_ENDED_DATAGRAM_STREAM};

/// How long the datagram stream's reader waits, once the peer's end of
/// the stream has ended, for the connection itself to end before it takes
/// the stream's end for the peer's own doing. Whatever ends a connection
/// ends its streams first: a TLS alert refusing this side's certificate
/// (yamux closes every stream, then the driver records the alert), a
/// GOAWAY or the peer's TCP close (a peer closing its connection drops
/// its datagram stream as it goes, and takes up to 2 s to close, the
/// driver's bound below). Its reason, not this one, must be the one
/// reported.
pub(super) const DATAGRAM_STREAM_GRACE: Duration = Duration::from_secs(3);

/// The grace in use, in milliseconds: [`DATAGRAM_STREAM_GRACE`] unless a
/// fuzz target shortened it ([`set_datagram_stream_grace`]).
static GRACE_MS: AtomicU64 = AtomicU64::new(DATAGRAM_STREAM_GRACE.as_millis() as u64);

/// Sets the datagram stream's grace (process-wide) for connections whose
/// stream ends from now on. For the `tcp_datagrams` fuzz target only,
/// whose every input ends the stream with the connection up and would
/// otherwise wait 3 s each; the binaries never call it.
#[doc(hidden)]
pub fn set_datagram_stream_grace(d: Duration) {
    GRACE_MS.store(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// What the datagram stream's reader saw of the peer, for the connection
/// ([`super::YamuxConn`], which exposes it) and its driver.
#[derive(Debug, Default)]
pub(super) struct DatagramStream {
    /// Datagrams whose length was over [`MAX_TCP_DATAGRAM`]: refused,
    /// their bytes skipped.
    pub(super) oversize: AtomicU64,
    /// Datagrams read whole and dropped because the connection's queue of
    /// received datagrams (`DATAGRAM_QUEUE`) was full: nobody took them
    /// fast enough.
    pub(super) queue_full: AtomicU64,
    /// The peer ended the stream while the connection was up (see
    /// [`datagram_reader`]): set before the connection is closed for it,
    /// so the driver gives [`PEER_ENDED_DATAGRAM_STREAM`] as its reason.
    pub(super) ended_by_peer: AtomicBool,
}

/// The stream slots of one connection, closed when it ends (so opens
/// waiting for one end too).
pub(super) struct Slots {
    pub(super) outbound: Arc<Semaphore>,
    pub(super) inbound: Arc<Semaphore>,
}

/// Where the driver puts the peer's streams: the queue, while there are
/// inbound slots; past them the stream is reset (dropped at once).
pub(super) struct Incoming {
    pub(super) queue: mpsc::Sender<Inbound>,
    pub(super) slots: Arc<Semaphore>,
    /// Streams reset so far for want of a slot.
    pub(super) reset: u64,
}

impl Incoming {
    fn take(&mut self, s: yamux::Stream) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            // Dropping an open stream makes yamux send its reset; the
            // connection and every other stream carry on.
            self.reset += 1;
            if self.reset == 1 {
                warn!(
                    stream = %s.id(),
                    "peer opened more streams than are held at once; resetting the excess"
                );
            } else {
                debug!(stream = %s.id(), reset = self.reset, "peer stream reset: no slot");
            }
            return;
        };
        // The queue is as deep as the slots, so it is full only when nobody
        // takes from it any more (the connection's handle is gone).
        if self.queue.try_send((s, slot)).is_err() {
            debug!("inbound stream dropped: nobody accepting");
        }
    }
}

/// Owns the yamux connection and keeps it polled until it ends or `close`.
pub(super) async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open: mpsc::Receiver<OpenReply>,
    mut inbound: Incoming,
    close: CancellationToken,
    (closed, slots): (watch::Sender<Option<String>>, Slots),
    datagrams: Arc<DatagramStream>,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenReply> = None;
    let mut cancelled = pin!(close.cancelled());
    let why = poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        // New outbound streams, one request at a time.
        loop {
            if pending.is_none() {
                match open.poll_recv(cx) {
                    Poll::Ready(Some(r)) => pending = Some(r),
                    Poll::Ready(None) => {
                        return Poll::Ready(Some("all handles dropped".to_string()))
                    }
                    Poll::Pending => break,
                }
            }
            let Some(r) = pending.take() else { break };
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    let _ = r.send(Ok(s));
                }
                Poll::Ready(Err(e)) => {
                    // That one open fails. Whether the connection goes on is
                    // yamux's to say (a refused open puts it into cleanup),
                    // through `poll_next_inbound` below; the bounds kept
                    // above make a refusal for a full table impossible.
                    debug!(error = %e, "yamux refused an outbound stream");
                    let _ = r.send(Err(e.to_string()));
                    break;
                }
                Poll::Pending => {
                    pending = Some(r);
                    break;
                }
            }
        }
        // Inbound streams; this also drives every stream's I/O.
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => inbound.take(s),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e.to_string())),
                Poll::Ready(None) => return Poll::Ready(Some("closed by peer".to_string())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    let why = match why {
        Some(w) => w,
        None => {
            // Our side closes: bounded, so a dead peer cannot hold us.
            let _ = tokio::time::timeout(Duration::from_secs(2), poll_fn(|cx| conn.poll_close(cx)))
                .await;
            // Only when the connection had not ended of itself (`why`
            // above): its own reason always comes first.
            if datagrams.ended_by_peer.load(Ordering::Acquire) {
                PEER_ENDED_DATAGRAM_STREAM.to_string()
            } else {
                "closed locally".to_string()
            }
        }
    };
    debug!(reason = %why, "yamux connection ended");
    close.cancel();
    closed.send_replace(Some(why));
    slots.outbound.close();
    slots.inbound.close();
}

/// Writes the datagram stream: each datagram behind its 2-byte length.
pub(super) async fn datagram_writer(
    mut w: tokio::io::WriteHalf<TcpStreamHalf>,
    mut rx: mpsc::Receiver<Bytes>,
    close: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            _ = close.cancelled() => return,
            d = rx.recv() => match d { Some(d) => d, None => return },
        };
        let mut frame = BytesMut::with_capacity(2 + d.len());
        frame.extend_from_slice(&(d.len() as u16).to_be_bytes());
        frame.extend_from_slice(&d);
        if w.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// Reads the datagram stream into `tx` (a full queue drops, counted in
/// `datagrams.queue_full`), until the connection is closed or the stream
/// ends.
///
/// It takes part in tokio's cooperative budget, one unit per datagram:
/// yamux is not tokio I/O and hands over what it holds for the stream (up
/// to its 256 KiB window) without ever returning `Pending`, so a peer's
/// burst of small datagrams (tens of thousands in one window) would
/// otherwise be read in a single poll, every other task of the thread
/// (the pump emptying the queue among them) waiting meanwhile.
///
/// A length over [`MAX_TCP_DATAGRAM`] (no sender writes one: the
/// connection refuses to queue it) is a protocol violation; its bytes are
/// skipped unread and it is counted (`datagrams.oversize`), warned about
/// once per connection, and the stream goes on. This is what every other
/// malformed datagram gets (one too short to name a flow, or for no flow,
/// is dropped and counted by `FlowTable::dispatch`): the framing is still
/// intact, only the datagram is bad, and a lost datagram is what UDP
/// promises anyway, where ending the stream would end the whole
/// connection for one bad datagram.
///
/// The peer ending the stream (FIN or reset) while the connection stays
/// up is another matter: a well-behaved peer never does, and no datagram
/// would reach this side for the rest of the connection, silently. So
/// once [`DATAGRAM_STREAM_GRACE`] has passed without the connection
/// ending of itself (which would have ended the stream too, and whose
/// reason comes first), the stream's end is logged, marked
/// (`datagrams.ended_by_peer`) and the connection closed, its reason
/// [`PEER_ENDED_DATAGRAM_STREAM`], so the session is set up again.
/// `tx` is dropped as soon as the stream ends: the pump ends at once.
pub(super) async fn datagram_reader(
    mut r: tokio::io::ReadHalf<TcpStreamHalf>,
    tx: mpsc::Sender<Bytes>,
    close: CancellationToken,
    (datagrams, remote): (Arc<DatagramStream>, SocketAddr),
) {
    let read = async {
        loop {
            // Yields only once the task's budget is spent: a thread-local
            // count otherwise (see above for why).
            tokio::task::consume_budget().await;
            let mut len = [0u8; 2];
            r.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_TCP_DATAGRAM {
                let n = datagrams.oversize.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 {
                    warn!(
                        peer = %remote,
                        len,
                        max = MAX_TCP_DATAGRAM,
                        "peer sent a datagram longer than the TCP fallback carries; skipping it (and any more)"
                    );
                } else {
                    debug!(peer = %remote, len, refused = n, "over-long datagram skipped");
                }
                // Skipped without a buffer of its size; a stream that ends
                // inside it ends at the next length.
                tokio::io::copy(&mut (&mut r).take(len as u64), &mut tokio::io::sink()).await?;
                continue;
            }
            let mut d = vec![0u8; len];
            r.read_exact(&mut d).await?;
            // A full queue drops the datagram, as a full socket buffer
            // would, and counts it (the pump reports it as
            // `udp_dropped_total{reason="queue_full"}`). A closed one
            // means the connection's handle is gone: nobody is counting.
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Bytes::from(d)) {
                datagrams.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
        #[allow(unreachable_code)]
        std::io::Result::Ok(())
    };
    let ended = tokio::select! {
        _ = close.cancelled() => return,
        r = read => r,
    };
    drop(tx);
    // The connection's own end comes first (see `DATAGRAM_STREAM_GRACE`):
    // the driver cancels `close` once it has recorded why.
    let grace = Duration::from_millis(GRACE_MS.load(Ordering::Relaxed));
    if tokio::time::timeout(grace, close.cancelled()).await.is_ok() {
        return;
    }
    let how = match ended {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "finished".to_string(),
        Err(e) => e.to_string(),
        Ok(()) => "ended".to_string(),
    };
    warn!(
        peer = %remote,
        how = %how,
        "peer ended the TCP fallback's datagram stream while the connection was up; closing the connection so the session is set up again"
    );
    datagrams.ended_by_peer.store(true, Ordering::Release);
    close.cancel();
}
