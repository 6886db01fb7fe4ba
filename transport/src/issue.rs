//! Node certificates issued by the relay from a CA it holds (the
//! certificate bootstrap), and the edge's side: a key pair made on the
//! edge, of which only the public half is ever sent.
//!
//! A certificate names exactly one node (its only DNS name and its common
//! name) and lives at most [`MAX_LIFETIME`], counted from a
//! [`CLOCK_SLACK`] before issuance: edges whose clock runs a little behind
//! the relay's still accept it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SubjectPublicKeyInfo,
};

/// Longest validity of an issued certificate.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How far before issuance a certificate is valid from.
pub const CLOCK_SLACK: Duration = Duration::from_secs(5 * 60);

/// Issuing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CA certificate or key could not be used.
    #[error("issuing CA: {0}")]
    Ca(String),
    /// The edge's public key is not a supported SubjectPublicKeyInfo.
    #[error("public key: {0}")]
    PublicKey(String),
    /// The node name cannot be a DNS name.
    #[error("node name {0:?} is not a valid DNS name")]
    NodeName(String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
}

/// An issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// PEM of the certificate.
    pub cert_pem: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Signs node certificates with the relay's issuing CA.
pub struct NodeIssuer {
    issuer: Issuer<'static, KeyPair>,
    lifetime: Duration,
}

impl std::fmt::Debug for NodeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIssuer")
            .field("lifetime", &self.lifetime)
            .field("key", &"MASKED")
            .finish()
    }
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, IssueError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|e| IssueError::Sign(e.to_string()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| IssueError::Sign(e.to_string()))
}

impl NodeIssuer {
    /// An issuer from the CA certificate and key (PEM); certificates live
    /// `lifetime`, at most [`MAX_LIFETIME`] including the clock slack.
    pub fn from_pem(ca_cert: &str, ca_key: &str, lifetime: Duration) -> Result<Self, IssueError> {
        let key = KeyPair::from_pem(ca_key).map_err(|e| IssueError::Ca(format!("key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(ca_cert, key)
            .map_err(|e| IssueError::Ca(format!("certificate: {e}")))?;
        Ok(NodeIssuer {
            issuer,
            lifetime: lifetime.min(MAX_LIFETIME - CLOCK_SLACK),
        })
    }

    /// The lifetime of the certificates this issuer signs.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A client certificate for `node`'s public key (DER
    /// SubjectPublicKeyInfo), valid from `now - CLOCK_SLACK` for the
    /// issuer's lifetime.
    ///
    /// Not cut short to end with the issuing CA's own certificate: the
    /// relay verifies edges with webpki, which checks the dates of the
    /// leaf and of intermediates but not of the trust anchor, so such a
    /// certificate keeps verifying, and cutting it short would end every
    /// bootstrapped edge's session at the CA's notAfter at once (the relay
    /// closes sessions whose certificate expired). The CA's expiry is
    /// alerted on ahead (`relay_tls_cert_not_after_seconds`,
    /// `listener="bootstrap_issuer"`).
    pub fn issue(
        &self,
        node: &str,
        public_key_der: &[u8],
        now: SystemTime,
    ) -> Result<Issued, IssueError> {
        let spki = SubjectPublicKeyInfo::from_der(public_key_der)
            .map_err(|e| IssueError::PublicKey(e.to_string()))?;
        let mut p = CertificateParams::new(vec![node.to_string()])
            .map_err(|_| IssueError::NodeName(node.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let not_before = now.checked_sub(CLOCK_SLACK).unwrap_or(now);
        let not_after = now + self.lifetime;
        p.not_before = to_offset(not_before)?;
        p.not_after = to_offset(not_after)?;
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            not_before,
            not_after,
        })
    }
}

/// The validity window of a certificate (PEM): `(not_before, not_after)`.
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), IssueError> {
    let bad = |e: &dyn std::fmt::Display| IssueError::PublicKey(format!("certificate: {e}"));
    let der =
        crate::tls::certs_from_pem(cert_pem.as_bytes(), "certificate").map_err(|e| bad(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).map_err(|e| bad(&e))?;
    let t = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let v = cert.validity();
    Ok((t(v.not_before.timestamp()), t(v.not_after.timestamp())))
}

/// A fresh key pair for an edge's certificate request: the private key
/// (PEM, stays on the edge) and the public key (DER SubjectPublicKeyInfo,
/// sent to the relay).
pub fn node_key() -> Result<(String, Vec<u8>), IssueError> {
    let key = KeyPair::generate().map_err(|e| IssueError::Sign(e.to_string()))?;
    Ok((key.serialize_pem(), key.subject_public_key_info()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcerts::DevPki;
    use crate::tls::{cert_names_node, certs_from_pem};

    #[test]
    fn issued_certificates_name_one_node_live_at_most_a_day_and_chain_to_the_ca() {
        let pki = DevPki::generate(&["localhost"], &[]).unwrap();
        let (ca_cert, ca_key) = pki.ca_pem_pair();
        let issuer =
            NodeIssuer::from_pem(&ca_cert, &ca_key, Duration::from_secs(48 * 3600)).unwrap();
        assert_eq!(issuer.lifetime(), MAX_LIFETIME - CLOCK_SLACK);
        let (_key, public) = node_key().unwrap();
        let now = SystemTime::now();
        let got = issuer.issue("edge-7", &public, now).unwrap();
        assert!(got.not_after.duration_since(got.not_before).unwrap() <= MAX_LIFETIME);
        let (nb, na) = validity(&got.cert_pem).unwrap();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(
            (secs(nb), secs(na)),
            (secs(got.not_before), secs(got.not_after))
        );
        let der = certs_from_pem(got.cert_pem.as_bytes(), "issued").unwrap();
        assert!(cert_names_node(&der[0], "edge-7"));
        assert!(!cert_names_node(&der[0], "edge-8"));
        // Garbage keys and names are typed errors.
        assert!(matches!(
            issuer.issue("edge-7", b"not a key", now),
            Err(IssueError::PublicKey(_))
        ));
        assert!(NodeIssuer::from_pem("x", &ca_key, Duration::from_secs(60)).is_err());
    }
}
