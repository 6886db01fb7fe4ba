//! Which client certificate the relay refused at TLS, and why, told to the
//! accept loop of the connection that presented it.
//!
//! rustls tells the peer why with an alert and the caller with an error
//! that carries no certificate; quinn turns it into a `ConnectionError`
//! with text. Neither says which node was refused, so a relay refusing
//! thousands of edges (a CA rotation done in the wrong order, certificates
//! that expired) logged the post-NAT address of each (a carrier NAT's,
//! shared by many sites) and counted them all `tls`. The verifier
//! ([`ReloadableServerTls`](super::ReloadableServerTls)) has the typed
//! error and the leaf, but not the connection; so the accept loop gives
//! each connection a [`RefusalSlot`] and *enters* it around every call
//! that may run the verifier for that connection, and the verifier writes
//! what it found ([`ClientCertRefusal`]) into the slot entered on its
//! thread:
//! - TLS over TCP: the handshake future, each poll entered
//!   ([`RefusalSlot::scope`]);
//! - QUIC: quinn verifies in the connection's driver task, so the slot
//!   rides with the connection's TLS session: entered around
//!   `quinn::Incoming::accept` ([`RefusalSlot::enter`]), where quinn
//!   starts the session, [`RefusalAwareQuic`] (the crypto config of every
//!   server endpoint, `quic::server_endpoint_with`) keeps it in the
//!   session, which enters it around each read of handshake bytes.
//!
//! Entering is a thread-local swap, restored on the way out; verification
//! is synchronous inside those calls, so a finding can only land in the
//! slot of the connection being verified. There is no table: a slot lives
//! as long as its connection (and the accept task's handle), so a flood
//! of refused handshakes leaves nothing behind.
//!
//! The certificate's name is *claimed* unless the chain verifies: webpki
//! checks a certificate's dates before looking for its issuer, so
//! "expired" alone says nothing about who signed it. An expired (or not yet
//! valid) certificate is verified once more at a time inside its validity:
//! if a CA of `tls.client_ca` signed it, the name is
//! [authentic](ClientCertRefusal::authentic) and the relay may write
//! about that node; if not, it is refused as `unknown_ca`, and its name is
//! whatever its maker wrote.

use std::cell::Cell;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::QuicServerConfig;
use quinn_proto::crypto::{self, ExportKeyingMaterialError, KeyPair, Keys, Session};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::{CertificateError, Error};

use crate::clock_skew::is_validity;

/// Why a client certificate was refused: a fixed set (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCause {
    /// Past its notAfter.
    Expired,
    /// Before its notBefore, by more than the clock-skew slack.
    NotYetValid,
    /// Listed in its issuer's certificate revocation list (`tls.crl`).
    Revoked,
    /// Not issued by a CA of `tls.client_ca`: no CA there has its
    /// issuer's name, or one has but did not sign it (a CA of the same
    /// name with another key: one created anew rather than renewed, as a
    /// client CA rotation done in the wrong order shows). An expired or
    /// not yet valid certificate from such a CA is this too.
    UnknownCa,
    /// Anything else about the certificate: the wrong key usage (a server
    /// certificate presented by a client), a bad signature, an unparsable
    /// certificate.
    BadCertificate,
}

impl RefusalCause {
    /// Every cause, in label order.
    pub const ALL: [RefusalCause; 5] = [
        RefusalCause::Expired,
        RefusalCause::NotYetValid,
        RefusalCause::Revoked,
        RefusalCause::UnknownCa,
        RefusalCause::BadCertificate,
    ];

    /// The stable label (`relay_handshake_failures_total{reason}`, log
    /// lines, Event actions).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCause::Expired => "cert_expired",
            RefusalCause::NotYetValid => "cert_not_yet_valid",
            RefusalCause::Revoked => "revoked",
            RefusalCause::UnknownCa => "unknown_ca",
            RefusalCause::BadCertificate => "bad_certificate",
        }
    }
}

