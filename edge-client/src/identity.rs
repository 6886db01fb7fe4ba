//! The edge's identity towards the relay: a node certificate it was given,
//! or one it obtains from the relay with the pod's projected
//! service-account token and renews before it expires.
//!
//! Bootstrap, step by step: read the token (afresh: the kubelet rotates
//! it), make a key pair (the private key never leaves the edge), connect to
//! the relay under the bootstrap ALPN without a client certificate, send
//! the node name, token and public key, receive a certificate naming this
//! node only, keep both in the state directory (so a restart while the
//! relay is away still has one). Renewal starts at a point drawn between
//! 0.6 and 0.8 of the certificate's life, on a separate connection, and the session moves to
//! a new connection with the new certificate (the relay keeps the routes:
//! the new session supersedes the old one in one step). Until renewal
//! succeeds, reconnects dial with the certificate the edge has, as long as
//! it is valid: the bootstrap's own path (the apiserver reviewing tokens)
//! may be what is down.
//!
//! Clocks: boards without a real-time clock may boot in 1970. The edge
//! verifies the relay's certificate against its own clock, so with a wrong
//! clock no connection can be made at all, bootstrap included; the error
//! then says to set the clock. Issued certificates are valid from five
//! minutes before issuance, and the edge warns when its clock and the
//! relay's differ by more than that.

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
    not_after: SystemTime,
    /// When to get the next one, by this edge's clock (see
    /// [`renew_at`] and [`Cert::timed_by_relay`]).
    renew_at: SystemTime,
    /// A relay refused it at TLS ([`Credentials::refused`]): the next
    /// attempt bootstraps a new one, and dials with this one only if that
    /// fails (another replica may still take it).
    refused: bool,
}

/// Least time between two bootstraps a TLS refusal causes: a replica that
/// refuses every certificate (its clock far behind, its client CA not yet
/// updated in a rollout) must not make its edges bootstrap on every
/// attempt.
const REFUSAL_PAUSE: Duration = Duration::from_secs(600);

/// About two thirds into a certificate's life: time to get the next one
/// ([`renewal_point`]). Life counts from issuance, which is
/// [`CLOCK_SLACK`] after the relay's `not_before`.
fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let issued = (not_before + CLOCK_SLACK).min(not_after);
    renewal_point(issued, not_after.duration_since(issued).unwrap_or_default())
}

/// Share of a certificate's life after which it is renewed, drawn per
/// certificate from this range (around two thirds). A fixed point kept a
/// fleet in step: after an outage longer than a third of the life, every
/// edge came back due at once, renewed together (a TokenReview and a pod
/// read each at the apiserver, a session move each at the relay), and
/// stayed together at every renewal after.
const RENEW_SHARE: std::ops::Range<f64> = 0.6..0.8;

/// A point drawn in [`RENEW_SHARE`] of a life of `life` that began at
/// `from`.
fn renewal_point(from: SystemTime, life: Duration) -> SystemTime {
    from + life.mul_f64(rand::random_range(RENEW_SHARE))
}

/// A certificate this close to expiry is renewed before dialling with it
/// (the handshake must finish while it is valid): a minute, or a quarter
/// of the last third of a short life.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

impl Cert {
    /// Times renewal from the moment the certificate arrived, `now` by this
    /// edge's clock, and the life it had left by the relay's (its clock at
    /// issuance, `relay_time_unix`): an edge whose clock is hours off
    /// neither renews in a loop (ahead: every new certificate already
    /// looks due) nor lets it expire first (behind).
    fn timed_by_relay(
        mut self,
        now: SystemTime,
        relay_time_unix: u64,
        not_after_unix: u64,
    ) -> Self {
        if relay_time_unix > 0 && not_after_unix > relay_time_unix {
            let left = Duration::from_secs(not_after_unix - relay_time_unix);
            // A peer's numbers: a life past what the clock can hold keeps
            // the certificate's own timing (`now + left` would panic).
            if let Some(not_after) = now.checked_add(left) {
                self.renew_at = renewal_point(now, left);
                self.not_after = not_after;
            }
        }
        self
    }

    /// A certificate given to the edge, used as it is: its expiry is the
    /// operator's (the relay refuses it once expired).
    fn given(material: TlsMaterial) -> Cert {
        let never = SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        Cert {
            material,
            not_after: never,
            renew_at: never,
            refused: false,
        }
    }

