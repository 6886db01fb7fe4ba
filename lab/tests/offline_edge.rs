//! An edge goes offline behind an upstream that drops unroutable traffic
//! silently, as cloud VPC routers and carriers do
//! ([`LabOptions::silent_wan`]; the default lab's gateway answers ICMP
//! "network unreachable" at once, which hid this):
//! - after edge2 stops, a cloud pod's and edge1's pod's connections to
//!   edge2's pod fail fast (reset: with `hold_offline_routes` the relay
//!   keeps capturing an offline edge's prefixes, and edge1 keeps it in its
//!   tunnel routes), not after a connect timeout;
//! - a UDP sender that started while edge2 was offline is answered within
//!   2 s of edge2's return;
//! - so is one that started while the relay node did not capture edge2's
//!   prefix at all (a relay restarted while edge2 was offline does not
//!   know it): capture deletes the conntrack entries that went past it.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Bounded: about 20 s.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, LabOptions, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config_in, fails_fast, http_from, netns_start_with, relay_config_in, sa, services,
    session, start_edge, start_relay, udp_client, within, Running, Table, DNS, HTTP,
};

/// Starts edge2 while `sender` runs from `t0`; returns how long after
/// edge2 was connected its first answer came.
fn answered_after_return(
    lab: &NetnsLab,
    pki: &relay_transport::devcerts::DevPki,
    edge2: &mut Option<Running>,
) -> Result<Duration> {
    let epod2 = netns::edge_pod_ip(2);
    let t0 = Instant::now();
    let sender = udp_client(lab, Role::Cpod2, sa(epod2, DNS), Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(1500));
    *edge2 = Some(start_edge(lab, 2, edge_config_in(lab, pki, 2)?)?);
    let back = t0.elapsed();
    let samples = sender
        .join()
        .map_err(|_| anyhow::anyhow!("udp client panicked"))??;
    let before = samples
        .iter()
        .filter(|(at, who)| *at < back && who.is_some())
        .count();
    ensure!(before == 0, "{before} answers while edge2 was offline");
    let first = samples
        .iter()
        .find(|(_, who)| who.is_some())
        .map(|(at, _)| *at)
        .with_context(|| {
            format!(
                "no answer in {} queries ({:?} after edge2's return)",
                samples.len(),
                Duration::from_secs(6).saturating_sub(back)
            )
        })?;
    let after = first.saturating_sub(back);
    ensure!(
        after <= Duration::from_secs(2),
        "first answer {after:?} after edge2's return"
    );
    Ok(after)
}

/// Waits until the relay has no session of `node`, then 1 s more: what
/// follows (the relay's capture, edge1's routes: 100 ms batches) has
/// settled, so the cells see the steady state of an offline edge.
fn session_gone(lab: &NetnsLab, node: &str) -> Result<Duration> {
    let d = within(
        Duration::from_secs(10),
        || Ok(session(lab, node)?.is_none()),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    Ok(d)
}

/// The relay config with `hold_offline_routes` on: what this test is about
/// (off by default, an edge's routes go with its session).
fn holding(mut cfg: relay_server::RelayConfig) -> relay_server::RelayConfig {
    cfg.hold_offline_routes = true;
    cfg
}

#[test]
fn offline_edges_fail_fast_and_come_back() -> Result<()> {
    let options = LabOptions {
        silent_wan: true,
        ..LabOptions::default()
    };
    let Some((t0, lab, pki)) = netns_start_with("offline_edge", options)? else {
        return Ok(());
    };
    let _pods = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
    ];
    let mut relay = Some(start_relay(&lab, holding(relay_config_in(&lab, &pki)?))?);
    let _edge1 = start_edge(&lab, 1, edge_config_in(&lab, &pki, 1)?)?;
    let mut edge2 = Some(start_edge(&lab, 2, edge_config_in(&lab, &pki, 2)?)?);
    let epod2 = netns::edge_pod_ip(2);
    let mut m = Table::new(&["cell", "path", "result"]);
    // Both reach edge2's pod while it is up (this is the tunnel's doing:
    // the WAN carries none of it).
    for from in [Role::Cpod2, Role::Epod1] {
        let body = within(Duration::from_secs(5), || {
            Ok(http_from(&lab, from, sa(epod2, HTTP)).is_ok())
        });
        ensure!(body.is_ok(), "{from:?} → epod2 before the stop: {body:?}");
    }

    edge2.take().context("edge2")?.stop()?;
    session_gone(&lab, "edge2")?;
    m.note(
        &[
            "edge2 offline → cloud pod fails fast",
            "cpod2 → 10.244.8.5:80",
        ],
        fails_fast(&lab, Role::Cpod2, sa(epod2, HTTP), Duration::from_secs(2))
            .map(|d| format!("failed in {d:?}")),
    );
    m.note(
        &[
            "edge2 offline → edge1's pod fails fast",
            "epod1 → 10.244.8.5:80",
        ],
        fails_fast(&lab, Role::Epod1, sa(epod2, HTTP), Duration::from_secs(2))
            .map(|d| format!("failed in {d:?}")),
    );
    m.note(
        &[
            "UDP sender started while edge2 offline → answered on return",
            "cpod2 → 10.244.8.5:53 every 100 ms",
        ],
        answered_after_return(&lab, &pki, &mut edge2)
            .map(|d| format!("first answer {d:?} after edge2 was back")),
    );

    // A relay restarted while edge2 is offline does not know it: the
    // relay node does not capture its prefix, and the sender's packets
    // leave by the default route (dropped without a word).
    edge2.take().context("edge2")?.stop()?;
    session_gone(&lab, "edge2")?;
    relay.take().context("relay")?.stop()?;
    relay = Some(start_relay(&lab, holding(relay_config_in(&lab, &pki)?))?);
    let _ = &relay;
    m.note(
        &[
            "UDP sender started while edge2's prefix was not captured → answered on return",
            "relay restarted; cpod2 → 10.244.8.5:53 every 100 ms",
        ],
        answered_after_return(&lab, &pki, &mut edge2)
            .map(|d| format!("first answer {d:?} after edge2 was back")),
    );
    m.conclude("lab-offline-edge.txt", t0)
}
