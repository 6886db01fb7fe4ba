//! The fallback transport: TLS over TCP with yamux, for networks that
//! block UDP. It carries exactly what QUIC carries: bidirectional streams
//! (yamux streams) and datagrams (length-prefixed on a dedicated stream,
//! the first one the edge opens, marked with [`DATAGRAM_STREAM_MARK`]).
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

/// How long sent data may stay unacknowledged before the kernel gives up
/// on a TCP connection (`TCP_USER_TIMEOUT`). Without it a dead path is
/// retransmitted into for ~15 minutes (tcp_retries2) and every write on the
/// fallback session queues behind it. 30 s is well above the queueing delay
/// of a slow, deep-buffered uplink (seconds), and the session layer's pings
/// usually notice a dead path sooner (within 3 keep-alive intervals).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket options of tunnel and CONNECT TCP sockets: no Nagle delay;
/// TCP keep-alive well under CGNAT idle timers, so the NAT binding of an
/// idle fallback session stays open and a peer that vanished without a
/// FIN or RST is probed (from 10 s of silence, every 5 s); and
/// [`USER_TIMEOUT`], which also decides when unanswered probes end the
/// connection (Linux: the user timeout overrides the probe count), so a
/// vanished peer is dropped about 30 s after it last acknowledged anything.
pub fn tune_socket(s: &tokio::net::TcpStream) {
    tune(socket2::SockRef::from(s));
}

/// [`tune_socket`]'s options, set once on a listener: Linux copies them to
/// every socket it accepts, so accepted connections (the relay's CONNECT
/// clients) get them without a syscall of their own.
pub fn tune_listener(l: &tokio::net::TcpListener) {
    tune(socket2::SockRef::from(l));
}

/// Sets the maximum segment size on a listener (the relay's fallback
/// listener, see [`DEFAULT_FALLBACK_MSS`]): its SYN-ACKs announce it, and
/// Linux clamps every accepted connection's own segments to it too.
pub fn set_listener_mss(l: &tokio::net::TcpListener, mss: u32) -> std::io::Result<()> {
    socket2::SockRef::from(l).set_tcp_mss(mss)
}

fn tune(sock: socket2::SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// The edge's default for the fallback's TCP maximum segment size
/// (`tcp_fallback_mss`): segments of 1,220 bytes make packets of at most
/// 1,260 bytes over IPv4 and 1,280 (IPv6's minimum MTU) over IPv6, so the
/// fallback also works through links with a small MTU that drop larger
/// packets without the ICMP error path-MTU discovery needs (a black hole;
/// `lab/tests/small_mtu.rs` stalled without it). Set before connecting, it
/// is also the MSS the edge announces, so it bounds the relay's segments
/// too. Costs about 16 % more segments than a clean 1,500-byte path.
pub const DEFAULT_FALLBACK_MSS: u32 = 1220;

/// A `tcp_fallback_mss` setting as both configuration files take it: the
/// default ([`DEFAULT_FALLBACK_MSS`]) when absent, `None` (the kernel's
/// choice, from path-MTU discovery) for 0, else a segment size TCP can use
/// (536 to 9000); the error says what is allowed.
pub fn fallback_mss_setting(v: Option<u32>) -> Result<Option<u32>, String> {
    match v {
        None => Ok(Some(DEFAULT_FALLBACK_MSS)),
        Some(0) => Ok(None),
        Some(m) if FALLBACK_MSS_RANGE.contains(&m) => Ok(Some(m)),
        Some(m) => Err(format!(
            "{m} must be 0 (the kernel's choice) or 536 to 9000"
        )),
    }
}

/// The segment sizes a fallback MSS may be set to: from IPv4's minimum
/// (536) to a jumbo frame's.
pub const FALLBACK_MSS_RANGE: std::ops::RangeInclusive<u32> = 536..=9000;

/// Dials the relay over TLS+TCP and starts yamux (edge side). The whole
/// setup is bounded by `timeout`; a non-zero `mark` tags the socket so
/// capture lets it pass.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    tls: &crate::TlsMaterial,
    mark: u32,
    timeout: Duration,
) -> Result<crate::TunnelConn, ConnLost> {
    let cfg = tls
        .client_config(relay_protocol::ALPN)
        .map_err(|e| ConnLost(format!("tls config: {e}")))?;
    connect_with(TcpDial::Direct(addr), server_name, cfg, mark, None, timeout).await
}

/// Where [`connect_with`] opens its TCP connection.
#[derive(Clone, Copy, Debug)]
pub enum TcpDial<'a> {
    /// Straight to the relay at this address.
    Direct(SocketAddr),
    /// Through an HTTP proxy, asked for a tunnel to `target` (the relay's
    /// `host:port` as configured; the proxy resolves it).
    Proxy {
        /// The proxy.
        proxy: &'a crate::proxy::HttpProxy,
        /// `host:port` of the relay.
        target: &'a str,
    },
}

/// [`connect`] with a given client config (the certificate bootstrap
/// connects without a client certificate, under its own ALPN), a way to
/// the relay (direct, or through an HTTP proxy) and a maximum segment size
/// (`mss`, see [`DEFAULT_FALLBACK_MSS`]; `None`: the kernel's, from the
/// path MTU).
pub async fn connect_with(
    to: TcpDial<'_>,
    server_name: &str,
    cfg: rustls::ClientConfig,
    mark: u32,
    mss: Option<u32>,
    timeout: Duration,
) -> Result<crate::TunnelConn, ConnLost> {
    connect_detailed(to, server_name, cfg, mark, mss, timeout)
        .await
        .map_err(|e| e.lost)
}

