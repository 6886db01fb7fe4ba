//! The relay's addresses as its name last resolved, kept on disk
//! (`relay_addrs_file`): an edge restarted (a reboot after a site power
//! cut, an OOM kill, a rollout) while the site's or the carrier's DNS is
//! down still dials the relay, whose addresses rarely change, instead of
//! failing "resolve relay" for the whole outage. A fresh lookup always
//! wins; these stand in only when it fails, as the addresses resolved
//! earlier in the same run do (see `dial.rs`). Written with
//! `relay_transport::saved` when they change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use relay_transport::saved::LoadError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Format version of the file; a file of another version is ignored
/// (logged).
const VERSION: u32 = 1;

/// What the file holds, for errors.
const WHAT: &str = "relay address table";

/// Relay name (as configured, `host:port`) → the addresses it resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedRelayAddrs {
    pub names: BTreeMap<String, Vec<SocketAddr>>,
}

/// Writes `state` to `path` atomically.
pub(crate) fn save(path: &Path, state: &SavedRelayAddrs) -> std::io::Result<()> {
    relay_transport::saved::write_json(path, VERSION, state)
}

/// Reads the saved table: `Ok(None)` when there is no file.
pub(crate) fn load(path: &Path) -> Result<Option<SavedRelayAddrs>, LoadError> {
    relay_transport::saved::read_json(path, VERSION, WHAT)
}

/// [`load`], logging what it found; empty when there is nothing usable
/// (an unreadable file is logged and ignored: a working resolver gives
/// the addresses anyway).
pub(crate) fn load_logged(path: &Path) -> SavedRelayAddrs {
    match load(path) {
        Ok(Some(s)) => {
            info!(path = %path.display(), names = s.names.len(), "relay addresses from the previous run, dialled if the relay's name does not resolve");
            s
        }
        Ok(None) => SavedRelayAddrs::default(),
        Err(e) => {
            warn!(error = %e, "saved relay addresses ignored");
            SavedRelayAddrs::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_table_reads_back_and_a_broken_one_is_ignored() {
        let dir = std::env::temp_dir().join(format!("relay-addrs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay-addrs.json");
        let mut s = SavedRelayAddrs::default();
        s.names.insert(
            "relay.example:8443".into(),
            vec![
                "203.0.113.7:8443".parse().unwrap(),
                "[2001:db8::7]:8443".parse().unwrap(),
            ],
        );
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s.clone()));
        assert_eq!(load_logged(&path), s);
        std::fs::write(&path, b"{\"version\": 1, \"names\": 7}").unwrap();
        assert!(load(&path).is_err());
        assert_eq!(load_logged(&path), SavedRelayAddrs::default());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(load(&path).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
