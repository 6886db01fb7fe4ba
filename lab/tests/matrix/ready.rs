//! Between setup and the traffic cells: the route agent must have
//! installed cloud2's edge routes (a cell of its own) and capture must be
//! installed on every side, since both happen asynchronously and a
//! traffic cell run too early would fail for the wrong reason.

use std::time::Duration;

use anyhow::{Context, Result};
use relay_lab::netns::{NetnsLab, Role};
use relay_lab::scenario::{captured_prefixes, within, Table};

use crate::observe::{agent_routes, capture_set};

/// The route agent installs the edges' routes on cloud2 within 5 s.
pub(crate) fn agent_installs_routes(lab: &NetnsLab, m: &mut Table) {
    m.note(
        &[
            "route agent installs edge routes",
            "cloud2: ip route table 7250 proto 250",
        ],
        within(Duration::from_secs(5), || {
            let r = agent_routes(lab)?;
            Ok([
                "10.244.7.0/24",
                "10.244.8.0/24",
                "192.168.1.10",
                "192.168.2.10",
            ]
            .iter()
            .all(|p| r.contains(p)))
        })
        .map(|d| format!("4 routes via 10.0.0.1 after {d:?}")),
    );
}

/// Capture is installed asynchronously (the relay's for new sessions; the
/// edges' from route updates): waits up to 10 s until every side has it,
/// and gives up on the whole matrix otherwise.
pub(crate) fn wait_for_capture(lab: &NetnsLab) -> Result<()> {
    within(Duration::from_secs(10), || {
        let relay = captured_prefixes(lab)?;
        Ok(relay.contains("10.244.7.0/24")
            && relay.contains("10.244.8.0/24")
            && capture_set(lab, Role::Edge1)?.contains("10.244.8.0/24")
            && capture_set(lab, Role::Edge2)?.contains("10.244.7.0/24"))
    })
    .context("capture not installed everywhere within 10 s")?;
    Ok(())
}

/// With `MATRIX_DEBUG` set, prints the relay's and edge1's links, policy
/// rules, routes, nftables and the sysctls that decide whether captured
/// packets get through, for debugging a failing cell by hand.
pub(crate) fn debug_dump(lab: &NetnsLab) {
    if std::env::var("MATRIX_DEBUG").is_err() {
        return;
    }
    for (role, cmd) in [
        (Role::Relay, vec!["ip", "-br", "link"]),
        (Role::Relay, vec!["ip", "rule"]),
        (Role::Relay, vec!["ip", "route", "show", "table", "7100"]),
        (Role::Relay, vec!["nft", "list", "ruleset"]),
        (Role::Edge1, vec!["ip", "-br", "link"]),
        (Role::Edge1, vec!["ip", "rule"]),
        (Role::Edge1, vec!["nft", "list", "ruleset"]),
        (
            Role::Edge1,
            vec![
                "sysctl",
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.cni0.rp_filter",
                "net.bridge.bridge-nf-call-iptables",
            ],
        ),
    ] {
        eprintln!(
            "== {role:?}: {}\n{}",
            cmd.join(" "),
            lab.exec(role, &cmd).unwrap_or_else(|e| format!("{e:#}"))
        );
    }
}
