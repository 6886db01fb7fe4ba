//! The edge's connected sessions as capture sees them: each one's
//! connection and the tunnel routes its relay lists.
//!
//! Every relay replica sends the edge its own route list. They agree but
//! for moments of a change, and one such moment matters: a peer edge whose
//! session to replica A ended (a flap, a path cut to A only, A restarted
//! and the peer not back yet) is withdrawn by A while replica B still
//! serves it. So capture installs the union of the lists of every
//! connected session (a session's list counted once it is complete, see
//! [`EdgeState::Connected`]'s `routes_complete`), and each edge-opened
//! stream or UDP flow goes on a session whose relay lists a route covering
//! its destination: the primary session (the one the client's state
//! shows) when its relay does, else the first other one that does, else
//! the primary (whose relay then refuses, as it would have). Sessions whose
//! relay drains them (GOAWAY: a restart, a rolling update) come last among
//! those that cover: what is opened through them is cut when the drain's
//! grace ends, and until the edge notices the relay is going every edge
//! would keep sending its cloud traffic to it.
//!
//! [`EdgeState::Connected`]: crate::client::EdgeState::Connected

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::task::AbortOnDropHandle;

use relay_protocol::Cidr;
use relay_transport::udp::FlowTable;
use relay_transport::TunnelConn;

/// Prefixes to ask "does one of you cover this address?" per connection
/// without allocating: one binary search per distinct prefix length (a
/// handful), whatever the number of routes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RouteSet {
    /// Sorted, without duplicates.
    routes: Vec<Cidr>,
    /// The distinct prefix lengths in `routes`.
    lens: Vec<u8>,
}

impl RouteSet {
    /// The set of `routes`.
    pub(crate) fn new(routes: &[Cidr]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_unstable();
        routes.dedup();
        let mut lens: Vec<u8> = routes.iter().map(Cidr::prefix_len).collect();
        lens.sort_unstable();
        lens.dedup();
        RouteSet { routes, lens }
    }

    /// Whether a prefix of the set contains `ip`.
    pub(crate) fn covers(&self, ip: IpAddr) -> bool {
        self.lens.iter().any(|len| {
            Cidr::containing(ip, *len).is_some_and(|c| self.routes.binary_search(&c).is_ok())
        })
    }
}

/// One connected session: its connection and what its relay lists.
pub(crate) struct Live {
    session_id: u64,
    /// The session's connection, for streams the edge opens.
    pub(crate) conn: TunnelConn,
    /// Its UDP flow table (flows live and die with the session).
    pub(crate) flows: Arc<FlowTable>,
    /// The relay's tunnel routes, as the session's state holds them.
    tunnel: Vec<Cidr>,
    /// Whether `tunnel` is the relay's complete set.
    complete: bool,
    /// What the relay says this edge serves.
    served: Vec<Cidr>,
    /// `tunnel` for lookups once complete; empty until then.
    set: RouteSet,
    /// The relay drains this session (it sent GOAWAY).
    draining: bool,
    /// Nothing has arrived on the connection for longer than a live path
    /// allows (see [`Heard`]).
    heard: Arc<Heard>,
    /// Samples the connection's arrivals into `heard` while this lives.
    _sampler: Option<AbortOnDropHandle<()>>,
}

/// When something last arrived on a session's connection, sampled every
/// [`HEARD_EVERY`], and how long a live path may stay quiet.
///
/// A live path delivers something at least every keep-alive interval
/// plus a round trip (on QUIC the ACK of our keep-alive PING; on the TCP
/// fallback the relay's pings and pongs), so a session quieter than
/// [`quiet_after`] is suspect: its relay's node may have died without a
/// word. Such a session is passed over like a draining one (see
/// [`pick`]) while another serves the destination: until the edge's own
/// liveness check gives the path up (3 keep-alives) its new cloud-bound
/// connections would fail. A false suspicion (a deep uplink queue) only
/// sends new connections to another replica.
struct Heard {
    /// When the sampling started.
    start: Instant,
    /// Milliseconds after `start` of the last sample that saw arrivals
    /// grow (0: at the start).
    at_ms: AtomicU64,
    /// The quiet a live path stays under.
    limit: Duration,
}

impl Heard {
    fn new(limit: Duration) -> Self {
        Heard {
            start: Instant::now(),
            at_ms: AtomicU64::new(0),
            limit,
        }
    }

    /// Whether nothing arrived for longer than the limit.
    fn quiet(&self) -> bool {
        let last = self.start + Duration::from_millis(self.at_ms.load(Relaxed));
        last.elapsed() > self.limit
    }

