//! The traffic under test: the CONNECT client, the paths a benchmark
//! sends through (tunnel, direct, a peer) and the counting sink.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Opens a tunnel through the relay's CONNECT ingress, reading the answer
/// with one buffer (not byte by byte: the services here never speak
/// first, so nothing past the header can arrive before we write).
pub(crate) async fn connect_tunnel(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 1024];
    let mut n = 0;
    while !head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        ensure!(n < head.len(), "CONNECT response header too large");
        let k = s.read(&mut head[n..]).await?;
        ensure!(
            k > 0,
            "relay closed the connection inside the CONNECT answer"
        );
        n += k;
    }
    let end = head[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(n);
    ensure!(
        head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        "CONNECT refused: {}",
        String::from_utf8_lossy(&head[..n])
            .lines()
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    ensure!(
        end == n,
        "unexpected bytes after the CONNECT answer ({} bytes)",
        n - end
    );
    Ok(s)
}

/// Where a client reaches the service: through the relay, or straight.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    /// Through the relay's CONNECT ingress and the edge.
    Tunnel {
        /// The relay's CONNECT address.
        proxy: SocketAddr,
        /// The service address (at the edge's 127.0.0.x).
        target: SocketAddr,
    },
    /// Straight to the service: the baseline.
    Direct(SocketAddr),
    /// Through a peer tunnel (rathole) that exposes the service here.
    Peer {
        /// Where the peer's server listens for clients.
        addr: SocketAddr,
        /// The peer's name (the path label).
        name: &'static str,
    },
}

impl Via {
    /// Opens one connection.
    pub(crate) async fn open(&self) -> Result<TcpStream> {
        match *self {
            Via::Tunnel { proxy, target } => connect_tunnel(proxy, target).await,
            Via::Direct(a) | Via::Peer { addr: a, .. } => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
        }
    }

    /// `tunnel` or `direct`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Via::Tunnel { .. } => "tunnel",
            Via::Direct(_) => "direct",
            Via::Peer { name, .. } => name,
        }
    }
}

/// A sink: reads until EOF, then answers the byte count (8 bytes, big
/// endian) and closes. Lets the client check that every byte arrived.
pub(crate) async fn spawn_sink(ip: IpAddr) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}
