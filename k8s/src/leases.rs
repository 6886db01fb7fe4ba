//! Relay replica membership from `coordination.k8s.io/v1` Leases.
//!
//! Each replica holds one Lease named by its replica id, in one namespace,
//! with the address edges should dial it at in the
//! [`ADDRESS_ANNOTATION`] annotation (a Lease has no address field). It
//! renews the Lease every `renew_every`; every replica watches the
//! namespace's Leases. Leases expired for longer than `gc_after` are
//! deleted by whichever replica sees them first, with the resourceVersion
//! as a precondition, so a Lease renewed meanwhile is never deleted.
//!
//! A Lease is judged by when *this* process saw it change ([`Sightings`]),
//! on its own monotonic clock: live while its holder's last change was
//! seen less than `leaseDurationSeconds` plus `skew_margin` ago. The
//! renewTime a holder writes (by its own clock, kept for `kubectl`) is
//! never compared with ours for a Lease we have seen change: with clocks
//! that differ, or with renewals that reach the API seconds after they
//! were stamped (a queueing apiserver), comparing the two dropped live
//! replicas, and a replica whose clock ran ahead dropped all its peers.
//! This is how client-go's leader election judges a lease (it records
//! when it observed the record change).
//!
//! A Lease seen for the first time (at start, or a replica joining) is
//! taken as renewed at that moment, as client-go does: its holder may be
//! alive and its renewTime says nothing reliable about that. So a replica
//! that died shortly before we started counts as live for up to a lease
//! duration plus the margin after we first see its Lease, exactly as long
//! as it would for a replica that had been watching it die; the opposite
//! error, dropping a live peer at start because of a clock or a slow
//! write, would hand its nodes to the others and churn every edge's set.
//! One exception: a Lease whose own renewTime, by our wall clock, says it
//! would be due for collection (expired for longer than `gc_after`, 10
//! minutes by default) is not counted until it changes; only a clock off by
//! more than that could make a live replica's Lease look so old, and even
//! then it counts again at its next renewal. Collection itself goes by what
//! we saw only, never by the written time, so no clock can make us delete a
//! live replica's Lease.
//!
//! The holder identity is the replica id plus a random instance suffix:
//! a second process started with the same id finds the Lease held by
//! another instance, refuses to take it over until it has stopped
//! changing for a lease duration (plus the margin), and says so
//! ([`MembershipStats::id_conflicts`]).
//!
//! The set is judged from the watch's store, which can lag the API: after
//! an outage the watch's TCP connection may sit in retransmission backoff
//! for seconds while new requests (our renewals) already succeed, and its
//! backlog then arrives in order. Judging a lagging store would drop
//! replicas whose renewals are merely not delivered yet, so the set is
//! only published once the store has caught up with our own latest
//! renewal (the watch delivers in commit order: everything committed before
//! it is in the store too).
//!
//! When the API cannot be reached the Leases in hand stop changing, so
//! judging them would empty the set on every replica at once and leave
//! edges with nothing to follow. Instead, once our own renewal has failed
//! for longer than a lease duration, the last published set is kept
//! (frozen) until the API answers again, a lease duration has passed in
//! which every live replica renewed, and the store has caught up
//! (`Freeze`).
//!
//! [`judge`] and [`live_members`] are pure (they take `now` and the
//! [`Sightings`]), so expiry, skew and collection are unit-tested without
//! a clock.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// Allowance on top of a Lease's duration before it counts as expired:
    /// a Lease is live while it was last seen to change less than
    /// `leaseDurationSeconds` plus this ago (by our own clock, so clock
    /// differences between replicas do not enter: the allowance is for
    /// renewals delayed by a slow API or watch).
    pub skew_margin: Duration,
    /// A Lease seen unchanged for its duration plus this long is deleted;
    /// one whose renew time already says so when first seen is not counted
    /// until it changes.
    pub gc_after: Duration,
    /// Bound on every API call (a renewal is one write while we hold our
    /// Lease; a read and a write to recover it).
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
    /// Seen to change within its duration plus the skew margin.
    Live,
    /// Expired, but not for long enough to be collected.
    Expired,
    /// Unchanged for its duration plus `gc_after` (or never renewed):
    /// delete it.
    Collectable,
}

/// The part of a Lease whose change shows its holder alive: who holds it,
/// the renew time it wrote, and which object it is (a Lease deleted and
/// created again is a new one). Not the resourceVersion: anyone's write
/// moves that (an annotation edit with `kubectl`), which says nothing of
/// the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    uid: Option<String>,
    holder: Option<String>,
    renewed: Option<SystemTime>,
}

