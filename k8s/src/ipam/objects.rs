//! The IPAM objects themselves: what a Calico `BlockAffinity` or a
//! `CiliumNode` gives (a node's pod prefixes), read from the API's
//! untyped objects, and what in them could not be used.

use kube::api::DynamicObject;
use relay_protocol::{Cidr, CidrError};
use serde_json::Value;

use super::IpamKind;

/// What one IPAM object gives: prefixes of one node's pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpamEntry {
    /// The Node the prefixes are for.
    pub node: String,
    /// The prefixes, parsed.
    pub prefixes: Vec<Cidr>,
}

/// An entry of an IPAM object that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpamIssue {
    /// A CIDR that does not parse (or has host bits set, or no length).
    #[error("{kind} {object}: CIDR {value:?} skipped: {error}")]
    BadCidr {
        /// Which resource.
        kind: IpamKind,
        /// The object's name.
        object: String,
        /// The entry as written.
        value: String,
        /// Why it does not parse.
        error: CidrError,
    },
    /// A usable object that names no node.
    #[error("{kind} {object}: skipped: names no node")]
    NoNode {
        /// Which resource.
        kind: IpamKind,
        /// The object's name.
        object: String,
    },
}

/// A prefix as IPAM writes it: `addr/len`, no host bits.
fn prefix(value: &str) -> Result<Cidr, CidrError> {
    let c = value.trim().parse::<Cidr>()?;
    if value.contains('/') {
        Ok(c)
    } else {
        Err(CidrError::Length(value.to_string()))
    }
}

fn being_deleted(obj: &DynamicObject) -> bool {
    obj.metadata.deletion_timestamp.is_some()
}

/// A Calico `BlockAffinity`'s block, when it is the node's to use:
/// `spec.state` `confirmed` and `spec.deleted` not true (Calico writes the
/// string `"true"`; a boolean is taken too). Pending, releasing and
/// deleted affinities give nothing and are no issue.
pub fn block_affinity(obj: &DynamicObject) -> (Option<IpamEntry>, Vec<IpamIssue>) {
    let kind = IpamKind::CalicoBlockAffinity;
    let object = obj.metadata.name.clone().unwrap_or_default();
    let spec = obj.data.get("spec").unwrap_or(&Value::Null);
    let text = |k: &str| spec.get(k).and_then(Value::as_str).unwrap_or_default();
    let deleted = match spec.get("deleted") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    };
    if text("state") != "confirmed" || deleted || being_deleted(obj) {
        return (None, Vec::new());
    }
    let node = text("node").trim().to_string();
    if node.is_empty() {
        return (None, vec![IpamIssue::NoNode { kind, object }]);
    }
    let value = text("cidr");
    match prefix(value) {
        Ok(c) => (
            Some(IpamEntry {
                node,
                prefixes: vec![c],
            }),
            Vec::new(),
        ),
        Err(error) => (
            None,
            vec![IpamIssue::BadCidr {
                kind,
                object,
                value: value.to_string(),
                error,
            }],
        ),
    }
}

