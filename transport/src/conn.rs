//! Transport-neutral connection and stream types.
//!
//! The session layer (handshake, control loop, stream serving) is written
//! against these types only. Each transport is one enum variant, so adding
//! the TLS+yamux fallback adds variants here and nothing above.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which transport carries a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// QUIC over UDP (the default).
    Quic,
    /// TLS over TCP with yamux (fallback where UDP is blocked).
    Tcp,
}

impl TransportKind {
    /// Stable lower-case label.
    pub fn as_str(&self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        }
    }
}

/// An established, authenticated tunnel connection.
#[derive(Debug, Clone)]
pub enum TunnelConn {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// TLS over TCP with yamux (the fallback).
    Tcp(std::sync::Arc<crate::tcp::YamuxConn>),
}

/// TLS alerts a server sends about the client's certificate: the number
/// (QUIC carries it in a CONNECTION_CLOSE, as `0x100 + alert`) and rustls'
/// name (in the TCP fallback's error text).
/// `DecryptError` is how rustls (webpki's `BadSignature`) refuses a
/// certificate whose issuer's name matches a trusted CA but whose
/// signature that CA did not make: a CA generated again under the same
/// name, the edge still holding the old one's certificate.
const CERTIFICATE_ALERTS: [(u8, &str); 7] = [
    (42, "BadCertificate"),
    (43, "UnsupportedCertificate"),
    (44, "CertificateRevoked"),
    (45, "CertificateExpired"),
    (46, "CertificateUnknown"),
    (48, "UnknownCA"),
    (51, "DecryptError"),
];

/// The certificate alert a TCP fallback's error text names (rustls says
/// `received fatal alert: <name>`), if any: the relay refused this side's
/// certificate. The text may come from the connection's close or from a
/// failed setup ([`crate::tcp::connect_with`] carries the close's reason).
pub fn certificate_alert_in(text: &str) -> Option<&'static str> {
    CERTIFICATE_ALERTS
        .iter()
        .find(|(_, name)| text.contains(&format!("received fatal alert: {name}")))
        .map(|(_, name)| *name)
}

/// Opening or accepting a stream failed: the connection is gone.
#[derive(Debug, thiserror::Error)]
#[error("tunnel connection lost: {0}")]
pub struct ConnLost(pub String);

impl TunnelConn {
    /// Opens a bidirectional stream (waits while the peer's stream limit is
    /// reached; callers bound the wait).
    pub async fn open_bi(&self) -> Result<BiStream, ConnLost> {
        match self {
            TunnelConn::Quic(c) => {
                let (s, r) = c.open_bi().await.map_err(|e| ConnLost(e.to_string()))?;
                Ok(BiStream {
                    send: SendHalf::Quic(s),
                    recv: RecvHalf::Quic(r, crate::stall::Stalls::new(c.clone())),
                })
            }
            TunnelConn::Tcp(c) => {
                let (s, r) = c.open_bi().await?;
                Ok(BiStream {
                    send: SendHalf::Tcp(s),
                    recv: RecvHalf::Tcp(r),
                })
            }
        }
    }

    /// Accepts the next bidirectional stream the peer opened.
    pub async fn accept_bi(&self) -> Result<BiStream, ConnLost> {
        match self {
            TunnelConn::Quic(c) => {
                let (s, r) = c.accept_bi().await.map_err(|e| ConnLost(e.to_string()))?;
                Ok(BiStream {
                    send: SendHalf::Quic(s),
                    recv: RecvHalf::Quic(r, crate::stall::Stalls::new(c.clone())),
                })
            }
            TunnelConn::Tcp(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok(BiStream {
                    send: SendHalf::Tcp(s),
                    recv: RecvHalf::Tcp(r),
                })
            }
        }
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match self {
            TunnelConn::Quic(_) => TransportKind::Quic,
            TunnelConn::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// The peer's address as we see it (after NAT).
    pub fn remote_addr(&self) -> SocketAddr {
        match self {
            TunnelConn::Quic(c) => c.remote_address(),
            TunnelConn::Tcp(c) => c.remote_addr(),
        }
    }

    /// Current smoothed round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        match self {
            TunnelConn::Quic(c) => c.rtt(),
            // yamux has no RTT estimate; the session's pings would be the
            // place to measure one.
            TunnelConn::Tcp(_) => Duration::ZERO,
        }
    }

