//! Original destinations of redirected connections.
//!
//! Capture redirects traffic with NAT (see [`crate::capture`]), so the
//! kernel's connection tracking knows where each connection was going:
//! - TCP: `SO_ORIGINAL_DST` on the accepted socket ([`original_dst_tcp`]);
//! - UDP: the kernel offers no socket option, so [`original_dst_udp`] asks
//!   conntrack over netlink (`IPCTNL_MSG_CT_GET` by the reply tuple: the
//!   redirected local address and the client), asynchronously: a
//!   [`Conntrack`] socket is non-blocking and driven by tokio, so a lookup
//!   waiting for the kernel holds no thread and no capture loop.
//!
//! The ctnetlink messages are built and parsed here (a few attributes)
//! rather than with a netlink crate: the request is one nested tuple and
//! the answer one attribute path, both covered by the tests below.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// Where a redirected TCP connection was going (IPv4).
pub fn original_dst_tcp(sock: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let a = socket::getsockopt(sock, sockopt::OriginalDst).map_err(io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(a.sin_port),
    )))
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

fn nested(out: &mut Vec<u8>, kind: u16, build: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    build(&mut inner);
    attr(out, kind | NLA_F_NESTED, &inner);
}

/// The request: "the UDP conntrack entry whose reply tuple is
/// `reply_src` → `reply_dst`".
fn get_request(reply_src: SocketAddrV4, reply_dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    nested(&mut attrs, CTA_TUPLE_REPLY, |t| {
        nested(t, CTA_TUPLE_IP, |ip| {
            attr(ip, CTA_IP_V4_SRC, &reply_src.ip().octets());
            attr(ip, CTA_IP_V4_DST, &reply_dst.ip().octets());
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            attr(p, CTA_PROTO_NUM, &[IPPROTO_UDP]);
            attr(p, CTA_PROTO_SRC_PORT, &reply_src.port().to_be_bytes());
            attr(p, CTA_PROTO_DST_PORT, &reply_dst.port().to_be_bytes());
        });
    });
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET, version 0, resource id 0.
    msg.extend_from_slice(&[nix::libc::AF_INET as u8, 0, 0, 0]);
    msg.extend_from_slice(&attrs);
    msg
}

/// Iterates `(type without flags, payload)` over netlink attributes.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        let step = (len + 3) & !3;
        b = &b[step.min(b.len())..];
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// Netlink message header fields of one message in a received datagram.
struct Header {
    kind: u16,
    seq: u32,
    port: u32,
}

/// Splits a received datagram into its netlink messages (`header`, whole
/// message); a datagram may carry several, and a malformed length ends it.
fn messages(mut b: &[u8]) -> impl Iterator<Item = (Header, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            return None;
        }
        let h = Header {
            kind: u16::from_ne_bytes([b[4], b[5]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            port: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        };
        let msg = &b[..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((h, msg))
    })
}

/// Parses the kernel's answer to request `seq` sent from port `port`: the
/// original tuple's destination. Messages of other requests (a stale
/// answer, anything not addressed to this exchange) are skipped; `None`
/// means the datagram held no answer to this request.
fn parse_reply(buf: &[u8], seq: u32, port: u32) -> Option<io::Result<SocketAddrV4>> {
    messages(buf)
        .find(|(h, _)| h.seq == seq && (h.port == port || h.port == 0))
        .map(|(h, msg)| parse_message(h.kind, msg))
}

/// One answer message: an error (errno) or the conntrack entry.
fn parse_message(kind: u16, buf: &[u8]) -> io::Result<SocketAddrV4> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("conntrack reply: {what}"),
        )
    };
    if buf.len() < 20 {
        return Err(bad("short"));
    }
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
        return Err(bad("unexpected message type"));
    }
    let body = &buf[20..];
    let orig = find(body, CTA_TUPLE_ORIG).ok_or_else(|| bad("no original tuple"))?;
    let ip = find(
        find(orig, CTA_TUPLE_IP).ok_or_else(|| bad("no ip"))?,
        CTA_IP_V4_DST,
    )
    .ok_or_else(|| bad("no dst"))?;
    let proto = find(orig, CTA_TUPLE_PROTO).ok_or_else(|| bad("no proto"))?;
    let port = find(proto, CTA_PROTO_DST_PORT).ok_or_else(|| bad("no port"))?;
    let (ip, port): ([u8; 4], [u8; 2]) = (
        ip.try_into().map_err(|_| bad("ip length"))?,
        port.try_into().map_err(|_| bad("port length"))?,
    );
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(ip),
        u16::from_be_bytes(port),
    ))
}

