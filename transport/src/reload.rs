//! Server TLS that can change while the server runs: a new certificate and
//! key (renewal), a new client CA bundle (rotation) and certificate
//! revocation lists, without restarting and without touching sessions
//! already established.
//!
//! [`ReloadableServerTls`] is both the certificate resolver and the client
//! certificate verifier of one `rustls::ServerConfig`, built once and
//! shared by the QUIC endpoint and the TCP fallback. Each handshake reads
//! the current certificate and verifier; [`ReloadableServerTls::replace`]
//! swaps them. A TLS session is verified once, at its handshake, so a
//! replacement applies to the next handshakes only: live sessions keep
//! running, and a revoked edge is refused when it next connects (the
//! operator can close its session through the admin API to force that).
//!
//! [`TlsPaths`] names the files, loads them, and tells whether they changed
//! since the last load (modification time and size), for a watcher that
//! polls them.
//!
//! A client certificate the verifier refuses is examined (why, which node
//! it names, whether our CA signed it) for the accept loop of the
//! connection that presented it, when that loop asked ([`RefusalSlot`],
//! see [`refused`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::clock_skew::SkewTolerantClientVerifier;
use crate::tls::{provider, TlsError, TlsMaterial};

pub mod refused;
pub use refused::{ClientCertRefusal, RefusalCause, RefusalSlot};

/// Certificate revocation lists from PEM text (`-----BEGIN X509 CRL-----`);
/// at least one must be there.
pub fn crls_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = rustls_pemfile::crls(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if crls.is_empty() {
        return Err(TlsError::Missing {
            what: what.to_string(),
            kind: "CRL",
        });
    }
    Ok(crls)
}

/// The files of a reloadable server identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA(s) client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM), if any.
    pub crl: Option<PathBuf>,
}

/// What [`TlsPaths::stamp`] compares: each file's modification time and
/// size (a renewal tool that rewrites a file in the same second with a
/// different length is still seen).
pub type Stamp = Vec<Option<(SystemTime, u64)>>;

impl TlsPaths {
    /// Loads the material and the CRLs; errors name the file.
    pub fn load(
        &self,
    ) -> Result<(TlsMaterial, Vec<CertificateRevocationListDer<'static>>), TlsError> {
        let m = TlsMaterial::from_files(&self.cert, &self.key, &self.client_ca)?;
        let crls = match &self.crl {
            Some(p) => crls_from_pem(&read(p)?, &p.display().to_string())?,
            None => Vec::new(),
        };
        Ok((m, crls))
    }

    /// The files' current stamps; a change means "reload".
    pub fn stamp(&self) -> Stamp {
        let paths: Vec<&Path> = [
            Some(&self.cert),
            Some(&self.key),
            Some(&self.client_ca),
            self.crl.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
        stamp_of(&paths)
    }
}

/// The stamps of `paths` (see [`Stamp`]), following symlinks (a
/// Kubernetes volume swaps its files by replacing a symlink).
pub fn stamp_of(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The current identity and client verifier of a server config (see the
/// module docs).
#[derive(Debug)]
pub struct ReloadableServerTls {
    current: RwLock<Current>,
    anonymous_ok: bool,
}

#[derive(Debug, Clone)]
struct Current {
    cert: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

fn build(
    m: &TlsMaterial,
    crls: &[CertificateRevocationListDer<'static>],
    anonymous_ok: bool,
) -> Result<Current, TlsError> {
    let cert = CertifiedKey::from_der(m.chain.clone(), m.key.clone_key(), &provider())?;
    let mut roots = RootCertStore::empty();
    for c in &m.ca {
        roots.add(c.clone())?;
    }
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        // Leaf certificates only (edges' chains are CA → leaf), and a
        // certificate whose issuer has no CRL here is not refused for it:
        // during a CA rotation only one CA may publish a list.
        b = b
            .with_crls(crls.iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    if anonymous_ok {
        b = b.allow_unauthenticated();
    }
    let webpki = b.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(Current {
        cert: Arc::new(cert),
        // The same notBefore slack as every verifier in tls.rs; the CRLs
        // stay in the inner verifier, which also makes the retry's call.
        verifier: SkewTolerantClientVerifier::new(webpki),
    })
}

impl ReloadableServerTls {
    /// From `m` (our chain and key; the CA clients chain to) and `crls`.
    /// With `anonymous_ok`, a client may present no certificate (the
    /// certificate bootstrap; one it presents must still verify).
    pub fn new(
        m: &TlsMaterial,
        crls: &[CertificateRevocationListDer<'static>],
        anonymous_ok: bool,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ReloadableServerTls {
            current: RwLock::new(build(m, crls, anonymous_ok)?),
            anonymous_ok,
        }))
    }

    /// Replaces certificate, key, client CA and CRLs for the next
    /// handshakes. Everything is built first: on an error (a key that does
    /// not match its certificate, a bad CRL) nothing changes.
    pub fn replace(
        &self,
        m: &TlsMaterial,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<(), TlsError> {
        let next = build(m, crls, self.anonymous_ok)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The certificate chain served now (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.now().cert.cert.clone()
    }

    fn now(&self) -> Current {
        // A poisoned lock would only mean a panic while swapping two Arcs.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A TLS 1.3 server config resolving its certificate and verifying
    /// clients through `self`, offering `alpns`.
    pub fn server_config(
        self: &Arc<Self>,
        alpns: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.clone())
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }
}

impl ReloadableServerTls {
    /// A TLS 1.3 server config resolving its certificate through `self`
    /// and asking clients for none (the admin API: clients authenticate
    /// with a bearer token), offering `alpn`.
    pub fn server_config_without_client_auth(
        self: &Arc<Self>,
        alpn: &[u8],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }
}

impl ResolvesServerCert for ReloadableServerTls {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.now().cert)
    }
}

impl ClientCertVerifier for ReloadableServerTls {
    fn offer_client_auth(&self) -> bool {
        self.now().verifier.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.now().verifier.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to outlive a swap; they are optional (RFC
        // 8446 4.2.4) and our edges have exactly one certificate to send.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.now().verifier;
        let verified = verifier.verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &verified {
            // For the accept loop of this connection, if it asked (see
            // `refused`); the same verifier checks the chain again.
            refused::note(|| {
                refused::examine(e, end_entity, |t| {
                    verifier
                        .verify_client_cert(end_entity, intermediates, t)
                        .map(drop)
                })
            });
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.now().verifier.supported_verify_schemes()
    }
}
