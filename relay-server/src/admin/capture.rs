//! Whether the kernel capture (`[capture]`) is in place, as `/readyz`
//! judges it.
//!
//! With capture configured, the relay promises this node that traffic
//! for edge prefixes (and Services with endpoints behind edges) is caught
//! here; until the capture update has applied once, or after it has been
//! failing for long, it does not keep that promise, and `/readyz` says so
//! (503, `capture not installed: …`).
//!
//! What counts as a transient: once installed, a capture update that
//! fails (an `nft` or `ip` run refused, the table removed by someone else
//! and being put back by `Capture::repair`) is retried every second, and
//! what was installed before mostly stays in the kernel meanwhile. Such a
//! streak is not reported as unready until it has lasted
//! [`FAILURE_GRACE`]: readiness gates the DaemonSet's rollout and is what
//! operators alert on, and a replica flapping between ready and not over
//! a repair that succeeds on the next retry would say more than is true.
//! Before the first success there is no grace: nothing of this update was
//! ever in place, so the relay is not ready yet.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long capture updates may keep failing, after one has applied,
/// before `/readyz` answers 503: three of `Capture::repair`'s 10 s checks
/// and some thirty one-second retries, so one failed repair or a few
/// seconds of `nft` contention with kube-proxy do not flap readiness.
pub const FAILURE_GRACE: Duration = Duration::from_secs(30);

/// The capture updates' outcomes, as `/readyz` needs them (the relay's
/// capture task records each; see `crate::tunnel::sync_capture`).
#[derive(Debug, Default)]
pub struct CaptureHealth(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    /// An update has applied since the relay started.
    applied_once: bool,
    /// When the current streak of failed updates began (`None`: the last
    /// update applied, or none has run yet).
    failing_since: Option<Instant>,
    /// The last failure's error, on one line.
    last_error: Option<String>,
}

/// What `/readyz` makes of the capture now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureReadiness {
    /// Installed, and the last update applied.
    Installed,
    /// Installed, but updates have been failing for less than
    /// [`FAILURE_GRACE`]: ready, with this note.
    Retrying(String),
    /// Not installed yet, or failing for [`FAILURE_GRACE`] or longer:
    /// not ready, for this reason.
    NotInstalled(String),
}

impl CaptureHealth {
    /// Records one capture update's outcome (`failed`: its error).
    pub fn applied<E: std::fmt::Display>(&self, failed: Option<&E>) {
        self.record(failed.map(|e| e.to_string()), Instant::now());
    }

    fn record(&self, failed: Option<String>, now: Instant) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match failed {
            None => {
                s.applied_once = true;
                s.failing_since = None;
            }
            Some(e) => {
                s.failing_since.get_or_insert(now);
                s.last_error = Some(e.replace(['\r', '\n'], " "));
            }
        }
    }

    /// Where the capture stands at `now`.
    pub fn readiness(&self, now: Instant) -> CaptureReadiness {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let error = || {
            s.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        };
        match (s.applied_once, s.failing_since) {
            (true, None) => CaptureReadiness::Installed,
            (false, None) => CaptureReadiness::NotInstalled("not installed yet".into()),
            (false, Some(t)) => CaptureReadiness::NotInstalled(format!(
                "not installed: failing for {}s{}",
                now.saturating_duration_since(t).as_secs(),
                error()
            )),
            (true, Some(t)) => {
                let failing = now.saturating_duration_since(t);
                let what = format!("failing for {}s{}", failing.as_secs(), error());
                if failing < FAILURE_GRACE {
                    CaptureReadiness::Retrying(what)
                } else {
                    CaptureReadiness::NotInstalled(format!("not installed: {what}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_ready_once_applied_and_a_short_failure_streak_does_not_flap_it() {
        let h = CaptureHealth::default();
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(
            h.readiness(t0),
            CaptureReadiness::NotInstalled("not installed yet".into())
        );
        // Failing from the start: not ready at once, with the error.
        h.record(Some("nft: Operation not permitted\n".into()), t0);
        h.record(Some("nft: Operation not permitted\n".into()), s(1));
        assert_eq!(
            h.readiness(s(2)),
            CaptureReadiness::NotInstalled(
                "not installed: failing for 2s: nft: Operation not permitted ".into()
            )
        );
        h.record(None, s(3));
        assert_eq!(h.readiness(s(3)), CaptureReadiness::Installed);
        // A repair failing for a few retries: still ready, with a note.
        h.record(Some("ip: RTNETLINK answers: File exists".into()), s(100));
        h.record(Some("ip: RTNETLINK answers: File exists".into()), s(101));
        assert_eq!(
            h.readiness(s(105)),
            CaptureReadiness::Retrying("failing for 5s: ip: RTNETLINK answers: File exists".into())
        );
        // Past the grace: not ready.
        assert!(matches!(
            h.readiness(s(100) + FAILURE_GRACE),
            CaptureReadiness::NotInstalled(m) if m.starts_with("not installed: failing for 30s: ip:")
        ));
        // Back: ready again, and a new streak counts from its own start.
        h.record(None, s(140));
        assert_eq!(h.readiness(s(141)), CaptureReadiness::Installed);
        h.record(Some("again".into()), s(200));
        assert!(matches!(h.readiness(s(210)), CaptureReadiness::Retrying(_)));
    }
}
