//! Route hygiene and the control cell, the matrix's last phase: as each
//! part leaves (edge2, then the relay, then the route agent) what it
//! installed must go with it, and with the relay stopped cloud → edge must
//! fail as it does with plain Flannel, which shows the other cells'
//! answers came through the tunnel.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    connect_from, connect_refused, fails_fast, http_from, sa, within, Running, Table, HTTP,
};

use crate::observe::{agent_routes, capture_set};
use crate::setup::{SVC_EDGE2, SVC_EDGE2_CLOUD};

/// An edge leaves: its routes go from the relay within seconds,
/// connections to its pods fail fast, the route agent withdraws them and
/// the edge keeps nothing of its own.
pub(crate) fn edge_leaves(lab: &NetnsLab, m: &mut Table, edge2: Running) -> Result<()> {
    relay_forgets_edge2(lab, m, edge2)?;
    let epod2 = netns::edge_pod_ip(2);
    m.note(
        &["edge leaves → its pods fail fast", "cpod2 → 10.244.8.5"],
        fails_fast(lab, Role::Cpod2, sa(epod2, HTTP), Duration::from_secs(2))
            .map(|d| format!("failed in {d:?}")),
    );
    // CONNECT too, though the relay now dials cloud targets itself: an
    // edge node's address is never one of them.
    m.note(
        &[
            "edge leaves → CONNECT to its pod fails fast",
            "apiserver → CONNECT 10.244.8.5:80",
        ],
        connect_refused(
            lab,
            Role::Apiserver,
            "10.244.8.5:80",
            Duration::from_secs(2),
            "edge node edge2",
        )
        .map(|d| format!("502 in {d:?}, naming edge2")),
    );
    // Its Node and endpoints stay Ready in the cluster API (its kubelet
    // may still reach the apiserver): the relay passes over them.
    m.note(
        &[
            "edge leaves → a Service on it and the cloud picks the cloud",
            "apiserver → CONNECT web-edge2-cloud.default.svc:80 × 12",
        ],
        (0..12)
            .map(|_| connect_from(lab, Role::Apiserver, "web-edge2-cloud.default.svc:80"))
            .collect::<Result<Vec<_>>>()
            .and_then(|bodies| {
                anyhow::ensure!(
                    bodies.iter().all(|b| b == "hello from cpod1"),
                    "answered by {bodies:?}"
                );
                Ok("12 of 12 answered by cpod1".to_string())
            }),
    );
    // The relay node's own clients: kube-proxy there still has edge2's
    // endpoint, so the relay must keep capturing the Service (and pass
    // over edge2's endpoint) rather than leave it to kube-proxy, which
    // would send some connections to edge2's pod by the default route.
    for (case, path, from) in [
        (
            "edge leaves → relay node pod → a Service on it and the cloud picks the cloud",
            "cpod1@relay → 10.96.0.33 × 12 ⇒ 10.244.1.2",
            Role::Cpod1,
        ),
        (
            "edge leaves → relay node host → a Service on it and the cloud picks the cloud",
            "relay (hostNetwork) → 10.96.0.33 × 12 ⇒ 10.244.1.2",
            Role::Relay,
        ),
    ] {
        m.note(&[case, path], twelve_answered_by_cpod1(lab, from));
    }
    m.note(
        &[
            "edge leaves → relay node host → a Service on it alone fails fast",
            "relay (hostNetwork) → 10.96.0.30",
        ],
        fails_fast(lab, Role::Relay, SVC_EDGE2, Duration::from_secs(2))
            .map(|d| format!("failed in {d:?}")),
    );
    m.note(
        &[
            "edge leaves → a Service on it alone fails fast",
            "apiserver → CONNECT web-edge2.default.svc:80",
        ],
        connect_refused(
            lab,
            Role::Apiserver,
            "web-edge2.default.svc:80",
            Duration::from_secs(2),
            "no live session (edge2)",
        )
        .map(|d| format!("502 in {d:?}, naming edge2")),
    );
    m.note(
        &[
            "edge leaves → route agent withdraws its routes",
            "cloud2: ip route table 7250 proto 250",
        ],
        within(Duration::from_secs(5), || {
            let r = agent_routes(lab)?;
            Ok(!r.contains("10.244.8.0/24") && r.contains("10.244.7.0/24"))
        })
        .map(|d| format!("10.244.8.0/24 gone after {:?} more", d)),
    );
    let edge2_left = lab.exec(Role::Edge2, &["nft", "list", "tables"])?;
    m.note(
        // (`capture.hold_after_exit` is off here, as by default; with it,
        // what stays is refusals only: lab/tests/service_moves.rs.)
        &["edge leaves → edge keeps nothing", "edge2: nft tables"],
        if edge2_left.contains("edge_relay") {
            Err(anyhow::anyhow!("edge_relay table left: {edge2_left}"))
        } else {
            Ok("no edge_relay table".into())
        },
    );
    Ok(())
}

