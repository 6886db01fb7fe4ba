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

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info};

/// The name RFC 7050 reserves for discovering the NAT64 prefix.
const DISCOVERY_NAME: &str = "ipv4only.arpa";

/// The IPv4 addresses `ipv4only.arpa` has (RFC 7050, section 2.2).
const WELL_KNOWN_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 0, 170), Ipv4Addr::new(192, 0, 0, 171)];

/// How long a discovered prefix is trusted: a carrier's prefix rarely
/// changes. Past it, while a new discovery has not answered, the old
/// prefix is still used: it is never worse than none (only addresses with
/// no route are put behind it).
const TTL: Duration = Duration::from_secs(300);

/// How long a definite "no prefix" is trusted. Discovery runs only while
/// an IPv4 relay address has no route, and with no prefix every such
/// address fails at once: trusting "none" for long only delays the edge
/// that just moved to an IPv6-only uplink (it cost up to [`TTL`], 5
/// minutes, when the first answer came from the old network's resolver),
/// while asking again costs one small DNS question per half minute.
const NONE_TTL: Duration = Duration::from_secs(30);

/// How long a dial attempt waits for discovery. A discovery not answered
/// by then goes on in the background (up to [`GIVE_UP`]) and its answer
/// serves the next attempt: cut at this bound, a resolver slower than it
/// (a dead first name server costs glibc 5 s) never gave a prefix.
const LOOKUP_BOUND: Duration = Duration::from_secs(2);

/// How long a discovery may run in all.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The process's NAT64 discovery.
static DISCOVERY: Discovery = Discovery::new();

/// The NAT64 prefix discovery's last answer, and the one discovery that
/// may be running.
struct Discovery {
    /// The last answer (a prefix, or a definite none) and when it came.
    known: Mutex<Option<(Instant, Option<[u8; 12]>)>>,
    /// Set once the running (or last) discovery ended.
    running: Mutex<Option<watch::Receiver<bool>>>,
}

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

/// The network's NAT64 prefix, from the AAAA records of `ipv4only.arpa`
/// (see [`Discovery::discover_with`]).
async fn discover() -> Option<[u8; 12]> {
    DISCOVERY
        .discover_with(|| async {
            tokio::net::lookup_host((DISCOVERY_NAME, 0))
                .await
                .map(|a| a.map(|a| a.ip()).collect())
        })
        .await
}

impl Discovery {
    const fn new() -> Self {
        Discovery {
            known: Mutex::new(None),
            running: Mutex::new(None),
        }
    }

    /// The last answer while it is trusted ([`TTL`], [`NONE_TTL`]), else
    /// that of a discovery (`lookup`, the addresses `ipv4only.arpa`
    /// resolves to; one at a time, joined when running) waited for up to
    /// [`LOOKUP_BOUND`]. A lookup that fails is not remembered, and tried
    /// again next time; one slower than the bound is remembered when it
    /// answers. Without a new answer in time, an expired prefix stands in.
    async fn discover_with<F, Fut>(&'static self, lookup: F) -> Option<[u8; 12]>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'static,
    {
        if let Some((at, prefix)) = self.trusted() {
            debug!(age = ?at.elapsed(), "NAT64 prefix from the last discovery");
            return prefix;
        }
        let mut done = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.as_ref().filter(|rx| !*rx.borrow()) {
                Some(rx) => rx.clone(),
                None => {
                    let rx = self.spawn(lookup());
                    *running = Some(rx.clone());
                    rx
                }
            }
        };
        if tokio::time::timeout(LOOKUP_BOUND, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            debug!("no answer for {DISCOVERY_NAME} within {LOOKUP_BOUND:?}; still asking");
        }
        // This discovery's answer if it came, else an expired prefix.
        self.last().and_then(|(_, prefix)| prefix)
    }

    /// The last answer, trusted or not.
    fn last(&self) -> Option<(Instant, Option<[u8; 12]>)> {
        *self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last answer, if still trusted.
    fn trusted(&self) -> Option<(Instant, Option<[u8; 12]>)> {
        self.last().filter(|(at, prefix)| {
            at.elapsed()
                < match prefix {
                    Some(_) => TTL,
                    None => NONE_TTL,
                }
        })
    }

    /// Runs `lookup` to its end (at most [`GIVE_UP`]) whoever waits,
    /// remembering its answer; the receiver turns true when it ended.
    fn spawn(
        &'static self,
        lookup: impl Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'static,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            match tokio::time::timeout(GIVE_UP, lookup).await {
                Ok(Ok(answers)) => {
                    let prefix = answers
                        .into_iter()
                        .filter_map(|a| match a {
                            IpAddr::V6(v6) => prefix_of(v6),
                            IpAddr::V4(_) => None,
                        })
                        .next();
                    *self.known.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), prefix));
                }
                Ok(Err(e)) => debug!(error = %e, "{DISCOVERY_NAME} not resolved"),
                Err(_) => debug!("no answer for {DISCOVERY_NAME} within {GIVE_UP:?}"),
            }
            tx.send_replace(true);
        });
        rx
    }
}

/// The network's NAT64 prefix as last discovered (trusted or not: a
/// carrier's prefix rarely changes), as a /96; `None` before discovery or
/// on a network without NAT64. Capture's IPv6 refusal leaves it alone
/// (see `subnets::Lans`): an over-wide IPv6 tunnel route must not cut
/// the host off from the IPv4 Internet behind a carrier's NAT64.
pub(crate) fn known_prefix() -> Option<relay_protocol::Cidr> {
    DISCOVERY.prefix_cidr()
}