    /// Whether the relay still takes it, by this edge's best reckoning.
    fn valid_for_a_handshake(&self, now: SystemTime) -> bool {
        let last_third = self
            .not_after
            .duration_since(self.renew_at)
            .unwrap_or_default();
        now + EXPIRY_MARGIN.min(last_third / 4) < self.not_after
    }
}

/// The certificate the edge dials with.
pub(crate) struct Credentials {
    current: Mutex<Option<Cert>>,
    /// When a TLS refusal last led to a bootstrap (see [`REFUSAL_PAUSE`]).
    refusal_bootstrap: Mutex<Option<std::time::Instant>>,
    /// One bootstrap at a time (a renewal and a reconnect may both ask).
    obtaining: tokio::sync::Mutex<()>,
    /// The certificate files as last read (`None`: a config built by
    /// code); see [`files`].
    files: Option<Mutex<files::FileState>>,
    /// How many times a certificate given by hand was taken again from
    /// its changed files (see [`Credentials::given_changes`]).
    given_changes: std::sync::atomic::AtomicU64,
}

mod files;

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
    let cert = build(b, node, &cert_pem, &key_pem)
        .map_err(|e| warn!(error = %e, "the kept node certificate is unusable; a new one is bootstrapped"))
        .ok()?;
    (cert.not_after > SystemTime::now()).then_some(cert)
}

fn build(b: &BootstrapConfig, node: &str, cert_pem: &str, key_pem: &[u8]) -> Result<Cert, String> {
    let chain =
        certs_from_pem(cert_pem.as_bytes(), "issued certificate").map_err(|e| e.to_string())?;
    if !cert_names_node(&chain[0], node) {
        return Err(format!("the issued certificate does not name node {node}"));
    }
    let key = key_from_pem(key_pem, "node key").map_err(|e| e.to_string())?;
    // The two files are written one after the other: after a crash or a
    // full disk between them, the kept pair may not belong together.
    rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        key.clone_key(),
        &relay_transport::tls::provider(),
    )
    .map_err(|e| format!("the node key does not match the certificate: {e}"))?;
    let (not_before, not_after) = validity(cert_pem).map_err(|e| e.to_string())?;
    Ok(Cert {
        material: TlsMaterial {
            chain,
            key,
            ca: b.relay_ca.clone(),
        },
        not_after,
        renew_at: renew_at(not_before, not_after),
        refused: false,
    })
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
            Identity::Static(m) => Some(Cert::given(m.clone())),
            Identity::Bootstrap(b) => load_kept(b, &cfg.node),
        };
        Credentials {
            current: Mutex::new(current),
            obtaining: tokio::sync::Mutex::new(()),
            refusal_bootstrap: Mutex::new(None),
            files: files::FileState::at_start(cfg),
            given_changes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn get(&self) -> Option<Cert> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// With a certificate given by hand (files), reads the files again if
    /// they changed and says how many times a new certificate was taken
    /// from them: a session that saw another count when it started runs on
    /// the old one and should move to the new (the relay closes a session
    /// whose certificate expires, and cert-manager renews the files well
    /// before that). `None` for a bootstrapped identity (it renews on its
    /// own schedule, [`Credentials::renew_at`]) or a config built by code.
    pub(crate) fn given_changes(&self, cfg: &EdgeConfig) -> Option<u64> {
        if !matches!(cfg.identity, Identity::Static(_)) || self.files.is_none() {
            return None;
        }
        self.reload_files(cfg);
        Some(
            self.given_changes
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// When the current certificate should be renewed (bootstrap only).
    pub(crate) fn renew_at(&self, cfg: &EdgeConfig) -> Option<SystemTime> {
        match cfg.identity {
            Identity::Static(_) => None,
            Identity::Bootstrap(_) => self.get().map(|c| c.renew_at),
        }
    }

    /// The material to dial with: the current certificate while the relay
    /// still takes it, even when it is due for renewal (a session renews it
    /// once up, see `session`: so a reconnect works while the bootstrap's
    /// own path, the apiserver's TokenReview, is down); a new one when
    /// there is none or it is about to expire.
    pub(crate) async fn material(
        &self,
        cfg: &EdgeConfig,
        dial: &super::dial::Dialer<'_>,
    ) -> Result<TlsMaterial, IdentityError> {
        self.reload_files(cfg);
        let Some(c) = self.get() else {
            return self.renew(cfg, dial).await;
        };
        let valid = c.valid_for_a_handshake(SystemTime::now());
        if matches!(cfg.identity, Identity::Static(_)) || (valid && !c.refused) {
            return Ok(c.material);
        }
        match self.renew(cfg, dial).await {
            // Refused by one relay but valid: the bootstrap failing (its
            // path down) must not cost the replicas that take it.
            Err(e) if valid => {
                warn!(error = ?e, "no new certificate; dialling with the one a relay refused");
                Ok(c.material)
            }
            r => r,
        }
    }

    /// A relay refused `material` at TLS: if it is still the current
    /// certificate, the next attempt bootstraps a new one (the token, not
    /// the refused key, proves the node; a node the cluster no longer
    /// vouches for is refused there), at most once per [`REFUSAL_PAUSE`].
    pub(crate) fn refused(&self, material: &TlsMaterial) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = current
            .as_mut()
            .filter(|c| !c.refused && c.material.chain.first() == material.chain.first())
        else {
            return;
        };
        let mut last = self
            .refusal_bootstrap
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFUSAL_PAUSE) {
            warn!("a relay refused this edge's certificate again; keeping it (a new one was obtained for a refusal less than {REFUSAL_PAUSE:?} ago)");
            return;
        }
        warn!("a relay refused this edge's certificate (revoked, or from a CA it no longer trusts); obtaining a new one");
        *last = Some(std::time::Instant::now());
        c.refused = true;
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
            if !c.refused && SystemTime::now() < c.renew_at {
                return Ok(c.material);
            }
        }
        self.reload_files(cfg);
        let cert = obtain(cfg, &self.bootstrap_now(b), dial).await?;
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
    let cert = build(b, &cfg.node, &issued.cert_pem, key_pem.as_bytes())
        .map_err(IdentityError::Failed)?
        .timed_by_relay(
            SystemTime::now(),
            issued.relay_time_unix,
            issued.not_after_unix,
        );
    // Kept for a restart while the relay is away. Failing to keep it (a
    // full or read-only disk) loses only that: the certificate serves
    // this run, where throwing it away would leave the edge asking for
    // one a minute until the disk is fixed, and offline once it cannot.
    let (cert_path, key_path) = state_files(b, &cfg.node);
    let (dir, key_pem, cert_pem) = (b.state_dir.clone(), key_pem, issued.cert_pem.clone());
    let kept =
        tokio::task::spawn_blocking(move || keep(&dir, &key_path, &cert_path, &key_pem, &cert_pem))
            .await
            .unwrap_or_else(|e| Err(format!("saving task: {e}")));
    if let Err(e) = kept {
        warn!(error = %e, "the new node certificate could not be kept in the state directory; it serves this run only (a restart while the relay is away needs the bootstrap)");
    }
    info!(
        not_after_unix = issued.not_after_unix,
        "node certificate obtained from the relay"
    );
    Ok(cert)
}

