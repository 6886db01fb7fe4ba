//! The Lease membership's counters, reachable from `/metrics`.
//!
//! The membership is held by the running relay, apart from the shared
//! state `/metrics` renders from; it is registered here when it starts,
//! under the relay's `relay_id` and `advertise` address (distinct even for
//! two relays configured with one id, the case
//! `relay_replica_id_conflicts_total` counts), and looked up by them.
//! Entries are weak: a released membership's counters go with it.

#[cfg(feature = "kubernetes")]
use std::sync::atomic::Ordering::Relaxed;
#[cfg(feature = "kubernetes")]
use std::sync::{Arc, Mutex, Weak};

/// A snapshot of the Lease membership's counters
/// (`relay_kube::MembershipStats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseCounters {
    /// Renewals (and the first create) of this replica's Lease.
    pub renewals: u64,
    /// Renewals that failed (API error or timeout).
    pub renew_errors: u64,
    /// Updates refused with 409 (another writer changed the Lease first).
    pub rv_conflicts: u64,
    /// Rounds in which this replica's id was held by another live instance.
    pub id_conflicts: u64,
    /// Stale Leases deleted.
    pub collected: u64,
    /// Failed list or watch requests on the Leases.
    pub watch_errors: u64,
    /// Rounds at which the watch had not yet delivered the previous renewal.
    pub store_behind: u64,
}

#[cfg(feature = "kubernetes")]
impl From<&relay_kube::MembershipStats> for LeaseCounters {
    fn from(s: &relay_kube::MembershipStats) -> Self {
        LeaseCounters {
            renewals: s.renewals.load(Relaxed),
            renew_errors: s.renew_errors.load(Relaxed),
            rv_conflicts: s.rv_conflicts.load(Relaxed),
            id_conflicts: s.id_conflicts.load(Relaxed),
            collected: s.collected.load(Relaxed),
            watch_errors: s.watch_errors.load(Relaxed),
            store_behind: s.store_behind.load(Relaxed),
        }
    }
}

/// (relay id, advertise address) → its membership's counters.
#[cfg(feature = "kubernetes")]
type Entry = ((String, String), Weak<relay_kube::MembershipStats>);

#[cfg(feature = "kubernetes")]
static RUNNING: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Registers the counters of the membership relay `id` advertising
/// `advertise` runs.
#[cfg(feature = "kubernetes")]
pub(crate) fn register(id: &str, advertise: &str, stats: &Arc<relay_kube::MembershipStats>) {
    let mut all = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(k, w)| w.strong_count() > 0 && (k.0 != id || k.1 != advertise));
    all.push(((id.into(), advertise.into()), Arc::downgrade(stats)));
}

/// The Lease membership's counters of the relay configured by `cfg`;
/// `None` without Lease-based `[replicas]` (or once it is released).
pub fn lease_counters(cfg: &crate::config::RelayConfig) -> Option<LeaseCounters> {
    #[cfg(feature = "kubernetes")]
    {
        lookup(&cfg.relay_id, &cfg.replicas.as_ref()?.advertise)
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = cfg;
        None
    }
}

#[cfg(feature = "kubernetes")]
fn lookup(id: &str, advertise: &str) -> Option<LeaseCounters> {
    let all = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    all.iter()
        .find(|(k, _)| k.0 == id && k.1 == advertise)
        .and_then(|(_, w)| w.upgrade())
        .map(|s| LeaseCounters::from(&*s))
}

#[cfg(all(test, feature = "kubernetes"))]
mod tests {
    use super::*;

    /// A running membership's counters reach `/metrics` (docs/bad-input.md
    /// row 71: an id conflict is counted, and now shown), per relay, and
    /// go once the membership is gone.
    #[test]
    fn membership_counters_are_rendered_while_it_runs() {
        let a = Arc::new(relay_kube::MembershipStats::default());
        let b = Arc::new(relay_kube::MembershipStats::default());
        a.id_conflicts.fetch_add(3, Relaxed);
        a.renew_errors.fetch_add(2, Relaxed);
        b.watch_errors.fetch_add(1, Relaxed);
        // Two instances configured with one id, told apart by address.
        register("relay-t1", "10.0.0.1:8443", &a);
        register("relay-t1", "10.0.0.2:8443", &b);
        let text = crate::metrics::render_replicas(lookup("relay-t1", "10.0.0.1:8443"));
        for row in [
            "relay_replica_id_conflicts_total 3\n",
            "relay_replica_lease_renew_errors_total 2\n",
            "relay_replica_watch_errors_total 0\n",
            "# TYPE relay_replica_id_conflicts_total counter\n",
        ] {
            assert!(text.contains(row), "{row}: {text}");
        }
        let text = crate::metrics::render_replicas(lookup("relay-t1", "10.0.0.2:8443"));
        assert!(
            text.contains("relay_replica_watch_errors_total 1\n"),
            "{text}"
        );
        drop(a);
        assert_eq!(lookup("relay-t1", "10.0.0.1:8443"), None);
        assert_eq!(crate::metrics::render_replicas(None), "");
    }
}
