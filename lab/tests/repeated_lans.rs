//! Repeated site LANs in the network-namespace lab: both edge sites use
//! `192.168.1.0/24`, both edge hosts are `192.168.1.10` and both NATs
//! `192.168.1.1` on their LAN side, as shops and towers really are
//! numbered; only the NATs' WAN addresses differ. The relay runs in
//! in-cluster mode against the apiserver stand-in on the apiserver host
//! (relay-kube-standin, not a real kube-apiserver), whose Nodes edge1 and
//! edge2 both carry InternalIP 192.168.1.10.
//!
//! What must hold: both sessions up and the shared address reported
//! ambiguous; pods of both sites reachable from the cloud and from each
//! other; each node reachable by name through CONNECT (`edge1:10250` on
//! edge1's host, `edge2:10250` on edge2's), and so each node's
//! host-network Service endpoint on the shared address (in-cluster mode:
//! the EndpointSlice names the node); each site's own LAN reached
//! locally, never through the tunnel, even with a cloud range that
//! contains the LAN among the tunnel routes; and the shared address itself
//! delivered to neither site (a fast failure, never the wrong host).
//!
//! The same again with the static `[nodes]` table instead of the cluster
//! API (both entries naming 192.168.1.10), where the relay used to lock the
//! second site out.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use relay_lab::cluster::{Cluster, LabService};
use relay_lab::netns::{self, KubeProxyMode, LabOptions, NetnsLab, Proto, Role};
use relay_lab::scenario::{
    captured_prefixes, connect_from, edge_config_in, edge_metric, fails_fast, http_from, lab_pki,
    relay_config_in, sa, services, sessions, start_edge, start_relay, within, Table, EDGE_STATUS,
    HTTP,
};
use relay_protocol::Cidr;

/// A cloud range that contains the sites' LAN range: a cloud VPC in
/// 192.168.0.0/16 is common, and listing it among the tunnel routes sends
/// it to every edge, whose own LAN lies inside it.
const CLOUD_VPC: &str = "192.168.0.0/16";

/// Each node's `streams_total` on the relay.
fn streams(lab: &NetnsLab) -> Result<BTreeMap<String, u64>> {
    Ok(sessions(lab)?
        .into_iter()
        .map(|r| (r.node, r.streams_total))
        .collect())
}

/// Where the relay learns who may claim what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claims {
    /// In-cluster mode: the stand-in's Nodes, both with InternalIP
    /// 192.168.1.10.
    Nodes,
    /// The static `[nodes]` table, naming 192.168.1.10 for both edges
    /// (ambiguity is computed from the table, as from Nodes).
    Table,
}

#[test]
fn two_sites_with_one_lan_range_both_work() -> Result<()> {
    run(Claims::Nodes, "lab-repeated-lans.txt")
}

/// The same world without cluster API access: the issue's "locked out in
/// static mode too" case.
#[test]
fn two_sites_with_one_lan_range_static_table() -> Result<()> {
    run(Claims::Table, "lab-repeated-lans-static.txt")
}

