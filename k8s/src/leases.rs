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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{bounded, KubeClient, KubeError};

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
            watch_timeout_secs: 290,
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

/// This replica's Lease and everyone's, kept current. Dropping it stops
/// renewing (the Lease then expires); [`ReplicaMembership::release`]
/// deletes it at once.
pub struct ReplicaMembership {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ReplicaMembership {
    /// Starts renewing our Lease and watching the namespace's Leases.
    /// Needs `get`, `create`, `update`, `delete`, `list` and `watch` on
    /// `leases.coordination.k8s.io` in the namespace. Must be called within
    /// a Tokio runtime.
    pub fn spawn(client: &KubeClient, opts: MembershipOptions) -> ReplicaMembership {
        let api: Api<Lease> = Api::namespaced(client.0.clone(), &opts.namespace);
        let (store, writer) = reflector::store();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let holder = format!("{}_{:08x}", opts.id, nanos ^ std::process::id());
        let shared = Arc::new(Shared {
            holder,
            store,
            members: watch::channel(Vec::new()).0,
            stats: Arc::default(),
            api: api.clone(),
            opts,
        });
        let config = watcher::Config::default().timeout(shared.opts.watch_timeout_secs);
        let stream = watcher(api, config)
            .modify(|l: &mut Lease| l.metadata.managed_fields = None)
            .default_backoff()
            .reflect(writer);
        let task = tokio::spawn(run(shared.clone(), stream));
        ReplicaMembership { shared, task }
    }

    /// The live replicas now (ours included once our Lease is written).
    pub fn members(&self) -> Vec<Member> {
        self.shared.members.borrow().clone()
    }

    /// A receiver that sees every change of the member set.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.shared.members.subscribe()
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<MembershipStats> {
        &self.shared.stats
    }

    /// Our holder identity (`<id>_<instance>`).
    pub fn holder(&self) -> &str {
        &self.shared.holder
    }

    /// Stops renewing and deletes our Lease if we still hold it (on a
    /// graceful shutdown: edges drop this replica at once instead of after
    /// the lease expires). Bounded by the API timeout.
    pub async fn release(self) -> Result<(), KubeError> {
        self.task.abort();
        let s = &self.shared;
        let t = s.opts.api_timeout;
        let Some(lease) = bounded("get lease", t, s.api.get_opt(&s.opts.id)).await? else {
            return Ok(());
        };
        if lease
            .spec
            .as_ref()
            .and_then(|x| x.holder_identity.as_deref())
            != Some(&s.holder)
        {
            return Ok(());
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        bounded("delete lease", t, s.api.delete(&s.opts.id, &dp)).await?;
        Ok(())
    }
}

impl Drop for ReplicaMembership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run<S>(s: Arc<Shared>, stream: S)
where
    S: futures::Stream<Item = Result<watcher::Event<Lease>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut tick = tokio::time::interval(s.opts.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = false;
    // Last time the API answered us (renewal or watch); a frozen set is
    // kept while this is older than a lease duration.
    let mut api_ok = tokio::time::Instant::now();
    let mut freeze = Freeze::default();
    // The renew time of our Lease as the API last showed it (written by us,
    // or read when another instance holds it): the store is current once
    // it holds this or a later one.
    let mut seen: Option<SystemTime> = None;
    // Since when the store has lagged our renewals (None: it has not), and
    // whether that lag has been reported.
    let mut behind_since: Option<(tokio::time::Instant, bool)> = None;
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => {
                    synced = true;
                    api_ok = tokio::time::Instant::now();
                    publish(&s, &mut freeze, api_ok, seen);
                }
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) if synced => {
                    api_ok = tokio::time::Instant::now();
                    publish(&s, &mut freeze, api_ok, seen);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    s.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "lease watch failed; retrying with backoff");
                }
                None => return,
            },
            _ = tick.tick() => {
                let current = synced && caught_up(&s, seen);
                note_lag(&s, current || seen.is_none(), &mut behind_since);
                // A stale store would make live Leases look expired: collect
                // only from a current one (and before this round's renewal,
                // which the store cannot hold yet).
                if current && !freeze.frozen {
                    collect(&s).await;
                }
                let r = renew(&s).await;
                if r.answered {
                    api_ok = tokio::time::Instant::now();
                }
                seen = r.seen.or(seen);
                if synced {
                    publish(&s, &mut freeze, api_ok, seen);
                }
            }
        }
    }
}

