//! The certificate bootstrap's token check in a cluster: a TokenReview,
//! then the pod the token is bound to (it exists with the token's uid,
//! runs on the token's node, uses the edge service account and belongs to
//! an edge DaemonSet).

use std::future::Future;
use std::pin::Pin;

use relay_kube::{PodReader, TokenReviewError, TokenReviewer};
use relay_protocol::RejectReason;

use crate::bootstrap::{Refusal, TokenAuthority, TokenIdentity};

/// TokenReview plus the checks on the pod the token is bound to.
pub(super) struct KubeTokens {
    pub(super) reviewer: TokenReviewer,
    pub(super) pods: PodReader,
    pub(super) username: String,
    pub(super) service_account: String,
    pub(super) daemonsets: Vec<String>,
}

impl KubeTokens {
    async fn check(&self, token: &str) -> Result<TokenIdentity, Refusal> {
        let deny = |m: String| (RejectReason::IdentityMismatch, m);
        let t = self.reviewer.review(token).await.map_err(|e| match e {
            // The API is down or slow: the edge retries; nothing is wrong
            // with its token as far as we know.
            TokenReviewError::Api(e) => (
                RejectReason::Overloaded,
                format!("cannot verify the token now: {e}"),
            ),
            other => deny(other.to_string()),
        })?;
        if t.username != self.username {
            return Err(deny(format!(
                "the token belongs to {}, not the edge service account {}",
                t.username, self.username
            )));
        }
        let (Some(pod), Some(uid)) = (t.pod_name.clone(), t.pod_uid.clone()) else {
            return Err(deny("the token is not bound to a pod".into()));
        };
        let facts = self
            .pods
            .get(&pod)
            .await
            .map_err(|e| {
                (
                    RejectReason::Overloaded,
                    format!("cannot read pod {pod}: {e}"),
                )
            })?
            .ok_or_else(|| deny(format!("pod {pod} does not exist")))?;
        if facts.uid.as_deref() != Some(uid.as_str()) {
            return Err(deny(format!(
                "pod {pod} was replaced (uid differs from the token's)"
            )));
        }
        if facts.node_name.as_deref() != Some(t.node_name.as_str()) {
            return Err(deny(format!(
                "pod {pod} runs on {:?}, the token is bound to node {}",
                facts.node_name, t.node_name
            )));
        }
        if facts.service_account.as_deref() != Some(self.service_account.as_str()) {
            return Err(deny(format!(
                "pod {pod} does not use service account {}",
                self.service_account
            )));
        }
        if !self.daemonsets.iter().any(|d| facts.daemonsets.contains(d)) {
            return Err(deny(format!(
                "pod {pod} does not belong to DaemonSet {}",
                self.daemonsets.join(" or ")
            )));
        }
        Ok(TokenIdentity {
            node: t.node_name,
            pod,
        })
    }
}

impl TokenAuthority for KubeTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
        Box::pin(self.check(token))
    }
}
