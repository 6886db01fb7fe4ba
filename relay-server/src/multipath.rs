//! The route agent with several relay replicas: every edge prefix is
//! routed through a **resilient nexthop group** of the replicas that
//! currently serve it (`ip nexthop add id G group a/b/c type resilient`),
//! instead of one next hop.
//!
//! Why resilient groups: the kernel's default multipath (hash-threshold)
//! splits the hash space into one range per next hop; when a next hop is
//! added or removed every range moves, so flows through the *surviving*
//! replicas are remapped to other replicas, which have no state for them
//! and reset them. A resilient group hashes flows into a fixed table of
//! buckets: removing a next hop reassigns only its buckets, and a new next
//! hop takes over buckets only once they have been idle ([`IDLE_TIMER`],
//! 120 s), so established connections through the others are untouched.
//!
//! Each prefix gets its own group, changed in place as replicas come and
//! go (a route moved to another group would be rehashed from scratch). The
//! agent polls every replica's `GET /v1/routes` (each through a
//! [`RoutesPoll`]: a kept connection, 304 for an unchanged table), each
//! replica by a task of its own at the interval (`replica::spawn`); the
//! groups are brought in step with every replica's latest answer at the
//! interval and at once when one's changes, so a replica whose poll hangs
//! (its node black-holed: a poll fails only at its bound,
//! [`crate::agent::poll::POLL_TIMEOUT`]) delays no other replica's
//! change. A prefix's members are the replicas listing it. A replica that
//! does not answer (its poll failed, or timed out) is left out (its node
//! may be gone; the others serve every edge), unless none answers, in
//! which case nothing changes; the first merge waits for every replica's
//! first poll. One that answers
//! 503 "admin API overloaded" ([`Busy`]) is alive: its last table stays in
//! the groups for fewer than [`BUSY_POLLS`] busy polls in a row, then it
//! is left out as well. The agent owns nexthop ids from
//! [`NEXTHOP_BASE`] (one per replica) and [`GROUP_BASE`] (one per prefix)
//! and routes of its protocol number, and removes them all on exit (unless
//! told to keep them for the next agent: [`OnExit`]).
//!
//! As the single-relay agent's, the routes live in the agent's own
//! routing table behind one policy rule ahead of `main`
//! ([`crate::agent::RouteTable`], which says why; a killed run's rule and
//! routes stay at start, to route edge traffic while no replica answers,
//! except routes the filter below would refuse), and `main`'s leftovers
//! of an older agent go once the table is in place. Nexthop objects
//! belong to no table: only the routes pointing at the groups move. A
//! prefix holding one of this node's addresses or a replica's VIA address
//! is refused ([`crate::agent::refuse_prefixes`]). With `--status-listen` it serves
//! the single-relay agent's `/healthz`, `/readyz` and `/metrics`
//! ([`crate::agent::status`]), which [`run_with_status`] keeps up to date.
//!
//! Next hops are the replicas' `--replica ADMIN=VIA` addresses only, as
//! `--via` is for one relay: on an overlay CNI in a cloud, where edge
//! traffic must follow the CNI's tunnel route (`--via-pod-network`, see
//! [`crate::agent`]), this mode does not apply and the command line
//! refuses the combination.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::status::{AgentStatus, PollFailure};
use crate::agent::{AgentTls, Busy, OnExit, Refusals, RouteView, RoutesPoll};
use crate::config::Secret;

mod groups;
mod kernel;
mod replica;
#[cfg(test)]
pub(crate) mod tests;
pub use groups::{merge, merge_views, parse_installed, plan, Installed};
use kernel::{apply, install, installed, ip};
pub use replica::BUSY_POLLS;