/// What the verifier found wrong with a client certificate it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertRefusal {
    /// Why.
    pub cause: RefusalCause,
    /// The node the certificate names (its first DNS name), if that is a
    /// well-formed node name (a DNS-1123 subdomain); see
    /// [`ClientCertRefusal::authentic`] before trusting it.
    pub node: Option<String>,
    /// Whether a CA of `tls.client_ca` signed the certificate (its chain
    /// verifies at a time within its validity): only then does the name
    /// say which node was refused. Otherwise anyone may have written it:
    /// log it as claimed, never write about that node.
    pub authentic: bool,
    /// The date the cause is about: notAfter of an expired certificate,
    /// notBefore of one not valid yet.
    pub at: Option<SystemTime>,
}

thread_local! {
    /// The slot entered on this thread, if any (see the module docs).
    static CURRENT: Cell<Option<Arc<RefusalSlot>>> = const { Cell::new(None) };
}

/// One connection's place for what the verifier finds (see the module
/// docs): empty until a client certificate of that connection is
/// refused; the first refusal is kept.
#[derive(Debug, Default)]
pub struct RefusalSlot(OnceLock<ClientCertRefusal>);

/// Puts the previous slot back when an [`RefusalSlot::enter`] ends, even
/// by a panic.
struct Restore(Option<Arc<RefusalSlot>>);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0.take()));
    }
}

impl RefusalSlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Runs `f` with this slot as the thread's: a client certificate a
    /// [`ReloadableServerTls`](super::ReloadableServerTls) refuses during
    /// `f`, and the QUIC session quinn starts during `f`, are this slot's.
    pub fn enter<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self.clone()))));
        f()
    }

    /// Runs `fut` with this slot entered during each of its polls (a TLS
    /// handshake over TCP, which verifies in the task that polls it).
    pub async fn scope<F: Future>(self: &Arc<Self>, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| self.enter(|| fut.as_mut().poll(cx))).await
    }

    /// What the verifier found, if it refused a certificate.
    pub fn refusal(&self) -> Option<&ClientCertRefusal> {
        self.0.get()
    }
}

/// The slot entered on this thread.
fn current() -> Option<Arc<RefusalSlot>> {
    CURRENT.with(|c| {
        let s = c.take();
        c.set(s.clone());
        s
    })
}

/// Records a refusal in the slot entered on this thread; `examine` runs
/// only when there is one to record in (nobody asked otherwise: the
/// CONNECT and admin listeners, a client).
pub(crate) fn note(examine: impl FnOnce() -> ClientCertRefusal) {
    if let Some(slot) = current() {
        if slot.0.get().is_none() {
            let _ = slot.0.set(examine());
        }
    }
}

/// What `err`, the verifier's refusal of `leaf`, means (see the module
/// docs); `verify_at` verifies the same chain at another time.
pub(crate) fn examine(
    err: &Error,
    leaf: &CertificateDer<'_>,
    verify_at: impl Fn(UnixTime) -> Result<(), Error>,
) -> ClientCertRefusal {
    let parsed = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, c)| c);
    let node = parsed.as_ref().and_then(node_named);
    let window = parsed.as_ref().map(|c| {
        let v = c.validity();
        let secs = |t: i64| UnixTime::since_unix_epoch(Duration::from_secs(t.max(0) as u64));
        (
            secs(v.not_before.timestamp()),
            secs(v.not_after.timestamp()),
        )
    });
    let refusal = |cause, authentic, at: Option<UnixTime>| ClientCertRefusal {
        cause,
        node: node.clone(),
        authentic,
        at: at.map(|t| UNIX_EPOCH + Duration::from_secs(t.as_secs())),
    };
    // The cause, and a time within the certificate's validity when the
    // refusal was about its dates.
    let (cause, at, within) = match err {
        Error::InvalidCertificate(CertificateError::ExpiredContext { not_after, .. }) => {
            (RefusalCause::Expired, Some(*not_after), Some(*not_after))
        }
        Error::InvalidCertificate(CertificateError::Expired) => {
            let t = window.map(|w| w.1);
            (RefusalCause::Expired, t, t)
        }
        Error::InvalidCertificate(CertificateError::NotValidYetContext { not_before, .. }) => (
            RefusalCause::NotYetValid,
            Some(*not_before),
            Some(*not_before),
        ),
        Error::InvalidCertificate(CertificateError::NotValidYet) => {
            let t = window.map(|w| w.0);
            (RefusalCause::NotYetValid, t, t)
        }
        // webpki looks at revocation once the chain to the trust anchor
        // is built: only a CA we trust can have revoked it.
        Error::InvalidCertificate(CertificateError::Revoked) => {
            return refusal(RefusalCause::Revoked, true, None)
        }
        Error::InvalidCertificate(e) if unknown_ca(e) => {
            return refusal(RefusalCause::UnknownCa, false, None)
        }
        _ => return refusal(RefusalCause::BadCertificate, false, None),
    };
    match within.map(verify_at) {
        // Our CA signed it (revoked too, besides its dates).
        Some(Ok(())) | Some(Err(Error::InvalidCertificate(CertificateError::Revoked))) => {
            refusal(cause, true, at)
        }
        Some(Err(Error::InvalidCertificate(e))) if unknown_ca(&e) => {
            refusal(RefusalCause::UnknownCa, false, None)
        }
        // Its issuer's dates (an intermediate): who signed is not known.
        Some(Err(e)) if is_validity(&e) => refusal(cause, false, at),
        Some(Err(_)) => refusal(RefusalCause::BadCertificate, false, None),
        None => refusal(cause, false, at),
    }
}

