//! The name table on disk, so a restart while the cloud is away still
//! answers: JSON (readable by operators), written through a temporary file
//! and a rename so a crash never leaves half a table.

use std::path::Path;

use relay_protocol::ServiceName;
use serde::{Deserialize, Serialize};

use super::zone::Zone;

/// Format version of the file; a file of another version is ignored.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    cluster_domain: String,
    services: Vec<ServiceName>,
}

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
    /// The file is not a table of this version.
    #[error("{path} is not a saved name table: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Writes `zone` to `path` atomically.
pub(crate) fn save(path: &Path, zone: &Zone) -> std::io::Result<()> {
    let saved = Saved {
        version: VERSION,
        cluster_domain: zone.domain().to_string(),
        services: zone.services().cloned().collect(),
    };
    let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::identity::write_atomic(path, &bytes, false)
}

/// Reads a saved table: `Ok(None)` when there is no file.
pub(crate) fn load(path: &Path) -> Result<Option<(String, Vec<ServiceName>)>, LoadError> {
    let p = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path: p, source }),
    };
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| LoadError::Invalid {
        path: p.clone(),
        message: e.to_string(),
    })?;
    if saved.version != VERSION {
        return Err(LoadError::Invalid {
            path: p,
            message: format!("version {} (this build reads {VERSION})", saved.version),
        });
    }
    Ok(Some((saved.cluster_domain, saved.services)))
}
