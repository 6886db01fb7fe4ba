//! What operators see about sessions outside the relay's own API: in
//! Kubernetes, the `EdgeTunnelReady` condition on each Node and Events
//! (see [`crate::k8s`]); in static mode, nothing beyond logs and metrics.
//!
//! The session code reports through [`StatusSink`] and never waits for it:
//! an implementation queues (bounded) and writes in the background, so a
//! slow or unreachable API never delays a handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use relay_protocol::Cidr;

/// A session as the condition's message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// The relay replica holding the session.
    pub relay_id: String,
    /// When the session was registered.
    pub since: SystemTime,
    /// The edge's address as the relay sees it.
    pub remote: SocketAddr,
    /// Host addresses the node shares with another node (not routed).
    pub ambiguous: Vec<Cidr>,
    /// Host addresses its Node lists that are not its own to serve (not
    /// routed; see `k8s/node_addresses.rs`).
    pub refused: Vec<Cidr>,
    /// Pod ranges its CNI gives the node that are not routed to it (see
    /// `k8s/ipam_prefixes.rs`).
    pub refused_ranges: Vec<Cidr>,
    /// Served prefixes the relay node does not capture (IPv6: capture is
    /// IPv4 only); reachable through CONNECT.
    pub not_captured: Vec<Cidr>,
    /// The edge reports its own capture is not installed, for this reason
    /// (`Control::CaptureStatus`; `None` while it is, or from an edge that
    /// does not report it).
    pub capture_failing: Option<String>,
}

/// The condition's reason while the session is up and the edge's capture
/// is not installed: still `True` (the tunnel is up, the cloud reaches the
/// node), but a reason of its own, so that the `Reason` column of `kubectl
/// describe node` and a query on the reason find such nodes.
pub const REASON_CAPTURE_FAILING: &str = "CaptureFailing";

/// The condition's reason while the session is up and nothing is amiss.
pub const REASON_SESSION_UP: &str = "SessionUp";

/// What an edge last reported about its own capture
/// (`Control::CaptureStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeCapture {
    /// Capture is on the edge's node.
    pub installed: bool,
    /// Why not (bounded, see `Control::MAX_CAPTURE_ERROR`); empty while
    /// installed.
    pub error: String,
}

impl EdgeCapture {
    /// The edge's report, its error bounded as the protocol says (a peer
    /// may send more).
    pub fn reported(installed: bool, error: &str) -> EdgeCapture {
        match relay_protocol::Control::capture_status(installed, error) {
            relay_protocol::Control::CaptureStatus { installed, error } => {
                EdgeCapture { installed, error }
            }
            _ => unreachable!("capture_status builds a CaptureStatus"),
        }
    }

    /// The error to show for a capture that is not installed (`None`
    /// while it is).
    pub fn failing(&self) -> Option<String> {
        (!self.installed).then(|| {
            if self.error.is_empty() {
                "no reason given".to_string()
            } else {
                self.error.clone()
            }
        })
    }
}

/// The served prefixes that capture leaves out: every IPv6 prefix when
/// capture is on (it is IPv4 only), none when capture is off.
pub fn not_captured(served: &[Cidr], capture_on: bool) -> Vec<Cidr> {
    if !capture_on {
        return Vec::new();
    }
    served
        .iter()
        .filter(|c| c.addr().is_ipv6())
        .copied()
        .collect()
}

