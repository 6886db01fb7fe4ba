//! What the edge client tells its watchers: its life-cycle state and its
//! counters (read by the status endpoint, capture and the supervisor).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use relay_protocol::{Cidr, RejectReason, Replica};
use relay_transport::{Direction, Meter};
use tokio::sync::watch;

/// Where the client is in its life cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeState {
    /// Dialing the relay (attempt number since the last session).
    Connecting {
        /// 1 for the first attempt.
        attempt: u32,
        /// Why the last session ended, or the last attempt failed and then
        /// why the session before it ended (`None` before the first): what
        /// an operator reading `/readyz` during an outage needs first.
        last: Option<String>,
    },
    /// Registered with the relay.
    Connected {
        /// Session id assigned by the relay.
        session_id: u64,
        /// Session generation.
        generation: u64,
        /// Which replica.
        relay_id: String,
        /// Prefixes the relay asks us to send back through the tunnel.
        tunnel_routes: Vec<Cidr>,
        /// Whether `tunnel_routes` is the relay's complete set. False from
        /// the hello of a relay that sends routes as deltas until the
        /// first complete batch: capture keeps the routes it had, so pod
        /// traffic to cloud ranges is never let out by the default route
        /// while a new session's routes are on their way.
        routes_complete: bool,
        /// Prefixes this edge serves (the relay's word if it decides,
        /// else the config's); never captured.
        served_routes: Vec<Cidr>,
        /// The relay replicas this relay says to hold a session to each;
        /// `None` until it says (a relay without a replica set never does:
        /// one session is all).
        replicas: Option<Vec<Replica>>,
        /// The relay sent GOAWAY: it drains this session (a restart, a
        /// rolling update). Streams and flows the edge opens go to another
        /// replica's session whose relay lists their destination, if there
        /// is one: anything opened here is cut when the drain's grace ends.
        draining: bool,
    },
    /// The relay refused the last handshake (retrying with backoff).
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The relay's explanation.
        message: String,
    },
    /// Shut down.
    Stopped,
}