/// Whether `e` says that no CA we trust signed the certificate: none has
/// its issuer's name, or the one that has did not make its signature.
fn unknown_ca(e: &CertificateError) -> bool {
    matches!(
        e,
        CertificateError::UnknownIssuer | CertificateError::BadSignature
    )
}

/// The node a certificate names: its first DNS name, if that is a
/// well-formed node name. Never its common name: the relay ties a
/// certificate to a node by its DNS names only (`tls::cert_names_node`),
/// so a certificate with nothing but a common name could not have been
/// any node's, and naming one from it would report a node that was never
/// refused.
fn node_named(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let name = cert
        .subject_alternative_name()
        .ok()
        .flatten()?
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })?;
    is_node_name(name).then(|| name.to_string())
}

/// Whether `s` is a DNS-1123 subdomain (what Kubernetes takes as a Node
/// name): lower-case letters, digits, `-` and `.`, labels of 1 to 63
/// starting and ending with a letter or digit, 253 at most. Anything else
/// (a name with spaces, quotes or line breaks) is not logged at all.
pub fn is_node_name(s: &str) -> bool {
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (1..=253).contains(&s.len()) && s.split('.').all(label)
}

/// quinn's rustls server config, keeping in each TLS session the
/// [`RefusalSlot`] entered when quinn started it (see the module docs).
/// Everything else is the inner config's.
pub struct RefusalAwareQuic(Arc<QuicServerConfig>);

impl RefusalAwareQuic {
    /// Wraps `inner`.
    pub fn new(inner: QuicServerConfig) -> Self {
        RefusalAwareQuic(Arc::new(inner))
    }
}

impl crypto::ServerConfig for RefusalAwareQuic {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, quinn_proto::crypto::UnsupportedVersion> {
        self.0.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.0.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn Session> {
        let inner = self.0.clone().start_session(version, params);
        Box::new(SlotSession {
            inner,
            slot: current(),
        })
    }
}

/// A server TLS session entering its connection's slot around the reads
/// that may verify the client's certificate.
struct SlotSession {
    inner: Box<dyn Session>,
    slot: Option<Arc<RefusalSlot>>,
}

impl Session for SlotSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn std::any::Any>> {
        self.inner.handshake_data()
    }

    fn peer_identity(&self) -> Option<Box<dyn std::any::Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn crypto::PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let Some(slot) = self.slot.clone() else {
            return self.inner.read_handshake(buf);
        };
        let read = slot.enter(|| self.inner.read_handshake(buf));
        // Verified (or refused): a session no longer holds its slot.
        if read.is_err() || !self.inner.is_handshaking() {
            self.slot = None;
        }
        read
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        self.inner.write_handshake(buf)
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;
    use std::time::SystemTime;

    use super::*;
    use crate::clock_skew::tests::handshake;
    use crate::devcerts::DevPki;
    use crate::issue::{node_key, NodeIssuer};
    use crate::reload::{crls_from_pem, ReloadableServerTls};
    use crate::tls::TlsMaterial;

