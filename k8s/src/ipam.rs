//! [`IpamDirectory`]: the pod prefixes a CNI's own IPAM gives each node
//! where it does not use the Node's `spec.podCIDRs`.
//!
//! - Calico's IPAM ignores `podCIDR` and hands each node blocks (/26 by
//!   default) of its IP pools, each recorded as a cluster-scoped
//!   `BlockAffinity` (`crd.projectcalico.org/v1`, `blockaffinities`):
//!   `spec.node`, `spec.cidr`, `spec.state` (`confirmed` once the node may
//!   use it; `pending` and `pendingDeletion` otherwise) and `spec.deleted`
//!   (a string, `"true"` while the affinity is being released).
//! - Cilium's default IPAM (cluster-pool) has its operator write each
//!   node's ranges into the node's `CiliumNode` (`cilium.io/v2`,
//!   `ciliumnodes`, named as the Node): `spec.ipam.podCIDRs`.
//!
//! Either resource exists only where that CNI is installed. Each is probed
//! with a LIST at start: `404` means "not installed" (logged once, looked
//! for again after [`IpamOptions::retry`], the wait doubling with each
//! `404` in a row up to [`IpamOptions::rediscover`]), `403` means the relay
//! may not read it (logged once, looked for again every `rediscover`);
//! once a LIST succeeds a kube-runtime watcher follows the resource as the
//! Node reflector follows Nodes (LIST, WATCH, relist after `410 Gone` or a
//! broken stream, default backoff), and the last complete state is kept
//! while the API is unreachable (a relist replaces a source's objects only
//! once it completes). A `404` from the watch ends it but keeps that
//! source's prefixes: kube-apiserver answers a stray `404` for a custom
//! resource whose CRD exists (after an etcd restart, while its CRD
//! informer resyncs: kubernetes/kubernetes#71218, #115241), and dropping
//! them would cut every edge whose pod ranges they are. The next probe,
//! after `retry`, decides: served, and the watch resumes (its relist
//! replaces the objects); `404` again, and the CRD is taken as removed and
//! the prefixes are dropped.
//!
//! What this module hands out is the CNI's word, written by its agents on
//! the nodes themselves: the relay vets it before any prefix becomes a
//! route (relay-server's `k8s/ipam_prefixes.rs`).
//!
//! A Calico block is its node's whole only while Calico's IPAM never gives
//! another node an address in it, which takes `strictAffinity: true`;
//! where Calico's blocks are in use the directory also reads that setting
//! and reports it ([`IpamDirectory::calico_strict_affinity`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use relay_protocol::Cidr;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{KubeClient, KubeError};

mod objects;
mod strict;

pub use objects::{block_affinity, cilium_node, IpamEntry, IpamIssue};
pub use strict::{ipam_config, StrictAffinity, IPAM_CONFIG_GVK, IPAM_CONFIG_NAME};

/// A CNI's IPAM resource the relay reads node prefixes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum IpamKind {
    /// Calico's `blockaffinities.crd.projectcalico.org` (v1).
    CalicoBlockAffinity,
    /// Cilium's `ciliumnodes.cilium.io` (v2).
    CiliumNode,
}

impl IpamKind {
    /// Every kind, in the order they are probed.
    pub const ALL: [IpamKind; 2] = [IpamKind::CalicoBlockAffinity, IpamKind::CiliumNode];

    /// `(group, version, kind, plural)`.
    pub const fn gvk(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            IpamKind::CalicoBlockAffinity => (
                "crd.projectcalico.org",
                "v1",
                "BlockAffinity",
                "blockaffinities",
            ),
            IpamKind::CiliumNode => ("cilium.io", "v2", "CiliumNode", "ciliumnodes"),
        }
    }

    /// `plural.group`, as RBAC and `kubectl` name it.
    pub fn resource_name(self) -> String {
        let (group, _, _, plural) = self.gvk();
        format!("{plural}.{group}")
    }

    fn api_resource(self) -> ApiResource {
        let (group, version, kind, plural) = self.gvk();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    fn parse(self, obj: &DynamicObject) -> (Option<IpamEntry>, Vec<IpamIssue>) {
        match self {
            IpamKind::CalicoBlockAffinity => block_affinity(obj),
            IpamKind::CiliumNode => cilium_node(obj),
        }
    }
}

impl std::fmt::Display for IpamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.resource_name())
    }
}

