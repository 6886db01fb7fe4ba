//! Which of the relay's addresses to dial: its name's resolution (bounded,
//! with the addresses it had, or those a previous run saved, standing in
//! when it fails; a lookup cut short goes on in the background and its
//! answer serves the next attempt), the order an edge takes turns on the
//! addresses in, and whose turn it is.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::Dialer;

impl Dialer<'_> {
    /// What the relay's name resolves to, waited for up to
    /// [`Dialer::lookup_bound`]; a lookup still running then goes on in
    /// the background (see [`Lookups`]).
    pub(super) async fn look_up(&self) -> io::Result<Vec<SocketAddr>> {
        let name = self.cfg.relay.clone();
        self.look_up_with(&RELAY_LOOKUPS, move || async move {
            tokio::net::lookup_host(name).await.map(|a| a.collect())
        })
        .await
    }

    /// [`Dialer::look_up`] with the lookups and the resolver given (the
    /// tests' slow resolvers).
    pub(super) async fn look_up_with<F, Fut>(
        &self,
        lookups: &Lookups,
        lookup: F,
    ) -> io::Result<Vec<SocketAddr>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        lookups
            .resolve(&self.cfg.relay, self.lookup_bound(), lookup)
            .await
    }

    /// How long the relay's name may take to resolve: [`LOOKUP_WITH_KNOWN`]
    /// when it resolved before in this run (its last addresses stand in),
    /// else the handshake timeout. The system resolver alone may take
    /// 5 s × 2 tries per name server before it fails.
    pub(super) fn lookup_bound(&self) -> Duration {
        let known = self.stats.relay_addrs_known.lock();
        let known = known.unwrap_or_else(|e| e.into_inner());
        match known.contains_key(&self.cfg.relay) {
            true => LOOKUP_WITH_KNOWN,
            false => self.cfg.handshake_timeout,
        }
    }

    /// The relay's addresses to dial: what its name resolves to now (kept),
    /// else, unless a proxy resolves it (`proxied`), what it resolved to
    /// last.
    pub(super) fn addresses(
        &self,
        looked_up: std::io::Result<Vec<SocketAddr>>,
        proxied: bool,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let relay = &self.cfg.relay;
        let mut known = self
            .stats
            .relay_addrs_known
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match looked_up {
            Ok(addrs) if !addrs.is_empty() => {
                let sorted = |v: &[SocketAddr]| {
                    let mut v = v.to_vec();
                    v.sort_unstable();
                    v
                };
                // Round-robin DNS reorders the same set: saved only when the
                // set changes (the file lives on an SD card on many boards).
                let changed = known.get(relay).map(|k| sorted(k)) != Some(sorted(&addrs));
                known.insert(relay.clone(), addrs.clone());
                if changed {
                    // Names this run has not resolved keep what was saved.
                    let loaded = self
                        .stats
                        .relay_addrs_loaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let mut names: std::collections::BTreeMap<String, Vec<SocketAddr>> =
                        loaded.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    names.extend(known.iter().map(|(k, v)| (k.clone(), sorted(v))));
                    let table = crate::relay_addrs::SavedRelayAddrs { names };
                    self.stats
                        .relay_addrs_saved
                        .send_replace(Some(std::sync::Arc::new(table)));
                }
                Ok(addrs)
            }
            Ok(_) => Ok(Vec::new()),
            Err(e) if proxied => Err(e),
            Err(e) => match known.get(relay) {
                Some(last) => {
                    warn!(%relay, error = %e, addrs = ?last, "relay name not resolved; dialling the addresses it had");
                    Ok(last.clone())
                }
                None => {
                    let loaded = self
                        .stats
                        .relay_addrs_loaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    match loaded.get(relay) {
                        Some(saved) => {
                            warn!(%relay, error = %e, addrs = ?saved, "relay name not resolved; dialling the addresses saved by the previous run (relay_addrs_file)");
                            Ok(saved.clone())
                        }
                        None => Err(e),
                    }
                }
            },
        }
    }

    /// Whose turn it is among the relay name's addresses (see
    /// [`EdgeStats::relay_addr_turns`]).
    pub(super) fn turn(&self) -> u64 {
        let turns = self.stats.relay_addr_turns.lock();
        let turns = turns.unwrap_or_else(|e| e.into_inner());
        turns.get(&self.cfg.relay).copied().unwrap_or(0)
    }

    /// Moves the relay name's turn on from `from`, unless another attempt
    /// did already (a renewal's beside the session's loop): concurrent
    /// attempts that found the same address silent advance once. Says
    /// whether this call moved it.
    pub(super) fn advance(&self, from: u64) -> bool {
        let mut turns = self
            .stats
            .relay_addr_turns
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let turn = turns.entry(self.cfg.relay.clone()).or_insert(0);
        if *turn != from {
            return false;
        }
        *turn = from.wrapping_add(1);
        true
    }
}

