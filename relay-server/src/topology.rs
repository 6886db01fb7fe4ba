//! Topology hints: of a Service port's endpoints, the ones the asking
//! node's kube-proxy would use when the EndpointSlice controller hinted
//! them to nodes (`trafficDistribution: PreferSameNode`) or zones
//! (`PreferClose` / `PreferSameZone`, or the annotation
//! `service.kubernetes.io/topology-mode: Auto`).
//!
//! Where the relay picks an endpoint for a node (an edge's captured
//! connection, the relay node's own capture), it has to make that node's
//! kube-proxy's choice: with a zone per site, a Service with endpoints at
//! every site keeps each site's traffic at home, and cloud clients on
//! cloud endpoints, instead of crossing a metered uplink. kube-proxy's
//! rule (pkg/proxy/topology.go), applied to the ready endpoints only:
//! - when every one carries node hints and one is hinted for the asking
//!   node, only those;
//! - else when every one carries zone hints and one is hinted for the
//!   asking node's zone (its `topology.kubernetes.io/zone` label), only
//!   those;
//! - else all of them (hints are ignored, as when none are ready and the
//!   serving-and-terminating endpoints are used).

use std::borrow::Cow;
use std::sync::Arc;

use crate::services::Backend;

/// A ready endpoint's topology hints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// `hints.forZones`.
    pub zones: Box<[Arc<str>]>,
    /// `hints.forNodes`.
    pub nodes: Box<[Arc<str>]>,
}

impl Hints {
    /// Hints from an endpoint's lists; `None` when it has neither, or is
    /// not ready (kube-proxy reads hints of ready endpoints only: a set of
    /// draining ones is used whole).
    pub fn of(ready: bool, zones: &[String], nodes: &[String]) -> Option<Arc<Hints>> {
        let list = |v: &[String]| v.iter().map(|s| Arc::from(s.as_str())).collect();
        (ready && !(zones.is_empty() && nodes.is_empty())).then(|| {
            Arc::new(Hints {
                zones: list(zones),
                nodes: list(nodes),
            })
        })
    }
}

/// Which hints to follow for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// None: every endpoint.
    All,
    /// Those hinted for the node.
    SameNode,
    /// Those hinted for the node's zone.
    SameZone,
}

/// Of `backends` (one port's usable endpoints), those node `node` (in
/// zone `zone`) would use by their topology hints; all of them when the
/// hints do not apply (see the module docs). Borrowed unless filtered.
pub fn for_node<'a>(
    backends: &'a [Backend],
    node: Option<&str>,
    zone: Option<&str>,
) -> Cow<'a, [Backend]> {
    let has = |list: &[Arc<str>], want: Option<&str>| {
        want.is_some_and(|w| list.iter().any(|x| &**x == w))
    };
    let mode = mode(backends, |h| has(&h.nodes, node), |h| has(&h.zones, zone));
    if mode == Mode::All {
        return Cow::Borrowed(backends);
    }
    Cow::Owned(
        backends
            .iter()
            .filter(|b| {
                b.hints.as_deref().is_some_and(|h| match mode {
                    Mode::SameNode => has(&h.nodes, node),
                    _ => has(&h.zones, zone),
                })
            })
            .cloned()
            .collect(),
    )
}

/// kube-proxy's `topologyModeFromHints` over `backends`, `for_node` and
/// `for_zone` saying whether a hint names the asking node or its zone.
fn mode(
    backends: &[Backend],
    for_node: impl Fn(&Hints) -> bool,
    for_zone: impl Fn(&Hints) -> bool,
) -> Mode {
    let (mut all_nodes, mut all_zones) = (!backends.is_empty(), !backends.is_empty());
    let (mut node_hit, mut zone_hit) = (false, false);
    for b in backends {
        let Some(h) = b.hints.as_deref() else {
            return Mode::All;
        };
        all_nodes &= !h.nodes.is_empty();
        all_zones &= !h.zones.is_empty();
        node_hit |= for_node(h);
        zone_hit |= for_zone(h);
    }
    if all_nodes && node_hit {
        Mode::SameNode
    } else if all_zones && zone_hit {
        Mode::SameZone
    } else {
        Mode::All
    }
}

/// Whether any of `backends` carries hints: a port without them (most)
/// skips looking up the asking node's zone.
pub fn hinted(backends: &[Backend]) -> bool {
    backends.iter().any(|b| b.hints.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Backend {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Backend {
            addr: addr.parse().unwrap(),
            node: Some(Arc::from(node)),
            hints: Hints::of(true, &own(zones), &own(nodes)),
        }
    }

    fn picked(bs: &[Backend], node: Option<&str>, zone: Option<&str>) -> Vec<String> {
        for_node(bs, node, zone)
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    /// kube-proxy's table: node hints first, then zone hints, each only
    /// when every endpoint has them and one matches; otherwise everything.
    #[test]
    fn hints_apply_as_kube_proxy_applies_them() {
        let zoned = [
            b("10.244.1.5:80", "shop1-a", &["shop1"], &[]),
            b("10.244.2.5:80", "shop1-b", &["shop1"], &[]),
            b("10.244.9.5:80", "cloud-1", &["cloud"], &[]),
        ];
        let all = ["10.244.1.5:80", "10.244.2.5:80", "10.244.9.5:80"];
        for (node, zone, want) in [
            // A site (zone) keeps to its own endpoints, whichever node.
            (Some("shop1-c"), Some("shop1"), &all[..2]),
            (None, Some("cloud"), &all[2..]),
            // A zone nobody is hinted for, or no zone label: all.
            (Some("shop2"), Some("shop2"), &all[..]),
            (Some("shop1-a"), None, &all[..]),
        ] {
            assert_eq!(picked(&zoned, node, zone), want, "{node:?} in {zone:?}");
        }
        // One endpoint without zone hints: hints are ignored.
        let mut partly = zoned.to_vec();
        partly.push(b("10.244.3.5:80", "shop3", &[], &["shop3"]));
        assert_eq!(picked(&partly, Some("x"), Some("shop1")).len(), 4);
        // Node hints (PreferSameNode) win over zone hints where they name
        // the asking node; otherwise zone hints decide.
        let both = [
            b("10.244.1.5:80", "shop1-a", &["shop1"], &["shop1-a"]),
            b("10.244.2.5:80", "shop1-b", &["shop1"], &["shop1-b"]),
            b("10.244.9.5:80", "cloud-1", &["cloud"], &["cloud-1"]),
        ];
        assert_eq!(
            picked(&both, Some("shop1-b"), Some("shop1")),
            ["10.244.2.5:80"]
        );
        assert_eq!(picked(&both, Some("shop1-c"), Some("shop1")), &all[..2]);
        // Draining endpoints carry no hints: used whole.
        let draining: Vec<Backend> = zoned
            .iter()
            .map(|x| Backend {
                hints: None,
                ..x.clone()
            })
            .collect();
        assert!(!hinted(&draining) && hinted(&zoned));
        assert_eq!(picked(&draining, None, Some("cloud")).len(), 3);
        assert_eq!(Hints::of(false, &["z".into()], &[]), None);
        assert!(picked(&[], None, Some("cloud")).is_empty());
    }
}
