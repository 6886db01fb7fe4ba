//! Peer certificate verifiers that forgive a peer certificate for starting
//! a little in the future.
//!
//! Issuers such as cert-manager set notBefore to the moment of issuance.
//! A verifier whose clock is a few seconds or minutes behind the issuer's
//! (a small board without a battery-backed clock whose NTP has not
//! converged since boot, or a relay facing a CA whose clock runs ahead)
//! would refuse such a certificate until its own clock caught up, cutting
//! a node off right after every renewal. The wrappers here verify as
//! rustls's webpki verifiers do and, when the only complaint is "not valid
//! yet", verify once more as if it were [`CLOCK_SLACK`] later.
//!
//! Only notBefore gains the slack: the second verification runs at a
//! later time, so a certificate past its notAfter fails it too, and one
//! whose notAfter falls within the slack does as well (it is about to
//! expire anyway). The second verification is a complete one (chain,
//! signatures, names, revocation), so a certificate refused for anything
//! besides its start is refused still.
//!
//! The slack is the one our own issuer backdates by (issue.rs): a clock
//! error it tolerates for certificates the relay issues is tolerated for
//! certificates from other issuers too.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::issue::CLOCK_SLACK;

/// Whether `e` is about the validity period (either end): the kind of
/// failure a verification at a shifted time may add or remove.
pub(crate) fn is_validity(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(
            CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }
                | CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
        )
    )
}

/// The subject of `cert` for a log line ("?" if it does not parse).
fn subject(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Runs `verify` at `now`; if that fails only for a certificate that is
/// not valid yet, runs it again at `now + CLOCK_SLACK` and takes that
/// answer. `side` ("server" or "client": whose certificate) and
/// `end_entity` name the peer in the log line.
fn verify_with_slack<T>(
    side: &'static str,
    end_entity: &CertificateDer<'_>,
    now: UnixTime,
    verify: impl Fn(UnixTime) -> Result<T, Error>,
) -> Result<T, Error> {
    let first = match verify(now) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // How far ahead of our clock the offending notBefore lies, when rustls
    // says (webpki's errors carry it; the bare variant does not).
    let ahead = match &first {
        Error::InvalidCertificate(CertificateError::NotValidYetContext { time, not_before }) => {
            Some(not_before.as_secs().saturating_sub(time.as_secs()))
        }
        Error::InvalidCertificate(CertificateError::NotValidYet) => None,
        _ => return Err(first),
    };
    let later =
        UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs()).saturating_add(CLOCK_SLACK));
    match verify(later) {
        Ok(v) => {
            // A clock that is behind refuses nothing any more, so this
            // line is the only sign of it; sampled, since every handshake
            // until the clock catches up would repeat it. The subject is
            // parsed only when the line is written.
            crate::sampled!(
                info,
                "peer certificate not valid yet by the local clock, accepted within the clock-skew slack (local clock behind, or the issuer's ahead)",
                side,
                subject = %subject(end_entity),
                not_before_ahead_secs = ahead,
                slack_secs = CLOCK_SLACK.as_secs()
            );
            Ok(v)
        }
        // Still not valid yet (too far ahead), or past its notAfter once
        // shifted: the first answer is the truthful one, at the real time.
        Err(e) if is_validity(&e) => Err(first),
        // Something the first run did not get to (webpki checks a
        // certificate's validity before its issuer and revocation).
        Err(e) => Err(e),
    }
}

/// The methods both wrappers hand to their inner verifier unchanged: the
/// handshake signatures, the schemes, raw public keys. Only the
/// certificate's own verification gets the slack.
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }

        fn requires_raw_public_keys(&self) -> bool {
            self.inner.requires_raw_public_keys()
        }
    };
}

/// A server certificate verifier (on a client) tolerating a notBefore up
/// to [`CLOCK_SLACK`] in the future; everything else is the inner
/// verifier's.
#[derive(Debug)]
pub(crate) struct SkewTolerantServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
}

impl SkewTolerantServerVerifier {
    /// Wraps `inner` (a webpki verifier: its errors are what the slack
    /// recognises).
    pub(crate) fn new(inner: Arc<dyn ServerCertVerifier>) -> Arc<Self> {
        Arc::new(SkewTolerantServerVerifier { inner })
    }
}

