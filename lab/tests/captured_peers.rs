//! The tunnel's own peer inside a captured prefix (network-namespace lab).
//!
//! The kernel checks the source of every packet it receives by looking up
//! the route back to it as if from `lo`, and capture's `iif lo` policy
//! rule answers that lookup from its table, which holds a local route for
//! every captured prefix: a packet from inside one is dropped as a martian
//! unless the peer's address is cut out of those routes. Two real setups put
//! the tunnel's peer there:
//! - an edge that dials the relay at an address one of the tunnel routes
//!   covers (the relay node's own subnet listed as a cloud range, which
//!   the shipped `relay.toml` suggests; a relay reached over a VPN);
//! - a relay whose edge arrives without NAT (a private APN, a site VPN,
//!   a firewall that only blocks inbound), so the node address the edge
//!   claims is also where its session comes from.
//!
//! Before the fix, every packet of the session was dropped as soon as its
//! routes were captured and the session never came back; the same cells
//! failed from then on. Each test shortens the keep-alive (1 s) and the
//! idle timeout (4 s) so that a session whose packets are dropped is lost
//! well within the 6 s each one then waits, and checks that the session
//! it started with is still the one registered, and that traffic flows.
//!
//! Run: `REQUIRE_LAB=1 cargo test -p relay-lab --test captured_peers`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config_in, http_from, netns_start, relay_config_in, sa, services, session, start_edge,
    start_relay, within, HTTP,
};
use relay_protocol::Cidr;
use relay_server::RelayConfig;

/// How long each test waits with its session up: past the dead-path
/// bound of the shortened timers (2 × keep-alive plus sweeps, or the idle
/// timeout).
const HOLD: Duration = Duration::from_secs(6);

fn short_timers(relay: &mut RelayConfig) -> Duration {
    let keepalive = Duration::from_secs(1);
    relay.quic.keepalive = keepalive;
    relay.quic.idle_timeout = Duration::from_secs(4);
    keepalive
}

/// The session `node` has now: its id, after checking it exists.
fn session_id(lab: &NetnsLab, node: &str) -> Result<u64> {
    Ok(session(lab, node)?
        .with_context(|| format!("{node} has no session"))?
        .session_id)
}

/// Checks that `node` keeps the session `id` for [`HOLD`].
fn keeps_its_session(lab: &NetnsLab, node: &str, id: u64) -> Result<()> {
    std::thread::sleep(HOLD);
    let now = session(lab, node)?;
    ensure!(
        now.as_ref().map(|s| s.session_id) == Some(id),
        "{node}'s session {id} was lost within {HOLD:?}: now {:?}",
        now.map(|s| (s.session_id, s.connected_secs))
    );
    Ok(())
}

/// An edge dials the relay at an address inside a tunnel route: the
/// relay's replies pass the edge's source check (a bypass rule for the
/// relay's address), the session stays, and capture still carries the
/// edge pod's traffic to the cloud.
#[test]
fn an_edge_dialling_the_relay_inside_a_tunnel_route_keeps_its_session() -> Result<()> {
    let Some((_t0, lab, pki)) = netns_start("relay address inside a tunnel route")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    let mut rcfg = relay_config_in(&lab, &pki)?;
    let keepalive = short_timers(&mut rcfg);
    let relay_addr = Cidr::host(IpAddr::V4(netns::RELAY_WAN_IP));
    rcfg.tunnel_routes.push(relay_addr);
    let _relay = start_relay(&lab, rcfg)?;
    let mut ecfg = edge_config_in(&lab, &pki, 1)?;
    ecfg.quic.keepalive = keepalive;
    let _edge = start_edge(&lab, 1, ecfg)?;
    let id = session_id(&lab, "edge1")?;
    let cpod2 = sa(netns::CPOD2_IP, HTTP);
    within(Duration::from_secs(5), || {
        Ok(http_from(&lab, Role::Epod1, cpod2).is_ok_and(|b| b.contains("cpod2")))
    })
    .context("epod1 → cpod2 once captured")?;
    // The relay's address is cut out of capture's local routes: a lookup
    // from this host (through the `iif lo` rule, as the source check's) is
    // not answered `local`.
    let relay = netns::RELAY_WAN_IP.to_string();
    let back = lab.exec(Role::Edge1, &["ip", "-4", "route", "get", &relay])?;
    ensure!(
        !back.trim_start().starts_with("local"),
        "the relay's address is captured as local:\n{back}"
    );
    keeps_its_session(&lab, "edge1", id)?;
    let body = http_from(&lab, Role::Epod1, cpod2)?;
    ensure!(
        body.contains("cpod2"),
        "epod1 → cpod2 after {HOLD:?}: {body}"
    );
    Ok(())
}

/// An edge reaches the relay without NAT: the address its session comes
/// from is one it claims (here the NAT's public address stands for it),
/// captured on the relay node. Its packets pass the relay's source check,
/// the session stays, and a cloud pod still reaches the edge's pod.
#[test]
fn an_edge_arriving_from_an_address_it_claims_keeps_its_session() -> Result<()> {
    arriving_from_a_claimed_address(false)
}

/// The same with the relay listening on `[::]` (dual stack, for IPv6-only
/// edges): it sees the edge at `::ffff:198.18.0.11`, which must count as
/// the IPv4 address it claims.
#[test]
fn an_edge_arriving_from_an_address_it_claims_at_a_dual_stack_relay() -> Result<()> {
    arriving_from_a_claimed_address(true)
}

fn arriving_from_a_claimed_address(dual_stack: bool) -> Result<()> {
    let Some((_t0, lab, pki)) = netns_start("edge source inside its own claim")? else {
        return Ok(());
    };
    let _svcs = [services(&lab, Role::Epod1, "epod1")?];
    let source = Cidr::host(IpAddr::V4(netns::nat_wan_ip(1)));
    let mut rcfg = relay_config_in(&lab, &pki)?;
    let keepalive = short_timers(&mut rcfg);
    if dual_stack {
        rcfg.quic_listen = "[::]:8443".parse()?;
        ensure!(
            rcfg.quic_listen.port() == relay_lab::scenario::QUIC_PORT,
            "the lab's QUIC port moved"
        );
    }
    rcfg.nodes
        .get_mut("edge1")
        .context("edge1 in the lab's nodes")?
        .push(source);
    let _relay = start_relay(&lab, rcfg)?;
    let mut ecfg = edge_config_in(&lab, &pki, 1)?;
    ecfg.quic.keepalive = keepalive;
    ecfg.routes.push(source);
    let _edge = start_edge(&lab, 1, ecfg)?;
    let id = session_id(&lab, "edge1")?;
    let seen = session(&lab, "edge1")?.context("edge1's session")?;
    let from: std::net::SocketAddr = seen.remote_addr.parse()?;
    ensure!(
        from.ip().to_canonical() == IpAddr::V4(netns::nat_wan_ip(1))
            && from.is_ipv6() == dual_stack,
        "the relay sees edge1 at {from}, not at the address it claims"
    );
    let epod1 = sa(netns::edge_pod_ip(1), HTTP);
    // The relay captures the edge's prefixes just after it registers.
    within(Duration::from_secs(5), || {
        Ok(http_from(&lab, Role::Cpod1, epod1).is_ok_and(|b| b.contains("epod1")))
    })
    .context("cpod1 → epod1 once captured")?;
    keeps_its_session(&lab, "edge1", id)?;
    let body = http_from(&lab, Role::Cpod1, epod1)?;
    ensure!(
        body.contains("epod1"),
        "cpod1 → epod1 after {HOLD:?}: {body}"
    );
    Ok(())
}