/// Keeping the last set through an API outage, and after it.
///
/// While the API is unreachable nobody's renewals reach us, so once ours
/// have failed for longer than a lease duration the set is frozen. When
/// the API answers again the Leases in our store are still the ones from
/// before the outage (renewed long ago by their holders' clocks): judging
/// them at once would drop every replica, ourselves included, until the
/// watch delivers the fresh renewals. So the set thaws only once a whole
/// lease duration has passed since the API came back, in which every live
/// replica has renewed (at least three times: `renew_every` ≤ a third of
/// it), *and* the store has caught up with our own latest renewal, so
/// those renewals are in it too; a replica that has not renewed by then is
/// really gone and is dropped.
#[derive(Debug, Default)]
struct Freeze {
    /// The set is frozen.
    frozen: bool,
    /// While frozen: when the API first answered again.
    back: Option<tokio::time::Instant>,
}

impl Freeze {
    /// Whether the live set may be published now, given the last time the
    /// API answered us and whether the store has caught up with our latest
    /// renewal.
    fn thawed(
        &mut self,
        now: tokio::time::Instant,
        api_ok: tokio::time::Instant,
        lease: Duration,
        caught_up: bool,
    ) -> bool {
        if now.saturating_duration_since(api_ok) > lease {
            *self = Freeze {
                frozen: true,
                back: None,
            };
            return false;
        }
        if !self.frozen {
            return caught_up;
        }
        let back = *self.back.get_or_insert(api_ok);
        if caught_up && now.saturating_duration_since(back) >= lease {
            *self = Freeze::default();
            return true;
        }
        false
    }
}

/// The renew time a Lease carries.
fn renewed(lease: &Lease) -> Option<SystemTime> {
    lease
        .spec
        .as_ref()
        .and_then(|x| x.renew_time.as_ref())
        .map(to_system)
}

/// Whether the store holds our Lease as the API last showed it (`seen`) or
/// later.
fn caught_up(s: &Shared, seen: Option<SystemTime>) -> bool {
    let Some(seen) = seen else {
        return false;
    };
    s.store
        .state()
        .iter()
        .find(|l| l.metadata.name.as_deref() == Some(s.opts.id.as_str()))
        .and_then(|l| renewed(l))
        .is_some_and(|t| t >= seen)
}

/// Counts and reports a store lagging our renewals (`current` false) at a
/// renewal round: once per lag longer than a lease duration, and when it
/// ends.
fn note_lag(s: &Shared, current: bool, since: &mut Option<(tokio::time::Instant, bool)>) {
    let lease = s.opts.lease_duration;
    if current {
        if let Some((t, true)) = since.take() {
            tracing::info!(
                lagged = ?t.elapsed(),
                "the lease watch caught up with our renewals; replica set current again"
            );
        }
        return;
    }
    s.stats.store_behind.fetch_add(1, Ordering::Relaxed);
    let (t, warned) = since.get_or_insert_with(|| (tokio::time::Instant::now(), false));
    // Reported once per lag, at the first round past a lease duration.
    if !*warned && t.elapsed() > lease {
        *warned = true;
        tracing::warn!(
            lag = ?t.elapsed(),
            "the lease watch has not delivered our renewals for longer than a lease: \
             keeping the last replica set until it catches up"
        );
    }
}

/// Publishes the live set, unless the store lags our renewals or the set is
/// frozen (see [`Freeze`]).
fn publish(
    s: &Shared,
    freeze: &mut Freeze,
    api_ok: tokio::time::Instant,
    seen: Option<SystemTime>,
) {
    let current = caught_up(s, seen);
    if !freeze.thawed(
        tokio::time::Instant::now(),
        api_ok,
        s.opts.lease_duration,
        current,
    ) {
        tracing::debug!(
            current,
            "store behind our renewals, or API unreachable (or just back) for longer than a lease: \
             keeping the last replica set"
        );
        return;
    }
    let live = live_members(&s.store.state(), SystemTime::now(), s.opts.skew_margin);
    s.members.send_if_modified(|m| {
        if *m == live {
            return false;
        }
        tracing::info!(replicas = ?live, "replica set changed");
        *m = live;
        true
    });
}

