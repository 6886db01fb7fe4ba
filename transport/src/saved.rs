//! Tables kept on disk so that a restart while the cloud (or the
//! Kubernetes API) is away still serves what was last known: at the edge,
//! the resolver's names and capture's routes and ClusterIP table; at the
//! relay, the Node claims. JSON (readable by operators), with a format
//! version, written through a temporary file and a rename so a crash never
//! leaves half a table, at most once a second ([`saver`]; at the edge at
//! most once a minute, [`ON_FLASH`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why a saved table was not loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Reading the file failed (other than its absence).
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a table of this kind and version.
    #[error("{path} is not a saved {what}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What it should have held.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The file's envelope: the format version beside the table's own fields.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    table: T,
}

/// Only the version, read before the rest (a file of another version may
/// not parse as this one).
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Writes `data` to `path` through a temporary file, an fsync and a
/// rename, so a crash never leaves half a file; `private` files are 0600.
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> std::io::Result<()> {
    let tmp = write_temp(path, data, private)?;
    std::fs::rename(&tmp, path)
}

/// The first half of [`write_atomic`]: `data` written and synced to a
/// temporary file beside `path`, whose name it returns, for a caller that
/// renames several files into place only once all are written (a full
/// disk then leaves the old set whole).
pub fn write_temp(path: &Path, data: &[u8], private: bool) -> std::io::Result<PathBuf> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes `table` to `path` as format `version`, atomically.
pub fn write_json<T: Serialize>(path: &Path, version: u32, table: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(&Envelope { version, table }).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(path, &bytes, false)
}

/// Reads a table of format `version` (a `what`, for errors): `Ok(None)`
/// when there is no file.
pub fn read_json<T: DeserializeOwned>(
    path: &Path,
    version: u32,
    what: &'static str,
) -> Result<Option<T>, LoadError> {
    let p = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path: p, source }),
    };
    let invalid = |message: String| LoadError::Invalid {
        path: p.clone(),
        what,
        message,
    };
    let v: VersionOnly = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if v.version != version {
        return Err(invalid(format!(
            "version {} (this build reads {version})",
            v.version
        )));
    }
    let e: Envelope<T> = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(e.table))
}

/// How often at most [`saver_every`] writes a table kept on an edge
/// node's storage. Edge boards boot from SD cards and eMMC, which wear out
/// by writes, and a table of the whole cluster's Services (tens of bytes
/// per port) changes at the pace of endpoints anywhere: once a second that
/// could be gigabytes a day. The tables serve only a restart while the
/// relay is away, for which a minute-old table is as good.
pub const ON_FLASH: Duration = Duration::from_secs(60);

/// Saves the newest value `rx` holds with `save`, at most once a second,
/// and once more when `cancel` fires if one is waiting. `None` (nothing
/// known yet) is never written, and neither is what `rx` holds when it
/// starts (it came from the file).
pub async fn saver<T: Send + Sync + 'static>(
    path: PathBuf,
    rx: watch::Receiver<Option<Arc<T>>>,
    save: fn(&Path, &T) -> std::io::Result<()>,
    what: &'static str,
    cancel: CancellationToken,
) {
    saver_every(path, rx, save, what, Duration::from_secs(1), cancel).await
}

/// [`saver`], writing at most once every `every`.
pub async fn saver_every<T: Send + Sync + 'static>(
    path: PathBuf,
    mut rx: watch::Receiver<Option<Arc<T>>>,
    save: fn(&Path, &T) -> std::io::Result<()>,
    what: &'static str,
    every: Duration,
    cancel: CancellationToken,
) {
    rx.borrow_and_update();
    // A failure is logged once, then again only when it changes or after
    // a success: a read-only directory must not log every second.
    let mut failing: Option<String> = None;
    loop {
        let stop = tokio::select! {
            biased;
            _ = cancel.cancelled() => true,
            r = rx.changed() => r.is_err(),
        };
        // At shutdown, only a value not yet written.
        let unsaved = !stop || rx.has_changed().unwrap_or(false);
        let value = rx.borrow_and_update().clone();
        if let Some(value) = value.filter(|_| unsaved) {
            let p = path.clone();
            let why = match tokio::task::spawn_blocking(move || save(&p, &value)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            match (&why, &failing) {
                (Some(w), Some(f)) if w == f => {}
                (Some(w), _) => {
                    warn!(file = %path.display(), error = %w, "saving the {what} failed (logged again when this changes)")
                }
                (None, Some(_)) => info!(file = %path.display(), "saving the {what} works again"),
                (None, None) => {}
            }
            failing = why;
        }
        if stop {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value the saver writes.
    struct Text(&'static str);

    fn save_text(path: &Path, v: &Text) -> std::io::Result<()> {
        write_json(path, 1, &serde_json::json!({ "text": v.0 }))
    }

    fn saved_text(path: &Path) -> Option<String> {
        let v: Option<serde_json::Value> = read_json(path, 1, "text").ok()?;
        Some(v?["text"].as_str()?.to_string())
    }

    #[tokio::test]
    async fn the_newest_value_is_saved_and_the_last_one_at_shutdown() {
        let dir = std::env::temp_dir().join(format!("edge-saved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("t.json");
        let (tx, rx) = watch::channel(Some(Arc::new(Text("loaded"))));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(saver(path.clone(), rx, save_text, "text", cancel.clone()));
        // What it starts with is not written back.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(saved_text(&path), None);
        tx.send_replace(Some(Arc::new(Text("a"))));
        let t = std::time::Instant::now();
        while saved_text(&path).as_deref() != Some("a") {
            assert!(t.elapsed() < Duration::from_secs(5), "never saved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Within the second after a save: written only at shutdown.
        tx.send_replace(Some(Arc::new(Text("b"))));
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(saved_text(&path).as_deref(), Some("b"));
        // Another version is refused, naming it.
        let e = read_json::<serde_json::Value>(&path, 2, "text").unwrap_err();
        assert!(
            e.to_string().contains("version 1 (this build reads 2)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
