//! The edge's status endpoint (`status_listen`, off by default): what
//! kubelet probes and Prometheus scrapes on an edge node.
//!
//! - `GET /healthz`: 200 while the process's runtime answers. Deliberately
//!   not tied to the session: a relay outage must not make kubelet restart
//!   every edge client (a restart would only add a handshake storm when the
//!   relay comes back).
//! - `GET /readyz`: 200 while a session is registered, else 503 with what
//!   the client is doing (dialling, and why the last session ended or the
//!   last attempt failed; refused and why). A DaemonSet rollout of a build
//!   that cannot register stops at its first node.
//! - `GET /metrics`: the edge's counters in the Prometheus text format
//!   (`edge_*`; see README).
//!
//! Plain HTTP without authentication, so loopback unless the configuration
//! says otherwise (`allow_insecure_status`): the figures are not secret,
//! but a LAN at an edge site is not a place to expose more than needed.
//! Each request head is bounded (`relay_transport::http`); the handlers
//! only read atomics and the state, so requests need no other bound.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{EdgeState, EdgeStats};

/// Bound on reading one request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Status {
    state: watch::Receiver<EdgeState>,
    stats: Arc<EdgeStats>,
    /// The node-local resolver's counters, when `[dns]` is on.
    dns: Option<Arc<crate::dns::DnsStats>>,
}

/// Serves the status endpoint on `l` until `stop`.
pub(crate) async fn serve(
    l: TcpListener,
    state: watch::Receiver<EdgeState>,
    stats: Arc<EdgeStats>,
    dns: Option<Arc<crate::dns::DnsStats>>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Status { state, stats, dns });
    relay_transport::http::serve(l, app, HEAD_TIMEOUT, stop).await
}

async fn readyz(State(s): State<Status>) -> (StatusCode, String) {
    match &*s.state.borrow() {
        EdgeState::Connected {
            session_id,
            relay_id,
            ..
        } => (
            StatusCode::OK,
            format!("connected: session {session_id} with relay {relay_id}\n"),
        ),
        EdgeState::Connecting { attempt, last } => (
            StatusCode::SERVICE_UNAVAILABLE,
            match last {
                Some(why) => format!("connecting: attempt {attempt}; last: {why}\n"),
                None => format!("connecting: attempt {attempt}\n"),
            },
        ),
        EdgeState::Rejected { reason, message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("refused by the relay: {}: {message}\n", reason.as_str()),
        ),
        EdgeState::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n".into()),
    }
}

async fn metrics(State(s): State<Status>) -> String {
    let up = matches!(&*s.state.borrow(), EdgeState::Connected { .. });
    let mut out = render(up, &s.stats);
    if let Some(d) = &s.dns {
        let _ = writeln!(
            out,
            "# HELP edge_dns_refused_peers_total DNS queries and connections to the node-local resolver from peers that are neither this node nor its pods (dropped unanswered).\n# TYPE edge_dns_refused_peers_total counter\nedge_dns_refused_peers_total {}",
            d.refused_peers.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP edge_dns_listening 1 while the node-local resolver's address is bound and served; 0 while its bind fails (another resolver holds it, or its interface is missing) and is retried.\n# TYPE edge_dns_listening gauge\nedge_dns_listening {}",
            u8::from(d.listening.load(Relaxed))
        );
    }
    out
}