impl SessionInfo {
    /// The one-line message operators read in `kubectl describe node`.
    pub fn message(&self) -> String {
        let mut m = format!(
            "tunnel up over {} via relay {} since {} (edge at {})",
            self.transport,
            self.relay_id,
            humantime::format_rfc3339_seconds(self.since),
            self.remote
        );
        if !self.ambiguous.is_empty() {
            let list: Vec<String> = self.ambiguous.iter().map(ToString::to_string).collect();
            m.push_str(&format!(
                "; host addresses shared with another node are not routed by address (reach this node by name): {}",
                list.join(", ")
            ));
        }
        if !self.refused.is_empty() {
            let list: Vec<String> = self.refused.iter().map(ToString::to_string).collect();
            m.push_str(&format!(
                "; host addresses the Node lists but may not serve (loopback or link-local, the cloud's, another node's, or outside kubernetes.edge_address_ranges) are not routed to it (reach this node by name): {}",
                list.join(", ")
            ));
        }
        if !self.refused_ranges.is_empty() {
            let list: Vec<String> = self
                .refused_ranges
                .iter()
                .map(ToString::to_string)
                .collect();
            m.push_str(&format!(
                "; pod ranges its CNI assigns it that overlap the cloud's, another node's or a reserved range, or lie outside kubernetes.edge_address_ranges, are not routed to it (its pods there are unreachable through the tunnel): {}",
                list.join(", ")
            ));
        }
        if !self.not_captured.is_empty() {
            let list: Vec<String> = self.not_captured.iter().map(ToString::to_string).collect();
            m.push_str(&format!(
                "; IPv6 capture is not supported: these prefixes are reachable through CONNECT only: {}",
                list.join(", ")
            ));
        }
        if let Some(error) = &self.capture_failing {
            m.push_str(&format!(
                "; capture failing on the edge: its capture is not installed, so this node's pods do not reach the cloud through the tunnel (the edge retries every 10 s): {error}"
            ));
        }
        m
    }

    /// The condition's reason: [`REASON_CAPTURE_FAILING`] while the edge
    /// reports its capture is not installed, else [`REASON_SESSION_UP`].
    pub fn reason(&self) -> &'static str {
        if self.capture_failing.is_some() {
            REASON_CAPTURE_FAILING
        } else {
            REASON_SESSION_UP
        }
    }
}

/// What a session reports about its node (see [`StatusSink::report`]).
#[derive(Debug, Clone, Copy)]
pub enum Report<'a> {
    /// The session is up: its first report ([`StatusSink::up`]).
    Up(&'a SessionInfo),
    /// The live session is described otherwise, or told again to a sink
    /// that may have dropped what it said before
    /// ([`StatusSink::changed`]).
    Changed(&'a SessionInfo),
    /// The session ended, for this reason, and no newer one replaced it
    /// ([`StatusSink::down`]).
    Down(&'a str),
}

/// Where session comings and goings are reported.
pub trait StatusSink: Send + Sync + 'static {
    /// A session of `node` is up.
    fn up(&self, node: &str, info: &SessionInfo);
    /// A live session of `node` is now described otherwise (the directory
    /// changed what is routed to it): its condition's message follows;
    /// no Event.
    fn changed(&self, node: &str, info: &SessionInfo) {
        let _ = (node, info);
    }
    /// The session of `node` ended and no newer one replaced it.
    fn down(&self, node: &str, why: &str);
    /// A handshake claiming to be `node` was refused.
    fn rejected(&self, node: &str, reason: &str, message: &str);
    /// `report` from the session of `node` whose generation is
    /// `generation` (relay-wide, higher is newer): how sessions report.
    /// Each session reports from its own task under its own lock, so a
    /// report can reach the sink after a newer session's: a session that
    /// ended is preempted between leaving the registry and its `down`,
    /// and its successor's `up` goes first. A sink that keeps the latest
    /// state per node must then keep the newest session's, dropping what
    /// an older generation reports after it (or the node reads "down"
    /// while its edge is connected). By default, the matching
    /// [`StatusSink::up`], [`StatusSink::changed`] or [`StatusSink::down`],
    /// for sinks that keep nothing.
    fn report(&self, node: &str, generation: u64, report: Report<'_>) {
        let _ = generation;
        match report {
            Report::Up(info) => self.up(node, info),
            Report::Changed(info) => self.changed(node, info),
            Report::Down(why) => self.down(node, why),
        }
    }
    /// Which replica writes which node may have changed (the replica set
    /// changed): another replica may have written this one's nodes since,
    /// so what the sink remembers writing must not stand in for what the
    /// API says (a write equal to it would be skipped).
    fn writers_changed(&self) {}
    /// What the sink wrote and held back so far (for `/metrics`).
    fn stats(&self) -> StatusStats {
        StatusStats::default()
    }
}

/// Counters of a [`StatusSink`] that writes to an API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatusStats {
    /// Node conditions applied (requests made).
    pub condition_writes: u64,
    /// Condition writes that failed (each retried after the hold-off).
    pub condition_failures: u64,
    /// Condition changes folded into a later write (a node that changed
    /// again within the hold-off between two writes).
    pub condition_coalesced: u64,
    /// Events not published: over a node's event budget.
    pub events_rate_limited: u64,
    /// Events not published: the queue was full.
    pub events_queue_full: u64,
    /// Events not published: the apiserver refused them or did not answer.
    pub events_api_errors: u64,
}

