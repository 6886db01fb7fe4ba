//! Dialling (edge) and accepting (relay) the fallback's TLS+TCP
//! connection, then starting yamux on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::mux::YamuxConn;
use super::socket::tune_socket;
use crate::conn::ConnLost;

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
/// (`mss`, see [`DEFAULT_FALLBACK_MSS`](super::DEFAULT_FALLBACK_MSS); `None`: the kernel's, from the
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

/// Why [`accept`] failed.
#[derive(Debug)]
pub struct AcceptError {
    /// What went wrong.
    pub lost: ConnLost,
    /// Whether the peer closed (or reset) the connection before TLS
    /// completed, as a load balancer's TCP health check does every few
    /// seconds: not worth a log line at info each time.
    pub closed_early: bool,
}

/// Whether a TLS accept failing with `e` means the peer went away rather
/// than spoke wrongly (see [`AcceptError::closed_early`]).
pub fn closed_early(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
    )
}

/// How long a refused TLS connection is kept half-closed (see [`linger`]).
const LINGER: Duration = Duration::from_secs(1);

/// Closes a connection whose TLS handshake failed so that its peer reads
/// the alert that says why.
///
/// In TLS 1.3 the client's handshake is over once it has sent its
/// certificate and Finished, so an edge whose certificate the relay then
/// refuses (revoked, expired, unknown CA) has already written its first
/// application data when the alert leaves. Closing the socket with that
/// data unread makes the kernel answer with a reset, and the edge's next
/// write fails with `connection reset` before it reads the alert sitting
/// in its receive queue: the refusal reads as a network fault. So: send
/// our FIN after the alert, read and drop what the peer still sends until
/// it closes or `max` passes (bounded: a flood of bad certificates holds
/// each socket at most this long, inside the accept's own timeout), then
/// close.
async fn linger(mut tcp: tokio::net::TcpStream, max: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(max, async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Completes a relay-side TLS+TCP accept and starts yamux; bounded by
/// `timeout`.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<crate::TunnelConn, AcceptError> {
    tune_socket(&tcp);
    let failed = |lost, closed_early| AcceptError { lost, closed_early };
    let setup = async {
        let tls = match acceptor.accept(tcp).into_fallible().await {
            Ok(tls) => tls,
            Err((e, tcp)) => {
                let early = closed_early(&e);
                if !early {
                    linger(tcp, LINGER).await;
                }
                return Err(failed(ConnLost(format!("tls from {remote}: {e}")), early));
            }
        };
        let certs: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let conn = YamuxConn::start(tls, false, remote, (certs, alpn), timeout)
            .await
            .map_err(|lost| failed(lost, false))?;
        Ok(crate::TunnelConn::Tcp(conn))
    };
    tokio::time::timeout(timeout, setup).await.map_err(|_| {
        failed(
            ConnLost(format!(
                "tcp+tls from {remote}: no session within {timeout:?}"
            )),
            false,
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edge whose certificate the relay refuses is told why, wherever
    /// in the set-up the refusal lands. TLS 1.3 lets the client finish its
    /// handshake and write (the datagram stream's mark, then the hello)
    /// before the server has checked its certificate, so the alert ends
    /// either the yamux set-up (the dial fails: its error must carry the
    /// alert, not only "connection is closed") or the first stream (the
    /// connection's close reason must be the alert, not a reset from the
    /// relay closing with the edge's bytes unread). Both happen in a CI
    /// run. Every other attempt here starts yamux 100 ms after the TLS
    /// handshake, as a busy edge may, which makes the first branch likely;
    /// each must name the alert: `DecryptError`, as the client's certificate
    /// comes from another CA of the same name.
    #[tokio::test]
    async fn a_refused_certificate_is_named_wherever_the_refusal_lands() {
        crate::tls::install_default_provider();
        let relay = crate::devcerts::DevPki::generate(&["relay.test"], &[]).unwrap();
        let mut other = crate::devcerts::DevPki::generate(&["elsewhere"], &[]).unwrap();
        let foreign = other.add_node("edge-a").unwrap().clone();
        let client =
            crate::TlsMaterial::from_pem(&foreign.cert, &foreign.key, &relay.ca_pem_pair().0)
                .unwrap()
                .client_config(relay_protocol::ALPN)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            relay
                .relay_material()
                .unwrap()
                .server_config(relay_protocol::ALPN)
                .unwrap(),
        ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, remote)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    accept(&acceptor, s, remote, Duration::from_secs(5))
                        .await
                        .map(|_| ())
                });
            }
        });
        let (mut at_setup, mut at_stream) = (0, 0);
        for attempt in 0..20 {
            let dialled = if attempt % 2 == 0 {
                connect_detailed(
                    TcpDial::Direct(at),
                    "relay.test",
                    client.clone(),
                    0,
                    None,
                    Duration::from_secs(5),
                )
                .await
            } else {
                // An edge slow to start yamux after its TLS handshake (a
                // busy machine; seen in a CI run): the alert is already
                // there when the datagram stream's mark is written.
                let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(client.clone()))
                    .connect(name, tcp)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                YamuxConn::start(tls, true, at, (Vec::new(), None), Duration::from_secs(5))
                    .await
                    .map(crate::TunnelConn::Tcp)
                    .map_err(|lost| ConnectError {
                        lost,
                        reached: true,
                    })
            };
            let named = match dialled {
                Err(e) => {
                    at_setup += 1;
                    crate::conn::certificate_alert_in(&e.lost.0).ok_or(e.lost.0)
                }
                Ok(conn) => {
                    at_stream += 1;
                    // What the edge does next: its hello on a new stream.
                    if let Ok(mut s) = conn.open_bi().await {
                        use tokio::io::AsyncWriteExt;
                        let _ = s.send.write_all(&[0u8; 64]).await;
                    }
                    let named = conn
                        .refused_our_certificate(Duration::from_secs(2))
                        .await
                        .ok_or(conn.closed().await);
                    // The alert ended the datagram stream too: never taken
                    // for the peer ending it (its reason would hide the
                    // certificate's).
                    if let crate::TunnelConn::Tcp(c) = &conn {
                        assert!(!c.datagram_stream_ended_by_peer(), "attempt {attempt}");
                    }
                    named
                }
            };
            assert_eq!(named, Ok("DecryptError"), "attempt {attempt}");
        }
        println!("refused during set-up {at_setup} times, on the first stream {at_stream} times");
    }

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

    /// A peer that connects and closes (or resets) without a byte of TLS,
    /// as a load balancer's TCP health check does, is told apart from one
    /// that speaks something other than TLS.
    #[tokio::test]
    async fn an_accept_says_whether_the_peer_just_went_away() {
        use tokio::io::AsyncWriteExt;
        crate::tls::install_default_provider();
        let pki = crate::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let server = pki
            .relay_material()
            .unwrap()
            .server_config(relay_protocol::ALPN)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let peers = [
            ("closed", None, true),
            ("reset", Some(&b""[..]), true),
            (
                "http",
                Some(&b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..]),
                false,
            ),
        ];
        for (what, send, early) in peers {
            let client = tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
                match send {
                    None => drop(s),
                    Some(b"") => {
                        // SO_LINGER 0: close with a RST.
                        socket2::SockRef::from(&s)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                        drop(s);
                    }
                    Some(bytes) => {
                        s.write_all(bytes).await.unwrap();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            tokio::io::AsyncReadExt::read(&mut s, &mut [0u8; 64]),
                        )
                        .await;
                    }
                }
            });
            let (sock, remote) = l.accept().await.unwrap();
            let e = match accept(&acceptor, sock, remote, Duration::from_secs(5)).await {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => e,
            };
            client.await.unwrap();
            assert_eq!(e.closed_early, early, "{what}: {}", e.lost.0);
        }
    }
}
