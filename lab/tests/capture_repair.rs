//! Capture removed behind the product's back, in the network-namespace
//! lab: on a real node, Debian's `nftables.service` flushes the whole
//! ruleset when it restarts, and systemd-networkd deletes routing-policy
//! rules it did not make. Here the test does both on edge1 and on the
//! relay node (`nft flush ruleset`, the bypass rule deleted, the capture
//! address removed from `lo`) while the sessions stay up.
//!
//! What must hold: within 15 s (the check runs every 10 s) capture is
//! back on both nodes, and edge1's pod reaches a cloud pod again and a
//! cloud pod on the relay node reaches edge1's pod. Without the check
//! nothing put it back until the process restarted.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 20 s.

use std::time::Duration;

use anyhow::Result;
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config_in, edge_metric, http_from, metric, netns_start, relay_config_in, sa, services,
    start_edge, start_relay, within, Table, EDGE_STATUS, HTTP,
};
use relay_transport::capture_config::{CaptureConfig, DEFAULT_REDIRECT_ADDRESS};

/// Removes capture's table, bypass rule and address in `node`, as an
/// nftables restart and networkd would; says what it ran.
fn wipe(lab: &NetnsLab, node: Role) -> Result<String> {
    let d = CaptureConfig::default();
    let bypass = (d.rule_pref - 1).to_string();
    let here = format!("{DEFAULT_REDIRECT_ADDRESS}/32");
    lab.exec(node, &["nft", "flush", "ruleset"])?;
    // Every rule at the bypass priority (the own-socket one, skips).
    for _ in 0..16 {
        if lab
            .exec(node, &["ip", "-4", "rule", "del", "pref", &bypass])
            .is_err()
        {
            break;
        }
    }
    lab.exec(node, &["ip", "-4", "addr", "del", &here, "dev", "lo"])?;
    let left = lab.exec(node, &["nft", "list", "ruleset"])?;
    anyhow::ensure!(left.trim().is_empty(), "ruleset left: {left}");
    Ok("ruleset flushed, bypass rules and capture address removed".into())
}

#[test]
fn capture_removed_by_something_else_comes_back() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("capture repair")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    let relay = start_relay(&lab, relay_config_in(&lab, &pki)?)?;
    let mut ecfg = edge_config_in(&lab, &pki, 1)?;
    ecfg.status_listen = Some(EDGE_STATUS);
    let _edge = start_edge(&lab, 1, ecfg)?;
    let (epod1, cpod2) = (sa(netns::edge_pod_ip(1), HTTP), sa(netns::CPOD2_IP, HTTP));
    let both = || {
        Ok(http_from(&lab, Role::Epod1, cpod2).is_ok()
            && http_from(&lab, Role::Cpod1, epod1).is_ok())
    };
    let mut m = Table::new(&["case", "path", "result"]);
    m.note(
        &["capture working", "epod1 → cpod2, cpod1 → epod1"],
        within(Duration::from_secs(15), both).map(|d| format!("after {d:?}")),
    );
    // Counted, so that something on a node fighting capture shows.
    let repairs = || -> Result<(f64, f64)> {
        Ok((
            metric(&lab, "relay_capture_repairs_total")?,
            edge_metric(&lab, 1, "edge_capture_repairs_total")?,
        ))
    };
    m.check(
        &["no repair counted before", "relay, edge1 /metrics"],
        "(0.0, 0.0)",
        repairs().map(|r| format!("{r:?}")),
    );
    for node in [Role::Edge1, Role::Relay] {
        m.note(&["capture removed", node.as_str()], wipe(&lab, node));
    }
    m.note(
        &["capture back on both nodes", "epod1 → cpod2, cpod1 → epod1"],
        within(Duration::from_secs(15), both).map(|d| format!("after {d:?}")),
    );
    // At least one each (a check landing between two of `wipe`'s steps
    // repairs twice).
    m.note(
        &["each repair counted", "relay, edge1 /metrics"],
        within(Duration::from_secs(5), || {
            let r = repairs()?;
            Ok(r.0 >= 1.0 && r.1 >= 1.0)
        })
        .and_then(|_| repairs())
        .map(|r| format!("{r:?}")),
    );
    m.check(
        &["edge pod → cloud pod", "epod1 → 10.244.2.2"],
        "cpod2",
        http_from(&lab, Role::Epod1, cpod2),
    );
    m.check(
        &["relay node's pod → edge pod", "cpod1 → 10.244.7.5"],
        "epod1",
        http_from(&lab, Role::Cpod1, epod1),
    );
    relay.stop()?;
    m.conclude("lab-capture-repair.txt", t0)
}
