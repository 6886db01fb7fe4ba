//! Reading the pod a bootstrap token is bound to: the relay checks that it
//! exists, runs on the token's node, uses the edge service account and
//! belongs to the edge-client DaemonSet (a node-bound token can be minted
//! by anyone allowed to create tokens for that service account, so the
//! pod binding is what ties it to a real edge-client pod). Needs `get` on
//! pods in the edge namespace.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::{bounded, KubeClient, KubeError};

/// What the relay needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// Names of the DaemonSets among the pod's owners.
    pub daemonsets: Vec<String>,
}

/// The facts of a pod object.
pub fn pod_facts(p: &Pod) -> PodFacts {
    PodFacts {
        uid: p.metadata.uid.clone(),
        node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        service_account: p.spec.as_ref().and_then(|s| s.service_account_name.clone()),
        daemonsets: p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.kind == "DaemonSet")
            .map(|o| o.name.clone())
            .collect(),
    }
}

/// Reads pods of one namespace, every call bounded.
pub struct PodReader {
    api: Api<Pod>,
    timeout: Duration,
}

impl PodReader {
    /// A reader for `namespace`.
    pub fn new(client: &KubeClient, namespace: &str, timeout: Duration) -> PodReader {
        PodReader {
            api: Api::namespaced(client.0.clone(), namespace),
            timeout,
        }
    }

    /// The pod `name`, or `None` if it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<PodFacts>, KubeError> {
        match bounded("get pod", self.timeout, self.api.get(name)).await {
            Ok(p) => Ok(Some(pod_facts(&p))),
            Err(KubeError::Api {
                status: Some(404), ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
