//! What capture last knew, kept on disk (`capture_state_file`): the last
//! session's tunnel routes and served routes, and the ClusterIP table. An
//! edge restarted while the relay is unreachable starts from it, so it
//! captures as before:
//! - connections to the tunnel routes are reset at once, instead of
//!   leaving by the default route, where a site LAN that reuses the
//!   cluster's ranges would answer them;
//! - Services with an endpoint on this node are served by that endpoint.
//!
//! Each session replaces it (the relay sends the whole route list and
//! Service table first). Written with `relay_transport::saved`.

use std::path::Path;

use relay_protocol::{Cidr, ServicePort};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::services::ServiceTable;
use relay_transport::saved::LoadError;

/// Format version of the file; a file of another version is ignored
/// (logged).
const VERSION: u32 = 1;

/// What the file holds, for errors.
const WHAT: &str = "capture state";

/// The last session's routes, as capture uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Routes {
    /// Prefixes sent through the tunnel.
    pub tunnel: Vec<Cidr>,
    /// Prefixes this edge serves (never captured).
    pub served: Vec<Cidr>,
}

/// The saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedCapture {
    /// `None` until a session gave routes.
    pub routes: Option<Routes>,
    /// The ClusterIP table.
    pub ports: Vec<ServicePort>,
}

impl SavedCapture {
    /// The state capture works from now.
    pub(crate) fn of(routes: Option<&Routes>, table: &ServiceTable) -> SavedCapture {
        SavedCapture {
            routes: routes.cloned(),
            ports: table.values().cloned().collect(),
        }
    }

    /// The ClusterIP table.
    pub(crate) fn table(&self) -> ServiceTable {
        self.ports.iter().map(|p| (p.key, p.clone())).collect()
    }
}

/// Writes `state` to `path` atomically.
pub(crate) fn save(path: &Path, state: &SavedCapture) -> std::io::Result<()> {
    relay_transport::saved::write_json(path, VERSION, state)
}

/// Reads the saved state: `Ok(None)` when there is no file.
pub(crate) fn load(path: &Path) -> Result<Option<SavedCapture>, LoadError> {
    relay_transport::saved::read_json(path, VERSION, WHAT)
}

/// [`load`], logging what it found; `None` when there is nothing usable
/// (an unreadable file is logged and ignored: the first session sends
/// everything anyway).
pub(crate) fn load_logged(path: &Path) -> Option<SavedCapture> {
    match load(path) {
        Ok(Some(s)) => {
            info!(
                routes = s.routes.as_ref().map_or(0, |r| r.tunnel.len()),
                ports = s.ports.len(),
                file = %path.display(),
                "saved capture state loaded; used until a session sends the current one"
            );
            Some(s)
        }
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "saved capture state not used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_protocol::ServiceKey;

    #[test]
    fn saved_and_loaded_whole_and_other_versions_refused() {
        let dir = std::env::temp_dir().join(format!("edge-capture-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("capture.json");
        assert_eq!(load(&path).unwrap(), None, "no file: nothing");
        let port = ServicePort {
            key: ServiceKey {
                vip: "10.96.0.20:80".parse().unwrap(),
                udp: false,
            },
            remote: true,
            local: vec!["10.244.7.5:8080".parse().unwrap()],
        };
        let table: ServiceTable = [(port.key, port)].into();
        let routes = Routes {
            tunnel: vec!["10.244.0.0/16".parse().unwrap()],
            served: vec!["10.244.7.0/24".parse().unwrap()],
        };
        let state = SavedCapture::of(Some(&routes), &table);
        save(&path, &state).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back, state);
        assert_eq!(back.table(), table);
        assert_eq!(back.routes, Some(routes));
        // Readable by operators: the prefixes as text.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"10.244.0.0/16\""), "{text}");
        std::fs::write(&path, br#"{"version": 2, "routes": null, "ports": []}"#).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("version 2") && e.contains(WHAT), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
