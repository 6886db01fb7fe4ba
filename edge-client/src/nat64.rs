//! Reaching an IPv4 relay address from an IPv6-only uplink, through the
//! carrier's NAT64.
//!
//! Mobile carriers increasingly give devices IPv6 only, with DNS64 and
//! NAT64 for the IPv4 internet. A relay *name* works there (DNS64
//! synthesises an AAAA record for it), an IPv4 *literal* does not: no DNS
//! lookup, nothing synthesised, and no IPv4 route. Relay replicas advertise
//! themselves by IPv4 literal (their node's address), so an IPv6-only edge
//! would reach the replica its name led to and no other. RFC 7050 gives
//! the way out: `ipv4only.arpa` has only A records (192.0.0.170 and .171),
//! so any AAAA record the resolver returns for it was synthesised, and
//! carries the network's NAT64 prefix. An IPv4 address this host has no
//! route to is then dialled as that prefix plus the address (RFC 6052).
//! Only /96 prefixes are understood: the well-known `64:ff9b::/96` and the
//! network-specific prefixes carriers use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info};

/// The name RFC 7050 reserves for discovering the NAT64 prefix.
const DISCOVERY_NAME: &str = "ipv4only.arpa";

/// The IPv4 addresses `ipv4only.arpa` has (RFC 7050, section 2.2).
const WELL_KNOWN_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 0, 170), Ipv4Addr::new(192, 0, 0, 171)];

/// How long a discovery's answer (a prefix, or a definite none) is
/// trusted: a carrier's prefix rarely changes, an uplink (cellular to a
/// site's Wi-Fi) now and then.
const TTL: Duration = Duration::from_secs(300);

/// Bound on the discovery lookup: it runs inside a dial attempt.
const LOOKUP_BOUND: Duration = Duration::from_secs(2);

/// The last answer and when it came.
static KNOWN: Mutex<Option<(Instant, Option<[u8; 12]>)>> = Mutex::new(None);

/// `addrs`, each IPv4 address this host has no route to replaced by its
/// NAT64 form when the network has a NAT64 prefix; unchanged otherwise.
/// `mark` is the edge's own socket mark (its routing bypasses capture).
pub(crate) async fn reachable(addrs: Vec<SocketAddr>, mark: u32) -> Vec<SocketAddr> {
    let routed = |a: &SocketAddr| has_route(*a, mark);
    if addrs.iter().all(|a| a.is_ipv6() || routed(a)) {
        return addrs;
    }
    let Some(prefix) = discover().await else {
        debug!("no IPv4 route to the relay, and no NAT64 prefix (no DNS64 answer for {DISCOVERY_NAME})");
        return addrs;
    };
    let out = rewrite(&addrs, prefix, routed);
    info!(from = ?addrs, to = ?out, "no IPv4 route: dialling the relay's IPv4 addresses through NAT64");
    out
}

/// `addrs` with each IPv4 address `routed` says no to put behind `prefix`.
fn rewrite(
    addrs: &[SocketAddr],
    prefix: [u8; 12],
    routed: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    addrs
        .iter()
        .map(|a| match a.ip() {
            IpAddr::V4(v4) if !routed(a) => {
                SocketAddr::new(synthesize(prefix, v4).into(), a.port())
            }
            _ => *a,
        })
        .collect()
}

/// Whether this host has a route to `addr` (no packet is sent: a UDP
/// socket's `connect` only picks the route).
pub(crate) fn has_route(addr: SocketAddr, mark: u32) -> bool {
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(sock) = std::net::UdpSocket::bind(bind) else {
        return false;
    };
    if mark != 0 {
        let _ = relay_transport::capture::mark_socket(socket2::SockRef::from(&sock), mark);
    }
    sock.connect(addr).is_ok()
}

/// The network's NAT64 prefix, from the AAAA records of `ipv4only.arpa`:
/// remembered for [`TTL`] once the resolver answered; a lookup that fails
/// or takes longer than [`LOOKUP_BOUND`] counts as none, and is tried
/// again next time.
async fn discover() -> Option<[u8; 12]> {
    let known = *KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, prefix)) = known.filter(|(at, _)| at.elapsed() < TTL) {
        debug!(age = ?at.elapsed(), "NAT64 prefix from the last discovery");
        return prefix;
    }
    let lookup = tokio::net::lookup_host((DISCOVERY_NAME, 0));
    let Ok(Ok(answers)) = tokio::time::timeout(LOOKUP_BOUND, lookup).await else {
        return None;
    };
    let prefix = answers
        .filter_map(|a| match a.ip() {
            IpAddr::V6(v6) => prefix_of(v6),
            IpAddr::V4(_) => None,
        })
        .next();
    *KNOWN.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), prefix));
    prefix
}

/// The /96 prefix of a synthesised `ipv4only.arpa` address.
fn prefix_of(v6: Ipv6Addr) -> Option<[u8; 12]> {
    let o = v6.octets();
    let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    WELL_KNOWN_V4
        .contains(&v4)
        .then(|| o[..12].try_into().ok())
        .flatten()
}

/// `v4` behind the /96 `prefix` (RFC 6052, section 2.2).
fn synthesize(prefix: [u8; 12], v4: Ipv4Addr) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[..12].copy_from_slice(&prefix);
    o[12..].copy_from_slice(&v4.octets());
    Ipv6Addr::from(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix comes only from a synthesised `ipv4only.arpa` answer, and
    /// only unrouted IPv4 addresses are put behind it, ports kept.
    #[test]
    fn unrouted_ipv4_addresses_go_behind_the_discovered_prefix() {
        let wkp = prefix_of("64:ff9b::c000:aa".parse().unwrap()).unwrap();
        assert_eq!(
            prefix_of("2001:db8:64::c000:ab".parse().unwrap()),
            Some(
                "2001:db8:64::".parse::<Ipv6Addr>().unwrap().octets()[..12]
                    .try_into()
                    .unwrap()
            )
        );
        assert_eq!(
            prefix_of("2001:db8::1".parse().unwrap()),
            None,
            "not synthesised"
        );
        let addrs: Vec<SocketAddr> = vec![
            "203.0.113.7:8443".parse().unwrap(),
            "[2001:db8::5]:8443".parse().unwrap(),
            "10.0.0.9:8443".parse().unwrap(),
        ];
        let routed = |a: &SocketAddr| a.ip() == "10.0.0.9".parse::<IpAddr>().unwrap();
        let out = rewrite(&addrs, wkp, routed);
        let want: Vec<SocketAddr> = vec![
            "[64:ff9b::cb00:7107]:8443".parse().unwrap(),
            "[2001:db8::5]:8443".parse().unwrap(),
            "10.0.0.9:8443".parse().unwrap(),
        ];
        assert_eq!(out, want);
    }

    /// Loopback is always routed: nothing is rewritten, nothing looked up.
    #[tokio::test]
    async fn routed_addresses_are_left_alone() {
        let addrs: Vec<SocketAddr> = vec!["127.0.0.1:8443".parse().unwrap()];
        assert_eq!(reachable(addrs.clone(), 0).await, addrs);
    }
}
