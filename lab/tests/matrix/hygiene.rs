//! Route hygiene and the control cell, the matrix's last phase: as each
//! part leaves (edge2, then the relay, then the route agent) what it
//! installed must go with it (an offline edge's prefixes stay captured
//! and routed to the relay, which refuses them at once), and with the relay stopped cloud → edge must
//! fail as it does with plain Flannel, which shows the other cells'
//! answers came through the tunnel.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    admin, connect_from, connect_refused, fails_fast, sa, Running, Table, HTTP,
};

use crate::observe::{agent_routes, capture_set};

/// An edge leaves: its routes go offline at the relay within seconds
/// (still captured), connections to its pods fail fast, the route agent
/// keeps routing them to the relay and the edge keeps nothing of its own.
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
    // An offline edge's prefix stays routed to the relay node, which
    // refuses its connections at once (by the default route they would
    // hang where the upstream drops them silently: lab/tests/offline_edge.rs).
    m.note(
        &[
            "edge leaves → route agent keeps routing its prefix to the relay",
            "cloud2: ip route proto 250",
        ],
        agent_routes(lab).and_then(|r| {
            anyhow::ensure!(
                r.contains("10.244.8.0/24") && r.contains("10.244.7.0/24"),
                "{r}"
            );
            Ok("10.244.8.0/24 still via the relay node".to_string())
        }),
    );
    // Capture carries TCP and UDP only: the relay node's own ping of the
    // offline edge's pod is not answered by the relay node itself,
    // although its capture route delivers that prefix locally (`local
    // default`): a dead pod must not look alive to a ping.
    m.note(
        &[
            "edge leaves → the relay node's ping of its pod is not answered",
            "relay: ping -c 1 10.244.8.5",
        ],
        match lab.exec(
            Role::Relay,
            &["ping", "-n", "-c", "1", "-W", "1", "10.244.8.5"],
        ) {
            Ok(out) => Err(anyhow::anyhow!("answered: {out}")),
            Err(_) => Ok("no answer".to_string()),
        },
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

/// Stops edge2 and polls the relay every 50 ms for at most 10 s until
/// edge2's prefix is offline (no session serves it: `GET /v1/routes`
/// lists it no more, `?offline=1` does), then checks that it is still
/// in the relay's capture set and policy rules.
fn relay_forgets_edge2(lab: &NetnsLab, m: &mut Table, edge2: Running) -> Result<()> {
    let t = Instant::now();
    edge2.stop()?;
    let mut offline = None;
    while t.elapsed() < Duration::from_secs(10) {
        let live = admin(lab, "/v1/routes")?;
        let all = admin(lab, "/v1/routes?offline=1")?;
        if !live.contains("10.244.8.0/24") && all.contains("\"offline\":true") {
            offline = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let kept = || -> Result<String> {
        let d = offline.context("edge2's route not offline after 10s")?;
        std::thread::sleep(Duration::from_millis(500));
        let set = capture_set(lab, Role::Relay)?;
        let rules = lab.exec(Role::Relay, &["ip", "rule"])?;
        anyhow::ensure!(
            set.contains("10.244.8.0/24") && rules.contains("10.244.8.0/24"),
            "not captured: {set} {rules}"
        );
        Ok(format!("offline after {d:?}, still captured 0.5 s later"))
    };
    m.note(
        &[
            "edge leaves → its routes stay captured, offline",
            "edge2 stops; relay admin routes, nft set + ip rules",
        ],
        kept(),
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
            "cloud2: ip route proto 250",
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
