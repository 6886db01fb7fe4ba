//! [`ReplicaMembership`] and its loop: renewing our Lease, watching the
//! namespace's Leases, collecting stale ones. The API side of membership;
//! the pure judging lives in the parent module and the rules for when the
//! set is published in `freeze.rs`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::future::{Fuse, FusedFuture};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::freeze::{caught_up, note_lag, publish, Freeze};
use super::{
    judge, micro_now, renewed, to_system, LeaseState, Member, MembershipOptions, MembershipStats,
    Shared, ADDRESS_ANNOTATION,
};
use crate::{bounded, KubeClient, KubeError};

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
            sightings: Mutex::default(),
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
    let mut api_ok = Instant::now();
    let mut freeze = Freeze::default();
    // The renew time of our Lease as the API last showed it (written by us,
    // or read when another instance holds it): the store is current once
    // it holds this or a later one.
    let mut seen: Option<SystemTime> = None;
    // Since when the store has lagged our renewals (None: it has not), and
    // whether that lag has been reported.
    let mut behind_since: Option<(Instant, bool)> = None;
    // Our Lease as our last write left it, while we hold it.
    let mut held: Option<Lease> = None;
    // The renewal and the collection run beside the watch, not in its
    // way: with slow API calls, a loop that waited for them read the watch
    // only between rounds, its store fell ever further behind our renewals
    // and the set was never published again; and every change would be
    // seen late, as if it were older than it is. Each is started by the
    // tick when the previous one is done.
    let mut renewal = std::pin::pin!(Fuse::terminated());
    let mut collection = std::pin::pin!(Fuse::terminated());
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(ev)) => {
                    note(&s, &ev);
                    match ev {
                        watcher::Event::InitDone => synced = true,
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) if synced => {}
                        _ => continue,
                    }
                    api_ok = Instant::now();
                    publish(&s, &mut freeze, api_ok, seen);
                }
                Some(Err(e)) => {
                    s.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "lease watch failed; retrying with backoff");
                }
                None => return,
            },
            _ = tick.tick(), if renewal.is_terminated() => {
                let current = synced && caught_up(&s, seen);
                note_lag(&s, current || seen.is_none(), &mut behind_since);
                // A stale store would make live Leases look expired: collect
                // only from a current one.
                if current && !freeze.frozen && collection.is_terminated() {
                    collection.set(collect(&s).fuse());
                }
                renewal.set(renew(&s, held.take()).fuse());
            }
            r = &mut renewal => {
                if r.answered {
                    api_ok = Instant::now();
                }
                seen = r.seen.or(seen);
                held = r.held;
                if synced {
                    publish(&s, &mut freeze, api_ok, seen);
                }
            }
            () = &mut collection => {}
        }
    }
}

/// Records what a watch event shows in the sightings, as seen now.
fn note(s: &Shared, ev: &watcher::Event<Lease>) {
    let gc = s.opts.gc_after;
    match ev {
        watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
            s.sightings().note(l, Instant::now(), SystemTime::now(), gc);
        }
        watcher::Event::Delete(l) => {
            if let Some(name) = l.metadata.name.as_deref() {
                s.sightings().forget(name);
            }
        }
        watcher::Event::InitDone => {
            let names: HashSet<String> = s
                .store
                .state()
                .iter()
                .filter_map(|l| l.metadata.name.clone())
                .collect();
            s.sightings().retain(|n| names.contains(n));
        }
        watcher::Event::Init => {}
    }
}

/// What one renewal round learnt.
struct Renewal {
    /// The API answered (even with a conflict).
    answered: bool,
    /// The renew time of our Lease as the API now has it (ours if we wrote
    /// it, another instance's if it holds our id), when known.
    seen: Option<SystemTime>,
    /// Our Lease as we last wrote it, while we hold it: the next round
    /// renews it without reading it first.
    held: Option<Lease>,
}

/// Our Lease renewed from `old` (its spec, if any) at `now`, with our
/// address.
fn ours(s: &Shared, mut lease: Lease, now: SystemTime) -> Lease {
    let o = &s.opts;
    let old = lease.spec.take();
    let mine = old.as_ref().and_then(|x| x.holder_identity.as_deref()) == Some(s.holder.as_str());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(s.holder.clone()),
        lease_duration_seconds: Some(i32::try_from(o.lease_duration.as_secs()).unwrap_or(15)),
        renew_time: Some(micro_now(now)),
        acquire_time: match &old {
            Some(x) if mine => x.acquire_time.clone(),
            _ => Some(micro_now(now)),
        },
        lease_transitions: match &old {
            Some(x) if !mine => Some(x.lease_transitions.unwrap_or(0) + 1),
            Some(x) => x.lease_transitions,
            None => Some(0),
        },
        ..LeaseSpec::default()
    });
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ADDRESS_ANNOTATION.to_string(), o.address.clone());
    lease
}