/// A `CiliumNode`'s `spec.ipam.podCIDRs`, for the Node of the same name;
/// bad entries are skipped and reported.
pub fn cilium_node(obj: &DynamicObject) -> (Option<IpamEntry>, Vec<IpamIssue>) {
    let kind = IpamKind::CiliumNode;
    let object = obj.metadata.name.clone().unwrap_or_default();
    if being_deleted(obj) || object.is_empty() {
        return (None, Vec::new());
    }
    let cidrs = obj
        .data
        .pointer("/spec/ipam/podCIDRs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut issues = Vec::new();
    let mut prefixes = Vec::new();
    for v in cidrs {
        let value = match &v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match prefix(&value) {
            Ok(c) if !prefixes.contains(&c) => prefixes.push(c),
            Ok(_) => {}
            Err(error) => issues.push(IpamIssue::BadCidr {
                kind,
                object: object.clone(),
                value,
                error,
            }),
        }
    }
    let entry = (!prefixes.is_empty()).then_some(IpamEntry {
        node: object,
        prefixes,
    });
    (entry, issues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn affinity(name: &str, node: &str, cidr: &str, state: &str, deleted: Value) -> DynamicObject {
        obj(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
            "metadata": {"name": name},
            "spec": {"node": node, "cidr": cidr, "state": state, "deleted": deleted},
        }))
    }

    #[test]
    fn only_confirmed_undeleted_affinities_give_their_block() {
        let (e, issues) = block_affinity(&affinity(
            "edge-1-10-70-1-0-26",
            "edge-1",
            "10.70.1.0/26",
            "confirmed",
            json!("false"),
        ));
        assert!(issues.is_empty());
        let e = e.unwrap();
        assert_eq!(e.node, "edge-1");
        assert_eq!(e.prefixes, ["10.70.1.0/26".parse::<Cidr>().unwrap()]);
        for (state, deleted) in [
            ("pending", json!("false")),
            ("pendingDeletion", json!("false")),
            ("", json!("false")),
            ("confirmed", json!("true")),
            ("confirmed", json!(true)),
            ("confirmed", json!("True")),
        ] {
            let (e, issues) = block_affinity(&affinity(
                "a",
                "edge-1",
                "10.70.1.0/26",
                state,
                deleted.clone(),
            ));
            assert_eq!((e, issues), (None, vec![]), "{state} {deleted}");
        }
        // No `deleted` at all (older objects): usable.
        let mut a = affinity("a", "edge-1", "fd00:70::/122", "confirmed", Value::Null);
        a.data["spec"].as_object_mut().unwrap().remove("deleted");
        assert_eq!(
            block_affinity(&a).0.unwrap().prefixes[0].to_string(),
            "fd00:70::/122"
        );
        // Being deleted (a finalizer holds it): nothing.
        let mut a = affinity("a", "edge-1", "10.70.1.0/26", "confirmed", json!("false"));
        a.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(block_affinity(&a).0, None);
    }

    #[test]
    fn bad_blocks_and_nameless_nodes_are_reported() {
        for bad in ["10.70.1.1/26", "banana", "10.70.1.0", "10.70.1.0/33", ""] {
            let (e, issues) =
                block_affinity(&affinity("a", "edge-1", bad, "confirmed", json!("false")));
            assert_eq!(e, None, "{bad}");
            assert!(
                matches!(&issues[..], [IpamIssue::BadCidr { value, .. }] if value == bad),
                "{bad}: {issues:?}"
            );
        }
        let (e, issues) = block_affinity(&affinity(
            "a",
            " ",
            "10.70.1.0/26",
            "confirmed",
            json!("false"),
        ));
        assert_eq!(e, None);
        assert!(matches!(&issues[..], [IpamIssue::NoNode { .. }]));
        // A pending one is not looked at at all.
        let (_, issues) = block_affinity(&affinity(
            "a",
            "edge-1",
            "banana",
            "pending",
            json!("false"),
        ));
        assert!(issues.is_empty());
    }

    #[test]
    fn cilium_nodes_give_their_pod_cidrs() {
        let n = obj(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
            "metadata": {"name": "edge-2"},
            "spec": {"ipam": {"podCIDRs": ["10.0.7.0/24", "fd00:7::/64", "10.0.7.0/24", "10.0.8.1/24", 7]}},
        }));
        let (e, issues) = cilium_node(&n);
        let e = e.unwrap();
        assert_eq!(e.node, "edge-2");
        let got: Vec<String> = e.prefixes.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.7.0/24", "fd00:7::/64"]);
        assert_eq!(issues.len(), 2, "{issues:?}");
        // No IPAM section (another IPAM mode, or not allocated yet).
        let n = obj(json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
            "metadata": {"name": "edge-2"}, "spec": {"ipam": {"pool": {}}}}));
        assert_eq!(cilium_node(&n), (None, vec![]));
    }
}
