//! Relay metrics, rendered in the Prometheus text format.
//!
//! Plain atomics with a fixed set of label values (every reason is an enum),
//! so recording is a relaxed `fetch_add` and cardinality cannot explode.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use relay_protocol::{RejectReason, StreamStatus};
use relay_transport::reload::RefusalCause;

use crate::policy::{DenyReason, Origin};

/// Handshake failure reasons beyond the protocol's typed rejections: `tls`
/// is a TLS handshake that failed for any reason but the five after it,
/// which are the client certificate's (`RefusalCause::as_str` of
/// `relay_transport::reload`, told by the verifier).
pub const HANDSHAKE_LOCAL_REASONS: [&str; 12] = [
    "tls",
    "cert_expired",
    "cert_not_yet_valid",
    "revoked",
    "unknown_ca",
    "bad_certificate",
    "timeout",
    "protocol",
    "closed",
    "retry",
    "per_source",
    "silent",
];

/// The protocol's typed rejections, in metric order.
pub(crate) const REJECT_REASONS: [RejectReason; 8] = [
    RejectReason::UnsupportedVersion,
    RejectReason::IdentityMismatch,
    RejectReason::RouteNotAllowed,
    RejectReason::RouteConflict,
    RejectReason::Overloaded,
    RejectReason::Malformed,
    RejectReason::ShuttingDown,
    RejectReason::UnknownNode,
];

/// All counters of one relay.
#[derive(Default)]
pub struct Metrics {
    /// Sessions accepted since start.
    pub sessions_accepted: AtomicU64,
    /// Sessions accepted, by transport (see [`TRANSPORTS`]).
    accepted_by_transport: [AtomicU64; 2],
    rejects: [AtomicU64; 8],
    local_failures: [AtomicU64; HANDSHAKE_LOCAL_REASONS.len()],
    /// Sessions draining now (see [`crate::session::SessionHandle::drain`]):
    /// those a planned move left (out of the registry, so not in
    /// `relay_sessions`), and those an operator or a relay shutting down
    /// drains.
    /// Shared with each session (see `SessionHandle::new`), whose drain
    /// counts itself.
    pub sessions_draining: Arc<AtomicU64>,
    /// Streams currently open (all ingress paths).
    pub streams_open: AtomicU64,
    stream_outcomes: [AtomicU64; 7],
    /// Bytes sent towards edges.
    pub bytes_to_edge: AtomicU64,
    /// Bytes received from edges.
    pub bytes_from_edge: AtomicU64,
    /// CONNECT requests answered, by HTTP status class index (see `connect_status`).
    connect_status: [AtomicU64; 9],
    /// Control messages from edges of a newer version, ignored.
    pub control_unknown: AtomicU64,
    /// Whole route lists cut to fit one frame (edges without route deltas).
    pub route_lists_cut: AtomicU64,
    /// Sessions closed because their node left the directory.
    pub node_gone: AtomicU64,
    /// Sessions closed because nothing arrived from the edge for the idle
    /// timeout: no datagram on QUIC, no byte on the TCP fallback, no
    /// control message from an older QUIC edge (see [`crate::liveness`]).
    pub sessions_silent: AtomicU64,
    /// Sessions closed because their client certificate no longer
    /// verifies, by [`RefusalCause`] (see [`crate::session::cert_check`]).
    sessions_cert_closed: [AtomicU64; RefusalCause::ALL.len()],
    /// Node certificates issued by the bootstrap.
    pub bootstrap_issued: AtomicU64,
    /// Certificate requests refused.
    pub bootstrap_refused: AtomicU64,
    /// Bootstrap connections that timed out without a reply (no request
    /// in time, or the reply not taken).
    pub bootstrap_timed_out: AtomicU64,
    /// Policy refusals by origin (connect, captured, edge) and reason.
    denials: [[AtomicU64; 6]; 4],
    /// ClusterIP connections and flows the relay resolved, by where the
    /// endpoint it picked was (see [`SERVICE_PICKS`]).
    service_picks: [AtomicU64; 6],
    /// 1 when the last capture update (routes, sources, Services) applied,
    /// 0 after a failed one (see [`Metrics::capture_applied`]).
    capture_installed: AtomicU64,
    /// Capture updates that failed (each retried a second later).
    capture_failures: AtomicU64,
    /// Times capture was found removed by something else on the node and
    /// installed again (see [`Metrics::capture_repaired`]).
    capture_repairs: AtomicU64,
    /// The capture updates' outcomes with their errors and times, for
    /// `/readyz` (see [`crate::admin::CaptureHealth`]).
    pub capture_health: crate::admin::CaptureHealth,
    /// Admin requests shed (503, budget full) and timed out (504), per
    /// budget (see [`ADMIN_BUDGETS`]).
    admin_shed: [AtomicU64; 2],
    admin_timed_out: [AtomicU64; 2],
    /// `GET /v1/routes` answered 304 (the route agent's table unchanged).
    pub routes_not_modified: AtomicU64,
}