/// Writes `lease` as ours, renewed now: an update carrying its
/// resourceVersion (a writer in between makes it a 409), or a create when
/// it has none. Returns the Lease as written and the renew time stamped.
async fn write(s: &Shared, lease: Lease) -> Result<(Lease, SystemTime), KubeError> {
    let o = &s.opts;
    // Stamped as the write goes out, so a slow read before it does not
    // age the renewal.
    let now = SystemTime::now();
    let lease = ours(s, lease, now);
    let pp = PostParams::default();
    let written = if lease.metadata.resource_version.is_some() {
        let put = s.api.replace(&o.id, &pp, &lease);
        bounded("update lease", o.api_timeout, put).await?
    } else {
        bounded("create lease", o.api_timeout, s.api.create(&pp, &lease)).await?
    };
    s.sightings()
        .note(&written, Instant::now(), SystemTime::now(), o.gc_after);
    s.stats.renewals.fetch_add(1, Ordering::Relaxed);
    Ok((written, to_system(&micro_now(now))))
}

/// Creates or renews our Lease. While we hold it (`held`), one update
/// carrying the resourceVersion of our last write; only when that is
/// refused (409: someone else wrote it; 404: it was deleted) or when we do
/// not hold it yet, a read first, to create it, take it over or find it
/// held by another instance.
async fn renew(s: &Shared, held: Option<Lease>) -> Renewal {
    let o = &s.opts;
    if let Some(lease) = held {
        match write(s, lease.clone()).await {
            Ok((lease, t)) => {
                return Renewal {
                    answered: true,
                    seen: Some(t),
                    held: Some(lease),
                };
            }
            Err(KubeError::Api {
                status: Some(409), ..
            }) => conflicted(s, "reading it again"),
            Err(KubeError::Api {
                status: Some(404), ..
            }) => {
                tracing::info!("our lease was deleted; creating it again");
            }
            Err(e) => {
                s.stats.renew_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "renewing the replica lease failed");
                // The write may not have happened: the resourceVersion
                // we hold may still be the current one.
                return Renewal {
                    answered: false,
                    seen: None,
                    held: Some(lease),
                };
            }
        }
    }
    let got = bounded("get lease", o.api_timeout, s.api.get_opt(&o.id)).await;
    let mut seen = None;
    let result = match got {
        Err(e) => Err(e),
        Ok(None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(o.id.clone()),
                    namespace: Some(o.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: None,
            };
            write(s, lease).await
        }
        Ok(Some(lease)) => {
            seen = renewed(&lease);
            let holder = lease
                .spec
                .as_ref()
                .and_then(|x| x.holder_identity.clone())
                .unwrap_or_default();
            let live = {
                let now = Instant::now();
                let mut sightings = s.sightings();
                sightings.note(&lease, now, SystemTime::now(), o.gc_after);
                judge(&lease, &sightings, now, o.skew_margin, o.gc_after)
                    .is_some_and(|(_, st)| st == LeaseState::Live)
            };
            if holder != s.holder && !holder.is_empty() && live {
                s.stats.id_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    id = %o.id, %holder, ours = %s.holder,
                    "another instance holds this replica id's Lease: two replicas are configured \
                     with one id; not taking it over until it stops being renewed"
                );
                return Renewal {
                    answered: true,
                    seen,
                    held: None,
                };
            }
            // The resourceVersion read goes back with the update.
            write(s, lease).await
        }
    };
    match result {
        Ok((lease, t)) => Renewal {
            answered: true,
            seen: Some(t),
            held: Some(lease),
        },
        Err(KubeError::Api {
            status: Some(409), ..
        }) => {
            conflicted(s, "renewing next round");
            Renewal {
                answered: true,
                seen,
                held: None,
            }
        }
        Err(e) => {
            s.stats.renew_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "renewing the replica lease failed");
            Renewal {
                answered: false,
                seen,
                held: None,
            }
        }
    }
}

/// Counts and logs a 409 on writing our Lease, wherever the write came
/// from: the resourceVersion it carried is no longer current, so someone
/// wrote the Lease since we last wrote or read it (an instance holding our
/// id, a hand edit, or a write of ours whose answer was lost). Only at
/// debug, as it is routine and settled by reading the Lease again; another
/// live instance holding it is what that read reports, at error. `then`
/// says what the round does next.
fn conflicted(s: &Shared, then: &str) {
    s.stats.rv_conflicts.fetch_add(1, Ordering::Relaxed);
    tracing::debug!("our lease changed under us (409); {then}");
}

/// Deletes Leases expired for longer than `gc_after` (never our own).
async fn collect(s: &Shared) {
    let o = &s.opts;
    let stale: Vec<(Member, Arc<Lease>)> = {
        let now = Instant::now();
        let sightings = s.sightings();
        s.store
            .state()
            .into_iter()
            .filter_map(
                |l| match judge(&l, &sightings, now, o.skew_margin, o.gc_after) {
                    Some((m, LeaseState::Collectable)) if m.id != o.id => Some((m, l)),
                    _ => None,
                },
            )
            .collect()
    };
    for (m, lease) in stale {
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