    /// Notes, every [`HEARD_EVERY`], whether `arrivals` (a count that
    /// grows with what arrives) grew; runs until aborted.
    async fn sample(self: Arc<Self>, arrivals: impl Fn() -> u64) {
        let mut seen = arrivals();
        let mut tick = tokio::time::interval(HEARD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = arrivals();
            if now != seen {
                seen = now;
                let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.at_ms.store(ms, Relaxed);
            }
        }
    }
}

/// How often a session's arrivals are sampled.
const HEARD_EVERY: Duration = Duration::from_secs(1);

/// The quiet beyond which a path is suspect: a keep-alive interval plus
/// two round trips, a second of margin and one sample's period.
fn quiet_after(keepalive: Duration, rtt: Duration) -> Duration {
    keepalive + rtt * 2 + Duration::from_secs(1) + HEARD_EVERY
}

impl Live {
    /// Session `session_id` on `conn` (with its `flows`), whose relay
    /// lists `tunnel` (its whole set when `complete`), says this edge
    /// serves `served`, and drains the session when `draining`; its path
    /// is sampled for quiet against `keepalive` (see [`Heard`]).
    pub(crate) fn new(
        session_id: u64,
        (conn, flows): (TunnelConn, Arc<FlowTable>),
        (tunnel, complete): (&[Cidr], bool),
        served: &[Cidr],
        (draining, keepalive): (bool, Duration),
    ) -> Self {
        // The TCP fallback has no round-trip estimate (`rtt()` is zero
        // there) and its arrivals when idle are pings and pongs that may
        // queue behind an upload: a quarter of a keep-alive stands in.
        let rtt = match conn.kind() {
            relay_transport::TransportKind::Quic => conn.rtt(),
            relay_transport::TransportKind::Tcp => keepalive / 4,
        };
        let heard = Arc::new(Heard::new(quiet_after(keepalive, rtt)));
        let sampler = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (conn, heard) = (conn.clone(), heard.clone());
            AbortOnDropHandle::new(rt.spawn(heard.sample(move || conn.arrivals())))
        });
        Live {
            session_id,
            conn,
            flows,
            tunnel: tunnel.to_vec(),
            complete,
            served: served.to_vec(),
            set: if complete {
                RouteSet::new(tunnel)
            } else {
                RouteSet::default()
            },
            draining,
            heard,
            _sampler: sampler,
        }
    }

    /// Whether this was made from exactly these (the supervisor makes a new
    /// one only when something changed, so capture wakes only then).
    pub(crate) fn is(
        &self,
        session_id: u64,
        flows: &Arc<FlowTable>,
        (tunnel, complete): (&[Cidr], bool),
        served: &[Cidr],
        draining: bool,
    ) -> bool {
        self.session_id == session_id
            && Arc::ptr_eq(&self.flows, flows)
            && self.complete == complete
            && self.tunnel == tunnel
            && self.served == served
            && self.draining == draining
    }

    /// Whether the relay's complete set has a route containing `ip`.
    fn covers(&self, ip: IpAddr) -> bool {
        self.complete && self.set.covers(ip)
    }
}

/// The edge's connected sessions, the primary first (see the module doc).
#[derive(Default)]
pub(crate) struct Sessions {
    live: Vec<Arc<Live>>,
    /// The union of the complete sets, sorted; `None` when no session's set
    /// is complete yet.
    union: Option<Vec<Cidr>>,
}

impl Sessions {
    /// The sessions `live`, the primary first.
    pub(crate) fn new(live: Vec<Arc<Live>>) -> Self {
        let union = union(
            live.iter()
                .map(|l| l.complete.then_some(l.tunnel.as_slice())),
        );
        Sessions { live, union }
    }

