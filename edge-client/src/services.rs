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

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use relay_protocol::{Control, ServiceKey, ServicePort};
use relay_transport::capture::{Proto, ServiceSet};
use relay_transport::udp::Stale;
use tokio::sync::watch;

/// ClusterIP port → what the edge knows about it.
pub type ServiceTable = BTreeMap<ServiceKey, ServicePort>;

/// The current table, shared by the session (writer) and capture
/// (readers).
#[derive(Debug)]
pub struct EdgeServices {
    table: watch::Sender<Arc<ServiceTable>>,
    /// Captured ClusterIP connections and UDP flows served by a local
    /// endpoint.
    pub local_picks: AtomicU64,
}

impl Default for EdgeServices {
    fn default() -> Self {
        EdgeServices {
            table: watch::channel(Arc::default()).0,
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

    /// Makes `t` the table, without the local endpoints no pod can have
    /// (whether it came from the relay or from the saved file).
    fn publish(&self, mut t: ServiceTable) {
        drop_special_endpoints(&mut t);
        self.table.send_replace(Arc::new(t));
    }

    /// Where a captured TCP connection (or, with `udp`, UDP flow) to `dst`
    /// goes: a local endpoint when `dst` is a ClusterIP port, or a node
    /// port on one of this node's addresses, with endpoints on this edge
    /// (one drawn at random); otherwise the relay, asked for `dst` itself, or for
    /// [`ServiceKey::node_port`] when `dst` is a node port (the relay
    /// picks the endpoint).
    pub fn resolve(&self, dst: SocketAddr, udp: bool) -> Resolved {
        let t = self.current();
        let Some(key) = service_key(&t, dst, udp) else {
            return Resolved::Relay(dst);
        };
        match t.get(&key) {
            // Drawn at random, as kube-proxy does and as the relay picks
            // (`relay_server::services::pick` says why not a counter).
            Some(p) if !p.local.is_empty() => {
                Resolved::Local(p.local[rand::random_range(0..p.local.len())])
            }
            _ => Resolved::Relay(key.vip),
        }
    }

    /// Resolves when `ep`, which [`EdgeServices::resolve`] picked for
    /// `dst` (a local endpoint of a UDP Service), is no longer one of this
    /// edge's endpoints of that Service (see
    /// [`relay_transport::udp::Stale`]): the flow ends and the client's
    /// next datagram is resolved again.
    pub fn local_gone(&self, dst: SocketAddr, udp: bool, ep: SocketAddr) -> Stale {
        let mut table = self.subscribe();
        let Some(key) = service_key(&table.borrow(), dst, udp) else {
            return relay_transport::udp::never_stale();
        };
        Box::pin(async move {
            loop {
                let listed = table
                    .borrow_and_update()
                    .get(&key)
                    .is_some_and(|p| p.local.contains(&ep));
                if !listed || table.changed().await.is_err() {
                    break;
                }
            }
            if table.has_changed().is_err() {
                // The table's owner is gone: the edge is stopping.
                std::future::pending::<()>().await;
            }
        })
    }
}

/// The Service port `dst` names in `t`: a ClusterIP port, or a node port
/// when `dst` is one of this node's addresses; `None` for anything else.
fn service_key(t: &ServiceTable, dst: SocketAddr, udp: bool) -> Option<ServiceKey> {
    if let Some(p) = t.get(&ServiceKey { vip: dst, udp }) {
        return Some(p.key);
    }
    let np = ServiceKey::node_port(dst.port(), udp);
    // Capture takes node ports on local addresses only; a tunnelled
    // destination on the same port is not one (the bind test costs a
    // syscall, and only on a node port).
    (t.contains_key(&np) && relay_transport::capture::is_local_address(dst.ip())).then_some(np)
}

/// Where [`EdgeServices::resolve`] sends a captured connection or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resolved {
    /// To this endpoint on the edge, dialled here.
    Local(SocketAddr),
    /// Through the relay, with this target.
    Relay(SocketAddr),
}

/// What capture installs for `table`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CaptureSets {
    /// ClusterIP ports to capture (some endpoint elsewhere).
    pub want: ServiceSet,
    /// ClusterIP ports left to the node's own kube-proxy (every endpoint
    /// here).
    pub local: ServiceSet,
    /// Node ports to capture on this node's addresses (some endpoint
    /// elsewhere); those with every endpoint here stay with kube-proxy.
    pub node_ports: BTreeSet<(u16, Proto)>,
}

