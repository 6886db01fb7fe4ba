//! Relay replica membership from `coordination.k8s.io/v1` Leases.
//!
//! Each replica holds one Lease named by its replica id, in one namespace,
//! with the address edges should dial it at in the
//! [`ADDRESS_ANNOTATION`] annotation (a Lease has no address field). It
//! renews the Lease every `renew_every`; every replica watches the
//! namespace's Leases and counts as live those renewed within
//! `leaseDurationSeconds` plus a margin for clock skew (the renew time is
//! written by the holder's clock and judged by ours). Leases expired for
//! longer than `gc_after` are deleted by whichever replica sees them
//! first, with the resourceVersion as a precondition, so a Lease renewed
//! meanwhile is never deleted.
//!
//! The holder identity is the replica id plus a random instance suffix:
//! a second process started with the same id finds the Lease held by
//! another instance, refuses to take it over until it has expired (plus the
//! margin), and says so ([`MembershipStats::id_conflicts`]).
//!
//! The set is judged from the watch's store, which can lag the API: after
//! an outage the watch's TCP connection may sit in retransmission backoff
//! for seconds while new requests (our renewals) already succeed, and its
//! backlog then arrives in order. Judging a lagging store by the clock
//! would drop replicas whose renewals are merely not delivered yet, so the
//! set is only published once the store has caught up with our own latest
//! renewal (the watch delivers in commit order: everything committed before
//! it is in the store too).
//!
//! When the API cannot be reached the Leases in hand stop being renewed,
//! so judging them by the clock would empty the set on every replica at
//! once and leave edges with nothing to follow. Instead, once our own
//! renewal has failed for longer than a lease duration, the last published
//! set is kept (frozen) until the API answers again, a lease duration has
//! passed in which every live replica renewed, and the store has caught up
//! (`Freeze`).
//!
//! [`judge`] and [`live_members`] are pure (they take `now`), so expiry,
//! skew and collection are unit-tested without a clock.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::Api;
use tokio::sync::watch;

mod freeze;
mod membership;
#[cfg(test)]
mod tests;
pub use membership::ReplicaMembership;

/// The annotation holding the address edges dial a replica at (`host:port`).
pub const ADDRESS_ANNOTATION: &str = "edge-relay.io/dial-address";

/// How membership runs.
#[derive(Clone, Debug)]
pub struct MembershipOptions {
    /// Namespace of the Leases (the relay's own).
    pub namespace: String,
    /// This replica's id: the Lease's name.
    pub id: String,
    /// Where edges dial this replica (`host:port`).
    pub address: String,
    /// `leaseDurationSeconds` written on our Lease.
    pub lease_duration: Duration,
    /// How often we renew (well under `lease_duration`).
    pub renew_every: Duration,
    /// Allowance for clock differences between replicas when judging
    /// expiry.
    pub skew_margin: Duration,
    /// A Lease expired for this long is deleted.
    pub gc_after: Duration,
    /// Bound on every API call.
    pub api_timeout: Duration,
    /// `timeoutSeconds` of each watch request.
    pub watch_timeout_secs: u32,
}

impl MembershipOptions {
    /// Options with the defaults: 15 s leases renewed every 5 s, 5 s skew
    /// margin, collection after 10 minutes, 10 s API bound.
    pub fn new(namespace: &str, id: &str, address: &str) -> Self {
        MembershipOptions {
            namespace: namespace.into(),
            id: id.into(),
            address: address.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            skew_margin: Duration::from_secs(5),
            gc_after: Duration::from_secs(600),
            api_timeout: Duration::from_secs(10),
            watch_timeout_secs: 60,
        }
    }
}

/// A live replica.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// Replica id (the Lease's name).
    pub id: String,
    /// Where edges dial it.
    pub address: String,
}

/// What a Lease says about its replica at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed within its duration plus the skew margin.
    Live,
    /// Expired, but not for long enough to be collected.
    Expired,
    /// Expired for longer than `gc_after` (or never renewed): delete it.
    Collectable,
}

fn to_system(t: &MicroTime) -> SystemTime {
    let (s, n) = (t.0.as_second(), t.0.subsec_nanosecond());
    let base = match u64::try_from(s) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    base + Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

fn micro_now(now: SystemTime) -> MicroTime {
    let d = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    // Leases carry microseconds.
    let nanos = i32::try_from(d.subsec_micros() * 1000).unwrap_or(0);
    MicroTime(Timestamp::new(secs, nanos).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The renew time a Lease carries.
fn renewed(lease: &Lease) -> Option<SystemTime> {
    lease
        .spec
        .as_ref()
        .and_then(|x| x.renew_time.as_ref())
        .map(to_system)
}

/// Judges one Lease at `now`: `None` if it is not a replica Lease (no
/// [`ADDRESS_ANNOTATION`], e.g. another component's Lease in the namespace).
pub fn judge(
    lease: &Lease,
    now: SystemTime,
    skew_margin: Duration,
    gc_after: Duration,
) -> Option<(Member, LeaseState)> {
    let address = lease
        .metadata
        .annotations
        .as_ref()?
        .get(ADDRESS_ANNOTATION)?
        .clone();
    let id = lease.metadata.name.clone()?;
    let member = Member { id, address };
    let spec = lease.spec.as_ref();
    let Some(renewed) = renewed(lease) else {
        return Some((member, LeaseState::Collectable));
    };
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|d| u64::try_from(d).ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    let expires = renewed + duration;
    let state = if now < expires + skew_margin {
        LeaseState::Live
    } else if now < expires + gc_after.max(skew_margin) {
        LeaseState::Expired
    } else {
        LeaseState::Collectable
    };
    Some((member, state))
}

/// The live replicas among `leases` at `now`, sorted by id.
pub fn live_members(leases: &[Arc<Lease>], now: SystemTime, skew_margin: Duration) -> Vec<Member> {
    let mut out: Vec<Member> = leases
        .iter()
        .filter_map(|l| judge(l, now, skew_margin, skew_margin))
        .filter(|(_, s)| *s == LeaseState::Live)
        .map(|(m, _)| m)
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.id == b.id);
    out
}

/// Counters of the membership loop.
#[derive(Debug, Default)]
pub struct MembershipStats {
    /// Successful renewals (and the first create) of our Lease.
    pub renewals: AtomicU64,
    /// Renewals that failed (API error or timeout).
    pub renew_errors: AtomicU64,
    /// Updates refused with 409 because another writer changed the Lease
    /// first (retried at the next round).
    pub rv_conflicts: AtomicU64,
    /// Rounds in which our id was held by another live instance (two
    /// replicas configured with one id).
    pub id_conflicts: AtomicU64,
    /// Stale Leases deleted.
    pub collected: AtomicU64,
    /// Watch errors (each followed by a backoff and a retry).
    pub watch_errors: AtomicU64,
    /// Renewal rounds at which the watch had not yet delivered the
    /// previous round's renewal (the set was kept meanwhile).
    pub store_behind: AtomicU64,
}

struct Shared {
    opts: MembershipOptions,
    api: Api<Lease>,
    holder: String,
    store: Store<Lease>,
    members: watch::Sender<Vec<Member>>,
    stats: Arc<MembershipStats>,
}
