//! The certificate sections of relay.toml: `[tls]` (the relay's identity
//! towards edges, with revocation and reloading) and the plain
//! `cert`/`key`/`client_ca` triple other sections use.

use std::path::PathBuf;
use std::time::Duration;

use relay_transport::reload::TlsPaths;
use relay_transport::TlsMaterial;
use rustls::pki_types::CertificateRevocationListDer;
use serde::Deserialize;

use crate::config::{err, ConfigError};

/// `[tls]`-style certificate paths.
#[derive(Debug, Deserialize)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA that peers' certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

impl TlsFiles {
    pub(crate) fn load(&self, section: &str) -> Result<TlsMaterial, ConfigError> {
        TlsMaterial::from_files(&self.cert, &self.key, &self.client_ca).map_err(|e| err(section, e))
    }
}

/// The relay's `[tls]`: [`TlsFiles`] plus revocation and reloading.
#[derive(Debug, Deserialize)]
pub struct RelayTlsFiles {
    /// Relay certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA(s) edge certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) for edge certificates.
    pub crl: Option<PathBuf>,
    /// How often the files are checked for changes (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
}

/// Where the relay reloads its TLS identity from, and how often it looks.
#[derive(Debug, Clone)]
pub struct TlsReload {
    /// The files.
    pub paths: TlsPaths,
    /// Poll interval for changes (SIGHUP reloads at once).
    pub interval: Duration,
}

/// Default of `tls.reload_interval`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// What `[tls]` resolves to: the material, its CRLs, and the reload setup.
pub type LoadedTls = (
    TlsMaterial,
    Vec<CertificateRevocationListDer<'static>>,
    Option<TlsReload>,
);

impl RelayTlsFiles {
    pub(crate) fn load(&self) -> Result<LoadedTls, ConfigError> {
        let paths = TlsPaths {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
            crl: self.crl.clone(),
        };
        let interval = self.reload_interval.unwrap_or(DEFAULT_RELOAD_INTERVAL);
        if interval < Duration::from_secs(1) {
            return Err(err("tls.reload_interval", "must be at least 1s"));
        }
        let field = match &self.crl {
            Some(_) => "tls (or tls.crl)",
            None => "tls",
        };
        let (m, crls) = paths.load().map_err(|e| err(field, e))?;
        // The CRLs must also be acceptable to the verifier (a CRL not
        // signed in a form webpki reads is refused here, not at the first
        // handshake).
        relay_transport::reload::ReloadableServerTls::new(&m, &crls, false)
            .map_err(|e| err(field, e))?;
        Ok((m, crls, Some(TlsReload { paths, interval })))
    }
}
