//! The edge's identity towards the relay: a node certificate it was given,
//! or one it obtains from the relay with the pod's projected
//! service-account token and renews before it expires.
//!
//! Bootstrap, step by step: read the token (afresh: the kubelet rotates
//! it), make a key pair (the private key never leaves the edge), connect to
//! the relay under the bootstrap ALPN without a client certificate, send
//! the node name, token and public key, receive a certificate naming this
//! node only, keep both in the state directory (so a restart while the
//! relay is away still has one). Renewal starts at two thirds of the
//! certificate's life, on a separate connection, and the session moves to
//! a new connection with the new certificate (the relay keeps the routes:
//! the new session supersedes the old one in one step).
//!
//! Clocks: boards without a real-time clock may boot in 1970. The edge
//! verifies the relay's certificate against its own clock, so with a wrong
//! clock no connection can be made at all, bootstrap included; the error
//! then says to set the clock. Issued certificates are valid from five
//! minutes before issuance, and the edge warns when its clock and the
//! relay's differ by more than that.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_protocol::bootstrap::{CertReply, CertRequest, BOOTSTRAP_ALPN};
use relay_protocol::codec::{read_frame, write_frame};
use relay_protocol::{close_code, Rejection, PROTOCOL_VERSION};
use relay_transport::issue::{node_key, validity, CLOCK_SLACK};
use relay_transport::tls::{cert_names_node, certs_from_pem, key_from_pem};
use relay_transport::TlsMaterial;
use tracing::{info, warn};

use crate::config::{BootstrapConfig, EdgeConfig, Identity};

/// Why no certificate could be had.
#[derive(Debug)]
pub(crate) enum IdentityError {
    /// The relay refused the request (typed).
    Refused(Rejection),
    /// Anything else: no token, relay unreachable, state dir unwritable.
    Failed(String),
}

#[derive(Clone)]
struct Cert {
    material: TlsMaterial,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Cert {
    /// Two thirds into its life: time to get the next one. Life counts
    /// from issuance, which is [`CLOCK_SLACK`] after the relay's
    /// `not_before`.
    fn renew_at(&self) -> SystemTime {
        let issued = (self.not_before + CLOCK_SLACK).min(self.not_after);
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life * 2 / 3
    }
}

/// The certificate the edge dials with.
pub(crate) struct Credentials {
    current: Mutex<Option<Cert>>,
    /// One bootstrap at a time (a renewal and a reconnect may both ask).
    obtaining: tokio::sync::Mutex<()>,
}

fn state_files(b: &BootstrapConfig, node: &str) -> (PathBuf, PathBuf) {
    (
        b.state_dir.join(format!("{node}.pem")),
        b.state_dir.join(format!("{node}-key.pem")),
    )
}

/// The certificate kept from an earlier run, if it is still for this node
/// and not expired.
fn load_kept(b: &BootstrapConfig, node: &str) -> Option<Cert> {
    let (cert_path, key_path) = state_files(b, node);
    let cert_pem = std::fs::read_to_string(cert_path).ok()?;
    let key_pem = std::fs::read(key_path).ok()?;
    let cert = build(b, node, &cert_pem, &key_pem).ok()?;
    (cert.not_after > SystemTime::now()).then_some(cert)
}

fn build(b: &BootstrapConfig, node: &str, cert_pem: &str, key_pem: &[u8]) -> Result<Cert, String> {
    let chain =
        certs_from_pem(cert_pem.as_bytes(), "issued certificate").map_err(|e| e.to_string())?;
    if !cert_names_node(&chain[0], node) {
        return Err(format!("the issued certificate does not name node {node}"));
    }
    let key = key_from_pem(key_pem, "node key").map_err(|e| e.to_string())?;
    let (not_before, not_after) = validity(cert_pem).map_err(|e| e.to_string())?;
    Ok(Cert {
        material: TlsMaterial {
            chain,
            key,
            ca: b.relay_ca.clone(),
        },
        not_before,
        not_after,
    })
}

/// Writes `data` to `path` through a temporary file and a rename, so a
/// crash never leaves half a certificate; `private` files are 0600.
pub(crate) fn write_atomic(path: &Path, data: &[u8], private: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A hint for TLS failures caused by this edge's clock.
pub(crate) fn clock_hint(error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("not valid yet") || lower.contains("notvalidyet") || lower.contains("expired")
    {
        let now = humantime_now();
        format!(
            "{error} — this edge's clock says {now}: if that is wrong (boards without a real-time clock boot in 1970), set the time (NTP) before the relay's certificate can be verified"
        )
    } else {
        error.to_string()
    }
}

fn humantime_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs} seconds after 1970-01-01 UTC")
}