    const ALPN: &[u8] = b"x";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A client certificate for `node` from `ca`'s CA, issued at `issued`
    /// (valid from 5 minutes before it for an hour), trusting `trust`'s CA
    /// for the server: the material and the certificate (PEM).
    fn edge(ca: &DevPki, trust: &DevPki, node: &str, issued: SystemTime) -> (TlsMaterial, String) {
        let (c, k) = ca.ca_pem_pair();
        let issuer = NodeIssuer::from_pem(&c, &k, Duration::from_secs(3600)).unwrap();
        let (key, public) = node_key().unwrap();
        let cert = issuer.issue(node, &public, issued).unwrap().cert_pem;
        let m = TlsMaterial::from_pem(&cert, &key, &trust.ca_cert).unwrap();
        (m, cert)
    }

    /// A client certificate for `node` from a CA of another name than
    /// DevPki's, issued at `issued` (valid for an hour), trusting
    /// `trust`'s CA for the server.
    fn stranger(trust: &DevPki, node: &str, issued: SystemTime) -> TlsMaterial {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "someone else's CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = Issuer::new(ca, KeyPair::generate().unwrap());
        let mut p = CertificateParams::new(vec![node.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, node);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = time::OffsetDateTime::from(issued);
        p.not_after = p.not_before + time::Duration::hours(1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        TlsMaterial::from_pem(&cert.pem(), &key.serialize_pem(), &trust.ca_cert).unwrap()
    }

    /// What the relay's verifier records for each kind of refused client
    /// certificate: the cause, the node named, and whether our CA signed
    /// it (an expired certificate from another CA is `unknown_ca`, not
    /// "expired": webpki looks at the dates first); nothing for one it
    /// takes, and nothing where no slot was entered.
    #[test]
    fn a_refused_certificate_is_examined_for_the_slot_entered() {
        let pki = DevPki::generate(&["localhost"], &[]).unwrap();
        let other = DevPki::generate(&["localhost"], &[]).unwrap();
        let now = SystemTime::now();
        let (revoked, revoked_pem) = edge(&pki, &pki, "edge-3", now);
        let crl = pki.crl_revoking(&[&revoked_pem]).unwrap();
        let crls = crls_from_pem(crl.as_bytes(), "crl").unwrap();
        let relay = pki.relay_material().unwrap();
        let server = ReloadableServerTls::new(&relay, &crls, false).unwrap();
        let as_client = TlsMaterial::from_pem(&pki.relay.cert, &pki.relay.key, &pki.ca_cert);
        type Want = Option<(RefusalCause, Option<&'static str>, bool)>;
        let cases: Vec<(&str, TlsMaterial, Want)> = vec![
            ("valid", edge(&pki, &pki, "edge-1", now).0, None),
            (
                "expired",
                edge(&pki, &pki, "edge-1", now - 2 * DAY).0,
                Some((RefusalCause::Expired, Some("edge-1"), true)),
            ),
            (
                "not valid yet",
                edge(&pki, &pki, "edge-2", now + DAY).0,
                Some((RefusalCause::NotYetValid, Some("edge-2"), true)),
            ),
            (
                "revoked",
                revoked,
                Some((RefusalCause::Revoked, Some("edge-3"), true)),
            ),
            // DevPki's CAs share their name: a CA made anew, not ours.
            (
                "another CA of the same name",
                edge(&other, &pki, "edge-1", now).0,
                Some((RefusalCause::UnknownCa, Some("edge-1"), false)),
            ),
            (
                "another CA, expired",
                edge(&other, &pki, "edge-1", now - 2 * DAY).0,
                Some((RefusalCause::UnknownCa, Some("edge-1"), false)),
            ),
            (
                "another CA, not valid yet",
                edge(&other, &pki, "edge-1", now + DAY).0,
                Some((RefusalCause::UnknownCa, Some("edge-1"), false)),
            ),
            (
                "a CA of another name",
                stranger(&pki, "edge-4", now),
                Some((RefusalCause::UnknownCa, Some("edge-4"), false)),
            ),
            (
                "a CA of another name, expired",
                stranger(&pki, "edge-4", now - 2 * DAY),
                Some((RefusalCause::UnknownCa, Some("edge-4"), false)),
            ),
            (
                "a server certificate",
                as_client.unwrap(),
                Some((RefusalCause::BadCertificate, Some("localhost"), false)),
            ),
        ];
        for (what, client, want) in cases {
            let slot = RefusalSlot::new();
            let cfg = || {
                (
                    client.client_config(ALPN).unwrap(),
                    server.server_config(&[ALPN]).unwrap(),
                )
            };
            let (c, s) = cfg();
            let shook = slot.enter(|| handshake(c, s));
            assert!(current().is_none(), "{what}: the slot is left on exit");
            let got = slot
                .refusal()
                .map(|r| (r.cause, r.node.as_deref(), r.authentic));
            assert_eq!(got, want, "{what}");
            assert_eq!(shook.is_ok(), want.is_none(), "{what}: {shook:?}");
            if let Some(r) = slot.refusal() {
                match r.cause {
                    RefusalCause::Expired => assert!(r.at.is_some_and(|t| t < now), "{what}"),
                    RefusalCause::NotYetValid => assert!(r.at.is_some_and(|t| t > now), "{what}"),
                    _ => assert_eq!(r.at, None, "{what}"),
                }
            }
            // No slot entered: refused all the same, nothing recorded.
            let (c, s) = cfg();
            assert_eq!(handshake(c, s).is_ok(), want.is_none(), "{what}");
            assert!(current().is_none());
        }
    }

    #[test]
    fn node_names_are_dns_1123_subdomains() {
        for ok in ["edge-1", "a", "ip-10-0-0-1.eu-west-1.compute.internal"] {
            assert!(is_node_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Edge-1",
            "-edge",
            "edge-",
            "edge..1",
            "edge 1",
            "edge\n1",
            "\"edge\"",
            "*.example",
            long.as_str(),
        ] {
            assert!(!is_node_name(bad), "{bad:?}");
        }
        assert!(!is_node_name(&["a"; 128].join(".")), "over 253");
    }

    /// Real QUIC handshakes through the relay's endpoint (its crypto
    /// config wrapped, `quic::server_endpoint_with`), each accepted with
    /// a slot entered as the relay's accept loop does: every expired
    /// client certificate is told to its own connection's slot, and a
    /// flood of them leaves nothing behind (each slot is freed with the
    /// refusal; there is no table to grow).
    #[tokio::test]
    async fn each_quic_connection_learns_its_own_refusal_and_keeps_nothing() {
        crate::tls::install_default_provider();
        let pki = DevPki::generate(&["localhost"], &[]).unwrap();
        let relay = pki.relay_material().unwrap();
        let state = ReloadableServerTls::new(&relay, &[], false).unwrap();
        let server = crate::quic::server_endpoint_with(
            "127.0.0.1:0".parse().unwrap(),
            state.server_config(&[relay_protocol::ALPN]).unwrap(),
            &relay,
            &crate::QuicTuning::default(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        const N: usize = 40;
        let accepting = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..N {
                let incoming = server.accept().await.unwrap();
                let slot = RefusalSlot::new();
                let connecting = slot.enter(|| incoming.accept()).unwrap();
                let failed = connecting.await.is_err();
                let node = slot.refusal().and_then(|r| r.node.clone());
                seen.push((failed, node, Arc::downgrade(&slot)));
            }
            seen
        });
        let now = SystemTime::now();
        for i in 0..N {
            // Every other one expired, each with a name of its own.
            let issued = if i % 2 == 0 { now - 2 * DAY } else { now };
            let (m, _) = edge(&pki, &pki, &format!("edge-{i}"), issued);
            let ep = crate::quic::client_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                &m,
                &crate::QuicTuning::default(),
                0,
            )
            .unwrap();
            if let Ok(c) = ep.connect(addr, "localhost").unwrap().await {
                if i % 2 == 0 {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
                } else {
                    c.close(0u32.into(), b"done");
                }
            }
        }
        let seen = tokio::time::timeout(Duration::from_secs(30), accepting)
            .await
            .unwrap()
            .unwrap();
        let weak: Vec<Weak<RefusalSlot>> = seen.iter().map(|s| s.2.clone()).collect();
        for (i, (failed, node, _)) in seen.into_iter().enumerate() {
            // Accepted in the order dialled (one at a time).
            let want = (i % 2 == 0).then(|| format!("edge-{i}"));
            assert_eq!((failed, node), (i % 2 == 0, want), "connection {i}");
        }
        assert!(
            weak.iter().all(|w| w.strong_count() == 0),
            "slots outlived their refusal"
        );
    }
}
