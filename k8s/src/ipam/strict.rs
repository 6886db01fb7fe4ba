//! Calico's `strictAffinity`: whether its IPAM may give a node addresses
//! of a block affine to another node.
//!
//! [`block_affinity`](super::block_affinity) gives a confirmed block to
//! its node whole, which holds only while no other node uses an address
//! of that block. With `strictAffinity` false, Calico's default, a node
//! whose blocks are full and that can claim no new one (its pool is
//! exhausted, or `maxBlocksPerHost` is reached) borrows free addresses
//! from other nodes' blocks: a pod given one is routed by the relay to the
//! block's node, where it is not, and nothing fails where anyone looks.
//! Small per-site pools make that exhaustion likely.
//!
//! The setting is `spec.strictAffinity` of the cluster-scoped `IPAMConfig`
//! named `default` (`ipamconfigs.crd.projectcalico.org`, v1; Calico's API
//! server shows it as the `projectcalico.org/v3` `IPAMConfiguration`).
//! Calico creates it only when someone configures IPAM
//! (`calicoctl ipam configure`); without it Calico's IPAM takes its
//! default, strictAffinity false. The relay reads the object (one bounded
//! GET) once a confirmed block is known, then every
//! [`IpamOptions::rediscover`]; it only reports what it finds
//! ([`StrictAffinity`]), routing is unchanged.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Api;
use serde_json::Value;
use tokio::sync::watch;

use super::{status_of, Inner, IpamOptions};
use crate::KubeClient;

/// `(group, version, kind, plural)` of Calico's IPAM configuration.
pub const IPAM_CONFIG_GVK: (&str, &str, &str, &str) =
    ("crd.projectcalico.org", "v1", "IPAMConfig", "ipamconfigs");

/// The name of the one IPAM configuration Calico reads.
pub const IPAM_CONFIG_NAME: &str = "default";

/// What the relay knows of Calico's `strictAffinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StrictAffinity {
    /// Not read: no confirmed Calico block is known (Calico's IPAM is not
    /// in use, or its blocks may not be read).
    #[default]
    Unused,
    /// Calico's blocks are in use and the setting was not read yet (the
    /// first read is under way or got no answer).
    Unknown,
    /// `spec.strictAffinity: true`: no node uses another node's block.
    Strict,
    /// `spec.strictAffinity` false (or missing from the object).
    Off,
    /// No `default` IPAMConfig (nor, perhaps, its CRD): Calico's default,
    /// false.
    Unset,
    /// `403`: the relay may not read it (RBAC).
    Forbidden,
}

impl StrictAffinity {
    /// Every state, for metrics that list each.
    pub const ALL: [StrictAffinity; 6] = [
        StrictAffinity::Unused,
        StrictAffinity::Unknown,
        StrictAffinity::Strict,
        StrictAffinity::Off,
        StrictAffinity::Unset,
        StrictAffinity::Forbidden,
    ];

    /// Its name in metrics labels and `/readyz`.
    pub const fn as_str(self) -> &'static str {
        match self {
            StrictAffinity::Unused => "unused",
            StrictAffinity::Unknown => "unknown",
            StrictAffinity::Strict => "strict",
            StrictAffinity::Off => "off",
            StrictAffinity::Unset => "unset",
            StrictAffinity::Forbidden => "forbidden",
        }
    }

    /// Whether Calico may give a node addresses of another node's block
    /// (off or unset), so that some pods may be routed to the wrong node.
    pub const fn lets_nodes_borrow(self) -> bool {
        matches!(self, StrictAffinity::Off | StrictAffinity::Unset)
    }
}

/// The `strictAffinity` an `IPAMConfig` object sets: strict only for the
/// boolean `true` (what the CRD's schema allows); anything else is what
/// Calico's IPAM reads as false.
pub fn ipam_config(obj: &DynamicObject) -> StrictAffinity {
    match obj.data.pointer("/spec/strictAffinity") {
        Some(Value::Bool(true)) => StrictAffinity::Strict,
        _ => StrictAffinity::Off,
    }
}

pub(super) fn api(client: &KubeClient) -> Api<DynamicObject> {
    let (group, version, kind, plural) = IPAM_CONFIG_GVK;
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::all_with(client.0.clone(), &ar)
}

