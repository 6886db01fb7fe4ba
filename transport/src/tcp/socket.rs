//! Socket options of the fallback's TCP connections (and of CONNECT's).

use std::time::Duration;

/// How long sent data may stay unacknowledged before the kernel gives up
/// on a TCP connection (`TCP_USER_TIMEOUT`). Without it a dead path is
/// retransmitted into for ~15 minutes (tcp_retries2) and every write on the
/// fallback session queues behind it. 30 s is well above the queueing delay
/// of a slow, deep-buffered uplink (seconds), and the session layer's pings
/// usually notice a dead path sooner (within 3 keep-alive intervals).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this much written and not yet sent stays in a fallback
/// session's kernel send buffer (`TCP_NOTSENT_LOWAT`): yamux writes the
/// next frame only when the socket has room, so with the kernel's
/// auto-tuned buffer (megabytes) a control ping written during a bulk
/// upload waited behind all of it — 30 s and more on a 1 Mbit/s uplink,
/// longer than the liveness bound, and the session was dropped while
/// the path was fine. With 128 KiB the ping waits about a second there,
/// and a fast path still keeps enough queued to fill it (the low-water
/// mark bounds only what is not yet sent; what is in flight is not
/// counted).
pub(super) const NOTSENT_LOWAT: u32 = 128 << 10;

/// Socket options of the fallback's tunnel sockets (the edge's dialled
/// one, the relay's accepted ones): [`tune_listener`]'s, [`USER_TIMEOUT`],
/// and `NOTSENT_LOWAT` (128 KiB), which CONNECT's client sockets do not
/// need (they carry one stream each).
pub fn tune_socket(s: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(s);
    tune(&sock);
    // A tunnel socket is always read (yamux reads whatever arrives and
    // applies flow control per stream), so a closed window here is a
    // stalled peer, not a slow reader.
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
    if let Err(error) = set_not_sent_lowat(s, NOTSENT_LOWAT) {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
    }
}

/// Sets `TCP_NOTSENT_LOWAT` on a TCP socket: it polls writable only while
/// less than `bytes` of what was written to it is not yet sent (what is in
/// flight is not counted), so a writer keeps little queued behind the
/// congestion window.
pub fn set_not_sent_lowat(s: &impl std::os::fd::AsFd, bytes: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let lowat = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // No safe wrapper in socket2 or nix for this option.
    // SAFETY: an open fd borrowed from `s` (`AsFd`) for the call, and a
    // c_int option of that size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&lowat as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Socket options of CONNECT's client sockets, set once on their listener
/// (Linux copies them to every socket it accepts, so accepted connections
/// get them without a syscall of their own): no Nagle delay; and TCP
/// keep-alive well under CGNAT idle timers, so the NAT binding of an idle
/// connection stays open and a peer that vanished without a FIN or RST is
/// probed (from 10 s of silence, every 5 s, given up after 3 unanswered:
/// 25 s).
///
/// Not [`USER_TIMEOUT`]: Linux also aborts a connection whose peer has
/// kept its receive window closed that long, however promptly it answers
/// the window probes, and a CONNECT client legitimately stops reading
/// (kube-apiserver copies an exec or port-forward stream to its own
/// client, and stops reading when that client does: `kubectl exec ... |
/// less` paused, a port-forward whose consumer stalls): with it such a
/// stream was reset about 30 s into the pause. A vanished client with
/// data unacknowledged is then given up by the kernel's retransmission
/// limit (`tcp_retries2`, about 15 minutes) instead.
pub fn tune_listener(l: &tokio::net::TcpListener) {
    tune(&socket2::SockRef::from(l));
}

/// Sets the maximum segment size on a listener (the relay's fallback
/// listener, see [`DEFAULT_FALLBACK_MSS`]): its SYN-ACKs announce it, and
/// Linux clamps every accepted connection's own segments to it too.
pub fn set_listener_mss(l: &tokio::net::TcpListener, mss: u32) -> std::io::Result<()> {
    socket2::SockRef::from(l).set_tcp_mss(mss)
}

fn tune(sock: &socket2::SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tuned_sockets_have_keepalive_user_timeout_and_notsent_lowat() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        tune_socket(&c);
        let r = socket2::SockRef::from(&c);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(r.tcp_nodelay().unwrap());
        // The low-water mark, read back (no wrapper in socket2 or nix).
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd owned by `c`, and a c_int with its length.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&c),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(v as u32, NOTSENT_LOWAT);
    }
}
