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
//! replacement applies to the next handshakes by itself; the relay
//! verifies its live sessions' certificates again with
//! [`ReloadableServerTls::verify_peer`] after a replacement that changed
//! the client CA or the CRLs ([`ReloadableServerTls::replace`] says so),
//! and closes those the new material refuses.
//!
//! [`TlsPaths`] names the files, loads them, and tells whether they changed
//! since the last load ([`FileStamp`]: another file behind the path, or
//! its size or times), for a watcher that polls them.
//!
//! A client certificate the verifier refuses is examined (why, which node
//! it names, whether our CA signed it) for the accept loop of the
//! connection that presented it, when that loop asked ([`RefusalSlot`],
//! see [`refused`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::clock_skew::SkewTolerantClientVerifier;
use crate::tls::{provider, TlsError, TlsMaterial};

pub mod refused;
mod stamp;
pub use refused::{ClientCertRefusal, RefusalCause, RefusalSlot};
pub use stamp::{file_stamp, stamp_of, FileStamp, Stamp};

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
    /// What the client verification was built from (see [`trust_digest`]).
    trust: [u8; 32],
}

/// A SHA-256 digest of the client CA certificates and the CRLs, in order:
/// whether a reload changed what client certificates are verified
/// against (the relay then verifies its live sessions again) without
/// keeping a second copy of a CRL that may be large.
fn trust_digest(ca: &[CertificateDer<'_>], crls: &[CertificateRevocationListDer<'_>]) -> [u8; 32] {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    // Lengths before contents, and the count of each list: two different
    // sets never hash the same bytes.
    for part in [ca.len() as u64, crls.len() as u64] {
        d.update(&part.to_be_bytes());
    }
    let ders = ca
        .iter()
        .map(|c| c.as_ref())
        .chain(crls.iter().map(|c| c.as_ref()));
    for der in ders {
        d.update(&(der.len() as u64).to_be_bytes());
        d.update(der);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
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
        trust: trust_digest(&m.ca, crls),
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
    /// not match its certificate, a bad CRL) nothing changes. Returns
    /// whether what client certificates are verified against changed (the
    /// client CA certificates or the CRLs, byte for byte): only then may a
    /// certificate verified before be refused now.
    pub fn replace(
        &self,
        m: &TlsMaterial,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<bool, TlsError> {
        let next = build(m, crls, self.anonymous_ok)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = current.trust != next.trust;
        *current = next;
        Ok(changed)
    }

    /// Verifies a client certificate (`end_entity`, with the
    /// `intermediates` it came with) at `now` as a handshake would now:
    /// the current client CA and CRLs, the same clock-skew slack for
    /// notBefore, none for notAfter. For a session verified at its
    /// handshake with material that has since been replaced. A refusal is
    /// examined as a handshake's is ([`ClientCertRefusal`]: why, which
    /// node the certificate names).
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), ClientCertRefusal> {
        let verifier = self.now().verifier;
        let verify = |t| {
            verifier
                .verify_client_cert(end_entity, intermediates, t)
                .map(drop)
        };
        verify(now).map_err(|e| refused::examine(&e, end_entity, verify))
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
        crate::tls::without_resumption(&mut cfg);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcerts::DevPki;
    use std::time::{Duration, SystemTime};

    fn leaf_of(pki: &DevPki, node: &str) -> CertificateDer<'static> {
        let (_, pair) = pki.nodes.iter().find(|(n, _)| n == node).unwrap();
        crate::tls::certs_from_pem(pair.cert.as_bytes(), "leaf")
            .unwrap()
            .remove(0)
    }

    /// A live session's certificate verified again after a reload: taken
    /// while nothing refuses it; refused as revoked once a CRL lists it
    /// (the other edge's still taken), as from an unknown CA once its CA
    /// left the bundle, and as expired past its notAfter, each naming the
    /// node. `replace` says whether the client CA or the CRLs changed: a
    /// renewal of the server certificate alone changes neither.
    #[test]
    fn live_certificates_are_verified_again_with_the_replaced_material() {
        crate::tls::install_default_provider();
        let mut pki = DevPki::generate(&["relay.test"], &["edge-0", "edge-1"]).unwrap();
        let past = SystemTime::now() - Duration::from_secs(3600);
        pki.add_node_until("edge-2", past).unwrap();
        let m = pki.relay_material().unwrap();
        let tls = ReloadableServerTls::new(&m, &[], false).unwrap();
        let now = UnixTime::now();
        let (e0, e1, e2) = (
            leaf_of(&pki, "edge-0"),
            leaf_of(&pki, "edge-1"),
            leaf_of(&pki, "edge-2"),
        );
        tls.verify_peer(&e0, &[], now)
            .expect("edge-0 before the CRL");
        // A renewed server certificate: client trust unchanged.
        let renewed = pki.issue_relay(&["relay.test"]).unwrap();
        let m2 = TlsMaterial::from_pem(&renewed.cert, &renewed.key, &pki.ca_cert).unwrap();
        assert!(
            !tls.replace(&m2, &[]).unwrap(),
            "only the server certificate changed"
        );
        // A CRL revoking edge-0.
        let crl = pki.crl_revoking(&[&pki.nodes[0].1.cert]).unwrap();
        let crls = crls_from_pem(crl.as_bytes(), "crl").unwrap();
        assert!(tls.replace(&m2, &crls).unwrap(), "a new CRL");
        assert!(!tls.replace(&m2, &crls).unwrap(), "the same CRL again");
        let r = tls.verify_peer(&e0, &[], now).expect_err("edge-0 revoked");
        assert_eq!(r.cause, RefusalCause::Revoked);
        assert_eq!(r.node.as_deref(), Some("edge-0"));
        assert!(r.authentic);
        tls.verify_peer(&e1, &[], now).expect("edge-1 not revoked");
        // Past its notAfter: expired, at that time, our CA's.
        let r = tls.verify_peer(&e2, &[], now).expect_err("edge-2 expired");
        assert_eq!(r.cause, RefusalCause::Expired);
        assert_eq!(r.node.as_deref(), Some("edge-2"));
        assert!(r.authentic);
        let at =
            r.at.unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
        let want = past.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(at.as_secs(), want.as_secs());
        // The edges' CA dropped from the bundle.
        let other = DevPki::generate(&["relay.test"], &[]).unwrap();
        let m3 = TlsMaterial::from_pem(&renewed.cert, &renewed.key, &other.ca_cert).unwrap();
        assert!(tls.replace(&m3, &[]).unwrap(), "another client CA");
        let r = tls
            .verify_peer(&e1, &[], now)
            .expect_err("edge-1's CA gone");
        assert_eq!(r.cause, RefusalCause::UnknownCa);
        assert!(!r.authentic);
    }

    /// A client that keeps its session tickets (one client config for
    /// every attempt, unlike our edges) never resumes: a revoked edge
    /// cannot get back in with a ticket from before the revocation (a
    /// resumed TLS 1.3 handshake verifies no certificate). Both handshakes
    /// are full ones, and after the CRL lists it the second is refused.
    #[tokio::test]
    async fn a_client_keeping_its_tickets_gets_full_handshakes_and_no_way_around_a_crl() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        crate::tls::install_default_provider();
        let pki = DevPki::generate(&["relay.test"], &["edge-0"]).unwrap();
        let tls = ReloadableServerTls::new(&pki.relay_material().unwrap(), &[], false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            tls.server_config(&[relay_protocol::ALPN]).unwrap(),
        ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut t) = acceptor.accept(s).await {
                        // Answer one byte, so the client reads the tickets a
                        // server would send after its handshake.
                        let mut b = [0u8; 1];
                        if t.read_exact(&mut b).await.is_ok() {
                            let _ = t.write_all(&b).await;
                            let _ = t.flush().await;
                        }
                    }
                });
            }
        });
        // One config, so its in-memory resumption store is shared.
        let client = Arc::new(
            pki.node_material("edge-0")
                .unwrap()
                .client_config(relay_protocol::ALPN)
                .unwrap(),
        );
        let connect = || {
            let client = client.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(at).await?;
                let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
                let mut t = tokio_rustls::TlsConnector::from(client)
                    .connect(name, tcp)
                    .await?;
                t.write_all(b"x").await?;
                let mut b = [0u8; 1];
                t.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(t.get_ref().1.handshake_kind())
            }
        };
        for i in 0..2 {
            assert_eq!(
                connect().await.unwrap(),
                Some(rustls::HandshakeKind::Full),
                "handshake {i}"
            );
        }
        let crl = pki.crl_revoking(&[&pki.nodes[0].1.cert]).unwrap();
        let crls = crls_from_pem(crl.as_bytes(), "crl").unwrap();
        tls.replace(&pki.relay_material().unwrap(), &crls).unwrap();
        assert!(connect().await.is_err(), "revoked, tickets or not");
    }

    /// The digest tells the CA list from the CRL list: the same bytes
    /// moved from one to the other are a change.
    #[test]
    fn the_trust_digest_tells_the_lists_apart() {
        let a = CertificateDer::from(vec![1u8, 2, 3]);
        let c = CertificateRevocationListDer::from(vec![1u8, 2, 3]);
        assert_ne!(
            trust_digest(std::slice::from_ref(&a), &[]),
            trust_digest(&[], std::slice::from_ref(&c))
        );
        let b = CertificateDer::from(vec![1u8, 2, 3]);
        assert_eq!(trust_digest(&[a], &[]), trust_digest(&[b], &[]));
    }
}