/// Why [`connect_detailed`] failed, and how far it got.
#[derive(Debug)]
pub struct ConnectError {
    /// What went wrong.
    pub lost: ConnLost,
    /// Whether the relay answered: a TCP connection was made (through
    /// the proxy's tunnel, with a proxy) and TLS began. `false`: refused,
    /// unreachable, or no connection within the timeout, so nothing at
    /// that address answered (a dialler may try the relay's next one).
    pub reached: bool,
}

/// A TCP connection to `addr` from a socket carrying `mark` (so capture
/// leaves it alone) and, when set, maximum segment size `mss`.
async fn dial_tcp(
    addr: SocketAddr,
    mark: u32,
    mss: Option<u32>,
) -> Result<tokio::net::TcpStream, String> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    crate::capture::mark_socket(socket2::SockRef::from(&sock), mark)
        .map_err(|e| format!("mark: {e}"))?;
    if let Some(mss) = mss {
        socket2::SockRef::from(&sock)
            .set_tcp_mss(mss)
            .map_err(|e| format!("TCP_MAXSEG {mss}: {e}"))?;
    }
    sock.connect(addr)
        .await
        .map_err(|e| format!("tcp {addr}: {e}"))
}

/// [`connect_with`], saying whether the relay answered when it fails.
pub async fn connect_detailed(
    to: TcpDial<'_>,
    server_name: &str,
    cfg: rustls::ClientConfig,
    mark: u32,
    mss: Option<u32>,
    timeout: Duration,
) -> Result<crate::TunnelConn, ConnectError> {
    // Set once the TCP connection (and a proxy's tunnel) is up: an atomic,
    // not a `Cell`, so this future stays `Send`; read after the timeout
    // dropped the setup future, to tell a silent address from a TLS
    // failure (or a TLS handshake that stalled).
    let reached = std::sync::atomic::AtomicBool::new(false);
    let was_reached = || reached.load(std::sync::atomic::Ordering::Relaxed);
    let fail = |what: &str, e: &dyn std::fmt::Display| ConnLost(format!("{what}: {e}"));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| {
        ConnectError {
            lost: fail("server name", &e),
            reached: false,
        }
    })?;
    let shown = match to {
        TcpDial::Direct(a) => a.to_string(),
        TcpDial::Proxy { proxy, target } => format!("{target} via {proxy}"),
    };
    let setup = async {
        let dial = |addr| dial_tcp(addr, mark, mss);
        let mut tcp = match to {
            TcpDial::Direct(a) => dial(a).await.map_err(ConnLost)?,
            TcpDial::Proxy { proxy, .. } => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&proxy.authority)
                    .await
                    .map_err(|e| fail(&format!("resolve proxy {proxy}"), &e))?
                    .collect();
                crate::proxy::first_connected(&addrs, timeout, dial)
                    .await
                    .map_err(|e| ConnLost(format!("proxy {proxy}: {e}")))?
            }
        };
        let addr = tcp.peer_addr().map_err(|e| fail("peer address", &e))?;
        tune_socket(&tcp);
        if let TcpDial::Proxy { proxy, target } = to {
            proxy
                .open_tunnel(&mut tcp, target)
                .await
                .map_err(ConnLost)?;
        }
        reached.store(true, std::sync::atomic::Ordering::Relaxed);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(&format!("tls {shown}"), &e))?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let conn = YamuxConn::start(tls, true, addr, (Vec::new(), alpn), timeout).await?;
        Ok(crate::TunnelConn::Tcp(conn))
    };
    let outcome = tokio::time::timeout(timeout, setup).await;
    outcome
        .map_err(|_| ConnLost(format!("tcp+tls to {shown}: no session within {timeout:?}")))
        .and_then(|r| r)
        .map_err(|lost| ConnectError {
            lost,
            reached: was_reached(),
        })
}

/// Completes a relay-side TLS+TCP accept and starts yamux; bounded by
/// `timeout`.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<crate::TunnelConn, ConnLost> {
    tune_socket(&tcp);
    let setup = async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| ConnLost(format!("tls from {remote}: {e}")))?;
        let certs: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let conn = YamuxConn::start(tls, false, remote, (certs, alpn), timeout).await?;
        Ok(crate::TunnelConn::Tcp(conn))
    };
    tokio::time::timeout(timeout, setup).await.map_err(|_| {
        ConnLost(format!(
            "tcp+tls from {remote}: no session within {timeout:?}"
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused connection is no answer; a relay that accepted the TCP
    /// connection and then failed TLS (closed at once) answered.
    #[tokio::test]
    async fn a_failed_dial_says_whether_the_relay_answered() {
        crate::tls::install_default_provider();
        let pki = crate::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let tls = || {
            pki.node_material("edge-a")
                .unwrap()
                .client_config(relay_protocol::ALPN)
                .unwrap()
        };
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let dial = |to| {
            connect_detailed(
                TcpDial::Direct(to),
                "relay.test",
                tls(),
                0,
                None,
                Duration::from_secs(10),
            )
        };
        let e = dial(refused).await.unwrap_err();
        assert!(!e.reached, "{}", e.lost.0);
        let e = dial(live).await.unwrap_err();
        assert!(e.reached, "{}", e.lost.0);
    }

    #[tokio::test]
    async fn tuned_sockets_have_keepalive_and_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        tune_socket(&c);
        let r = socket2::SockRef::from(&c);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(r.tcp_nodelay().unwrap());
    }
}
