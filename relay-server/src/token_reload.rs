//! Admin API tokens re-read from their files while the relay and the
//! route agents run.
//!
//! In Kubernetes the token files are mounted Secrets, which kubelet
//! updates in place when an operator rotates one (a new `..data`
//! directory, swapped in by renaming a symlink). Read once at start, a
//! leaked token could only be revoked by restarting every relay (dropping
//! its edges' sessions) and every route agent, and a rotation that
//! restarted one side only left every agent refused with 401: route
//! distribution stopped cluster-wide.
//!
//! The relay ([`AdminTokens`]) looks at `admin.token_file` and
//! `admin.read_token_file` every `tls.reload_interval` (the TLS reload's
//! poll: the files' metadata, read through the path, so a swapped symlink
//! counts) and on SIGHUP. A changed file is read and held to the start's
//! rules (at least 16 characters, the read-only token not the full one);
//! one that fails them (unreadable, empty, too short) keeps the previous
//! token, is logged once per change and counted
//! (`relay_admin_token_reload_failures_total{token}`), and is read again
//! at every look until it can be taken (a transient read failure does not
//! pin the old token); while it cannot, `relay_admin_token_file_stale{token}`
//! is 1. The two files are taken independently; each request checks one
//! snapshot of what is held.
//!
//! A token replaced is still accepted, with the access it had, for
//! `admin.token_grace` (3 minutes by default): kubelets on different
//! nodes see an updated Secret up to a minute or more apart, and a route
//! agent refused meanwhile would look like a dead relay to the multipath
//! agent. Requests that use it are counted
//! (`relay_admin_previous_token_requests_total{token}`); its end is
//! logged. A read token file removed (its Secret deleted) is a rotation to
//! no read token: dropped after the same grace. The full token is never
//! dropped (the API would open).
//!
//! The route agent holds its `--token-file` as a [`Secret::from_file`]:
//! the file is read again before a request when its metadata changed,
//! and once after a 401 (the relay saw the rotation first; see
//! `agent::poll`). Either side seeing the new Secret first then heals
//! within a poll interval of the other seeing it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;

mod agent_file;
mod metrics;
#[cfg(test)]
mod tests;

pub use agent_file::TokenFile;

/// The shortest admin token the relay accepts.
pub const MIN_TOKEN_LEN: usize = 16;

// The token files are watched as the TLS files are.
pub(crate) use relay_transport::reload::{file_stamp as stamp, FileStamp};

/// Why a token file's content was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds nothing (trailing newlines aside).
    #[error("token must be at least 16 characters (the file is empty)")]
    Empty,
    /// Shorter than [`MIN_TOKEN_LEN`].
    #[error("token must be at least 16 characters")]
    TooShort,
}

/// The admin token in file `path`: trailing newlines ignored, at least
/// [`MIN_TOKEN_LEN`] characters (the rule at start and at every reload).
pub(crate) fn read_admin_token(path: &Path) -> Result<Secret, TokenFileError> {
    let t = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let t = t.trim_end_matches(['\n', '\r']);
    if t.is_empty() {
        return Err(TokenFileError::Empty);
    }
    if t.len() < MIN_TOKEN_LEN {
        return Err(TokenFileError::TooShort);
    }
    Ok(Secret::new(t))
}

/// One of the two admin tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `admin.token_file`: full access.
    Full,
    /// `admin.read_token_file`: `GET` only.
    Read,
}

impl TokenKind {
    /// As logs and the metrics' `token` label name it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Full => "full",
            TokenKind::Read => "read",
        }
    }

    fn i(self) -> usize {
        match self {
            TokenKind::Full => 0,
            TokenKind::Read => 1,
        }
    }
}

const KINDS: [TokenKind; 2] = [TokenKind::Full, TokenKind::Read];

/// `admin.token_grace` by default: how long a token replaced by a
/// rotation is still accepted. Kubelets on different nodes see an updated
/// Secret up to 60–90 s apart; within this, a route agent whose node has
/// not seen it yet is not refused.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(180);

/// The longest `admin.token_grace`: a leaked token rotated out must stop
/// working soon.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// The admin tokens in force at one moment.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// The full token (`admin.token_file`).
    pub full: Option<Secret>,
    /// The read-only token (`admin.read_token_file`).
    pub read: Option<Secret>,
}

impl Tokens {
    fn slot(&mut self, kind: TokenKind) -> &mut Option<Secret> {
        match kind {
            TokenKind::Full => &mut self.full,
            TokenKind::Read => &mut self.read,
        }
    }

    fn get(&self, kind: TokenKind) -> Option<&Secret> {
        match kind {
            TokenKind::Full => self.full.as_ref(),
            TokenKind::Read => self.read.as_ref(),
        }
    }
}

