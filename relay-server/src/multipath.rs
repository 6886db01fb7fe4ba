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
//! hop takes over buckets only once they have been idle (`idle_timer`), so
//! established connections through the others are untouched.
//!
//! Each prefix gets its own group, changed in place as replicas come and
//! go (a route moved to another group would be rehashed from scratch). The
//! agent polls every replica's `GET /v1/routes` (each through a
//! [`RoutesPoll`]: a kept connection, 304 for an unchanged table); a
//! prefix's members are the replicas listing it. A replica that does not
//! answer is left out (its node may be gone; the others serve every edge),
//! unless none answers, in which case nothing changes. One that answers
//! 503 "admin API overloaded" ([`Busy`]) is alive: its last table stays in
//! the groups for fewer than [`BUSY_POLLS`] busy polls in a row, then it
//! is left out as well. The agent owns nexthop ids from
//! [`NEXTHOP_BASE`] (one per replica) and [`GROUP_BASE`] (one per prefix)
//! and routes of its protocol number, and removes them all on exit.
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
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use relay_protocol::Cidr;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::status::{AgentStatus, PollFailure, NOT_READY_AFTER};
use crate::agent::{AgentConfig, AgentTls, Busy, Refusals, RouteView, RoutesPoll};
use crate::config::Secret;

/// Nexthop ids of the replicas: `NEXTHOP_BASE + index`.
pub const NEXTHOP_BASE: u32 = 0x0ED0_0000;
/// Group ids of prefixes: from `GROUP_BASE` up.
pub const GROUP_BASE: u32 = 0x0ED1_0000;
/// Most groups (prefixes) the agent allocates ids for.
const MAX_GROUPS: u32 = 1 << 20;
/// Buckets per resilient group: enough that one replica out of a handful
/// moves a small share of flows.
pub const BUCKETS: u32 = 64;
/// Seconds a bucket must be idle before it may move to a new next hop.
pub const IDLE_TIMER: u32 = 10;

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
}

/// What this host has of ours.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Our routes: prefix → the group id they point at (`None`: not a group).
    pub routes: BTreeMap<Cidr, Option<u32>>,
    /// Our nexthops (replica ids).
    pub nexthops: BTreeSet<u32>,
    /// Our groups: id → member nexthop ids.
    pub groups: BTreeMap<u32, BTreeSet<u32>>,
}