    /// UDP datagrams received on this connection so far (QUIC; `None` on
    /// the TCP fallback). Its growth between two looks is how a session
    /// knows the path delivers without a message of its own: every QUIC
    /// keep-alive PING is answered by an ACK.
    pub fn datagrams_received(&self) -> Option<u64> {
        match self {
            TunnelConn::Quic(c) => Some(c.stats().udp_rx.datagrams),
            TunnelConn::Tcp(_) => None,
        }
    }

    /// A count that grows whenever anything arrives from the peer: UDP
    /// datagrams on QUIC, bytes (yamux frames) on the TCP fallback. What the edge's
    /// liveness check watches: while it grows the path lives, even when
    /// an answer to a control ping is queued behind data on a slow,
    /// deep-buffered uplink.
    pub fn arrivals(&self) -> u64 {
        match self {
            TunnelConn::Quic(c) => c.stats().udp_rx.datagrams,
            TunnelConn::Tcp(c) => c.bytes_received(),
        }
    }

    /// The application protocol negotiated in the TLS handshake (tunnel
    /// or certificate bootstrap).
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            TunnelConn::Quic(c) => c
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol),
            TunnelConn::Tcp(c) => c.alpn(),
        }
    }

    /// The peer's verified certificate chain, leaf first.
    pub fn peer_certs(&self) -> Vec<CertificateDer<'static>> {
        match self {
            TunnelConn::Quic(c) => c
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|b| *b)
                .unwrap_or_default(),
            TunnelConn::Tcp(c) => c.peer_certs(),
        }
    }

    /// Closes the connection with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            TunnelConn::Quic(c) => c.close(VarInt::from_u32(code), reason.as_bytes()),
            TunnelConn::Tcp(c) => c.close_now(&format!("{reason} (code {code})")),
        }
    }

    /// The application close code the peer closed the connection with,
    /// once it has (QUIC carries it; the TCP fallback does not: `None`).
    pub fn peer_close_code(&self) -> Option<u32> {
        match self {
            TunnelConn::Quic(c) => match c.close_reason()? {
                quinn::ConnectionError::ApplicationClosed(a) => {
                    u32::try_from(a.error_code.into_inner()).ok()
                }
                _ => None,
            },
            TunnelConn::Tcp(_) => None,
        }
    }

    /// Whether this side closed the QUIC connection
    /// ([`TunnelConn::close`]); always false on the TCP fallback, which
    /// needs no such look (its reader counts its own drops).
    pub fn closed_locally(&self) -> bool {
        match self {
            TunnelConn::Quic(c) => matches!(
                c.close_reason(),
                Some(quinn::ConnectionError::LocallyClosed)
            ),
            TunnelConn::Tcp(_) => false,
        }
    }

    /// Whether the peer ended the connection with a QUIC stateless reset:
    /// it answered but holds no state for the connection (a relay that
    /// restarted, or a replica that never had it), so it is up and a new
    /// attempt may be made at once. Always false on the TCP fallback.
    pub fn was_reset(&self) -> bool {
        match self {
            TunnelConn::Quic(c) => matches!(c.close_reason(), Some(quinn::ConnectionError::Reset)),
            TunnelConn::Tcp(_) => false,
        }
    }

    /// The TLS alert about our certificate the peer ended the connection
    /// with, by name (`CertificateExpired`, `CertificateRevoked`,
    /// `UnknownCA`, `BadCertificate`, ...), if that is how it ended: in TLS
    /// 1.3 the client finishes its handshake first, and the server's
    /// verdict on its certificate arrives as the connection's close, after
    /// which the tunnel sees only a connection lost. Waits up to `wait` for
    /// the close (the TCP fallback learns it from its driver).
    pub async fn refused_our_certificate(&self, wait: Duration) -> Option<&'static str> {
        match self {
            TunnelConn::Quic(c) => {
                let _ = tokio::time::timeout(wait, c.closed()).await;
                match c.close_reason() {
                    Some(quinn::ConnectionError::ConnectionClosed(close)) => {
                        let code = u64::from(close.error_code);
                        CERTIFICATE_ALERTS
                            .iter()
                            .find(|(n, _)| {
                                (0x100..0x200).contains(&code) && u64::from(*n) == code & 0xff
                            })
                            .map(|(_, name)| *name)
                    }
                    _ => None,
                }
            }
            TunnelConn::Tcp(c) => match tokio::time::timeout(wait, c.closed()).await {
                Ok(why) => certificate_alert_in(&why),
                Err(_) => None,
            },
        }
    }

    /// Resolves when the connection is closed, with a description of why.
    pub async fn closed(&self) -> String {
        match self {
            TunnelConn::Quic(c) => c.closed().await.to_string(),
            TunnelConn::Tcp(c) => c.closed().await,
        }
    }

    /// Sends one unreliable datagram (a UDP payload with its flow header).
    pub fn send_datagram(&self, d: bytes::Bytes) -> Result<(), DatagramRefused> {
        match self {
            TunnelConn::Quic(c) => c.send_datagram(d).map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => DatagramRefused::TooLarge,
                quinn::SendDatagramError::ConnectionLost(_)
                | quinn::SendDatagramError::UnsupportedByPeer
                | quinn::SendDatagramError::Disabled => DatagramRefused::Closed,
            }),
            TunnelConn::Tcp(c) => c.send_datagram(d),
        }
    }

    /// Room left in the queue of datagrams waiting to be sent (QUIC; a
    /// datagram larger than this makes quinn drop the oldest ones queued);
    /// `None` on the TCP fallback, whose queue drops the newest itself.
    pub fn datagram_send_space(&self) -> Option<usize> {
        match self {
            TunnelConn::Quic(c) => Some(c.datagram_send_buffer_space()),
            TunnelConn::Tcp(_) => None,
        }
    }

    /// QUIC DATAGRAM frames received on this connection so far, whether
    /// read or not (quinn buffers them, `quic::QuicTuning`'s 1 MiB, and
    /// drops the oldest when that is full, without counting them); `None`
    /// on the TCP fallback, whose reader counts its own drops.
    pub fn datagram_frames_received(&self) -> Option<u64> {
        match self {
            TunnelConn::Quic(c) => Some(c.stats().frame_rx.datagram),
            TunnelConn::Tcp(_) => None,
        }
    }

    /// Receives the next datagram; `Err` when the connection is gone.
    pub async fn read_datagram(&self) -> Result<bytes::Bytes, ConnLost> {
        match self {
            TunnelConn::Quic(c) => c.read_datagram().await.map_err(|e| ConnLost(e.to_string())),
            TunnelConn::Tcp(c) => c.read_datagram().await,
        }
    }

    /// Largest datagram the path carries now (header included), if any.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match self {
            TunnelConn::Quic(c) => c.max_datagram_size(),
            TunnelConn::Tcp(_) => Some(crate::tcp::MAX_TCP_DATAGRAM),
        }
    }
}