/// A token replaced by a rotation (a read token whose file was removed
/// included: a rotation to none), still accepted with the access it had
/// until `until`.
#[derive(Debug, Clone)]
struct Previous {
    token: Secret,
    until: Instant,
}

/// What the admin API checks: the tokens in force, and the ones they
/// replaced while their grace runs.
#[derive(Debug, Clone, Default)]
struct Live {
    now: Tokens,
    previous: [Option<Previous>; 2],
}

/// What one look at the token files did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The tokens replaced by what their files hold now (a read token
    /// whose file was removed: dropped).
    pub changed: Vec<TokenKind>,
    /// The files that changed but could not be used (the previous token
    /// stays).
    pub failed: Vec<TokenKind>,
}

/// Which token an admin request presented ([`AdminTokens::access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// The token's kind (the access it gives).
    pub kind: TokenKind,
    /// The token this kind's last rotation replaced, in its grace.
    pub previous: bool,
}

/// The relay's admin tokens, held from their files and re-read when the
/// files change ([`AdminTokens::check`], every `tls.reload_interval`) or
/// on SIGHUP ([`AdminTokens::reload`]); a token replaced is still
/// accepted for `admin.token_grace`. A cheap handle: clones share the
/// tokens.
#[derive(Clone)]
pub struct AdminTokens(Arc<Inner>);

struct Inner {
    /// `admin.token_file`, `admin.read_token_file`.
    paths: [Option<PathBuf>; 2],
    interval: Duration,
    /// `admin.token_grace`.
    grace: Duration,
    /// What the admin API checks: replaced whole by a reload (each
    /// request checks one snapshot).
    current: RwLock<Arc<Live>>,
    /// What was seen of the files. Also serialises looks (the poll and
    /// SIGHUP) and grace ends.
    seen: Mutex<Seen>,
    /// Woken when a reload starts a grace (the watcher then sleeps until
    /// it ends, to log it).
    graced: tokio::sync::Notify,
    reloads: [AtomicU64; 2],
    failures: [AtomicU64; 2],
    /// Requests authenticated with a previous token, by its kind.
    previous_used: [AtomicU64; 2],
    /// The file's current content could not be taken.
    stale: [AtomicBool; 2],
    /// Run between a file's stamp and its read: a test puts a transient
    /// failure exactly there (the race a real EMFILE or EIO at the swap
    /// falls in).
    #[cfg(test)]
    before_read: Mutex<Option<BeforeRead>>,
}

#[cfg(test)]
type BeforeRead = Box<dyn FnMut(TokenKind) + Send>;

#[derive(Default)]
struct Seen {
    /// Each file's stamp when its content was last taken (or found the
    /// same as held, or the read file found absent): `None` when not yet,
    /// or when the last read failed, so it is read again at every look
    /// (a transient failure, EMFILE or EIO at the swap, must not pin the
    /// previous token until the file changes again).
    stamps: [Option<Option<FileStamp>>; 2],
    /// The stamp a failure was last warned about: warned (and counted)
    /// once per distinct stamp while it is read again at every look.
    warned: [Option<Option<FileStamp>>; 2],
    /// A read token equal to the full one was refused and not yet
    /// resolved: warned once, the files read again every look.
    clash_warned: bool,
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTokens")
            .field("token_file", &self.0.paths[0])
            .field("read_token_file", &self.0.paths[1])
            .field("interval", &self.0.interval)
            .field("grace", &self.0.grace)
            .finish_non_exhaustive()
    }
}

impl AdminTokens {
    /// Tokens read from `full` and `read` (`None`: no read-only token
    /// file), starting as `start` (what the configuration read, already
    /// validated), looked at again every `interval` by the admin API; a
    /// token replaced is accepted for `grace` after (zero: refused at
    /// once).
    pub fn new(
        full: PathBuf,
        read: Option<PathBuf>,
        interval: Duration,
        grace: Duration,
        start: Tokens,
    ) -> Self {
        AdminTokens(Arc::new(Inner {
            paths: [Some(full), read],
            interval,
            grace,
            current: RwLock::new(Arc::new(Live {
                now: start,
                previous: Default::default(),
            })),
            seen: Mutex::default(),
            graced: tokio::sync::Notify::new(),
            reloads: Default::default(),
            failures: Default::default(),
            previous_used: Default::default(),
            stale: Default::default(),
            #[cfg(test)]
            before_read: Mutex::default(),
        }))
    }

