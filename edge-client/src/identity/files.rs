//! The edge's certificate files, read again when they change.
//!
//! The relay's CA reaches edges as a file (in Kubernetes a ConfigMap the
//! kubelet swaps in place); a CA renewed with a new key (cert-manager's
//! default `rotationPolicy: Always` since 1.18) leaves every edge that read
//! only the old one unable to reconnect until its pod restarts. So each
//! attempt first compares the files' stamps (`relay_transport::reload::FileStamp`:
//! another file behind the path, or its size or times) with those last
//! read, and takes what changed: in bootstrap mode the
//! relay CA (for the bootstrap exchange and the certificate in use), with
//! a certificate given by hand also the certificate and key. A file that
//! fails to load keeps what was in use, with a warning; it is read again
//! when it changes again.

use std::path::Path;
use std::sync::Mutex;

use relay_transport::reload::{stamp_of, Stamp};
use relay_transport::tls::certs_from_pem;
use relay_transport::TlsMaterial;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use super::{Cert, Credentials};
use crate::config::{BootstrapConfig, EdgeConfig, EdgeTlsFiles, Identity};

/// What was last read of the files.
#[derive(Debug)]
pub(super) struct FileState {
    stamp: Stamp,
    /// The relay CA read again since the start (bootstrap mode), in force
    /// over the configured one.
    relay_ca: Option<Vec<CertificateDer<'static>>>,
}

/// The stamp of `f`'s files.
fn stamp(f: &EdgeTlsFiles) -> Stamp {
    let paths: Vec<&Path> = [
        f.cert.as_deref(),
        f.key.as_deref(),
        Some(f.relay_ca.as_path()),
    ]
    .into_iter()
    .flatten()
    .collect();
    stamp_of(&paths)
}

impl FileState {
    /// The state of `cfg`'s files as loaded at start; `None` for a config
    /// built by code (nothing to read again).
    pub(super) fn at_start(cfg: &EdgeConfig) -> Option<Mutex<FileState>> {
        cfg.tls_files.as_ref().map(|f| {
            Mutex::new(FileState {
                stamp: stamp(f),
                relay_ca: None,
            })
        })
    }
}

impl Credentials {
    /// `b` with the relay CA in force (read again if it changed).
    pub(super) fn bootstrap_now(&self, b: &BootstrapConfig) -> BootstrapConfig {
        let ca = self
            .files
            .as_ref()
            .and_then(|f| f.lock().unwrap_or_else(|e| e.into_inner()).relay_ca.clone());
        BootstrapConfig {
            relay_ca: ca.unwrap_or_else(|| b.relay_ca.clone()),
            ..b.clone()
        }
    }

