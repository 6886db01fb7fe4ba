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
//! - the entries of captured UDP flows are also kept alive against
//!   deletion by others (kube-proxy's stale-entry cleanup): a socket
//!   subscribed to conntrack's destroy events ([`Conntrack::subscribe_destroy`])
//!   sees the deletion, and the entry is created again as it was
//!   (`IPCTNL_MSG_CT_NEW` with the original tuple and the same
//!   destination NAT); see `udp_capture/keep.rs`.
//!
//! The ctnetlink messages are built and parsed here (a few attributes)
//! rather than with a netlink crate: the requests are nested tuples and a
//! few scalars, the answers a few attribute paths, all covered by the
//! tests below.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
/// The multicast group of conntrack's destroy events.
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// `IPS_SEEN_REPLY`: the entry saw a packet in the reply direction.
pub(crate) const IPS_SEEN_REPLY: u32 = 1 << 1;
/// `IPS_ASSURED`: a UDP entry that became a stream.
pub(crate) const IPS_ASSURED: u32 = 1 << 2;
/// `IPS_DYING`: the entry is being deleted. The kernel reports its
/// destroy event before it unlinks it, so a lookup right after the event
/// can still find it.
pub(crate) const IPS_DYING: u32 = 1 << 9;
/// `IPS_CONFIRMED`: set on every entry in the table; a created entry's
/// `CTA_STATUS` must include it (the kernel refuses to change it).
const IPS_CONFIRMED: u32 = 1 << 3;
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

/// One direction of a UDP conntrack entry (IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
}

/// A UDP conntrack entry as ctnetlink reports it (an answer or an event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) orig: Tuple,
    pub(crate) reply: Tuple,
    /// `CTA_STATUS` (`IPS_*` bits); 0 when absent.
    pub(crate) status: u32,
}

/// A nested `CTA_TUPLE_*` attribute of kind `kind` for UDP `t`.
fn tuple(out: &mut Vec<u8>, kind: u16, t: Tuple) {
    nested(out, kind, |tu| {
        nested(tu, CTA_TUPLE_IP, |ip| {
            attr(ip, CTA_IP_V4_SRC, &t.src.ip().octets());
            attr(ip, CTA_IP_V4_DST, &t.dst.ip().octets());
        });
        nested(tu, CTA_TUPLE_PROTO, |p| {
            attr(p, CTA_PROTO_NUM, &[IPPROTO_UDP]);
            attr(p, CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
            attr(p, CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
        });
    });
}

/// A ctnetlink message of type `msg` with `flags` and attributes `attrs`.
fn message(msg: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET, version 0, resource id 0.
    out.extend_from_slice(&[nix::libc::AF_INET as u8, 0, 0, 0]);
    out.extend_from_slice(attrs);
    out
}

/// The request: "the UDP conntrack entry whose reply tuple is
/// `reply_src` → `reply_dst`".
fn get_request(reply_src: SocketAddrV4, reply_dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    let t = Tuple {
        src: reply_src,
        dst: reply_dst,
    };
    tuple(&mut attrs, CTA_TUPLE_REPLY, t);
    message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, &attrs)
}

/// The request: "the UDP entry whose original tuple is `orig`" (no ack:
/// the answer is the entry or an error).
pub(crate) fn get_orig_request(orig: Tuple, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    tuple(&mut attrs, CTA_TUPLE_ORIG, orig);
    message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, &attrs)
}

/// The request: "delete the UDP entry whose original tuple is `orig`",
/// acknowledged.
pub(crate) fn delete_request(orig: Tuple, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    tuple(&mut attrs, CTA_TUPLE_ORIG, orig);
    message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, &attrs)
}

