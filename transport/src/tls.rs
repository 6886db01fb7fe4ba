//! TLS material and rustls configurations.
//!
//! Every config is built with an explicit [`provider()`] (ring), so the
//! whole workspace uses exactly one crypto provider whatever else is linked.
//! Binaries also call [`install_default_provider`] so that any library that
//! asks rustls for "the default" gets the same one.
//!
//! Every peer verifier built here (and in [`crate::reload`]) accepts a
//! peer certificate whose notBefore lies up to
//! [`CLOCK_SLACK`](crate::issue::CLOCK_SLACK) in the future: issuers such
//! as cert-manager start a certificate at the moment they sign it, and a
//! verifier whose clock is a little behind theirs would otherwise refuse
//! it until the clock caught up. notAfter gets no slack: an expired
//! certificate is refused as before.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::clock_skew::{SkewTolerantClientVerifier, SkewTolerantServerVerifier};

/// Loading TLS material or building a config failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PEM text held no item of the expected kind.
    #[error("{what}: no {kind} found in PEM")]
    Missing {
        /// Which input (file path or description).
        what: String,
        /// "certificate" or "private key".
        kind: &'static str,
    },
    /// PEM text is malformed.
    #[error("{what}: bad PEM: {source}")]
    Pem {
        /// Which input.
        what: String,
        /// The parse error.
        source: std::io::Error,
    },
    /// rustls refused the material (key does not match, bad CA, ...).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// Building the peer verifier failed.
    #[error("verifier: {0}")]
    Verifier(String),
}

/// The crypto provider used everywhere in this workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider()`] as the process default; harmless if already set.
pub fn install_default_provider() {
    // Err means a default is already installed; configs here pass the
    // provider explicitly, so which one won does not matter to us.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate chain, its private key, and the CA that peers must chain to.
pub struct TlsMaterial {
    /// Our certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for the peer's certificate.
    pub ca: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("chain", &self.chain.len())
            .field("key", &"MASKED")
            .field("ca", &self.ca.len())
            .finish()
    }
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl TlsMaterial {
    /// Whether `other` holds the same chain, key and CA: files read again
    /// after a change to their metadata alone (a `chmod`, a relabel, a
    /// backup tool restoring times) hold what was in use.
    pub fn same_as(&self, other: &TlsMaterial) -> bool {
        self.chain == other.chain
            && self.ca == other.ca
            && self.key.secret_der() == other.key.secret_der()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses every certificate in PEM text.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what: what.to_string(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// Parses the first private key in PEM text.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing {
            what: what.to_string(),
            kind: "private key",
        })
}

impl TlsMaterial {
    /// Material from PEM text (used by tests and the demo, which generate
    /// certificates in memory).
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> Result<Self, TlsError> {
        Ok(TlsMaterial {
            chain: certs_from_pem(cert.as_bytes(), "certificate")?,
            key: key_from_pem(key.as_bytes(), "private key")?,
            ca: certs_from_pem(ca.as_bytes(), "CA")?,
        })
    }

    /// Material from PEM files; errors name the file.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        Ok(TlsMaterial {
            chain: certs_from_pem(&read(cert)?, &cert.display().to_string())?,
            key: key_from_pem(&read(key)?, &key.display().to_string())?,
            ca: certs_from_pem(&read(ca)?, &ca.display().to_string())?,
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// A server config that requires a client certificate from our CA.
    /// TLS 1.3 only: QUIC demands it, and the TCP fallback has no reason to
    /// offer less.
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config_for(&[alpn], false)
    }

    /// A server config offering several ALPNs. With `anonymous_ok`, a
    /// client may present no certificate at all (one it presents must
    /// still verify): for the certificate bootstrap, whose clients have
    /// none yet. The tunnel then refuses certificate-less hellos itself.
    pub fn server_config_for(
        &self,
        alpns: &[&[u8]],
        anonymous_ok: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider());
        if anonymous_ok {
            builder = builder.allow_unauthenticated();
        }
        let verifier = builder
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(SkewTolerantClientVerifier::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        without_resumption(&mut cfg);
        Ok(cfg)
    }

    /// A server config for HTTPS without client certificates (the admin
    /// API, whose clients authenticate with a bearer token instead),
    /// presenting this material's certificate chain. TLS 1.3 only.
    pub fn server_config_without_client_auth(
        &self,
        alpn: &[u8],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// A client config presenting our certificate and trusting only our CA
    /// (the relay CA is pinned; system roots are never consulted).
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier(self.roots()?)?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }
}

/// Makes a server config that verifies client certificates refuse TLS
/// session resumption: no tickets sent, no sessions kept.
///
/// A resumed TLS 1.3 handshake takes the client's certificate chain from
/// the stored session and verifies nothing (rustls, as the RFC allows):
/// an edge whose certificate was revoked (`tls.crl`), whose CA was dropped
/// or whose certificate expired would get back in with a ticket from
/// before, for as long as the relay kept the session. Our own clients
/// never resume (each attempt builds a new client config), so this costs
/// them nothing; the relay also keeps no session cache (256 entries, about
/// 0.3 MB, two tickets issued per handshake).
pub(crate) fn without_resumption(cfg: &mut rustls::ServerConfig) {
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// The verifier of a server's certificate for our client configs: webpki
/// against `roots` only, with the notBefore slack (module docs). Set
/// through rustls's "dangerous" builder only because that is the way to
/// pass a verifier of our own type; the verification is webpki's.
fn server_verifier(roots: RootCertStore) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(SkewTolerantServerVerifier::new(webpki))
}

/// A client config without a client certificate that trusts only the CA
/// certificates in the PEM file `ca` (never the system roots): for HTTPS
/// clients of the relay's admin API such as the route agent.
pub fn ca_only_client_config(ca: &Path, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    anonymous_client_config(
        &certs_from_pem(&read(ca)?, &ca.display().to_string())?,
        alpn,
    )
}

/// A client config without a client certificate trusting only `ca`: the
/// route agent towards the admin API, and an edge asking for its first
/// certificate.
pub fn anonymous_client_config(
    ca: &[CertificateDer<'static>],
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(roots)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Whether the (already chain-verified) leaf certificate names `node`
/// in its subject alternative names. The relay calls this to bind a
/// hello's node name to the TLS identity.
pub fn cert_names_node(leaf: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(name) = ServerName::try_from(node) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => cert.verify_is_valid_for_subject_name(&name).is_ok(),
        Err(_) => false,
    }
}