/// The bound on an attempt's wait for the relay's name when its last
/// addresses are known ([`Dialer::lookup_bound`]): a resolver that stopped
/// answering costs this much per attempt, not the resolver's own timeouts.
/// The lookup itself is not cut there (see [`Lookups`]): a slow resolver
/// that works (a dead first name server costs glibc 5 s a try) still
/// updates the addresses, one attempt later.
const LOOKUP_WITH_KNOWN: Duration = Duration::from_secs(2);

/// How long a lookup may run in all, in the background after its attempt
/// stopped waiting: past glibc's 5 s × 2 tries on a dead first name server
/// and a second server's answer, yet a resolver that never answers frees
/// the name for a fresh lookup every half minute.
const LOOKUP_GIVE_UP: Duration = Duration::from_secs(30);

/// How old a background lookup's answer may be and still serve an attempt
/// without a lookup of its own: about one reconnect backoff's cap and an
/// attempt. An older one (the session it would have served stayed up)
/// still stands in for a fresh lookup that fails or is slow: it is newer
/// than the addresses known.
const ANSWER_FRESH: Duration = Duration::from_secs(30);

/// How a lookup ended: when, and the addresses or the error (its kind and
/// text: an [`io::Error`] cannot be shared between attempts).
#[derive(Clone, Debug)]
struct Answer {
    at: Instant,
    result: Result<Vec<SocketAddr>, (io::ErrorKind, String)>,
}

impl Answer {
    fn into_result(self) -> io::Result<Vec<SocketAddr>> {
        self.result
            .map_err(|(kind, text)| io::Error::new(kind, text))
    }
}

/// The relay names' lookups that are running, or ended with nobody
/// waiting: at most one per name. An attempt waits for its name's lookup
/// up to its bound; one still running then goes on (up to
/// [`LOOKUP_GIVE_UP`]) and the next attempt joins it instead of starting
/// another, or takes its answer once it came. Cutting the lookup at the
/// bound instead froze the name's addresses for good behind a resolver
/// slower than the bound: no lookup ever finished, and a relay that moved
/// was dialled at its old address until the edge restarted.
///
/// Kept per process, by name, where the addresses known are per
/// [`EdgeStats`](crate::client::EdgeStats): an edge process has one,
/// and an answer taken by another edge in the same process (the lab's)
/// only costs this one a lookup of its own.
pub(super) struct Lookups(Mutex<BTreeMap<String, watch::Receiver<Option<Answer>>>>);

/// The process's relay name lookups.
static RELAY_LOOKUPS: Lookups = Lookups::new();

impl Lookups {
    /// No lookups yet (a `const fn`: the process's are a `static`).
    pub(super) const fn new() -> Self {
        Lookups(Mutex::new(BTreeMap::new()))
    }

    /// `name`'s addresses: a fresh answer a background lookup left, else
    /// the answer of the lookup running for it (`lookup` started when none
    /// is), waited for up to `bound`. No answer within it is an error, as
    /// a failed lookup is, unless an older background answer stands in.
    async fn resolve<F, Fut>(
        &self,
        name: &str,
        bound: Duration,
        lookup: F,
    ) -> io::Result<Vec<SocketAddr>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        let (mut rx, earlier) = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let ended = map.get(name).map(|rx| rx.borrow().clone());
            let mut earlier = None;
            let running = match ended {
                Some(None) => map.get(name).cloned(),
                Some(Some(answer)) => {
                    map.remove(name);
                    if answer.result.is_ok() && answer.at.elapsed() < ANSWER_FRESH {
                        debug!(%name, age = ?answer.at.elapsed(), "relay name's addresses from a lookup that ended in the background");
                        return answer.into_result();
                    }
                    earlier = answer.result.ok();
                    None
                }
                None => None,
            };
            let rx = running.unwrap_or_else(|| {
                // Only names that keep failing to answer in time are left
                // (a replica's that went away): drop those long ended.
                map.retain(|_, rx| {
                    rx.borrow()
                        .as_ref()
                        .is_none_or(|a| a.at.elapsed() < LOOKUP_GIVE_UP * 10)
                });
                let rx = spawn_lookup(lookup());
                map.insert(name.to_owned(), rx.clone());
                rx
            });
            (rx, earlier)
        };
        let answer = match tokio::time::timeout(bound, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone(),
            // The task is gone without an answer (the runtime shutting
            // down): nothing to wait for.
            Ok(Err(_)) => None,
            Err(_) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from the resolver within {bound:?} (still asking)"),
                );
                return earlier.ok_or(e);
            }
        };
        // Taken: the next attempt looks the name up afresh.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|r| r.same_channel(&rx)) {
            map.remove(name);
        }
        drop(map);
        let result = match answer {
            Some(answer) => answer.into_result(),
            None => Err(io::Error::other("the lookup ended without an answer")),
        };
        result.or_else(|e| earlier.ok_or(e))
    }
}

