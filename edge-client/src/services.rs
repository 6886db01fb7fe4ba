//! The edge's ClusterIP table, as the relay sends it
//! ([`Control::ServiceDelta`], for edges announcing `capability::SERVICES`).
//!
//! What the edge does with it, ahead of its own kube-proxy (which would
//! DNAT a ClusterIP to a remote pod in the same hook as capture, where no
//! later redirect can follow):
//! - ports with an endpoint off this edge are captured; a connection (or
//!   UDP flow) to one goes to a local endpoint when the edge has one
//!   (dialled here, so a Service with endpoints on this edge never crosses
//!   to the cloud), otherwise to the relay with the ClusterIP as target,
//!   and the relay picks the endpoint;
//! - ports whose endpoints are all on this edge are exempt from prefix
//!   capture (a service range among the tunnel routes), so the node's own
//!   kube-proxy serves them locally.
//!
//! The table outlives sessions: while the relay is unreachable the last
//! one keeps serving, so local endpoints keep answering. With
//! `capture_state_file` set it also outlives the process (see
//! `crate::capture_state`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use relay_protocol::{Control, ServiceKey, ServicePort};
use relay_transport::capture::{Proto, ServiceSet};
use tokio::sync::watch;

/// ClusterIP port → what the edge knows about it.
pub type ServiceTable = BTreeMap<ServiceKey, ServicePort>;

/// The current table, shared by the session (writer) and capture
/// (readers).
#[derive(Debug)]
pub struct EdgeServices {
    table: watch::Sender<Arc<ServiceTable>>,
    next: AtomicUsize,
    /// Captured ClusterIP connections and UDP flows served by a local
    /// endpoint.
    pub local_picks: AtomicU64,
}

impl Default for EdgeServices {
    fn default() -> Self {
        EdgeServices {
            table: watch::channel(Arc::default()).0,
            next: AtomicUsize::new(0),
            local_picks: AtomicU64::new(0),
        }
    }
}

impl EdgeServices {
    /// Starts from `table` (the saved one: `crate::capture_state`).
    pub(crate) fn with_table(table: ServiceTable) -> EdgeServices {
        let s = EdgeServices::default();
        s.publish(table);
        s
    }

    /// The current table.
    pub fn current(&self) -> Arc<ServiceTable> {
        self.table.borrow().clone()
    }

    /// Sees every new table.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServiceTable>> {
        self.table.subscribe()
    }

    fn publish(&self, t: ServiceTable) {
        self.table.send_replace(Arc::new(t));
    }

    /// A local endpoint for TCP connections (or, with `udp`, UDP flows) to
    /// `dst`, when `dst` is a ClusterIP port with endpoints on this edge
    /// (round robin).
    pub fn local_endpoint(&self, dst: SocketAddr, udp: bool) -> Option<SocketAddr> {
        let t = self.table.borrow();
        let p = t.get(&ServiceKey { vip: dst, udp })?;
        if p.local.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Relaxed);
        Some(p.local[i % p.local.len()])
    }
}

/// What capture installs for `table`: the ports to capture (some endpoint
/// elsewhere) and the ports left to the node's own kube-proxy (every
/// endpoint here).
pub fn capture_sets(table: &ServiceTable) -> (ServiceSet, ServiceSet) {
    let proto = |k: &ServiceKey| if k.udp { Proto::Udp } else { Proto::Tcp };
    let mut want = ServiceSet::new();
    let mut local = ServiceSet::new();
    for (k, p) in table {
        if p.remote {
            want.insert((k.vip, proto(k)));
        } else if !p.local.is_empty() {
            local.insert((k.vip, proto(k)));
        }
    }
    (want, local)
}

/// One session's batch being assembled: frames apply to a working copy,
/// which is published when a batch is complete (capture never sees half of
/// a large update).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    working: Option<ServiceTable>,
}

impl Batch {
    /// Applies one frame; publishes on the batch's last frame.
    pub(crate) fn apply(&mut self, msg: &Control, services: &EdgeServices) {
        let table = self
            .working
            .get_or_insert_with(|| services.current().as_ref().clone());
        if msg.apply_service_delta(table) == Some(true) {
            if let Some(t) = self.working.take() {
                services.publish(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(vip: &str, udp: bool, remote: bool, local: &[&str]) -> ServicePort {
        ServicePort {
            key: ServiceKey {
                vip: vip.parse().unwrap(),
                udp,
            },
            remote,
            local: local.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn batches_publish_when_complete_and_pick_local_endpoints() {
        let s = EdgeServices::default();
        let mut b = Batch::default();
        let mixed = port(
            "10.96.0.20:80",
            false,
            true,
            &["10.244.7.5:8080", "10.244.7.6:8080"],
        );
        let cloud = port("10.96.0.10:53", true, true, &[]);
        let own = port("10.96.0.30:80", false, false, &["10.244.7.7:80"]);
        let frames = Control::service_deltas(true, vec![mixed.clone(), cloud.clone()], vec![]);
        let half = Control::ServiceDelta {
            reset: false,
            upsert: vec![own.clone()],
            remove: vec![],
            complete: false,
        };
        b.apply(&frames[0], &s);
        b.apply(&half, &s);
        assert_eq!(
            s.current().len(),
            2,
            "published at the first complete frame"
        );
        b.apply(
            &Control::ServiceDelta {
                reset: false,
                upsert: vec![],
                remove: vec![cloud.key],
                complete: true,
            },
            &s,
        );
        let t = s.current();
        assert_eq!(t.len(), 2);
        let (want, local) = capture_sets(&t);
        assert_eq!(want.len(), 1, "{want:?}");
        assert!(want.contains(&(mixed.key.vip, Proto::Tcp)));
        assert!(local.contains(&(own.key.vip, Proto::Tcp)));
        let picks: std::collections::BTreeSet<SocketAddr> = (0..4)
            .filter_map(|_| s.local_endpoint(mixed.key.vip, false))
            .collect();
        assert_eq!(picks.len(), 2, "round robin over local endpoints");
        assert_eq!(
            s.local_endpoint("10.96.0.99:80".parse().unwrap(), false),
            None
        );
        assert_eq!(
            s.local_endpoint(mixed.key.vip, true),
            None,
            "UDP is its own port"
        );
    }
}