/// Options for the IPAM watches.
#[derive(Clone, Debug)]
pub struct IpamOptions {
    /// `timeoutSeconds` of each watch request (as
    /// [`crate::DirectoryOptions::watch_timeout_secs`]).
    pub watch_timeout_secs: u32,
    /// How long after a `403` (not allowed) a resource is probed again,
    /// and the longest wait after a `404` (not installed).
    pub rediscover: Duration,
    /// How long after a probe that got no answer (API down), or a watch
    /// answered `404`, it is probed again; also the first wait after a
    /// probe answered `404`, doubling with each one in a row (at most
    /// [`IpamOptions::rediscover`] in every case).
    pub retry: Duration,
    /// Bound of each probe.
    pub probe_timeout: Duration,
}

impl Default for IpamOptions {
    fn default() -> Self {
        IpamOptions {
            watch_timeout_secs: 60,
            rediscover: Duration::from_secs(300),
            retry: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// Where one resource stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IpamState {
    /// Not answered yet (first probe under way, or it got no answer).
    Unknown,
    /// `404`: the CRD is not installed.
    Absent,
    /// `403`: the relay may not read it (RBAC).
    Forbidden,
    /// Served; the watch is running, waiting for its first list.
    Watching,
    /// Served and listed at least once.
    Listed,
}

impl IpamState {
    /// Every state, for metrics that list each.
    pub const ALL: [IpamState; 5] = [
        IpamState::Unknown,
        IpamState::Absent,
        IpamState::Forbidden,
        IpamState::Watching,
        IpamState::Listed,
    ];

    /// Its name in metrics labels and `/readyz`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IpamState::Unknown => "unknown",
            IpamState::Absent => "absent",
            IpamState::Forbidden => "forbidden",
            IpamState::Watching => "watching",
            IpamState::Listed => "listed",
        }
    }
}

#[derive(Default)]
struct SourceView {
    state: Option<IpamState>,
    /// Object name → what it gives.
    objects: BTreeMap<String, IpamEntry>,
    /// Object name → its issues last logged.
    issues: BTreeMap<String, Vec<IpamIssue>>,
}

struct Inner {
    sources: Mutex<BTreeMap<IpamKind, SourceView>>,
    changes: watch::Sender<u64>,
    skipped: AtomicU64,
    errors: AtomicU64,
    probes: AtomicU64,
    last_error: crate::client::LastError,
    /// Calico's `strictAffinity`, as last read.
    strict: Mutex<StrictAffinity>,
}

impl Inner {
    fn with<R>(&self, kind: IpamKind, f: impl FnOnce(&mut SourceView) -> R) -> R {
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(kind).or_default())
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Whether a confirmed Calico block is known: its addresses are taken
    /// as its node's, so Calico's `strictAffinity` matters.
    fn calico_in_use(&self) -> bool {
        self.with(IpamKind::CalicoBlockAffinity, |s| !s.objects.is_empty())
    }

    fn strict(&self) -> StrictAffinity {
        *self.strict.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_strict(&self, now: StrictAffinity) {
        *self.strict.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }

    fn set_state(&self, kind: IpamKind, state: IpamState, clear: bool) {
        let changed = self.with(kind, |s| {
            let had = !s.objects.is_empty();
            if clear {
                s.objects.clear();
                s.issues.clear();
            }
            let moved = s.state != Some(state);
            s.state = Some(state);
            moved || (clear && had)
        });
        if changed {
            self.changed();
        }
    }

    /// Parses `obj` into `s`; logs and counts its issues when they differ
    /// from the last time.
    fn put(&self, kind: IpamKind, s: &mut SourceView, obj: &DynamicObject) {
        let Some(name) = obj.metadata.name.clone() else {
            return;
        };
        let (entry, issues) = kind.parse(obj);
        if s.issues.get(&name).unwrap_or(&Vec::new()) != &issues {
            for i in &issues {
                tracing::warn!("{i}");
            }
            self.skipped
                .fetch_add(issues.len() as u64, Ordering::Relaxed);
        }
        if issues.is_empty() {
            s.issues.remove(&name);
        } else {
            s.issues.insert(name.clone(), issues);
        }
        match entry {
            Some(e) => s.objects.insert(name, e),
            None => s.objects.remove(&name),
        };
    }

    fn apply(&self, kind: IpamKind, obj: &DynamicObject) {
        self.with(kind, |s| self.put(kind, s, obj));
        self.changed();
    }

    fn delete(&self, kind: IpamKind, obj: &DynamicObject) {
        if let Some(name) = &obj.metadata.name {
            self.with(kind, |s| {
                s.objects.remove(name);
                s.issues.remove(name);
            });
            self.changed();
        }
    }

    /// A (re)list completed: `objects` are all there is.
    fn replace(&self, kind: IpamKind, objects: &[DynamicObject]) {
        self.with(kind, |s| {
            let names: std::collections::BTreeSet<&str> = objects
                .iter()
                .filter_map(|o| o.metadata.name.as_deref())
                .collect();
            s.objects.retain(|n, _| names.contains(n.as_str()));
            s.issues.retain(|n, _| names.contains(n.as_str()));
            for o in objects {
                self.put(kind, s, o);
            }
            s.state = Some(IpamState::Listed);
        });
        self.changed();
    }
}

/// Live view of the IPAM resources of the CNIs installed. Dropping it
/// stops its tasks.
pub struct IpamDirectory {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl IpamDirectory {
    /// Starts probing and, where served, watching every [`IpamKind`].
    /// Needs `list` and `watch` on each (a `403` only leaves that one
    /// out), and `get` on Calico's `IPAMConfig` named `default` where
    /// Calico's blocks are in use (a `403` only leaves
    /// [`IpamDirectory::calico_strict_affinity`] unknown). Must be called
    /// within a Tokio runtime.
    pub fn spawn(client: &KubeClient, opts: &IpamOptions) -> IpamDirectory {
        let inner = Arc::new(Inner {
            sources: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            last_error: crate::client::LastError::default(),
            strict: Mutex::new(StrictAffinity::Unused),
        });
        let mut tasks: Vec<JoinHandle<()>> = IpamKind::ALL
            .into_iter()
            .map(|kind| {
                let api: Api<DynamicObject> = Api::all_with(client.0.clone(), &kind.api_resource());
                tokio::spawn(run(inner.clone(), api, kind, opts.clone()))
            })
            .collect();
        tasks.push(tokio::spawn(strict::run(
            inner.clone(),
            strict::api(client),
            opts.clone(),
        )));
        IpamDirectory { inner, tasks }
    }