/// Per-node pacing of condition writes: the first change after a quiet
/// spell is written at once (operators see a tunnel go down within the
/// write's latency), later changes within [`HoldOff::min`] of the last
/// write wait until it has passed and are written as one (the latest
/// state). A node flapping 100 times a minute then costs one write per
/// `min`, not two per flap — 1,000 flapping nodes would otherwise be
/// 200,000 writes a minute on the apiserver — while the condition still
/// ends at the node's final state.
#[derive(Debug)]
pub struct HoldOff {
    /// Least time between two writes for one node.
    pub min: Duration,
    last: HashMap<String, Instant>,
}

impl HoldOff {
    /// Pacing with at least `min` between a node's writes.
    pub fn new(min: Duration) -> HoldOff {
        HoldOff {
            min,
            last: HashMap::new(),
        }
    }

    /// When `node` may be written next (`now` if at once).
    pub fn due(&self, node: &str, now: Instant) -> Instant {
        self.last
            .get(node)
            .map_or(now, |t| (*t + self.min).max(now))
    }

    /// Records a write of `node` at `now`, and forgets nodes whose last
    /// write is older than `min` (they may be written at once again), so
    /// the map holds only recently written nodes.
    pub fn wrote(&mut self, node: &str, now: Instant) {
        let min = self.min;
        self.last.retain(|_, t| now.duration_since(*t) < min);
        self.last.insert(node.to_string(), now);
    }
}

/// Per-node budget of Events, as client-go's event spam filter keeps one
/// per object: a burst of [`EventBudget::BURST`], then one more every
/// [`EventBudget::REFILL`]. Excess events are dropped and counted; the
/// node's condition still tells its state.
#[derive(Debug, Default)]
pub struct EventBudget {
    tokens: HashMap<String, crate::bucket::TokenBucket>,
}

impl EventBudget {
    /// Events a node may publish at once.
    pub const BURST: f64 = 20.0;
    /// Time for one more.
    pub const REFILL: Duration = Duration::from_secs(15);

    /// Takes one event's worth of budget for `node`; false if none is left.
    pub fn take(&mut self, node: &str, now: Instant) -> bool {
        let taken = self
            .tokens
            .entry(node.to_string())
            .or_insert(crate::bucket::TokenBucket::full(Self::BURST, now))
            .take(now, Self::REFILL, Self::BURST);
        if taken.is_err() {
            return false;
        }
        // A full bucket is the default: forget it, so the map holds only
        // nodes that spent some budget recently.
        if self.tokens.len() > 4096 {
            let full = Self::REFILL.mul_f64(Self::BURST);
            self.tokens
                .retain(|_, b| now.duration_since(b.last()) < full);
        }
        true
    }
}

/// Static mode: nothing to write.
pub struct NoStatus;

impl StatusSink for NoStatus {
    fn up(&self, _: &str, _: &SessionInfo) {}
    fn down(&self, _: &str, _: &str) {}
    fn rejected(&self, _: &str, _: &str, _: &str) {}
}