/// Why a datagram was not queued for sending. Counted apart, so a full
/// queue (congestion: the operator's signal to look at the uplink) is not
/// confused with a session that just ended or a path whose MTU shrank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramRefused {
    /// No room in the send queue (the TCP fallback's bounded queue; QUIC
    /// makes room by dropping its oldest instead, see
    /// [`TunnelConn::datagram_send_space`]).
    QueueFull,
    /// Larger than the path carries now: its MTU shrank between the size
    /// check and the send.
    TooLarge,
    /// The connection is gone (or takes no datagrams).
    Closed,
}

/// The sending half of a tunnel stream.
#[derive(Debug)]
pub enum SendHalf {
    /// A QUIC send stream.
    Quic(quinn::SendStream),
    /// The write half of a yamux stream.
    Tcp(crate::tcp::TcpSend),
}

/// The receiving half of a tunnel stream.
#[derive(Debug)]
pub enum RecvHalf {
    /// A QUIC receive stream, and its connection for marking the stream
    /// stalled ([`crate::stall`]).
    Quic(quinn::RecvStream, crate::stall::Stalls),
    /// The read half of a yamux stream.
    Tcp(crate::tcp::TcpRecv),
}

/// A bidirectional tunnel stream.
#[derive(Debug)]
pub struct BiStream {
    /// Bytes towards the peer.
    pub send: SendHalf,
    /// Bytes from the peer.
    pub recv: RecvHalf,
}

impl SendHalf {
    /// Abandons the stream: the peer's reads fail instead of seeing a
    /// clean end, so a reset on one side is a reset on the other.
    pub fn reset(&mut self, code: u32) {
        match self {
            // Err only if already finished or reset: nothing left to do.
            SendHalf::Quic(s) => {
                let _ = s.reset(VarInt::from_u32(code));
            }
            // yamux has no reset frame we can send from a half; dropping
            // the stream unfinished is what tells the peer.
            SendHalf::Tcp(_) => {}
        }
    }

