//! Classifying a request the way kube-apiserver's request-info resolver
//! does: (API group, version, resource, subresource, namespace, name, verb).
//!
//! One function, [`classify`], so that routing in the stand-in and a later
//! RBAC check against the deploy manifests see the same attributes.

use std::collections::BTreeMap;

/// The authorization attributes of one request, as RBAC sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAttributes {
    /// API group: `""` for the core group (`/api/v1`).
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Resource, plural lower case (`nodes`, `events`, `tokenreviews`).
    pub resource: String,
    /// Subresource (`status`), if any.
    pub subresource: Option<String>,
    /// Namespace for namespaced paths.
    pub namespace: Option<String>,
    /// Object name, if the path names one.
    pub name: Option<String>,
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
}

/// Parses a query string into a map (last value wins; no percent-decoding
/// beyond what the kube client sends for our parameters).
pub fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.replace("%3A", ":").replace("%2F", "/")),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

/// Classifies a resource request; `None` for non-resource paths (`/version`,
/// `/healthz`) or paths that are not API paths at all.
pub fn classify(method: &str, path: &str, query: Option<&str>) -> Option<RequestAttributes> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => (String::new(), (*version).to_string(), rest),
        ["apis", group, version, rest @ ..] => ((*group).to_string(), (*version).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => ((*resource).to_string(), None, None),
        [resource, name] => ((*resource).to_string(), Some((*name).to_string()), None),
        [resource, name, sub] => (
            (*resource).to_string(),
            Some((*name).to_string()),
            Some((*sub).to_string()),
        ),
        _ => return None,
    };
    let watch = parse_query(query)
        .get("watch")
        .is_some_and(|v| v == "true" || v == "1");
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(RequestAttributes {
        group,
        version,
        resource,
        subresource,
        namespace,
        name,
        verb: verb.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_calls_relay_kube_makes() {
        let a = classify("GET", "/api/v1/nodes", Some("watch=true&resourceVersion=5")).unwrap();
        assert_eq!(
            (a.group.as_str(), a.resource.as_str(), a.verb.as_str()),
            ("", "nodes", "watch")
        );
        let a = classify("GET", "/api/v1/nodes", Some("limit=500")).unwrap();
        assert_eq!(a.verb, "list");
        let a = classify("PATCH", "/api/v1/nodes/edge-1/status", None).unwrap();
        assert_eq!(a.name.as_deref(), Some("edge-1"));
        assert_eq!(a.subresource.as_deref(), Some("status"));
        assert_eq!(a.verb, "patch");
        let a = classify(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            None,
        )
        .unwrap();
        assert_eq!(a.group, "events.k8s.io");
        assert_eq!(a.namespace.as_deref(), Some("default"));
        assert_eq!(a.verb, "create");
        let a = classify("POST", "/apis/authentication.k8s.io/v1/tokenreviews", None).unwrap();
        assert_eq!(
            (a.resource.as_str(), a.verb.as_str()),
            ("tokenreviews", "create")
        );
        assert!(classify("GET", "/version", None).is_none());
    }
}
