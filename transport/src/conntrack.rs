//! Original destinations of redirected connections.
//!
//! Capture redirects traffic with NAT (see [`crate::capture`]), so the
//! kernel's connection tracking knows where each connection was going:
//! - TCP: `SO_ORIGINAL_DST` on the accepted socket ([`original_dst_tcp`]);
//! - UDP: the kernel offers no socket option, so [`original_dst_udp`] asks
//!   conntrack over netlink (`IPCTNL_MSG_CT_GET` by the reply tuple: the
//!   redirected local address and the client).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

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

/// Parses the kernel's answer: the original tuple's destination.
fn parse_reply(buf: &[u8]) -> io::Result<SocketAddrV4> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("conntrack reply: {what}"),
        )
    };
    if buf.len() < 20 {
        return Err(bad("short"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let len = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(buf.len());
    let body = buf.get(20..len).ok_or_else(|| bad("truncated"))?;
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

/// Where a redirected UDP flow was going: looks up the conntrack entry
/// whose reply tuple is `local` (the redirected address we received on) →
/// `client`. One netlink round trip, bounded by a 1 s receive timeout.
pub fn original_dst_udp(local: SocketAddrV4, client: SocketAddrV4) -> io::Result<SocketAddrV4> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(io::Error::from)?;
    socket::setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )
    .map_err(io::Error::from)?;
    let seq = rand::random::<u32>();
    let req = get_request(local, client, seq);
    socket::sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut buf = vec![0u8; 4096];
    let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io::Error::from)?;
    parse_reply(&buf[..n])
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
        // A kernel answer carrying the original tuple 10.244.7.5:40000 →
        // 10.244.2.2:53 parses to its destination.
        let mut attrs = Vec::new();
        nested(&mut attrs, CTA_TUPLE_ORIG, |t| {
            nested(t, CTA_TUPLE_IP, |ip| {
                attr(ip, CTA_IP_V4_SRC, &[10, 244, 7, 5]);
                attr(ip, CTA_IP_V4_DST, &[10, 244, 2, 2]);
            });
            nested(t, CTA_TUPLE_PROTO, |p| {
                attr(p, CTA_PROTO_NUM, &[17]);
                attr(p, CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes());
                attr(p, CTA_PROTO_DST_PORT, &53u16.to_be_bytes());
            });
        });
        let mut msg = ((20 + attrs.len()) as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&0x0100u16.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[2, 0, 0, 0]);
        msg.extend_from_slice(&attrs);
        assert_eq!(parse_reply(&msg).unwrap(), "10.244.2.2:53".parse().unwrap());
        // An error answer becomes the errno.
        let mut err = 36u32.to_ne_bytes().to_vec();
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-2i32).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(parse_reply(&err).unwrap_err().raw_os_error(), Some(2));
        assert!(parse_reply(&[1, 2, 3]).is_err());
    }
}