/// 12 connections from `from` to `web-edge2-cloud`'s ClusterIP, each of
/// which must be answered by cpod1 (edge2 gone).
fn twelve_answered_by_cpod1(lab: &NetnsLab, from: Role) -> Result<String> {
    let mut bodies = Vec::new();
    for _ in 0..12 {
        bodies.push(http_from(lab, from, SVC_EDGE2_CLOUD).unwrap_or_else(|e| format!("{e:#}")));
    }
    let cpod1 = bodies
        .iter()
        .filter(|b| b.strip_prefix("hello from ").unwrap_or(b) == "cpod1")
        .count();
    anyhow::ensure!(cpod1 == 12, "{cpod1} of 12 answered by cpod1: {bodies:?}");
    Ok("12 of 12 answered by cpod1".to_string())
}

/// Stops edge2 and polls the relay every 50 ms for at most 10 s until
/// edge2's prefix is in neither its capture set nor capture's routes
/// (table 7100, where each captured prefix has a local route).
fn relay_forgets_edge2(lab: &NetnsLab, m: &mut Table, edge2: Running) -> Result<()> {
    // Present before (else its absence after would prove nothing).
    let table = || lab.exec(Role::Relay, &["ip", "-4", "route", "show", "table", "7100"]);
    let before = table()?;
    anyhow::ensure!(
        before.contains("10.244.8."),
        "edge2's prefix not in capture's routes while it is up:\n{before}"
    );
    let t = Instant::now();
    edge2.stop()?;
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(10) {
        let set = capture_set(lab, Role::Relay)?;
        if !set.contains("10.244.8.0/24") && !table()?.contains("10.244.8.") {
            gone = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    m.note(
        &[
            "edge leaves → its routes removed",
            "edge2 stops; relay nft set + table 7100",
        ],
        gone.map(|d| format!("gone after {d:?}"))
            .context("still installed after 10s"),
    );
    Ok(())
}

/// Control: with the relay stopped, cloud → edge pod fails, as it does
/// with plain Flannel and no tunnel.
pub(crate) fn relay_stopped(lab: &NetnsLab, m: &mut Table, relay: Running) -> Result<()> {
    relay.stop()?;
    let epod1 = netns::edge_pod_ip(1);
    m.note(
        &["control: relay stopped → unreachable", "cpod2 → 10.244.7.5"],
        fails_fast(lab, Role::Cpod2, sa(epod1, HTTP), Duration::from_secs(6))
            .map(|d| format!("failed in {d:?}")),
    );
    Ok(())
}

/// After the relay exits, nothing of its own remains on the relay node:
/// no nftables table, no policy rules (7099, 7100), an empty table 7100.
pub(crate) fn relay_left_nothing(lab: &NetnsLab, m: &mut Table) -> Result<()> {
    let tables = lab.exec(Role::Relay, &["nft", "list", "tables"])?;
    let rules = lab.exec(Role::Relay, &["ip", "rule"])?;
    let table = lab.exec(Role::Relay, &["ip", "route", "show", "table", "7100"])?;
    m.note(
        &[
            "relay exits → nothing of its own remains",
            "relay: nft tables, ip rules, table 7100",
        ],
        if tables.contains("edge_relay")
            || rules.contains("7100")
            || rules.contains("7099")
            || !table.trim().is_empty()
        {
            Err(anyhow::anyhow!("left behind:\n{tables}\n{rules}\n{table}"))
        } else {
            Ok("clean".into())
        },
    );
    Ok(())
}

/// The route agent exits: it removes every route it installed on cloud2.
pub(crate) fn agent_stops(lab: &NetnsLab, m: &mut Table, agent: Running) -> Result<()> {
    agent.stop()?;
    m.note(
        &[
            "route agent exits → its routes removed",
            "cloud2: ip route table 7250 proto 250",
        ],
        agent_routes(lab).and_then(|r| {
            if r.trim().is_empty() {
                Ok("none left".to_string())
            } else {
                Err(anyhow::anyhow!("left: {r}"))
            }
        }),
    );
    Ok(())
}
