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
//! (`relay_admin_token_reload_failures_total{token}`). The admin API
//! checks the tokens held now, swapped whole, so no request sees one file's
//! new token with the other's half-applied state.
//!
//! The route agent holds its `--token-file` as a [`Secret::from_file`]:
//! the file is read again before a request when its metadata changed,
//! and once after a 401 (the relay saw the rotation first; see
//! `agent::poll`). Either side seeing the new Secret first then heals
//! within a poll interval of the other seeing it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;

#[cfg(test)]
mod tests;

/// The shortest admin token the relay accepts.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token file's metadata, read through its path (symlinks followed):
/// which file it is (device, inode), its size and its times. A Secret
/// volume's swap puts another file behind the path (another inode); a
/// write in place moves the size or the times (the change time included,
/// so a same-length rewrite within one modification-time tick counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// `path`'s [`FileStamp`]; `None` when it cannot be read (absent).
pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

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
}

/// What one look at the token files did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The tokens replaced by what their files hold now.
    pub changed: Vec<TokenKind>,
    /// The files that changed but could not be used (the previous token
    /// stays).
    pub failed: Vec<TokenKind>,
}

/// The relay's admin tokens, held from their files and re-read when the
/// files change ([`AdminTokens::check`], every `tls.reload_interval`) or
/// on SIGHUP ([`AdminTokens::reload`]). A cheap handle: clones share the
/// tokens.
#[derive(Clone)]
pub struct AdminTokens(Arc<Inner>);

struct Inner {
    /// `admin.token_file`, `admin.read_token_file`.
    paths: [Option<PathBuf>; 2],
    interval: Duration,
    /// What the admin API checks: swapped whole by a reload.
    current: RwLock<Arc<Tokens>>,
    /// Each file's stamp when last looked at (`None`: not yet), so a
    /// change is read, and warned about, once. Also serialises looks (the
    /// poll and SIGHUP).
    seen: Mutex<Seen>,
    reloads: [AtomicU64; 2],
    failures: [AtomicU64; 2],
}

#[derive(Default)]
struct Seen {
    stamps: [Option<Option<FileStamp>>; 2],
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
            .finish_non_exhaustive()
    }
}

impl AdminTokens {
    /// Tokens read from `full` and `read` (`None`: no read-only token
    /// file), starting as `start` (what the configuration read, already
    /// validated), looked at again every `interval` by the admin API.
    pub fn new(full: PathBuf, read: Option<PathBuf>, interval: Duration, start: Tokens) -> Self {
        AdminTokens(Arc::new(Inner {
            paths: [Some(full), read],
            interval,
            current: RwLock::new(Arc::new(start)),
            seen: Mutex::default(),
            reloads: Default::default(),
            failures: Default::default(),
        }))
    }

    /// The tokens in force now.
    pub fn current(&self) -> Arc<Tokens> {
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How often the files are looked at.
    pub fn interval(&self) -> Duration {
        self.0.interval
    }

    /// Reads both files whatever their metadata says (SIGHUP) and takes
    /// what changed and passes the rules; logs and counts what fails.
    pub fn reload(&self) -> Reloaded {
        self.look(true)
    }

    /// Reads the files whose metadata changed since the last look (the
    /// poll); as [`AdminTokens::reload`] otherwise.
    pub fn check(&self) -> Reloaded {
        self.look(false)
    }

    /// Tokens replaced by a reload so far (`kind`).
    pub fn reloads(&self, kind: TokenKind) -> u64 {
        self.0.reloads[kind.i()].load(Relaxed)
    }

    /// Changed files that could not be used so far (`kind`).
    pub fn failures(&self, kind: TokenKind) -> u64 {
        self.0.failures[kind.i()].load(Relaxed)
    }

    fn path(&self, kind: TokenKind) -> Option<&Path> {
        self.0.paths[kind.i()].as_deref()
    }

    fn look(&self, force: bool) -> Reloaded {
        let mut seen = self.0.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.current()).clone();
        let mut out = Reloaded::default();
        for kind in KINDS {
            let Some(path) = self.path(kind) else {
                continue;
            };
            let now = stamp(path);
            if !force && seen.stamps[kind.i()] == Some(now) {
                continue;
            }
            seen.stamps[kind.i()] = Some(now);
            let held = next.slot(kind);
            match read_admin_token(path) {
                Ok(t) => {
                    // Touched, or swapped for the same token: nothing to do.
                    if held.as_ref().is_none_or(|h| {
                        !crate::admin::same(h.expose().as_bytes(), t.expose().as_bytes())
                    }) {
                        *held = Some(t);
                        out.changed.push(kind);
                    }
                }
                // A read token never created (its optional Secret absent):
                // warned about at start, picked up when it appears.
                Err(TokenFileError::Read { source, .. })
                    if kind == TokenKind::Read
                        && held.is_none()
                        && source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
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
            *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            for &kind in &out.changed {
                self.0.reloads[kind.i()].fetch_add(1, Relaxed);
                info!(
                    token = kind.as_str(),
                    path = %self.path(kind).map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                    "admin token reloaded: requests with the previous one are refused from now on"
                );
            }
        }
        for &kind in &out.failed {
            self.0.failures[kind.i()].fetch_add(1, Relaxed);
        }
        out
    }

    /// Prometheus text: `relay_admin_token_reloads_total{token}` and
    /// `relay_admin_token_reload_failures_total{token}`, for the token
    /// files configured.
    pub(crate) fn render(&self) -> String {
        let (mut ok, mut failed) = (String::new(), String::new());
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
        }
        format!(
            "# HELP relay_admin_token_reloads_total Admin tokens replaced by what their file holds now (token: full = admin.token_file, read = admin.read_token_file), seen changed by the poll every tls.reload_interval or on SIGHUP.\n\
             # TYPE relay_admin_token_reloads_total counter\n{ok}\
             # HELP relay_admin_token_reload_failures_total Admin token files seen changed that could not be used (unreadable, empty, shorter than 16 characters, or a read-only token equal to the full one): the previous token stays. Counted once per change, and at each SIGHUP.\n\
             # TYPE relay_admin_token_reload_failures_total counter\n{failed}"
        )
    }
}

