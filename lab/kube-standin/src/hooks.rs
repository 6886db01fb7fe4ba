//! The stand-in's test hooks: what a test turns on to make the apiserver
//! misbehave (RBAC enforcement, 503s, stalled watches, an injected 410
//! Gone) and what it reads back to assert what the client did (the request
//! log, the 403s, open watches, stored Events).
//!
//! Kept apart from the object edits ([`StandIn::upsert_node`] and the
//! rest) because these change how the server answers, not what it holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::{PolicyRule, RequestRecord, Signal, StandIn};

impl StandIn {
    /// Enforces RBAC with these ClusterRole rules from now on (`None`:
    /// everything is allowed, the default). A request no rule allows is
    /// answered 403 with a `Status` of reason `Forbidden`, after
    /// authentication (401 first) and before routing, as kube-apiserver
    /// does; it is logged like any other ([`StandIn::forbidden`]).
    pub fn set_rbac(&self, rules: Option<Vec<PolicyRule>>) {
        self.shared.lock().rbac = rules;
    }

    /// The requests answered 403 so far.
    pub fn forbidden(&self) -> Vec<RequestRecord> {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.status == 403)
            .cloned()
            .collect()
    }

    /// While set, every request answers 503 ServiceUnavailable and open
    /// watches are closed.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
        if unavailable {
            let _ = self.shared.watch_tx.send(Arc::new(Signal::Close));
        }
    }

    /// From now on, waits `read` before answering a get or list and
    /// `write` before answering a create, update, patch or delete (watches
    /// are not delayed). The stand-in answers from memory in microseconds;
    /// a kube-apiserver answers after a round trip and, for a write, after
    /// etcd has committed it (milliseconds), which is what a client that
    /// writes one object at a time is bounded by.
    pub fn set_latency(&self, read: std::time::Duration, write: std::time::Duration) {
        self.shared.lock().latency = (read, write);
    }

    /// While held, open watches deliver nothing (events queue, in order)
    /// while every other request is answered: what a client sees when its
    /// long-lived watch connection sits in TCP retransmission backoff after
    /// a network outage, while its new requests already get through.
    /// Releasing delivers the backlog.
    pub fn hold_watches(&self, held: bool) {
        self.shared.hold.send_replace(held);
    }

    /// Sends an in-stream `ERROR` event with a 410 Gone `Status` on every
    /// open watch and ends them, and forgets the watch history, so the
    /// client must relist.
    pub fn inject_gone(&self) {
        {
            let mut st = self.shared.lock();
            st.history.clear();
            st.oldest_rv = st.rv;
        }
        let _ = self.shared.watch_tx.send(Arc::new(Signal::Gone));
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> u64 {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// How many requests were served so far (without copying the log).
    pub fn request_count(&self) -> usize {
        self.shared.lock().log.len()
    }

    /// The requests from log index `from` on, in order: only the tail is
    /// copied, for callers that poll a long log.
    pub fn requests_from(&self, from: usize) -> Vec<RequestRecord> {
        let st = self.shared.lock();
        st.log.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Stored events.k8s.io/v1 Events (as JSON), ordered by namespace and name.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.values().cloned().collect()
    }
}
