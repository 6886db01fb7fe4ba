//! [`TokenReviewer`]: authenticating an edge by a node-bound
//! service-account token (TokenReview, authentication.k8s.io/v1).
//!
//! The edge-client pod presents a projected token with audience
//! [`AUDIENCE`]; the apiserver vouches for it and, for tokens bound to a
//! pod (Kubernetes 1.32+ with node-bound token extras, GA), tells us which
//! node the pod runs on in `status.user.extra`. That node binding is what
//! the relay compares with the node the edge claims to be.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::Api;

use crate::{bounded, KubeClient, KubeError};

/// The audience edge tokens are minted for and reviewed against.
pub const AUDIENCE: &str = "edge-relay";

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated, node-bound token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedToken {
    /// `status.user.username`, e.g. `system:serviceaccount:ns:name`.
    pub username: String,
    /// `status.user.uid`.
    pub uid: Option<String>,
    /// `status.user.groups`.
    pub groups: Vec<String>,
    /// The node the token's pod is bound to.
    pub node_name: String,
    /// The pod the token is bound to.
    pub pod_name: Option<String>,
    /// That pod's uid.
    pub pod_uid: Option<String>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenReviewError {
    /// The review call itself failed (unreachable, timeout, forbidden).
    #[error("token review: {0}")]
    Api(#[from] KubeError),
    /// Empty token; not sent to the API.
    #[error("empty token")]
    Empty,
    /// The audience does not match ours (the apiserver names it in its
    /// error, or reports other audiences for an authenticated token).
    #[error("token audience is not {AUDIENCE}: {error}")]
    WrongAudience {
        /// The apiserver's error string, or the audiences it reported.
        error: String,
    },
    /// Not authenticated (unknown, expired, revoked, malformed).
    #[error("token not authenticated: {error}")]
    Unauthenticated {
        /// The apiserver's error string.
        error: String,
    },
    /// Authenticated, but not bound to a node (not a pod-bound token, or an
    /// apiserver without node-bound token extras).
    #[error("token of {username} carries no node binding")]
    MissingBinding {
        /// Whose token it is.
        username: String,
    },
}

/// Reviews tokens against the apiserver. Needs `create` on
/// `tokenreviews.authentication.k8s.io`.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    timeout: Duration,
}

impl TokenReviewer {
    /// A reviewer for audience [`AUDIENCE`], each call bounded by `timeout`.
    pub fn new(client: &KubeClient, timeout: Duration) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client.0.clone()),
            audience: AUDIENCE.to_string(),
            timeout,
        }
    }

    /// Reviews `token`.
    pub async fn review(&self, token: &str) -> Result<ReviewedToken, TokenReviewError> {
        if token.is_empty() {
            return Err(TokenReviewError::Empty);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = bounded(
            "token review",
            self.timeout,
            self.api.create(&PostParams::default(), &review),
        )
        .await?;
        interpret(&self.audience, answer)
    }
}

/// Turns a TokenReview answer into our result.
fn interpret(audience: &str, answer: TokenReview) -> Result<ReviewedToken, TokenReviewError> {
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let error = status
            .error
            .unwrap_or_else(|| "not authenticated".to_string());
        // The apiserver reports an audience mismatch only in its error text
        // ("token audiences [...] is invalid for the target audiences [...]").
        return Err(if error.contains("audience") {
            TokenReviewError::WrongAudience { error }
        } else {
            TokenReviewError::Unauthenticated { error }
        });
    }
    // An authenticator that ignores audiences reports none or others.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenReviewError::WrongAudience {
            error: format!("authenticated for audiences {audiences:?}"),
        });
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let extra = user.extra.unwrap_or_default();
    let Some(node_name) = first(&extra, NODE_NAME) else {
        return Err(TokenReviewError::MissingBinding { username });
    };
    Ok(ReviewedToken {
        username,
        uid: user.uid,
        groups: user.groups.unwrap_or_default(),
        node_name,
        pod_name: first(&extra, POD_NAME),
        pod_uid: first(&extra, POD_UID),
    })
}

fn first(extra: &BTreeMap<String, Vec<String>>, key: &str) -> Option<String> {
    extra
        .get(key)
        .and_then(|v| v.first())
        .filter(|s| !s.is_empty())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn answer(
        authenticated: bool,
        error: Option<&str>,
        aud: &[&str],
        extra: &[(&str, &str)],
    ) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                error: error.map(str::to_string),
                audiences: Some(aud.iter().map(|s| s.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some("system:serviceaccount:edge-relay:edge-client".into()),
                    extra: Some(
                        extra
                            .iter()
                            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                            .collect(),
                    ),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_binding_is_extracted() {
        let t = interpret(
            AUDIENCE,
            answer(
                true,
                None,
                &[AUDIENCE],
                &[(NODE_NAME, "edge-1"), (POD_NAME, "p"), (POD_UID, "u")],
            ),
        )
        .unwrap();
        assert_eq!(t.node_name, "edge-1");
        assert_eq!(t.pod_name.as_deref(), Some("p"));
        assert_eq!(t.pod_uid.as_deref(), Some("u"));
    }

    #[test]
    fn failures_are_typed() {
        let e =
            interpret(AUDIENCE, answer(false, Some("token has expired"), &[], &[])).unwrap_err();
        assert!(matches!(e, TokenReviewError::Unauthenticated { .. }));
        let e = interpret(
            AUDIENCE,
            answer(
                false,
                Some("token audiences [\"x\"] is invalid for the target audiences"),
                &[],
                &[],
            ),
        )
        .unwrap_err();
        assert!(matches!(e, TokenReviewError::WrongAudience { .. }));
        let e = interpret(
            AUDIENCE,
            answer(true, None, &["other"], &[(NODE_NAME, "n")]),
        )
        .unwrap_err();
        assert!(matches!(e, TokenReviewError::WrongAudience { .. }));
        let e = interpret(AUDIENCE, answer(true, None, &[AUDIENCE], &[])).unwrap_err();
        assert!(matches!(e, TokenReviewError::MissingBinding { .. }));
    }
}
