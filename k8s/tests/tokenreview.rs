//! TokenReviewer against `relay-kube-standin`, a kube-apiserver stand-in
//! answering TokenReview from tokens the test mints, not a real apiserver.

mod common;

use std::time::{Duration, SystemTime};

use common::{count, setup};
use relay_kube::{TokenReviewError, TokenReviewer, AUDIENCE};

const CALL: Duration = Duration::from_secs(5);

#[tokio::test]
async fn minted_token_yields_the_node_binding() {
    let (standin, client) = setup().await;
    let reviewer = TokenReviewer::new(&client, CALL);
    let hour = SystemTime::now() + Duration::from_secs(3600);
    let token = standin.mint_token("edge-1", "edge-client-abcde", "pod-uid-1", AUDIENCE, hour);
    let t = reviewer.review(&token).await.unwrap();
    assert_eq!(t.node_name, "edge-1");
    assert_eq!(t.pod_name.as_deref(), Some("edge-client-abcde"));
    assert_eq!(t.pod_uid.as_deref(), Some("pod-uid-1"));
    assert_eq!(t.username, "system:serviceaccount:edge-relay:edge-client");
    assert!(t.groups.iter().any(|g| g == "system:authenticated"));
    assert_eq!(count(&standin, "create tokenreviews"), 1);
}

#[tokio::test]
async fn wrong_audience_expired_and_unknown_tokens_are_rejected() {
    let (standin, client) = setup().await;
    let reviewer = TokenReviewer::new(&client, CALL);
    let hour = SystemTime::now() + Duration::from_secs(3600);

    let other = standin.mint_token("edge-1", "p", "u", "https://kubernetes.default.svc", hour);
    let err = reviewer.review(&other).await.unwrap_err();
    assert!(
        matches!(err, TokenReviewError::WrongAudience { .. }),
        "{err}"
    );

    let past = SystemTime::now() - Duration::from_secs(1);
    let expired = standin.mint_token("edge-1", "p", "u", AUDIENCE, past);
    let err = reviewer.review(&expired).await.unwrap_err();
    assert!(
        matches!(err, TokenReviewError::Unauthenticated { .. }),
        "{err}"
    );

    let err = reviewer.review("not-a-token").await.unwrap_err();
    assert!(
        matches!(err, TokenReviewError::Unauthenticated { .. }),
        "{err}"
    );

    let err = reviewer.review("").await.unwrap_err();
    assert!(matches!(err, TokenReviewError::Empty), "{err}");
    assert_eq!(count(&standin, "create tokenreviews"), 3);
}
