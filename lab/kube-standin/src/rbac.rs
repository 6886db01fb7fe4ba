//! RBAC enforcement in the stand-in: ClusterRole and Role rules read from
//! the deploy manifests (`deploy/kubernetes/base/rbac.yaml`), matched
//! against each request's [`RequestAttributes`] the way kube-apiserver's RBAC authorizer
//! matches resource requests (API group, `resource[/subresource]`, verb,
//! `resourceNames`; `*` wildcards), so a test can prove that the manifests
//! grant what the code needs and nothing it does not.
//!
//! Only resource rules: a rule with `nonResourceURLs` allows nothing here,
//! and a non-resource request (`/version`) is denied when RBAC is on (the
//! relay makes none). Aggregation and role bindings are out of scope: the
//! caller picks the ClusterRoles ([`cluster_role_rules`]) and Roles
//! ([`role_rules`], whose rules match only in the Role's namespace), as if
//! bound to the client's account.

use serde::Deserialize;
use serde_json::Value;

use crate::request::RequestAttributes;

/// One `rules[]` entry of a ClusterRole (resource rules only).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// `apiGroups`: `""` is the core group, `*` any.
    #[serde(default)]
    pub api_groups: Vec<String>,
    /// `resources`: `nodes`, `nodes/status`, `*`, `*/status`.
    #[serde(default)]
    pub resources: Vec<String>,
    /// `verbs`: `get`, `list`, `watch`, `create`, `patch`, ..., `*`.
    #[serde(default)]
    pub verbs: Vec<String>,
    /// `resourceNames`: empty means any name.
    #[serde(default)]
    pub resource_names: Vec<String>,
    /// `nonResourceURLs`: never matched by a resource request.
    #[serde(default, rename = "nonResourceURLs")]
    pub non_resource_urls: Vec<String>,
    /// A Role's rule (its namespace: only requests there match); `None`
    /// for a ClusterRole's (any namespace and the cluster scope).
    #[serde(skip)]
    pub namespace: Option<String>,
}

impl PolicyRule {
    /// Whether this rule allows the request (kube-apiserver's
    /// `RuleAllows` for resource requests).
    pub fn allows(&self, a: &RequestAttributes) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let combined = match &a.subresource {
            Some(s) => format!("{}/{}", a.resource, s),
            None => a.resource.clone(),
        };
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || a.subresource
                    .as_ref()
                    .is_some_and(|s| *r == format!("*/{s}"))
        });
        let name_ok = self.resource_names.is_empty()
            || a.name
                .as_ref()
                .is_some_and(|n| self.resource_names.contains(n));
        let namespace_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| a.namespace.as_ref() == Some(ns));
        any(&self.verbs, &a.verb)
            && any(&self.api_groups, &a.group)
            && resource_ok
            && name_ok
            && namespace_ok
    }

    /// `group resource verbs`, e.g. `"" nodes/status [get, patch]`, for
    /// messages; a Role's rule ends with its namespace.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self.api_groups.iter().map(|g| format!("{g:?}")).collect();
        format!(
            "apiGroups [{}] resources [{}] verbs [{}]{}{}",
            groups.join(", "),
            self.resources.join(", "),
            self.verbs.join(", "),
            if self.resource_names.is_empty() {
                String::new()
            } else {
                format!(" resourceNames [{}]", self.resource_names.join(", "))
            },
            match &self.namespace {
                Some(ns) => format!(" in namespace {ns}"),
                None => String::new(),
            }
        )
    }
}

/// Whether any rule allows the request; non-resource requests never are.
pub fn allowed(rules: &[PolicyRule], attrs: Option<&RequestAttributes>) -> bool {
    attrs.is_some_and(|a| rules.iter().any(|r| r.allows(a)))
}

/// The apiserver's 403 message for a denied resource request.
pub fn forbidden_message(user: &str, a: &RequestAttributes) -> String {
    let combined = match &a.subresource {
        Some(s) => format!("{}/{}", a.resource, s),
        None => a.resource.clone(),
    };
    let object = match &a.name {
        Some(n) => format!("{} {:?}", a.resource, n),
        None => a.resource.clone(),
    };
    let scope = match &a.namespace {
        Some(ns) => format!("in the namespace {ns:?}"),
        None => "at the cluster scope".to_string(),
    };
    format!(
        "{object} is forbidden: User {user:?} cannot {} resource {combined:?} in API group {:?} {scope}",
        a.verb, a.group
    )
}

/// Errors reading rules from manifests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RbacError {
    /// The text is not YAML, or a rule has the wrong shape.
    #[error("rbac manifests: {0}")]
    Yaml(String),
    /// No ClusterRole of that name in the text.
    #[error("rbac manifests: no ClusterRole {0:?}")]
    NoRole(String),
}

