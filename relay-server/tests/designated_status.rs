//! `replicas::DesignatedStatus` tells its sink when the replica set
//! changed (`StatusSink::writers_changed`), before it passes on a write
//! under the new set: the sink (KubeStatus, whose StatusWriter remembers
//! what it last wrote per node and skips a write equal to it) must not
//! trust that memory for a node another replica may have written since.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use relay_protocol::Replica;
use relay_server::replicas::{writer_of, DesignatedStatus};
use relay_server::status::{SessionInfo, StatusSink};
use tokio::sync::watch;

/// Stands for KubeStatus and its StatusWriter: remembers what it last
/// wrote per node and skips a write equal to it until
/// `writers_changed`; `api` holds the conditions every replica writes.
struct CachingSink {
    api: Arc<Mutex<BTreeMap<String, String>>>,
    last: Mutex<BTreeMap<String, String>>,
}

impl CachingSink {
    fn write(&self, node: &str, cond: String) {
        let mut last = self.last.lock().unwrap();
        if last.get(node) != Some(&cond) {
            self.api.lock().unwrap().insert(node.into(), cond.clone());
            last.insert(node.into(), cond);
        }
    }
}

impl StatusSink for CachingSink {
    fn up(&self, node: &str, _: &SessionInfo) {
        self.write(node, "True".into());
    }
    fn down(&self, node: &str, why: &str) {
        self.write(node, format!("False: {why}"));
    }
    fn rejected(&self, _: &str, _: &str, _: &str) {}
    fn writers_changed(&self) {
        self.last.lock().unwrap().clear();
    }
}

/// A writes N down (X); B joins, wins N and writes it up; B leaves and
/// N is down again for X: A, its writer again, writes it although it
/// last wrote just that, since B wrote N in between.
#[test]
fn a_writer_again_does_not_trust_what_it_last_wrote() {
    use StatusSink;
    let replica = |id: &str| Replica {
        id: id.into(),
        addr: "10.0.0.1:8443".into(),
    };
    let both = vec![replica("relay-a"), replica("relay-b")];
    let node = (0..)
        .map(|i| format!("edge-{i}"))
        .find(|n| writer_of(n, &both).unwrap().id == "relay-b")
        .unwrap();
    let api = Arc::default();
    let sink = || {
        Arc::new(CachingSink {
            api: Arc::clone(&api),
            last: Default::default(),
        })
    };
    let (tx, rx) = watch::channel(vec![replica("relay-a")]);
    let a = DesignatedStatus::new(sink(), "relay-a", rx.clone());
    let b = DesignatedStatus::new(sink(), "relay-b", rx);
    let info = SessionInfo {
        transport: "quic",
        relay_id: "relay-b".into(),
        since: std::time::SystemTime::now(),
        remote: "198.18.0.1:4000".parse().unwrap(),
        ambiguous: vec![],
        refused: vec![],
        refused_ranges: vec![],
        not_captured: vec![],
        capture_failing: None,
    };
    let says = || api.lock().unwrap().get(&node).cloned().unwrap_or_default();
    a.down(&node, "X");
    assert_eq!(says(), "False: X");
    tx.send_replace(both);
    a.down(&node, "X");
    b.up(&node, &info);
    assert_eq!(says(), "True");
    tx.send_replace(vec![replica("relay-a")]);
    b.down(&node, "X");
    a.down(&node, "X");
    assert_eq!(says(), "False: X", "A trusted what it last wrote");
}