/// Nexthop ids of the replicas: `NEXTHOP_BASE + index`.
pub const NEXTHOP_BASE: u32 = 0x0ED0_0000;
/// Group ids of prefixes: from `GROUP_BASE` up.
pub const GROUP_BASE: u32 = 0x0ED1_0000;
/// Most groups (prefixes) the agent allocates ids for.
const MAX_GROUPS: u32 = 1 << 20;
/// Buckets per resilient group: enough that one replica out of a handful
/// moves a small share of flows.
pub const BUCKETS: u32 = 64;
/// Seconds a bucket must be idle before it may move to a new next hop:
/// the kernel's default (`NH_RES_DEFAULT_IDLE_TIMER`, 120 s).
///
/// It decides only how soon a replica that (re)joins a group gets
/// buckets: the kernel gives a next hop that wants more buckets only those
/// idle this long (with `unbalanced_timer` 0, as here, it never forces
/// busy ones). A replica that leaves loses its buckets at once whatever
/// this is (the kernel unsets the buckets of a next hop no longer in the
/// group and reassigns them at the same replace; see
/// Documentation/networking/nexthop-group-resilient.rst), so a larger
/// value never keeps traffic on a replica that is gone.
///
/// Why not shorter: the relay captures by DNAT to a local port, so a
/// connection moved to another replica is reset there at its next packet
/// (that replica has no socket for it). A connection idle longer than
/// this (a keep-alive or pooled connection between requests) whose bucket
/// moves to a rejoining replica meanwhile is such a connection: at 10 s
/// (this value before), any connection idle for 10 s could be reset at
/// a replica's return. 120 s covers common pool idle bounds (Go's net/http
/// 90 s, nginx's upstream keepalive 60 s); a connection idle longer still
/// can be moved, which only no rebalancing at all would avoid. The cost
/// is a returning replica taking its share only as buckets fall idle.
/// Groups an older agent made with another value take this one at their
/// next change of members, which a replace sets before it moves buckets.
pub const IDLE_TIMER: u32 = 120;

/// One replica as the agent reaches it.
#[derive(Debug, Clone)]
pub struct ReplicaTarget {
    /// Its admin API.
    pub admin: SocketAddr,
    /// Its node's address on this node's network (the next hop).
    pub via: IpAddr,
    /// HTTPS to the admin API, if used.
    pub tls: Option<AgentTls>,
}

/// What the multipath agent needs.
#[derive(Debug, Clone)]
pub struct MultipathConfig {
    /// The replicas, in a fixed order (index = nexthop id offset).
    pub replicas: Vec<ReplicaTarget>,
    /// Bearer token for the admin APIs.
    pub token: Option<Secret>,
    /// Poll interval (the bound on how long a replica that lost an edge
    /// keeps attracting its traffic).
    pub interval: Duration,
    /// Route protocol number marking our routes.
    pub proto: u8,
    /// The routing table of our routes, and the rule consulting it.
    pub table: crate::agent::RouteTable,
    /// Whether the routes, groups, nexthops and rule go when it stops.
    pub on_exit: OnExit,
}

/// Runs until `stop`, then removes every route, group and nexthop it made
/// (unless `cfg.on_exit` keeps them).
pub async fn run(cfg: MultipathConfig, stop: CancellationToken) {
    run_with_status(cfg, stop, Arc::default()).await
}

/// [`run`], recording each poll's outcome in `status` (what the status
/// endpoint, [`crate::agent::status::serve`], answers from), as the
/// single-relay agent does: synced when every prefix the answering
/// replicas serve is routed; `relay_unreachable` when none answers (the
/// routes stay); `no_next_hop` when some prefix has no replica with a
/// route toward its VIA address; `install_failed` when `ip` refused.
pub async fn run_with_status(
    cfg: MultipathConfig,
    stop: CancellationToken,
    status: Arc<AgentStatus>,
) {
    let vias: Vec<IpAddr> = cfg.replicas.iter().map(|r| r.via).collect();
    info!(
        replicas = cfg.replicas.len(),
        table = cfg.table.table,
        rule_pref = cfg.table.pref,
        "route agent (resilient multipath) started"
    );
    // A killed run's rule and routes stay (no replica may answer now):
    // only those the filter below would refuse go.
    crate::agent::remove_refused_leftovers(cfg.table, cfg.proto, &vias).await;
    let mut refusals = Refusals::default();
    let (board, mut pollers) = replica::spawn(&cfg);
    // Whether `main` still needs an older agent's leftovers removed.
    let mut main_checked = false;
    // The first merge waits for every replica's first poll (each bounded
    // by POLL_TIMEOUT): one not heard from yet would be left out of the
    // groups a killed or kept run left, moving its flows elsewhere.
    let mut stopped = false;
    while board.latest().iter().any(Option::is_none) {
        tokio::select! {
            _ = stop.cancelled() => {
                stopped = true;
                break;
            }
            _ = board.changed() => {}
        }
    }
    // Then at every interval, and at once when a replica's view changes,
    // from each replica's latest report: a replica whose poll is still
    // outstanding (its node black-holed) holds up no other's change, and
    // is left out once that poll fails.
    while !stopped {
        let latest = board.latest();
        let views: Vec<Option<RouteView>> = latest
            .iter()
            .map(|r| r.as_ref().and_then(|r| r.view.clone()))
            .collect();
        let last_error = latest
            .iter()
            .flatten()
            .filter_map(|r| r.error.clone())
            .next_back();
        sync(
            &views,
            last_error,
            &vias,
            &cfg,
            &status,
            &mut refusals,
            &mut main_checked,
        )
        .await;
        tokio::select! {
            _ = stop.cancelled() => stopped = true,
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = board.changed() => {}
        }
    }
    pollers.shutdown().await;
    if cfg.on_exit == OnExit::Keep {
        info!("route agent stopped; its routes, nexthops and rule kept for the next agent");
        return;
    }
    match remove_installed(cfg.table, cfg.proto).await {
        Ok(()) => info!("route agent stopped; its routes, nexthops and rule removed"),
        Err(e) => warn!(error = %format!("{e:#}"), "removing routes on exit failed"),
    }
}

