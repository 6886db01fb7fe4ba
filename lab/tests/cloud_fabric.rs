//! The route agent on a cloud's network, in the network-namespace lab
//! (`LabOptions::cloud_overlay`): the cloud LAN delivers IPv4 only from
//! and to the hosts' own addresses (AWS's source/destination check; GCP's
//! and Azure's routing by destination), and the cloud nodes reach each
//! other's pods through a Flannel-style VXLAN overlay (`flannel.1`).
//!
//! What must hold, with the relay and both edges up and the route agent
//! on cloud2:
//! - the overlay itself works (cloud2's pod reaches the relay node's pod,
//!   an edge pod reaches cloud2's pod through the relay node);
//! - with `--via 10.0.0.1` (routes out of cloud2's LAN interface), cloud2's
//!   pod does **not** reach an edge pod over TCP or UDP, and the fabric's
//!   drop counters show why: the model is as strict as a cloud;
//! - with `--via-pod-network 10.244.1.0/24`, the agent copies cloud2's
//!   route to the relay node's pods (`via 10.244.1.0 dev flannel.1
//!   onlink`) for each edge prefix, and cloud2's pod reaches both edge
//!   pods over TCP and UDP;
//! - in either mode the routes are in the agent's own table (7250), behind
//!   exactly one rule `7250: from all lookup 7250`, and none is in `main`
//!   (`tests/route_agent_felix.rs` shows why, with a CNI pruning `main`);
//! - when the CNI rewrites that route (here to Calico's style, the relay
//!   node's LAN address as the gateway on the tunnel device), the agent's
//!   routes follow within a bound and traffic still flows; on exit the
//!   agent removes its routes and its rule.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: under 60 s (the two negative
//! cells wait out their timeouts, about 11 s together).

use std::time::Duration;

use anyhow::{Context, Result};
use relay_lab::netns::{self, LabOptions, NetnsLab, Role, VTEPS, VTEP_DEV};
use relay_lab::route_agent;
use relay_lab::scenario::{
    edge_config, http_from, netns_start_with, relay_config, sa, services, start_edge, start_relay,
    udp_from, wait_captured, within, Table, ADMIN_PORT, DNS, HTTP,
};
use relay_server::agent::{pod_network_probe, Toward};

/// How often the agent polls in this test.
const POLL: Duration = Duration::from_millis(200);

/// The test's time budget.
const BUDGET: Duration = Duration::from_secs(60);

/// Whether every edge pod CIDR is routed on cloud2 by the agent with a
/// line containing `how` (e.g. `via 10.0.0.1`).
fn routed(lab: &NetnsLab, how: &str) -> Result<bool> {
    let routes = route_agent::routes(lab, Role::Cloud2)?;
    Ok(netns::SITES.iter().all(|s| {
        let c = netns::edge_pod_cidr(*s).to_string();
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{c} ")) && l.contains(how))
    }))
}

/// That the agent's routes are in its table behind its one rule, none in
/// `main` (a table cell).
fn in_own_table(lab: &NetnsLab) -> Result<String> {
    // The rule follows the routes in the same poll.
    within(Duration::from_secs(2), || {
        Ok(route_agent::rules(lab, Role::Cloud2)? == 1)
    })
    .with_context(|| {
        format!(
            "{} rules `lookup 7250`, want 1",
            route_agent::rules(lab, Role::Cloud2).unwrap_or(0)
        )
    })?;
    match route_agent::routes_in_main(lab, Role::Cloud2)?.trim() {
        "" => Ok("1 rule, none in main".to_string()),
        main => anyhow::bail!("in main: {main}"),
    }
}

/// That the agent removed its routes and its rule on exit (a table cell).
fn all_removed(lab: &NetnsLab) -> Result<String> {
    let rules = route_agent::rules(lab, Role::Cloud2)?;
    anyhow::ensure!(rules == 0, "{rules} rules `lookup 7250` left behind");
    match route_agent::routes(lab, Role::Cloud2)?.trim() {
        "" => Ok("none left, no rule".to_string()),
        left => anyhow::bail!("left behind: {left}"),
    }
}