/// What one renewal round learnt.
struct Renewal {
    /// The API answered (even with a conflict).
    answered: bool,
    /// The renew time of our Lease as the API now has it (ours if we wrote
    /// it, another instance's if it holds our id), when known.
    seen: Option<SystemTime>,
}

/// Creates or renews our Lease.
async fn renew(s: &Shared) -> Renewal {
    let o = &s.opts;
    let now = SystemTime::now();
    let spec = |old: Option<&LeaseSpec>| {
        let ours = old.and_then(|x| x.holder_identity.as_deref()) == Some(s.holder.as_str());
        LeaseSpec {
            holder_identity: Some(s.holder.clone()),
            lease_duration_seconds: Some(i32::try_from(o.lease_duration.as_secs()).unwrap_or(15)),
            renew_time: Some(micro_now(now)),
            acquire_time: match old {
                Some(x) if ours => x.acquire_time.clone(),
                _ => Some(micro_now(now)),
            },
            lease_transitions: match old {
                Some(x) if !ours => Some(x.lease_transitions.unwrap_or(0) + 1),
                Some(x) => x.lease_transitions,
                None => Some(0),
            },
            ..LeaseSpec::default()
        }
    };
    let annotate = |meta: &mut ObjectMeta| {
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(ADDRESS_ANNOTATION.to_string(), o.address.clone());
    };
    let written = to_system(&micro_now(now));
    let mut seen = None;
    let result = match bounded("get lease", o.api_timeout, s.api.get_opt(&o.id)).await {
        Err(e) => Err(e),
        Ok(None) => {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(o.id.clone()),
                    namespace: Some(o.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(None)),
            };
            annotate(&mut lease.metadata);
            bounded(
                "create lease",
                o.api_timeout,
                s.api.create(&PostParams::default(), &lease),
            )
            .await
            .map(|_| seen = Some(written))
        }
        Ok(Some(mut lease)) => {
            seen = renewed(&lease);
            let holder = lease
                .spec
                .as_ref()
                .and_then(|x| x.holder_identity.clone())
                .unwrap_or_default();
            let live = judge(&lease, now, o.skew_margin, o.gc_after)
                .is_some_and(|(_, st)| st == LeaseState::Live);
            if holder != s.holder && !holder.is_empty() && live {
                s.stats.id_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    id = %o.id, %holder, ours = %s.holder,
                    "another instance holds this replica id's Lease: two replicas are configured \
                     with one id; not taking it over until it expires"
                );
                return Renewal {
                    answered: true,
                    seen,
                };
            }
            lease.spec = Some(spec(lease.spec.as_ref()));
            annotate(&mut lease.metadata);
            // The resourceVersion read above goes back with the update:
            // a writer in between makes it a 409, retried next round.
            bounded(
                "update lease",
                o.api_timeout,
                s.api.replace(&o.id, &PostParams::default(), &lease),
            )
            .await
            .map(|_| seen = Some(written))
        }
    };
    let answered = match result {
        Ok(()) => {
            s.stats.renewals.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(KubeError::Api {
            status: Some(409), ..
        }) => {
            s.stats.rv_conflicts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("lease changed under us (409); renewing next round");
            true
        }
        Err(e) => {
            s.stats.renew_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "renewing the replica lease failed");
            false
        }
    };
    Renewal { answered, seen }
}

