//! yamux over an established TLS stream.
//!
//! yamux does all its I/O inside `poll_next_inbound`, so one driver task
//! owns the connection and polls it without pause; other tasks ask it for
//! new streams and take inbound ones from a queue as deep as yamux's own
//! stream limit (so the driver never has to stop polling).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::conn::ConnLost;

/// First byte the edge writes on the datagram stream.
pub const DATAGRAM_STREAM_MARK: u8 = 0x44;

/// Largest datagram carried on the TCP transport (it is not bound by a
/// path MTU, but a flow's payload is still one UDP datagram).
pub const MAX_TCP_DATAGRAM: usize = 65_507;

/// Streams either side may have open at once on one connection.
const MAX_STREAMS: usize = 4096;

/// Datagrams queued for sending before new ones are dropped, as UDP would.
const DATAGRAM_QUEUE: usize = 1024;

/// A yamux stream with tokio's I/O traits.
pub type TcpStreamHalf = Compat<yamux::Stream>;

type OpenReply = oneshot::Sender<Result<yamux::Stream, String>>;

/// One TLS+TCP+yamux tunnel connection.
#[derive(Debug)]
pub struct YamuxConn {
    open: mpsc::Sender<OpenReply>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    dgram_out: mpsc::Sender<Bytes>,
    dgram_in: Mutex<mpsc::Receiver<Bytes>>,
    remote: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    close: CancellationToken,
    closed: watch::Receiver<Option<String>>,
    reason: std::sync::Mutex<Option<String>>,
}

fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS);
    // yamux wants at least its 256 KiB default window per stream.
    c.set_max_connection_receive_window(Some(256 * 1024 * MAX_STREAMS));
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
        let conn = yamux::Connection::new(io.compat(), config(), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(MAX_STREAMS);
        let (closed_tx, closed_rx) = watch::channel(None);
        let close = CancellationToken::new();
        tokio::spawn(drive(conn, open_rx, in_tx, close.clone(), closed_tx));
        let (dgram_out, out_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let (in_dgram_tx, in_dgram_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let me = Arc::new(YamuxConn {
            open: open_tx,
            inbound: Mutex::new(in_rx),
            dgram_out,
            dgram_in: Mutex::new(in_dgram_rx),
            remote,
            certs,
            alpn,
            close,
            closed: closed_rx,
            reason: std::sync::Mutex::new(None),
        });
        let setup = async {
            if client {
                let mut s = me.open_raw().await?.compat();
                s.write_all(&[DATAGRAM_STREAM_MARK])
                    .await
                    .map_err(|e| ConnLost(e.to_string()))?;
                s.flush().await.map_err(|e| ConnLost(e.to_string()))?;
                Ok(s)
            } else {
                let mut s = me.accept_raw().await?.compat();
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
                me.close_now(&e.0);
                return Err(e);
            }
            Err(_) => {
                me.close_now("datagram stream setup timed out");
                return Err(ConnLost("datagram stream setup timed out".into()));
            }
        };
        let (r, w) = tokio::io::split(dstream);
        tokio::spawn(datagram_writer(w, out_rx, me.close.clone()));
        tokio::spawn(datagram_reader(r, in_dgram_tx, me.close.clone()));
        Ok(me)
    }

    async fn open_raw(&self) -> Result<yamux::Stream, ConnLost> {
        let (tx, rx) = oneshot::channel();
        self.open.send(tx).await.map_err(|_| self.lost())?;
        rx.await.map_err(|_| self.lost())?.map_err(ConnLost)
    }

    async fn accept_raw(&self) -> Result<yamux::Stream, ConnLost> {
        self.inbound
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| self.lost())
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
        Ok(split(self.open_raw().await?))
    }

    /// Accepts the next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(TcpSend, TcpRecv), ConnLost> {
        Ok(split(self.accept_raw().await?))
    }

    /// Queues a datagram; dropped when the queue is full (as UDP would).
    pub fn send_datagram(&self, d: Bytes) -> Result<(), String> {
        if d.len() > MAX_TCP_DATAGRAM {
            return Err(format!(
                "datagram of {} bytes is over {MAX_TCP_DATAGRAM}",
                d.len()
            ));
        }
        self.dgram_out.try_send(d).map_err(|e| e.to_string())
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

fn split(s: yamux::Stream) -> (TcpSend, TcpRecv) {
    let (r, w) = tokio::io::split(s.compat());
    (w, r)
}

/// Owns the yamux connection and keeps it polled until it ends or `close`.
async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::Sender<yamux::Stream>,
    close: CancellationToken,
    closed: watch::Sender<Option<String>>,
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
                    let _ = r.send(Err(e.to_string()));
                    return Poll::Ready(Some(e.to_string()));
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
                Poll::Ready(Some(Ok(s))) => {
                    // The queue is as deep as yamux's stream limit; a full
                    // queue means nobody accepts, and the stream is dropped.
                    if inbound.try_send(s).is_err() {
                        debug!("inbound stream dropped: nobody accepting");
                    }
                }
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
}

async fn datagram_writer(
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

async fn datagram_reader(
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
