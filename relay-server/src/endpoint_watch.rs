//! Which Service ports' endpoints (usable or serving) changed. A UDP flow picked for a Service
//! ends when its endpoint leaves (see `tunnel_udp::endpoint_gone`); it
//! waits on its own port here, not on every new snapshot of the cluster's
//! Services, which a busy cluster publishes up to ten times a second for
//! changes elsewhere: with thousands of flows, waking each of them for
//! every one would cost more than the flows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use relay_protocol::ServiceKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::services::{Backend, ServiceSnapshot, ServiceSource};

/// A Service port a flow can be picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WatchedPort {
    /// A ClusterIP (or external) address and port.
    Port(ServiceKey),
    /// A node port (`port`, UDP?), taken on the relay node's addresses.
    NodePort(u16, bool),
}

impl WatchedPort {
    /// Its endpoints in `s`.
    pub(crate) fn backends(self, s: &ServiceSnapshot) -> Option<&Arc<[Backend]>> {
        match self {
            WatchedPort::Port(k) => s.ports.get(&k),
            WatchedPort::NodePort(p, udp) => s.node_ports.get(&(p, udp)),
        }
    }

    /// The addresses of its serving endpoints in `s`, usable or not
    /// (UDP ports in Kubernetes mode; see [`ServiceSnapshot::udp_serving`]).
    pub(crate) fn serving(self, s: &ServiceSnapshot) -> Option<&Arc<[IpAddr]>> {
        let key = match self {
            WatchedPort::Port(k) => k,
            WatchedPort::NodePort(p, udp) => ServiceKey::node_port(p, udp),
        };
        s.udp_serving.get(&key)
    }
}

/// Tells the waiters of a port when its endpoints change.
pub(crate) struct EndpointWatch {
    ports: Mutex<HashMap<WatchedPort, watch::Sender<()>>>,
}

impl EndpointWatch {
    /// Compares each new snapshot of `services` with the one before, for
    /// the ports someone waits on, until `stop`.
    pub(crate) fn start(services: Arc<dyn ServiceSource>, stop: CancellationToken) -> Arc<Self> {
        let me = Arc::new(EndpointWatch {
            ports: Mutex::default(),
        });
        let watcher = me.clone();
        let mut rx = services.subscribe();
        let mut before = rx.borrow_and_update().clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
                let now = rx.borrow_and_update().clone();
                watcher.compare(&before, &now);
                before = now;
            }
        });
        me
    }

    /// Marks changed every watched port whose endpoints differ between
    /// `before` and `now`, and forgets ports nobody waits on any more.
    fn compare(&self, before: &ServiceSnapshot, now: &ServiceSnapshot) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.retain(|port, tx| {
            if tx.receiver_count() == 0 {
                return false;
            }
            if port.backends(before) != port.backends(now)
                || port.serving(before) != port.serving(now)
            {
                tx.send_replace(());
            }
            true
        });
    }

    /// Marked changed whenever `port`'s endpoints change from now on.
    pub(crate) fn subscribe(&self, port: WatchedPort) -> watch::Receiver<()> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .entry(port)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn snap(entries: &[(&str, &[&str])]) -> ServiceSnapshot {
        ServiceSnapshot {
            ports: entries
                .iter()
                .map(|(vip, eps)| {
                    let key = ServiceKey {
                        vip: vip.parse().unwrap(),
                        udp: true,
                    };
                    let b: Vec<Backend> = eps
                        .iter()
                        .map(|a| Backend {
                            addr: a.parse().unwrap(),
                            node: None,
                            hints: None,
                        })
                        .collect();
                    (key, Arc::from(b))
                })
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    /// Only the waiters of a port whose endpoints changed are woken; a
    /// port nobody waits on is forgotten.
    #[test]
    fn only_the_changed_port_wakes_its_waiters() {
        let w = EndpointWatch {
            ports: Mutex::default(),
        };
        let port = |vip: &str| {
            WatchedPort::Port(ServiceKey {
                vip: vip.parse().unwrap(),
                udp: true,
            })
        };
        let mut dns = w.subscribe(port("10.96.0.10:53"));
        let mut other = w.subscribe(port("10.96.0.11:53"));
        let gone = w.subscribe(port("10.96.0.12:53"));
        drop(gone);
        let a = snap(&[
            ("10.96.0.10:53", &["10.244.1.2:53"]),
            ("10.96.0.11:53", &["10.244.1.3:53"]),
        ]);
        let b = snap(&[
            ("10.96.0.10:53", &["10.244.7.2:53"]),
            ("10.96.0.11:53", &["10.244.1.3:53"]),
        ]);
        w.compare(&a, &b);
        assert!(dns.has_changed().unwrap(), "its endpoint moved");
        assert!(!other.has_changed().unwrap(), "unchanged");
        assert_eq!(
            w.ports.lock().unwrap().len(),
            2,
            "the unwatched port is forgotten"
        );
        dns.borrow_and_update();
        // The Service deleted: a change too.
        w.compare(&b, &snap(&[("10.96.0.11:53", &["10.244.1.3:53"])]));
        assert!(dns.has_changed().unwrap() && !other.has_changed().unwrap());
        other.borrow_and_update();
        // A terminating endpoint leaving the serving ones, its usable
        // endpoints unchanged: a change too (a flow kept on it must end).
        let serving = |ips: &[&str]| {
            let mut s = b.clone();
            let ips: Vec<IpAddr> = ips.iter().map(|i| i.parse().unwrap()).collect();
            s.udp_serving.insert(
                ServiceKey {
                    vip: "10.96.0.11:53".parse().unwrap(),
                    udp: true,
                },
                Arc::from(ips),
            );
            s
        };
        w.compare(
            &serving(&["10.244.1.3", "10.244.1.9"]),
            &serving(&["10.244.1.3"]),
        );
        assert!(other.has_changed().unwrap(), "a serving endpoint left");
    }
}