/// Counters of one edge client (all sessions).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Streams being served now.
    pub open_streams: AtomicU64,
    /// Streams the relay opened, in total.
    pub streams_total: AtomicU64,
    /// Streams refused because the target is outside our routes or ports.
    pub denied: AtomicU64,
    /// Streams whose dial failed.
    pub dial_failures: AtomicU64,
    /// Bytes sent to the relay.
    pub bytes_up: AtomicU64,
    /// Bytes received from the relay.
    pub bytes_down: AtomicU64,
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Times the client fell back from QUIC to TLS over TCP.
    pub fallbacks: AtomicU64,
    /// Sessions QUIC carries now, to any of the relay's replicas: while
    /// there is one, UDP reaches the relay, and an unanswered QUIC attempt
    /// waits out the handshake bound instead of falling back to TCP.
    pub quic_sessions_live: AtomicU64,
    /// Control messages of a newer protocol revision, ignored.
    pub control_unknown: AtomicU64,
    /// Round-trip time of the edge's last answered control ping, in
    /// microseconds (0 before the first pong). Measured ping → pong on the
    /// control stream, so on a congested uplink it includes the queueing
    /// delay the tunnel's traffic sees (unlike QUIC's own RTT estimate,
    /// which quinn takes from acknowledgements).
    pub control_rtt_us: AtomicU64,
    /// The largest control RTT seen, in microseconds.
    pub control_rtt_max_us: AtomicU64,
    /// Pongs that arrived after the next ping had been sent (late, but
    /// within the dead-path bound, so the session was kept).
    pub pongs_late: AtomicU64,
    /// Control pings sent because data from the relay stopped dead while
    /// streams were open (QUIC; see `liveness::StallProbe`): each is a
    /// possible NAT rebinding, ended by the probe instead of a keep-alive
    /// later.
    pub stall_probes: AtomicU64,
    /// Sessions the edge gave up because its own liveness check found the
    /// path dead (nothing from the relay, or a control ping unanswered,
    /// for the dead-path bound).
    pub paths_dead: AtomicU64,
    /// Captured connections whose open also went to a spare session
    /// because nothing at all arrived on the picked QUIC session for a
    /// while after the open was sent (its path dead, not yet found quiet:
    /// see `capture::hedge`).
    pub opens_hedged: AtomicU64,
    /// QUIC sessions the relay ended with a close of its own (its idle
    /// timeout, a drain, the node deleted or refused, an operator's
    /// close). On a path dead only upstream this, not `paths_dead`, is how
    /// the edge learns: what the relay sends still arrives. The TCP
    /// fallback cannot tell a close from a loss and never counts here.
    pub closed_by_relay: AtomicU64,
    /// QUIC sessions in a row lost to a dead path soon after they came up
    /// (the edge's liveness check gave them up, or the relay closed them
    /// for hearing nothing from the edge), as counted by the reconnect loop (one per relay
    /// replica) whose QUIC session ended last; at 2 and above, that loop
    /// dials TCP first and probes QUIC less often.
    pub quic_strikes: AtomicU64,
    /// For each relay name (each replica's reconnect loop dials its own),
    /// which of its addresses the next attempt dials, modulo their number:
    /// advanced past an address that gave no answer, so a name with an
    /// IPv6 and an IPv4 address still connects where IPv6 is broken (the
    /// resolver puts IPv6 first whenever the node has an IPv6 route to
    /// it, whether or not packets get through upstream). Only a silent
    /// address moves it at once (and a QUIC probe that found QUIC answering
    /// at another address): a relay that answered and refused (draining,
    /// overloaded) is reached at that address, and moving on would send
    /// the next attempt to one that may be the broken one. An address that
    /// answers without showing a working relay (TLS failing, a connection
    /// closed at once) moves it after a few attempts in a row
    /// ([`EdgeStats::relay_addr_unproven`]).
    pub relay_addr_turns: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Per relay name, the address whose answers showed no working relay
    /// and how many times in a row (see `dial::transport`'s
    /// `UNPROVEN_TO_ADVANCE`): kept across attempts, as the turn is.
    pub relay_addr_unproven:
        std::sync::Mutex<std::collections::HashMap<String, (std::net::SocketAddr, u64)>>,
    /// Per relay name, the address that last gave this edge a connection:
    /// it needs more unproven failures in a row before the turn leaves it
    /// (`dial::transport`'s `UNPROVEN_TO_ADVANCE_PROVEN`).
    pub relay_addr_proven:
        std::sync::Mutex<std::collections::HashMap<String, std::net::SocketAddr>>,
    /// The addresses each relay name resolved to last: dialled when the
    /// name stops resolving (the site's or carrier's DNS down while the
    /// uplink works), where a failed lookup used to fail every attempt.
    pub relay_addrs_known: std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
    /// The addresses `relay_addrs_file` held at start: dialled when a name
    /// does not resolve and has not resolved in this run either. Kept apart
    /// from `relay_addrs_known` so the short lookup bound applies only to
    /// names resolved in this run: a saved address may be stale, and a
    /// slow but working resolver must get its full time.
    pub(crate) relay_addrs_loaded:
        std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
    /// The table to save, for the saver of `relay_addrs_file` (set when a
    /// name resolves to a different set of addresses).
    pub(crate) relay_addrs_saved: watch::Sender<Option<Arc<crate::relay_addrs::SavedRelayAddrs>>>,
    /// QUIC's smoothed round-trip estimate, in microseconds, as of the last
    /// keep-alive tick (0 on TCP). Control pings are rare on QUIC (see
    /// [`relay_protocol::QUIC_CONTROL_PING`]); this follows the path every
    /// interval, and, taken from acknowledgements of what the edge sends,
    /// it includes the uplink's queueing delay.
    pub path_rtt_us: AtomicU64,
    /// The largest path RTT seen at a tick, in microseconds.
    pub path_rtt_max_us: AtomicU64,
    /// UDP flow counters.
    pub udp: Arc<relay_transport::udp::UdpStats>,
    /// The captured-connection bound (`capture.max_connections`) and its
    /// refusal count; set once capture runs.
    pub capture_bound: std::sync::OnceLock<relay_transport::conn::AcceptBound>,
    /// Tunnel routes that overlap one of this node's LANs, as capture last
    /// planned them: that part of the route is reached on the LAN, never
    /// through the relay (see `subnets`). Shown in `/metrics`, one series
    /// per route, so an operator sees which cloud range a site cannot
    /// reach without reading the edge's log, and sent to the relay
    /// ([`Control::LanOverlaps`](relay_protocol::Control::LanOverlaps))
    /// for its admin API.
    pub lan_overlaps: watch::Sender<Vec<relay_protocol::Cidr>>,
    /// 1 while capture is on the node, 0 while its install fails and is
    /// retried (see [`relay_transport::capture::Capture::uninstalled`]).
    pub capture_installed: AtomicU64,
    /// Times capture was found removed by something else on the node (an
    /// nftables restart, a firewall reload) and installed again.
    pub capture_repairs: AtomicU64,
    /// 1 while capture's IPv6 refusal is on the node (the tunnel's IPv6
    /// routes are refused, not left to the default route), 0 while the
    /// kernel refuses its rules; read on capture's 10 s tick.
    pub capture_ipv6_refusing: AtomicU64,
    /// Packets to the tunnel's IPv6 routes refused (capture's `v6_refused`
    /// counter, kept rising across repairs); read on capture's 10 s tick.
    pub capture_ipv6_refused: AtomicU64,
    /// What the relay is told about capture
    /// ([`Control::CaptureStatus`](relay_protocol::Control::CaptureStatus)):
    /// `None` without capture (nothing is told), else set by capture after
    /// its first pass and again when it is installed or fails (see
    /// [`CaptureReport::due`]); each session sends the current one after
    /// its hello and every change.
    pub capture_report: watch::Sender<Option<CaptureReport>>,
}