/// A cell that passes when `got` failed: traffic that must not arrive.
fn must_fail(m: &mut Table, lead: &[&str], got: Result<String>) {
    match got {
        Ok(who) => m.push(
            lead,
            format!("REACHED {who}: the fabric let it through"),
            false,
        ),
        Err(e) => m.push(lead, format!("ok (no answer: {e:#})"), true),
    }
}

#[test]
fn the_route_agent_on_a_cloud_fabric_needs_the_overlay() -> Result<()> {
    let options = LabOptions {
        cloud_overlay: true,
        ..LabOptions::default()
    };
    let Some((t0, lab, pki)) = netns_start_with("cloud fabric", options)? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Epod2, "epod2")?,
        services(&lab, Role::Cpod1, "cpod1")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    let relay = start_relay(&lab, relay_config(&pki)?)?;
    let _edges = [
        start_edge(&lab, 1, edge_config(&pki, 1)?)?,
        start_edge(&lab, 2, edge_config(&pki, 2)?)?,
    ];
    let admin = sa(netns::RELAY_LAN_IP, ADMIN_PORT);
    let (epod1, epod2) = (netns::edge_pod_ip(1), netns::edge_pod_ip(2));
    let mut m = Table::new(&["case", "path", "result"]);

    // The overlay carries pod traffic between cloud nodes, both ways
    // through the relay node.
    m.check(
        &[
            "overlay: cloud pod → relay node's pod",
            "cpod2 → 10.244.1.2",
        ],
        "cpod1",
        http_from(&lab, Role::Cpod2, sa(netns::CPOD1_IP, HTTP)),
    );
    m.check(
        &[
            "overlay: edge pod → cloud2's pod",
            "epod1 → relay → flannel.1 → cpod2",
        ],
        "cpod2",
        // edge1's capture of the cloud's ranges comes from the route list
        // it is sent, possibly after it reported itself connected.
        wait_captured(&lab, Role::Edge1, netns::CPOD2_IP, Duration::from_secs(10))
            .and_then(|_| http_from(&lab, Role::Epod1, sa(netns::CPOD2_IP, HTTP))),
    );

    // `--via`: routes out of lan0, which the fabric refuses to carry.
    let agent = route_agent::start_toward(
        &lab,
        Role::Cloud2,
        admin,
        Toward::Via(netns::RELAY_LAN_IP.into()),
        POLL,
    )?;
    let via = format!("via {} dev lan0", netns::RELAY_LAN_IP);
    m.note(
        &[
            "--via: routes installed",
            "cloud2: edge pod CIDRs via 10.0.0.1",
        ],
        within(Duration::from_secs(10), || routed(&lab, &via)).map(|d| format!("after {d:?}")),
    );
    m.note(
        &["--via: own table", "cloud2: table 7250, rule pref 7250"],
        in_own_table(&lab),
    );
    let drops = lab.fabric_drops()?;
    must_fail(
        &mut m,
        &[
            "--via: cloud pod → edge pod, TCP (must fail)",
            "cpod2 → epod1:80",
        ],
        http_from(&lab, Role::Cpod2, sa(epod1, HTTP)),
    );
    must_fail(
        &mut m,
        &[
            "--via: cloud pod → edge pod, UDP (must fail)",
            "cpod2 → epod2:53",
        ],
        udp_from(&lab, Role::Cpod2, sa(epod2, DNS)),
    );
    let dropped = lab.fabric_drops()? - drops;
    m.push(
        &[
            "--via: the fabric dropped them",
            "switch: src 10.244.2.2 from cloud2's port",
        ],
        format!(
            "{} ({dropped} frames dropped)",
            if dropped > 0 { "ok" } else { "NONE" }
        ),
        dropped > 0,
    );
    agent.stop()?;
    m.note(
        &["--via: routes removed on exit", "cloud2: proto 250, rule"],
        all_removed(&lab),
    );

    // `--via-pod-network`: the CNI's own route to the relay node's pods.
    let relay_vtep = VTEPS[0];
    let probe = pod_network_probe(netns::CPOD1_CIDR.parse()?);
    let agent =
        route_agent::start_toward(&lab, Role::Cloud2, admin, Toward::PodNetwork(probe), POLL)?;
    let overlay = format!("via {} dev {VTEP_DEV} onlink", relay_vtep.addr);
    m.note(
        &[
            "--via-pod-network: routes installed",
            "cloud2: edge pod CIDRs via 10.244.1.0 dev flannel.1 onlink",
        ],
        within(Duration::from_secs(10), || routed(&lab, &overlay)).map(|d| format!("after {d:?}")),
    );
    m.note(
        &[
            "--via-pod-network: own table",
            "cloud2: table 7250, rule pref 7250",
        ],
        in_own_table(&lab),
    );
    for (case, to, want, udp) in [
        (
            "--via-pod-network: cloud pod → edge pod, TCP",
            epod1,
            "epod1",
            false,
        ),
        (
            "--via-pod-network: cloud pod → edge pod, UDP",
            epod1,
            "epod1",
            true,
        ),
        (
            "--via-pod-network: cloud pod → other edge's pod, TCP",
            epod2,
            "epod2",
            false,
        ),
        (
            "--via-pod-network: cloud pod → other edge's pod, UDP",
            epod2,
            "epod2",
            true,
        ),
    ] {
        let path = format!("cpod2 → {to}");
        let got = match udp {
            false => http_from(&lab, Role::Cpod2, sa(to, HTTP)),
            true => udp_from(&lab, Role::Cpod2, sa(to, DNS))
                .map(|r| r.split(':').next().unwrap_or_default().to_string()),
        };
        m.check(&[case, &path], want, got);
    }

    // The CNI rewrites its route (Calico's style: the relay node's LAN
    // address as the gateway on the tunnel device, resolved to the relay
    // node's VTEP MAC); the agent's routes follow.
    let mac = relay_vtep
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let lan = netns::RELAY_LAN_IP.to_string();
    lab.exec(
        Role::Cloud2,
        &[
            "ip",
            "neigh",
            "add",
            &lan,
            "lladdr",
            &mac,
            "dev",
            VTEP_DEV,
            "nud",
            "permanent",
        ],
    )?;
    lab.exec(
        Role::Cloud2,
        &[
            "ip",
            "route",
            "replace",
            netns::CPOD1_CIDR,
            "via",
            &lan,
            "dev",
            VTEP_DEV,
            "onlink",
        ],
    )?;
    let moved = format!("via {lan} dev {VTEP_DEV} onlink");
    m.note(
        &[
            "--via-pod-network: the CNI's route changed",
            "cloud2: edge pod CIDRs now via 10.0.0.1 dev flannel.1 onlink",
        ],
        within(Duration::from_secs(5), || routed(&lab, &moved)).map(|d| format!("after {d:?}")),
    );
    m.check(
        &[
            "--via-pod-network: cloud pod → edge pod after the change",
            "cpod2 → epod2:80",
        ],
        "epod2",
        http_from(&lab, Role::Cpod2, sa(epod2, HTTP)),
    );
    agent.stop()?;
    m.note(
        &[
            "--via-pod-network: routes removed on exit",
            "cloud2: proto 250, rule",
        ],
        all_removed(&lab),
    );
    relay.stop()?;
    let took = t0.elapsed();
    m.push(
        &["time budget", "under 60 s"],
        format!("{} ({took:?})", if took < BUDGET { "ok" } else { "OVER" }),
        took < BUDGET,
    );
    m.conclude("lab-cloud-fabric.txt", t0)
}
