//! Server-side apply of `status.conditions` on a Node, the way the
//! apiserver merges it: Node conditions are a list map keyed by `type`, so
//! each condition has one owning field manager; an apply by one manager
//! never touches conditions owned by another, a condition the applier owned
//! but left out of its apply is removed, and changing a value owned by
//! someone else is a conflict unless `force` is set (then ownership moves).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::NodeCondition;

/// Owner (field manager) of each condition type on one Node.
pub type ConditionOwners = BTreeMap<String, String>;

/// An apply that would change a field another manager owns, without force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Condition type in conflict.
    pub type_: String,
    /// Manager that owns it.
    pub owner: String,
}

/// Merges `applied` (the complete set of conditions `manager` wants to own)
/// into `existing`. Returns whether the stored list changed.
pub fn apply_conditions(
    existing: &mut Vec<NodeCondition>,
    owners: &mut ConditionOwners,
    manager: &str,
    applied: Vec<NodeCondition>,
    force: bool,
) -> Result<bool, Conflict> {
    for c in &applied {
        if let Some(owner) = owners.get(&c.type_) {
            let current = existing.iter().find(|e| e.type_ == c.type_);
            if owner != manager && current != Some(c) && !force {
                return Err(Conflict {
                    type_: c.type_.clone(),
                    owner: owner.clone(),
                });
            }
        }
    }
    let before = existing.clone();
    // Conditions this manager owned and no longer applies are removed.
    let dropped: Vec<String> = owners
        .iter()
        .filter(|(t, m)| m.as_str() == manager && !applied.iter().any(|c| &c.type_ == *t))
        .map(|(t, _)| t.clone())
        .collect();
    for t in &dropped {
        owners.remove(t);
        existing.retain(|c| &c.type_ != t);
    }
    for c in applied {
        owners.insert(c.type_.clone(), manager.to_string());
        match existing.iter_mut().find(|e| e.type_ == c.type_) {
            Some(e) => *e = c,
            None => existing.push(c),
        }
    }
    Ok(*existing != before)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, s: &str) -> NodeCondition {
        NodeCondition {
            type_: t.into(),
            status: s.into(),
            ..Default::default()
        }
    }

    #[test]
    fn other_managers_conditions_survive_and_conflicts_need_force() {
        let mut list = vec![];
        let mut owners = ConditionOwners::new();
        assert!(apply_conditions(
            &mut list,
            &mut owners,
            "kubelet",
            vec![cond("Ready", "True")],
            false
        )
        .unwrap());
        assert!(apply_conditions(
            &mut list,
            &mut owners,
            "edge-relay",
            vec![cond("EdgeTunnelReady", "True")],
            false
        )
        .unwrap());
        assert_eq!(list.len(), 2);
        // Same apply again: no change.
        assert!(!apply_conditions(
            &mut list,
            &mut owners,
            "edge-relay",
            vec![cond("EdgeTunnelReady", "True")],
            false
        )
        .unwrap());
        // Touching kubelet's Ready without force conflicts.
        let err = apply_conditions(
            &mut list,
            &mut owners,
            "edge-relay",
            vec![cond("Ready", "False")],
            false,
        )
        .unwrap_err();
        assert_eq!(err.owner, "kubelet");
        // Leaving a condition out of an apply removes it (only ours).
        assert!(apply_conditions(&mut list, &mut owners, "edge-relay", vec![], false).unwrap());
        assert_eq!(list, vec![cond("Ready", "True")]);
    }
}
