//! The stand-in's objects and replies: response builders, the state's
//! bookkeeping (resourceVersions, history, watchers), and the objects
//! tests build (a kubelet's Node, a DaemonSet's Pod).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub(crate) fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `Status` object as the apiserver returns for failures.
pub(crate) fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub(crate) fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

/// A request body as JSON (kube sends JSON, which is YAML; that is all the
/// stand-in parses), or the 400 `BadRequest` the apiserver answers,
/// naming `what`.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, Box<Response<Body>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("{what}: {e}"),
        ))
    })
}

pub(crate) fn now_time() -> Time {
    // jiff's `Timestamp::now` needs its std feature, which k8s-openapi
    // does not turn on by itself.
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    let nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    Time(Timestamp::new(secs, nanos).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Serialises an object the way list items come back: without kind/apiVersion.
pub(crate) fn list_item(node: &impl serde::Serialize) -> Value {
    let mut v = serde_json::to_value(node).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    v
}

pub(crate) fn managed_entry(
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
    fields: Value,
) -> ManagedFieldsEntry {
    ManagedFieldsEntry {
        api_version: Some("v1".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(fields)),
        manager: Some(manager.into()),
        operation: Some(operation.into()),
        subresource: subresource.map(str::to_string),
        time: Some(now_time()),
    }
}

impl State {
    pub(crate) fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a watch event and returns the line to broadcast.
    pub(crate) fn record(&mut self, kind: &str, node: &Node) -> (u64, Bytes) {
        self.record_obj(Res::Nodes, kind, node)
    }

    /// Records a watch event of any collection.
    pub(crate) fn record_obj(
        &mut self,
        res: Res,
        kind: &str,
        obj: &impl serde::Serialize,
    ) -> (u64, Bytes) {
        let rv = self.rv;
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
        self.history.push((rv, res, line.clone()));
        if self.history.len() > HISTORY {
            let drop = self.history.len() - HISTORY;
            self.history.drain(..drop);
            self.oldest_rv = self.history.first().map_or(self.rv, |(rv, _, _)| rv - 1);
        }
        (rv, line)
    }

    /// Rebuilds a node's managedFields from the condition owners (one Apply
    /// entry per manager on the status subresource) plus the kubelet's
    /// Update entry for the object itself.
    pub(crate) fn refresh_managed_fields(&mut self, name: &str) {
        let owners = self.owners.get(name).cloned().unwrap_or_default();
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        let mut by_manager: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for (t, m) in owners {
            by_manager.entry(m).or_default().insert(
                format!("k:{{\"type\":\"{t}\"}}"),
                json!({".": {}, "f:type": {}, "f:status": {}, "f:reason": {}, "f:message": {},
                       "f:lastTransitionTime": {}}),
            );
        }
        let mut entries = vec![managed_entry(
            "kubelet",
            "Update",
            None,
            json!({"f:metadata": {"f:labels": {".": {}}}, "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {}}}),
        )];
        for (m, conds) in by_manager {
            entries.push(managed_entry(
                &m,
                "Apply",
                Some("status"),
                json!({"f:status": {"f:conditions": Value::Object(conds)}}),
            ));
        }
        node.metadata.managed_fields = Some(entries);
    }
}

/// A pod of DaemonSet `daemonset` as the controller creates it: running on
/// `node` under service account `service_account`, with uid `uid`.
pub fn daemonset_pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    daemonset: &str,
) -> Pod {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "DaemonSet".into(),
                name: daemonset.into(),
                uid: format!("uid-ds-{daemonset}"),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(service_account.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `(namespace, name)` of an object; an empty namespace becomes `default`.
pub(crate) fn object_key(meta: &mut ObjectMeta) -> (String, String) {
    let ns = meta
        .namespace
        .get_or_insert_with(|| "default".to_string())
        .clone();
    (ns, meta.name.clone().unwrap_or_default())
}

/// Sets uid, creation time and resourceVersion as the apiserver does
/// (kept from `old` on replacement); returns the watch event type.
pub(crate) fn stamp(meta: &mut ObjectMeta, old: Option<&ObjectMeta>, rv: u64) -> &'static str {
    meta.resource_version = Some(rv.to_string());
    match old {
        Some(o) => {
            meta.uid = o.uid.clone();
            meta.creation_timestamp = o.creation_timestamp.clone();
            "MODIFIED"
        }
        None => {
            meta.uid = Some(format!(
                "uid-{}-{}-{rv}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            ));
            meta.creation_timestamp = Some(now_time());
            "ADDED"
        }
    }
}

/// A Node as a kubelet registers it: pod CIDRs in `spec.podCIDRs` (and the
/// first in the legacy `spec.podCIDR`), `addresses` as `(type, address)`
/// pairs (`InternalIP`, `ExternalIP`, `Hostname`), and the
/// `kubernetes.io/hostname` label.
pub fn kubelet_node(name: &str, pod_cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|s| s.to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: t.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}