impl ServerCertVerifier for SkewTolerantServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        verify_with_slack("server", end_entity, now, |t| {
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, t)
        })
    }

    delegate_signatures!();

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// A client certificate verifier (on a server) tolerating a notBefore up
/// to [`CLOCK_SLACK`] in the future; everything else, including whether
/// a certificate is asked for at all and revocation, is the inner
/// verifier's.
#[derive(Debug)]
pub(crate) struct SkewTolerantClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl SkewTolerantClientVerifier {
    /// Wraps `inner` (a webpki verifier, possibly with CRLs).
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>) -> Arc<Self> {
        Arc::new(SkewTolerantClientVerifier { inner })
    }
}

impl ClientCertVerifier for SkewTolerantClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_with_slack("client", end_entity, now, |t| {
            self.inner.verify_client_cert(end_entity, intermediates, t)
        })
    }

    delegate_signatures!();
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{
        CertificateParams, DistinguishedName as Dn, DnType, ExtendedKeyUsagePurpose, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::ServerName;
    use rustls::Connection;

    use super::*;
    use crate::devcerts::DevPki;
    use crate::reload::{crls_from_pem, ReloadableServerTls};
    use crate::tls::{anonymous_client_config, certs_from_pem, TlsMaterial};

    const ALPN: &[u8] = b"x";
    const MINUTE: i64 = 60;

    /// A leaf certificate (PEM pair) from `pki`'s CA for `name`, valid from
    /// `not_before` to `not_after` seconds from now.
    fn leaf(
        pki: &DevPki,
        name: &str,
        eku: ExtendedKeyUsagePurpose,
        not_before: i64,
        not_after: i64,
    ) -> (String, String) {
        let (ca_cert, ca_key) = pki.ca_pem_pair();
        let issuer =
            Issuer::from_ca_cert_pem(&ca_cert, KeyPair::from_pem(&ca_key).unwrap()).unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        let mut dn = Dn::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(not_before);
        p.not_after = now + time::Duration::seconds(not_after);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A relay serving a certificate valid from `not_before` to `not_after`
    /// seconds from now.
    fn relay_with(pki: &DevPki, not_before: i64, not_after: i64) -> TlsMaterial {
        let (cert, key) = leaf(
            pki,
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            not_before,
            not_after,
        );
        TlsMaterial::from_pem(&cert, &key, &pki.ca_cert).unwrap()
    }

    /// An edge presenting a certificate valid from `not_before` to
    /// `not_after` seconds from now, and that certificate (PEM).
    fn edge_with(pki: &DevPki, not_before: i64, not_after: i64) -> (TlsMaterial, String) {
        let (cert, key) = leaf(
            pki,
            "edge-1",
            ExtendedKeyUsagePurpose::ClientAuth,
            not_before,
            not_after,
        );
        let m = TlsMaterial::from_pem(&cert, &key, &pki.ca_cert).unwrap();
        (m, cert)
    }

    /// Moves what `from` has to send into `to` and lets `to` process it;
    /// `to`'s error (a refused certificate) ends the handshake.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), Error> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rest = &buf[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A full TLS handshake between the two configs in memory (the client
    /// asks for "localhost"): Ok, or the error of the side that refused.
    /// Also `reload::refused`'s tests'.
    pub(crate) fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = Connection::Client(
            rustls::ClientConnection::new(Arc::new(client), name.to_owned()).unwrap(),
        );
        let mut s = Connection::Server(rustls::ServerConnection::new(Arc::new(server)).unwrap());
        for _ in 0..10 {
            transfer(&mut c, &mut s)?;
            transfer(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    /// How far ahead of the verification time a "not valid yet" error
    /// says notBefore was; panics on any other answer.
    fn not_valid_yet_by(got: Result<(), Error>) -> u64 {
        match got {
            Err(Error::InvalidCertificate(CertificateError::NotValidYetContext {
                time,
                not_before,
            })) => not_before.as_secs().saturating_sub(time.as_secs()),
            other => panic!("expected \"not valid yet\", got {other:?}"),
        }
    }

    fn assert_expired(got: Result<(), Error>) {
        assert!(
            matches!(
                got,
                Err(Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            ),
            "expected \"expired\", got {got:?}"
        );
    }

    /// Every client config an edge (or the route agent) builds, trusting
    /// `pki`'s CA.
    fn clients(pki: &DevPki) -> Vec<(&'static str, rustls::ClientConfig)> {
        let edge = pki.node_material("edge-1").unwrap();
        let ca = certs_from_pem(pki.ca_cert.as_bytes(), "CA").unwrap();
        vec![
            ("client_config", edge.client_config(ALPN).unwrap()),
            (
                "anonymous_client_config",
                anonymous_client_config(&ca, ALPN).unwrap(),
            ),
        ]
    }

    /// Every server config verifying edges, serving `pki`'s valid relay
    /// certificate, with these CRLs where the config takes them.
    fn servers(pki: &DevPki, crl_pem: Option<&str>) -> Vec<(&'static str, rustls::ServerConfig)> {
        let relay = pki.relay_material().unwrap();
        let crls = crl_pem
            .map(|p| crls_from_pem(p.as_bytes(), "crl").unwrap())
            .unwrap_or_default();
        let reloadable = ReloadableServerTls::new(&relay, &crls, false).unwrap();
        let mut all = vec![(
            "ReloadableServerTls",
            reloadable.server_config(&[ALPN]).unwrap(),
        )];
        if crl_pem.is_none() {
            all.push(("server_config", relay.server_config(ALPN).unwrap()));
            all.push((
                "server_config_for(anonymous_ok)",
                relay.server_config_for(&[ALPN], true).unwrap(),
            ));
        }
        all
    }

    #[test]
    fn a_server_certificate_starting_2_minutes_ahead_is_accepted() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let relay = relay_with(&pki, 2 * MINUTE, 24 * 60 * MINUTE);
        for (what, client) in clients(&pki) {
            let server = relay.server_config_for(&[ALPN], true).unwrap();
            handshake(client, server).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }

    #[test]
    fn a_server_certificate_starting_10_minutes_ahead_is_refused_as_not_valid_yet() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let relay = relay_with(&pki, 10 * MINUTE, 24 * 60 * MINUTE);
        for (what, client) in clients(&pki) {
            let server = relay.server_config_for(&[ALPN], true).unwrap();
            // The error is the one at the real time (10 minutes ahead), not
            // the retry's (5).
            let ahead = not_valid_yet_by(handshake(client, server));
            assert!((9 * 60..=10 * 60).contains(&ahead), "{what}: {ahead} s");
        }
    }

    #[test]
    fn an_expired_server_certificate_is_refused_even_within_the_slack() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        // Expired a minute ago: a slack applied to notAfter would take it.
        let relay = relay_with(&pki, -24 * 60 * MINUTE, -MINUTE);
        for (what, client) in clients(&pki) {
            let server = relay.server_config_for(&[ALPN], true).unwrap();
            let got = handshake(client, server);
            assert!(got.is_err(), "{what}");
            assert_expired(got);
        }
    }

    #[test]
    fn a_client_certificate_starting_2_minutes_ahead_is_accepted() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let (edge, _) = edge_with(&pki, 2 * MINUTE, 24 * 60 * MINUTE);
        for (what, server) in servers(&pki, None) {
            let client = edge.client_config(ALPN).unwrap();
            handshake(client, server).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }

    #[test]
    fn a_client_certificate_starting_10_minutes_ahead_is_refused_as_not_valid_yet() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let (edge, _) = edge_with(&pki, 10 * MINUTE, 24 * 60 * MINUTE);
        for (what, server) in servers(&pki, None) {
            let client = edge.client_config(ALPN).unwrap();
            let ahead = not_valid_yet_by(handshake(client, server));
            assert!((9 * 60..=10 * 60).contains(&ahead), "{what}: {ahead} s");
        }
    }

    #[test]
    fn an_expired_client_certificate_is_refused_even_within_the_slack() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let (edge, _) = edge_with(&pki, -24 * 60 * MINUTE, -MINUTE);
        for (what, server) in servers(&pki, None) {
            let client = edge.client_config(ALPN).unwrap();
            let got = handshake(client, server);
            assert!(got.is_err(), "{what}");
            assert_expired(got);
        }
    }

    #[test]
    fn a_revoked_client_certificate_starting_2_minutes_ahead_is_refused_as_revoked() {
        let pki = DevPki::generate(&["localhost"], &["edge-1"]).unwrap();
        let (revoked, revoked_pem) = edge_with(&pki, 2 * MINUTE, 24 * 60 * MINUTE);
        let (kept, _) = edge_with(&pki, 2 * MINUTE, 24 * 60 * MINUTE);
        let crl = pki.crl_revoking(&[&revoked_pem]).unwrap();
        for (what, server) in servers(&pki, Some(&crl)) {
            let got = handshake(revoked.client_config(ALPN).unwrap(), server);
            assert!(
                matches!(
                    got,
                    Err(Error::InvalidCertificate(CertificateError::Revoked))
                ),
                "{what}: {got:?}"
            );
        }
        // The list refuses only what it names: another certificate as far
        // ahead passes the same verifier.
        for (what, server) in servers(&pki, Some(&crl)) {
            handshake(kept.client_config(ALPN).unwrap(), server)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}
