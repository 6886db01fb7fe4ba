//! The cluster's Services and EndpointSlices as the relay's
//! [`ServiceSource`]: relay-kube's `ServiceDirectory` keeps the table
//! (kube-proxy's endpoint semantics), this adapter turns each change into
//! an immutable [`ServiceSnapshot`] for the data path. Built only with the
//! `kubernetes` feature.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use relay_kube::services::{Protocol, ServiceKind, ServiceTable};
use relay_kube::{KubeClient, ServiceDirectory, ServiceDirectoryOptions};
use relay_protocol::ServiceKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::services::{Backend, NameLookup, ServiceSnapshot, ServiceSource};

/// Gathers a burst of changes (a relist, a rollout touching many slices)
/// into one snapshot; well under the second an endpoint change may take.
const SETTLE: Duration = Duration::from_millis(100);

/// Services from the Kubernetes API.
pub struct KubeServices {
    dir: ServiceDirectory,
    snapshot: watch::Sender<Arc<ServiceSnapshot>>,
}

/// The snapshot of `table`: every TCP and UDP ClusterIP port with its
/// usable endpoints (SCTP is never captured, so never listed).
pub fn snapshot_of(table: &ServiceTable) -> ServiceSnapshot {
    let mut ports = BTreeMap::new();
    for ((vip, proto), entry) in table.cluster_ips() {
        let udp = match proto {
            Protocol::Tcp => false,
            Protocol::Udp => true,
            Protocol::Sctp => continue,
        };
        let backends: Vec<Backend> = entry
            .endpoints
            .iter()
            .map(|e| Backend {
                addr: e.addr(),
                node: e.node.as_deref().map(Arc::from),
            })
            .collect();
        ports.insert(ServiceKey { vip: *vip, udp }, Arc::from(backends));
    }
    ServiceSnapshot { ports }
}

/// `CONNECT host:port` against `table` (see [`NameLookup`]).
pub fn lookup_name(table: &ServiceTable, host: &str, port: u16) -> NameLookup {
    let Some(svc) = table.resolve(host) else {
        return NameLookup::NotAService;
    };
    let what = format!("service {}/{}", svc.namespace, svc.name);
    let Some(p) = svc
        .ports
        .iter()
        .find(|p| p.port == port && p.protocol == Protocol::Tcp)
    else {
        return NameLookup::Refused(format!("{what} has no TCP port {port}"));
    };
    match &svc.kind {
        ServiceKind::ExternalName(target) => NameLookup::Refused(format!(
            "{what} is an ExternalName for {target}: connect to that name"
        )),
        // Endpoints of the families the Service has (headless: both).
        ServiceKind::ClusterIp(ips) => {
            let mut out = Vec::new();
            for ip in ips {
                out.extend(p.usable(ip.is_ipv4()).into_iter().map(backend));
            }
            NameLookup::Backends(out)
        }
        ServiceKind::Headless => {
            let mut out: Vec<Backend> = p.usable(true).into_iter().map(backend).collect();
            out.extend(p.usable(false).into_iter().map(backend));
            NameLookup::Backends(out)
        }
    }
}

fn backend(e: &relay_kube::services::Endpoint) -> Backend {
    Backend {
        addr: e.addr(),
        node: e.node.as_deref().map(Arc::from),
    }
}

impl KubeServices {
    /// Starts the watches and the snapshot task (until `stop`).
    pub fn start(client: &KubeClient, cluster_domain: &str, stop: CancellationToken) -> Arc<Self> {
        let opts = ServiceDirectoryOptions {
            cluster_domain: cluster_domain.to_string(),
            ..ServiceDirectoryOptions::default()
        };
        let me = Arc::new(KubeServices {
            dir: ServiceDirectory::spawn(client, &opts),
            snapshot: watch::channel(Arc::default()).0,
        });
        let weak = Arc::downgrade(&me);
        let mut changes = me.dir.subscribe();
        tokio::spawn(async move {
            loop {
                {
                    let Some(me) = weak.upgrade() else { return };
                    let snap = me.dir.with_table(snapshot_of);
                    debug!(ports = snap.ports.len(), "service snapshot");
                    me.snapshot.send_replace(Arc::new(snap));
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(SETTLE).await;
            }
        });
        me
    }
}

impl ServiceSource for KubeServices {
    fn snapshot(&self) -> Arc<ServiceSnapshot> {
        self.snapshot.borrow().clone()
    }
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSnapshot>> {
        self.snapshot.subscribe()
    }
    fn by_name(&self, host: &str, port: u16) -> NameLookup {
        self.dir.with_table(|t| lookup_name(t, host, port))
    }
    fn is_synced(&self) -> bool {
        self.dir.is_synced()
    }
}
