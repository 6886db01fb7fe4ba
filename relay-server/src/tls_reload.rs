//! The relay's TLS identities — its own (certificate, key, client CA and
//! CRLs: QUIC and the TCP fallback), the CONNECT listener's
//! (`[connect_tls]`, with its own CRLs) and the admin API's — reloaded from their files on
//! SIGHUP ([`crate::Relay::reload_tls`]) and when a poll every
//! `tls.reload_interval` sees them change. A reload
//! applies to new handshakes; one of `[tls]` that changed the client CA or
//! the CRLs also has every live edge session's certificate verified again
//! with the new material, and the sessions it refuses closed (revoked, or
//! from a CA no longer trusted: `session::cert_check`); the
//! others stay up. Connections through the CONNECT listener are not
//! verified again. A failed reload (half-written file, key
//! not matching the certificate) changes nothing and is retried every
//! interval until the files load, so a renewal tool writing them one by
//! one is harmless.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use relay_transport::reload::{ReloadableServerTls, TlsPaths};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A reload could not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The relay was configured by code, with no files to read.
    #[error("no [tls] files to reload from (config built by code)")]
    NoFiles,
    /// Reading or using the files failed; the previous identity stays.
    #[error(transparent)]
    Tls(#[from] relay_transport::TlsError),
    /// The new client CA bundle leaves out the CA that issues bootstrap
    /// certificates: every certificate the relay has issued, and every
    /// one it would issue, would be refused at the next handshake (the
    /// whole fleet locked out as sessions reconnect). Refused; the
    /// previous identity stays.
    #[error("tls.client_ca no longer holds the bootstrap issuer's CA ({subject}): every certificate it issued would be refused; keep it there until the relay issues with the new CA (bootstrap.ca_cert is read at start: restart the relay with the new one first)")]
    IssuerDropped {
        /// The issuing CA certificate's subject, for the operator.
        subject: String,
    },
}

/// One listener's reloadable TLS and the files it is reloaded from.
#[derive(Clone)]
pub(crate) struct Target {
    /// `tls` (QUIC and the TCP fallback), `connect_tls` or `admin`.
    pub name: &'static str,
    /// What its handshakes read.
    pub state: Arc<ReloadableServerTls>,
    /// Where it comes from.
    pub paths: TlsPaths,
    /// A CA the reloaded client CA bundle must still hold: the bootstrap
    /// issuer's, for the relay's own `tls` (see [`ReloadError::IssuerDropped`]).
    pub must_trust: Option<CertificateDer<'static>>,
    /// Where its reloads are recorded: its relay's registry, which that
    /// relay's `/metrics` reads.
    pub files: Arc<FileStatuses>,
    /// The relay whose edge sessions this listener's client verification
    /// vouches for (the relay's own `tls`, set by [`watch_sessions`]):
    /// verified again after a reload that changed the client CA or the
    /// CRLs. `None` for the other listeners.
    pub sessions: Option<Weak<crate::server::Shared>>,
}

/// Has the relay `shared`'s live sessions verified again after each reload
/// of its own `tls` target in `targets` that changes the client CA or
/// CRLs (see [`Target::sessions`]).
pub(crate) fn watch_sessions(targets: &mut [Target], shared: &Arc<crate::server::Shared>) {
    for t in targets.iter_mut().filter(|t| t.name == "tls") {
        t.sessions = Some(Arc::downgrade(shared));
    }
}

impl Target {
    /// Reads the files and puts what they hold in the state; returns the
    /// leaf now served. The outcome is recorded for `/metrics` (see
    /// [`FileStatuses::get`]): the served leaf's expiry, or one more
    /// failure.
    pub(crate) fn reload(&self) -> Result<CertificateDer<'static>, ReloadError> {
        let r = self.load();
        self.files
            .record(self.name, &self.paths.cert, r.as_ref().ok());
        r
    }

    fn load(&self) -> Result<CertificateDer<'static>, ReloadError> {
        let (m, crls) = self.paths.load()?;
        if let Some(issuer) = &self.must_trust {
            if !trusts(&m.ca, issuer) {
                let subject = x509_parser::parse_x509_certificate(issuer.as_ref())
                    .map_or_else(|_| "unparsable".into(), |(_, c)| c.subject().to_string());
                return Err(ReloadError::IssuerDropped { subject });
            }
        }
        let trust_changed = self.state.replace(&m, &crls)?;
        info!(
            listener = self.name,
            cert = %self.paths.cert.display(),
            crls = crls.len(),
            client_trust_changed = trust_changed,
            "tls reloaded: new handshakes use it"
        );
        if let (true, Some(shared)) = (trust_changed, &self.sessions) {
            crate::session::cert_check::spawn_recheck(shared, self.state.clone());
        }
        // `replace` refuses an empty chain, so there is a leaf.
        self.state
            .chain()
            .into_iter()
            .next()
            .ok_or(ReloadError::NoFiles)
    }
}