#[cfg(test)]
impl SessionInfo {
    /// A session up over QUIC via `relay-a` since the epoch, nothing amiss.
    pub(crate) fn for_tests() -> SessionInfo {
        SessionInfo {
            transport: "quic",
            relay_id: "relay-a".into(),
            since: SystemTime::UNIX_EPOCH,
            remote: "203.0.113.7:4433".parse().unwrap(),
            ambiguous: vec![],
            refused: vec![],
            refused_ranges: vec![],
            not_captured: vec![],
            capture_failing: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_off_writes_the_first_change_at_once_and_paces_the_rest() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut h = HoldOff::new(Duration::from_secs(5));
        assert_eq!(h.due("a", t0), t0, "never written: at once");
        h.wrote("a", t0);
        assert_eq!(h.due("a", s(1)), s(5), "within the hold-off: at its end");
        assert_eq!(h.due("b", s(1)), s(1), "other nodes are not held");
        assert_eq!(h.due("a", s(7)), s(7), "after it: at once");
        h.wrote("b", s(6));
        assert_eq!(h.last.len(), 1, "a's old write is forgotten");
    }

    #[test]
    fn event_budget_allows_a_burst_then_refills_slowly_per_node() {
        let t0 = Instant::now();
        let mut b = EventBudget::default();
        let burst = EventBudget::BURST as usize;
        let allowed = (0..100).filter(|_| b.take("a", t0)).count();
        assert_eq!(allowed, burst);
        assert!(b.take("b", t0), "another node has its own budget");
        assert!(!b.take("a", t0 + EventBudget::REFILL / 2));
        assert!(b.take("a", t0 + EventBudget::REFILL));
        assert!(!b.take("a", t0 + EventBudget::REFILL));
        let later = t0 + EventBudget::REFILL * 1000;
        let allowed = (0..100).filter(|_| b.take("a", later)).count();
        assert_eq!(allowed, burst, "refilled to the burst, never beyond");
    }

    #[test]
    fn the_message_names_transport_replica_time_and_ambiguity() {
        let mut i = SessionInfo::for_tests();
        assert_eq!(
            i.message(),
            "tunnel up over quic via relay relay-a since 1970-01-01T00:00:00Z (edge at 203.0.113.7:4433)"
        );
        assert_eq!(i.reason(), "SessionUp");
        i.ambiguous = vec!["192.168.1.10/32".parse().unwrap()];
        assert!(i
            .message()
            .ends_with("(reach this node by name): 192.168.1.10/32"));
        i.refused = vec!["10.96.0.1/32".parse().unwrap()];
        assert!(i
            .message()
            .ends_with("not routed to it (reach this node by name): 10.96.0.1/32"));
        i.refused_ranges = vec!["10.96.0.0/26".parse().unwrap()];
        assert!(i
            .message()
            .ends_with("unreachable through the tunnel): 10.96.0.0/26"));
    }

    /// An edge whose capture is not installed: the tunnel is up (True), so
    /// the reason says it and the message names the error; an installed
    /// report or none at all reads as before.
    #[test]
    fn a_failing_edge_capture_has_its_own_reason_and_names_the_error() {
        let mut i = SessionInfo::for_tests();
        let fine = i.message();
        let err = "nft -f -: Error: Could not process rule: Operation not supported";
        i.capture_failing = EdgeCapture::reported(false, err).failing();
        assert_eq!(i.reason(), "CaptureFailing");
        assert_eq!(
            i.message(),
            format!("{fine}; capture failing on the edge: its capture is not installed, so this node's pods do not reach the cloud through the tunnel (the edge retries every 10 s): {err}")
        );
        i.capture_failing = EdgeCapture::reported(true, err).failing();
        assert_eq!((i.reason(), i.message()), ("SessionUp", fine.clone()));
        // An edge that gives no reason is still named as failing.
        let bare = EdgeCapture::reported(false, " ");
        assert_eq!(bare.error, "");
        assert_eq!(bare.failing().as_deref(), Some("no reason given"));
        // A peer's overlong error is held to the protocol's bound.
        let long = EdgeCapture::reported(false, &"e".repeat(10_000));
        assert_eq!(long.error.len(), relay_protocol::Control::MAX_CAPTURE_ERROR);
    }
}