    /// Node → its IPAM prefixes from every resource (sorted, no
    /// duplicates). The CNI's word: vet before use.
    pub fn prefixes(&self) -> BTreeMap<String, Vec<Cidr>> {
        let map = self.inner.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, Vec<Cidr>> = BTreeMap::new();
        for e in map.values().flat_map(|s| s.objects.values()) {
            out.entry(e.node.clone())
                .or_default()
                .extend(e.prefixes.iter().copied());
        }
        for v in out.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        out
    }

    /// Where `kind` stands.
    pub fn state(&self, kind: IpamKind) -> IpamState {
        let map = self.inner.sources.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&kind)
            .and_then(|s| s.state)
            .unwrap_or(IpamState::Unknown)
    }

    /// Whether every resource has a definite answer: not installed, not
    /// allowed, or listed (stays true through later outages).
    pub fn is_settled(&self) -> bool {
        IpamKind::ALL.iter().all(|k| {
            matches!(
                self.state(*k),
                IpamState::Absent | IpamState::Forbidden | IpamState::Listed
            )
        })
    }

    /// A counter bumped on every change; `changed().await` to react.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Watch errors since start (not counting probes answered 404 or 403).
    pub fn watch_errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Probes (LISTs asking whether a resource is served) since start.
    pub fn probes(&self) -> u64 {
        self.inner.probes.load(Ordering::Relaxed)
    }

    /// Entries skipped as unusable since start ([`IpamIssue`]s, counted
    /// when first seen on an object).
    pub fn skipped_entries(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// The last watch error since start.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.get()
    }

