//! Certificate bootstrap, both sides, on the same bytes.
//!
//! The relay's side: a `CertRequest` read from a peer that has no client
//! certificate (an unauthenticated input), decided by
//! `relay_server::bootstrap::decide` with a stand-in token authority
//! (token `token-<node>` proves `<node>`, as in the crate's tests; the
//! real one asks the apiserver) and the issuer of a dev CA generated once
//! per process, so an accepted request runs `NodeIssuer::issue` on the
//! peer's public key (DER SubjectPublicKeyInfo) and signs a certificate.
//!
//! The edge's side: a `CertReply` from the relay, its certificate PEM read
//! as the edge reads it (`certs_from_pem`, `cert_names_node`, `validity`).
//!
//! Properties: no panic; an issued certificate parses, lives at most
//! `MAX_LIFETIME` plus the clock slack, ends at the reply's
//! `not_after_unix`, and names the requested node when that is a valid
//! Kubernetes node name (the only names the apiserver vouches for); the
//! reply encodes; a refusal is one of the reasons `decide` gives.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay_protocol::bootstrap::{CertReply, CertRequest};
use relay_protocol::codec::{decode, encode};
use relay_protocol::RejectReason;
use relay_server::bootstrap::{decide, Refusal, TokenAuthority, TokenIdentity};
use relay_transport::devcerts::DevPki;
use relay_transport::issue::{validity, NodeIssuer, CLOCK_SLACK, MAX_LIFETIME};
use relay_transport::tls::{cert_names_node, certs_from_pem};

/// `token-<node>` proves `<node>`; anything else is refused.
struct Tokens;

impl TokenAuthority for Tokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenIdentity, Refusal>> + Send + 'a>> {
        Box::pin(async move {
            match token.strip_prefix("token-") {
                Some(node) => Ok(TokenIdentity {
                    node: node.to_string(),
                    pod: "edge-client-fuzz".to_string(),
                }),
                None => Err((RejectReason::IdentityMismatch, "token refused".to_string())),
            }
        })
    }
}

fn issuer() -> &'static NodeIssuer {
    static ISSUER: OnceLock<NodeIssuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let pki = DevPki::generate(&["relay.example.com"], &[]).expect("dev PKI generates");
        let (cert, key) = pki.ca_pem_pair();
        NodeIssuer::from_pem(&cert, &key, Duration::from_secs(12 * 3600)).expect("issuer")
    })
}

/// The stand-in authority and the issuer never wait, so one poll ends it.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("decide returned Pending"),
    }
}

/// A Kubernetes node name: an RFC 1123 subdomain.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fuzz_target!(|data: &[u8]| {
    // The relay's side.
    if let Ok(req) = decode::<CertRequest>(data) {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        match now(decide(&Tokens, issuer(), &req, at)) {
            Ok((cert, who)) => {
                assert_eq!(who.node, req.node);
                let chain = certs_from_pem(cert.cert_pem.as_bytes(), "issued")
                    .expect("an issued certificate parses");
                if is_node_name(&req.node) {
                    assert!(cert_names_node(&chain[0], &req.node), "{:?}", req.node);
                }
                let (from, to) = validity(&cert.cert_pem).expect("validity");
                assert!(to.duration_since(from).unwrap_or_default() <= MAX_LIFETIME + CLOCK_SLACK);
                assert_eq!(
                    to.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                    cert.not_after_unix
                );
                assert_eq!(cert.relay_time_unix, 1_800_000_000);
                encode(&CertReply::Issued(cert)).expect("the reply encodes");
            }
            Err((reason, message)) => {
                assert!(
                    matches!(
                        reason,
                        RejectReason::UnsupportedVersion
                            | RejectReason::IdentityMismatch
                            | RejectReason::Malformed
                    ),
                    "{reason:?}: {message}"
                );
            }
        }
    }

    // The edge's side.
    if let Ok(CertReply::Issued(issued)) = decode::<CertReply>(data) {
        if let Ok(chain) = certs_from_pem(issued.cert_pem.as_bytes(), "issued") {
            if let Some(leaf) = chain.first() {
                let _ = cert_names_node(leaf, "edge-1");
            }
        }
        let _ = validity(&issued.cert_pem);
    }
});
