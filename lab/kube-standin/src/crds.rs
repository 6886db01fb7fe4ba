//! Custom resources the stand-in can serve: the CNI IPAM objects the relay
//! reads node prefixes from (Calico's `BlockAffinity`, Cilium's
//! `CiliumNode`; see relay-kube's `ipam`), and Calico's `IPAMConfig`, whose
//! `strictAffinity` the relay reports. Each is served (list, watch,
//! sharing the one resourceVersion history, and get by name) only once a
//! test installs its CRD ([`StandIn::install_crd`]); before that, and after
//! [`StandIn::remove_crd`], its paths answer 404 as on a cluster without
//! that CNI. Objects are kept as JSON: the stand-in does not model them
//! beyond `metadata`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::objects::now_time;
use super::{Res, Signal, StandIn, State};

/// A CRD the stand-in can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Crd {
    /// `blockaffinities.crd.projectcalico.org`, v1, cluster-scoped.
    CalicoBlockAffinities,
    /// `ciliumnodes.cilium.io`, v2, cluster-scoped.
    CiliumNodes,
    /// `ipamconfigs.crd.projectcalico.org`, v1, cluster-scoped (the relay
    /// GETs the one named `default`).
    CalicoIpamConfigs,
}

impl Crd {
    pub(crate) fn res(self) -> Res {
        match self {
            Crd::CalicoBlockAffinities => Res::BlockAffinities,
            Crd::CiliumNodes => Res::CiliumNodes,
            Crd::CalicoIpamConfigs => Res::IpamConfigs,
        }
    }

    /// The CRD serving `(group, version, resource)`, if any.
    pub(crate) fn served_at(group: &str, version: &str, resource: &str) -> Option<Crd> {
        match (group, version, resource) {
            ("crd.projectcalico.org", "v1", "blockaffinities") => Some(Crd::CalicoBlockAffinities),
            ("cilium.io", "v2", "ciliumnodes") => Some(Crd::CiliumNodes),
            ("crd.projectcalico.org", "v1", "ipamconfigs") => Some(Crd::CalicoIpamConfigs),
            _ => None,
        }
    }
}

/// A Calico `BlockAffinity` as Calico's IPAM writes it: named
/// `<node>-<cidr with . : / as ->`, `spec.deleted` a string.
pub fn block_affinity(node: &str, cidr: &str, state: &str, deleted: bool) -> Value {
    let name = format!("{node}-{}", cidr.replace(['.', ':', '/'], "-"));
    json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
        "metadata": {"name": name},
        "spec": {"node": node, "cidr": cidr, "state": state, "deleted": deleted.to_string()},
    })
}

/// Calico's `IPAMConfig` `default` as `calicoctl ipam configure` writes
/// it (`autoAllocateBlocks` true); `strict_affinity` `None` leaves the
/// field out.
pub fn ipam_config(strict_affinity: Option<bool>) -> Value {
    let mut spec = json!({"autoAllocateBlocks": true});
    if let Some(s) = strict_affinity {
        spec["strictAffinity"] = json!(s);
    }
    json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMConfig",
        "metadata": {"name": "default"},
        "spec": spec,
    })
}

/// A `CiliumNode` as Cilium's operator fills it in cluster-pool IPAM.
pub fn cilium_node(node: &str, pod_cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": {"name": node},
        "spec": {"ipam": {"podCIDRs": pod_cidrs}},
    })
}

fn name_of(obj: &Value) -> String {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl State {
    /// The objects of `res` if its CRD is installed.
    pub(crate) fn custom(&self, res: Res) -> Option<&BTreeMap<String, Value>> {
        self.crds.get(&res)
    }

    /// Whether this list or watch of installed `res` is to be answered
    /// 404 ([`StandIn::stray_not_found`]); counts it off if so.
    pub(crate) fn take_stray_404(&mut self, res: Res) -> bool {
        if !self.crds.contains_key(&res) {
            return false;
        }
        match self.stray_404.get_mut(&res) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl StandIn {
    fn publish_custom(&self, st: &mut State, res: Res, kind: &str, obj: &Value) {
        let (_, line) = st.record_obj(res, kind, obj);
        let _ = self
            .shared
            .watch_tx
            .send(Arc::new(Signal::Event(res, line)));
    }

    /// Installs `crd` (its list and watch are served from now on, empty).
    pub fn install_crd(&self, crd: Crd) {
        self.shared.lock().crds.entry(crd.res()).or_default();
    }

    /// Answers the next `n` lists and watches of `crd` 404 while it stays
    /// installed, objects and all (open watches go on): what
    /// kube-apiserver answers for a custom resource whose CRD exists while
    /// its CRD handler is not yet (or for a moment no longer) serving it,
    /// e.g. after an etcd restart (kubernetes/kubernetes#71218, #115241).
    /// `0` ends it early.
    pub fn stray_not_found(&self, crd: Crd, n: u32) {
        self.shared.lock().stray_404.insert(crd.res(), n);
    }

    /// Removes `crd`: its objects are deleted (DELETED on watches, as the
    /// apiserver does before it stops serving a CRD), then its paths
    /// answer 404.
    pub fn remove_crd(&self, crd: Crd) {
        let mut st = self.shared.lock();
        let Some(objects) = st.crds.remove(&crd.res()) else {
            return;
        };
        for mut obj in objects.into_values() {
            let rv = st.bump();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.publish_custom(&mut st, crd.res(), "DELETED", &obj);
        }
    }

    /// Creates or replaces an object of `crd` by `metadata.name` (ADDED or
    /// MODIFIED on watches), installing the CRD if needed. Returns the new
    /// resourceVersion.
    pub fn upsert_custom(&self, crd: Crd, mut obj: Value) -> u64 {
        let mut st = self.shared.lock();
        let rv = st.bump();
        let name = name_of(&obj);
        let old = st
            .crds
            .get(&crd.res())
            .and_then(|m| m.get(&name))
            .map(|o| o["metadata"].clone());
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        let kind = match old {
            Some(o) => {
                meta["uid"] = o["uid"].clone();
                meta["creationTimestamp"] = o["creationTimestamp"].clone();
                "MODIFIED"
            }
            None => {
                meta["uid"] = json!(format!("uid-{name}-{rv}"));
                meta["creationTimestamp"] = serde_json::to_value(now_time()).unwrap_or(Value::Null);
                "ADDED"
            }
        };
        st.crds
            .entry(crd.res())
            .or_default()
            .insert(name, obj.clone());
        self.publish_custom(&mut st, crd.res(), kind, &obj);
        rv
    }

    /// Deletes an object of `crd` (DELETED on watches); false if it did
    /// not exist.
    pub fn delete_custom(&self, crd: Crd, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(mut obj) = st.crds.get_mut(&crd.res()).and_then(|m| m.remove(name)) else {
            return false;
        };
        let rv = st.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.publish_custom(&mut st, crd.res(), "DELETED", &obj);
        true
    }
}
