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

/// An edge asking for a node certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