    /// Sets the stream's send priority (higher goes first; streams default
    /// to 0). On QUIC the connection's send scheduler serves data of
    /// higher-priority streams before any lower one's, so a control stream
    /// marked [`CONTROL_PRIORITY`] is not queued behind bulk transfers in
    /// our own send buffers. yamux has no priorities: a no-op there; on
    /// the TCP fallback the control stream is instead exempt from the
    /// budget data streams queue under inside yamux (`tcp::budget`), known
    /// by its place (the first stream after the datagram stream).
    pub fn set_priority(&self, priority: i32) {
        if let SendHalf::Quic(s) = self {
            // Err only when the stream is already closed: nothing to order.
            let _ = s.set_priority(priority);
        }
    }
}

/// Send priority of the session's control stream (pings, pongs, route
/// updates): above every data stream's default of 0.
pub const CONTROL_PRIORITY: i32 = 100;

impl SendHalf {
    /// Writes a whole chunk. On QUIC the stream keeps `chunk` itself (no
    /// copy into the send buffer); on yamux it is written as bytes.
    pub async fn write_chunk(&mut self, chunk: bytes::Bytes) -> io::Result<()> {
        match self {
            SendHalf::Quic(s) => s.write_chunk(chunk).await.map_err(io::Error::from),
            SendHalf::Tcp(s) => tokio::io::AsyncWriteExt::write_all(s, &chunk).await,
        }
    }
}

impl RecvHalf {
    /// Marks the stream stalled while the guard lives (its reader waits on
    /// the local side): on QUIC the connection's receive window is raised
    /// at its first stall and stays so ([`crate::stall`]); `None` on the
    /// TCP fallback, whose connection window already covers every stream.
    pub fn stalled(&self) -> Option<crate::stall::Stalled> {
        match self {
            RecvHalf::Quic(_, stalls) => Some(stalls.stalled()),
            RecvHalf::Tcp(_) => None,
        }
    }