impl Credentials {
    /// Starts from the configured certificate, or the one kept in the
    /// state directory.
    pub(crate) fn new(cfg: &EdgeConfig) -> Self {
        let current = match &cfg.identity {
            Identity::Static(m) => Some(Cert {
                material: m.clone(),
                not_before: UNIX_EPOCH,
                // A given certificate is used as it is; its expiry is the
                // operator's (the relay refuses it once expired).
                not_after: SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600),
            }),
            Identity::Bootstrap(b) => load_kept(b, &cfg.node),
        };
        Credentials {
            current: Mutex::new(current),
            obtaining: tokio::sync::Mutex::new(()),
        }
    }

    fn get(&self) -> Option<Cert> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// When the current certificate should be renewed (bootstrap only).
    pub(crate) fn renew_at(&self, cfg: &EdgeConfig) -> Option<SystemTime> {
        match cfg.identity {
            Identity::Static(_) => None,
            Identity::Bootstrap(_) => self.get().map(|c| c.renew_at()),
        }
    }

    /// The material to dial with: obtains a certificate when there is none
    /// or the current one is due for renewal.
    pub(crate) async fn material(
        &self,
        cfg: &EdgeConfig,
        dial: &super::dial::Dialer<'_>,
    ) -> Result<TlsMaterial, IdentityError> {
        if let Some(c) = self.get() {
            if matches!(cfg.identity, Identity::Static(_)) || SystemTime::now() < c.renew_at() {
                return Ok(c.material);
            }
        }
        self.renew(cfg, dial).await
    }

    /// Obtains a new certificate now (bootstrap only).
    pub(crate) async fn renew(
        &self,
        cfg: &EdgeConfig,
        dial: &super::dial::Dialer<'_>,
    ) -> Result<TlsMaterial, IdentityError> {
        let Identity::Bootstrap(b) = &cfg.identity else {
            return self
                .get()
                .map(|c| c.material)
                .ok_or_else(|| IdentityError::Failed("no certificate".into()));
        };
        let _one = self.obtaining.lock().await;
        // With several relay replicas every session comes due at once; the
        // first renews, the others take its certificate.
        if let Some(c) = self.get() {
            if SystemTime::now() < c.renew_at() {
                return Ok(c.material);
            }
        }
        let cert = obtain(cfg, b, dial).await?;
        let material = cert.material.clone();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(cert);
        Ok(material)
    }
}

/// One bootstrap exchange with the relay.
async fn obtain(
    cfg: &EdgeConfig,
    b: &BootstrapConfig,
    dial: &super::dial::Dialer<'_>,
) -> Result<Cert, IdentityError> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| IdentityError::Failed(format!("{what}: {e}"));
    let token = read_token(&b.token_file).map_err(IdentityError::Failed)?;
    let (key_pem, public_key) = node_key().map_err(|e| fail("key", &e))?;
    let tls = relay_transport::tls::anonymous_client_config(&b.relay_ca, BOOTSTRAP_ALPN)
        .map_err(|e| fail("tls config", &e))?;
    let (endpoint, conn) = dial
        .dial(tls)
        .await
        .map_err(|e| IdentityError::Failed(clock_hint(&format!("bootstrap connection: {e}"))))?;
    let exchange = async {
        let mut bi = conn.open_bi().await.map_err(|e| fail("open stream", &e))?;
        let req = CertRequest {
            version: PROTOCOL_VERSION,
            node: cfg.node.clone(),
            token,
            public_key,
        };
        write_frame(&mut bi.send, &req)
            .await
            .map_err(|e| fail("send request", &e))?;
        read_frame::<_, CertReply>(&mut bi.recv)
            .await
            .map_err(|e| fail("read reply", &e))
    };
    let reply = tokio::time::timeout(cfg.handshake_timeout, exchange)
        .await
        .map_err(|_| {
            IdentityError::Failed(format!("no certificate within {:?}", cfg.handshake_timeout))
        })?;
    conn.close(close_code::NORMAL, "bootstrap done");
    if let Some(ep) = endpoint {
        ep.close(close_code::NORMAL.into(), b"");
    }
    let issued = match reply? {
        CertReply::Issued(i) => i,
        CertReply::Refused(r) => return Err(IdentityError::Refused(r)),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skew = now.abs_diff(issued.relay_time_unix);
    if skew > CLOCK_SLACK.as_secs() {
        warn!(
            skew_secs = skew,
            "this edge's clock differs from the relay's by more than {CLOCK_SLACK:?}: certificates may look expired or not yet valid; set the time (NTP)"
        );
    }
    let cert =
        build(b, &cfg.node, &issued.cert_pem, key_pem.as_bytes()).map_err(IdentityError::Failed)?;
    std::fs::create_dir_all(&b.state_dir)
        .map_err(|e| fail(&b.state_dir.display().to_string(), &e))?;
    let (cert_path, key_path) = state_files(b, &cfg.node);
    write_atomic(&key_path, key_pem.as_bytes(), true)
        .map_err(|e| fail(&key_path.display().to_string(), &e))?;
    write_atomic(&cert_path, issued.cert_pem.as_bytes(), false)
        .map_err(|e| fail(&cert_path.display().to_string(), &e))?;
    info!(
        not_after_unix = issued.not_after_unix,
        "node certificate obtained from the relay"
    );
    Ok(cert)
}

/// The token, read afresh (bounded: a token is a few KiB).
fn read_token(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    if meta.len() > 64 * 1024 {
        return Err(format!(
            "token file {} is larger than 64 KiB",
            path.display()
        ));
    }
    let t =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_errors_get_a_hint_and_others_do_not() {
        let h = clock_hint(
            "invalid peer certificate: certificate not valid yet: verification time 5 (UNIX)",
        );
        assert!(h.contains("set the time (NTP)"), "{h}");
        assert_eq!(clock_hint("connection refused"), "connection refused");
    }
}
