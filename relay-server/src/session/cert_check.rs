//! A live session's client certificate after its handshake. TLS verifies
//! it once, at the handshake, so on its own a session outlived its
//! certificate's notAfter, a CRL revoking it and a client CA bundle that
//! no longer holds its CA (a QUIC session lasts weeks). Here the relay
//! holds a session to what a handshake would be held to now:
//!
//! - Expiry: the leaf's notAfter is read once, when the session is
//!   created ([`not_after_of`]), and the relay-wide liveness sweep (once a
//!   second at the defaults, [`crate::liveness`]) closes a registered
//!   session past it ([`close_if_expired`]): one comparison per session
//!   per sweep. As at the handshake, notAfter gets no slack.
//! - Revocation and CA changes: after a reload of the tunnel listener's
//!   files that changed the client CA or the CRLs
//!   ([`ReloadableServerTls::replace`] says so), every live session's
//!   chain is verified again by the verifier new handshakes use, at the
//!   current time, with the same clock-skew slack
//!   ([`ReloadableServerTls::verify_peer`], [`spawn_recheck`]); the
//!   sessions it refuses are closed, the others are not touched. A second
//!   pass, once a handshake that was under way at the reload has had time
//!   to register (twice `limits.handshake_timeout`), verifies the sessions
//!   registered since: their TLS may have been verified with the material
//!   before the reload.
//!
//! Either way the session is closed at once with [`close_code::KICKED`]
//! (to the edge a deliberate close, not a dead path: no QUIC strike), its
//! reason naming the cause, logged at warn with the node and counted in
//! `relay_sessions_certificate_closed_total{reason}` (the labels of
//! [`RefusalCause::as_str`]); in Kubernetes mode the session's end is
//! reported as any other's. The edge reconnects and is refused at TLS as
//! any handshake with that certificate is (alert CertificateExpired,
//! CertificateRevoked, UnknownCA), which a bootstrapped edge answers by
//! bootstrapping a new certificate; a bootstrapped edge renews at 0.6 to
//! 0.8 of its certificate's life, so a healthy one never meets the expiry
//! check.
//!
//! A session a planned move left draining is out of the registry, so the
//! sweep does not see it: it drains for its grace (until its certificate
//! expires, but at least `limits.drain_grace`, `handle::move_grace`).
//! A reload verifies it again, with its successor, and closes it if the
//! certificate is revoked or its CA dropped (expiry alone leaves it to its
//! grace).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::close_code;
use relay_transport::reload::{ClientCertRefusal, RefusalCause, ReloadableServerTls};
use relay_transport::TunnelConn;
use rustls::pki_types::UnixTime;
use tracing::{info, warn};

use super::SessionHandle;
use crate::server::Shared;

/// Sessions verified between two yields to the runtime (a verification
/// is a signature check or two: 128 of them take a few milliseconds).
const CHUNK: usize = 128;

/// Longest the recheck runs between two yields, whatever the count.
const YIELD_AFTER: Duration = Duration::from_millis(2);

/// The notAfter (Unix seconds) of the leaf certificate `conn`'s peer
/// presented, if it has one that parses.
pub(crate) fn not_after_of(conn: &TunnelConn) -> Option<i64> {
    conn.peer_certs()
        .first()
        .and_then(crate::tls_reload::not_after)
}

/// Whether a certificate with notAfter `not_after` (Unix seconds) is
/// expired at `now` (Unix seconds): past it, as webpki refuses it at a
/// handshake (valid through its notAfter second).
fn expired(not_after: Option<i64>, now: i64) -> bool {
    not_after.is_some_and(|t| now > t)
}

/// The current wall-clock time in Unix seconds, as [`close_if_expired`]
/// takes it.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Closes session `s` if its client certificate is past its notAfter at
/// `now` (Unix seconds, [`unix_now`]); returns whether it did. For the
/// liveness sweep, each session each round.
pub(crate) fn close_if_expired(shared: &Shared, s: &SessionHandle, now: i64) -> bool {
    if !expired(s.cert_not_after, now) || s.cancel.is_cancelled() {
        return false;
    }
    let at = s
        .cert_not_after
        .and_then(|t| u64::try_from(t).ok())
        .map(|t| UNIX_EPOCH + Duration::from_secs(t));
    let refusal = ClientCertRefusal {
        cause: RefusalCause::Expired,
        node: Some(s.node.clone()),
        authentic: true,
        at,
    };
    close(shared, s, &refusal);
    true
}

/// The reason a session is closed for, `refusal` being what the verifier
/// says of its certificate now (sent to the edge, logged, reported).
fn reason(refusal: &ClientCertRefusal) -> String {
    let at = refusal
        .at
        .map(|t| format!(" at {}", humantime::format_rfc3339_seconds(t)))
        .unwrap_or_default();
    match refusal.cause {
        RefusalCause::Expired => format!("client certificate expired{at}"),
        RefusalCause::NotYetValid => format!("client certificate not valid until{at}"),
        RefusalCause::Revoked => "client certificate revoked (tls.crl)".to_string(),
        RefusalCause::UnknownCa => {
            "client certificate not issued by a CA of tls.client_ca any more".to_string()
        }
        RefusalCause::BadCertificate => {
            "client certificate refused by the reloaded client verification".to_string()
        }
    }
}