/// Writes the key and the certificate to temporary files, renames both
/// into place, then makes the renames durable (blocking: run off the
/// runtime, whose single worker also carries every stream, on a slow SD
/// card).
fn keep(dir: &Path, key: &Path, cert: &Path, key_pem: &str, cert_pem: &str) -> Result<(), String> {
    use relay_transport::saved::write_temp;
    let at = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    // Both written before either is renamed: a full disk leaves the old
    // pair whole, not a new key beside the old certificate.
    let key_tmp = write_temp(key, key_pem.as_bytes(), true).map_err(|e| at(key, e))?;
    let cert_tmp = write_temp(cert, cert_pem.as_bytes(), false).map_err(|e| {
        let _ = std::fs::remove_file(&key_tmp);
        at(cert, e)
    })?;
    std::fs::rename(&key_tmp, key).map_err(|e| at(key, e))?;
    std::fs::rename(&cert_tmp, cert).map_err(|e| at(cert, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(dir, e))
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
    use relay_transport::devcerts::DevPki;

    fn bootstrap_config(pki: &DevPki, dir: &Path) -> BootstrapConfig {
        BootstrapConfig {
            token_file: dir.join("token"),
            state_dir: dir.to_path_buf(),
            relay_ca: certs_from_pem(pki.ca_cert.as_bytes(), "ca").unwrap(),
        }
    }

    /// A kept pair whose key is not the certificate's (the two files are
    /// written one after the other) is refused, and so not dialled with.
    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let pki = DevPki::generate(&["localhost"], &["edge-a", "edge-b"]).unwrap();
        let dir = std::env::temp_dir().join(format!("edge-identity-{}", std::process::id()));
        let b = bootstrap_config(&pki, &dir);
        let (a, other) = (&pki.nodes[0].1, &pki.nodes[1].1);
        assert!(build(&b, "edge-a", &a.cert, a.key.as_bytes()).is_ok());
        let e = build(&b, "edge-a", &a.cert, other.key.as_bytes())
            .err()
            .expect("a mismatched key must be refused");
        assert!(e.contains("does not match"), "{e}");
    }

    /// Renewal points are spread over 0.6 to 0.8 of the life, not all at
    /// one point: a fleet whose certificates arrived together (after an
    /// outage) does not renew together.
    #[test]
    fn renewal_points_spread_over_the_window() {
        let from = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let life = Duration::from_secs(12 * 3600);
        let shares: Vec<f64> = (0..200)
            .map(|_| {
                renewal_point(from, life)
                    .duration_since(from)
                    .unwrap()
                    .as_secs_f64()
                    / life.as_secs_f64()
            })
            .collect();
        assert!(shares.iter().all(|s| (0.6..0.8).contains(s)), "{shares:?}");
        let (lo, hi) = shares
            .iter()
            .fold((1.0f64, 0.0f64), |(l, h), s| (l.min(*s), h.max(*s)));
        // 200 uniform draws: below 0.63 and above 0.77 each but with
        // probability 0.85^200.
        assert!(lo < 0.63 && hi > 0.77, "not spread: {lo} to {hi}");
    }

    /// Renewal is timed by the life the relay gave and the moment the
    /// certificate arrived, whatever this edge's clock says: hours ahead,
    /// a new certificate is not due at once (which renewed in a loop);
    /// hours behind, it is renewed before the relay sees it expire.
    #[test]
    fn renewal_follows_the_relays_clock_not_the_edges() {
        let pki = DevPki::generate(&["localhost"], &["edge-a"]).unwrap();
        let dir = std::env::temp_dir().join(format!("edge-identity-t-{}", std::process::id()));
        let b = bootstrap_config(&pki, &dir);
        let (cert_pem, key_pem) = (&pki.nodes[0].1.cert, &pki.nodes[0].1.key);
        let relay_now = 1_800_000_000u64;
        let life = 12 * 3600;
        for skew in [-10 * 3600i64, 0, 10 * 3600] {
            let edge_now = UNIX_EPOCH + Duration::from_secs(relay_now.saturating_add_signed(skew));
            let c = build(&b, "edge-a", cert_pem, key_pem.as_bytes())
                .unwrap()
                .timed_by_relay(edge_now, relay_now, relay_now + life);
            let at = c.renew_at.duration_since(edge_now).unwrap().as_secs_f64();
            assert!(
                (0.6..=0.8).contains(&(at / life as f64)),
                "skew {skew}: renewal after {at} s of {life}"
            );
            assert!(c.valid_for_a_handshake(edge_now), "skew {skew}");
            assert!(!c.valid_for_a_handshake(edge_now + Duration::from_secs(life)));
        }
    }

    /// A reply whose expiry is past what a `SystemTime` holds
    /// (`not_after_unix` near `u64::MAX`, from a broken or hostile relay)
    /// panicked adding it to the clock; the certificate now keeps the
    /// timing of its own validity. Found reviewing the `CertReply` path
    /// for fuzzing (docs/fuzzing.md, findings).
    #[test]
    fn an_expiry_past_the_clock_from_the_relay_is_ignored() {
        let pki = DevPki::generate(&["localhost"], &["edge-a"]).unwrap();
        let dir = std::env::temp_dir().join(format!("edge-identity-x-{}", std::process::id()));
        let b = bootstrap_config(&pki, &dir);
        let (cert_pem, key_pem) = (&pki.nodes[0].1.cert, &pki.nodes[0].1.key);
        let own = build(&b, "edge-a", cert_pem, key_pem.as_bytes()).unwrap();
        let (renew_at, not_after) = (own.renew_at, own.not_after);
        let c = own.timed_by_relay(SystemTime::now(), 1, u64::MAX);
        assert_eq!((c.renew_at, c.not_after), (renew_at, not_after));
    }

    #[test]
    fn clock_errors_get_a_hint_and_others_do_not() {
        let h = clock_hint(
            "invalid peer certificate: certificate not valid yet: verification time 5 (UNIX)",
        );
        assert!(h.contains("set the time (NTP)"), "{h}");
        assert_eq!(clock_hint("connection refused"), "connection refused");
    }
}