/// The request: "create the UDP entry `orig`, destination-NATed to
/// `nat_to`, for `timeout_secs`, with the `IPS_SEEN_REPLY` and
/// `IPS_ASSURED` bits of `status`; fail with `EEXIST` if an entry has
/// either of its tuples", acknowledged. What the capture's DNAT made of
/// the flow's first packet: the kernel derives the reply tuple
/// (`nat_to` → the client) from the un-NATed one given here, and marks
/// the entry `IPS_DST_NAT`, so replies from `nat_to` are un-NATed again.
pub(crate) fn create_request(
    orig: Tuple,
    nat_to: SocketAddrV4,
    timeout_secs: u32,
    status: u32,
    seq: u32,
) -> Vec<u8> {
    let mut attrs = Vec::new();
    tuple(&mut attrs, CTA_TUPLE_ORIG, orig);
    let unnated = Tuple {
        src: orig.dst,
        dst: orig.src,
    };
    tuple(&mut attrs, CTA_TUPLE_REPLY, unnated);
    let status = IPS_CONFIRMED | (status & (IPS_SEEN_REPLY | IPS_ASSURED));
    attr(&mut attrs, CTA_STATUS, &status.to_be_bytes());
    attr(&mut attrs, CTA_TIMEOUT, &timeout_secs.max(1).to_be_bytes());
    nested(&mut attrs, CTA_NAT_DST, |n| {
        attr(n, CTA_NAT_V4_MINIP, &nat_to.ip().octets());
        attr(n, CTA_NAT_V4_MAXIP, &nat_to.ip().octets());
        nested(n, CTA_NAT_PROTO, |p| {
            attr(p, CTA_PROTONAT_PORT_MIN, &nat_to.port().to_be_bytes());
            attr(p, CTA_PROTONAT_PORT_MAX, &nat_to.port().to_be_bytes());
        });
    });
    message(
        IPCTNL_MSG_CT_NEW,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        &attrs,
    )
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
pub(crate) struct Header {
    pub(crate) kind: u16,
    pub(crate) seq: u32,
    pub(crate) port: u32,
}

/// Splits a received datagram into its netlink messages (`header`, whole
/// message); a datagram may carry several, and a malformed length ends it.
pub(crate) fn messages(mut b: &[u8]) -> impl Iterator<Item = (Header, &[u8])> {
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

/// One tuple (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`'s payload), if UDP
/// over IPv4.
fn parse_tuple(t: &[u8]) -> Option<Tuple> {
    let ip = find(t, CTA_TUPLE_IP)?;
    let proto = find(t, CTA_TUPLE_PROTO)?;
    if find(proto, CTA_PROTO_NUM)? != [IPPROTO_UDP] {
        return None;
    }
    let addr = |ip_kind, port_kind| -> Option<SocketAddrV4> {
        let a: [u8; 4] = find(ip, ip_kind)?.try_into().ok()?;
        let p: [u8; 2] = find(proto, port_kind)?.try_into().ok()?;
        Some(SocketAddrV4::new(Ipv4Addr::from(a), u16::from_be_bytes(p)))
    };
    Some(Tuple {
        src: addr(CTA_IP_V4_SRC, CTA_PROTO_SRC_PORT)?,
        dst: addr(CTA_IP_V4_DST, CTA_PROTO_DST_PORT)?,
    })
}

/// The UDP entry a ctnetlink message (`IPCTNL_MSG_CT_NEW` answer or
/// `IPCTNL_MSG_CT_DELETE` event, whole message) describes; `None` for
/// anything else (another protocol, IPv6, malformed).
pub(crate) fn parse_entry(msg: &[u8]) -> Option<Entry> {
    let body = msg.get(20..)?;
    let status = find(body, CTA_STATUS)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes);
    Some(Entry {
        orig: parse_tuple(find(body, CTA_TUPLE_ORIG)?)?,
        reply: parse_tuple(find(body, CTA_TUPLE_REPLY)?)?,
        status,
    })
}

/// Whether a message is a destroy event (the kernel reports an entry's
/// end as `IPCTNL_MSG_CT_DELETE`).
pub(crate) fn is_destroy_event(kind: u16) -> bool {
    kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
}

/// What a request's answer message says: `Ok(None)` an ack, `Ok(Some)` an
/// entry, `Err` the kernel's error.
pub(crate) fn parse_answer(kind: u16, msg: &[u8]) -> io::Result<Option<Entry>> {
    if kind == NLMSG_ERROR {
        let errno = msg
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink error"))?;
        return match errno {
            0 => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
    }
    parse_entry(msg)
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "conntrack answer"))
}

/// How long the capture's own deletion of a service port's entries
/// ([`note_capture_deletes`]) is remembered: the flows that started before
/// it must take their new way, and such a flow gets no packet after it
/// (they now go where the new rules send them), so it ends within its idle
/// bound (60 s by default, and never past conntrack's UDP stream timeout,
/// 120 s by default); the records are pruned well after that.
const CAPTURE_DELETE_WINDOW: Duration = Duration::from_secs(600);

