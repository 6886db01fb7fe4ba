//! A client that loops new connections (connect, GET `/`, expect 200)
//! from a lab namespace to a set of edge pods, and reports its failures
//! against events (a replica killed or told to stop): how many failed
//! after each, for how long, and whether any failed outside a bounded gap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use tokio::net::TcpStream;

use crate::netns::{self, NetnsLab, Role};
use crate::scenario::{sa, HTTP};

/// One connection, then `GET /`, expecting 200, within 3 s.
pub async fn get(target: SocketAddr) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(3), async {
        let s = TcpStream::connect(target).await?;
        let (code, _) = crate::http_get(s, &target.to_string(), "/", None).await?;
        ensure!(code == 200, "HTTP {code}");
        Ok(())
    })
    .await
    .context("timed out")?
    .with_context(|| format!("GET {target}"))
}

/// A request slower than this counts as stalled: a lost SYN is
/// retransmitted after 1 s, which is what a stall means here; a busy
/// 2-core CI machine can delay a request by a few hundred milliseconds
/// without anything being wrong.
pub const STALL: Duration = Duration::from_millis(900);

/// Something that happened while the loop ran, and when.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened ("SIGKILL relay-1").
    pub what: String,
    /// When.
    pub at: Instant,
}

impl Event {
    /// `what`, happening now.
    pub fn new(what: String) -> Event {
        Event {
            what,
            at: Instant::now(),
        }
    }
}

/// One request of the loop: when it started, how long it took, and its
/// error if it failed.
#[derive(Debug)]
struct Attempt {
    at: Instant,
    took: Duration,
    err: Option<String>,
}

/// What [`ClientLoop::finish`] found.
#[derive(Debug, Default)]
pub struct LoopReport {
    /// Requests made.
    pub total: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Failed or stalled (slower than [`STALL`]) requests that started
    /// before any event or later than the gap after the last event before
    /// them.
    pub outside: usize,
    /// Those requests: when they started (after the loop began), how long
    /// they took, their error.
    pub outside_detail: Vec<String>,
    /// Per event: a row name, its text, and the time from the event to the
    /// start of the last failed or stalled request after it (zero: none).
    pub rows: Vec<(String, String, Duration)>,
    /// The longest any request took, failed or not.
    pub slowest: Duration,
}

/// The loop, running in its namespace until [`ClientLoop::finish`].
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    join: std::thread::JoinHandle<Result<Vec<Attempt>>>,
}

impl ClientLoop {
    /// Starts the loop in `ns`, round-robin over the HTTP pages of the
    /// edge pods of `sites`, a new request every 20 ms.
    pub fn start(lab: &NetnsLab, ns: Role, sites: &[u8]) -> ClientLoop {
        let targets: Vec<SocketAddr> = sites
            .iter()
            .map(|s| sa(netns::edge_pod_ip(*s), HTTP))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let join = lab.spawn_in(ns, move || async move {
            // Each request on a task of its own, started on a fixed beat:
            // one request that hangs must not leave the loop blind to what
            // happens meanwhile.
            let mut tasks = Vec::new();
            let start = Instant::now();
            // Bounded whatever the caller does: ten minutes at most.
            while !st.load(SeqCst) && start.elapsed() < Duration::from_secs(600) {
                let target = targets[tasks.len() % targets.len()];
                tasks.push(tokio::spawn(async move {
                    let at = Instant::now();
                    let err = get(target).await.err().map(|e| format!("{e:#}"));
                    Attempt {
                        at,
                        took: at.elapsed(),
                        err,
                    }
                }));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await?);
            }
            Ok(v)
        });
        ClientLoop { stop, join }
    }

    /// Stops the loop and reports its failures against `events` (in
    /// order): each failure belongs to the last event before it, and
    /// counts as outside when later than `gap` after it (or before any).
    pub fn finish(self, events: &[Event], gap: Duration) -> Result<LoopReport> {
        self.stop.store(true, SeqCst);
        let attempts = self
            .join
            .join()
            .map_err(|_| anyhow!("client loop panicked"))??;
        let mut r = LoopReport {
            total: attempts.len(),
            ..LoopReport::default()
        };
        r.slowest = attempts.iter().map(|a| a.took).max().unwrap_or_default();
        let owner = |a: &Attempt| events.iter().rposition(|e| e.at <= a.at);
        r.failed = attempts.iter().filter(|a| a.err.is_some()).count();
        // A stall (a SYN retransmitted: 1 s) is held to the same gap as a
        // failure.
        let bad = |a: &&Attempt| a.err.is_some() || a.took > STALL;
        // A request in flight when an event happened belongs to it too
        // (a kill cuts the requests it finds under way).
        let spans_event =
            |a: &Attempt| events.iter().any(|e| e.at >= a.at && e.at <= a.at + a.took);
        for a in attempts.iter().filter(bad) {
            match owner(a) {
                Some(k) if a.at - events[k].at <= gap => {}
                _ if spans_event(a) => {}
                _ => {
                    r.outside += 1;
                    r.outside_detail.push(format!(
                        "started {:.2}s into the loop, took {:.2}s: {}",
                        (a.at - attempts[0].at).as_secs_f64(),
                        a.took.as_secs_f64(),
                        a.err.as_deref().unwrap_or("ok, stalled")
                    ));
                }
            }
        }
        for (k, e) in events.iter().enumerate() {
            let mine: Vec<&Attempt> = attempts.iter().filter(|a| owner(a) == Some(k)).collect();
            let failed: Vec<&&Attempt> = mine.iter().filter(|a| a.err.is_some()).collect();
            let last = mine
                .iter()
                .filter(|a| bad(a))
                .map(|a| a.at - e.at)
                .max()
                .unwrap_or_default();
            // A request that succeeds only after a SYN retransmission is a
            // gap too, even if nothing failed.
            let slowest = mine.iter().map(|a| a.took).max().unwrap_or_default();
            let first = failed
                .first()
                .and_then(|a| a.err.as_deref())
                .map(|m| format!("; first: {m}"))
                .unwrap_or_default();
            r.rows.push((
                format!("new connections after {}", e.what),
                format!(
                    "{} of {} failed, the last failure or stall {:.2}s after it; slowest {:.2}s{first}",
                    failed.len(),
                    mine.len(),
                    last.as_secs_f64(),
                    slowest.as_secs_f64()
                ),
                last,
            ));
        }
        Ok(r)
    }
}
