//! What the stand-in writes on request: server-side apply of Node
//! conditions, merge patches, Events, TokenReviews.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) fn apply_status(
    shared: &Shared,
    st: &mut State,
    name: &str,
    manager: &str,
    conditions: Vec<NodeCondition>,
    force: bool,
) -> Result<bool, Conflict> {
    let State { nodes, owners, .. } = st;
    let Some(node) = nodes.get_mut(name) else {
        return Ok(false);
    };
    let owners = owners.entry(name.to_string()).or_default();
    let status = node.status.get_or_insert_with(Default::default);
    let list = status.conditions.get_or_insert_with(Vec::new);
    let changed = apply_conditions(list, owners, manager, conditions, force)?;
    if changed {
        st.refresh_managed_fields(name);
        let rv = st.bump();
        if let Some(n) = st.nodes.get_mut(name) {
            n.metadata.resource_version = Some(rv.to_string());
        }
        if let Some(node) = st.nodes.get(name).cloned() {
            let (_, line) = st.record("MODIFIED", &node);
            let _ = shared
                .watch_tx
                .send(Arc::new(Signal::Event(Res::Nodes, line)));
        }
    }
    Ok(changed)
}

pub(crate) fn apply_node_status(
    shared: &Shared,
    name: &str,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Response<Body> {
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "PATCH with apply requires fieldManager",
        );
    };
    let force = q.get("force").is_some_and(|v| v == "true");
    // kube sends JSON, which is YAML; that is all the stand-in parses.
    let patch: Value = match parse_body(body, "apply patch") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if patch.get("apiVersion") != Some(&json!("v1")) || patch.get("kind") != Some(&json!("Node")) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "apply patch needs apiVersion v1 and kind Node",
        );
    }
    let conditions: Vec<NodeCondition> = match patch
        .pointer("/status/conditions")
        .cloned()
        .map(serde_json::from_value)
        .unwrap_or(Ok(Vec::new()))
    {
        Ok(c) => c,
        Err(e) => {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!("conditions: {e}"),
            )
        }
    };
    let mut st = shared.lock();
    if !st.nodes.contains_key(name) {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        );
    }
    match apply_status(shared, &mut st, name, manager, conditions, force) {
        Ok(_) => {
            let node = st.nodes.get(name).map(|n| serde_json::to_value(n).unwrap_or(Value::Null));
            json_response(StatusCode::OK, &node.unwrap_or(Value::Null))
        }
        Err(c) => failure(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("Apply failed with 1 conflict: conflict with \"{}\": .status.conditions[type=\"{}\"]", c.owner, c.type_),
        ),
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(_)) => {
            *target = json!({});
            merge_patch(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

/// Longest `note` and `action` the apiserver's events.k8s.io/v1 validation
/// accepts, in bytes (`NoteLengthLimit`, and its action limit).
const NOTE_LIMIT: usize = 1024;
const ACTION_LIMIT: usize = 128;

/// The apiserver's length checks of an Event (create and update): a note
/// over 1024 bytes or an action over 128 is refused with 422 `Invalid`.
fn valid_event(ev: &Value) -> Result<(), Box<Response<Body>>> {
    for (field, limit) in [("note", NOTE_LIMIT), ("action", ACTION_LIMIT)] {
        let len = ev.get(field).and_then(Value::as_str).map_or(0, str::len);
        if len > limit {
            let message =
                format!("{field}: Invalid value: \"\": can have at most {limit} characters");
            return Err(Box::new(failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &message,
            )));
        }
    }
    Ok(())
}

pub(crate) fn events(
    shared: &Shared,
    a: &RequestAttributes,
    verb: &str,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let ns = a.namespace.clone().unwrap_or_default();
    let mut st = shared.lock();
    match verb {
        "create" => {
            let mut ev: Value = match parse_body(body, "event") {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let Some(name) = ev
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                );
            };
            // The apiserver's validation of events.k8s.io/v1 Events.
            for field in [
                "eventTime",
                "reportingController",
                "reportingInstance",
                "action",
                "reason",
            ] {
                if ev.get(field).is_none_or(|v| v.is_null() || v == "") {
                    let message = format!("{field}: Required value");
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                }
            }
            if let Err(r) = valid_event(&ev) {
                return *r;
            }
            if st.events.contains_key(&(ns.clone(), name.clone())) {
                return failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("events.events.k8s.io \"{name}\" already exists"),
                );
            }
            let rv = st.bump();
            if let Some(m) = ev.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("namespace".into(), json!(ns));
                m.insert("resourceVersion".into(), json!(rv.to_string()));
                m.insert("uid".into(), json!(format!("uid-event-{rv}")));
            }
            st.events.insert((ns, name), ev.clone());
            json_response(StatusCode::CREATED, &ev)
        }
        "patch" => {
            if content_type != Some("application/merge-patch+json") {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "merge patch only",
                );
            }
            let name = a.name.clone().unwrap_or_default();
            let patch: Value = match parse_body(body, "patch") {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let rv = st.bump();
            let Some(ev) = st.events.get_mut(&(ns, name.clone())) else {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("events.events.k8s.io \"{name}\" not found"),
                );
            };
            let mut patched = ev.clone();
            merge_patch(&mut patched, &patch);
            // An update is validated as a create is.
            if let Err(r) = valid_event(&patched) {
                return *r;
            }
            *ev = patched;
            if let Some(m) = ev.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("resourceVersion".into(), json!(rv.to_string()));
            }
            json_response(StatusCode::OK, ev)
        }
        "list" => {
            let items: Vec<Value> = st
                .events
                .iter()
                .filter(|((n, _), _)| *n == ns)
                .map(|(_, v)| v.clone())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "EventList", "apiVersion": "events.k8s.io/v1",
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not implemented by the stand-in",
        ),
    }
}

pub(crate) fn token_review(shared: &Shared, body: &Bytes) -> Response<Body> {
    let review: Value = match parse_body(body, "tokenreview") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let wanted: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let st = shared.lock();
    let status = match st.tokens.get(token) {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: compact JWS format must have three parts]"})
        }
        Some(m) if m.expires <= SystemTime::now() => {
            json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
        }
        Some(m) if !wanted.is_empty() && !wanted.contains(&m.audience) => json!({
            "authenticated": false,
            "error": format!("[invalid bearer token, token audiences [\"{}\"] is invalid for the target audiences {:?}]", m.audience, wanted),
        }),
        Some(m) => {
            let extra = json!({
                "authentication.kubernetes.io/credential-id": [format!("JTI={token:.8}")],
                "authentication.kubernetes.io/node-name": [m.node],
                "authentication.kubernetes.io/node-uid": [format!("uid-{}", m.node)],
                "authentication.kubernetes.io/pod-name": [m.pod_name],
                "authentication.kubernetes.io/pod-uid": [m.pod_uid],
            });
            let audiences = vec![m.audience.clone()];
            json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {
                    "username": "system:serviceaccount:edge-relay:edge-client",
                    "uid": "uid-sa-edge-client",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:edge-relay", "system:authenticated"],
                    "extra": extra,
                },
            })
        }
    };
    let mut out = review.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("status".into(), status);
        o.insert("metadata".into(), json!({"creationTimestamp": null}));
    }
    json_response(StatusCode::CREATED, &out)
}