/// One merge of the replicas' `views` into the groups and routes, and its
/// outcome in `status` (`last_error`: the last failing replica's, for
/// when none answers).
async fn sync(
    views: &[Option<RouteView>],
    last_error: Option<String>,
    vias: &[IpAddr],
    cfg: &MultipathConfig,
    status: &AgentStatus,
    refusals: &mut Refusals,
    main_checked: &mut bool,
) {
    // None answered: change nothing (as the single-relay agent keeps
    // its routes while the relay is away).
    let Some(want) = merge_views(views) else {
        status.failed(
            PollFailure::RelayUnreachable,
            &format!(
                "no replica answers (last: {})",
                last_error.unwrap_or_default()
            ),
        );
        return;
    };
    let mut keep = match crate::agent::own_addrs() {
        Ok(keep) => keep,
        Err(e) => {
            warn!(error = %e, "reading this node's addresses failed");
            status.failed(PollFailure::InstallFailed, &e);
            return;
        }
    };
    keep.extend(vias);
    let prefixes: BTreeSet<Cidr> = want.keys().copied().collect();
    let ok = refusals.filter(&prefixes, &keep, status);
    let want: BTreeMap<Cidr, BTreeSet<usize>> =
        want.into_iter().filter(|(c, _)| ok.contains(c)).collect();
    match install(&want, vias, cfg, main_checked).await {
        Ok(done) => {
            if done.changes > 0 {
                info!(
                    changes = done.changes,
                    prefixes = done.routes,
                    "routes synced"
                );
            }
            match done.unroutable {
                0 => status.synced(done.routes),
                n => status.failed(
                    PollFailure::NoNextHop,
                    &format!(
                        "{n} prefixes unrouted: no replica serving them has a route toward its VIA address"
                    ),
                ),
            }
        }
        Err(e) => {
            warn!(error = %e, "installing routes failed");
            status.failed(PollFailure::InstallFailed, &e);
        }
    }
}

/// Removes the multipath agent's routes (protocol `proto` in
/// `table.table`), its groups and nexthops (ids from [`NEXTHOP_BASE`]) and
/// its rule: what it does on a stop with [`OnExit::Remove`], and what
/// `route-agent --cleanup` does for either agent (the single-relay
/// agent's routes are routes of the same protocol in the same table).
pub async fn remove_installed(table: crate::agent::RouteTable, proto: u8) -> anyhow::Result<()> {
    apply(&BTreeMap::new(), &[], proto, table.table).await?;
    // Those made only: one never made (no route toward its VIA) would
    // fail the batch.
    let have = installed(proto, table.table).await?;
    if !have.nexthops.is_empty() {
        let del: String = have
            .nexthops
            .iter()
            .map(|id| format!("nexthop del id {id}\n"))
            .collect();
        ip(&["-force", "-batch", "-"], Some(&del)).await?;
    }
    table.remove_rule().await?;
    Ok(())
}