impl Discovery {
    /// [`known_prefix`] of this discovery.
    fn prefix_cidr(&self) -> Option<relay_protocol::Cidr> {
        let (_, prefix) = self.last()?;
        let net = synthesize(prefix?, Ipv4Addr::UNSPECIFIED);
        relay_protocol::Cidr::new(IpAddr::V6(net), 96).ok()
    }
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
    use crate::test_resolver::SlowResolver;

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

    /// A discovery of its own (the process's is shared by every test).
    fn discovery() -> &'static Discovery {
        Box::leak(Box::new(Discovery::new()))
    }

    /// `ipv4only.arpa`'s addresses as a DNS64 answers them (behind
    /// `64:ff9b::/96`), or as a plain resolver does (`dns64` false: its A
    /// records only).
    fn ipv4only_arpa(dns64: bool) -> Vec<IpAddr> {
        match dns64 {
            true => vec!["64:ff9b::c000:aa".parse().unwrap()],
            false => vec![WELL_KNOWN_V4[0].into()],
        }
    }

    fn wkp() -> [u8; 12] {
        prefix_of("64:ff9b::c000:aa".parse().unwrap()).unwrap()
    }

    /// A DNS64 that answers after 3 s (a dead first name server costs
    /// glibc 5 s): the attempt it held up finds no prefix, the discovery
    /// goes on and the next attempt has the prefix; attempts meanwhile
    /// join it, one lookup in all; once known, no lookup at all.
    #[tokio::test]
    async fn a_slow_dns64_still_gives_the_prefix() {
        let d = discovery();
        let resolver = SlowResolver::default();
        let slow = || resolver.answer(Duration::from_secs(3), ipv4only_arpa(true));
        let t0 = Instant::now();
        assert_eq!(d.discover_with(slow()).await, None, "not within the bound");
        assert!(t0.elapsed() < Duration::from_millis(2500));
        for _ in 0..4 {
            // Within the attempt's bound of the answer: joined.
            assert_eq!(d.discover_with(slow()).await, Some(wkp()));
        }
        assert!(
            t0.elapsed() < Duration::from_millis(3500),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(resolver.started(), 1);
    }

    /// The discovered prefix as a /96 for capture's IPv6 refusal to leave
    /// alone: none before an answer or after a "no NAT64" one.
    #[tokio::test]
    async fn the_known_prefix_is_the_discovered_96() {
        let d = discovery();
        assert_eq!(d.prefix_cidr(), None, "nothing discovered yet");
        let resolver = SlowResolver::default();
        let none = resolver.answer(Duration::ZERO, ipv4only_arpa(false));
        assert_eq!(d.discover_with(none).await, None);
        assert_eq!(d.prefix_cidr(), None, "no NAT64 here");
        let carrier: Ipv6Addr = "2001:db8:64:ff::c000:aa".parse().unwrap();
        let dns64 = resolver.answer(Duration::ZERO, vec![carrier.into()]);
        *d.known.lock().unwrap() = None;
        assert!(d.discover_with(dns64).await.is_some());
        assert_eq!(
            d.prefix_cidr(),
            Some("2001:db8:64:ff::/96".parse().unwrap())
        );
    }

    /// An answer that comes after every attempt stopped waiting is kept
    /// for the next one.
    #[tokio::test]
    async fn an_answer_nobody_waited_for_is_kept() {
        let d = discovery();
        let resolver = SlowResolver::default();
        assert_eq!(
            d.discover_with(resolver.answer(Duration::from_secs(3), ipv4only_arpa(true)))
                .await,
            None
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t0 = Instant::now();
        let again = resolver.answer(Duration::from_secs(3), ipv4only_arpa(true));
        assert_eq!(d.discover_with(again).await, Some(wkp()));
        assert!(t0.elapsed() < Duration::from_millis(100));
        assert_eq!(resolver.started(), 1);
    }

    /// A definite "no prefix" is trusted for half a minute, not the
    /// prefix's 5 minutes (an edge that moved to an IPv6-only uplink
    /// finds its prefix within 31 s); an
    /// expired prefix stands in while its rediscovery is slow, and a new
    /// answer replaces it.
    #[tokio::test]
    async fn answers_expire() {
        let ago = |d: Duration| Instant::now().checked_sub(d).unwrap();
        let resolver = SlowResolver::default();
        let d = discovery();
        *d.known.lock().unwrap() = Some((ago(Duration::from_secs(5)), None));
        assert_eq!(
            d.discover_with(resolver.answer(Duration::ZERO, ipv4only_arpa(true)))
                .await,
            None
        );
        assert_eq!(resolver.started(), 0, "a fresh none is trusted");
        *d.known.lock().unwrap() = Some((ago(Duration::from_secs(31)), None));
        let quick = resolver.answer(Duration::ZERO, ipv4only_arpa(true));
        assert_eq!(
            d.discover_with(quick).await,
            Some(wkp()),
            "the uplink moved"
        );
        assert_eq!(resolver.started(), 1);

        let d = discovery();
        *d.known.lock().unwrap() = Some((ago(TTL), Some(wkp())));
        let silent = resolver.answer(Duration::from_secs(3600), ipv4only_arpa(false));
        assert_eq!(
            d.discover_with(silent).await,
            Some(wkp()),
            "expired stands in"
        );
        assert_eq!(resolver.started(), 2);
        let d = discovery();
        *d.known.lock().unwrap() = Some((ago(TTL), Some(wkp())));
        let none = resolver.answer(Duration::ZERO, ipv4only_arpa(false));
        assert_eq!(
            d.discover_with(none).await,
            None,
            "a new answer replaces it"
        );
    }

    /// Loopback is always routed: nothing is rewritten, nothing looked up.
    #[tokio::test]
    async fn routed_addresses_are_left_alone() {
        let addrs: Vec<SocketAddr> = vec!["127.0.0.1:8443".parse().unwrap()];
        assert_eq!(reachable(addrs.clone(), 0).await, addrs);
    }
}