/// The edge's metrics in the Prometheus text format; `up`: a session is
/// registered.
pub(crate) fn render(up: bool, st: &EdgeStats) -> String {
    let mut o = String::with_capacity(4096);
    let mut one = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(
            o,
            "# HELP edge_{name} {help}\n# TYPE edge_{name} {kind}\nedge_{name} {v}"
        );
    };
    let n = |a: &AtomicU64| a.load(Relaxed).to_string();
    let secs = |a: &AtomicU64| (a.load(Relaxed) as f64 / 1e6).to_string();
    one(
        "session_up",
        "gauge",
        "1 while a session is registered with the relay.",
        u8::from(up).to_string(),
    );
    one(
        "sessions_total",
        "counter",
        "Sessions established since start.",
        n(&st.sessions),
    );
    one(
        "fallbacks_total",
        "counter",
        "Times the client fell back from QUIC to TLS over TCP.",
        n(&st.fallbacks),
    );
    one(
        "streams",
        "gauge",
        "Streams being served now.",
        n(&st.open_streams),
    );
    one(
        "streams_total",
        "counter",
        "Streams the relay opened.",
        n(&st.streams_total),
    );
    one(
        "streams_denied_total",
        "counter",
        "Streams refused: target outside this node's routes or ports.",
        n(&st.denied),
    );
    one(
        "dial_failures_total",
        "counter",
        "Streams whose local dial failed.",
        n(&st.dial_failures),
    );
    one(
        "control_unknown_total",
        "counter",
        "Control messages of a newer protocol revision, ignored.",
        n(&st.control_unknown),
    );
    one(
        "control_rtt_seconds",
        "gauge",
        "Round trip of the last answered control ping (0 before the first).",
        secs(&st.control_rtt_us),
    );
    one(
        "control_rtt_max_seconds",
        "gauge",
        "Largest control ping round trip seen.",
        secs(&st.control_rtt_max_us),
    );
    one(
        "pongs_late_total",
        "counter",
        "Control pongs that came after the next ping (late, session kept).",
        n(&st.pongs_late),
    );
    one(
        "stall_probes_total",
        "counter",
        "Control pings sent because data from the relay stopped dead with streams open (QUIC; a possible NAT rebinding).",
        n(&st.stall_probes),
    );
    one(
        "paths_dead_total",
        "counter",
        "Sessions given up by the edge's own liveness check (nothing from the relay, or a control ping unanswered, for the dead-path bound).",
        n(&st.paths_dead),
    );
    one(
        "opens_hedged_total",
        "counter",
        "Captured connections also opened on another relay replica's session because the picked session's QUIC path was silent after the open (dead, not yet found quiet).",
        n(&st.opens_hedged),
    );
    one(
        "streams_stalled",
        "gauge",
        "QUIC streams whose local reader has not taken their data for 1 s or more; their session's receive window then makes room for 24 stream windows on top of quic.conn_window.",
        relay_transport::stall::stalled_now().to_string(),
    );
    one(
        "streams_stalled_total",
        "counter",
        "Times a QUIC stream's local reader left its data waiting for 1 s or more (see edge_streams_stalled).",
        relay_transport::stall::stalls_total().to_string(),
    );
    one(
        "quic_strikes",
        "gauge",
        "QUIC sessions in a row the edge's liveness check gave up soon after they came up, on the path to the relay (replica) whose QUIC session ended last; at 2 and above an auto edge dials TCP first on that path and probes QUIC less often.",
        n(&st.quic_strikes),
    );
    one(
        "sessions_closed_by_relay_total",
        "counter",
        "QUIC sessions the relay closed (its idle timeout, a drain, the node deleted, an operator); a path dead only upstream ends here.",
        n(&st.closed_by_relay),
    );
    one(
        "path_rtt_seconds",
        "gauge",
        "QUIC's smoothed round-trip estimate at the last keep-alive tick (0 on TCP).",
        secs(&st.path_rtt_us),
    );
    one(
        "path_rtt_max_seconds",
        "gauge",
        "Largest QUIC round-trip estimate seen at a tick.",
        secs(&st.path_rtt_max_us),
    );
    let runtime = tokio::runtime::Handle::try_current().map(|h| h.metrics());
    one(
        "runtime_tasks",
        "gauge",
        "Tokio tasks alive in the edge process.",
        runtime
            .as_ref()
            .map_or(0, |m| m.num_alive_tasks())
            .to_string(),
    );
    one(
        "runtime_workers",
        "gauge",
        "Tokio runtime workers (worker_threads); threads of tokio's blocking pool, named like workers, are not counted.",
        runtime.as_ref().map_or(0, |m| m.num_workers()).to_string(),
    );
    let _ = writeln!(
        o,
        "# HELP edge_bytes_total Tunnelled bytes, by direction (up: towards the relay).\n\
         # TYPE edge_bytes_total counter\n\
         edge_bytes_total{{direction=\"up\"}} {}\n\
         edge_bytes_total{{direction=\"down\"}} {}",
        st.bytes_up.load(Relaxed),
        st.bytes_down.load(Relaxed)
    );
    o += &st.udp.render_prometheus("edge");
    if let Some(b) = st.capture_bound.get() {
        o += &b.render_capture("edge");
        let _ = writeln!(
            o,
            "# HELP edge_capture_installed 1 while capture is on the node; 0 while its install fails (retried every 10 s): pods do not reach the cloud through the tunnel meanwhile.\n# TYPE edge_capture_installed gauge\nedge_capture_installed {}\n\
             # HELP edge_capture_repairs_total Times capture was found removed from the node by something else (an nftables restart, a firewall reload, a flushed ruleset) and installed again.\n# TYPE edge_capture_repairs_total counter\nedge_capture_repairs_total {}\n\
             # HELP edge_capture_ipv6_refusing 1 while the tunnel's IPv6 routes (not captured: capture is IPv4 only) are refused on the node; 0 while the kernel refuses those rules, and such traffic leaves by the default route.\n# TYPE edge_capture_ipv6_refusing gauge\nedge_capture_ipv6_refusing {}\n\
             # HELP edge_capture_ipv6_refused_total Packets to the tunnel's IPv6 routes refused (TCP reset, ICMPv6 administratively prohibited) rather than sent out by the default route; read every 10 s.\n# TYPE edge_capture_ipv6_refused_total counter\nedge_capture_ipv6_refused_total {}",
            st.capture_installed.load(Relaxed),
            st.capture_repairs.load(Relaxed),
            st.capture_ipv6_refusing.load(Relaxed),
            st.capture_ipv6_refused.load(Relaxed)
        );
        render_lan_overlaps(&mut o, st);
    }
    o
}