/// Parses `ip -4 route show table T proto P` (our routes) and `ip nexthop
/// show`.
pub fn parse_installed(routes: &str, nexthops: &str) -> Installed {
    let mut out = Installed::default();
    for l in routes
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
    {
        let mut w = l.split_whitespace();
        let Some(Ok(c)) = w.next().map(str::parse::<Cidr>) else {
            continue;
        };
        let words: Vec<&str> = l.split_whitespace().collect();
        let nhid = words
            .windows(2)
            .find(|p| p[0] == "nhid")
            .and_then(|p| p[1].parse().ok());
        out.routes.insert(c, nhid);
    }
    for l in nexthops.lines() {
        let words: Vec<&str> = l.split_whitespace().collect();
        let Some(id) = words
            .windows(2)
            .find(|p| p[0] == "id")
            .and_then(|p| p[1].parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(g) = words.windows(2).find(|p| p[0] == "group") {
            if (GROUP_BASE..GROUP_BASE + MAX_GROUPS).contains(&id) {
                let members = g[1]
                    .split('/')
                    // `id,weight` when weighted.
                    .filter_map(|m| m.split(',').next()?.parse().ok())
                    .collect();
                out.groups.insert(id, members);
            }
        } else if (NEXTHOP_BASE..GROUP_BASE).contains(&id) {
            out.nexthops.insert(id);
        }
    }
    out
}

/// The `ip -batch` commands that turn `have` into `want` (prefix → member
/// replica indices; empty members: no route). Nexthops first, groups
/// changed in place, routes last; removals in the reverse order. Route
/// lines carry `{proto}` and `{table}` for the caller to fill in.
/// `vias` are the replicas' next hops with the device each is reached
/// through (a nexthop object needs one; `None`: already installed).
pub fn plan(
    have: &Installed,
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[(IpAddr, Option<String>)],
) -> String {
    let mut b = String::new();
    let nh = |i: usize| NEXTHOP_BASE + i as u32;
    for (i, (via, dev)) in vias.iter().enumerate() {
        if !have.nexthops.contains(&nh(i)) {
            match dev {
                Some(d) => {
                    let _ = writeln!(b, "nexthop replace id {} via {via} dev {d}", nh(i));
                }
                None => warn!(%via, "no route to this replica's next hop; leaving it out"),
            }
        }
    }
    // Keep each prefix's group id; new prefixes get the lowest free ones.
    let mut used: BTreeSet<u32> = have.groups.keys().copied().collect();
    let mut next_free = GROUP_BASE;
    let mut group_of: BTreeMap<Cidr, u32> = BTreeMap::new();
    for c in want.keys() {
        let id = match have.routes.get(c).copied().flatten() {
            Some(g) if have.groups.contains_key(&g) && !group_of.values().any(|v| *v == g) => g,
            _ => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        group_of.insert(*c, id);
    }
    for (c, members) in want {
        let g = group_of[c];
        let ids: BTreeSet<u32> = members.iter().map(|i| nh(*i)).collect();
        if have.groups.get(&g) != Some(&ids) {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            let _ = writeln!(
                b,
                "nexthop replace id {g} group {} type resilient buckets {BUCKETS} idle_timer {IDLE_TIMER}",
                list.join("/")
            );
        }
        if have.routes.get(c) != Some(&Some(g)) {
            let _ = writeln!(
                b,
                "route replace {c} nhid {g} proto {{proto}} table {{table}}"
            );
        }
    }
    for c in have.routes.keys().filter(|c| !want.contains_key(c)) {
        let _ = writeln!(b, "route del {c} proto {{proto}} table {{table}}");
    }
    let keep: BTreeSet<u32> = group_of.values().copied().collect();
    for g in have.groups.keys().filter(|g| !keep.contains(g)) {
        let _ = writeln!(b, "nexthop del id {g}");
    }
    b
}

/// Every replica's view → prefix → serving replicas. `None` for a replica
/// that did not answer: left out, unless none answered (then `None`:
/// change nothing).
pub fn merge(views: &[Option<BTreeSet<Cidr>>]) -> Option<BTreeMap<Cidr, BTreeSet<usize>>> {
    if views.iter().all(Option::is_none) {
        return None;
    }
    let mut out: BTreeMap<Cidr, BTreeSet<usize>> = BTreeMap::new();
    for (i, v) in views.iter().enumerate() {
        for c in v.iter().flatten() {
            out.entry(*c).or_default().insert(i);
        }
    }
    Some(out)
}

/// [`merge`] with offline edges' prefixes: a prefix some replica serves
/// goes to the replicas serving it (never to one that lost the edge's
/// session while others keep theirs); a prefix no replica serves but some
/// hold for an offline edge goes to those, which refuse its connections
/// at once.
pub fn merge_views(
    views: &[Option<crate::agent::RouteView>],
) -> Option<BTreeMap<Cidr, BTreeSet<usize>>> {
    let live: Vec<Option<BTreeSet<Cidr>>> = views
        .iter()
        .map(|v| v.as_ref().map(|v| v.live.clone()))
        .collect();
    let mut out = merge(&live)?;
    for (i, v) in views.iter().enumerate() {
        for c in v.iter().flat_map(|v| v.offline.iter()) {
            if !live.iter().flatten().any(|l| l.contains(c)) {
                out.entry(*c).or_default().insert(i);
            }
        }
    }
    Some(out)
}

async fn ip(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    Ok(relay_transport::capture::command("ip", args, stdin).await?)
}

async fn installed(proto: u8, table: u32) -> anyhow::Result<Installed> {
    let routes = crate::agent::show_table(table, proto).await?;
    let nexthops = ip(&["nexthop", "show"], None).await?;
    Ok(parse_installed(&routes, &nexthops))
}

/// The device the kernel reaches `via` through (`ip route get`).
async fn device_of(via: IpAddr) -> Option<String> {
    let out = ip(&["route", "get", &via.to_string()], None).await.ok()?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|p| p[0] == "dev")
        .map(|p| p[1].to_string())
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    /// `ip -batch` lines run.
    changes: usize,
    /// Prefixes now routed through a group.
    routes: usize,
    /// Wanted prefixes left unrouted: none of the replicas serving them
    /// has a nexthop (no route toward its VIA address).
    unroutable: usize,
}

async fn apply(
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[IpAddr],
    proto: u8,
    table: u32,
) -> anyhow::Result<Applied> {
    let have = installed(proto, table).await?;
    let mut with_dev = Vec::new();
    for (i, v) in vias.iter().enumerate() {
        let dev = match have.nexthops.contains(&(NEXTHOP_BASE + i as u32)) {
            true => None,
            false => device_of(*v).await,
        };
        with_dev.push((*v, dev));
    }
    // A member whose nexthop could not be made is left out of groups.
    let made: BTreeSet<usize> = with_dev
        .iter()
        .enumerate()
        .filter(|(i, (_, d))| d.is_some() || have.nexthops.contains(&(NEXTHOP_BASE + *i as u32)))
        .map(|(i, _)| i)
        .collect();
    let routed: BTreeMap<Cidr, BTreeSet<usize>> = want
        .iter()
        .map(|(c, m)| {
            (
                *c,
                m.intersection(&made).copied().collect::<BTreeSet<usize>>(),
            )
        })
        .filter(|(_, m)| !m.is_empty())
        .collect();
    let batch = plan(&have, &routed, &with_dev)
        .replace("{proto}", &proto.to_string())
        .replace("{table}", &table.to_string());
    let changes = batch.lines().count();
    if changes > 0 {
        ip(&["-force", "-batch", "-"], Some(&batch)).await?;
    }
    Ok(Applied {
        changes,
        routes: routed.len(),
        unroutable: want.len() - routed.len(),
    })
}

/// One poll's installation, as the single-relay agent's: the prefixes
/// that hold none of `keep` (this node's addresses, the replicas' VIA
/// addresses: [`crate::agent::refuse_prefixes`]) into our table, then,
/// only once that worked, the rule consulting it (every poll, so one
/// someone removed comes back; not while there is no route) and, once,
/// an older agent's leftovers in `main`
/// ([`crate::agent::remove_from_main`]): never while our routes are not
/// in place, as edge traffic would then fall back to the default route.
async fn install(
    want: &BTreeMap<Cidr, BTreeSet<usize>>,
    vias: &[IpAddr],
    cfg: &MultipathConfig,
    main_checked: &mut bool,
) -> anyhow::Result<Applied> {
    let done = apply(want, vias, cfg.proto, cfg.table.table).await?;
    if done.routes > 0 && cfg.table.ensure_rule().await? {
        info!(
            table = cfg.table.table,
            pref = cfg.table.pref,
            "routing rule added"
        );
    }
    if !*main_checked {
        let n = crate::agent::remove_from_main(cfg.proto).await?;
        if n > 0 {
            info!(
                removed = n,
                "removed routes an older agent left in the main table"
            );
        }
        *main_checked = true;
    }
    Ok(done)
}

/// Polls in a row a replica may answer busy (503 "admin API overloaded":
/// alive, its admin API's request budget full) with its last table kept
/// in the groups; at this many it is left out, as one that does not
/// answer. The same count as readiness's ([`NOT_READY_AFTER`]): a busy
/// replica's table is at most this many intervals old, where an answering
/// one's is one interval old.
pub const BUSY_POLLS: u64 = NOT_READY_AFTER;

/// One replica as the agent's loop polls it.
#[derive(Debug, Default)]
struct ReplicaPoll {
    /// Its connection and last table (see [`RoutesPoll`]).
    poll: RoutesPoll,
    /// Polls in a row it answered busy.
    busy: u64,
    /// Its table went into the groups at the last poll (read then, or
    /// kept through a busy answer).
    in_groups: bool,
    /// Left out since it last put a table in (for the log lines).
    failing: bool,
}

impl ReplicaPoll {
    /// What this poll's `answer` puts in the groups for this replica
    /// (`None`: left out): the table read; the last one while it answers
    /// busy, fewer than [`BUSY_POLLS`] polls in a row after a poll that
    /// put one in; nothing for a replica that does not answer, or answers
    /// anything else. Logs when that changes.
    fn view(&mut self, admin: SocketAddr, answer: anyhow::Result<RouteView>) -> Option<RouteView> {
        let view = match answer {
            Ok(v) => {
                self.busy = 0;
                Some(v)
            }
            Err(e) if e.downcast_ref::<Busy>().is_some() => {
                self.busy += 1;
                if self.in_groups && self.busy < BUSY_POLLS {
                    if self.busy == 1 {
                        info!(%admin, "replica busy (503, its admin API overloaded); keeping its last routes");
                    }
                    self.poll.last().cloned()
                } else {
                    if !self.failing {
                        warn!(%admin, polls = self.busy, "replica busy poll after poll (or with no earlier routes to keep); routing around it");
                    }
                    None
                }
            }
            Err(e) => {
                if !self.failing {
                    warn!(%admin, error = %format!("{e:#}"), "replica does not answer; routing around it");
                }
                self.busy = 0;
                None
            }
        };
        if view.is_some() && self.failing {
            info!(%admin, "replica answers again");
        }
        self.failing = view.is_none();
        self.in_groups = view.is_some();
        view
    }
}

/// Runs until `stop`, then removes every route, group and nexthop it made.
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
    let mut polled: Vec<ReplicaPoll> = cfg
        .replicas
        .iter()
        .map(|_| ReplicaPoll::default())
        .collect();
    // Whether `main` still needs an older agent's leftovers removed.
    let mut main_checked = false;
    loop {
        let mut views = Vec::new();
        let mut last_error = None;
        for (r, p) in cfg.replicas.iter().zip(&mut polled) {
            let one = AgentConfig {
                admin: r.admin,
                token: cfg.token.clone(),
                tls: r.tls.clone(),
                interval: cfg.interval,
                proto: cfg.proto,
            };
            let answer = p.poll.poll(&one).await.map(|a| a.view);
            let error = answer.as_ref().err().map(|e| format!("{}: {e:#}", r.admin));
            let view = p.view(r.admin, answer);
            if view.is_none() {
                last_error = error.or(last_error);
            }
            views.push(view);
        }
        // None answered: change nothing (as the single-relay agent keeps
        // its routes while the relay is away).
        match merge_views(&views) {
            None => status.failed(
                PollFailure::RelayUnreachable,
                &format!(
                    "no replica answers (last: {})",
                    last_error.unwrap_or_default()
                ),
            ),
            Some(want) => match crate::agent::own_addrs() {
                Err(e) => {
                    warn!(error = %e, "reading this node's addresses failed");
                    status.failed(PollFailure::InstallFailed, &e);
                }
                Ok(mut keep) => {
                    keep.extend(&vias);
                    let prefixes: BTreeSet<Cidr> = want.keys().copied().collect();
                    let ok = refusals.filter(&prefixes, &keep, &status);
                    let want: BTreeMap<Cidr, BTreeSet<usize>> =
                        want.into_iter().filter(|(c, _)| ok.contains(c)).collect();
                    match install(&want, &vias, &cfg, &mut main_checked).await {
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
            },
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
    let mut ok = apply(&BTreeMap::new(), &[], cfg.proto, cfg.table.table)
        .await
        .map(|_| ());
    if ok.is_ok() {
        // Those made only: one never made (no route toward its VIA) would
        // fail the batch.
        ok = match installed(cfg.proto, cfg.table.table).await {
            Ok(have) if have.nexthops.is_empty() => Ok(()),
            Ok(have) => {
                let del: String = have
                    .nexthops
                    .iter()
                    .map(|id| format!("nexthop del id {id}\n"))
                    .collect();
                ip(&["-force", "-batch", "-"], Some(&del)).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
    }
    if ok.is_ok() {
        ok = cfg.table.remove_rule().await.map(|_| ());
    }
    match ok {
        Ok(()) => info!("route agent stopped; its routes, nexthops and rule removed"),
        Err(e) => warn!(error = %e, "removing routes on exit failed"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn a_lost_replica_changes_groups_in_place_and_a_lost_prefix_goes() {
        let vias: Vec<(IpAddr, Option<String>)> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|v| (v.parse().unwrap(), Some("lan0".to_string())))
            .collect();
        let all = |cs: &[&str]| Some(cs.iter().map(|s| c(s)).collect::<BTreeSet<Cidr>>());
        let want = merge(&[
            all(&["10.244.7.0/24", "10.244.8.0/24"]),
            all(&["10.244.7.0/24", "10.244.8.0/24"]),
            all(&["10.244.7.0/24"]),
        ])
        .unwrap();
        let first = plan(&Installed::default(), &want, &vias);
        assert!(first.contains(&format!(
            "nexthop replace id {} via 10.0.0.3 dev lan0",
            NEXTHOP_BASE + 2
        )));
        assert!(first.contains(&format!(
            "nexthop replace id {GROUP_BASE} group {}/{}/{} type resilient",
            NEXTHOP_BASE,
            NEXTHOP_BASE + 1,
            NEXTHOP_BASE + 2
        )));
        assert!(first.contains(&format!(
            "route replace 10.244.8.0/24 nhid {} proto {{proto}} table {{table}}",
            GROUP_BASE + 1
        )));
        // As the kernel then shows it.
        let routes = format!(
            "10.244.7.0/24 nhid {g0} proto 250 \n\tnexthop via 10.0.0.1 dev lan0 weight 1 \n10.244.8.0/24 nhid {g1} proto 250 \n",
            g0 = GROUP_BASE,
            g1 = GROUP_BASE + 1
        );
        let nhs = format!(
            "id {a} via 10.0.0.1 dev lan0 scope link \nid {b} via 10.0.0.2 dev lan0 scope link \nid {cc} via 10.0.0.3 dev lan0 scope link \nid {g0} group {a}/{b}/{cc} type resilient buckets 64 idle_timer 10 unbalanced_timer 0 unbalanced_time 0 \nid {g1} group {a}/{b} type resilient buckets 64 idle_timer 10 unbalanced_timer 0 unbalanced_time 0 \nid 7 via 192.0.2.1 dev eth0 scope link \n",
            a = NEXTHOP_BASE,
            b = NEXTHOP_BASE + 1,
            cc = NEXTHOP_BASE + 2,
            g0 = GROUP_BASE,
            g1 = GROUP_BASE + 1
        );
        let have = parse_installed(&routes, &nhs);
        assert_eq!(
            have.nexthops.len(),
            3,
            "someone else's nexthop 7 is not ours"
        );
        assert_eq!(plan(&have, &want, &vias), "", "nothing to do when in step");
        // Replica 0 stops answering and replica 1 loses edge 2's session:
        // groups change in place (same ids), routes stay.
        let want = merge(&[
            None,
            all(&["10.244.7.0/24"]),
            all(&["10.244.7.0/24", "10.244.8.0/24"]),
        ])
        .unwrap();
        let p = plan(&have, &want, &vias);
        assert_eq!(
            p,
            format!(
                "nexthop replace id {g0} group {b}/{cc} type resilient buckets 64 idle_timer 10\nnexthop replace id {g1} group {cc} type resilient buckets 64 idle_timer 10\n",
                g0 = GROUP_BASE,
                g1 = GROUP_BASE + 1,
                b = NEXTHOP_BASE + 1,
                cc = NEXTHOP_BASE + 2
            )
        );
        // Nobody answers: change nothing. Edge 2 gone everywhere: its route
        // and group go.
        assert!(merge(&[None, None, None]).is_none());
        let want = merge(&[all(&["10.244.7.0/24"]), None, None]).unwrap();
        let p = plan(&have, &want, &vias);
        assert!(
            p.contains("route del 10.244.8.0/24 proto {proto} table {table}"),
            "{p}"
        );
        assert!(
            p.ends_with(&format!("nexthop del id {}\n", GROUP_BASE + 1)),
            "{p}"
        );
    }

    /// An offline edge's prefix goes to the replicas that hold it only
    /// while no replica serves it: a replica that lost the edge's session
    /// while the others keep theirs gets none of its flows.
    #[test]
    fn offline_prefixes_go_where_held_only_while_nobody_serves_them() {
        use crate::agent::RouteView;
        let view = |live: &[&str], offline: &[&str]| {
            Some(RouteView {
                live: live.iter().map(|s| c(s)).collect(),
                offline: offline.iter().map(|s| c(s)).collect(),
            })
        };
        let e2 = "10.244.8.0/24";
        // Replica 0 lost edge 2's session; 1 and 2 serve it.
        let want = merge_views(&[view(&[], &[e2]), view(&[e2], &[]), view(&[e2], &[])]).unwrap();
        assert_eq!(want[&c(e2)], BTreeSet::from([1, 2]));
        // Edge 2 offline everywhere (one replica restarted and holds
        // nothing): routed to those that refuse it.
        let want = merge_views(&[view(&[], &[e2]), view(&[], &[]), view(&[], &[e2])]).unwrap();
        assert_eq!(want[&c(e2)], BTreeSet::from([0, 2]));
        // An older relay lists live routes only.
        let want = merge_views(&[view(&[], &[]), None, view(&[], &[e2])]).unwrap();
        assert_eq!(want[&c(e2)], BTreeSet::from([2]));
        assert!(merge_views(&[None, None]).is_none());
    }

    /// The agent for real, in a network namespace of the test's own
    /// (never the host's routes, rules or nexthops): the test binary runs
    /// itself again under `unshare -n`. Its replicas' admin APIs are fakes
    /// answering a fixed route table.
    pub(crate) mod netns {
        use std::process::Command;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;

        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;

        use super::*;
        use crate::agent::RouteTable;

        /// Set for the run in the namespace, to the outer run's network
        /// namespace (`/proc/self/ns/net`'s link, `net:[4026531840]`).
        const INSIDE: &str = "RELAY_SERVER_TEST_IN_NETNS";

        /// The network namespace of process `pid` (`self`, `1`), as its
        /// `/proc/PID/ns/net` link names it.
        fn netns_id(pid: &str) -> Option<String> {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            Some(link.to_string_lossy().into_owned())
        }

        /// Whether this run is the one in a namespace of its own: `outer`
        /// is [`INSIDE`]'s value (`None`: unset, the outer run), `own`
        /// this process's namespace, `init` pid 1's when readable. An
        /// error when [`INSIDE`] is set but does not name another
        /// namespace than this one (set in the environment by hand, or
        /// left over), or this is pid 1's: then nothing may be touched.
        pub(crate) fn netns_guard(
            outer: Option<&str>,
            own: Option<&str>,
            init: Option<&str>,
        ) -> Result<bool, String> {
            let Some(outer) = outer else {
                return Ok(false);
            };
            let named = |s: &str| s.starts_with("net:[") && s.ends_with(']');
            match own {
                _ if !named(outer) => Err(format!(
                    "{INSIDE}={outer:?} names no network namespace; refusing to set up routes here"
                )),
                None => Err("cannot read /proc/self/ns/net; refusing to set up routes here".into()),
                Some(own) if own == outer => Err(format!(
                    "{INSIDE} is set, but this is that same network namespace ({own}); refusing to set up routes here"
                )),
                Some(own) if init == Some(own) => Err(format!(
                    "{INSIDE} is set, but this is pid 1's network namespace ({own}); refusing to set up routes here"
                )),
                Some(_) => Ok(true),
            }
        }

        /// `true` in the namespace (run the test's body); `false` when
        /// the run there of test `name` (as libtest lists it) passed, or
        /// when namespaces are not available (not root; a failure under
        /// `REQUIRE_LAB=1` or `CI=true`). The namespace is set up by
        /// `relay_transport::test_netns::set_up`: `lo` up and `up0`,
        /// 192.0.2.1/24, holding the default route via 192.0.2.254. The
        /// run in the namespace panics before changing anything unless
        /// its namespace differs from the outer run's ([`netns_guard`]).
        fn in_netns(name: &str) -> bool {
            let outer = std::env::var_os(INSIDE).map(|v| v.to_string_lossy().into_owned());
            let inside = netns_guard(
                outer.as_deref(),
                netns_id("self").as_deref(),
                netns_id("1").as_deref(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            if inside {
                relay_transport::test_netns::set_up();
                return true;
            }
            let can = Command::new("unshare")
                .args(["-n", "true"])
                .status()
                .is_ok_and(|s| s.success());
            if !can {
                relay_transport::test_netns::skip(
                    "multipath namespace tests need root (unshare -n)",
                );
                return false;
            }
            let exe = std::env::current_exe().expect("test binary");
            let out = Command::new("unshare")
                .arg("-n")
                .arg(exe)
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(INSIDE, netns_id("self").expect("/proc/self/ns/net"))
                .output()
                .expect("unshare");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{name} in a namespace:\n{text}");
            assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
            false
        }

        /// A namespace test: runs `body` on a current-thread runtime in
        /// the run [`in_netns`] starts in a namespace of its own, which it
        /// selects by the calling test's name (libtest names each test's
        /// thread after it); the outer run only checks that it passed.
        /// `body` is never polled in the outer run.
        pub(crate) fn netns_test(body: impl std::future::Future<Output = ()>) {
            let thread = std::thread::current();
            let name = thread
                .name()
                .filter(|n| *n != "main")
                .expect("netns_test runs on a test's own thread, named after it");
            if in_netns(name) {
                rt().block_on(body);
            }
        }

        /// `ip ARGS` in this namespace; its output.
        pub(crate) use relay_transport::test_netns::ip as sh;

        /// A replica's admin API answering `GET /v1/routes` with `routes`
        /// (changeable), until the task is aborted.
        pub(crate) async fn fake_replica(routes: Arc<Mutex<Vec<&'static str>>>) -> SocketAddr {
            fake_replica_while(routes, Arc::new(AtomicBool::new(true))).await
        }

        /// [`fake_replica`] answering only while `up` holds; 503 otherwise
        /// (the agent's poll fails as with a relay away).
        pub(crate) async fn fake_replica_while(
            routes: Arc<Mutex<Vec<&'static str>>>,
            up: Arc<AtomicBool>,
        ) -> SocketAddr {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = l.accept().await else {
                        return;
                    };
                    let rows: Vec<String> = routes
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|c| format!("{{\"cidr\":\"{c}\"}}"))
                        .collect();
                    let answer = match up.load(Ordering::SeqCst) {
                        true => format!(
                            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{}]",
                            rows.join(",")
                        ),
                        false => "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n"
                            .to_string(),
                    };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(answer.as_bytes()).await;
                    });
                }
            });
            addr
        }

        /// `route_agent_polls_total{result="RESULT"}` in `status`.
        pub(crate) fn polls(status: &AgentStatus, result: &str) -> u64 {
            let key = format!("route_agent_polls_total{{result=\"{result}\"}} ");
            status
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(key.as_str())?.parse().ok())
                .unwrap_or(0)
        }

        /// An address nothing listens on.
        async fn dead_addr() -> SocketAddr {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        }

        fn config(replicas: &[(SocketAddr, &str)]) -> MultipathConfig {
            MultipathConfig {
                replicas: replicas
                    .iter()
                    .map(|(admin, via)| ReplicaTarget {
                        admin: *admin,
                        via: via.parse().unwrap(),
                        tls: None,
                    })
                    .collect(),
                token: None,
                interval: Duration::from_millis(50),
                proto: 250,
                table: RouteTable::default(),
            }
        }

        /// Waits (10 s at most) until `f` holds.
        pub(crate) async fn until(what: &str, mut f: impl FnMut() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !f() {
                assert!(tokio::time::Instant::now() < deadline, "never: {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        pub(crate) fn rule_listed() -> bool {
            RouteTable::default().rule_listed(&sh(&["-4", "rule", "show"]))
        }

        pub(crate) fn table() -> String {
            sh(&["-4", "route", "show", "table", "7250"])
        }

        fn rt() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        }

        /// The status the single-relay agent serves, from the multipath
        /// agent's polls; a killed run's rule and routes kept while no
        /// replica answers, except a route holding this node's address,
        /// removed at start; such a prefix refused and counted.
        #[test]
        fn the_status_follows_the_replicas_and_a_prefix_holding_this_node_is_refused() {
            netns_test(async {
                // What a killed run left: its rule, its nexthop and groups,
                // a route to an edge and one holding this node's address
                // (192.0.2.1).
                sh(&["-4", "rule", "add", "pref", "7250", "lookup", "7250"]);
                let (nh, g) = (NEXTHOP_BASE.to_string(), GROUP_BASE.to_string());
                let g2 = (GROUP_BASE + 1).to_string();
                sh(&[
                    "nexthop",
                    "add",
                    "id",
                    &nh,
                    "via",
                    "192.0.2.2",
                    "dev",
                    "up0",
                ]);
                for g in [&g, &g2] {
                    sh(&[
                        "nexthop",
                        "add",
                        "id",
                        g,
                        "group",
                        &nh,
                        "type",
                        "resilient",
                        "buckets",
                        "64",
                        "idle_timer",
                        "10",
                    ]);
                }
                for (prefix, g) in [("10.244.9.0/24", &g), ("192.0.0.0/16", &g2)] {
                    sh(&[
                        "route", "add", prefix, "nhid", g, "proto", "250", "table", "7250",
                    ]);
                }
                let routes = Arc::new(Mutex::new(vec![]));
                let up = Arc::new(AtomicBool::new(false));
                let live = fake_replica_while(routes.clone(), up.clone()).await;
                let dead = dead_addr().await;
                let cfg = config(&[(live, "192.0.2.2"), (dead, "192.0.2.3")]);
                let status = Arc::<AgentStatus>::default();
                let stop = CancellationToken::new();
                let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
                until("two polls with no replica answering", || {
                    polls(&status, "relay_unreachable") >= 2
                })
                .await;
                assert!(
                    rule_listed(),
                    "a previous run's rule went:\n{}",
                    sh(&["rule"])
                );
                let t = table();
                assert!(t.contains("10.244.9.0/24 nhid"), "{t}");
                assert!(!t.contains("192.0.0.0/16"), "{t}");
                // Where this node's traffic for that edge goes meanwhile.
                let get = sh(&["-4", "route", "get", "10.244.9.5"]);
                assert!(get.contains("via 192.0.2.2 dev up0"), "{get}");
                // This node's subnet among the edges' prefixes: refused.
                *routes.lock().unwrap() = vec!["10.244.7.0/24", "192.0.0.0/16", "10.9.9.9/32"];
                up.store(true, Ordering::SeqCst);
                until("two routes", || {
                    status
                        .readiness()
                        .is_ok_and(|l| l.starts_with("ready: 2 routes"))
                })
                .await;
                let t = table();
                assert!(
                    t.contains("10.244.7.0/24 nhid") && t.contains("10.9.9.9 nhid"),
                    "{t}"
                );
                assert!(
                    !t.contains("192.0.0.0/16") && !t.contains("10.244.9.0/24"),
                    "{t}"
                );
                assert!(rule_listed());
                let m = status.render();
                assert!(m.contains("\nroute_agent_prefixes_refused 1\n"), "{m}");
                assert!(m.contains("\nroute_agent_routes_installed 2\n"), "{m}");
                assert!(m.contains("\nroute_agent_ready 1\n"), "{m}");
                stop.cancel();
                agent.await.expect("agent");
                assert_eq!(table(), "");
                assert!(!rule_listed());
                assert_eq!(sh(&["nexthop", "show"]), "");
            });
        }

        /// The run meant for a namespace of its own refuses to set up
        /// anything unless [`INSIDE`] names a namespace other than its own.
        #[test]
        fn the_namespace_setup_runs_only_in_a_namespace_of_its_own() {
            let (outer, own) = ("net:[4026531840]", "net:[4026532001]");
            assert_eq!(netns_guard(None, Some(own), Some(outer)), Ok(false));
            assert_eq!(netns_guard(Some(outer), Some(own), Some(outer)), Ok(true));
            assert_eq!(netns_guard(Some(outer), Some(own), None), Ok(true));
            for (var, own, init) in [
                // Set by hand (the marker older tests used) or left over.
                ("1", Some(own), Some(outer)),
                ("", Some(own), Some(outer)),
                // The outer run's own namespace, or pid 1's.
                (outer, Some(outer), Some(outer)),
                ("net:[4026532002]", Some(outer), Some(outer)),
                // Unreadable.
                (outer, None, None),
            ] {
                assert!(
                    netns_guard(Some(var), own, init).is_err(),
                    "{var:?} {own:?} {init:?}"
                );
            }
            // For real, in a throwaway namespace: the variable naming the
            // namespace the run is in. It must fail before its setup
            // (which would otherwise pass in a fresh namespace).
            if !Command::new("unshare")
                .args(["-n", "true"])
                .status()
                .is_ok_and(|s| s.success())
            {
                eprintln!("SKIPPED: the namespace guard's run needs root (unshare -n)");
                return;
            }
            let exe = std::env::current_exe().expect("test binary");
            let name =
                "multipath::tests::netns::no_replica_answering_is_not_ready_and_keeps_the_routes";
            let out = Command::new("unshare")
                .args(["-n", "sh", "-c"])
                .arg(format!(
                    "export {INSIDE}=$(readlink /proc/self/ns/net); exec \"$0\" --exact {name} --nocapture --test-threads=1"
                ))
                .arg(exe)
                .output()
                .expect("unshare");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{text}");
            assert!(
                text.contains("is set, but this is that same network namespace"),
                "{text}"
            );
        }

        /// No replica answering fails the poll as the relay's absence
        /// does, keeping the routes.
        #[test]
        fn no_replica_answering_is_not_ready_and_keeps_the_routes() {
            netns_test(async {
                let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24"]));
                let dead = dead_addr().await;
                let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let live = l.local_addr().expect("addr");
                drop(l);
                // Serves, then goes (same port).
                let (stop_fake, fake) = {
                    let routes = routes.clone();
                    let stop = CancellationToken::new();
                    let s = stop.clone();
                    let l = TcpListener::bind(live).await.expect("rebind");
                    (
                        stop,
                        tokio::spawn(async move {
                            loop {
                                tokio::select! {
                                    _ = s.cancelled() => return,
                                    a = l.accept() => {
                                        let Ok((mut c, _)) = a else { return };
                                        let body = format!(
                                            "[{{\"cidr\":\"{}\"}}]",
                                            routes.lock().unwrap()[0]
                                        );
                                        let mut buf = [0u8; 4096];
                                        let _ = c.read(&mut buf).await;
                                        let _ = c.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes()).await;
                                    }
                                }
                            }
                        }),
                    )
                };
                let cfg = config(&[(live, "192.0.2.2"), (dead, "192.0.2.3")]);
                let status = Arc::<AgentStatus>::default();
                let stop = CancellationToken::new();
                let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
                until("ready", || {
                    status
                        .readiness()
                        .is_ok_and(|l| l.starts_with("ready: 1 routes"))
                })
                .await;
                stop_fake.cancel();
                fake.await.unwrap();
                until("not ready", || status.readiness().is_err()).await;
                let why = status.readiness().unwrap_err();
                assert!(
                    why.contains("last failure: relay_unreachable: no replica answers"),
                    "{why}"
                );
                assert!(table().contains("10.244.7.0/24 nhid"), "{}", table());
                stop.cancel();
                agent.await.expect("agent");
            });
        }

        /// A replica's admin API listing `routes`, until `busy` is set;
        /// then answering the relay's "overloaded" 503, each after taking
        /// a permit of `gate` (so a test can hold one back), and counting
        /// them in `busy_answers` (before the permit).
        async fn fake_busy_replica(
            routes: &'static [&'static str],
            busy: Arc<AtomicBool>,
            gate: Arc<tokio::sync::Semaphore>,
            busy_answers: Arc<std::sync::atomic::AtomicU64>,
        ) -> SocketAddr {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let (busy, gate, n) = (busy.clone(), gate.clone(), busy_answers.clone());
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        let answer = if busy.load(Ordering::SeqCst) {
                            n.fetch_add(1, Ordering::SeqCst);
                            gate.acquire().await.expect("gate").forget();
                            format!(
                                "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
                                crate::admin::OVERLOADED.len(),
                                crate::admin::OVERLOADED
                            )
                        } else {
                            let rows: Vec<String> = routes
                                .iter()
                                .map(|c| format!("{{\"cidr\":\"{c}\"}}"))
                                .collect();
                            format!(
                                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{}]",
                                rows.join(",")
                            )
                        };
                        let _ = s.write_all(answer.as_bytes()).await;
                    });
                }
            });
            addr
        }

        /// A replica answering 503 "overloaded" is alive: its last table
        /// stays in the groups for [`BUSY_POLLS`] - 1 busy polls in a
        /// row, and it is left out at the next one (as one that does not
        /// answer); once it answers again it is back.
        #[test]
        fn a_busy_replica_keeps_its_routes_for_a_bound() {
            netns_test(async {
                use std::sync::atomic::AtomicU64;
                let a = fake_replica(Arc::new(Mutex::new(vec!["10.244.7.0/24"]))).await;
                let (busy, answers) = (
                    Arc::new(AtomicBool::new(false)),
                    Arc::new(AtomicU64::new(0)),
                );
                // Every busy answer but the last one within the bound.
                let gate = Arc::new(tokio::sync::Semaphore::new(BUSY_POLLS as usize - 1));
                let b = fake_busy_replica(
                    &["10.244.7.0/24"],
                    busy.clone(),
                    gate.clone(),
                    answers.clone(),
                )
                .await;
                let cfg = config(&[(a, "192.0.2.2"), (b, "192.0.2.3")]);
                let status = Arc::<AgentStatus>::default();
                let stop = CancellationToken::new();
                let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
                let group = || sh(&["nexthop", "show"]);
                let both = format!(
                    "id {GROUP_BASE} group {}/{} ",
                    NEXTHOP_BASE,
                    NEXTHOP_BASE + 1
                );
                let only_a = format!("id {GROUP_BASE} group {} ", NEXTHOP_BASE);
                until("both replicas in the group", || group().contains(&both)).await;
                busy.store(true, Ordering::SeqCst);
                // The last busy answer within the bound is held back: the
                // polls before it (and their installs) are done.
                until("the bound's last busy poll", || {
                    answers.load(Ordering::SeqCst) == BUSY_POLLS
                })
                .await;
                let g = group();
                assert!(g.contains(&both), "a busy replica was left out: {g}");
                assert!(status.readiness().is_ok());
                // The bound passed: left out.
                gate.add_permits(1000);
                until("replica b left out", || group().contains(&only_a)).await;
                // Answering again: back in.
                busy.store(false, Ordering::SeqCst);
                until("both again", || group().contains(&both)).await;
                stop.cancel();
                agent.await.expect("agent");
            });
        }

        /// An older agent's route in `main` stays while installing ours
        /// fails (it is all that routes the prefix then), and goes once
        /// ours are in place.
        #[test]
        fn main_keeps_an_older_agents_routes_until_ours_are_installed() {
            netns_test(async {
                sh(&[
                    "route",
                    "add",
                    "10.244.7.0/24",
                    "via",
                    "192.0.2.2",
                    "proto",
                    "250",
                ]);
                let routes = Arc::new(Mutex::new(vec!["10.244.7.0/24"]));
                let live = fake_replica(routes).await;
                // Behind the default gateway, not on a link: the kernel
                // refuses the nexthop ("invalid gateway").
                let cfg = config(&[(live, "203.0.113.5")]);
                let status = Arc::<AgentStatus>::default();
                let stop = CancellationToken::new();
                let agent = tokio::spawn(run_with_status(cfg, stop.clone(), status.clone()));
                until("two failed polls", || {
                    status
                        .render()
                        .contains("route_agent_polls_total{result=\"install_failed\"} 2\n")
                })
                .await;
                let main = sh(&["-4", "route", "show", "proto", "250"]);
                assert!(main.contains("10.244.7.0/24 via 192.0.2.2"), "{main}");
                assert!(!rule_listed());
                // The replica's node now on a link: installed, rule added,
                // `main`'s leftover gone.
                sh(&["route", "add", "203.0.113.0/24", "dev", "up0"]);
                until("ready", || {
                    status
                        .readiness()
                        .is_ok_and(|l| l.starts_with("ready: 1 routes"))
                })
                .await;
                assert!(rule_listed());
                until("main cleared", || {
                    sh(&["-4", "route", "show", "proto", "250"]).is_empty()
                })
                .await;
                stop.cancel();
                agent.await.expect("agent");
            });
        }
    }
}
