//! The certificate sections of relay.toml: `[tls]` (the relay's identity
//! towards edges) and `[connect_tls]` (the CONNECT listener's, towards
//! kube-apiserver), each with revocation lists and reloading.

use std::path::PathBuf;
use std::time::Duration;

use relay_transport::reload::TlsPaths;
use relay_transport::TlsMaterial;
use rustls::pki_types::CertificateRevocationListDer;
use serde::Deserialize;

use crate::config::{err, ConfigError};

/// `[connect_tls]`: the CONNECT listener's certificate, the CA its clients'
/// certificates must chain to, and their revocation lists. Reloaded with
/// the relay's `[tls]` (same poll, same SIGHUP).
#[derive(Debug, Deserialize)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA that peers' certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) for the clients' certificates.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The paths as reloading reads them.
    pub(crate) fn paths(&self) -> TlsPaths {
        TlsPaths {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
            crl: self.crl.clone(),
        }
    }

    /// The material and CRLs, checked as [`load_checked`] does.
    pub(crate) fn load(&self, section: &str) -> Result<Loaded, ConfigError> {
        load_checked(&self.paths(), section)
    }
}

/// Certificate material and its revocation lists.
pub type Loaded = (TlsMaterial, Vec<CertificateRevocationListDer<'static>>);

/// Loads `paths` and builds the verifier once, so that a CRL webpki cannot
/// read (or a key that does not match its certificate) is refused at
/// start, naming `section` (and its `crl` when one is set), not at the
/// first handshake.
fn load_checked(paths: &TlsPaths, section: &str) -> Result<Loaded, ConfigError> {
    let field = match &paths.crl {
        Some(_) => format!("{section} (or {section}.crl)"),
        None => section.to_string(),
    };
    let (m, crls) = paths.load().map_err(|e| err(&field, e))?;
    relay_transport::reload::ReloadableServerTls::new(&m, &crls, false)
        .map_err(|e| err(&field, e))?;
    Ok((m, crls))
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
        let (m, crls) = load_checked(&paths, "tls")?;
        Ok((m, crls, Some(TlsReload { paths, interval })))
    }
}
