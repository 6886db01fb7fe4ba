//! The relay's caches of what the apiserver said last: the Node claims
//! (`kubernetes.cache_file`) and the Services with their EndpointSlices
//! (`kubernetes.services_cache_file`), written after changes (atomically,
//! the Services at most every [`SERVICES_EVERY`]) and read at start. A
//! relay whose container restarts during a control-plane outage (the
//! kubelet restarts it without the apiserver) would otherwise refuse every
//! edge until the apiserver is back, its directory empty, and resolve no
//! Service; with the caches it admits edges and routes Services on what
//! the cluster said last, as a relay that kept running does, until the
//! first lists replace them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_kube::{NodeClaims, ServiceObjects};
use relay_transport::saved::{read_json, write_json};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// A cache older than this is not used: by then Nodes may have been
/// deleted and their pod CIDRs given to others, Services deleted and
/// their ClusterIPs reused (a relay whose saves kept failing, or one back
/// on a node after weeks, would otherwise act on a cluster long gone).
pub(crate) const MAX_AGE: Duration = crate::directory::CACHE_MAX_AGE;

/// The Services cache is rewritten at most this often: a large cluster's
/// objects take megabytes, and endpoints change all the time.
pub(crate) const SERVICES_EVERY: Duration = Duration::from_secs(10);

/// While the watch feeding a cache works, it is written again this often
/// even if nothing changed: the file's age then says when the cluster
/// last confirmed it, not when it last changed (a stable cluster's cache
/// would otherwise be older than [`MAX_AGE`] at the restart that needs it).
pub(crate) const RESTAMP_EVERY: Duration = Duration::from_secs(3600);

/// Every [`RESTAMP_EVERY`], calls `poke` (which writes the cache again)
/// if `errors` (the watch's error count; `None` once its owner is gone,
/// which ends the loop) has not moved since the last round: a watch that
/// failed in between (an outage, a stalled connection cut by the read
/// timeout) may have missed changes, so what it holds is not re-stamped.
pub(crate) async fn restamp(
    errors: impl Fn() -> Option<u64>,
    poke: impl Fn(),
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last = errors();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESTAMP_EVERY) => {}
        }
        let now = errors();
        if now.is_none() {
            return;
        }
        if now == last {
            poke();
        }
        last = now;
    }
}

/// What one cache file holds.
pub(crate) trait Cached: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The file's format version.
    const VERSION: u32;
    /// What the file holds, for messages.
    const WHAT: &'static str;
    /// Whether there is nothing in it (an empty cache is not used).
    fn is_empty(&self) -> bool;
}

/// The Node cache's contents: each Node's claims, by name.
#[derive(Serialize, Deserialize)]
pub(crate) struct Nodes {
    pub(crate) nodes: BTreeMap<String, NodeClaims>,
}

impl Cached for Nodes {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "node cache";
    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl Cached for ServiceObjects {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "services cache";
    fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// A cache's contents with when they were written.
#[derive(Serialize, Deserialize)]
struct Stamped<T> {
    /// Seconds since 1970, by the relay's clock.
    written_unix: u64,
    #[serde(flatten)]
    contents: T,
}

/// Writes `contents` to `path` (the saver's `save`).
pub(crate) fn save<T: Cached>(path: &Path, contents: &T) -> std::io::Result<()> {
    let written_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    write_json(
        path,
        T::VERSION,
        &Stamped {
            written_unix,
            contents,
        },
    )
}

/// The cached contents and when they were written; `None` without a
/// file, or (logged) for one that cannot be read, holds nothing, or is
/// older than [`MAX_AGE`].
pub(crate) fn load<T: Cached>(path: &Path) -> Option<(T, SystemTime)> {
    match read_json::<Stamped<T>>(path, T::VERSION, T::WHAT) {
        Ok(Some(c)) if !c.contents.is_empty() => {
            let written = UNIX_EPOCH + Duration::from_secs(c.written_unix);
            let age = written.elapsed().unwrap_or_default();
            if age > MAX_AGE {
                warn!(
                    age_secs = age.as_secs(),
                    "the {} is older than {MAX_AGE:?}: not used",
                    T::WHAT
                );
                return None;
            }
            Some((c.contents, written))
        }
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "the {} is not used", T::WHAT);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache is written again each hour the watch had no error, and
    /// not after an hour with one.
    #[tokio::test(start_paused = true)]
    async fn a_cache_is_restamped_only_while_its_watch_works() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        use std::sync::Arc;
        let errors = Arc::new(AtomicU64::new(0));
        let pokes = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(restamp(
            {
                let errors = errors.clone();
                move || Some(errors.load(Relaxed))
            },
            {
                let pokes = pokes.clone();
                move || {
                    pokes.fetch_add(1, Relaxed);
                }
            },
            stop.clone(),
        ));
        let hour = |n: u32| tokio::time::sleep(RESTAMP_EVERY * n + Duration::from_secs(1));
        hour(2).await;
        assert_eq!(pokes.load(Relaxed), 2, "two quiet hours");
        errors.fetch_add(1, Relaxed);
        tokio::time::sleep(RESTAMP_EVERY).await;
        assert_eq!(pokes.load(Relaxed), 2, "an hour with an error");
        tokio::time::sleep(RESTAMP_EVERY).await;
        assert_eq!(pokes.load(Relaxed), 3, "quiet again");
        stop.cancel();
        task.await.unwrap();
    }

    /// Claims survive the file; a file of another version, a corrupt one,
    /// an empty one and one written in 1970 are not used.
    #[test]
    fn claims_come_back_and_bad_files_are_not_used() {
        let dir = std::env::temp_dir().join(format!("relay-node-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nodes.json");
        assert!(load::<Nodes>(&path).is_none(), "no file");
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
        save(
            &path,
            &Nodes {
                nodes: nodes.clone(),
            },
        )
        .unwrap();
        let (back, written) = load::<Nodes>(&path).unwrap();
        assert_eq!(back.nodes, nodes);
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
            assert!(load::<Nodes>(&path).is_none(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