/// What `/metrics` says of one listener's certificate file: when the leaf
/// last loaded from it expires, and how many reloads of it failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStatus {
    /// The served leaf's notAfter (Unix seconds), once a reload took it;
    /// `None` until then (the relay still serves what it started with).
    pub not_after: Option<i64>,
    /// Reloads from this file that failed (the previous identity stayed).
    pub reload_failures: u64,
}

/// One relay's reload outcomes by listener and certificate file, shared
/// by its reload [`Target`]s and its `/metrics` (one per relay, not per
/// process: a second relay in the process, or one restarted in it, must
/// not report an earlier one's expiry and failures). Keyed by listener
/// and file: the admin API reloads the `[tls]` files by default, and the
/// listener tells them apart.
#[derive(Debug, Default)]
pub(crate) struct FileStatuses(Mutex<BTreeMap<(&'static str, PathBuf), FileStatus>>);

impl FileStatuses {
    fn record(
        &self,
        listener: &'static str,
        cert: &Path,
        served: Option<&CertificateDer<'static>>,
    ) {
        let mut files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = files.entry((listener, cert.to_path_buf())).or_default();
        match served {
            Some(leaf) => e.not_after = not_after(leaf).or(e.not_after),
            None => e.reload_failures += 1,
        }
    }

    /// The reload outcomes recorded for `listener` reloading from
    /// certificate file `cert` (all zero before its first reload).
    pub(crate) fn get(&self, listener: &'static str, cert: &Path) -> FileStatus {
        let files = self.0.lock().unwrap_or_else(|p| p.into_inner());
        files
            .get(&(listener, cert.to_path_buf()))
            .copied()
            .unwrap_or_default()
    }
}

/// A certificate's notAfter in Unix seconds (`None`: not parsable).
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// Whether `bundle` holds CA certificate `ca`, or one with the same
/// subject and public key: a CA re-issued with its key kept (a new
/// validity period, as cert-manager renews a CA) vouches for the same
/// certificates, so it counts; byte equality alone would refuse it.
pub(crate) fn trusts(bundle: &[CertificateDer<'static>], ca: &CertificateDer<'static>) -> bool {
    let name_and_key = |c: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(c.as_ref())
            .ok()
            .map(|(_, c)| (c.subject().as_raw().to_vec(), c.public_key().raw.to_vec()))
    };
    let want = name_and_key(ca);
    bundle
        .iter()
        .any(|c| c == ca || (want.is_some() && name_and_key(c) == want))
}

/// A listener's own reloadable TLS from `m` and `crls` (client
/// certificates required when its server config asks for them), added to
/// `targets` when it has `files` to reload from.
pub(crate) fn listener_tls(
    name: &'static str,
    m: &relay_transport::TlsMaterial,
    crls: &[CertificateRevocationListDer<'static>],
    files: Option<&TlsPaths>,
    targets: &mut Vec<Target>,
    statuses: &Arc<FileStatuses>,
) -> Result<Arc<ReloadableServerTls>, relay_transport::TlsError> {
    let state = ReloadableServerTls::new(m, crls, false)?;
    if let Some(paths) = files {
        targets.push(Target {
            name,
            state: state.clone(),
            paths: paths.clone(),
            must_trust: None,
            files: statuses.clone(),
            sessions: None,
        });
    }
    Ok(state)
}

/// Reloads every target; returns the first target's new leaf (the
/// relay's own `[tls]`), or the first error (the others are still tried:
/// one listener's broken file does not hold back another's renewal).
pub(crate) fn reload_all(targets: &[Target]) -> Result<CertificateDer<'static>, ReloadError> {
    let mut first: Option<Result<CertificateDer<'static>, ReloadError>> = None;
    for t in targets {
        let r = t.reload();
        if let Err(e) = &r {
            warn!(listener = t.name, error = %e, "tls reload failed; keeping the previous identity");
        }
        match (&first, r) {
            (None, r) => first = Some(r),
            (Some(Ok(_)), Err(e)) => first = Some(Err(e)),
            _ => {}
        }
    }
    first.unwrap_or(Err(ReloadError::NoFiles))
}

/// Polls each target's files every `interval` and reloads a target whose
/// files changed (logging a failure and keeping its previous identity),
/// until `stop`.
pub(crate) async fn watch(targets: Vec<Target>, interval: Duration, stop: CancellationToken) {
    let mut seen: Vec<_> = targets.iter().map(|t| t.paths.stamp()).collect();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (t, seen) in targets.iter().zip(seen.iter_mut()) {
            let now = t.paths.stamp();
            if now == *seen {
                continue;
            }
            // Stat and read run on this task: a few small files, once per change.
            match t.reload() {
                Ok(_) => *seen = now,
                Err(e) => {
                    warn!(listener = t.name, error = %e, "tls files changed but could not be loaded; keeping the previous ones")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_transport::devcerts::DevPki;

    /// A client CA bundle that drops the bootstrap issuer's CA is refused
    /// (the fleet's certificates would all fail their next handshake) and
    /// the previous identity stays; one that keeps it, beside a new CA, is
    /// taken, and so is the issuer's CA renewed with its name and key.
    #[test]
    fn a_client_ca_without_the_bootstrap_issuer_is_refused() {
        relay_transport::tls::install_default_provider();
        let dir = std::env::temp_dir().join(format!("tls-reload-issuer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = DevPki::generate(&["relay.test"], &[]).unwrap();
        pki.write_to(&dir).unwrap();
        let other = DevPki::generate(&["relay.test"], &[]).unwrap();
        let (other_ca, _) = other.ca_pem_pair();
        let (ca, _) = pki.ca_pem_pair();
        let issuer = relay_transport::tls::certs_from_pem(ca.as_bytes(), "ca").unwrap()[0].clone();
        let paths = TlsPaths {
            cert: dir.join("relay.pem"),
            key: dir.join("relay-key.pem"),
            client_ca: dir.join("ca.pem"),
            crl: None,
        };
        let state = ReloadableServerTls::new(&pki.relay_material().unwrap(), &[], true).unwrap();
        let t = Target {
            name: "tls",
            state,
            paths: paths.clone(),
            must_trust: Some(issuer),
            files: Arc::default(),
            sessions: None,
        };
        t.reload().expect("the issuer's CA is there");
        // The issuer's CA renewed with its key kept (a new validity): the
        // same certificates verify, so it counts as the issuer's.
        let renewed = pki.reissued_ca_pem().unwrap();
        assert_ne!(renewed, ca);
        std::fs::write(&paths.client_ca, &renewed).unwrap();
        t.reload().expect("the issuer's CA, renewed with its key");
        // Rotation, step one: the new CA beside the old one.
        std::fs::write(&paths.client_ca, format!("{ca}{other_ca}")).unwrap();
        t.reload().expect("both CAs");
        // The old CA dropped while the relay still issues with it.
        std::fs::write(&paths.client_ca, &other_ca).unwrap();
        let e = t.reload().expect_err("the issuer dropped");
        assert!(matches!(e, ReloadError::IssuerDropped { .. }), "{e}");
        assert!(e.to_string().contains("restart the relay"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// rcgen's default notAfter, which `DevPki` keeps: 4096-01-01T00:00:00Z.
    const DEV_NOT_AFTER: i64 = 67_090_118_400;

    /// `/metrics` shows the served certificate's notAfter from the start
    /// and after a reload, and counts a reload that failed (a key not
    /// matching the certificate), which leaves the expiry as it was. The
    /// admin API reloading the same files (its default) counts its own.
    #[test]
    fn metrics_show_the_served_expiry_and_count_failed_reloads() {
        relay_transport::tls::install_default_provider();
        let dir = std::env::temp_dir().join(format!("tls-reload-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = DevPki::generate(&["relay.test"], &[]).unwrap();
        pki.write_to(&dir).unwrap();
        let paths = TlsPaths {
            cert: dir.join("relay.pem"),
            key: dir.join("relay-key.pem"),
            client_ca: dir.join("ca.pem"),
            crl: None,
        };
        let m = pki.relay_material().unwrap();
        let files: Arc<FileStatuses> = Arc::default();
        let t = Target {
            name: "tls",
            state: ReloadableServerTls::new(&m, &[], false).unwrap(),
            paths: paths.clone(),
            must_trust: None,
            files: files.clone(),
            sessions: None,
        };
        let render_of = |files: &FileStatuses| {
            crate::metrics::render_tls(
                &["tls", "admin"].map(|listener| crate::metrics::ServedCert {
                    listener,
                    leaf: m.chain.first(),
                    file: Some(&paths.cert),
                }),
                files,
            )
        };
        let render = || render_of(&files);
        let expiry =
            format!("relay_tls_cert_not_after_seconds{{listener=\"tls\"}} {DEV_NOT_AFTER}\n");
        let text = render();
        assert!(text.contains(&expiry), "{text}");
        assert!(
            text.contains("relay_tls_reload_failures_total{listener=\"tls\"} 0\n"),
            "{text}"
        );
        t.reload().expect("the dev files load");
        assert_eq!(files.get("tls", &paths.cert).not_after, Some(DEV_NOT_AFTER));
        // Another relay's key: does not match the certificate.
        let other = DevPki::generate(&["relay.test"], &[]).unwrap();
        std::fs::write(&paths.key, other.relay.key.as_bytes()).unwrap();
        t.reload().expect_err("the key does not match");
        reload_all(std::slice::from_ref(&t)).expect_err("still not");
        let text = render();
        assert!(
            text.contains("relay_tls_reload_failures_total{listener=\"tls\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("relay_tls_reload_failures_total{listener=\"admin\"} 0\n"),
            "{text}"
        );
        assert!(text.contains(&expiry), "{text}");
        // Another relay in the process (a lab test's second, or this one
        // restarted) reloading the same files: its registry is its own.
        let text = render_of(&FileStatuses::default());
        assert!(
            text.contains("relay_tls_reload_failures_total{listener=\"tls\"} 0\n"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