/// Service ports whose entries the capture deleted lately, and when, by
/// network namespace: a process may hold captures in several (the lab
/// runs a relay and its edges in one process), each deleting its own.
static CAPTURE_DELETES: Mutex<Option<HashMap<(u64, SocketAddrV4), Instant>>> = Mutex::new(None);

/// The network namespace of the calling thread (its inode; 0 if it cannot
/// be read): where the conntrack table it deletes from and watches is.
fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

/// Records that the capture is about to delete the UDP entries towards
/// `addr` on purpose (its capture changed), so that the entries are not
/// re-created for flows still open. Old records are pruned here, so the
/// map holds only the ports of the last [`CAPTURE_DELETE_WINDOW`].
pub(crate) fn note_capture_deletes(addr: SocketAddr) {
    let SocketAddr::V4(addr) = addr else {
        return;
    };
    let key = (netns_id(), addr);
    let now = Instant::now();
    let mut g = CAPTURE_DELETES.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, at| now.duration_since(*at) < CAPTURE_DELETE_WINDOW);
    map.insert(key, now);
}

/// Whether the capture of the calling thread's network namespace deleted
/// the entries towards `addr` itself within the last
/// [`CAPTURE_DELETE_WINDOW`], after a flow `age` old had started: that
/// flow's entry is to stay deleted. A flow that started after the capture
/// changed is under its new rules already; its entry is kept.
pub(crate) fn capture_deleted(addr: SocketAddrV4, age: Duration) -> bool {
    let key = (netns_id(), addr);
    let g = CAPTURE_DELETES.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().and_then(|m| m.get(&key)).is_some_and(|at| {
        let since = at.elapsed();
        since < CAPTURE_DELETE_WINDOW && age >= since
    })
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
        Self::open_groups(0)
    }

    /// Opens a socket that also receives conntrack's destroy events (needs
    /// CAP_NET_ADMIN). Its receive buffer is raised (to 4 MiB where
    /// allowed) so a burst of deletions (kube-proxy's cleanup of a busy
    /// node) rarely overflows it; an overflow is reported by
    /// `Conntrack::recv_datagram` as `ENOBUFS`.
    pub fn subscribe_destroy() -> io::Result<Conntrack> {
        let ct = Self::open_groups(1 << (NFNLGRP_CONNTRACK_DESTROY - 1))?;
        let size: usize = 4 << 20;
        // FORCE needs CAP_NET_ADMIN (which ctnetlink needs anyway); the
        // plain option, capped by net.core.rmem_max, is the fallback.
        if socket::setsockopt(ct.fd.get_ref(), sockopt::RcvBufForce, &size).is_err() {
            let _ = socket::setsockopt(ct.fd.get_ref(), sockopt::RcvBuf, &size);
        }
        Ok(ct)
    }

    fn open_groups(groups: u32) -> io::Result<Conntrack> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(io::Error::from)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(io::Error::from)?;
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

    /// A fresh sequence number for a request (never 0, which events use).
    pub(crate) fn next_seq(&self) -> u32 {
        loop {
            let s = self.seq.fetch_add(1, Ordering::Relaxed);
            if s != 0 {
                return s;
            }
        }
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

    pub(crate) async fn send(&self, req: &[u8]) -> io::Result<()> {
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
            match self.recv_datagram(buf).await {
                // ENOBUFS: the socket overflowed and answers were lost;
                // ours may be among them, the timeout bounds the wait.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => continue,
                r => return r,
            }
        }
    }

    /// One datagram and its sender's port id; `ENOBUFS` when the socket
    /// overflowed since the last read (messages were lost).
    pub(crate) async fn recv_datagram(&self, buf: &mut [u8]) -> io::Result<(usize, u32)> {
        loop {
            let mut g = self.fd.readable().await?;
            let r = g.try_io(|fd| {
                socket::recvfrom::<NetlinkAddr>(fd.as_raw_fd(), buf).map_err(io::Error::from)
            });
            match r {
                Ok(Ok((n, from))) => return Ok((n, from.map_or(u32::MAX, |a| a.pid()))),
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