/// What to log for `now` (and whether as a warning).
fn message(now: StrictAffinity, every: Duration) -> (String, bool) {
    let (group, _, _, plural) = IPAM_CONFIG_GVK;
    let object = format!("{plural}.{group} {IPAM_CONFIG_NAME}");
    let borrow = "a node whose blocks are full may be given addresses of another node's block, and the relay routes pods with such addresses to the block's node, where they are not; set strictAffinity to true (`calicoctl ipam configure --strictaffinity=true`, see deploy/README.md)";
    match now {
        StrictAffinity::Strict => (
            format!("Calico IPAM strictAffinity is true ({object}): each confirmed block's addresses are its node's"),
            false,
        ),
        StrictAffinity::Off => (
            format!("Calico IPAM strictAffinity is false ({object}): {borrow}"),
            true,
        ),
        StrictAffinity::Unset => (
            format!("Calico IPAM strictAffinity is unset (no {object}: Calico's default, false): {borrow}"),
            true,
        ),
        StrictAffinity::Forbidden => (
            format!("Calico IPAM configuration ({object}) may not be read (403: get is needed, see deploy/kubernetes/base/rbac.yaml): whether a node may be given addresses of another node's block (strictAffinity) is unknown; trying again every {every:?}"),
            true,
        ),
        StrictAffinity::Unused | StrictAffinity::Unknown => (String::new(), false),
    }
}

/// Reads Calico's IPAM configuration while Calico's blocks are in use,
/// forever.
pub(super) async fn run(inner: Arc<Inner>, api: Api<DynamicObject>, opts: IpamOptions) {
    let mut changes = inner.changes.subscribe();
    // Each outcome is logged when it changes only.
    let mut said = super::SaidOnce::default();
    let mut say = |(now, warn): (String, bool)| said.say(now, warn);
    let every = opts.rediscover;
    let retry = opts.retry.min(every);
    // A 404 after the object was read: kube-apiserver answers stray ones
    // for a custom resource that exists (see the `ipam` module docs), so
    // it counts as the object gone only when a read after `retry` agrees.
    let mut unconfirmed = false;
    loop {
        if !inner.calico_in_use() {
            inner.set_strict(StrictAffinity::Unused);
            unconfirmed = false;
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        if inner.strict() == StrictAffinity::Unused {
            inner.set_strict(StrictAffinity::Unknown);
        }
        let read = crate::bounded(
            "Calico IPAM configuration read",
            opts.probe_timeout,
            api.get(IPAM_CONFIG_NAME),
        )
        .await;
        let wait = match read {
            Ok(obj) => {
                unconfirmed = false;
                let now = ipam_config(&obj);
                inner.set_strict(now);
                say(message(now, every));
                every
            }
            Err(e) if status_of(&e) == Some(404) => {
                let was_read =
                    matches!(inner.strict(), StrictAffinity::Strict | StrictAffinity::Off);
                if was_read && !std::mem::replace(&mut unconfirmed, true) {
                    retry
                } else {
                    unconfirmed = false;
                    inner.set_strict(StrictAffinity::Unset);
                    say(message(StrictAffinity::Unset, every));
                    every
                }
            }
            Err(e) if status_of(&e) == Some(403) => {
                unconfirmed = false;
                inner.set_strict(StrictAffinity::Forbidden);
                say(message(StrictAffinity::Forbidden, every));
                every
            }
            Err(e) => {
                // The last answer stands (as the blocks do through an
                // outage).
                say((
                    format!("Calico IPAM configuration read failed: {e}; retrying in {retry:?}"),
                    false,
                ));
                retry
            }
        };
        sleep_while_in_use(&inner, &mut changes, wait).await;
    }
}

/// Sleeps `wait`, or less if Calico's blocks stop being in use.
async fn sleep_while_in_use(inner: &Inner, changes: &mut watch::Receiver<u64>, wait: Duration) {
    let sleep = tokio::time::sleep(wait);
    let mut sleep = std::pin::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return,
            r = changes.changed() => {
                if r.is_err() || !inner.calico_in_use() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMConfig",
            "metadata": {"name": "default"}, "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn only_a_true_strict_affinity_is_strict() {
        assert_eq!(
            ipam_config(&config(
                json!({"strictAffinity": true, "autoAllocateBlocks": true})
            )),
            StrictAffinity::Strict
        );
        for spec in [
            json!({"strictAffinity": false, "autoAllocateBlocks": true}),
            json!({"autoAllocateBlocks": true}),
            json!({"strictAffinity": "true"}),
            json!(null),
        ] {
            assert_eq!(
                ipam_config(&config(spec.clone())),
                StrictAffinity::Off,
                "{spec}"
            );
        }
        let borrow: Vec<&str> = StrictAffinity::ALL
            .into_iter()
            .filter(|s| s.lets_nodes_borrow())
            .map(StrictAffinity::as_str)
            .collect();
        assert_eq!(borrow, ["off", "unset"]);
    }
}