    /// Whether these are exactly `live`, in order.
    pub(crate) fn is(&self, live: &[Arc<Live>]) -> bool {
        self.live.len() == live.len() && self.live.iter().zip(live).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// The session for a stream or flow to `ip` (see the module doc);
    /// `None` with no session up.
    pub(crate) fn for_destination(&self, ip: IpAddr) -> Option<&Live> {
        pick(
            &self.live,
            |l| l.covers(ip),
            |l| l.draining || l.heard.quiet(),
        )
        .map(|l| &**l)
    }

    /// [`Sessions::for_destination`]'s pick for `ip`, and a spare: the
    /// best other session whose relay lists `ip` (one not draining or
    /// quiet when there is one), where a captured connection's open also
    /// goes when the picked path turns out dead before it is found quiet
    /// (see `capture::hedge`). `None` with no session up.
    pub(crate) fn for_destination_with_spare(&self, ip: IpAddr) -> Option<(&Live, Option<&Live>)> {
        let first = self.for_destination(ip)?;
        let spare = spare(
            &self.live,
            |l| std::ptr::eq(&**l, first),
            |l| l.covers(ip),
            |l| l.draining || l.heard.quiet(),
        );
        Some((first, spare.map(|l| &**l)))
    }

    /// The routes capture installs: the union of every complete set;
    /// `None` while no session's set is complete.
    pub(crate) fn tunnel_routes(&self) -> Option<&[Cidr]> {
        self.union.as_deref()
    }

    /// What the primary session's relay says this edge serves; `None`
    /// with no session up.
    pub(crate) fn served(&self) -> Option<&[Cidr]> {
        self.live.first().map(|l| l.served.as_slice())
    }

    /// Every session's connection.
    pub(crate) fn conns(&self) -> impl Iterator<Item = &TunnelConn> {
        self.live.iter().map(|l| &l.conn)
    }
}

/// The union of the complete sets (`None` stands for an incomplete one),
/// sorted; `None` when none is complete.
fn union<'a>(sets: impl Iterator<Item = Option<&'a [Cidr]>>) -> Option<Vec<Cidr>> {
    let mut all: Option<Vec<Cidr>> = None;
    for s in sets.flatten() {
        all.get_or_insert_with(Vec::new).extend_from_slice(s);
    }
    if let Some(a) = &mut all {
        a.sort_unstable();
        a.dedup();
    }
    all
}

/// The first of `live` (the primary) that `covers` and is not
/// `draining` (or quiet: see [`Heard`]), else the first that `covers`,
/// else the first.
///
/// A draining session is passed over: its relay is going (a rolling
/// update, a restart), and what is opened through it is cut when its
/// grace ends, while another replica serves the same destinations.
fn pick<T>(live: &[T], covers: impl Fn(&T) -> bool, draining: impl Fn(&T) -> bool) -> Option<&T> {
    let primary = live.first()?;
    let covering = || live.iter().filter(|l| covers(l));
    Some(
        covering()
            .find(|l| !draining(l))
            .or_else(|| covering().next())
            .unwrap_or(primary),
    )
}