/// The rules of ClusterRole `name` in a (multi-document) YAML manifest,
/// e.g. the text of `deploy/kubernetes/base/rbac.yaml`.
pub fn cluster_role_rules(yaml: &str, name: &str) -> Result<Vec<PolicyRule>, RbacError> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).map_err(|e| RbacError::Yaml(e.to_string()))?;
        if v.get("kind").and_then(Value::as_str) == Some("ClusterRole")
            && v.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
        {
            let rules = v.get("rules").cloned().unwrap_or(Value::Array(Vec::new()));
            return serde_json::from_value(rules).map_err(|e| RbacError::Yaml(e.to_string()));
        }
    }
    Err(RbacError::NoRole(name.to_string()))
}

/// The rules of Role `name` in a (multi-document) YAML manifest, each
/// limited to the Role's namespace (as if bound to the client's account
/// with a RoleBinding there).
pub fn role_rules(yaml: &str, name: &str) -> Result<Vec<PolicyRule>, RbacError> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).map_err(|e| RbacError::Yaml(e.to_string()))?;
        if v.get("kind").and_then(Value::as_str) == Some("Role")
            && v.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
        {
            let ns = v
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .ok_or_else(|| RbacError::Yaml(format!("Role {name:?} has no namespace")))?;
            let rules = v.get("rules").cloned().unwrap_or(Value::Array(Vec::new()));
            let mut rules: Vec<PolicyRule> =
                serde_json::from_value(rules).map_err(|e| RbacError::Yaml(e.to_string()))?;
            for r in &mut rules {
                r.namespace = Some(ns.to_string());
            }
            return Ok(rules);
        }
    }
    Err(RbacError::NoRole(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::classify;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]) -> PolicyRule {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        PolicyRule {
            api_groups: s(groups),
            resources: s(resources),
            verbs: s(verbs),
            resource_names: s(names),
            non_resource_urls: Vec::new(),
            namespace: None,
        }
    }

    #[test]
    fn matches_like_the_rbac_authorizer() {
        let status_patch = classify("PATCH", "/api/v1/nodes/edge-1/status", None).unwrap();
        let node_get = classify("GET", "/api/v1/nodes/edge-1", None).unwrap();
        let list = classify("GET", "/api/v1/nodes", None).unwrap();
        // A subresource needs its own entry: "nodes" does not cover "nodes/status".
        let nodes = rule(&[""], &["nodes"], &["*"], &[]);
        assert!(nodes.allows(&node_get) && nodes.allows(&list));
        assert!(!nodes.allows(&status_patch));
        assert!(rule(&[""], &["nodes/status"], &["patch"], &[]).allows(&status_patch));
        assert!(rule(&[""], &["*/status"], &["patch"], &[]).allows(&status_patch));
        assert!(rule(&["*"], &["*"], &["*"], &[]).allows(&status_patch));
        // Group and verb must both match.
        assert!(
            !rule(&["events.k8s.io"], &["nodes/status"], &["patch"], &[]).allows(&status_patch)
        );
        assert!(!rule(&[""], &["nodes/status"], &["get"], &[]).allows(&status_patch));
        // resourceNames: only named requests can match.
        assert!(rule(&[""], &["nodes"], &["get"], &["edge-1"]).allows(&node_get));
        assert!(!rule(&[""], &["nodes"], &["get"], &["edge-2"]).allows(&node_get));
        assert!(!rule(&[""], &["nodes"], &["list"], &["edge-1"]).allows(&list));
        // Non-resource requests are never allowed by resource rules.
        assert!(!allowed(&[rule(&["*"], &["*"], &["*"], &[])], None));
    }

    #[test]
    fn a_roles_rules_match_only_in_its_namespace() {
        let yaml = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: r, namespace: edge-relay}\n\
                    rules:\n- apiGroups: [coordination.k8s.io]\n  resources: [leases]\n  verbs: [get]\n";
        let rules = role_rules(yaml, "r").unwrap();
        let path = |ns: &str| format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/a");
        let here = classify("GET", &path("edge-relay"), None).unwrap();
        let there = classify("GET", &path("kube-system"), None).unwrap();
        assert!(allowed(&rules, Some(&here)));
        assert!(!allowed(&rules, Some(&there)));
        assert!(matches!(
            cluster_role_rules(yaml, "r"),
            Err(RbacError::NoRole(_))
        ));
    }

    #[test]
    fn reads_a_cluster_role_from_multi_document_yaml() {
        let yaml = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n---\n\
                    # comment\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n\
                    metadata:\n  name: r\nrules:\n- apiGroups: [\"\"]\n  resources: [\"nodes\"]\n  verbs: [\"list\", \"watch\"]\n";
        let rules = cluster_role_rules(yaml, "r").unwrap();
        assert_eq!(
            rules,
            vec![rule(&[""], &["nodes"], &["list", "watch"], &[])]
        );
        assert!(matches!(
            cluster_role_rules(yaml, "other"),
            Err(RbacError::NoRole(_))
        ));
    }
}