    fn live(&self) -> Arc<Live> {
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The tokens in force now (not the previous ones in their grace).
    pub fn current(&self) -> Tokens {
        self.live().now.clone()
    }

    /// How often the files are looked at.
    pub fn interval(&self) -> Duration {
        self.0.interval
    }

    /// How long a token replaced is still accepted (`admin.token_grace`).
    pub fn grace(&self) -> Duration {
        self.0.grace
    }

    /// The token `given` is, checked against the tokens in force and the
    /// previous ones still in their grace (one snapshot), each compared
    /// in constant time (`admin::first_match`: all four compared
    /// whatever matches, so the time does not say which did). A token in
    /// force wins over a previous one equal to it. A previous one matched
    /// is counted (`relay_admin_previous_token_requests_total{token}`).
    pub fn access(&self, given: &[u8]) -> Option<Matched> {
        let live = self.live();
        let at = Instant::now();
        let now = |k: TokenKind| live.now.get(k).map(|t| t.expose().as_bytes());
        let prev = |k: TokenKind| {
            live.previous[k.i()]
                .as_ref()
                .filter(|p| at < p.until)
                .map(|p| p.token.expose().as_bytes())
        };
        let slots = [
            now(TokenKind::Full),
            now(TokenKind::Read),
            prev(TokenKind::Full),
            prev(TokenKind::Read),
        ];
        let i = crate::admin::first_match(given, slots)?;
        let m = Matched {
            kind: KINDS[i % 2],
            previous: i >= 2,
        };
        if m.previous {
            self.0.previous_used[m.kind.i()].fetch_add(1, Relaxed);
        }
        Some(m)
    }

    /// Reads both files whatever their metadata says (SIGHUP) and takes
    /// what changed and passes the rules; logs and counts what fails.
    pub fn reload(&self) -> Reloaded {
        self.look(true)
    }

    /// Reads the files whose metadata changed since the last look, or
    /// whose last read failed (the poll); as [`AdminTokens::reload`]
    /// otherwise.
    pub fn check(&self) -> Reloaded {
        self.look(false)
    }

    /// Tokens replaced by a reload so far (`kind`).
    pub fn reloads(&self, kind: TokenKind) -> u64 {
        self.0.reloads[kind.i()].load(Relaxed)
    }

    /// Changed files that could not be used so far (`kind`): once per
    /// distinct file, and at each SIGHUP.
    pub fn failures(&self, kind: TokenKind) -> u64 {
        self.0.failures[kind.i()].load(Relaxed)
    }

    /// Requests authenticated with `kind`'s previous token, in its grace.
    pub fn previous_used(&self, kind: TokenKind) -> u64 {
        self.0.previous_used[kind.i()].load(Relaxed)
    }

    /// Whether `kind`'s file, as it is now, could not be taken (the relay
    /// still holds the token before).
    pub fn stale(&self, kind: TokenKind) -> bool {
        self.0.stale[kind.i()].load(Relaxed)
    }

    fn path(&self, kind: TokenKind) -> Option<&Path> {
        self.0.paths[kind.i()].as_deref()
    }

    /// Has `f` run between each file's stamp and its read (`None`: no
    /// longer).
    #[cfg(test)]
    fn set_before_read(&self, f: Option<BeforeRead>) {
        *self.0.before_read.lock().expect("hook") = f;
    }

    fn look(&self, force: bool) -> Reloaded {
        let mut seen = self.0.seen.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live();
        let mut next = live.now.clone();
        let mut out = Reloaded::default();
        for kind in KINDS {
            let Some(path) = self.path(kind) else {
                continue;
            };
            let i = kind.i();
            let now = stamp(path);
            if !force && seen.stamps[i] == Some(now) {
                continue;
            }
            #[cfg(test)]
            if let Some(f) = self.0.before_read.lock().expect("hook").as_mut() {
                f(kind);
            }
            let held = next.slot(kind);
            let failed = match read_admin_token(path) {
                Ok(t) => {
                    // Touched, or swapped for the same token: nothing to do.
                    if held.as_ref().is_none_or(|h| {
                        !crate::admin::same(h.expose().as_bytes(), t.expose().as_bytes())
                    }) {
                        *held = Some(t);
                        out.changed.push(kind);
                    }
                    None
                }
                // No read token file: never created (its optional Secret
                // absent; warned about at start, picked up when it
                // appears), or removed (the Secret deleted): a rotation to
                // no read token, which is dropped after the grace. The
                // full token is never dropped (the API would open).
                Err(TokenFileError::Read { source, .. })
                    if kind == TokenKind::Read && source.kind() == std::io::ErrorKind::NotFound =>
                {
                    if held.take().is_some() {
                        out.changed.push(kind);
                    }
                    None
                }
                Err(e) => Some(e),
            };
            match failed {
                None => {
                    seen.stamps[i] = Some(now);
                    seen.warned[i] = None;
                    self.0.stale[i].store(false, Relaxed);
                }
                Some(e) => {
                    // Not taken as seen: read again at every look until
                    // it can be used; warned and counted once per file.
                    seen.stamps[i] = None;
                    self.0.stale[i].store(true, Relaxed);
                    if force || seen.warned[i] != Some(now) {
                        seen.warned[i] = Some(now);
                        warn!(
                            token = kind.as_str(),
                            path = %path.display(),
                            error = %e,
                            "admin token file changed but cannot be used; the previous token stays"
                        );
                        out.failed.push(kind);
                    }
                }
            }
        }
        if let (Some(f), Some(r)) = (&next.full, &next.read) {
            if !out.changed.is_empty()
                && crate::admin::same(f.expose().as_bytes(), r.expose().as_bytes())
            {
                // The start's rule: every holder of the read token would
                // hold the full one. Nothing taken; the files are read
                // again at every look (one may be mid-rotation), warned
                // about and counted once.
                for k in &out.changed {
                    seen.stamps[k.i()] = None;
                    self.0.stale[k.i()].store(true, Relaxed);
                }
                if !seen.clash_warned {
                    warn!(
                        changed = ?out.changed.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                        "admin token files changed, but the read-only token would be the full \
                         token: the previous tokens stay"
                    );
                    out.failed.append(&mut out.changed);
                    seen.clash_warned = true;
                }
                out.changed.clear();
            }
        }
        if !out.changed.is_empty() {
            seen.clash_warned = false;
            let at = Instant::now();
            let grace = self.0.grace;
            let mut previous = live.previous.clone();
            for &kind in &out.changed {
                let slot = &mut previous[kind.i()];
                // One previous token per kind: one still in its grace from
                // an earlier rotation ends now.
                if slot.take().is_some_and(|p| at < p.until) {
                    info!(
                        token = kind.as_str(),
                        "admin token rotated again within admin.token_grace: the token before \
                         the previous one is refused from now on"
                    );
                }
                if !grace.is_zero() {
                    *slot = live.now.get(kind).map(|token| Previous {
                        token: token.clone(),
                        until: at + grace,
                    });
                }
            }
            *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Live {
                now: next.clone(),
                previous,
            });
            if !grace.is_zero() {
                self.0.graced.notify_one();
            }
            for &kind in &out.changed {
                self.0.reloads[kind.i()].fetch_add(1, Relaxed);
                let path = self
                    .path(kind)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let grace = humantime::format_duration(grace).to_string();
                match (next.get(kind).is_some(), self.0.grace.is_zero()) {
                    (true, true) => info!(
                        token = kind.as_str(), path,
                        "admin token reloaded: requests with the previous one are refused from now on \
                         (admin.token_grace is 0s)"
                    ),
                    (true, false) => info!(
                        token = kind.as_str(), path, grace,
                        "admin token reloaded: requests with the previous one are accepted for \
                         admin.token_grace, then refused"
                    ),
                    (false, true) => info!(
                        token = kind.as_str(), path,
                        "admin read token file removed: the read token is dropped, requests with \
                         it are refused from now on (admin.token_grace is 0s)"
                    ),
                    (false, false) => info!(
                        token = kind.as_str(), path, grace,
                        "admin read token file removed: the read token is dropped, requests with \
                         it are accepted for admin.token_grace, then refused"
                    ),
                }
            }
        }
        for &kind in &out.failed {
            self.0.failures[kind.i()].fetch_add(1, Relaxed);
        }
        out
    }

