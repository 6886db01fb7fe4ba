//! Listening sockets bound from configuration: `[::]` takes IPv4 as well.
//!
//! A socket bound to IPv6's unspecified address takes IPv4 connections
//! too (as IPv4-mapped addresses) unless `IPV6_V6ONLY` is set, and Linux
//! sets it on every new IPv6 socket where `net.ipv6.bindv6only = 1`. The
//! relay's listeners (`listen.quic` and its TCP fallback, `listen.connect`,
//! `listen.admin`, `listen.health`) promise both families on `[::]`, so
//! they clear it there, whatever the host's setting.

use std::net::SocketAddr;

/// Clears `IPV6_V6ONLY` on `sock` when `addr`, the address it is about to
/// be bound to, is IPv6's unspecified address `[::]`, so that it takes
/// IPv4 as well; other addresses are left as they are. Call it before
/// `bind`.
pub fn dual_stack(sock: socket2::SockRef<'_>, addr: SocketAddr) -> std::io::Result<()> {
    match addr {
        SocketAddr::V6(a) if a.ip().is_unspecified() => sock.set_only_v6(false),
        _ => Ok(()),
    }
}

/// Backlog of the relay's listeners other than CONNECT's (tokio's own
/// `TcpListener::bind` asks for the same).
pub const BACKLOG: u32 = 1024;

/// A TCP listener on `addr` with `backlog`, `SO_REUSEADDR` set (as
/// `TcpListener::bind` does on Unix: a restarted relay rebinds while its
/// old connections are in `TIME_WAIT`) and, on `[::]`, IPv4 taken as well
/// ([`dual_stack`]). Needs a tokio runtime.
pub fn tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    dual_stack(socket2::SockRef::from(&s), addr)?;
    s.bind(addr)?;
    s.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host with `net.ipv6.bindv6only = 1` (a namespace of the
    /// test's own, so the host's setting is left alone), a TCP listener
    /// and the relay's QUIC endpoint on `[::]` take IPv4 (a connection to
    /// `127.0.0.1`, a QUIC handshake from an IPv4 socket) as well as
    /// IPv6; a listener on a specific IPv6 address is left as the host
    /// says.
    #[test]
    fn listeners_on_the_ipv6_unspecified_address_take_ipv4_too() {
        if !nix::unistd::geteuid().is_root() {
            crate::test_netns::skip("the dual-stack listener test needs root (a namespace)");
            return;
        }
        // Moves only this thread, which the namespace dies with.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            crate::test_netns::ip(&["link", "set", "lo", "up"]);
            // Per network namespace: this thread's.
            std::fs::write("/proc/sys/net/ipv6/bindv6only", "1").expect("bindv6only");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let l = tcp("[::]:0".parse().unwrap(), BACKLOG).expect("bind [::]:0");
                assert!(!socket2::SockRef::from(&l).only_v6().unwrap());
                let port = l.local_addr().unwrap().port();
                for to in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
                    let to: SocketAddr = to.parse().unwrap();
                    let (c, a) = tokio::join!(tokio::net::TcpStream::connect(to), l.accept());
                    c.unwrap_or_else(|e| panic!("connect to {to}: {e}"));
                    a.expect("accept");
                }
                // A specific address: the host's setting stands.
                let one = tcp("[::1]:0".parse().unwrap(), BACKLOG).expect("bind [::1]:0");
                assert!(socket2::SockRef::from(&one).only_v6().unwrap());

                crate::tls::install_default_provider();
                let pki =
                    crate::devcerts::DevPki::generate(&["localhost"], &["edge-1"]).expect("pki");
                let tuning = crate::QuicTuning::default();
                let server = crate::quic::server_endpoint(
                    "[::]:0".parse().unwrap(),
                    &pki.relay_material().expect("relay material"),
                    &tuning,
                    false,
                )
                .expect("QUIC endpoint on [::]:0");
                let port = server.local_addr().unwrap().port();
                let client = crate::quic::client_endpoint(
                    "127.0.0.1:0".parse().unwrap(),
                    &pki.node_material("edge-1").expect("node material"),
                    &tuning,
                    0,
                )
                .expect("client endpoint");
                let accept = async {
                    let incoming = server.accept().await.expect("incoming");
                    incoming.await.expect("server side of the handshake")
                };
                let connect = async {
                    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                    let c = client.connect(to, "localhost").expect("connect");
                    tokio::time::timeout(std::time::Duration::from_secs(5), c)
                        .await
                        .expect("QUIC handshake over IPv4 within 5 s")
                        .expect("QUIC handshake over IPv4")
                };
                let (_, conn) = tokio::join!(accept, connect);
                conn.close(0u32.into(), b"done");
            });
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}
