//! [`Communities`]: the named groups of nodes that decide which edges may
//! reach each other (rule 4 of the policy), from relay.toml and Node
//! labels. A lookup structure of its own; the policy only asks it.

use std::collections::{BTreeSet, HashMap};

/// Edge-to-edge reachability: named groups of nodes (as FabEdge's
/// communities). Two edges may reach each other's routes when some
/// community lists both; a member `"*"` stands for every node. Groups come
/// from relay.toml and, in Kubernetes mode, from Node labels
/// (`node-restriction.kubernetes.io/edge-relay-community-<name>`); a name
/// means the same community in both.
#[derive(Debug, Clone, Default)]
pub struct Communities {
    /// Node → the communities that list it.
    members: HashMap<String, BTreeSet<String>>,
    /// Communities that list `"*"`.
    everyone: BTreeSet<String>,
}

impl Communities {
    /// Builds the lookup from `name → members`.
    pub fn new(groups: &HashMap<String, Vec<String>>) -> Self {
        let mut c = Communities::default();
        for (name, members) in groups {
            for m in members {
                if m == "*" {
                    c.everyone.insert(name.clone());
                } else {
                    c.members.entry(m.clone()).or_default().insert(name.clone());
                }
            }
        }
        c
    }

    fn has(&self, node: &str, name: &str, labels: &HashMap<String, BTreeSet<String>>) -> bool {
        self.everyone.contains(name)
            || self.members.get(node).is_some_and(|m| m.contains(name))
            || labels.get(node).is_some_and(|m| m.contains(name))
    }

    /// Whether nodes `a` and `b` share a community, counting `labels`
    /// (node → communities from its labels) as members too.
    pub fn share_with(&self, a: &str, b: &str, labels: &HashMap<String, BTreeSet<String>>) -> bool {
        // Nodes belong to a handful of communities: a scan of `a`'s beats
        // building a set on this per-route path.
        let mine = self
            .members
            .get(a)
            .into_iter()
            .flatten()
            .chain(&self.everyone)
            .chain(labels.get(a).into_iter().flatten());
        mine.into_iter().any(|name| self.has(b, name, labels))
    }

    /// Whether nodes `a` and `b` share a community of this configuration.
    pub fn share(&self, a: &str, b: &str) -> bool {
        self.share_with(a, b, &HashMap::new())
    }

    /// Whether no community is configured (edges are isolated).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.everyone.is_empty()
    }
}
