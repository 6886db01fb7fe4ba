//! Which of the relay's addresses to dial: its name's resolution (bounded,
//! with the addresses it had, or those a previous run saved, standing in
//! when it fails), the order an edge takes turns on the addresses in, and
//! whose turn it is.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::warn;

use super::Dialer;

impl Dialer<'_> {
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

/// The bound on resolving the relay's name when its last addresses are
/// known ([`Dialer::lookup_bound`]): a resolver that stopped answering
/// costs this much per attempt, not the resolver's own timeouts.
const LOOKUP_WITH_KNOWN: Duration = Duration::from_secs(2);

/// `lookup` (the relay name's resolution) bounded by `bound`: no answer
/// within it is an error, as a failed lookup is.
pub(super) async fn bounded<T>(
    lookup: impl std::future::Future<Output = std::io::Result<T>>,
    bound: Duration,
) -> std::io::Result<T> {
    tokio::time::timeout(bound, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the resolver within {bound:?}"),
            ))
        })
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
        let silent = std::future::pending::<std::io::Result<Vec<SocketAddr>>>();
        let e = bounded(silent, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(dialer.addresses(Err(e), false).unwrap(), vec![a]);
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