    /// What is known of Calico's `strictAffinity` while Calico's blocks
    /// are in use ([`StrictAffinity::Unused`] otherwise). Off or unset
    /// ([`StrictAffinity::lets_nodes_borrow`]), a node may be given
    /// addresses of another node's block, which the relay routes to the
    /// block's node: reported (logged once, shown to operators), never
    /// acted on. Read again every [`IpamOptions::rediscover`].
    pub fn calico_strict_affinity(&self) -> StrictAffinity {
        self.inner.strict()
    }
}

impl Drop for IpamDirectory {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn status_of(e: &KubeError) -> Option<u16> {
    match e {
        KubeError::Api { status, .. } => *status,
        _ => None,
    }
}

fn watch_status(e: &watcher::Error) -> Option<u16> {
    use watcher::Error as W;
    match e {
        W::InitialListFailed(kube::Error::Api(s))
        | W::WatchStartFailed(kube::Error::Api(s))
        | W::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        W::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// The wait after the `n`th probe in a row answered `404` (`n` ≥ 1):
/// `retry`, doubling each time, at most `rediscover`. A stray 404 at start
/// (see the module docs) costs `retry`, while a cluster without that CNI
/// is soon asked only every `rediscover`.
fn absent_wait(opts: &IpamOptions, n: u32) -> Duration {
    opts.retry
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(opts.rediscover)
}

/// A log line written only when it differs from the last one (a probe
/// repeated every few seconds or minutes says each outcome once).
#[derive(Default)]
pub(super) struct SaidOnce(String);

impl SaidOnce {
    /// Logs `now` (at warn or info) unless it is what was said last.
    pub(super) fn say(&mut self, now: String, warn: bool) {
        if now != self.0 {
            if warn {
                tracing::warn!("{now}");
            } else {
                tracing::info!("{now}");
            }
            self.0 = now;
        }
    }
}

/// Probes `kind` and follows it while it is served, forever.
async fn run(inner: Arc<Inner>, api: Api<DynamicObject>, kind: IpamKind, opts: IpamOptions) {
    // Each probe outcome is logged when it changes only.
    let mut said = SaidOnce::default();
    let mut say = |now: String, warn: bool| said.say(now, warn);
    let every = opts.rediscover;
    let retry = opts.retry.min(every);
    // The watch ended with a 404 and its objects are kept: a 404 from the
    // next probe confirms the CRD is gone, a success resumes the watch.
    let mut unconfirmed = false;
    // Probes answered 404 in a row (the wait grows with them).
    let mut absent: u32 = 0;
    loop {
        inner.probes.fetch_add(1, Ordering::Relaxed);
        let probe = crate::bounded(
            "IPAM resource probe",
            opts.probe_timeout,
            api.list(&ListParams::default().limit(1)),
        )
        .await;
        let wait = match probe {
            Ok(_) => {
                absent = 0;
                say(
                    format!("{kind} is served: its node prefixes count as pod prefixes"),
                    false,
                );
                // Still listed while its objects are kept: the relist
                // replaces them, and readiness must not flap meanwhile.
                if !unconfirmed {
                    inner.set_state(kind, IpamState::Watching, false);
                }
                follow(&inner, &api, kind, &opts).await;
                unconfirmed = true;
                say(format!("{kind} answered 404 to its watch: its node prefixes are kept until a probe confirms it is gone; probing again in {retry:?}"), true);
                retry
            }
            Err(e) if status_of(&e) == Some(404) => {
                if std::mem::take(&mut unconfirmed) {
                    say(
                        format!(
                            "{kind} is no longer served (404 again): its node prefixes are dropped"
                        ),
                        true,
                    );
                }
                absent = absent.saturating_add(1);
                say(
                    format!("{kind} is not installed (404); looking for it again after {retry:?}, then less often, at least every {every:?}"),
                    false,
                );
                inner.set_state(kind, IpamState::Absent, true);
                absent_wait(&opts, absent)
            }
            Err(e) if status_of(&e) == Some(403) => {
                absent = 0;
                say(format!("{kind} may not be read (403: list and watch are needed, see deploy/kubernetes/base/rbac.yaml); its node prefixes are not used; trying again every {every:?}"), true);
                // Objects a watch's 404 left kept are dropped: the log says
                // its prefixes are not used, and from here nothing confirms
                // them.
                inner.set_state(kind, IpamState::Forbidden, std::mem::take(&mut unconfirmed));
                every
            }
            Err(e) => {
                say(format!("{kind} probe failed: {e}; retrying"), false);
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Watches `kind` until it answers 404 (the caller's next probe tells a
/// removed CRD from a stray 404).
async fn follow(inner: &Inner, api: &Api<DynamicObject>, kind: IpamKind, opts: &IpamOptions) {
    let config = watcher::Config::default().timeout(opts.watch_timeout_secs);
    let stream = watcher(api.clone(), config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut relist: Vec<DynamicObject> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(o)) => inner.apply(kind, &o),
            Ok(watcher::Event::Delete(o)) => inner.delete(kind, &o),
            Ok(watcher::Event::Init) => relist.clear(),
            Ok(watcher::Event::InitApply(o)) => relist.push(o),
            Ok(watcher::Event::InitDone) => {
                inner.replace(kind, &relist);
                relist.clear();
                tracing::debug!(%kind, "IPAM objects (re)listed");
            }
            Err(e) if watch_status(&e) == Some(404) => return,
            Err(e) => {
                inner.errors.fetch_add(1, Ordering::Relaxed);
                let (_, _, _, plural) = kind.gvk();
                inner.last_error.set(plural, &e);
                tracing::warn!(%kind, error = %e, "IPAM watch failed; keeping the last known prefixes, retrying with backoff");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_is_probed_again_soon_then_less_often() {
        let opts = IpamOptions::default();
        let waits: Vec<u64> = (1..=7).map(|n| absent_wait(&opts, n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(absent_wait(&opts, u32::MAX), opts.rediscover);
    }
}
