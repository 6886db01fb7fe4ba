//! `coordination.k8s.io/v1` Leases, as relay replicas use them for
//! membership: get, create, update (PUT, optimistic concurrency on
//! `metadata.resourceVersion`), delete (with `preconditions`), list and
//! watch, namespaced.
//!
//! What the apiserver does and this keeps: a create of an existing name is
//! 409 `AlreadyExists`; an update carrying a stale resourceVersion is 409
//! `Conflict` ("the object has been modified"); an update of a missing
//! Lease is 404 (Leases do not create on update); a delete whose
//! precondition (resourceVersion or uid) does not match is 409 `Conflict`.
//! What it leaves out: label and field selectors, and watches are not
//! filtered by namespace (tests use one).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::{json, Value};

use crate::request::RequestAttributes;
use crate::{
    failure, json_response, list_item, parse_body, stamp, Body, Res, Shared, Signal, State,
};

const GROUP_RESOURCE: &str = "leases.coordination.k8s.io";

/// Serves a request on `leases`.
pub(crate) fn handle(
    shared: &Arc<Shared>,
    a: &RequestAttributes,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Response<Body> {
    let ns = a.namespace.clone().unwrap_or_default();
    let name = a.name.clone().unwrap_or_default();
    match a.verb.as_str() {
        "watch" => crate::watch(shared, q, Res::Leases),
        "list" => {
            let st = shared.lock();
            let items: Vec<Value> = st
                .leases
                .iter()
                .filter(|((n, _), _)| ns.is_empty() || *n == ns)
                .map(|(_, l)| list_item(l))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        "get" => match shared.lock().leases.get(&(ns, name.clone())) {
            Some(l) => json_response(StatusCode::OK, &to_value(l)),
            None => not_found(&name),
        },
        "create" => {
            let mut lease = match parse(body) {
                Ok(l) => l,
                Err(r) => return *r,
            };
            let Some(name) = lease.metadata.name.clone().filter(|n| !n.is_empty()) else {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                );
            };
            lease.metadata.namespace = Some(ns.clone());
            let mut st = shared.lock();
            let key = (ns, name.clone());
            if st.leases.contains_key(&key) {
                return failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{GROUP_RESOURCE} \"{name}\" already exists"),
                );
            }
            let rv = st.bump();
            let kind = stamp(&mut lease.metadata, None, rv);
            store(shared, &mut st, key, lease.clone(), kind);
            json_response(StatusCode::CREATED, &to_value(&lease))
        }
        "update" => {
            let mut lease = match parse(body) {
                Ok(l) => l,
                Err(r) => return *r,
            };
            if lease.metadata.name.as_deref() != Some(name.as_str()) {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            lease.metadata.namespace = Some(ns.clone());
            let mut st = shared.lock();
            let key = (ns, name.clone());
            let Some(old) = st.leases.get(&key).cloned() else {
                return not_found(&name);
            };
            // An update naming a resourceVersion must name the current one:
            // this is how two writers of one Lease find out about each other.
            if let Some(rv) = &lease.metadata.resource_version {
                if old.metadata.resource_version.as_ref() != Some(rv) {
                    return modified(&name);
                }
            }
            let rv = st.bump();
            let kind = stamp(&mut lease.metadata, Some(&old.metadata), rv);
            store(shared, &mut st, key, lease.clone(), kind);
            json_response(StatusCode::OK, &to_value(&lease))
        }
        "delete" => {
            let pre: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let mut st = shared.lock();
            let key = (ns, name.clone());
            let Some(old) = st.leases.get(&key).cloned() else {
                return not_found(&name);
            };
            let want = |field: &str| pre.pointer(&format!("/preconditions/{field}"));
            if let Some(rv) = want("resourceVersion").and_then(Value::as_str) {
                if old.metadata.resource_version.as_deref() != Some(rv) {
                    return failure(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {GROUP_RESOURCE} \"{name}\": \
                             Precondition failed: ResourceVersion in precondition: {rv}, \
                             ResourceVersion in object meta: {}",
                            old.metadata.resource_version.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
            if let Some(uid) = want("uid").and_then(Value::as_str) {
                if old.metadata.uid.as_deref() != Some(uid) {
                    return failure(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {GROUP_RESOURCE} \"{name}\": \
                             Precondition failed: UID in precondition: {uid}"
                        ),
                    );
                }
            }
            st.leases.remove(&key);
            let rv = st.bump();
            let mut gone = old;
            gone.metadata.resource_version = Some(rv.to_string());
            let (_, line) = st.record_obj(Res::Leases, "DELETED", &gone);
            let _ = shared
                .watch_tx
                .send(Arc::new(Signal::Event(Res::Leases, line)));
            json_response(StatusCode::OK, &to_value(&gone))
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not implemented by the stand-in",
        ),
    }
}

/// Stores a Lease and publishes the watch event `kind`.
pub(crate) fn store(
    shared: &Shared,
    st: &mut State,
    key: (String, String),
    lease: Lease,
    kind: &str,
) {
    let (_, line) = st.record_obj(Res::Leases, kind, &lease);
    st.leases.insert(key, lease);
    let _ = shared
        .watch_tx
        .send(Arc::new(Signal::Event(Res::Leases, line)));
}

fn parse(body: &Bytes) -> Result<Lease, Box<Response<Body>>> {
    parse_body(body, "lease")
}

fn to_value(l: &Lease) -> Value {
    serde_json::to_value(l).unwrap_or(Value::Null)
}

fn not_found(name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{GROUP_RESOURCE} \"{name}\" not found"),
    )
}

fn modified(name: &str) -> Response<Body> {
    failure(
        StatusCode::CONFLICT,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {GROUP_RESOURCE} \"{name}\": the object has been \
             modified; please apply your changes to the latest version and try again"
        ),
    )
}
