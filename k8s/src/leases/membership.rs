//! [`ReplicaMembership`] and its loop: renewing our Lease, watching the
//! namespace's Leases, collecting stale ones. The API side of membership;
//! the pure judging lives in the parent module and the rules for when the
//! set is published in `freeze.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    let got = bounded("get lease", o.api_timeout, s.api.get_opt(&o.id)).await;
    // Stamped after the read, so a slow read does not age the renewal
    // peers judge us by (their margin is meant for clock skew).
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
    let result = match got {
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
