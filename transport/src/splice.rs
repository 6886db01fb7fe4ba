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

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::conn::{BiStream, RecvHalf, SendHalf};
use relay_protocol::close_code::STREAM_RESET;

/// Read size for the local → tunnel direction. Small enough that thousands
/// of idle streams stay cheap, large enough for multi-Gbit/s bulk copies.
const LOCAL_READ_BUF: usize = 16 * 1024;

/// What an idle stream holds until its first full read (loadtest
/// `streams`: 16 KiB up front cost ~19.5 KiB of relay memory per idle stream).
const INITIAL_READ_BUF: usize = 2 * 1024;

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

/// A local socket that can be closed abortively (RST instead of FIN).
pub trait LocalStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Arranges for the next close to send a reset.
    fn set_abortive_close(&self);
}

impl LocalStream for tokio::net::TcpStream {
    fn set_abortive_close(&self) {
        // Failure only means the socket is already gone.
        let _ = self.set_zero_linger();
    }
}

impl LocalStream for tokio::net::UnixStream {
    fn set_abortive_close(&self) {}
}

impl<S: LocalStream> LocalStream for tokio_rustls::server::TlsStream<S> {
    fn set_abortive_close(&self) {
        self.get_ref().0.set_abortive_close()
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
struct PumpError {
    bytes: u64,
    what: String,
}

async fn pump_to_tunnel<R: AsyncRead + Unpin>(
    local: &mut R,
    send: &mut SendHalf,
    pending: &[u8],
    meter: &dyn Meter,
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
    // Idle streams keep a small buffer; a read that fills it means bulk
    // traffic, and the buffer grows to LOCAL_READ_BUF for good.
    let mut buf = vec![0u8; INITIAL_READ_BUF];
    loop {
        let n = local
            .read(&mut buf)
            .await
            .map_err(|e| fail(total, "local read", e))?;
        if n == 0 {
            send.shutdown()
                .await
                .map_err(|e| fail(total, "tunnel finish", e))?;
            return Ok(total);
        }
        send.write_all(&buf[..n])
            .await
            .map_err(|e| fail(total, "tunnel write", e))?;
        total += n as u64;
        meter.add(Direction::ToTunnel, n as u64);
        if n == buf.len() && buf.len() < LOCAL_READ_BUF {
            buf = vec![0u8; LOCAL_READ_BUF];
        }
    }
}

async fn pump_from_tunnel<W: AsyncWrite + Unpin>(
    recv: &mut RecvHalf,
    local: &mut W,
    meter: &dyn Meter,
    dir: Direction,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    let fail = |bytes, side: &str, e: std::io::Error| PumpError {
        bytes,
        what: format!("{side}: {e}"),
    };
    loop {
        match recv.read_chunk().await {
            Ok(Some(chunk)) => {
                local
                    .write_all(&chunk)
                    .await
                    .map_err(|e| fail(total, "local write", e))?;
                total += chunk.len() as u64;
                meter.add(dir, chunk.len() as u64);
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

/// Runs both directions until each ends, stopping at the first failure.
/// Returns the outcome; the caller aborts both sides if it was reset.
async fn both_ways(
    up: impl std::future::Future<Output = Result<u64, PumpError>>,
    down: impl std::future::Future<Output = Result<u64, PumpError>>,
) -> SpliceOutcome {
    let mut out = SpliceOutcome::default();
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
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
/// that must go first. Returns byte counts and whether it was reset.
pub async fn splice<L: LocalStream>(
    local: L,
    pending: &[u8],
    bi: BiStream,
    meter: &dyn Meter,
) -> SpliceOutcome {
    let BiStream { mut send, mut recv } = bi;
    let (mut lr, mut lw) = tokio::io::split(local);
    let out = both_ways(
        pump_to_tunnel(&mut lr, &mut send, pending, meter),
        pump_from_tunnel(&mut recv, &mut lw, meter, Direction::FromTunnel),
    )
    .await;
    if out.reset.is_some() {
        send.reset(STREAM_RESET);
        recv.stop(STREAM_RESET);
        let local = lr.unsplit(lw);
        local.set_abortive_close();
        drop(local);
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
    let out = both_ways(
        pump_from_tunnel(&mut a_recv, &mut b_send, meter, Direction::ToTunnel),
        pump_from_tunnel(&mut b_recv, &mut a_send, meter, Direction::FromTunnel),
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
/// host's capture rules let it pass (see [`crate::capture`]).
pub async fn dial_tcp(
    addr: std::net::SocketAddr,
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
            // Interactive traffic (kubectl exec) must not wait for Nagle.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}
