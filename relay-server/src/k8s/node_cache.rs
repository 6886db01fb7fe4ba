//! The relay's cache of Node claims (`kubernetes.cache_file`): what the
//! last Node list from the apiserver said each node may claim, written
//! after each change (at most once a second, atomically), and read at
//! start. A relay whose container restarts during a control-plane outage
//! (the kubelet restarts it without the apiserver) would otherwise refuse
//! every edge until the apiserver is back, its directory empty; with the
//! cache it admits them on what the cluster said last, as a relay that
//! kept running does, until the first list replaces it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_kube::NodeClaims;
use relay_transport::saved::{read_json, write_json};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The file's format version.
const VERSION: u32 = 1;
/// What the file holds, for messages.
pub(super) const WHAT: &str = "node cache";

/// A cache older than this is not used: by then Nodes may have been
/// deleted and their pod CIDRs given to others (a relay whose saves kept
/// failing, or one back on a node after weeks, would otherwise admit edges
/// on claims long gone).
pub(super) const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The cache's contents.
#[derive(Serialize, Deserialize)]
struct Cached {
    /// When it was written (seconds since 1970, by the relay's clock).
    written_unix: u64,
    /// Each Node's claims, by name.
    nodes: BTreeMap<String, NodeClaims>,
}

/// Writes `nodes` to `path` (the saver's `save`).
pub(super) fn save(path: &Path, nodes: &BTreeMap<String, NodeClaims>) -> std::io::Result<()> {
    let written_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    write_json(
        path,
        VERSION,
        &Cached {
            written_unix,
            nodes: nodes.clone(),
        },
    )
}

/// The cached claims and when they were written; `None` without a file,
/// or (logged) for one that cannot be read, holds no Node, or is older
/// than [`MAX_AGE`].
pub(super) fn load(path: &Path) -> Option<(BTreeMap<String, NodeClaims>, SystemTime)> {
    match read_json::<Cached>(path, VERSION, WHAT) {
        Ok(Some(c)) if !c.nodes.is_empty() => {
            let written = UNIX_EPOCH + Duration::from_secs(c.written_unix);
            let age = written.elapsed().unwrap_or_default();
            if age > MAX_AGE {
                warn!(
                    age_secs = age.as_secs(),
                    "the node cache is older than {MAX_AGE:?}: not used"
                );
                return None;
            }
            Some((c.nodes, written))
        }
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "the node cache is not used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims survive the file; a file of another version, a corrupt one,
    /// an empty one and one written in 1970 are not used.
    #[test]
    fn claims_come_back_and_bad_files_are_not_used() {
        let dir = std::env::temp_dir().join(format!("relay-node-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nodes.json");
        assert!(load(&path).is_none(), "no file");
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "edge-1".to_string(),
            NodeClaims {
                pod_cidrs: vec!["10.244.7.0/24".parse().unwrap()],
                internal_ips: vec!["192.168.1.10".parse().unwrap()],
                hostname: Some("edge-1.shop".into()),
                edge: true,
                ..NodeClaims::default()
            },
        );
        save(&path, &nodes).unwrap();
        let (back, written) = load(&path).unwrap();
        assert_eq!(back, nodes);
        assert!(written.elapsed().unwrap_or_default() < Duration::from_secs(60));
        let old = std::fs::read_to_string(&path).unwrap().replacen(
            "\"written_unix\":",
            "\"written_unix\":1,\"was\":",
            1,
        );
        for bad in [
            r#"{"version":2,"written_unix":1,"nodes":{}}"#,
            "{ not json",
            r#"{"version":1,"written_unix":1,"nodes":{}}"#,
            old.as_str(),
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(load(&path).is_none(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
