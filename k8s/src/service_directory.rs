//! [`ServiceDirectory`]: the live [`ServiceTable`] kept by watches on
//! Services and EndpointSlices (the pure table and kube-proxy's endpoint
//! rules are in [`crate::services`]).
//!
//! Each Service and EndpointSlice is trimmed to what the table is built
//! from before it is held (see [`ServiceDirectory::objects`]): a Service's
//! annotations alone (`kubectl.kubernetes.io/last-applied-configuration`,
//! a Helm release's) are often larger than the rest of it, and the
//! EndpointSlice controller copies the Service's labels onto each slice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::services::{
    key_of, owner_of, service_entry, Key, ServiceEntry, ServiceTable, HEADLESS_LABEL,
    SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL,
};
use crate::{DirectoryOptions, KubeClient, KubeError};

/// The metadata the table reads: namespace, name, and the labels
/// `keep` (of the Service, or of the slice), those set. Without
/// annotations, managedFields, ownerReferences, other labels.
fn trimmed_meta(m: &mut ObjectMeta, keep: &[&str]) -> ObjectMeta {
    let labels = m
        .labels
        .take()
        .map(|mut l| {
            keep.iter()
                .filter_map(|k| l.remove_entry(*k))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|l| !l.is_empty());
    ObjectMeta {
        namespace: m.namespace.take(),
        name: m.name.take(),
        labels,
        ..ObjectMeta::default()
    }
}

/// Trims a Service to what [`service_entry`] reads: its metadata to the
/// namespace, the name and the [`SERVICE_PROXY_NAME_LABEL`] and
/// [`HEADLESS_LABEL`] labels; spec and status are kept whole. Idempotent.
fn trim_service(s: &mut Service) {
    s.metadata = trimmed_meta(&mut s.metadata, &[SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]);
}

/// Trims an EndpointSlice to what [`service_entry`] and [`owner_of`]
/// read: its metadata to the namespace, the name and the
/// [`SERVICE_NAME_LABEL`] label; each endpoint without its `targetRef`
/// (the pod) and `deprecatedTopology`. Idempotent.
fn trim_slice(s: &mut EndpointSlice) {
    s.metadata = trimmed_meta(&mut s.metadata, &[SERVICE_NAME_LABEL]);
    for e in &mut s.endpoints {
        e.target_ref = None;
        e.deprecated_topology = None;
    }
}
/// Options for the service directory.
#[derive(Clone, Debug)]
pub struct ServiceDirectoryOptions {
    /// Watch bounds (as for the node directory).
    pub watch: DirectoryOptions,
    /// The cluster domain for name lookups (`cluster.local`).
    pub cluster_domain: String,
}

impl Default for ServiceDirectoryOptions {
    fn default() -> Self {
        ServiceDirectoryOptions {
            watch: DirectoryOptions::default(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

#[derive(Default)]
struct Objects {
    services: BTreeMap<Key, Service>,
    /// Slices by their Service's key, then by slice name.
    slices: BTreeMap<Key, BTreeMap<String, EndpointSlice>>,
    /// Slice key → its Service's key (a slice may be relabelled).
    slice_owner: BTreeMap<Key, Key>,
}

impl Objects {
    fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }
}

struct Inner {
    objects: RwLock<Objects>,
    table: RwLock<ServiceTable>,
    known_nodes: RwLock<Option<BTreeSet<String>>>,
    synced: [watch::Sender<bool>; 2],
    changes: watch::Sender<u64>,
    unknown_node_endpoints: AtomicU64,
    skipped: AtomicU64,
    errors: AtomicU64,
    /// The last watch error since start.
    last_error: crate::client::LastError,
}

impl Inner {
    fn new(cluster_domain: &str) -> Inner {
        Inner {
            objects: RwLock::new(Objects::default()),
            table: RwLock::new(ServiceTable::new(cluster_domain)),
            known_nodes: RwLock::new(None),
            synced: [watch::channel(false).0, watch::channel(false).0],
            changes: watch::channel(0).0,
            unknown_node_endpoints: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: crate::client::LastError::default(),
        }
    }

    /// Recomputes the table entry of Service `key` from the stored objects.
    fn recompute(&self, objects: &Objects, key: &Key) {
        let entry = self.entry_of(objects, key);
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        table.set(&key.0, &key.1, entry);
    }

    /// The table entry of Service `key` from the stored objects (none when
    /// the Service is gone); unknown-node endpoints and skips counted.
    fn entry_of(&self, objects: &Objects, key: &Key) -> Option<ServiceEntry> {
        objects.services.get(key).map(|svc| {
            let known = self.known_nodes.read().unwrap_or_else(|p| p.into_inner());
            let slices = objects.slices.get(key).into_iter().flat_map(|m| m.values());
            let (entry, notes) = service_entry(svc, slices, known.as_ref());
            if notes.unknown_node_endpoints > 0 {
                self.unknown_node_endpoints
                    .fetch_add(notes.unknown_node_endpoints, Ordering::Relaxed);
                tracing::warn!(
                    service = %format!("{}/{}", key.0, key.1),
                    endpoints = notes.unknown_node_endpoints,
                    "endpoints on nodes not in the node directory (kept)"
                );
            }
            self.skipped.fetch_add(notes.skipped, Ordering::Relaxed);
            entry
        })
    }

    fn apply_service(&self, mut svc: Service) {
        trim_service(&mut svc);
        let key = key_of(&svc.metadata);
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        o.services.insert(key.clone(), svc);
        self.recompute(&o, &key);
    }

    fn delete_service(&self, svc: &Service) {
        let key = key_of(&svc.metadata);
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        o.services.remove(&key);
        self.recompute(&o, &key);
    }

    fn apply_slice(&self, mut slice: EndpointSlice) {
        trim_slice(&mut slice);
        let key = key_of(&slice.metadata);
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        let old = remove_slice(&mut o, &key);
        let owner = owner_of(&slice);
        if let Some(owner) = &owner {
            o.slices
                .entry(owner.clone())
                .or_default()
                .insert(key.1.clone(), slice);
            o.slice_owner.insert(key.clone(), owner.clone());
        }
        for k in old.iter().chain(owner.iter()).collect::<BTreeSet<_>>() {
            self.recompute(&o, k);
        }
    }

    fn delete_slice(&self, slice: &EndpointSlice) {
        let key = key_of(&slice.metadata);
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = remove_slice(&mut o, &key) {
            self.recompute(&o, &owner);
        }
    }

    /// After a relist of one kind: replace those objects, rebuild the table.
    fn relisted_services(&self, list: Vec<Service>) {
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        o.services = list
            .into_iter()
            .map(|mut s| {
                trim_service(&mut s);
                (key_of(&s.metadata), s)
            })
            .collect();
        self.rebuild(&o);
    }

    fn relisted_slices(&self, list: Vec<EndpointSlice>) {
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        o.slices.clear();
        o.slice_owner.clear();
        for mut s in list {
            trim_slice(&mut s);
            if let Some(owner) = owner_of(&s) {
                let key = key_of(&s.metadata);
                o.slice_owner.insert(key.clone(), owner.clone());
                o.slices.entry(owner).or_default().insert(key.1, s);
            }
        }
        self.rebuild(&o);
    }

    fn rebuild(&self, o: &Objects) {
        let domain = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cluster_domain()
            .to_string();
        // Built aside and swapped in whole: a reader (the relay's snapshot,
        // a CONNECT by name) never sees a half-built table after a relist.
        let mut table = ServiceTable::new(&domain);
        for k in o.services.keys() {
            table.set(&k.0, &k.1, self.entry_of(o, k));
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g += 1);
    }
}

fn remove_slice(o: &mut Objects, key: &Key) -> Option<Key> {
    let owner = o.slice_owner.remove(key)?;
    if let Some(m) = o.slices.get_mut(&owner) {
        m.remove(&key.1);
        if m.is_empty() {
            o.slices.remove(&owner);
        }
    }
    Some(owner)
}

/// Services and EndpointSlices as [`ServiceDirectory::objects`] gives
/// them and [`ServiceDirectory::spawn_seeded`] takes them back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceObjects {
    /// The Services.
    pub services: Vec<Service>,
    /// The EndpointSlices (those labelled with their Service).
    pub slices: Vec<EndpointSlice>,
}

/// A live [`ServiceTable`] from watches on Services and EndpointSlices.
/// Dropping it stops the watches.
pub struct ServiceDirectory {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServiceDirectory {
    /// Starts both watches (LIST then WATCH, relisting when needed, with
    /// the default backoff). Needs `list` and `watch` on `services` and on
    /// `endpointslices.discovery.k8s.io`, cluster-wide. Must be called
    /// within a Tokio runtime.
    pub fn spawn(client: &KubeClient, opts: &ServiceDirectoryOptions) -> ServiceDirectory {
        Self::spawn_seeded(client, opts, None)
    }

    /// As [`ServiceDirectory::spawn`], the table first built from `seed`
    /// (objects kept from an earlier run, see [`ServiceDirectory::objects`])
    /// as if they had been listed, without counting as synced: each kind's
    /// first list replaces them whole.
    pub fn spawn_seeded(
        client: &KubeClient,
        opts: &ServiceDirectoryOptions,
        seed: Option<ServiceObjects>,
    ) -> ServiceDirectory {
        let inner = Arc::new(Inner::new(&opts.cluster_domain));
        if let Some(seed) = seed {
            // Before the watches start, so a list never precedes it.
            inner.relisted_services(seed.services);
            inner.relisted_slices(seed.slices);
            inner.changed();
        }
        let config = watcher::Config::default().timeout(opts.watch.watch_timeout_secs);
        let svc_stream = watcher(Api::<Service>::all(client.0.clone()), config.clone())
            .modify(trim_service)
            .default_backoff();
        let slice_stream = watcher(Api::<EndpointSlice>::all(client.0.clone()), config)
            .modify(trim_slice)
            .default_backoff();
        let i1 = inner.clone();
        let i2 = inner.clone();
        let tasks = vec![
            tokio::spawn(drive(
                svc_stream,
                "services",
                i1.clone(),
                0,
                move |ev| match ev {
                    Change::Apply(s) => i1.apply_service(s),
                    Change::Delete(s) => i1.delete_service(&s),
                    Change::Relisted(l) => i1.relisted_services(l),
                },
            )),
            tokio::spawn(drive(
                slice_stream,
                "endpointslices",
                i2.clone(),
                1,
                move |ev| match ev {
                    Change::Apply(s) => i2.apply_slice(s),
                    Change::Delete(s) => i2.delete_slice(&s),
                    Change::Relisted(l) => i2.relisted_slices(l),
                },
            )),
        ];
        ServiceDirectory { inner, tasks }
    }

    /// Whether both first lists have been stored (stays true afterwards).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.iter().all(|s| *s.borrow())
    }

    /// Waits until [`ServiceDirectory::is_synced`], at most `timeout`.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), KubeError> {
        let wait = async {
            for s in &self.inner.synced {
                let mut rx = s.subscribe();
                let _ = rx.wait_for(|v| *v).await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| KubeError::Timeout {
                what: "service directory sync",
                after: timeout,
            })
    }

    /// A copy of the current table.
    pub fn table(&self) -> ServiceTable {
        self.inner
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `f` on the current table without copying it.
    pub fn with_table<T>(&self, f: impl FnOnce(&ServiceTable) -> T) -> T {
        f(&self.inner.table.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The Services and EndpointSlices the table is built from, as held:
    /// trimmed to what it reads (namespaces, names, the labels
    /// [`SERVICE_PROXY_NAME_LABEL`], [`HEADLESS_LABEL`] and
    /// [`SERVICE_NAME_LABEL`], the
    /// Services' spec and status, the slices' ports and endpoints without
    /// `targetRef` or `deprecatedTopology`; no annotations or other
    /// metadata), for a cache that outlives the process.
    pub fn objects(&self) -> ServiceObjects {
        let o = self.inner.objects.read().unwrap_or_else(|p| p.into_inner());
        ServiceObjects {
            services: o.services.values().cloned().collect(),
            slices: o
                .slices
                .values()
                .flat_map(|m| m.values())
                .cloned()
                .collect(),
        }
    }

    /// Number of (Services, EndpointSlices) held: the live objects.
    pub fn object_counts(&self) -> (usize, usize) {
        let o = self.inner.objects.read().unwrap_or_else(|p| p.into_inner());
        (o.services.len(), o.slice_count())
    }

    /// The node names endpoints are checked against (from the node
    /// directory); `None` turns the check off. Recomputes the table.
    pub fn set_known_nodes(&self, nodes: Option<BTreeSet<String>>) {
        *self
            .inner
            .known_nodes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = nodes;
        let o = self.inner.objects.read().unwrap_or_else(|p| p.into_inner());
        self.inner.rebuild(&o);
        self.inner.changed();
    }

    /// A counter bumped on every change; `changed().await` to react.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Endpoints seen on unknown nodes since start (kept; counted each
    /// time their Service is recomputed).
    pub fn unknown_node_endpoints(&self) -> u64 {
        self.inner.unknown_node_endpoints.load(Ordering::Relaxed)
    }

    /// Unusable entries skipped since start.
    pub fn skipped_entries(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// Watch errors since start (each followed by a backoff and a retry).
    pub fn watch_errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// The last watch error since start (a 403 for want
    /// of RBAC, the apiserver unreachable), for readiness to say why.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.get()
    }
}

impl Drop for ServiceDirectory {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum Change<K> {
    Apply(K),
    Delete(K),
    Relisted(Vec<K>),
}

/// Feeds one watch into `apply`: single changes as they come, a relist
/// only once complete (until then the previous objects stay).
async fn drive<K, S>(
    stream: S,
    what: &'static str,
    inner: Arc<Inner>,
    sync_slot: usize,
    apply: impl Fn(Change<K>),
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut relist: Vec<K> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(o)) => {
                apply(Change::Apply(o));
                inner.changed();
            }
            Ok(watcher::Event::Delete(o)) => {
                apply(Change::Delete(o));
                inner.changed();
            }
            Ok(watcher::Event::Init) => relist.clear(),
            Ok(watcher::Event::InitApply(o)) => relist.push(o),
            Ok(watcher::Event::InitDone) => {
                let n = relist.len();
                apply(Change::Relisted(std::mem::take(&mut relist)));
                inner.synced[sync_slot].send_replace(true);
                inner.changed();
                tracing::debug!(objects = n, "{what} (re)listed");
            }
            Err(e) => {
                inner.errors.fetch_add(1, Ordering::Relaxed);
                inner.last_error.set(what, &e);
                tracing::warn!(error = %e, "{what} watch failed; keeping the last known table, retrying with backoff");
            }
        }
    }
    tracing::error!("{what} watch stream ended");
}

#[cfg(test)]
mod tests;