/// How long one lookup may take: the kernel answers at once, so this only
/// bounds a lost answer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// A ctnetlink socket, non-blocking and driven by tokio: lookups wait for
/// the kernel's answer without holding a thread. Bound to a port the
/// kernel assigns, so answers (and only answers) come to it; an answer is
/// accepted only from the kernel (sender port 0) and only with the
/// request's sequence number.
/// What the capture loops use is [`original_dst_udp`], one socket per
/// lookup, so concurrent lookups never read each other's answers.
pub struct Conntrack {
    fd: AsyncFd<OwnedFd>,
    port: u32,
    seq: AtomicU32,
}

impl Conntrack {
    /// Opens and binds the socket (needs CAP_NET_ADMIN for the lookups).
    pub fn open() -> io::Result<Conntrack> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(io::Error::from)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(io::Error::from)?;
        let me: NetlinkAddr = socket::getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may
        // close or swap its descriptor while registered; an `OwnedFd` owned
        // by the `AsyncFd` cannot, which is exactly what the replacement
        // (`unsafe fn register`) asks its caller to promise. The workspace
        // forbids `unsafe`, so the safe constructor stays.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(Conntrack {
            fd,
            port: me.pid(),
            seq: AtomicU32::new(rand::random()),
        })
    }

    /// The netlink port id the kernel gave this socket.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Where a redirected UDP flow was going: the conntrack entry whose
    /// reply tuple is `local` (the redirected address we received on) →
    /// `client`. One netlink round trip, bounded by [`LOOKUP_TIMEOUT`].
    /// `&mut`: one lookup at a time per socket, since a lookup reading the
    /// socket consumes (and skips) answers that are not its own.
    pub async fn original_dst_udp(
        &mut self,
        local: SocketAddrV4,
        client: SocketAddrV4,
    ) -> io::Result<SocketAddrV4> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.lookup(&get_request(local, client, seq), seq).await
    }

    async fn lookup(&self, req: &[u8], seq: u32) -> io::Result<SocketAddrV4> {
        let exchange = async {
            self.send(req).await?;
            let mut buf = vec![0u8; 8192];
            loop {
                let (n, from) = self.recv(&mut buf).await?;
                // Only the kernel speaks from port 0; another process
                // (root can unicast between netlink sockets) cannot
                // answer for it.
                if from != 0 {
                    continue;
                }
                if let Some(r) = parse_reply(&buf[..n], seq, self.port) {
                    return r;
                }
            }
        };
        tokio::time::timeout(LOOKUP_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "conntrack lookup timed out"))?
    }

    async fn send(&self, req: &[u8]) -> io::Result<()> {
        loop {
            let mut g = self.fd.writable().await?;
            let r = g.try_io(|fd| {
                socket::sendto(
                    fd.as_raw_fd(),
                    req,
                    &NetlinkAddr::new(0, 0),
                    MsgFlags::empty(),
                )
                .map_err(io::Error::from)
            });
            match r {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// One datagram and its sender's port id.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, u32)> {
        loop {
            let mut g = self.fd.readable().await?;
            let r = g.try_io(|fd| {
                socket::recvfrom::<NetlinkAddr>(fd.as_raw_fd(), buf).map_err(io::Error::from)
            });
            match r {
                Ok(Ok((n, from))) => return Ok((n, from.map_or(u32::MAX, |a| a.pid()))),
                // ENOBUFS: the socket overflowed and answers were lost;
                // ours may be among them, the timeout bounds the wait.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Where a redirected UDP flow was going ([`Conntrack::original_dst_udp`]
/// on a socket of its own, so lookups of concurrent flows never share one).
pub async fn original_dst_udp(
    local: SocketAddrV4,
    client: SocketAddrV4,
) -> io::Result<SocketAddrV4> {
    Conntrack::open()?.original_dst_udp(local, client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_and_reply_parsing() {
        let req = get_request(
            "10.0.0.1:15001".parse().unwrap(),
            "10.244.7.5:40000".parse().unwrap(),
            7,
        );
        assert_eq!(
            req.len() as u32,
            u32::from_ne_bytes(req[0..4].try_into().unwrap())
        );
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), 0x0101);
        let body = &req[20..];
        let reply = find(body, CTA_TUPLE_REPLY).unwrap();
        let ip = find(reply, CTA_TUPLE_IP).unwrap();
        assert_eq!(find(ip, CTA_IP_V4_SRC).unwrap(), &[10, 0, 0, 1]);
        assert_eq!(find(ip, CTA_IP_V4_DST).unwrap(), &[10, 244, 7, 5]);
        let p = find(reply, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(
            find(p, CTA_PROTO_DST_PORT).unwrap(),
            &40000u16.to_be_bytes()
        );
    }

    /// A netlink message: header (`kind`, `seq`, `port`), the 4-byte
    /// nfgenmsg, then `body`.
    fn message(kind: u16, seq: u32, port: u32, body: &[u8]) -> Vec<u8> {
        let mut msg = ((20 + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&port.to_ne_bytes());
        msg.extend_from_slice(&[2, 0, 0, 0]);
        msg.extend_from_slice(body);
        msg
    }

    /// The kernel's answer for an entry whose original tuple is
    /// 10.244.7.5:40000 → `dst`.
    fn entry(seq: u32, port: u32, dst: SocketAddrV4) -> Vec<u8> {
        let mut attrs = Vec::new();
        nested(&mut attrs, CTA_TUPLE_ORIG, |t| {
            nested(t, CTA_TUPLE_IP, |ip| {
                attr(ip, CTA_IP_V4_SRC, &[10, 244, 7, 5]);
                attr(ip, CTA_IP_V4_DST, &dst.ip().octets());
            });
            nested(t, CTA_TUPLE_PROTO, |p| {
                attr(p, CTA_PROTO_NUM, &[17]);
                attr(p, CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes());
                attr(p, CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
            });
        });
        message(0x0100, seq, port, &attrs)
    }

    #[test]
    fn answers_are_matched_by_sequence_and_port() {
        let want: SocketAddrV4 = "10.244.2.2:53".parse().unwrap();
        let (seq, port) = (41, 9000);
        assert_eq!(
            parse_reply(&entry(seq, port, want), seq, port)
                .unwrap()
                .unwrap(),
            want
        );
        // A stale answer (an earlier request's sequence number) in the
        // same datagram is skipped, ours found after it.
        let mut two = entry(seq - 1, port, "10.9.9.9:53".parse().unwrap());
        two.extend(entry(seq, port, want));
        assert_eq!(parse_reply(&two, seq, port).unwrap().unwrap(), want);
        // Addressed to another socket, or only stale: no answer here.
        assert!(parse_reply(&entry(seq, port + 1, want), seq, port).is_none());
        assert!(parse_reply(&entry(seq + 1, port, want), seq, port).is_none());
        // An error answer becomes the errno.
        // (nlmsgerr: the errno right after the header, then the request's
        // header; no nfgenmsg.)
        let mut err = message(NLMSG_ERROR, seq, port, &[0; 16]);
        err[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        let got = parse_reply(&err, seq, port).unwrap().unwrap_err();
        assert_eq!(got.raw_os_error(), Some(2));
        // Another message type with our number is an error, not an entry.
        let other = message(0x0102, seq, port, &[]);
        assert!(parse_reply(&other, seq, port).unwrap().is_err());
        // Garbage and truncated lengths end the datagram quietly.
        assert!(parse_reply(&[1, 2, 3], seq, port).is_none());
        let mut cut = entry(seq, port, want);
        cut.truncate(30);
        assert!(parse_reply(&cut, seq, port).is_none());
    }

    /// Root can unicast between netlink sockets: a forged answer from
    /// another process, with the right sequence number and sent before the
    /// kernel's, must be ignored; the kernel's own answer (no such entry)
    /// is the result. Read-only: a conntrack GET changes nothing.
    #[tokio::test]
    async fn a_forged_answer_from_userspace_is_ignored() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("REQUIRE_LAB").is_none(),
                "REQUIRE_LAB is set but not running as root"
            );
            eprintln!("SKIPPED a_forged_answer_from_userspace_is_ignored: needs root");
            return;
        }
        let mut ct = Conntrack::open().unwrap();
        let forger = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .unwrap();
        socket::bind(forger.as_raw_fd(), &NetlinkAddr::new(0, 0)).unwrap();
        let seq = ct.seq.load(Ordering::Relaxed);
        let forged = entry(seq, ct.port(), "10.9.9.9:53".parse().unwrap());
        socket::sendto(
            forger.as_raw_fd(),
            &forged,
            &NetlinkAddr::new(ct.port(), 0),
            MsgFlags::empty(),
        )
        .unwrap();
        // A tuple no conntrack entry has (loopback, port 1 to port 2).
        let got = ct
            .original_dst_udp(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            )
            .await;
        assert_eq!(
            got.map_err(|e| e.raw_os_error()),
            Err(Some(nix::libc::ENOENT)),
            "the forged 10.9.9.9:53 must not be taken for the kernel's answer"
        );
    }
}
