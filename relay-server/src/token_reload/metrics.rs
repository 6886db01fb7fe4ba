//! The admin token files' metrics, rendered beside the relay's own
//! (`crate::metrics`) from what [`AdminTokens`] counts.

use super::{AdminTokens, KINDS};

impl AdminTokens {
    /// Prometheus text: `relay_admin_token_reloads_total{token}`,
    /// `relay_admin_token_reload_failures_total{token}`,
    /// `relay_admin_token_file_stale{token}` and
    /// `relay_admin_previous_token_requests_total{token}`, for the token
    /// files configured.
    pub(crate) fn render(&self) -> String {
        let (mut ok, mut failed, mut stale, mut previous) =
            (String::new(), String::new(), String::new(), String::new());
        for kind in KINDS.into_iter().filter(|k| self.path(*k).is_some()) {
            let k = kind.as_str();
            ok += &format!(
                "relay_admin_token_reloads_total{{token=\"{k}\"}} {}\n",
                self.reloads(kind)
            );
            failed += &format!(
                "relay_admin_token_reload_failures_total{{token=\"{k}\"}} {}\n",
                self.failures(kind)
            );
            stale += &format!(
                "relay_admin_token_file_stale{{token=\"{k}\"}} {}\n",
                u8::from(self.stale(kind))
            );
            previous += &format!(
                "relay_admin_previous_token_requests_total{{token=\"{k}\"}} {}\n",
                self.previous_used(kind)
            );
        }
        format!(
            "# HELP relay_admin_token_reloads_total Admin tokens replaced by what their file holds now (token: full = admin.token_file, read = admin.read_token_file; a removed read file drops the read token), seen changed by the poll every tls.reload_interval or on SIGHUP.\n\
             # TYPE relay_admin_token_reloads_total counter\n{ok}\
             # HELP relay_admin_token_reload_failures_total Admin token files seen changed that could not be used (unreadable, empty, shorter than 16 characters, or a read-only token equal to the full one): the previous token stays. Counted once per change, and at each SIGHUP.\n\
             # TYPE relay_admin_token_reload_failures_total counter\n{failed}\
             # HELP relay_admin_token_file_stale 1 while the admin token file as it is now could not be taken (unreadable, empty, shorter than 16 characters, or a read-only token equal to the full one): the relay still runs on the token it held before. 0 otherwise.\n\
             # TYPE relay_admin_token_file_stale gauge\n{stale}\
             # HELP relay_admin_previous_token_requests_total Admin requests authenticated with the token a rotation replaced (or a removed read-only token), accepted for admin.token_grace after it: their senders have not seen the new Secret yet.\n\
             # TYPE relay_admin_previous_token_requests_total counter\n{previous}"
        )
    }
}
