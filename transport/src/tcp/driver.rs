//! The tasks one yamux connection runs: the driver that owns the
//! connection and keeps it polled (opening streams, queueing the peer's
//! within their slots), and the datagram stream's writer and reader.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::mux::{Inbound, OpenReply, TcpStreamHalf};

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
            "closed locally".to_string()
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

/// Reads the datagram stream into `tx` (a full queue drops).
pub(super) async fn datagram_reader(
    mut r: tokio::io::ReadHalf<TcpStreamHalf>,
    tx: mpsc::Sender<Bytes>,
    close: CancellationToken,
) {
    let read = async {
        loop {
            let mut len = [0u8; 2];
            r.read_exact(&mut len).await?;
            let mut d = vec![0u8; u16::from_be_bytes(len) as usize];
            r.read_exact(&mut d).await?;
            // A full queue drops the datagram, as a full socket buffer would.
            let _ = tx.try_send(Bytes::from(d));
        }
        #[allow(unreachable_code)]
        std::io::Result::Ok(())
    };
    tokio::select! {
        _ = close.cancelled() => {}
        _ = read => {}
    }
}