/// Looks at `tokens`' files every [`AdminTokens::interval`] until `stop`
/// (the first look at once: a file replaced between the configuration's
/// read and this start is taken then).
pub(crate) async fn watch(tokens: AdminTokens, stop: CancellationToken) {
    let mut tick = tokio::time::interval(tokens.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Stat (and on a change, read) two small files on this task.
        tokens.check();
    }
}

/// A route agent's token file (`--token-file`), behind
/// [`Secret::from_file`]: the token last read from it, read again when
/// the file's metadata changes ([`Secret::current`]) or when asked
/// ([`Secret::reread`], after a 401). A file that cannot be read or
/// is empty keeps the token last read (logged once per change, tried
/// again at the next look).
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    token: String,
    /// The stamp of the file the token was read from.
    read_at: Option<FileStamp>,
    /// The stamp last warned about (a file that could not be used).
    warned: Option<Option<FileStamp>>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The agent's token in `path`: trailing whitespace dropped (as it always
/// was).
fn read_agent_token(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim_end().to_string())
}

impl TokenFile {
    /// Reads `path` (an error if it cannot be read: at start, that is the
    /// operator's to fix); returns the file and the token.
    pub(crate) fn open(path: &Path) -> std::io::Result<(Arc<TokenFile>, String)> {
        let read_at = stamp(path);
        let token = read_agent_token(path)?;
        let file = TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                token: token.clone(),
                read_at,
                warned: None,
            }),
        };
        Ok((Arc::new(file), token))
    }

    /// The token now: the file read again if its metadata changed since
    /// the last read.
    pub(crate) fn current(&self) -> String {
        self.refresh(false)
    }

    /// The file read again whatever its metadata says; the token now.
    pub(crate) fn reread(&self) -> String {
        self.refresh(true)
    }

    /// Takes the file's metadata now as read, its content unread (a
    /// change the metadata did not show, for tests).
    #[cfg(test)]
    fn mark_read_now(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).read_at = stamp(&self.path);
    }

    fn refresh(&self, force: bool) -> String {
        let now = stamp(&self.path);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !force && now.is_some() && st.read_at == now {
            return st.token.clone();
        }
        match read_agent_token(&self.path) {
            Ok(t) if !t.is_empty() => {
                if t != st.token {
                    info!(path = %self.path.display(), "admin token file changed: read again");
                }
                st.token = t;
                st.read_at = now;
                st.warned = None;
            }
            // Not taken as read: looked at again before the next request
            // (a file caught mid-write reads whole then).
            r => {
                if st.warned != Some(now) {
                    let error = match r {
                        Err(e) => e.to_string(),
                        Ok(_) => "empty".to_string(),
                    };
                    warn!(path = %self.path.display(), %error, "admin token file changed but cannot be used; the token read before stays");
                    st.warned = Some(now);
                }
            }
        }
        st.token.clone()
    }
}