    /// When the first grace running ends (`None`: none runs).
    fn grace_ends(&self) -> Option<Instant> {
        self.live().previous.iter().flatten().map(|p| p.until).min()
    }

    /// Drops the previous tokens whose grace has ended, logged. (They are
    /// refused from their grace's end whether dropped yet or not: the
    /// check looks at the time.)
    fn end_graces(&self) {
        let _seen = self.0.seen.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live();
        let at = Instant::now();
        let mut next = (*live).clone();
        let mut ended = false;
        for kind in KINDS {
            if next.previous[kind.i()]
                .as_ref()
                .is_some_and(|p| p.until <= at)
            {
                next.previous[kind.i()] = None;
                ended = true;
                info!(
                    token = kind.as_str(),
                    "admin token grace ended: the previous token is refused from now on"
                );
            }
        }
        if ended {
            *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        }
    }
}

/// Looks at `tokens`' files every [`AdminTokens::interval`] until `stop`
/// (the first look at once: a file replaced between the configuration's
/// read and this start is taken then), and ends each previous token's
/// grace when it runs out (logged).
pub(crate) async fn watch(tokens: AdminTokens, stop: CancellationToken) {
    let mut tick = tokio::time::interval(tokens.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Registered before the look at the graces: a reload between the
        // two leaves a permit, so its grace is not missed.
        let graced = tokens.0.graced.notified();
        let ends = tokens.grace_ends();
        let grace_ended = async {
            match ends {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            // Stat (and on a change, read) two small files on this task.
            _ = tick.tick() => {
                tokens.check();
            }
            _ = grace_ended => {}
            _ = graced => {}
        }
        tokens.end_graces();
    }
}
