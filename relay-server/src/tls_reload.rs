//! The relay's TLS identity (certificate, key, client CA) and its CRLs,
//! reloaded from their files on SIGHUP ([`crate::Relay::reload_tls`]) and
//! when a poll every `tls.reload_interval` sees them change. A reload
//! applies to new handshakes; sessions already up stay up (their TLS was
//! verified when they connected). A failed reload (half-written file, key
//! not matching the certificate) changes nothing and is retried every
//! interval until the files load, so a renewal tool writing them one by
//! one is harmless.

use std::sync::Arc;

use relay_transport::reload::ReloadableServerTls;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TlsReload;

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
}

/// Reads `files` and puts what they hold in `state`; returns the leaf now
/// served.
pub(crate) fn reload(
    state: &ReloadableServerTls,
    files: Option<&TlsReload>,
) -> Result<CertificateDer<'static>, ReloadError> {
    let files = files.ok_or(ReloadError::NoFiles)?;
    let (m, crls) = files.paths.load()?;
    state.replace(&m, &crls)?;
    let leaf = state.chain().into_iter().next();
    info!(
        cert = %files.paths.cert.display(),
        crls = crls.len(),
        "tls reloaded: new handshakes use it"
    );
    // `replace` refuses an empty chain, so there is a leaf.
    leaf.ok_or(ReloadError::NoFiles)
}

/// Polls the files' stamps every `files.interval` and reloads on a change
/// (logging a failure and keeping the previous identity), until `stop`.
pub(crate) async fn watch(
    state: Arc<ReloadableServerTls>,
    files: TlsReload,
    stop: CancellationToken,
) {
    let mut seen = files.paths.stamp();
    let mut tick = tokio::time::interval(files.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = files.paths.stamp();
        if now == seen {
            continue;
        }
        // Stat and read run on this task: a few small files, once per change.
        match reload(&state, Some(&files)) {
            Ok(_) => seen = now,
            Err(e) => {
                warn!(error = %e, "tls files changed but could not be loaded; keeping the previous ones")
            }
        }
    }
}