    /// Takes what changed in the certificate files since they were last
    /// read (see the module docs).
    pub(super) fn reload_files(&self, cfg: &EdgeConfig) {
        let (Some(files), Some(paths)) = (&self.files, &cfg.tls_files) else {
            return;
        };
        let now = stamp(paths);
        let mut st = files.lock().unwrap_or_else(|e| e.into_inner());
        if st.stamp == now {
            return;
        }
        st.stamp = now;
        let ca_file = paths.relay_ca.display();
        match (&cfg.identity, &paths.cert, &paths.key) {
            (Identity::Static(_), Some(cert), Some(key)) => {
                match TlsMaterial::from_files(cert, key, &paths.relay_ca) {
                    Ok(m) => {
                        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                        // Only another certificate, key or CA moves the
                        // session: not a file's metadata alone.
                        if current.as_ref().is_some_and(|c| c.material.same_as(&m)) {
                            debug!(cert = %cert.display(), "certificate files touched; they hold what is in use");
                            return;
                        }
                        info!(cert = %cert.display(), relay_ca = %ca_file, "certificate files changed; dialling with what they hold now");
                        *current = Some(Cert::given(m));
                        self.given_changes
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        warn!(error = %e, "certificate files changed but do not load; keeping the ones in use")
                    }
                }
            }
            (Identity::Bootstrap(b), _, _) => {
                let read = std::fs::read(&paths.relay_ca)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| {
                        certs_from_pem(&pem, "tls.relay_ca").map_err(|e| e.to_string())
                    });
                match read {
                    // Compared with the CA in force: the configured one
                    // until the file was read again.
                    Ok(ca) if *st.relay_ca.as_ref().unwrap_or(&b.relay_ca) == ca => {
                        debug!(relay_ca = %ca_file, "relay CA file touched; it holds what is in use");
                    }
                    Ok(ca) => {
                        info!(relay_ca = %ca_file, "relay CA changed; trusting what the file holds now");
                        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(c) = current.as_mut() {
                            c.material.ca = ca.clone();
                        }
                        st.relay_ca = Some(ca);
                    }
                    Err(e) => {
                        warn!(error = %e, relay_ca = %ca_file, "relay CA changed but does not load; keeping the one in use")
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use relay_transport::devcerts::DevPki;

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        certs_from_pem(pem.as_bytes(), "ca").unwrap()
    }

    /// A relay CA renewed under a new key, and a certificate given by
    /// hand renewed, are taken at the next attempt; a file that does not
    /// load keeps what was in use.
    #[test]
    fn changed_files_are_taken_and_broken_ones_are_not() {
        relay_transport::tls::install_default_provider();
        let dir = std::env::temp_dir().join(format!("edge-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (
            DevPki::generate(&["relay.test"], &["edge-a"]).unwrap(),
            DevPki::generate(&["relay.test"], &["edge-a"]).unwrap(),
        );
        a.write_to(&dir).unwrap();
        let ca_path = dir.join("ca.pem");
        let text = format!(
            "node = \"edge-a\"\nrelay = \"relay.test:8443\"\n[tls]\ncert = \"{d}/edge-a.pem\"\nkey = \"{d}/edge-a-key.pem\"\nrelay_ca = \"{d}/ca.pem\"\n",
            d = dir.display()
        );
        let cfg = FileConfig::parse(&text).unwrap().into_runtime().unwrap();
        let creds = Credentials::new(&cfg);
        let ca_now = || creds.get().unwrap().material.ca;
        assert_eq!(ca_now(), der(&a.ca_cert));
        creds.reload_files(&cfg);
        assert_eq!(ca_now(), der(&a.ca_cert), "nothing changed");
        let moves = || creds.given_changes(&cfg);
        assert_eq!(moves(), Some(0));
        // Metadata alone (a chmod moves the change time; the stamp sees
        // it): the same certificate, no move to a new connection.
        let before = relay_transport::reload::file_stamp(&ca_path);
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            use std::os::unix::fs::PermissionsExt;
            let p = std::fs::Permissions::from_mode(0o640);
            std::fs::set_permissions(&ca_path, p).unwrap();
        }
        assert_ne!(relay_transport::reload::file_stamp(&ca_path), before);
        assert_eq!(moves(), Some(0), "a chmod is not a new certificate");
        // b's CA and certificate (a trailing newline: the size changes
        // whatever the clock's resolution).
        std::fs::write(&ca_path, format!("{}\n", b.ca_cert)).unwrap();
        let b_dir = dir.join("b");
        b.write_to(&b_dir).unwrap();
        for f in ["edge-a.pem", "edge-a-key.pem"] {
            std::fs::copy(b_dir.join(f), dir.join(f)).unwrap();
        }
        creds.reload_files(&cfg);
        let m = creds.get().unwrap().material;
        let b_node = b.node_material("edge-a").unwrap();
        assert_eq!((m.ca, m.chain), (der(&b.ca_cert), b_node.chain));
        assert_eq!(moves(), Some(1), "another certificate moves the session");
        std::fs::write(&ca_path, "not a certificate\n\n").unwrap();
        creds.reload_files(&cfg);
        assert_eq!(
            ca_now(),
            der(&b.ca_cert),
            "a broken file keeps the CA in use"
        );

        // Bootstrap mode: the CA alone, for the exchange and the
        // certificate in use.
        std::fs::write(&ca_path, &a.ca_cert).unwrap();
        let text = format!(
            "node = \"edge-a\"\nrelay = \"relay.test:8443\"\n[tls]\nrelay_ca = \"{d}/ca.pem\"\n[bootstrap]\ntoken_file = \"{d}/token\"\nstate_dir = \"{d}/state\"\n",
            d = dir.display()
        );
        let cfg = FileConfig::parse(&text).unwrap().into_runtime().unwrap();
        let Identity::Bootstrap(boot) = &cfg.identity else {
            panic!("bootstrap mode")
        };
        let creds = Credentials::new(&cfg);
        assert_eq!(creds.bootstrap_now(boot).relay_ca, der(&a.ca_cert));
        // Touched, holding the configured CA: nothing taken (it was
        // taken, and logged as a change, when compared with nothing).
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            use std::os::unix::fs::PermissionsExt;
            let p = std::fs::Permissions::from_mode(0o600);
            std::fs::set_permissions(&ca_path, p).unwrap();
        }
        creds.reload_files(&cfg);
        let taken = |c: &Credentials| {
            let f = c.files.as_ref().unwrap();
            f.lock().unwrap().relay_ca.is_some()
        };
        assert!(!taken(&creds), "the configured CA is the one in the file");
        std::fs::write(&ca_path, format!("{}\n", b.ca_cert)).unwrap();
        creds.reload_files(&cfg);
        assert!(taken(&creds));
        assert_eq!(creds.bootstrap_now(boot).relay_ca, der(&b.ca_cert));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
