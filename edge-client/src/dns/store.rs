//! The name table on disk, so a restart while the cloud is away still
//! answers (the file format and its writing: `relay_transport::saved`).

use std::path::Path;

use relay_protocol::ServiceName;
use serde::{Deserialize, Serialize};

use super::zone::Zone;
pub use relay_transport::saved::LoadError;

/// Format version of the file; a file of another version is ignored.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Saved {
    cluster_domain: String,
    services: Vec<ServiceName>,
}

/// What the file holds, for errors.
const WHAT: &str = "name table";

/// Writes `zone` to `path` atomically.
pub(crate) fn save(path: &Path, zone: &Zone) -> std::io::Result<()> {
    let saved = Saved {
        cluster_domain: zone.domain().to_string(),
        services: zone.services().cloned().collect(),
    };
    relay_transport::saved::write_json(path, VERSION, &saved)
}

/// Reads a saved table: `Ok(None)` when there is no file.
pub(crate) fn load(path: &Path) -> Result<Option<(String, Vec<ServiceName>)>, LoadError> {
    let saved: Option<Saved> = relay_transport::saved::read_json(path, VERSION, WHAT)?;
    Ok(saved.map(|s| (s.cluster_domain, s.services)))
}