/// Whether capture is on the node, and if not, why: what the edge tells
/// the relay, so the cloud sees a node whose pods cannot reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureReport {
    /// Capture is on the node.
    pub installed: bool,
    /// The last install's error while it is not; empty while it is.
    pub error: String,
}

impl CaptureReport {
    /// Least time between two reports of a failing capture that differ
    /// only in the error's text: a failing install is retried every 10 s,
    /// and an error quoting something that varies must not become a
    /// message (and a Node condition write at the relay) per retry.
    pub const ERROR_GAP: std::time::Duration = std::time::Duration::from_secs(60);

    /// Whether this state is to be published, given the one published
    /// last (`told`, at `told_at`): at once when there was none or capture
    /// was installed or failed since; a new error of a capture still
    /// failing once [`CaptureReport::ERROR_GAP`] has passed since (capture
    /// retries every 10 s, so the latest error is published within that
    /// and a retry); never the same again.
    pub fn due(
        &self,
        told: Option<&CaptureReport>,
        told_at: Option<std::time::Instant>,
        now: std::time::Instant,
    ) -> bool {
        match told {
            None => true,
            Some(t) if t.installed != self.installed => true,
            Some(t) if t.error != self.error => {
                told_at.is_none_or(|at| now.duration_since(at) >= Self::ERROR_GAP)
            }
            Some(_) => false,
        }
    }
}

impl Meter for EdgeStats {
    fn add(&self, dir: Direction, bytes: u64) {
        // ToTunnel here is from the local target towards the relay.
        match dir {
            Direction::ToTunnel => self.bytes_up.fetch_add(bytes, Relaxed),
            Direction::FromTunnel => self.bytes_down.fetch_add(bytes, Relaxed),
        };
    }
}

#[cfg(test)]
mod capture_report_tests {
    use super::CaptureReport;
    use std::time::{Duration, Instant};

    fn failing(error: &str) -> CaptureReport {
        CaptureReport {
            installed: false,
            error: error.into(),
        }
    }

    #[test]
    fn a_change_of_state_is_told_at_once_and_a_retry_never() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ok = CaptureReport {
            installed: true,
            error: String::new(),
        };
        let bad = failing("nft: Operation not supported");
        assert!(bad.due(None, None, t0), "the first state");
        // Retries with the same error, every 10 s: nothing.
        for s in (10..600).step_by(10) {
            assert!(!bad.due(Some(&bad), Some(t0), at(s)), "retry at {s}s");
        }
        // Installed, and failing again: at once, however soon.
        assert!(ok.due(Some(&bad), Some(t0), at(1)));
        assert!(bad.due(Some(&ok), Some(at(1)), at(2)));
        assert!(!ok.due(Some(&ok), Some(t0), at(5)));
        // Another error while still failing: within the gap held back,
        // then told (capture's next retry asks again).
        let other = failing("nft: No such file or directory");
        assert!(!other.due(Some(&bad), Some(t0), at(30)));
        assert!(other.due(Some(&bad), Some(t0), t0 + CaptureReport::ERROR_GAP));
    }
}