/// Runs `lookup` to its end (at most [`LOOKUP_GIVE_UP`]) whoever waits,
/// and says how it ended.
fn spawn_lookup(
    lookup: impl Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
) -> watch::Receiver<Option<Answer>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let result = match tokio::time::timeout(LOOKUP_GIVE_UP, lookup).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => Err((e.kind(), e.to_string())),
            Err(_) => Err((
                io::ErrorKind::TimedOut,
                format!("no answer from the resolver within {LOOKUP_GIVE_UP:?}"),
            )),
        };
        tx.send_replace(Some(Answer {
            at: Instant::now(),
            result,
        }));
    });
    rx
}

/// The relay's addresses in the order an edge takes turns on them: those
/// this host has a route to (`routed`; all of them unrouted gives none),
/// each once, ordered by a hash of `node` and the address. The resolver's
/// order is no order to keep a turn in: round-robin DNS rotates it on
/// every answer, and glibc sorts IPv6 first whether or not IPv6 works past
/// the site's router, so an index into it named a different address on
/// each attempt and a dead address came round again however often it was
/// passed. A hash keeps each edge's order the same across answers, and
/// spreads a fleet's first choices over the addresses as round-robin DNS
/// would (an address leaving the answer moves the edges whose first
/// choice it was, and shifts the turns of those past their first). An
/// address with no route (IPv6 on a site without it) would fail at once
/// and cost an attempt.
pub(super) fn dial_order(
    addrs: &[SocketAddr],
    node: &str,
    routed: impl Fn(&SocketAddr) -> bool,
) -> Vec<SocketAddr> {
    // FNV-1a: the same order in every run and every build.
    let key = |a: &SocketAddr| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes().chain([0]).chain(a.to_string().into_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    let mut out: Vec<SocketAddr> = addrs.iter().copied().filter(|a| routed(a)).collect();
    out.sort_unstable();
    out.dedup();
    out.sort_by_cached_key(|a| (key(a), *a));
    out
}

/// The address of `addrs` for attempt `turn` (they take turns), `None` when
/// the name resolved to nothing.
pub(super) fn pick(addrs: &[SocketAddr], turn: u64) -> Option<SocketAddr> {
    let n = u64::try_from(addrs.len()).ok().filter(|&n| n > 0)?;
    addrs.get(usize::try_from(turn % n).ok()?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::EdgeStats;
    use crate::config::{EdgeConfig, TransportMode};
    use crate::dial::test_support::{dialer_for, test_cfg};
    use crate::test_resolver::SlowResolver;

    /// A name that stops resolving is dialled at the addresses it had,
    /// unless a proxy resolves it; one never resolved fails as before.
    #[test]
    fn a_name_that_stops_resolving_keeps_its_last_addresses() {
        relay_transport::tls::install_default_provider();
        let pki =
            relay_transport::devcerts::DevPki::generate(&["relay.test"], &["edge-a"]).unwrap();
        let cfg = EdgeConfig::new(
            "edge-a",
            "relay.test:8443",
            "relay.test",
            pki.node_material("edge-a").unwrap(),
        );
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let down = || {
            Err(std::io::Error::other(
                "temporary failure in name resolution",
            ))
        };
        assert!(dialer.addresses(down(), false).is_err());
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        assert_eq!(dialer.addresses(Ok(vec![a]), false).unwrap(), vec![a]);
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![a]);
        assert!(dialer.addresses(down(), true).is_err());
        let b: SocketAddr = "192.0.2.2:8443".parse().unwrap();
        assert_eq!(dialer.addresses(Ok(vec![b]), false).unwrap(), vec![b]);
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![b]);
    }

    /// Addresses saved by a previous run stand in for a failed lookup, but
    /// do not shorten the lookup's bound (they may be stale, and a slow
    /// resolver that works must get its time); a set reordered by
    /// round-robin DNS is not saved again.
    #[tokio::test]
    async fn saved_addresses_stand_in_without_shortening_the_lookup() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:8443".parse().unwrap();
        stats
            .relay_addrs_loaded
            .lock()
            .unwrap()
            .insert("relay.test:8443".into(), vec![a]);
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        assert_eq!(dialer.lookup_bound(), cfg.handshake_timeout);
        let down = || Err(std::io::Error::other("no answer"));
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![a]);
        let mut saved = stats.relay_addrs_saved.subscribe();
        assert_eq!(dialer.addresses(Ok(vec![a, b]), false).unwrap(), vec![a, b]);
        assert!(saved.has_changed().unwrap(), "a new set is saved");
        saved.borrow_and_update();
        assert_eq!(dialer.lookup_bound(), LOOKUP_WITH_KNOWN);
        dialer.addresses(Ok(vec![b, a]), false).unwrap();
        assert!(!saved.has_changed().unwrap(), "reordered: not saved again");
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![b, a]);
    }

    /// A resolver that never answers costs the short bound once the name
    /// resolved before (its last addresses stand in), the handshake
    /// timeout before that; its silence is an error like a failure.
    #[tokio::test]
    async fn a_silent_resolver_is_bounded() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        assert_eq!(dialer.lookup_bound(), cfg.handshake_timeout);
        let a: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        dialer.addresses(Ok(vec![a]), false).unwrap();
        assert_eq!(dialer.lookup_bound(), LOOKUP_WITH_KNOWN);
        let lookups = Lookups::new();
        let silent = || std::future::pending::<io::Result<Vec<SocketAddr>>>();
        let e = lookups
            .resolve(&cfg.relay, Duration::from_millis(20), silent)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(dialer.addresses(Err(e), false).unwrap(), vec![a]);
    }

    /// A resolver slower than the bound (a dead first name server costs
    /// glibc 5 s) that answers a new address: the attempt it held up
    /// dials the address known, and the one after the lookup ended dials
    /// the new one, taken from the background lookup without asking
    /// again; the address known is the new one from then on.
    #[tokio::test]
    async fn a_slow_answer_serves_the_next_attempt() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let old: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        let new: SocketAddr = "192.0.2.9:8443".parse().unwrap();
        dialer.addresses(Ok(vec![old]), false).unwrap();
        let lookups = Lookups::new();
        let resolver = SlowResolver::default();
        let slow = || resolver.answer(Duration::from_secs(3), vec![new]);

        let t0 = Instant::now();
        let first = dialer.look_up_with(&lookups, slow()).await;
        assert!(
            t0.elapsed() < Duration::from_millis(2500),
            "{:?}",
            t0.elapsed()
        );
        let first = dialer.addresses(first, false).unwrap();
        assert_eq!(
            first,
            vec![old],
            "the first attempt dials the address known"
        );

        // The lookup ends in the background, 3 s after it began.
        tokio::time::sleep(Duration::from_millis(3300).saturating_sub(t0.elapsed())).await;
        let t1 = Instant::now();
        let second = dialer.look_up_with(&lookups, slow()).await;
        assert!(
            t1.elapsed() < Duration::from_millis(200),
            "waited {:?}",
            t1.elapsed()
        );
        assert_eq!(dialer.addresses(second, false).unwrap(), vec![new]);
        assert_eq!(
            resolver.started(),
            1,
            "the answer was taken, not asked for again"
        );
        let down = || Err(io::Error::other("no answer"));
        assert_eq!(dialer.addresses(down(), false).unwrap(), vec![new]);

        // Taken once: the next attempt asks afresh (the fast path).
        let quick = resolver.answer(Duration::ZERO, vec![old]);
        assert_eq!(
            dialer.look_up_with(&lookups, quick).await.unwrap(),
            vec![old]
        );
        assert_eq!(resolver.started(), 2);
    }

    /// However many attempts come while a slow lookup runs, concurrent
    /// or one after another, it is the only one for its name: they join
    /// it, and one that waits long enough gets its answer.
    #[tokio::test]
    async fn one_lookup_per_name_is_in_flight() {
        let (cfg, _) = test_cfg("relay.test:8443");
        let stats = EdgeStats::default();
        let dialer = dialer_for(&cfg, &stats, TransportMode::Auto, false, false);
        let old: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        let new: SocketAddr = "192.0.2.9:8443".parse().unwrap();
        dialer.addresses(Ok(vec![old]), false).unwrap();
        let lookups = Lookups::new();
        let resolver = SlowResolver::default();
        let slow = || resolver.answer(Duration::from_secs(3), vec![new]);
        let t0 = Instant::now();
        let concurrent =
            futures::future::join_all((0..16).map(|_| dialer.look_up_with(&lookups, slow()))).await;
        for r in concurrent {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        }
        assert_eq!(resolver.started(), 1);
        // 2 s in: a short wait joins the lookup and times out...
        for _ in 0..8 {
            let r = lookups
                .resolve(&cfg.relay, Duration::from_millis(10), slow())
                .await;
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        }
        // ...one of the attempt's bound gets the answer when it comes.
        let r = dialer.look_up_with(&lookups, slow()).await.unwrap();
        assert_eq!(r, vec![new]);
        let took = t0.elapsed();
        assert!(
            took < Duration::from_millis(3500),
            "answered after {took:?}"
        );
        assert_eq!(resolver.started(), 1);
        assert!(lookups.0.lock().unwrap().is_empty(), "taken, not kept");
    }

    /// A background answer older than [`ANSWER_FRESH`] does not spare a
    /// lookup, but stands in when the lookup is slow: it is newer than
    /// the addresses known.
    #[tokio::test]
    async fn an_old_background_answer_stands_in_for_a_slow_lookup() {
        let lookups = Lookups::new();
        let new: SocketAddr = "192.0.2.9:8443".parse().unwrap();
        let (_tx, rx) = watch::channel(Some(Answer {
            at: Instant::now().checked_sub(ANSWER_FRESH * 2).unwrap(),
            result: Ok(vec![new]),
        }));
        lookups
            .0
            .lock()
            .unwrap()
            .insert("relay.test:8443".into(), rx);
        let resolver = SlowResolver::default();
        let silent = resolver.answer(Duration::from_secs(3600), vec![]);
        let r = lookups
            .resolve("relay.test:8443", Duration::from_millis(20), silent)
            .await;
        assert_eq!(r.unwrap(), vec![new]);
        assert_eq!(resolver.started(), 1, "asked afresh");
    }

    #[test]
    fn addresses_take_turns() {
        let a: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:8443".parse().unwrap();
        assert_eq!(pick(&[], 0), None);
        assert_eq!(pick(&[a], 7), Some(a));
        assert_eq!(pick(&[a, b], 0), Some(a));
        assert_eq!(pick(&[a, b], 1), Some(b));
        assert_eq!(pick(&[a, b], 2), Some(a));
    }

    /// The order turns are taken in is the same however the resolver
    /// orders the answer, differs between edges, skips addresses without
    /// a route and lists each address once; with no route at all, none.
    #[test]
    fn the_dial_order_holds_across_answers_and_spreads_edges() {
        let addrs: Vec<SocketAddr> = ["192.0.2.1:8443", "192.0.2.2:8443", "192.0.2.3:8443"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let all = |_: &SocketAddr| true;
        let order = dial_order(&addrs, "edge-a", all);
        assert_eq!(order.len(), 3);
        let mut rotated = addrs.clone();
        for _ in 0..3 {
            rotated.rotate_left(1);
            assert_eq!(dial_order(&rotated, "edge-a", all), order);
        }
        let twice: Vec<SocketAddr> = addrs.iter().chain(&addrs).copied().collect();
        assert_eq!(dial_order(&twice, "edge-a", all), order);
        // A fleet's first choices cover every address.
        let firsts: std::collections::BTreeSet<SocketAddr> = (0..60)
            .map(|i| dial_order(&addrs, &format!("edge-{i}"), all)[0])
            .collect();
        assert_eq!(firsts.len(), 3, "first choices {firsts:?}");
        // An IPv6 address without a route is not dialled; nothing routed,
        // nothing to dial.
        let v6: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        let with_v6: Vec<SocketAddr> = addrs.iter().copied().chain([v6]).collect();
        assert_eq!(
            dial_order(&with_v6, "edge-a", |a: &SocketAddr| a.is_ipv4()),
            order
        );
        assert!(dial_order(&addrs, "edge-a", |_: &SocketAddr| false).is_empty());
    }
}