/// The admin API's request budgets, in metric order: `api` (`/v1/*`) and
/// `scrape` (`/metrics`, `/healthz`, `/readyz`).
pub const ADMIN_BUDGETS: [&str; 2] = ["api", "scrape"];

/// Outcomes of resolving a ClusterIP or Service name at the relay
/// (`topology_unreachable` is counted besides where the pick then went:
/// the endpoints topology hints chose were all cut off, others served).
pub const SERVICE_PICKS: [&str; 6] = [
    "edge",
    "cloud",
    "no_endpoints",
    "edges_offline",
    "source_range",
    "topology_unreachable",
];

const ORIGINS: [&str; 4] = ["connect", "captured", "edge", "service"];

/// Transports a session runs over (`TransportKind::as_str`), in metric order.
pub const TRANSPORTS: [&str; 2] = ["quic", "tcp"];

/// HTTP statuses the CONNECT ingress answers with, in metric order.
pub const CONNECT_STATUSES: [u16; 9] = [200, 400, 403, 405, 408, 431, 502, 503, 504];

impl Metrics {
    /// Counts an accepted session's transport (`quic`, `tcp`).
    pub fn accepted_on(&self, transport: &str) {
        if let Some(i) = TRANSPORTS.iter().position(|x| *x == transport) {
            self.accepted_by_transport[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a typed handshake rejection.
    pub fn reject(&self, r: RejectReason) {
        if let Some(i) = REJECT_REASONS.iter().position(|x| *x == r) {
            self.rejects[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a handshake that failed before a typed answer was possible.
    pub fn handshake_failed(&self, reason: &str) {
        if let Some(i) = HANDSHAKE_LOCAL_REASONS.iter().position(|x| *x == reason) {
            self.local_failures[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a live session closed because its client certificate no
    /// longer verifies (`cause`: expired, revoked, ...).
    pub fn session_cert_closed(&self, cause: RefusalCause) {
        if let Some(i) = RefusalCause::ALL.iter().position(|x| *x == cause) {
            self.sessions_cert_closed[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts the outcome of a stream open.
    pub fn stream_outcome(&self, s: StreamStatus) {
        if let Some(i) = StreamStatus::ALL.iter().position(|x| *x == s) {
            self.stream_outcomes[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a policy refusal.
    pub fn denied(&self, origin: Origin<'_>, reason: DenyReason) {
        let o = ORIGINS.iter().position(|x| *x == origin.label());
        let r = DenyReason::ALL.iter().position(|x| *x == reason);
        if let (Some(o), Some(r)) = (o, r) {
            self.denials[o][r].fetch_add(1, Relaxed);
        }
    }

    /// Counts a Service resolution (`what` from [`SERVICE_PICKS`]).
    pub fn service_pick(&self, what: &str) {
        if let Some(i) = SERVICE_PICKS.iter().position(|x| *x == what) {
            self.service_picks[i].fetch_add(1, Relaxed);
        }
    }

    /// Records the outcome of one capture update (`crate::tunnel::sync_capture`).
    pub fn capture_applied(&self, ok: bool) {
        self.capture_installed.store(u64::from(ok), Relaxed);
        if !ok {
            self.capture_failures.fetch_add(1, Relaxed);
        }
    }

    /// Counts capture installed again after something else on the node
    /// removed it (`Capture::repair`): an nftables service restart, a
    /// firewall reload, an agent flushing the ruleset. Once is a restart;
    /// a steady rise is something on the node fighting capture.
    pub fn capture_repaired(&self) {
        self.capture_repairs.fetch_add(1, Relaxed);
    }

    /// Counts an admin request the budget `budget` (from
    /// [`ADMIN_BUDGETS`]) shed (503) or, with `timed_out`, cut at its
    /// bound (504).
    pub fn admin_refused(&self, budget: &str, timed_out: bool) {
        if let Some(i) = ADMIN_BUDGETS.iter().position(|x| *x == budget) {
            let per = if timed_out {
                &self.admin_timed_out
            } else {
                &self.admin_shed
            };
            per[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts a CONNECT answer.
    pub fn connect_answer(&self, code: u16) {
        if let Some(i) = CONNECT_STATUSES.iter().position(|x| *x == code) {
            self.connect_status[i].fetch_add(1, Relaxed);
        }
    }

    /// Renders every metric in the Prometheus text exposition format;
    /// `sessions_live` is read from the registry by the caller, so the gauge
    /// can never drift from the table it describes; `sessions_limit` is
    /// `limits.max_sessions`.
    pub fn render(&self, sessions_live: usize, sessions_limit: usize) -> String {
        let mut o = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let one = |a: &AtomicU64| vec![(String::new(), a.load(Relaxed))];
        metric(
            "relay_sessions",
            "gauge",
            "Edge sessions currently registered.",
            &[(String::new(), sessions_live as u64)],
        );
        metric(
            "relay_sessions_draining",
            "gauge",
            "Edge sessions draining: left by a planned move (not in relay_sessions) while their streams finish, or drained by an operator or a shutdown.",
            &one(&self.sessions_draining),
        );
        metric(
            "relay_sessions_limit",
            "gauge",
            "Most edge sessions this relay accepts (limits.max_sessions); more are refused overloaded.",
            &[(String::new(), sessions_limit as u64)],
        );
        metric(
            "relay_sessions_accepted_total",
            "counter",
            "Edge sessions accepted since start.",
            &one(&self.sessions_accepted),
        );
        let rows: Vec<(String, u64)> = TRANSPORTS
            .iter()
            .zip(&self.accepted_by_transport)
            .map(|(t, a)| (format!("{{transport=\"{t}\"}}"), a.load(Relaxed)))
            .collect();
        metric(
            "relay_sessions_accepted_by_transport_total",
            "counter",
            "Edge sessions accepted since start, by transport (tcp: the TLS-over-TCP fallback).",
            &rows,
        );
        let mut rows: Vec<(String, u64)> = REJECT_REASONS
            .iter()
            .zip(&self.rejects)
            .map(|(r, a)| (format!("{{reason=\"{}\"}}", r.as_str()), a.load(Relaxed)))
            .collect();
        rows.extend(
            HANDSHAKE_LOCAL_REASONS
                .iter()
                .zip(&self.local_failures)
                .map(|(r, a)| (format!("{{reason=\"{r}\"}}"), a.load(Relaxed))),
        );
        metric(
            "relay_handshake_failures_total",
            "counter",
            "Edge handshakes that failed, by reason: the edge's typed rejections; the client certificate refused at TLS (cert_expired, cert_not_yet_valid, revoked, unknown_ca, bad_certificate); tls for any other TLS failure; and the relay's own limits.",
            &rows,
        );
        let rows: Vec<(String, u64)> = SERVICE_PICKS
            .iter()
            .zip(&self.service_picks)
            .map(|(w, a)| (format!("{{endpoint=\"{w}\"}}"), a.load(Relaxed)))
            .collect();
        metric(
            "relay_service_resolutions_total",
            "counter",
            "ClusterIP connections and flows resolved by the relay, by where the picked endpoint is (no_endpoints, edges_offline: refused at once, the Service having no endpoint or only ones on edges without a session).",
            &rows,
        );
        metric(
            "relay_streams_open",
            "gauge",
            "Tunnel streams currently open.",
            &one(&self.streams_open),
        );
        let rows: Vec<(String, u64)> = StreamStatus::ALL
            .iter()
            .zip(&self.stream_outcomes)
            .map(|(s, a)| (format!("{{outcome=\"{}\"}}", s.as_str()), a.load(Relaxed)))
            .collect();
        metric(
            "relay_streams_total",
            "counter",
            "Tunnel stream opens, by outcome.",
            &rows,
        );
        metric(
            "relay_bytes_total",
            "counter",
            "Payload bytes carried, by direction.",
            &[
                (
                    "{direction=\"to_edge\"}".into(),
                    self.bytes_to_edge.load(Relaxed),
                ),
                (
                    "{direction=\"from_edge\"}".into(),
                    self.bytes_from_edge.load(Relaxed),
                ),
            ],
        );
        let rows: Vec<(String, u64)> = CONNECT_STATUSES
            .iter()
            .zip(&self.connect_status)
            .map(|(c, a)| (format!("{{code=\"{c}\"}}"), a.load(Relaxed)))
            .collect();
        let per_budget = |per: &[AtomicU64; 2]| -> Vec<(String, u64)> {
            ADMIN_BUDGETS
                .iter()
                .zip(per)
                .map(|(b, a)| (format!("{{budget=\"{b}\"}}"), a.load(Relaxed)))
                .collect()
        };
        metric(
            "relay_admin_requests_shed_total",
            "counter",
            "Admin requests answered 503 because their budget's slots were all taken (route agents read it as busy, alive).",
            &per_budget(&self.admin_shed),
        );
        metric(
            "relay_admin_requests_timed_out_total",
            "counter",
            "Admin requests answered 504 at the request bound (10 s).",
            &per_budget(&self.admin_timed_out),
        );
        metric(
            "relay_admin_routes_not_modified_total",
            "counter",
            "GET /v1/routes answered 304 Not Modified (the client's table is current).",
            &one(&self.routes_not_modified),
        );
        metric(
            "relay_connect_responses_total",
            "counter",
            "HTTP CONNECT requests answered, by status code.",
            &rows,
        );
        let mut rows = Vec::new();
        for (o, per) in ORIGINS.iter().zip(&self.denials) {
            for (r, a) in DenyReason::ALL.iter().zip(per) {
                rows.push((
                    format!("{{origin=\"{o}\",reason=\"{}\"}}", r.as_str()),
                    a.load(Relaxed),
                ));
            }
        }
        metric(
            "relay_policy_denials_total",
            "counter",
            "Flows the policy refused, by origin and reason.",
            &rows,
        );
        metric(
            "relay_control_unknown_total",
            "counter",
            "Control messages of a newer protocol revision, ignored.",
            &one(&self.control_unknown),
        );
        metric(
            "relay_bootstrap_total",
            "counter",
            "Certificate bootstrap requests, by outcome.",
            &[
                (
                    "{outcome=\"issued\"}".into(),
                    self.bootstrap_issued.load(Relaxed),
                ),
                (
                    "{outcome=\"refused\"}".into(),
                    self.bootstrap_refused.load(Relaxed),
                ),
                (
                    "{outcome=\"timed_out\"}".into(),
                    self.bootstrap_timed_out.load(Relaxed),
                ),
            ],
        );
        metric(
            "relay_sessions_node_gone_total",
            "counter",
            "Sessions closed because their node left the directory (Node deleted).",
            &one(&self.node_gone),
        );
        metric(
            "relay_sessions_silent_total",
            "counter",
            "Sessions closed because nothing arrived from the edge (datagrams on QUIC, bytes on the TCP fallback, control messages from a QUIC edge without the liveness capability) for quic.idle_timeout, or for two of the edge's stated keep-alive intervals when that is shorter.",
            &one(&self.sessions_silent),
        );
        metric(
            "relay_streams_stalled",
            "gauge",
            "QUIC streams whose local reader has not taken their data for 1 s or more (a paused kubectl logs -f, a client that stopped reading); their session's receive window then makes room for 24 stream windows on top of quic.conn_window.",
            &[(String::new(), relay_transport::stall::stalled_now())],
        );
        metric(
            "relay_streams_stalled_total",
            "counter",
            "Times a QUIC stream's local reader left its data waiting for 1 s or more (see relay_streams_stalled).",
            &[(String::new(), relay_transport::stall::stalls_total())],
        );
        let rows: Vec<(String, u64)> = RefusalCause::ALL
            .iter()
            .zip(&self.sessions_cert_closed)
            .map(|(c, a)| (format!("{{reason=\"{}\"}}", c.as_str()), a.load(Relaxed)))
            .collect();
        metric(
            "relay_sessions_certificate_closed_total",
            "counter",
            "Live sessions the relay closed because their client certificate no longer verifies, by reason: cert_expired (past its notAfter, checked every liveness sweep), or what the verifier says after a reload changed tls.client_ca or tls.crl (revoked, unknown_ca, ...).",
            &rows,
        );
        metric(
            "relay_route_lists_cut_total",
            "counter",
            "Whole route lists cut to fit one frame for edges without route deltas.",
            &one(&self.route_lists_cut),
        );
        o
    }
}

/// Renders the capture listener's counters and whether capture is
/// installed (nothing without `[capture]`).
pub fn render_capture(shared: &crate::server::Shared) -> String {
    match &shared.cfg.capture {
        Some(_) => {
            let m = &shared.metrics;
            shared.capture_bound.render_capture("relay")
                + &format!(
                    "# HELP relay_capture_installed 1 when the relay's last capture update (edge routes, capture sources, Services) applied, 0 while it fails (retried every second; traffic from this node to the edges may go uncaptured meanwhile).\n# TYPE relay_capture_installed gauge\nrelay_capture_installed {}\n\
                     # HELP relay_capture_failures_total Capture updates that failed (each logged, sampled, and retried).\n# TYPE relay_capture_failures_total counter\nrelay_capture_failures_total {}\n\
                     # HELP relay_capture_repairs_total Times capture was found removed from the node by something else (an nftables restart, a firewall reload, a flushed ruleset) and installed again.\n# TYPE relay_capture_repairs_total counter\nrelay_capture_repairs_total {}\n",
                    m.capture_installed.load(Relaxed),
                    m.capture_failures.load(Relaxed),
                    m.capture_repairs.load(Relaxed)
                )
        }
        None => String::new(),
    }
}

/// Renders what the edges report about themselves:
/// `relay_edges_capture_failing`, the registered sessions whose edge says
/// its capture is not installed (its pods do not reach the cloud through
/// the tunnel while the tunnel itself is up). Counted from the registry at
/// each scrape, so it cannot drift from the sessions it describes; one
/// row per node (a session a move left draining is not counted beside its
/// successor, which reports again).
pub fn render_edges(shared: &crate::server::Shared) -> String {
    let sessions = shared.registry.sessions_unsorted();
    let failing = sessions.iter().filter(|s| s.capture_failing()).count();
    format!(
        "# HELP relay_edges_capture_failing Edge sessions whose edge reports its capture is not installed: the tunnel is up, but that node's pods do not reach the cloud through it (GET /v1/sessions, capture_installed false, names the nodes and errors).\n# TYPE relay_edges_capture_failing gauge\nrelay_edges_capture_failing {failing}\n"
    )
}

/// Renders the status writer's counters (node conditions and Events;
/// zero in static mode).
pub fn render_status(stats: crate::status::StatusStats) -> String {
    format!(
        "# HELP relay_node_condition_writes_total EdgeTunnelReady conditions applied to Nodes.\n# TYPE relay_node_condition_writes_total counter\nrelay_node_condition_writes_total {}\n\
         # HELP relay_node_condition_coalesced_total Condition changes folded into a later write (a node changing again within the hold-off).\n# TYPE relay_node_condition_coalesced_total counter\nrelay_node_condition_coalesced_total {}\n\
         # HELP relay_node_condition_write_failures_total Condition writes the apiserver did not take (each retried after a wait doubling from the 5 s hold-off up to 5 minutes).\n# TYPE relay_node_condition_write_failures_total counter\nrelay_node_condition_write_failures_total {}\n\
         # HELP relay_events_dropped_total Events not published, by reason (rate_limited: a node over its event budget; api_error: the apiserver refused or did not answer).\n# TYPE relay_events_dropped_total counter\nrelay_events_dropped_total{{reason=\"rate_limited\"}} {}\nrelay_events_dropped_total{{reason=\"queue_full\"}} {}\nrelay_events_dropped_total{{reason=\"api_error\"}} {}\n",
        stats.condition_writes,
        stats.condition_coalesced,
        stats.condition_failures,
        stats.events_rate_limited,
        stats.events_queue_full,
        stats.events_api_errors
    )
}

/// Renders the Kubernetes watches' errors (zero in static mode): during an
/// apiserver outage the relay serves its last known Nodes and Services and
/// stays ready, and this is where the outage shows. Also the edge Node
/// addresses not taken as the edges' (each logged once when refused), and
/// where the CNIs' IPAM resources stand: on a Calico or Cilium cluster
/// whose Nodes carry no pod CIDR they are where edges' pod ranges come
/// from, so an unreadable one leaves those pods unrouted.
pub fn render_watches(shared: &crate::server::Shared) -> String {
    let ipam = shared.directory.ipam().unwrap_or_default();
    let mut out = format!(
        "# HELP relay_kube_watch_errors_total Failed list or watch requests, by watch (each retried with backoff; the last known objects stay in use).\n# TYPE relay_kube_watch_errors_total counter\nrelay_kube_watch_errors_total{{watch=\"nodes\"}} {}\nrelay_kube_watch_errors_total{{watch=\"services\"}} {}\nrelay_kube_watch_errors_total{{watch=\"ipam\"}} {}\n\
         # HELP relay_node_addresses_refused Node addresses not taken as their node's (loopback or link-local on any Node; on an edge the cloud's, another node's pod address, outside kubernetes.edge_address_ranges; the log names each).\n# TYPE relay_node_addresses_refused gauge\nrelay_node_addresses_refused {}\n\
         # HELP relay_ipam_prefixes_refused Edge nodes' pod ranges from CNI IPAM (Calico blocks, Cilium ranges), and pod CIDRs set where most Nodes have none, not taken as theirs (overlapping the cloud's, another node's or a reserved range, or outside kubernetes.edge_address_ranges; the log and the Node condition name each).\n# TYPE relay_ipam_prefixes_refused gauge\nrelay_ipam_prefixes_refused {}\n\
         # HELP relay_ipam_entries_skipped_total CNI IPAM entries skipped as unusable (a CIDR that does not parse; each logged).\n# TYPE relay_ipam_entries_skipped_total counter\nrelay_ipam_entries_skipped_total {}\n\
         # HELP relay_ipam_source_state Where each CNI IPAM resource stands (1 for its current state): unknown (no answer yet), absent (not installed), forbidden (403: RBAC), watching (waiting for the first list), listed. Kubernetes mode only.\n# TYPE relay_ipam_source_state gauge\n",
        shared.directory.watch_errors(),
        shared.services.watch_errors(),
        ipam.watch_errors,
        shared.directory.refused_addresses(),
        ipam.refused_prefixes,
        ipam.skipped_entries,
    );
    for (resource, now) in &ipam.sources {
        for state in relay_kube::IpamState::ALL.map(relay_kube::IpamState::as_str) {
            out.push_str(&format!(
                "relay_ipam_source_state{{resource=\"{resource}\",state=\"{state}\"}} {}\n",
                u8::from(state == *now)
            ));
        }
    }
    // Kubernetes mode only, as the sources.
    if !ipam.sources.is_empty() {
        out.push_str("# HELP relay_ipam_calico_strict_affinity Calico's IPAM strictAffinity (ipamconfigs.crd.projectcalico.org default), 1 for where it stands: unused (no confirmed Calico block known), unknown (not read yet), strict (true), off (false), unset (no such object: Calico's default, false), forbidden (403: RBAC). Off or unset, a node may be given addresses of another node's block, and pods with them are routed to the block's node.\n# TYPE relay_ipam_calico_strict_affinity gauge\n");
        for state in relay_kube::ipam::StrictAffinity::ALL {
            out.push_str(&format!(
                "relay_ipam_calico_strict_affinity{{state=\"{}\"}} {}\n",
                state.as_str(),
                u8::from(state == ipam.calico_strict_affinity)
            ));
        }
    }
    out
}

/// Renders the process-level gauges a soak compares with its baseline:
/// live tokio tasks (every connection, stream and flow runs in one, so a
/// leak of any of them shows here) and CONNECT connections holding a
/// permit (client sockets the ingress has accepted and not yet closed).
pub fn render_runtime(shared: &crate::server::Shared) -> String {
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks())
        .unwrap_or(0);
    let held = shared
        .cfg
        .limits
        .max_connect_connections
        .saturating_sub(shared.connect_permits.available_permits());
    // The certificates and the replica Lease follow here: their state is
    // not in `Metrics` (see `tls_reload::FileStatuses`,
    // `replicas::lease_counters`), and this is the per-`Shared` render
    // `/metrics` already calls.
    format!(
        "# HELP relay_runtime_tasks Tokio tasks alive in the relay process.\n# TYPE relay_runtime_tasks gauge\nrelay_runtime_tasks {tasks}\n\
         # HELP relay_connect_connections CONNECT client connections holding a permit (limits.max_connect_connections).\n# TYPE relay_connect_connections gauge\nrelay_connect_connections {held}\n"
    ) + &render_tls(&served_certs(&shared.cfg), &shared.tls_files)
        + &render_replicas(crate::replicas::lease_counters(&shared.cfg))
}

/// One certificate the relay serves, for [`render_tls`].
pub(crate) struct ServedCert<'a> {
    /// `tls` (QUIC and the TCP fallback), `connect_tls`, `admin`, or
    /// `bootstrap_issuer` (the CA that signs edges' bootstrap certificates).
    pub listener: &'static str,
    /// The leaf the relay started with.
    pub leaf: Option<&'a rustls::pki_types::CertificateDer<'static>>,
    /// The file it is reloaded from (`None`: never reloaded).
    pub file: Option<&'a std::path::Path>,
}

/// The certificates `cfg`'s listeners serve: the relay's own, the CONNECT
/// and admin listeners' where they are on and use TLS, and the bootstrap
/// issuer's CA (read once at start, not reloaded).
pub(crate) fn served_certs(cfg: &crate::config::RelayConfig) -> Vec<ServedCert<'_>> {
    let mut out = vec![ServedCert {
        listener: "tls",
        leaf: cfg.tls.chain.first(),
        file: cfg.tls_reload.as_ref().map(|r| r.paths.cert.as_path()),
    }];
    // CONNECT's and the admin API's TLS serve only where they listen.
    let listeners = [
        (
            "connect_tls",
            cfg.connect_listen.is_some(),
            &cfg.connect_tls,
            &cfg.connect_tls_files,
        ),
        (
            "admin",
            cfg.admin_listen.is_some(),
            &cfg.admin_tls,
            &cfg.admin_tls_files,
        ),
    ];
    for (listener, on, m, files) in listeners {
        if let (true, Some(m)) = (on, m) {
            out.push(ServedCert {
                listener,
                leaf: m.chain.first(),
                file: files.as_ref().map(|p| p.cert.as_path()),
            });
        }
    }
    if let Some(b) = &cfg.bootstrap {
        out.push(ServedCert {
            listener: "bootstrap_issuer",
            leaf: Some(&b.issuer_cert),
            file: None,
        });
    }
    out
}

/// Renders when each served certificate expires (the last one loaded:
/// after a failed reload, still the previous one, which is what edges
/// see) and its reloads that failed (listeners reloaded from files), as
/// this relay's reloads recorded them in `files`.
pub(crate) fn render_tls(
    certs: &[ServedCert<'_>],
    files: &crate::tls_reload::FileStatuses,
) -> String {
    let mut expiry = String::new();
    let mut failures = String::new();
    for c in certs {
        let st = c.file.map(|f| files.get(c.listener, f)).unwrap_or_default();
        let l = c.listener;
        if let Some(t) = st
            .not_after
            .or_else(|| c.leaf.and_then(|d| crate::tls_reload::not_after(d)))
        {
            let _ = writeln!(
                expiry,
                "relay_tls_cert_not_after_seconds{{listener=\"{l}\"}} {t}"
            );
        }
        if c.file.is_some() {
            let n = st.reload_failures;
            let _ = writeln!(
                failures,
                "relay_tls_reload_failures_total{{listener=\"{l}\"}} {n}"
            );
        }
    }
    format!(
        "# HELP relay_tls_cert_not_after_seconds When the certificate each listener serves expires (notAfter, Unix seconds; bootstrap_issuer: the CA signing edges' certificates).\n# TYPE relay_tls_cert_not_after_seconds gauge\n{expiry}\
         # HELP relay_tls_reload_failures_total Certificate reloads that failed (the previous certificate stays; retried every tls.reload_interval while the files differ).\n# TYPE relay_tls_reload_failures_total counter\n{failures}"
    )
}

/// Renders the replica Lease membership's counters (nothing without
/// Lease-based `[replicas]`). Failing renewals lose this replica its
/// place in the set (its edges move away); an id conflict is two relays
/// configured with one `relay_id`.
pub fn render_replicas(c: Option<crate::replicas::LeaseCounters>) -> String {
    let Some(c) = c else {
        return String::new();
    };
    let mut o = String::new();
    for (name, help, v) in [
        ("relay_replica_lease_renewals_total", "Renewals (and the first create) of this replica's Lease.", c.renewals),
        ("relay_replica_lease_renew_errors_total", "Renewals of this replica's Lease that failed (API error or timeout); after a lease duration of them the other replicas drop this one.", c.renew_errors),
        ("relay_replica_lease_update_conflicts_total", "Lease updates refused with 409 (another writer first; retried at the next round).", c.rv_conflicts),
        ("relay_replica_id_conflicts_total", "Renewal rounds in which this replica's id was held by another live instance (two relays with one relay_id).", c.id_conflicts),
        ("relay_replica_leases_collected_total", "Stale replica Leases deleted.", c.collected),
        ("relay_replica_watch_errors_total", "Failed list or watch requests on the replica Leases (each retried with backoff).", c.watch_errors),
        ("relay_replica_store_behind_total", "Renewal rounds at which the Lease watch had not yet delivered the previous renewal (the set was kept).", c.store_behind),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    o
}

#[cfg(test)]
mod tests;