    /// Tells the peer to stop sending (its writes fail).
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvHalf::Quic(r, _) => {
                let _ = r.stop(VarInt::from_u32(code));
            }
            RecvHalf::Tcp(_) => {}
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            SendHalf::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_flush(cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Finishes the stream: the peer reads a clean end (TCP FIN across).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvHalf::Quic(r, _) => Pin::new(r).poll_read(cx, buf),
            RecvHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl RecvHalf {
    /// Reads the next chunk straight out of the transport's buffer (no
    /// copy, and no buffer of ours held while the stream is idle).
    /// `Ok(None)` is a clean end of stream.
    pub async fn read_chunk(&mut self) -> io::Result<Option<bytes::Bytes>> {
        match self {
            RecvHalf::Quic(r, _) => match r.read_chunk(usize::MAX, true).await {
                Ok(c) => Ok(c.map(|c| c.bytes)),
                Err(e) => Err(io::Error::from(e)),
            },
            RecvHalf::Tcp(r) => {
                use tokio::io::AsyncReadExt;
                let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
                match r.read_buf(&mut buf).await? {
                    0 => Ok(None),
                    _ => Ok(Some(buf.freeze())),
                }
            }
        }
    }
}

impl RecvHalf {
    /// Fills `bufs` with the next chunks (up to `bufs.len()`, no copy);
    /// `Ok(Some(n))` is how many, `Ok(None)` a clean end of stream. Lets a
    /// reader hand many ~1.4 KB QUIC frames to one `writev`.
    pub async fn read_chunks(&mut self, bufs: &mut [bytes::Bytes]) -> io::Result<Option<usize>> {
        match self {
            RecvHalf::Quic(r, _) => r.read_chunks(bufs).await.map_err(io::Error::from),
            RecvHalf::Tcp(_) => match self.read_chunk().await? {
                Some(c) if !bufs.is_empty() => {
                    bufs[0] = c;
                    Ok(Some(1))
                }
                Some(_) => Ok(Some(0)),
                None => Ok(None),
            },
        }
    }
}

/// Opens a stream on `conn`, sends `open` and waits (at most `timeout`)
/// for the far side's answer. On success the stream is ready for payload
/// (raw bytes for TCP, the flow's lifetime for UDP); on failure the reply
/// says why.
pub async fn open_stream(
    conn: &TunnelConn,
    open: &relay_protocol::StreamOpen,
    timeout: Duration,
) -> Result<BiStream, relay_protocol::StreamReply> {
    use relay_protocol::codec::{read_frame, write_frame};
    use relay_protocol::{FrameError, StreamReply, StreamStatus};
    let fut = async {
        let mut bi = conn
            .open_bi()
            .await
            .map_err(|e| StreamReply::fail(StreamStatus::NoRoute, e.to_string()))?;
        let io_err =
            |e: FrameError| StreamReply::fail(StreamStatus::Error, format!("tunnel stream: {e}"));
        write_frame(&mut bi.send, open).await.map_err(io_err)?;
        let reply: StreamReply = read_frame(&mut bi.recv).await.map_err(io_err)?;
        if reply.status == StreamStatus::Ok {
            Ok(bi)
        } else {
            Err(reply)
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(StreamReply::fail(
            StreamStatus::Timeout,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// Waits for the next accepted connection, or `None` once `stop` fires.
/// Accept errors (EMFILE and friends) are logged and retried after 50 ms,
/// so a listener under fd pressure neither spins nor dies.
pub async fn accept_until<T, F, Fut>(
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
    mut accept: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = accept() => match r {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::debug!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A concurrency bound on accepted connections: a permit per connection,
/// and a count of those refused because none was left.
#[derive(Debug)]
pub struct AcceptBound {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
    /// Connections reset at once because the bound was reached.
    pub refused: std::sync::atomic::AtomicU64,
}

impl AcceptBound {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Self {
        AcceptBound {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            refused: Default::default(),
        }
    }

    /// Permits free now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The captured-connection gauge and refusal counter in the Prometheus
    /// text format, named `{prefix}_capture_connections` and
    /// `{prefix}_capture_refused_total`.
    pub fn render_capture(&self, prefix: &str) -> String {
        format!(
            "# HELP {prefix}_capture_connections Captured TCP connections being served.\n\
             # TYPE {prefix}_capture_connections gauge\n\
             {prefix}_capture_connections {}\n\
             # HELP {prefix}_capture_refused_total Captured TCP connections reset at once, by reason (busy: capture.max_connections reached).\n\
             # TYPE {prefix}_capture_refused_total counter\n\
             {prefix}_capture_refused_total{{reason=\"busy\"}} {}\n",
            self.max.saturating_sub(self.available()),
            self.refused.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

/// [`accept_until`] under `bound`: each connection comes with the permit
/// its task holds until it ends. Past the bound a connection is reset at
/// once (RST: the client fails now instead of waiting in a queue or
/// holding a task and an fd here) and counted in [`AcceptBound::refused`].
pub async fn accept_bounded(
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
    l: &tokio::net::TcpListener,
    bound: &AcceptBound,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    loop {
        let (sock, peer) = accept_until(stop, what, || l.accept()).await?;
        match bound.permits.clone().try_acquire_owned() {
            Ok(permit) => return Some((sock, peer, permit)),
            Err(_) => {
                bound
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%peer, listener = what, "too many connections; reset");
                let _ = sock.set_zero_linger();
            }
        }
    }
}

/// Reads the header a peer sends first on a stream it opened, bounded by
/// `timeout`. A garbled or late header resets the stream (so the opener is
/// not left waiting); a stream closed before any header is simply `None`.
pub async fn read_stream_open(
    bi: &mut BiStream,
    timeout: Duration,
) -> Option<relay_protocol::StreamOpen> {
    use relay_protocol::codec::read_frame;
    use relay_protocol::{close_code, FrameError};
    match tokio::time::timeout(timeout, read_frame(&mut bi.recv)).await {
        Ok(Ok(open)) => Some(open),
        Ok(Err(FrameError::Closed)) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad stream header");
            bi.send.reset(close_code::PROTOCOL);
            None
        }
        Err(_) => {
            bi.send.reset(close_code::PROTOCOL);
            None
        }
    }
}

/// Answers a stream with a refusal and finishes it (best effort: the
/// opener may already be gone).
pub async fn finish_with(bi: &mut BiStream, reply: &relay_protocol::StreamReply) {
    use relay_protocol::codec::write_frame;
    let _ = write_frame(&mut bi.send, reply).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut bi.send).await;
}