/// The first of `live` other than the `picked` one that `covers` and is
/// not `draining`, else the first other one that covers; `None` when no
/// other covers (the picked one's relay alone lists the destination, or
/// none does and the picked one is the primary by default).
fn spare<T>(
    live: &[T],
    picked: impl Fn(&T) -> bool,
    covers: impl Fn(&T) -> bool,
    draining: impl Fn(&T) -> bool,
) -> Option<&T> {
    let others = || live.iter().filter(|l| !picked(l) && covers(l));
    others().find(|l| !draining(l)).or_else(|| others().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_route_set_answers_by_every_prefix_length_and_family() {
        let set = RouteSet::new(&cidrs(&[
            "10.96.0.0/12",
            "10.244.8.0/24",
            "10.244.8.0/24",
            "192.168.2.10/32",
            "fd00:8::/64",
            "0.0.0.0/0",
        ]));
        assert_eq!(set.routes.len(), 5, "duplicates go");
        for inside in [
            "10.100.3.4",
            "10.244.8.5",
            "192.168.2.10",
            "fd00:8::5",
            "8.8.8.8",
        ] {
            assert!(set.covers(ip(inside)), "{inside}");
        }
        let no_default = RouteSet::new(&cidrs(&["10.96.0.0/12", "10.244.8.0/24", "fd00:8::/64"]));
        for outside in ["10.244.9.5", "10.112.0.1", "fd00:9::5", "192.168.2.10"] {
            assert!(!no_default.covers(ip(outside)), "{outside}");
        }
        assert!(!RouteSet::default().covers(ip("10.0.0.1")));
    }

    /// The union counts only complete sets, and says nothing until one is.
    #[test]
    fn the_union_is_of_complete_sets_only() {
        let a = cidrs(&["10.244.8.0/24", "10.96.0.0/12"]);
        let b = cidrs(&["10.96.0.0/12", "10.244.9.0/24"]);
        assert_eq!(union([None, None].into_iter()), None);
        assert_eq!(
            union([Some(a.as_slice()), None].into_iter()),
            Some(cidrs(&["10.96.0.0/12", "10.244.8.0/24"]))
        );
        assert_eq!(
            union([Some(b.as_slice()), Some(a.as_slice())].into_iter()),
            Some(cidrs(&["10.96.0.0/12", "10.244.8.0/24", "10.244.9.0/24"])),
            "sorted, whichever session comes first"
        );
        assert_eq!(union([Some(&[][..])].into_iter()), Some(Vec::new()));
    }

    /// The primary when it covers the destination; else the first that
    /// does; else the primary. Draining sessions last among those that
    /// cover.
    #[test]
    fn a_destination_goes_to_the_primary_or_to_a_session_whose_relay_lists_it() {
        let sets = [
            RouteSet::new(&cidrs(&["10.96.0.0/12"])),
            RouteSet::new(&cidrs(&["10.96.0.0/12", "10.244.8.0/24"])),
            RouteSet::new(&cidrs(&["10.244.8.0/24", "10.244.9.0/24"])),
        ];
        let at = |dst: &str, draining: &[usize]| {
            pick(
                &sets,
                |s| s.covers(ip(dst)),
                |s| draining.iter().any(|d| std::ptr::eq(&sets[*d], s)),
            )
            .map(|s| sets.iter().position(|x| std::ptr::eq(x, s)).unwrap())
        };
        assert_eq!(at("10.96.0.10", &[]), Some(0));
        assert_eq!(at("10.244.8.5", &[]), Some(1));
        assert_eq!(at("10.244.9.5", &[]), Some(2));
        assert_eq!(
            at("172.16.0.1", &[]),
            Some(0),
            "nobody lists it: the primary"
        );
        // A draining session (its relay sent GOAWAY) is passed over for one
        // that covers and is not draining; it still serves what only it
        // covers, and the primary still takes what nobody lists.
        assert_eq!(at("10.96.0.10", &[0]), Some(1));
        assert_eq!(at("10.244.8.5", &[0, 1]), Some(2));
        assert_eq!(at("10.96.0.10", &[0, 1]), Some(0), "all covering drain");
        assert_eq!(at("10.244.9.5", &[2]), Some(2), "only it covers");
        assert_eq!(at("172.16.0.1", &[0]), Some(0), "nobody lists it");
        assert_eq!(pick(&[] as &[RouteSet], |_| true, |_| false), None);
    }

    #[test]
    fn a_spare_is_another_session_whose_relay_lists_the_destination() {
        let sets = [
            RouteSet::new(&cidrs(&["10.96.0.0/12"])),
            RouteSet::new(&cidrs(&["10.96.0.0/12", "10.244.8.0/24"])),
            RouteSet::new(&cidrs(&["10.96.0.0/12", "10.244.8.0/24"])),
        ];
        let at = |dst: &str, picked: usize, draining: &[usize]| {
            spare(
                &sets,
                |s| std::ptr::eq(&sets[picked], s),
                |s| s.covers(ip(dst)),
                |s| draining.iter().any(|d| std::ptr::eq(&sets[*d], s)),
            )
            .map(|s| sets.iter().position(|x| std::ptr::eq(x, s)).unwrap())
        };
        assert_eq!(at("10.96.0.10", 0, &[]), Some(1));
        assert_eq!(at("10.96.0.10", 1, &[]), Some(0), "never the picked one");
        assert_eq!(at("10.96.0.10", 0, &[1]), Some(2), "quiet ones last");
        assert_eq!(at("10.96.0.10", 0, &[1, 2]), Some(1), "all others quiet");
        assert_eq!(at("10.244.8.5", 1, &[]), Some(2));
        assert_eq!(at("10.244.8.5", 2, &[1]), Some(1));
        assert_eq!(at("172.16.0.1", 0, &[]), None, "nobody lists it");
        let one = &sets[..1];
        assert_eq!(
            spare(one, |s| std::ptr::eq(&one[0], s), |_| true, |_| false),
            None,
            "one session: no spare"
        );
    }

    /// A path is quiet once nothing has arrived for its limit (a
    /// keep-alive, two round trips and two seconds), and no longer as soon
    /// as a sample sees arrivals grow again.
    #[tokio::test(start_paused = true)]
    async fn a_session_is_quiet_after_a_keepalive_of_silence_and_heard_again_at_once() {
        let s = Duration::from_secs;
        assert_eq!(
            quiet_after(s(8), Duration::from_millis(50)),
            Duration::from_millis(10_100)
        );
        let heard = Arc::new(Heard::new(quiet_after(s(8), Duration::ZERO)));
        let arrivals = Arc::new(AtomicU64::new(0));
        let count = arrivals.clone();
        let _sampler = AbortOnDropHandle::new(tokio::spawn(
            heard.clone().sample(move || count.load(Relaxed)),
        ));
        // A live idle path: something every keep-alive plus a round trip.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(8_100)).await;
            arrivals.fetch_add(1, Relaxed);
            assert!(!heard.quiet(), "a live path");
        }
        // The path dies: quiet after the limit, not before.
        tokio::time::sleep(s(9)).await;
        assert!(!heard.quiet(), "9 s of silence");
        tokio::time::sleep(s(2)).await;
        assert!(heard.quiet(), "11 s of silence");
        // It comes back: heard at the next sample.
        arrivals.fetch_add(1, Relaxed);
        tokio::time::sleep(HEARD_EVERY).await;
        assert!(!heard.quiet(), "heard again");
    }
}
