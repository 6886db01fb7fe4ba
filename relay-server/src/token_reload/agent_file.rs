//! The route agent's side of token rotation: its `--token-file`, read
//! again when the file changes and after a 401 (see the parent module).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::{stamp, FileStamp};

/// A route agent's token file (`--token-file`), behind
/// [`Secret::from_file`](crate::config::Secret::from_file): the token last read from it, read again when
/// the file's metadata changes ([`Secret::current`](crate::config::Secret::current)) or when asked
/// ([`Secret::reread`](crate::config::Secret::reread), after a 401). A file that cannot be read or
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
    pub(crate) fn mark_read_now(&self) {
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