/// The sets capture installs for `table`. With `kube_proxy` false (the
/// node runs none) ports whose endpoints are all here are captured too:
/// nothing else would translate them, and the edge dials a local endpoint
/// itself ([`EdgeServices::resolve`]).
pub fn capture_sets(table: &ServiceTable, kube_proxy: bool) -> CaptureSets {
    let proto = |k: &ServiceKey| if k.udp { Proto::Udp } else { Proto::Tcp };
    let mut sets = CaptureSets::default();
    for (k, p) in table {
        let capture = p.remote || (!kube_proxy && !p.local.is_empty());
        if k.is_node_port() {
            if capture {
                sets.node_ports.insert((k.vip.port(), proto(k)));
            }
        } else if capture {
            sets.want.insert((k.vip, proto(k)));
        } else if kube_proxy {
            // Every endpoint here, or `internalTrafficPolicy: Local` (not
            // remote, whatever is here): the node's kube-proxy serves it,
            // or drops it as it should when there is no endpoint here.
            // Without kube-proxy nothing would: such a port is left to
            // prefix capture, and the relay refuses it.
            sets.local.insert((k.vip, proto(k)));
        }
    }
    sets
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

/// Drops local endpoints no pod can have (loopback, link-local,
/// unspecified, multicast). The edge dials local endpoints from its host
/// with its own mark, so one at `127.0.0.1` would hand pods, and LAN hosts
/// reaching a node port, the node's own loopback services; kube-apiserver
/// refuses such addresses in Endpoints but not in an EndpointSlice written
/// by hand, and kube-proxy could not reach them (no route_localnet).
fn drop_special_endpoints(t: &mut ServiceTable) {
    for p in t.values_mut() {
        p.local
            .retain(|e| !relay_transport::addr::is_special(e.ip()));
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

    /// A port neither remote nor with an endpoint here (the relay says so
    /// of an `internalTrafficPolicy: Local` Service with no endpoint on
    /// this node) is left to the node's kube-proxy, which drops it: never
    /// captured by a prefix into the tunnel.
    #[test]
    fn a_port_neither_remote_nor_local_is_left_to_kube_proxy() {
        let p = port("10.96.0.51:80", false, false, &[]);
        let t: ServiceTable = [(p.key, p.clone())].into();
        let sets = capture_sets(&t, true);
        assert!(sets.want.is_empty(), "{sets:?}");
        assert!(sets.local.contains(&(p.key.vip, Proto::Tcp)), "{sets:?}");
        // No kube-proxy to drop it: not exempt from prefix capture (the
        // site's default route would take it otherwise).
        assert_eq!(capture_sets(&t, false), CaptureSets::default());
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
        let sets = capture_sets(&t, true);
        assert_eq!(sets.want.len(), 1, "{sets:?}");
        assert!(sets.want.contains(&(mixed.key.vip, Proto::Tcp)));
        assert!(sets.local.contains(&(own.key.vip, Proto::Tcp)));
        // A node without kube-proxy: its own Service is captured too.
        let bare = capture_sets(&t, false);
        assert_eq!(bare.want.len(), 2, "{bare:?}");
        assert!(bare.want.contains(&(own.key.vip, Proto::Tcp)));
        assert!(bare.local.is_empty(), "{bare:?}");
        assert_eq!(
            s.resolve(own.key.vip, false),
            Resolved::Local("10.244.7.7:80".parse().unwrap())
        );
        // Picked in turn with another Service (as a pod resolving a name,
        // then connecting): both local endpoints still reached (a counter
        // shared by every Service gave this one every other turn, and
        // always the same endpoint).
        let picks: BTreeSet<Resolved> = (0..40)
            .map(|_| {
                s.resolve(own.key.vip, false);
                s.resolve(mixed.key.vip, false)
            })
            .collect();
        assert_eq!(picks.len(), 2, "both local endpoints: {picks:?}");
        assert!(picks.iter().all(|p| matches!(p, Resolved::Local(_))));
        let other: SocketAddr = "10.96.0.99:80".parse().unwrap();
        assert_eq!(s.resolve(other, false), Resolved::Relay(other));
        assert_eq!(
            s.resolve(mixed.key.vip, true),
            Resolved::Relay(mixed.key.vip),
            "UDP is its own port"
        );
    }

    /// Loopback and link-local local endpoints (an EndpointSlice written
    /// by hand) are dropped: never dialled from the edge's host.
    #[test]
    fn special_local_endpoints_are_never_dialled() {
        let services = EdgeServices::default();
        let mut batch = Batch::default();
        let p = port(
            "10.96.0.40:80",
            false,
            false,
            &["127.0.0.1:2379", "[::ffff:169.254.169.254]:80"],
        );
        let q = port(
            "10.96.0.41:80",
            false,
            false,
            &[
                "127.0.0.1:10248",
                "[64:ff9b::7f00:1]:10248",
                "[::169.254.169.254]:80",
                "255.255.255.255:80",
                "10.244.7.5:80",
            ],
        );
        let (pk, qk) = (p.key, q.key);
        // The same from a table saved by an earlier build.
        let saved = EdgeServices::with_table([(pk, p.clone())].into());
        assert_eq!(saved.resolve(pk.vip, false), Resolved::Relay(pk.vip));
        for f in Control::service_deltas(true, vec![p, q], vec![]) {
            batch.apply(&f, &services);
        }
        assert_eq!(services.resolve(pk.vip, false), Resolved::Relay(pk.vip));
        for _ in 0..4 {
            assert_eq!(
                services.resolve(qk.vip, false),
                Resolved::Local("10.244.7.5:80".parse().unwrap())
            );
        }
    }

    /// Node ports: captured when some endpoint is elsewhere; a connection
    /// to one of this host's addresses on one goes to a local endpoint or
    /// to the relay as `0.0.0.0:nodePort`; the same port on an address
    /// that is not this host's is not a node port.
    #[test]
    fn node_ports_resolve_on_local_addresses_only() {
        let s = EdgeServices::default();
        let mixed = port("0.0.0.0:30080", false, true, &["10.244.7.5:8080"]);
        let remote = port("0.0.0.0:30053", true, true, &[]);
        let own = port("0.0.0.0:30081", false, false, &["10.244.7.6:80"]);
        let cip = port("10.96.0.20:30053", true, true, &["10.244.7.9:53"]);
        s.publish(
            [&mixed, &remote, &own, &cip]
                .into_iter()
                .map(|p| (p.key, p.clone()))
                .collect(),
        );
        let sets = capture_sets(&s.current(), true);
        assert_eq!(
            sets.node_ports,
            BTreeSet::from([(30080, Proto::Tcp), (30053, Proto::Udp)]),
            "all-local node ports stay with kube-proxy"
        );
        assert_eq!(
            capture_sets(&s.current(), false).node_ports,
            BTreeSet::from([
                (30080, Proto::Tcp),
                (30053, Proto::Udp),
                (30081, Proto::Tcp)
            ]),
            "without kube-proxy, captured too"
        );
        assert!(sets.want.iter().all(|(a, _)| !a.ip().is_unspecified()));
        let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(
            s.resolve(lo(30080), false),
            Resolved::Local("10.244.7.5:8080".parse().unwrap())
        );
        assert_eq!(
            s.resolve(lo(30053), true),
            Resolved::Relay(remote.key.vip),
            "no local endpoint: the relay picks, asked for 0.0.0.0:30053"
        );
        let far: SocketAddr = "192.0.2.1:30080".parse().unwrap();
        assert_eq!(s.resolve(far, false), Resolved::Relay(far));
        assert_eq!(
            s.resolve(cip.key.vip, true),
            Resolved::Local("10.244.7.9:53".parse().unwrap()),
            "a ClusterIP on a node port's number is still the ClusterIP"
        );
    }
}
