//! Direct edits of what the stand-in holds, as a test (or another writer
//! of the cluster) makes them: Nodes, Services, EndpointSlices, Leases and
//! Pods created, replaced and deleted, with the resourceVersion bumped and
//! the watch event published as a real write through the API would;
//! conditions applied as another field manager; service-account tokens
//! minted for TokenReview.
//!
//! The HTTP write paths the client itself uses are in `writes`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::objects::{now_time, object_key, stamp};
use super::{apply_status, leases, random_token, Conflict, Minted, Res, Signal, StandIn, State};

impl StandIn {
    /// Creates or replaces a Node (ADDED or MODIFIED on watches). Status
    /// conditions owned through server-side apply are kept. Returns the
    /// new resourceVersion.
    pub fn upsert_node(&self, mut node: Node) -> u64 {
        let mut st = self.shared.lock();
        let name = node.metadata.name.clone().unwrap_or_default();
        let rv = st.bump();
        let kind = match st.nodes.get(&name) {
            Some(old) => {
                node.metadata.uid = old.metadata.uid.clone();
                node.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
                let kept = old.status.as_ref().and_then(|s| s.conditions.clone());
                let status = node.status.get_or_insert_with(Default::default);
                match (&mut status.conditions, kept) {
                    (None, kept) => status.conditions = kept,
                    // Merged by type, as a kubelet's status patch is: its
                    // own conditions replace theirs, those another manager
                    // applied stay.
                    (Some(new), Some(kept)) => {
                        let owners = st.owners.get(&name);
                        for c in kept {
                            let applied = owners.is_some_and(|o| o.contains_key(&c.type_));
                            if applied && !new.iter().any(|n| n.type_ == c.type_) {
                                new.push(c);
                            }
                        }
                    }
                    (Some(_), None) => {}
                }
                "MODIFIED"
            }
            None => {
                node.metadata.uid = Some(format!("uid-{name}-{rv}"));
                node.metadata.creation_timestamp = Some(now_time());
                "ADDED"
            }
        };
        node.metadata.resource_version = Some(rv.to_string());
        st.nodes.insert(name.clone(), node);
        st.refresh_managed_fields(&name);
        self.publish(&mut st, kind, &name);
        rv
    }

    /// Deletes a Node (DELETED on watches); false if it did not exist.
    pub fn delete_node(&self, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut node) = st.nodes.remove(name) else {
            return false;
        };
        st.owners.remove(name);
        let rv = st.bump();
        node.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record("DELETED", &node);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Nodes, line)));
        true
    }

    fn publish(&self, st: &mut State, kind: &str, name: &str) {
        if let Some(node) = st.nodes.get(name).cloned() {
            let (_, line) = st.record(kind, &node);
            let _ = self
                .shared
                .watch_tx
                .send(Arc::new(Signal::Event(Res::Nodes, line)));
        }
    }

    /// Creates or replaces a Service (ADDED or MODIFIED on watches);
    /// `metadata.namespace` defaults to `default`. Returns the new
    /// resourceVersion.
    pub fn upsert_service(&self, mut svc: Service) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut svc.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut svc.metadata,
            st.services.get(&key).map(|o| &o.metadata),
            rv,
        );
        st.services.insert(key, svc.clone());
        let (_, line) = st.record_obj(Res::Services, kind, &svc);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Services, line)));
        rv
    }

    /// Deletes a Service (DELETED on watches); false if it did not exist.
    pub fn delete_service(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut svc) = st
            .services
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        let rv = st.bump();
        svc.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record_obj(Res::Services, "DELETED", &svc);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::Services, line)));
        true
    }

    /// Creates or replaces an EndpointSlice (ADDED or MODIFIED on
    /// watches); `metadata.namespace` defaults to `default`. Returns the
    /// new resourceVersion.
    pub fn upsert_endpointslice(&self, mut slice: EndpointSlice) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut slice.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut slice.metadata,
            st.slices.get(&key).map(|o| &o.metadata),
            rv,
        );
        st.slices.insert(key, slice.clone());
        let (_, line) = st.record_obj(Res::EndpointSlices, kind, &slice);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::EndpointSlices, line)));
        rv
    }

    /// Deletes an EndpointSlice (DELETED on watches); false if it did not
    /// exist.
    pub fn delete_endpointslice(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut slice) = st.slices.remove(&(namespace.to_string(), name.to_string())) else {
            return false;
        };
        let rv = st.bump();
        slice.metadata.resource_version = Some(rv.to_string());
        let (_, line) = st.record_obj(Res::EndpointSlices, "DELETED", &slice);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(Res::EndpointSlices, line)));
        true
    }

    /// Creates or replaces a Lease as another writer would (ADDED or
    /// MODIFIED on watches); `metadata.namespace` defaults to `default`.
    /// Returns the new resourceVersion.
    pub fn upsert_lease(&self, mut lease: Lease) -> u64 {
        let mut st = self.shared.lock();
        let key = object_key(&mut lease.metadata);
        let rv = st.bump();
        let kind = stamp(
            &mut lease.metadata,
            st.leases.get(&key).map(|o| &o.metadata),
            rv,
        );
        leases::store(&self.shared, &mut st, key, lease, kind);
        rv
    }

    /// The stored Leases of `namespace`, by name.
    pub fn leases(&self, namespace: &str) -> BTreeMap<String, Lease> {
        self.shared
            .lock()
            .leases
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, n), l)| (n.clone(), l.clone()))
            .collect()
    }

    /// Number of stored (Services, EndpointSlices).
    pub fn service_counts(&self) -> (usize, usize) {
        let st = self.shared.lock();
        (st.services.len(), st.slices.len())
    }

    /// The stored Node.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.shared.lock().nodes.get(name).cloned()
    }

    /// The field manager owning condition `type_` on `node`.
    pub fn condition_owner(&self, node: &str, type_: &str) -> Option<String> {
        self.shared
            .lock()
            .owners
            .get(node)
            .and_then(|o| o.get(type_).cloned())
    }

    /// Applies conditions as `manager` (e.g. the kubelet's `Ready`), the
    /// same merge the HTTP apply path uses.
    pub fn apply_conditions_as(
        &self,
        node: &str,
        manager: &str,
        conditions: Vec<NodeCondition>,
    ) -> Result<bool, Conflict> {
        let mut st = self.shared.lock();
        apply_status(&self.shared, &mut st, node, manager, conditions, true)
    }

    /// Mints a service-account token bound to a node and pod, valid for
    /// `audience` until `expires` (TokenReview answers from these).
    pub fn mint_token(
        &self,
        node: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        expires: SystemTime,
    ) -> String {
        let token = random_token();
        self.shared.lock().tokens.insert(
            token.clone(),
            Minted {
                node: node.into(),
                pod_name: pod_name.into(),
                pod_uid: pod_uid.into(),
                audience: audience.into(),
                expires,
            },
        );
        token
    }

    /// Creates or replaces a Pod (served on GET by namespace and name).
    pub fn upsert_pod(&self, mut pod: Pod) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        pod.metadata.resource_version = Some(rv.to_string());
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        st.pods.insert(key, pod);
    }

    /// Deletes a Pod; false if it did not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        st.pods
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
    }
}