fn close(shared: &Shared, s: &SessionHandle, refusal: &ClientCertRefusal) {
    let why = reason(refusal);
    shared.metrics.session_cert_closed(refusal.cause);
    warn!(
        node = %s.node,
        gen = s.generation,
        cause = refusal.cause.as_str(),
        reason = %why,
        "closing the session: its client certificate no longer verifies"
    );
    s.kick(close_code::KICKED, &why);
}

/// What the current client verification of `tls` says of session `s`'s
/// certificate at `now`: `None` when it still verifies (or the session
/// has no certificate to verify, which a registered session always has).
fn verdict(
    tls: &ReloadableServerTls,
    s: &SessionHandle,
    now: UnixTime,
) -> Option<ClientCertRefusal> {
    let chain = s.conn.peer_certs();
    let (leaf, intermediates) = chain.split_first()?;
    tls.verify_peer(leaf, intermediates, now).err()
}

/// Verifies again, with `tls` at `now`, the certificates of the
/// registered sessions `which` picks and of the sessions planned moves
/// left draining for them; closes those refused. Returns how many were
/// verified and how many closed.
pub(crate) async fn recheck(
    shared: &Shared,
    tls: &ReloadableServerTls,
    now: UnixTime,
    which: impl Fn(&SessionHandle) -> bool,
) -> (usize, usize) {
    let (mut checked, mut closed) = (0, 0);
    // Collected before the first yield: the future stays `Send`.
    let sessions: Vec<(Arc<SessionHandle>, bool)> = shared
        .registry
        .sessions_unsorted()
        .into_iter()
        .filter(|s| which(s))
        .flat_map(|s| {
            [
                s.draining_predecessor().map(|p| (p, true)),
                Some((s, false)),
            ]
        })
        .flatten()
        .collect();
    let mut ran = Instant::now();
    for (s, predecessor) in sessions {
        if s.cancel.is_cancelled() {
            continue;
        }
        checked += 1;
        match verdict(tls, &s, now) {
            // A planned move's old session drains for at least
            // `limits.drain_grace`, past its certificate's expiry if need
            // be (`handle::move_grace`): expiry alone does not end it here.
            Some(r) if predecessor && matches!(r.cause, RefusalCause::Expired) => {}
            Some(refusal) => {
                close(shared, &s, &refusal);
                closed += 1;
            }
            None => {}
        }
        // By time as well as by count: with a CRL each verification also
        // checks the list's signature and hashes it, so a large list
        // makes a chunk of 128 take far longer than a few milliseconds.
        if checked % CHUNK == 0 || ran.elapsed() >= YIELD_AFTER {
            tokio::task::yield_now().await;
            ran = Instant::now();
        }
    }
    (checked, closed)
}

/// After a reload changed the client CA or CRLs of `tls` (the tunnel
/// listener's), verifies every live session of the relay `shared` again,
/// in a task, and once more those registered within a handshake's time
/// of the reload, a handshake's time later (see the module docs). Does
/// nothing outside a Tokio runtime (no relay runs there).
pub(crate) fn spawn_recheck(shared: &Weak<Shared>, tls: Arc<ReloadableServerTls>) {
    let Some(s) = shared.upgrade() else {
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let stop = s.shutdown.clone();
    // A handshake's QUIC or TLS part and its hello each have
    // `limits.handshake_timeout`.
    let window = s
        .cfg
        .limits
        .handshake_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1));
    drop(s);
    let shared = shared.clone();
    rt.spawn(async move {
        let reloaded = Instant::now();
        let Some(s) = shared.upgrade() else { return };
        let (checked, closed) = recheck(&s, &tls, UnixTime::now(), |_| true).await;
        info!(
            checked,
            closed, "client CA or CRLs changed: live sessions' certificates verified again"
        );
        drop(s);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(window) => {}
        }
        let Some(s) = shared.upgrade() else { return };
        // Created since a handshake's time before the reload.
        let recent = |h: &SessionHandle| {
            Duration::from_millis(h.age_ms()) <= reloaded.elapsed().saturating_add(window)
        };
        let (checked, closed) = recheck(&s, &tls, UnixTime::now(), recent).await;
        if checked > 0 {
            info!(
                checked,
                closed, "sessions that registered around the reload verified again"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Valid through its notAfter second, as at the handshake; no
    /// notAfter read, never expired.
    #[test]
    fn expired_past_the_not_after_second() {
        assert!(!expired(Some(1_000), 999));
        assert!(!expired(Some(1_000), 1_000));
        assert!(expired(Some(1_000), 1_001));
        assert!(!expired(None, i64::MAX));
    }

    /// The reason names the cause and, for dates, the date.
    #[test]
    fn reasons_name_the_cause() {
        let r = |cause, at| ClientCertRefusal {
            cause,
            node: Some("edge-0".into()),
            authentic: true,
            at,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_740_819_600);
        assert_eq!(
            reason(&r(RefusalCause::Expired, Some(at))),
            "client certificate expired at 2025-03-01T09:00:00Z"
        );
        assert_eq!(
            reason(&r(RefusalCause::Revoked, None)),
            "client certificate revoked (tls.crl)"
        );
        assert!(reason(&r(RefusalCause::UnknownCa, None)).contains("tls.client_ca"));
    }
}
