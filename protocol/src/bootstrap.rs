//! Certificate bootstrap: an edge with no certificate yet, but a projected
//! service-account token bound to its pod and node, asks the relay for a
//! short-lived node certificate.
//!
//! The exchange runs on its own connection, told apart by ALPN
//! ([`BOOTSTRAP_ALPN`]); the client presents no certificate there. The
//! edge opens one bidirectional stream, sends a [`CertRequest`], reads a
//! [`CertReply`], and closes. The private key never leaves the edge: the
//! request carries only the public key.

use serde::{Deserialize, Serialize};

use crate::Rejection;

/// ALPN of a bootstrap connection (the tunnel's is [`crate::ALPN`]).
pub const BOOTSTRAP_ALPN: &[u8] = b"edge-relay-bootstrap/1";

/// An edge asking for a node certificate. Its `Debug` leaves the token
/// out: a bearer credential must not reach a log by way of `{:?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRequest {
    /// Protocol version the edge speaks (first, as in the hello).
    pub version: u16,
    /// The node the edge says it runs on; must be the token's node.
    pub node: String,
    /// The service-account token (audience `edge-relay`).
    pub token: String,
    /// The edge's public key, DER `SubjectPublicKeyInfo`.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for CertRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRequest")
            .field("version", &self.version)
            .field("node", &self.node)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field(
                "public_key",
                &format_args!("<{} bytes>", self.public_key.len()),
            )
            .finish()
    }
}

/// The relay's answer to a [`CertRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertReply {
    /// A certificate for the node.
    Issued(IssuedCert),
    /// Refused, with the reason.
    Refused(Rejection),
}

/// A node certificate issued by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// The certificate, PEM; its only DNS name is the node's.
    pub cert_pem: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: u64,
    /// The relay's clock when it issued, seconds since the Unix epoch, so
    /// an edge can tell that its own clock is off.
    pub relay_time_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's `Debug` names the node and the sizes, never the token.
    #[test]
    fn the_token_stays_out_of_debug_output() {
        let r = CertRequest {
            version: 1,
            node: "shop-1".into(),
            token: "eyJhbGciOiJSUzI1NiJ9.secret".into(),
            public_key: vec![0; 91],
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("shop-1") && shown.contains("<27 bytes>"),
            "{shown}"
        );
        assert!(
            !shown.contains("secret") && !shown.contains("eyJ"),
            "{shown}"
        );
    }
}
