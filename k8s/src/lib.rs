//! The only crate in edge-relay that talks to the Kubernetes API.
//!
//! The relay needs three things from the cluster, and each is kept behind a
//! small typed API so no other crate needs `kube` (the client is the opaque
//! [`KubeClient`]; only [`NodeDirectory::nodes`] hands out k8s-openapi
//! `Node`s):
//!
//! - which prefixes and addresses each Node owns (to check what an edge
//!   advertises): [`NodeDirectory`], a reflector over Nodes that keeps its
//!   last known state through API outages;
//! - telling operators whether a node's tunnel is up, where they already
//!   look: the Node condition `EdgeTunnelReady` and Events ([`StatusWriter`],
//!   [`SessionEvents`]);
//! - authenticating an edge by a node-bound service-account token:
//!   [`TokenReviewer`];
//! - which relay replicas are live and where edges dial them:
//!   [`ReplicaMembership`], one Lease per replica;
//! - which pod prefixes a CNI's own IPAM gave each node where it does not
//!   use the Node's `podCIDRs` (Calico's BlockAffinities, Cilium's
//!   CiliumNodes), where those resources exist: [`IpamDirectory`];
//! - what each ClusterIP:port is and where its endpoints run, with
//!   kube-proxy's rules, so ClusterIPs can be captured before kube-proxy
//!   DNATs them: [`ServiceDirectory`].
//!
//! Every call we make is bounded by a timeout ([`KubeError::Timeout`]); the
//! watch behind the directory is bounded by the client's connect and read
//! timeouts ([`ClientOptions`]) and retries with kube-runtime's default
//! backoff (client-go's: 0.8 s doubling to 30 s, jittered).
//!
//! Module map:
//!
//! | module | what |
//! |---|---|
//! | [`client`] | [`KubeClientConfig`]: in-cluster or kubeconfig → [`KubeClient`] |
//! | [`nodes`] | [`NodeDirectory`], [`NodeClaims`], [`node_claims`] (pure) |
//! | [`ipam`] | [`IpamDirectory`] (probes, then watches, BlockAffinities and CiliumNodes), [`block_affinity`] and [`cilium_node`] (pure) |
//! | [`names`] | [`service_names`], [`name_entry`] (pure): Service names for edge resolvers |
//! | [`services`] | [`ServiceDirectory`] (reflectors over Services and EndpointSlices), [`ServiceTable`] and [`service_entry`] (pure) |
//! | [`status`] | [`StatusWriter`] (server-side apply of the condition), [`next_condition`] and [`says_ready`] (pure), [`SessionEvents`] |
//! | [`leases`] | [`ReplicaMembership`]: relay replicas from Leases (renew, watch, expiry with a skew margin, collection); [`judge`] (pure) |
//! | [`pods`] | [`PodReader`]: the pod a bootstrap token is bound to |
//! | [`tokenreview`] | [`TokenReviewer`], [`ReviewedToken`], [`TokenReviewError`] |
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod ipam;
pub mod leases;
pub mod names;
pub mod nodes;
pub mod pods;
pub mod service_directory;
pub mod services;
pub mod status;
pub mod tokenreview;

use std::time::Duration;

pub use client::{ClientOptions, KubeClient, KubeClientConfig};
pub use ipam::{
    block_affinity, cilium_node, IpamDirectory, IpamEntry, IpamIssue, IpamKind, IpamOptions,
    IpamState,
};
pub use leases::{
    judge, live_members, LeaseState, Member, MembershipOptions, MembershipStats, ReplicaMembership,
    ADDRESS_ANNOTATION,
};
pub use names::{name_entry, service_names};
pub use nodes::{
    node_claims, ClaimIssue, DirectoryOptions, NodeClaims, NodeDirectory, COMMUNITY_LABEL_PREFIX,
    SELF_SET_COMMUNITY_PREFIX,
};
pub use pods::{pod_facts, PodFacts, PodReader};
pub use services::{
    service_entry, ClusterIpEntry, Endpoint, Protocol, ServiceDirectory, ServiceDirectoryOptions,
    ServiceEntry, ServiceKind, ServiceObjects, ServicePort, ServiceTable,
};
pub use status::{
    next_condition, says_ready, SessionEvent, SessionEvents, StatusWriter, TunnelCondition,
    WriteOutcome, ACTION_LIMIT, CONDITION_TYPE, FIELD_MANAGER, NOTE_LIMIT,
};
pub use tokenreview::{ReviewedToken, TokenReviewError, TokenReviewer, AUDIENCE};

/// Errors talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// No usable client configuration (kubeconfig unreadable, not in a cluster).
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The API answered with an error or could not be reached.
    #[error("kubernetes API: {source}")]
    Api {
        /// HTTP status of the apiserver's `Status` answer (404, 409, 503…),
        /// `None` when no answer came (connect, TLS, decode).
        status: Option<u16>,
        /// The underlying client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A call did not finish within its bound.
    #[error("kubernetes API call {what} timed out after {after:?}")]
    Timeout {
        /// Which call.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
}

impl From<kube::Error> for KubeError {
    fn from(e: kube::Error) -> Self {
        let status = match &e {
            kube::Error::Api(s) => Some(s.code),
            _ => None,
        };
        KubeError::Api {
            status,
            source: Box::new(e),
        }
    }
}

/// Runs `fut` under `after`, mapping expiry to [`KubeError::Timeout`].
pub(crate) async fn bounded<T, F>(
    what: &'static str,
    after: Duration,
    fut: F,
) -> Result<T, KubeError>
where
    F: std::future::Future<Output = Result<T, kube::Error>>,
{
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(KubeError::from),
        Err(_) => Err(KubeError::Timeout { what, after }),
    }
}