fn run(claims: Claims, report: &str) -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED repeated site LANs ({report}): {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t0 = Instant::now();
    let lab = NetnsLab::with_options(LabOptions {
        repeated_lans: true,
        ..LabOptions::default()
    })?;
    let build = lab.build_time();
    let shared = lab.edge_host_ip(1);
    anyhow::ensure!(
        shared == lab.edge_host_ip(2) && lab.nat_lan_ip(1) == lab.nat_lan_ip(2),
        "the lab did not repeat the LAN"
    );
    let shared_host = Cidr::host(shared.into());
    let lan = lab.edge_lan_cidr(1);
    let gw = lab.nat_lan_ip(1);
    let pki = lab_pki()?;

    // Every host names itself; the NATs' LAN side is each site's LAN
    // neighbour, on the same address at both sites.
    let mut svcs = Vec::new();
    for (role, name) in [
        (Role::Cpod2, "cpod2"),
        (Role::Epod1, "epod1"),
        (Role::Epod2, "epod2"),
        (Role::Edge1, "edge1"),
        (Role::Edge2, "edge2"),
        (Role::Nat1, "nat1"),
        (Role::Nat2, "nat2"),
    ] {
        svcs.push(services(&lab, role, name)?);
    }

    let mut rcfg = relay_config_in(&lab, &pki)?;
    let cluster = match claims {
        // In-cluster mode: the Nodes (both with InternalIP 192.168.1.10)
        // decide claims; the static table is not used.
        Claims::Nodes => {
            let cluster = Cluster::start(&lab)?;
            rcfg.nodes.clear();
            rcfg.kubernetes = Some(cluster.relay_settings());
            Some(cluster)
        }
        Claims::Table => None,
    };
    rcfg.tunnel_routes.push(CLOUD_VPC.parse()?);
    let t_up = Instant::now();
    let relay = start_relay(&lab, rcfg)?;
    // Status endpoints on: each edge must say which tunnel route its LAN
    // shadows.
    let with_status = |site: u8| -> Result<_> {
        let mut cfg = edge_config_in(&lab, &pki, site)?;
        cfg.status_listen = Some(EDGE_STATUS);
        Ok(cfg)
    };
    let edge1 = start_edge(&lab, 1, with_status(1)?)?;
    let edge2 = start_edge(&lab, 2, with_status(2)?)?;
    let up = t_up.elapsed();

    let mut m = Table::new(&["case", "path", "result"]);
    m.note(
        &[
            "both sessions up, shared address ambiguous",
            "admin: /v1/sessions",
        ],
        (|| {
            let rows = sessions(&lab)?;
            let mut seen = Vec::new();
            for site in netns::SITES {
                let node = format!("edge{site}");
                let row = rows
                    .iter()
                    .find(|r| r.node == node)
                    .with_context(|| format!("no session for {node}"))?;
                // Static: shared, so ambiguous. In Kubernetes mode the
                // address is inside a tunnel route (the cloud's
                // 192.168.0.0/16), so the address vetting refuses it first.
                let reported = if cluster.is_some() {
                    &row.refused
                } else {
                    &row.ambiguous
                };
                anyhow::ensure!(
                    *reported == vec![shared_host],
                    "{node}: ambiguous {:?}, refused {:?}, expected [{shared_host}]",
                    row.ambiguous,
                    row.refused
                );
                anyhow::ensure!(
                    row.routes == vec![netns::edge_pod_cidr(site)],
                    "{node}: routes {:?}, expected its pod CIDR only",
                    row.routes
                );
                seen.push(format!("{node} {}", row.transport));
            }
            Ok(format!(
                "{}, both ambiguous [{shared_host}], up in {up:?}",
                seen.join(", ")
            ))
        })(),
    );
    // Capture is installed asynchronously (the relay's for new sessions,
    // each edge's from route updates), and the Node condition is written
    // behind the handshake: wait for every side.
    let edge_set = |role| lab.exec(role, &["nft", "list", "set", "inet", "edge_relay", "dst4"]);
    within(Duration::from_secs(10), || {
        let c = captured_prefixes(&lab)?;
        Ok(c.contains("10.244.7.0/24")
            && c.contains("10.244.8.0/24")
            && edge_set(Role::Edge1)?.contains("10.244.8.0/24")
            && edge_set(Role::Edge2)?.contains("10.244.7.0/24"))
    })
    .context("capture of both pod CIDRs not installed everywhere within 10 s")?;
    m.note(
        &[
            "relay never captures the shared address",
            "relay: nft set dst4",
        ],
        captured_prefixes(&lab).and_then(|c| {
            anyhow::ensure!(!c.contains(&shared.to_string()), "{shared} captured: {c}");
            Ok("pod CIDRs only".into())
        }),
    );
    if let Some(cluster) = &cluster {
        m.note(
            &[
                "Node condition names the shared address",
                "stand-in: edge1/edge2 EdgeTunnelReady",
            ],
            within(Duration::from_secs(10), || {
                Ok(["edge1", "edge2"].iter().all(|n| {
                    cluster.condition(n).is_some_and(|(s, _, msg)| {
                        s == "True" && msg.contains(&shared_host.to_string())
                    })
                }))
            })
            .map(|d| format!("True, message lists {shared_host}, after {d:?}")),
        );
    }

    // cloud → edge pods: the pod CIDRs are unique, so both are routed.
    for (site, name) in [(1, "epod1"), (2, "epod2")] {
        let ip = netns::edge_pod_ip(site);
        m.check(
            &["cloud pod → edge pod", &format!("cpod2 → {ip}")],
            name,
            http_from(&lab, Role::Cpod2, sa(ip, HTTP)),
        );
    }
    // By name: each Node through its own session, to its own host.
    let mut by_name = streams(&lab)?;
    for (authority, host) in [
        ("edge1:10250", "edge1-kubelet"),
        ("edge2:10250", "edge2-kubelet"),
    ] {
        m.check(
            &[
                "apiserver → kubelet by name",
                &format!("CONNECT {authority}"),
            ],
            host,
            connect_from(&lab, Role::Apiserver, authority),
        );
    }
    m.note(
        &[
            "each by-name stream on its own session",
            "admin: streams_total",
        ],
        streams(&lab).and_then(|after| {
            for n in ["edge1", "edge2"] {
                let (b, a) = (by_name.remove(n).unwrap_or(0), after[n]);
                anyhow::ensure!(a == b + 1, "{n}: streams_total {b} → {a}");
            }
            Ok("edge1 +1, edge2 +1".into())
        }),
    );
    // A host-network Service endpoint on the shared address (its
    // EndpointSlice names the node): reached through that node's session,
    // although the address itself is routed for neither site.
    if let Some(cluster) = &cluster {
        let host_svc = |name, last, node| {
            LabService::on_lab_ports(
                "default",
                name,
                sa(Ipv4Addr::new(10, 96, 0, last), HTTP),
                Proto::Tcp,
                &[(shared, node)],
            )
        };
        cluster.set_services(
            &lab,
            KubeProxyMode::Iptables,
            &[
                host_svc("web-edge1-host", 22, "edge1"),
                host_svc("web-edge2-host", 32, "edge2"),
            ],
        )?;
        for (authority, host) in [
            ("web-edge1-host.default.svc:80", "edge1"),
            ("web-edge2-host.default.svc:80", "edge2"),
        ] {
            m.check(
                &[
                    "Service endpoint on the shared address, by its node",
                    &format!("CONNECT {authority}"),
                ],
                host,
                within(Duration::from_secs(5), || {
                    Ok(connect_from(&lab, Role::Apiserver, authority).is_ok())
                })
                .and_then(|_| connect_from(&lab, Role::Apiserver, authority)),
            );
        }
    }
    // The shared address by address: routed for neither site. It must
    // fail (the cloud's upstream gateway answers "unreachable"; CONNECT
    // is refused or cannot dial), and never reach either edge's host.
    m.note(
        &[
            "ambiguous address from a cloud pod",
            &format!("cpod2 → {shared}:80"),
        ],
        fails_fast(&lab, Role::Cpod2, sa(shared, HTTP), Duration::from_secs(3))
            .map(|d| format!("failed after {d:?}, reached neither edge")),
    );
    m.note(
        &[
            "ambiguous address through CONNECT",
            &format!("CONNECT {shared}:10250"),
        ],
        match connect_from(&lab, Role::Apiserver, "192.168.1.10:10250") {
            Ok(body) => Err(anyhow::anyhow!("reached {body}")),
            Err(e) => Ok(format!("refused ({e:#})")),
        },
    );

    // edge → cloud, and edge → the other edge's pod, from both sites.
    for (from, name) in [(Role::Epod1, "epod1"), (Role::Epod2, "epod2")] {
        m.check(
            &["edge pod → cloud pod", &format!("{name} → 10.244.2.2")],
            "cpod2",
            http_from(&lab, from, sa(netns::CPOD2_IP, HTTP)),
        );
    }
    m.check(
        &["edge pod → other edge's pod", "epod1 → 10.244.8.5"],
        "epod2",
        http_from(&lab, Role::Epod1, sa(netns::edge_pod_ip(2), HTTP)),
    );
    m.check(
        &["edge pod → other edge's pod", "epod2 → 10.244.7.5"],
        "epod1",
        http_from(&lab, Role::Epod2, sa(netns::edge_pod_ip(1), HTTP)),
    );

    // Each site's LAN stays on the site: the neighbour at 192.168.1.1 is
    // nat1 for site 1 and nat2 for site 2, although the edges receive a
    // cloud range containing the LAN as a tunnel route. Through the
    // tunnel, it would be refused or dialled from the cloud; a stream
    // count that moves would show it too.
    let before = streams(&lab)?;
    for (from, site) in [
        (Role::Epod1, 1),
        (Role::Edge1, 1),
        (Role::Epod2, 2),
        (Role::Edge2, 2),
    ] {
        m.check(
            &[
                "edge → own LAN neighbour (local)",
                &format!("{from} → {gw}:80"),
            ],
            &format!("nat{site}"),
            http_from(&lab, from, sa(gw, HTTP)),
        );
    }
    m.note(
        &["no stream for LAN traffic", "admin: streams_total"],
        streams(&lab).and_then(|after| {
            anyhow::ensure!(after == before, "{before:?} → {after:?}");
            Ok("unchanged".into())
        }),
    );
    m.note(
        &["edge capture exempts its LAN", "edge1: nft set skip4"],
        lab.exec(
            Role::Edge1,
            &["nft", "list", "set", "inet", "edge_relay", "skip4"],
        )
        .and_then(|s| {
            anyhow::ensure!(s.contains(&lan.to_string()), "{lan} not exempt: {s}");
            Ok(format!("{lan} exempt"))
        }),
    );
    // The operator's view of the same: each edge's metrics name the cloud
    // range its LAN shadows (capture plans it once the session is up;
    // give the metric a moment after the first pass).
    let series = format!("edge_capture_lan_overlap{{route=\"{CLOUD_VPC}\"}}");
    for site in netns::SITES {
        m.note(
            &[
                "edge reports the shadowed route",
                &format!("edge{site}: /metrics"),
            ],
            within(Duration::from_secs(5), || {
                Ok(edge_metric(&lab, site, &series).unwrap_or(0.0) == 1.0
                    && edge_metric(&lab, site, "edge_capture_lan_overlaps")? >= 1.0)
            })
            .with_context(|| format!("{series} not 1 on edge{site}"))
            .map(|t| format!("{CLOUD_VPC} listed after {t:?}")),
        );
    }
    // And the relay's (Control::LanOverlaps): each site's row names it.
    let vpc: Cidr = CLOUD_VPC.parse()?;
    m.note(
        &[
            "relay lists each site's shadowed route",
            "admin: lan_overlaps",
        ],
        within(Duration::from_secs(5), || {
            let rows = sessions(&lab)?;
            Ok(rows.len() == 2 && rows.iter().all(|r| r.lan_overlaps.contains(&vpc)))
        })
        .with_context(|| {
            format!(
                "rows: {:?}",
                sessions(&lab).map(|rows| rows
                    .into_iter()
                    .map(|r| (r.node, r.lan_overlaps))
                    .collect::<Vec<_>>())
            )
        })
        .map(|t| format!("{CLOUD_VPC} on both rows after {t:?}")),
    );

    drop(edge1);
    drop(edge2);
    relay.stop()?;
    drop(svcs);
    let total = t0.elapsed();
    let footer = format!(
        "{claims:?}: {}/{} passed; lab built in {build:?}, sessions up in {up:?}, total {total:?}",
        m.passed(),
        m.rows.len()
    );
    let out = m.publish(report, &footer);
    if !m.failed().is_empty() {
        bail!("failed: {:?}\n{out}", m.failed());
    }
    anyhow::ensure!(
        total < Duration::from_secs(40),
        "took {total:?} (bound 40 s)"
    );
    Ok(())
}
