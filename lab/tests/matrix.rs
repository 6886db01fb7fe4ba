//! The end-to-end matrix of the seed documents (FabEdge with SuperEdge test
//! tables), in the network-namespace lab: cloud → edge, edge → cloud and
//! edge → edge, from pods and from host-network processes, to pod IPs,
//! node addresses and ClusterIPs (kube-proxy's DNAT where it really runs:
//! in every node's root namespace, prerouting and output at -100), over TCP (an HTTP page naming the host that served it) and
//! UDP (a DNS-sized query and reply). Then the control cell (relay stopped →
//! cloud → edge pod fails, as with plain Flannel) and route hygiene.
//!
//! Everything is real: relay-server and edge-client libraries run with
//! capture on (nftables redirect + policy routing) inside their namespaces,
//! edges behind masquerading NATs that drop inbound connections. The relay
//! runs in-cluster mode against the apiserver stand-in on the apiserver
//! host (relay-kube-standin, not a real kube-apiserver): Nodes decide
//! claims, Services and EndpointSlices decide ClusterIP capture.
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1.
//!
//! `run_matrix` runs the phases in order; each lives by concern in
//! `tests/matrix/` (a subdirectory, so cargo does not take the modules
//! for test binaries of their own): `setup` (services, cluster, relay,
//! edges, route agent), `ready` (routes and capture in place), `tcp` and
//! `udp` (the positive cells), `service_fields` (`internalTrafficPolicy:
//! Local`, `sessionAffinity: ClientIP`), `relay_node_ports` (the relay
//! node's NodePorts asked for through the tunnel), `negative` (capture by
//! source), `fallback` (the UDP-blocked run's own cells), `hygiene`
//! (route hygiene and the control cell with the relay stopped) and
//! `observe` (what the cells read back from the lab).

use std::time::{Duration, Instant};

use anyhow::Result;
use relay_lab::netns::{self, KubeProxyMode, NetnsLab};
use relay_lab::scenario::{lab_pki, Table};

#[path = "matrix/fallback.rs"]
mod fallback;
#[path = "matrix/hygiene.rs"]
mod hygiene;
#[path = "matrix/negative.rs"]
mod negative;
#[path = "matrix/observe.rs"]
mod observe;
#[path = "matrix/ready.rs"]
mod ready;
#[path = "matrix/relay_node_ports.rs"]
mod relay_node_ports;
#[path = "matrix/service_fields.rs"]
mod service_fields;
#[path = "matrix/setup.rs"]
mod setup;
#[path = "matrix/tcp.rs"]
mod tcp;
#[path = "matrix/udp.rs"]
mod udp;

#[test]
fn seed_matrix_through_relay_installed_routes() -> Result<()> {
    run_matrix(None, KubeProxyMode::Iptables, "lab-matrix.txt")
}

/// The same matrix with kube-proxy in its nftables mode (GA since
/// Kubernetes 1.33): its NAT chains at the `dstnat` priority and its
/// filter chains in front of them, where capture must still come first.
#[test]
fn seed_matrix_with_kube_proxy_nftables() -> Result<()> {
    run_matrix(None, KubeProxyMode::Nftables, "lab-matrix-nftables.txt")
}

/// The same matrix with UDP blocked at edge1's NAT: edge1 must come up
/// over the TLS+TCP fallback and every cell must still pass; then UDP
/// comes back and edge1 must move to QUIC without its routes ever leaving
/// the relay.
#[test]
fn seed_matrix_with_udp_blocked_at_one_edge() -> Result<()> {
    run_matrix(
        Some(1),
        KubeProxyMode::Iptables,
        "lab-matrix-udp-blocked.txt",
    )
}

/// Builds the lab, runs every phase of the matrix in order into one table,
/// tears down and writes `target/{report}` (CI prints it); fails when any
/// cell failed. `udp_blocked_at` runs the UDP-blocked variant at that site;
/// `mode` is how kube-proxy programs every node.
fn run_matrix(udp_blocked_at: Option<u8>, mode: KubeProxyMode, report: &str) -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED the seed matrix ({report}): {skip}");
        return Ok(());
    }
    relay_lab::init();
    let t_build = Instant::now();
    let lab = NetnsLab::new()?;
    let build = t_build.elapsed();
    let pki = lab_pki()?;

    let svcs = setup::start_services(&lab)?;
    let cluster = setup::start_cluster(&lab, mode)?;
    setup::leave_cloud2_to_the_agent(&lab)?;
    let setup::Deployment {
        relay,
        edge1,
        edge2,
        up,
        relay_ping,
    } = setup::start_relay_and_edges(&lab, &pki, &cluster, udp_blocked_at)?;
    let agent = setup::start_agent(&lab)?;

    let mut m = Table::new(&["case", "path", "result"]);
    if udp_blocked_at.is_some() {
        fallback::came_up_over_tcp(&lab, &mut m, up);
    }
    ready::agent_installs_routes(&lab, &mut m);
    ready::wait_for_capture(&lab)?;
    ready::debug_dump(&lab);

    tcp::cloud_to_edge(&lab, &mut m);
    tcp::cloud_to_edge_services(&lab, &mut m);
    tcp::from_apiserver(&lab, &mut m);
    tcp::edge_to_cloud(&lab, &mut m);
    tcp::edge_to_edge(&lab, &mut m);
    tcp::edge_to_internet(&lab, &mut m);
    tcp::unlabelled_edge_node(&lab, &cluster, &mut m);
    tcp::same_edge_stays_local(&lab, &mut m);
    tcp::edge_node_ports(&lab, &mut m);
    relay_node_ports::cells(&lab, &mut m);
    service_fields::cells(&lab, &mut m);
    udp::cells(&lab, &mut m);
    negative::cells(&lab, &mut m);
    udp::oversized(&lab, &mut m, udp_blocked_at.is_some());

    if let Some(site) = udp_blocked_at {
        fallback::nat_rebinding(&lab, &mut m, site, relay_ping)?;
        fallback::udp_returns(&lab, &mut m, site)?;
        fallback::cloud_to_edge_after_move(&lab, &mut m);
    }

    hygiene::edge_leaves(&lab, &mut m, edge2)?;
    hygiene::relay_stopped(&lab, &mut m, relay)?;
    hygiene::relay_left_nothing(&lab, &mut m)?;
    hygiene::agent_stops(&lab, &mut m, agent)?;
    edge1.stop()?;
    drop(svcs);
    drop(cluster);

    publish(lab, &m, report, build, up)
}

/// Tears the lab down (timed: the footer reports it, with the build and
/// start-up times), writes the table to `target/{report}` and fails with
/// the failed cells' names, so a failing run still leaves its table.
fn publish(lab: NetnsLab, m: &Table, report: &str, build: Duration, up: Duration) -> Result<()> {
    let t_down = Instant::now();
    drop(lab);
    let teardown = t_down.elapsed();
    let summary = m.publish(
        report,
        &format!(
            "lab build {build:?}, relay + 2 edges up {up:?}, lab teardown {teardown:?}; {} of {} cells passed",
            m.passed(),
            m.rows.len(),
        ),
    );
    let failed = m.failed();
    assert!(failed.is_empty(), "failed cells: {failed:?}\n{summary}");
    Ok(())
}