/// The tunnel routes capture leaves to the LAN: a count that is always
/// there while capture runs (to alert on), and one series per route (to
/// see which).
fn render_lan_overlaps(o: &mut String, st: &EdgeStats) {
    let routes = st.lan_overlaps.borrow().clone();
    let _ = writeln!(
        o,
        "# HELP edge_capture_lan_overlaps Tunnel routes that overlap this node's LANs: the LAN's part is reached locally, never through the relay.\n\
         # TYPE edge_capture_lan_overlaps gauge\n\
         edge_capture_lan_overlaps {}\n\
         # HELP edge_capture_lan_overlap 1 for each tunnel route that overlaps this node's LANs.\n\
         # TYPE edge_capture_lan_overlap gauge",
        routes.len()
    );
    // One series per route, as many as the relay is told of at most.
    for r in routes
        .iter()
        .take(relay_protocol::Control::MAX_LAN_OVERLAPS)
    {
        let _ = writeln!(o, "edge_capture_lan_overlap{{route=\"{r}\"}} 1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_says_why_the_last_session_ended() {
        let (tx, state) = watch::channel(EdgeState::Connecting {
            attempt: 1,
            last: None,
        });
        let dns = Arc::new(crate::dns::DnsStats::default());
        dns.refused_peers.store(3, Relaxed);
        let s = Status {
            state,
            stats: Arc::default(),
            dns: Some(dns),
        };
        assert!(metrics(State(s.clone()))
            .await
            .contains("\nedge_dns_refused_peers_total 3\n"));
        let (code, body) = readyz(State(s.clone())).await;
        assert_eq!(
            (code, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "connecting: attempt 1\n")
        );
        tx.send_replace(EdgeState::Connecting {
            attempt: 2,
            last: Some("session ended: closed by peer: path dead".into()),
        });
        let (code, body) = readyz(State(s)).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "connecting: attempt 2; last: session ended: closed by peer: path dead\n"
        );
    }

    #[test]
    fn renders_every_counter_with_its_type() {
        let st = EdgeStats::default();
        st.streams_total.store(7, Relaxed);
        st.control_rtt_us.store(1_500, Relaxed);
        st.bytes_up.store(42, Relaxed);
        st.udp.dropped_queue_full.store(3, Relaxed);
        st.paths_dead.store(2, Relaxed);
        st.closed_by_relay.store(5, Relaxed);
        st.quic_strikes.store(1, Relaxed);
        let t = render(true, &st);
        for line in [
            "edge_session_up 1",
            "edge_streams_total 7",
            "edge_control_rtt_seconds 0.0015",
            "edge_bytes_total{direction=\"up\"} 42",
            "edge_udp_dropped_total{reason=\"queue_full\"} 3",
            "# TYPE edge_udp_flows gauge",
            "edge_paths_dead_total 2",
            "edge_sessions_closed_by_relay_total 5",
            "edge_quic_strikes 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in:\n{t}");
        }
        // Capture not running: no capture series.
        assert!(!t.contains("edge_capture"), "{t}");
        let _ = st
            .capture_bound
            .set(relay_transport::conn::AcceptBound::new(16));
        let t = render(false, &st);
        assert!(t.lines().any(|l| l == "edge_session_up 0"), "{t}");
        assert!(t.lines().any(|l| l == "edge_capture_connections 0"), "{t}");
        assert!(t.lines().any(|l| l == "edge_capture_lan_overlaps 0"), "{t}");
        assert!(
            t.lines().any(|l| l == "edge_capture_ipv6_refused_total 0"),
            "{t}"
        );
        assert!(
            t.lines().any(|l| l == "edge_capture_ipv6_refusing 0"),
            "{t}"
        );
        assert!(!t.contains("edge_capture_lan_overlap{"), "{t}");
        st.lan_overlaps
            .send_replace(vec!["192.168.0.0/16".parse().unwrap()]);
        let t = render(false, &st);
        for line in [
            "edge_capture_lan_overlaps 1",
            "edge_capture_lan_overlap{route=\"192.168.0.0/16\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in:\n{t}");
        }
        // Every sample has a TYPE line for its family.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                t.contains(&format!("# TYPE {family} ")),
                "no TYPE for {family}"
            );
        }
    }
}
