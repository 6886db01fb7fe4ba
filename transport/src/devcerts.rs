//! A development PKI generated on the fly: one CA, a relay certificate and
//! one client certificate per edge node (SAN = node name), so a newcomer
//! needs no openssl. Not for production: keys are written unencrypted.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::tls::{TlsError, TlsMaterial};

/// A certificate and its key, PEM encoded.
#[derive(Clone)]
pub struct PemPair {
    /// Certificate PEM.
    pub cert: String,
    /// Private key PEM (PKCS#8).
    pub key: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PemPair { key: MASKED }")
    }
}

/// A generated CA with a relay certificate and node certificates.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate, PEM (trusted by both sides).
    pub ca_cert: String,
    /// The relay's server certificate.
    pub relay: PemPair,
    /// `(node name, client certificate)` for every node.
    pub nodes: Vec<(String, PemPair)>,
    ca_issuer_params: CertificateParams,
    ca_key_pem: String,
}

fn leaf(
    names: &[String],
    cn: &str,
    eku: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<PemPair, rcgen::Error> {
    leaf_until(names, cn, eku, issuer, None)
}

/// [`leaf`], expiring at `not_after` when given (else rcgen's default,
/// 4096-01-01).
fn leaf_until(
    names: &[String],
    cn: &str,
    eku: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
    not_after: Option<std::time::SystemTime>,
) -> Result<PemPair, rcgen::Error> {
    let mut p = CertificateParams::new(names.to_vec())?;
    if let Some(t) = not_after {
        p.not_after = time::OffsetDateTime::from(t);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

impl DevPki {
    /// Generates a CA, a relay certificate valid for `relay_names` (DNS
    /// names or IP addresses) and a client certificate for each node.
    pub fn generate(relay_names: &[&str], nodes: &[&str]) -> Result<Self, rcgen::Error> {
        Self::generate_with_ca_name("edge-relay development CA", relay_names, nodes)
    }

    /// [`DevPki::generate`] with the CA's common name `ca_name`: a second
    /// client CA trusted beside the first (webpki does not try a second
    /// CA of the same name).
    pub fn generate_with_ca_name(
        ca_name: &str,
        relay_names: &[&str],
        nodes: &[&str],
    ) -> Result<Self, rcgen::Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        ca.distinguished_name = dn;
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca.clone(), ca_key);
        let names: Vec<String> = relay_names.iter().map(|s| s.to_string()).collect();
        let relay = leaf(
            &names,
            "edge-relay",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        )?;
        let mut pki = DevPki {
            ca_cert,
            relay,
            nodes: Vec::new(),
            ca_issuer_params: ca,
            ca_key_pem,
        };
        for n in nodes {
            pki.add_node(n)?;
        }
        Ok(pki)
    }

    /// Issues a client certificate for one more node.
    pub fn add_node(&mut self, node: &str) -> Result<&PemPair, rcgen::Error> {
        let key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = Issuer::new(self.ca_issuer_params.clone(), key);
        let pair = leaf(
            &[node.to_string()],
            node,
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        )?;
        self.nodes.push((node.to_string(), pair));
        Ok(&self.nodes[self.nodes.len() - 1].1)
    }

    /// Issues a client certificate for one more node that expires at
    /// `not_after` (to the second; valid from 1975 on): a short-lived
    /// certificate, or one already expired.
    pub fn add_node_until(
        &mut self,
        node: &str,
        not_after: std::time::SystemTime,
    ) -> Result<&PemPair, rcgen::Error> {
        let pair = leaf_until(
            &[node.to_string()],
            node,
            ExtendedKeyUsagePurpose::ClientAuth,
            &self.issuer()?,
            Some(not_after),
        )?;
        self.nodes.push((node.to_string(), pair));
        Ok(&self.nodes[self.nodes.len() - 1].1)
    }

    /// The CA's certificate issued again with its name and key and a
    /// later validity start (PEM): a CA renewal that keeps the key, as
    /// cert-manager renews a CA, vouching for the same certificates.
    pub fn reissued_ca_pem(&self) -> Result<String, rcgen::Error> {
        let key = KeyPair::from_pem(&self.ca_key_pem)?;
        let mut params = self.ca_issuer_params.clone();
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        Ok(params.self_signed(&key)?.pem())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, rcgen::Error> {
        let key = KeyPair::from_pem(&self.ca_key_pem)?;
        Ok(Issuer::new(self.ca_issuer_params.clone(), key))
    }

    /// A new server certificate (new key) for `names`, from this CA: a
    /// renewal of the relay's certificate.
    pub fn issue_relay(&self, names: &[&str]) -> Result<PemPair, rcgen::Error> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        leaf(
            &names,
            "edge-relay",
            ExtendedKeyUsagePurpose::ServerAuth,
            &self.issuer()?,
        )
    }

    /// A certificate revocation list (PEM) signed by this CA, revoking the
    /// certificates `revoked` (PEM), valid from an hour ago for a day.
    pub fn crl_revoking(&self, revoked: &[&str]) -> Result<String, rcgen::Error> {
        let now = time::OffsetDateTime::now_utc();
        let mut list = Vec::new();
        for pem in revoked {
            let der = rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .and_then(Result::ok)
                .ok_or(rcgen::Error::CouldNotParseCertificate)?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            list.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(cert.tbs_certificate.raw_serial()),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: list,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer()?)?.pem()
    }

    /// The CA's certificate and private key (PEM): the issuing CA for the
    /// certificate bootstrap in tests and the demo.
    pub fn ca_pem_pair(&self) -> (String, String) {
        (self.ca_cert.clone(), self.ca_key_pem.clone())
    }

    /// The relay's material (server certificate, trusting the CA).
    pub fn relay_material(&self) -> Result<TlsMaterial, TlsError> {
        TlsMaterial::from_pem(&self.relay.cert, &self.relay.key, &self.ca_cert)
    }

    /// A node's TLS material (client cert, trusting this CA for the relay).
    pub fn node_material(&self, node: &str) -> Result<TlsMaterial, TlsError> {
        let (_, pair) =
            self.nodes
                .iter()
                .find(|(n, _)| n == node)
                .ok_or_else(|| TlsError::Missing {
                    what: format!("dev PKI node {node:?}"),
                    kind: "certificate",
                })?;
        TlsMaterial::from_pem(&pair.cert, &pair.key, &self.ca_cert)
    }

    /// Writes `ca.pem`, `relay.pem`, `relay-key.pem`, `<node>.pem` and
    /// `<node>-key.pem` into `dir` (created if missing). Refuses to
    /// overwrite existing files, so a real PKI is never clobbered.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut files: Vec<(String, &str)> = vec![
            ("ca.pem".into(), &self.ca_cert),
            ("relay.pem".into(), &self.relay.cert),
            ("relay-key.pem".into(), &self.relay.key),
        ];
        for (n, p) in &self.nodes {
            files.push((format!("{n}.pem"), &p.cert));
            files.push((format!("{n}-key.pem"), &p.key));
        }
        let mut written = Vec::new();
        for (name, _) in &files {
            let path = dir.join(name);
            if path.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists; refusing to overwrite", path.display()),
                ));
            }
        }
        for (name, content) in files {
            let path = dir.join(&name);
            std::fs::write(&path, content)?;
            if name.ends_with("-key.pem") {
                restrict(&path)?;
            }
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cert_names_node;

    #[test]
    fn node_certificate_names_its_node_only() {
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-1", "edge-2"]).unwrap();
        let m = pki.node_material("edge-1").unwrap();
        assert!(cert_names_node(&m.chain[0], "edge-1"));
        assert!(!cert_names_node(&m.chain[0], "edge-2"));
        assert!(!cert_names_node(&m.chain[0], "not a name"));
        // Configs build, so key and certificate agree.
        m.client_config(b"x").unwrap();
        pki.relay_material().unwrap().server_config(b"x").unwrap();
        assert!(pki.node_material("edge-3").is_err());
    }

    #[test]
    fn write_to_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("devpki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = DevPki::generate(&["localhost"], &["n1"]).unwrap();
        assert_eq!(pki.write_to(&dir).unwrap().len(), 5);
        assert!(pki.write_to(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