impl Version {
    fn of(lease: &Lease) -> Version {
        Version {
            uid: lease.metadata.uid.clone(),
            holder: lease.spec.as_ref().and_then(|s| s.holder_identity.clone()),
            renewed: renewed(lease),
        }
    }
}

/// When this process saw one Lease's current version first.
#[derive(Clone, Debug)]
struct Sighting {
    version: Version,
    /// By our monotonic clock.
    at: Instant,
    /// First seen with a renew time that said it was long dead (see
    /// [`Sightings::note`]): not live until it changes.
    stale: bool,
}

/// What this process has seen of the replica Leases: for each, the version
/// it holds and when that version was first seen, by this process's
/// monotonic clock. [`judge`] goes by these, not by the renew times the
/// holders wrote.
#[derive(Clone, Debug, Default)]
pub struct Sightings {
    by_name: HashMap<String, Sighting>,
}

impl Sightings {
    /// Records `lease` as seen at `now` (our monotonic clock; `wall` is
    /// our wall clock at the same moment). A version already recorded
    /// keeps the time it was first seen; a changed one is seen now. A Lease
    /// not seen before also counts as seen now (renewed, for all we know),
    /// unless its own renew time says it expired more than `gc_after` ago
    /// by `wall`: then it is not live until it changes. Leases without the
    /// [`ADDRESS_ANNOTATION`] are not replicas' and are not recorded.
    pub fn note(&mut self, lease: &Lease, now: Instant, wall: SystemTime, gc_after: Duration) {
        if !is_replica(lease) {
            return;
        }
        let Some(name) = lease.metadata.name.as_deref() else {
            return;
        };
        let version = Version::of(lease);
        let stale = match self.by_name.get(name) {
            Some(s) if s.version == version => return,
            // Its holder (or a new holder) wrote it: alive.
            Some(_) => false,
            None => version
                .renewed
                .and_then(|r| r.checked_add(duration(lease) + gc_after))
                .is_some_and(|due| due <= wall),
        };
        self.by_name.insert(
            name.to_string(),
            Sighting {
                version,
                at: now,
                stale,
            },
        );
    }

    /// Forgets the Lease named `name` (deleted).
    pub fn forget(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// Forgets every Lease whose name `keep` refuses (after a relist: the
    /// ones no longer there).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_name.retain(|n, _| keep(n));
    }

    /// When the version `lease` carries was first seen, and whether it
    /// was stale then; `None` if it was not (yet) recorded.
    fn of(&self, lease: &Lease) -> Option<&Sighting> {
        let s = self.by_name.get(lease.metadata.name.as_deref()?)?;
        (s.version == Version::of(lease)).then_some(s)
    }
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

/// `leaseDurationSeconds` of a Lease (zero if unset).
fn duration(lease: &Lease) -> Duration {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|d| u64::try_from(d).ok())
        .map(Duration::from_secs)
        .unwrap_or_default()
}

fn is_replica(lease: &Lease) -> bool {
    lease
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ADDRESS_ANNOTATION))
}

/// Judges one Lease at `now` (our monotonic clock) by when `seen` says its
/// current version was first seen: live while that was less than its
/// duration plus `skew_margin` ago, collectable once it was its duration
/// plus `gc_after` ago (never from the renew time it carries). A version
/// not recorded in `seen` counts as seen at `now`. `None` if it is not a
/// replica Lease (no [`ADDRESS_ANNOTATION`], e.g. another component's
/// Lease in the namespace).
pub fn judge(
    lease: &Lease,
    seen: &Sightings,
    now: Instant,
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
    if renewed(lease).is_none() {
        return Some((member, LeaseState::Collectable));
    }
    let (at, stale) = seen.of(lease).map_or((now, false), |s| (s.at, s.stale));
    let quiet = now.saturating_duration_since(at);
    let duration = duration(lease);
    let state = if !stale && quiet < duration + skew_margin {
        LeaseState::Live
    } else if quiet < duration + gc_after.max(skew_margin) {
        LeaseState::Expired
    } else {
        LeaseState::Collectable
    };
    Some((member, state))
}

/// The live replicas among `leases` at `now` (see [`judge`]), sorted by
/// id.
pub fn live_members(
    leases: &[Arc<Lease>],
    seen: &Sightings,
    now: Instant,
    skew_margin: Duration,
) -> Vec<Member> {
    let mut out: Vec<Member> = leases
        .iter()
        .filter_map(|l| judge(l, seen, now, skew_margin, skew_margin))
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
    /// first (our Lease is then read again and, if still ours to hold,
    /// renewed at once).
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
    /// Fed by the watch and by our own reads and writes of our Lease.
    sightings: Mutex<Sightings>,
}

impl Shared {
    fn sightings(&self) -> MutexGuard<'_, Sightings> {
        self.sightings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
