//! The route agent (`relay-server route-agent`) in the network-namespace
//! lab: run in-process on a cloud node, and read back what it installed
//! there. In resilient multipath mode ([`start`]) with a list of replicas
//! (one resilient nexthop group per edge prefix), shared by the scale-out
//! tests (`tests/netns_replicas.rs`, `tests/netns_replicas_hosts.rs`); with
//! one relay ([`start_toward`]) and either next hop, `--via` or
//! `--via-pod-network` (`tests/cloud_fabric.rs`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::netns::{NetnsLab, Role};
use crate::scenario::{launch, Running, ADMIN_TOKEN};

/// Route protocol number the lab's agent marks its routes with.
pub const PROTO: u8 = 250;
/// Routing table the lab's agent installs its routes in (the default).
pub const TABLE: u32 = relay_server::agent::DEFAULT_TABLE;
/// Preference of the agent's rule `lookup` [`TABLE`] (the default).
pub const RULE_PREF: u32 = relay_server::agent::DEFAULT_RULE_PREF;

/// Runs the route agent on `node`, polling every `interval` the replicas
/// given as (admin API address, next hop) pairs; stopping the returned
/// task makes it remove everything it installed.
pub fn start(
    lab: &NetnsLab,
    node: Role,
    replicas: &[(SocketAddr, Ipv4Addr)],
    interval: Duration,
) -> Result<Running> {
    let cfg = relay_server::multipath::MultipathConfig {
        replicas: replicas
            .iter()
            .map(|(admin, via)| relay_server::multipath::ReplicaTarget {
                admin: *admin,
                via: (*via).into(),
                tls: None,
            })
            .collect(),
        token: Some(relay_server::Secret::new(ADMIN_TOKEN)),
        interval,
        proto: PROTO,
        table: relay_server::agent::RouteTable::default(),
        on_exit: relay_server::agent::OnExit::Remove,
    };
    launch(lab, node, "route agent", move |ready, stop| async move {
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(relay_server::multipath::run(cfg, cancel.clone()));
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        cancel.cancel();
        task.await?;
        Ok(())
    })
}

/// Runs the single-relay route agent on `node`, polling the relay's admin
/// API at `admin` every `interval` and routing the edge prefixes `toward`
/// the relay node; stopping the returned task makes it remove its routes.
pub fn start_toward(
    lab: &NetnsLab,
    node: Role,
    admin: SocketAddr,
    toward: relay_server::agent::Toward,
    interval: Duration,
) -> Result<Running> {
    let cfg = relay_server::agent::AgentConfig {
        admin,
        token: Some(relay_server::Secret::new(ADMIN_TOKEN)),
        // Plain HTTP on the lab's private LAN (the lab's relay allows it).
        tls: None,
        interval,
        proto: PROTO,
    };
    launch(lab, node, "route agent", move |ready, stop| async move {
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(relay_server::agent::run(cfg, toward, cancel.clone()));
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        cancel.cancel();
        task.await?;
        Ok(())
    })
}

/// `node`'s IPv4 routes of protocol `proto` in routing table `table`, as
/// `ip -4 route show table <table> proto <proto>` prints them, one per
/// line; empty while the table has never held a route (the kernel then
/// refuses the dump).
pub fn routes_of(lab: &NetnsLab, node: Role, table: &str, proto: &str) -> Result<String> {
    let out = lab.exec(
        node,
        &["ip", "-4", "route", "show", "table", table, "proto", proto],
    );
    match out {
        Err(e) if format!("{e:#}").contains("table does not exist") => Ok(String::new()),
        r => r,
    }
}

/// The agent's routes on `node` (table 7250, proto 250).
pub fn routes(lab: &NetnsLab, node: Role) -> Result<String> {
    routes_of(lab, node, &TABLE.to_string(), &PROTO.to_string())
}

/// Routes of the agent's protocol in `node`'s **main** table (where an
/// agent before its own table put them; none expected now).
pub fn routes_in_main(lab: &NetnsLab, node: Role) -> Result<String> {
    routes_of(lab, node, "main", &PROTO.to_string())
}

/// How many of `node`'s policy rules are the agent's (`RULE_PREF: from
/// all lookup TABLE`): 1 while it runs, 0 once it has exited.
pub fn rules(lab: &NetnsLab, node: Role) -> Result<usize> {
    let listing = lab.exec(node, &["ip", "-4", "rule", "show"])?;
    let ours = format!("{RULE_PREF}:\tfrom all lookup {TABLE}");
    Ok(listing.lines().filter(|l| l.trim_end() == ours).count())
}

/// The agent's routes on `node`: prefix → (group id, member next hops);
/// fails if a group is not resilient.
pub fn groups(lab: &NetnsLab, node: Role) -> Result<BTreeMap<String, (String, Vec<String>)>> {
    let routes = routes(lab, node)?;
    let nhs = lab.exec(node, &["ip", "nexthop", "show"])?;
    let via_of: BTreeMap<&str, &str> = nhs
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 3 && w[0] == "id" && w[2] == "via").then(|| (w[1], w[3]))
        })
        .collect();
    let mut out = BTreeMap::new();
    for l in routes
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
    {
        let w: Vec<&str> = l.split_whitespace().collect();
        let Some(g) = w.windows(2).find(|p| p[0] == "nhid").map(|p| p[1]) else {
            continue;
        };
        let line = nhs
            .lines()
            .find(|l| l.starts_with(&format!("id {g} group ")))
            .with_context(|| format!("no group {g}: {nhs}"))?;
        ensure!(line.contains("type resilient"), "not resilient: {line}");
        let members = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .split('/')
            .map(|id| via_of.get(id).copied().unwrap_or(id).to_string())
            .collect();
        out.insert(w[0].to_string(), (g.to_string(), members));
    }
    Ok(out)
}

/// Whether every prefix of `prefixes` is routed on `node` through a group
/// of exactly the next hops `want` (in any order).
pub fn all_through(
    lab: &NetnsLab,
    node: Role,
    prefixes: &[String],
    want: &[String],
) -> Result<bool> {
    let g = groups(lab, node)?;
    let mut want = want.to_vec();
    want.sort();
    Ok(prefixes.iter().all(|c| {
        g.get(c).is_some_and(|(_, m)| {
            let mut m = m.clone();
            m.sort();
            m == want
        })
    }))
}