/// Deletes Leases expired for longer than `gc_after` (never our own).
async fn collect(s: &Shared) {
    let o = &s.opts;
    let now = SystemTime::now();
    for lease in s.store.state() {
        let Some((m, LeaseState::Collectable)) = judge(&lease, now, o.skew_margin, o.gc_after)
        else {
            continue;
        };
        if m.id == o.id {
            continue;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match bounded("delete lease", o.api_timeout, s.api.delete(&m.id, &dp)).await {
            Ok(_) => {
                s.stats.collected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(replica = %m.id, address = %m.address, "deleted a stale replica lease");
            }
            // Renewed or deleted by someone else meanwhile: nothing to do.
            Err(KubeError::Api {
                status: Some(404 | 409),
                ..
            }) => {}
            Err(e) => tracing::warn!(replica = %m.id, error = %e, "deleting a stale lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, renewed: Option<SystemTime>, secs: i32, addr: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: addr.map(|a| [(ADDRESS_ANNOTATION.to_string(), a.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(format!("{name}_1")),
                lease_duration_seconds: Some(secs),
                renew_time: renewed.map(micro_now),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn expiry_is_judged_with_the_skew_margin_and_collection_after_gc_after() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let l = lease("r1", Some(t0), 15, Some("10.0.0.1:8443"));
        let (margin, gc) = (Duration::from_secs(5), Duration::from_secs(60));
        let at = |s: u64| {
            judge(&l, t0 + Duration::from_secs(s), margin, gc)
                .unwrap()
                .1
        };
        assert_eq!(at(0), LeaseState::Live);
        // Past its duration, but within the margin a fast clock could explain.
        assert_eq!(at(19), LeaseState::Live);
        assert_eq!(at(20), LeaseState::Expired);
        assert_eq!(at(74), LeaseState::Expired);
        assert_eq!(at(75), LeaseState::Collectable);
        // A renew time in our future (the holder's clock runs ahead) is live.
        assert_eq!(
            judge(&l, t0 - Duration::from_secs(30), margin, gc)
                .unwrap()
                .1,
            LeaseState::Live
        );
        // Never renewed: nothing to judge by, collect it.
        let never = lease("r2", None, 15, Some("x:1"));
        assert_eq!(
            judge(&never, t0, margin, gc).unwrap().1,
            LeaseState::Collectable
        );
        // Not a replica Lease: ignored entirely.
        assert!(judge(&lease("kube-scheduler", Some(t0), 15, None), t0, margin, gc).is_none());
    }

    #[test]
    fn the_set_stays_frozen_after_an_outage_until_the_watch_is_current() {
        let t0 = tokio::time::Instant::now();
        let lease = Duration::from_secs(15);
        let s = |x: u64| t0 + Duration::from_secs(x);
        let mut f = Freeze::default();
        // The API answered 10 s ago and the store holds our renewal: fine.
        assert!(f.thawed(s(10), s(0), lease, true));
        // The store lags our renewal: kept, but nothing is frozen.
        assert!(!f.thawed(s(11), s(10), lease, false));
        assert!(!f.frozen);
        // 16 s without an answer: frozen.
        assert!(!f.thawed(s(16), s(0), lease, true));
        assert!(!f.thawed(s(40), s(0), lease, true));
        // Our renewal succeeds at 41: still frozen for a lease duration,
        // whatever the store holds (the others have not renewed yet).
        assert!(!f.thawed(s(41), s(41), lease, true));
        assert!(!f.thawed(s(50), s(50), lease, true));
        // A lease duration later, the watch still delivering its backlog
        // (our latest renewal not in the store): still frozen.
        assert!(!f.thawed(s(56), s(56), lease, false));
        assert!(!f.thawed(s(60), s(60), lease, false));
        // Caught up: thaws.
        assert!(f.thawed(s(61), s(60), lease, true));
        assert!(!f.frozen);
        assert!(f.thawed(s(62), s(60), lease, true));
        // Another outage, the watch current early: still a lease duration.
        assert!(!f.thawed(s(80), s(62), lease, true));
        assert!(!f.thawed(s(81), s(81), lease, true));
        assert!(!f.thawed(s(90), s(90), lease, true));
        assert!(f.thawed(s(96), s(96), lease, true));
    }

    #[test]
    fn live_members_are_sorted_and_exclude_expired_and_foreign_leases() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let leases: Vec<Arc<Lease>> = vec![
            Arc::new(lease("r2", Some(t0), 15, Some("b:1"))),
            Arc::new(lease(
                "r1",
                Some(t0 - Duration::from_secs(10)),
                15,
                Some("a:1"),
            )),
            Arc::new(lease(
                "r3",
                Some(t0 - Duration::from_secs(100)),
                15,
                Some("c:1"),
            )),
            Arc::new(lease("other", Some(t0), 15, None)),
        ];
        let m = live_members(&leases, t0, Duration::from_secs(5));
        let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2"]);
        assert_eq!(m[0].address, "a:1");
    }
}
