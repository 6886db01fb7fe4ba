//! Building blocks of the end-to-end tests in the network-namespace lab
//! ([`crate::netns`]): background tasks in namespaces ([`Running`],
//! [`launch`]), services that name their host, the relay and edge
//! configurations of the lab (in-process, or the real `relay-server` binary
//! as a child process: [`RelayProcess`]), clients that report what they
//! reached, admin API calls, and a result [`Table`].
//!
//! Shared by `tests/matrix.rs` (the seed matrix) and `tests/faults.rs`
//! (fault injection), so both start the same relay and edges and talk to
//! them the same way.
//!
//! This file holds the tasks, services, configurations and the in-process
//! relay and edges; beside it, by concern: `scenario/probes.rs` (clients
//! and admin API calls), `scenario/table.rs` (the result table),
//! `scenario/relay_toml.rs` (a configuration as `relay.toml`) and
//! `scenario/relay_process.rs` (the binary as a child process).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_protocol::Cidr;
use relay_server::{Relay, RelayConfig};
use relay_transport::capture::CaptureConfig;
use relay_transport::devcerts::DevPki;
use tokio::net::UdpSocket;

use crate::netns::{self, NetnsLab, Role};

mod probes;
mod relay_process;
mod relay_toml;
mod table;
pub use probes::{
    admin, admin_call, capture_set, captured_prefixes, connect_from, connect_refused, edge_metric,
    edge_readiness, edge_ready, fails_fast, http_from, metric, service_resolutions, session,
    sessions, set_covers, udp_client, udp_from, until_udp_answered, wait_captured, UdpSample,
};
pub use relay_process::{newest_source, relay_server_binary, RelayProcess};
pub use relay_toml::{edge_toml, relay_toml};
pub use table::{Row, Table};

/// Port of the HTTP page every [`services`] host serves.
pub const HTTP: u16 = 80;
/// Port of the "kubelet" page (also HTTP, naming `<host>-kubelet`).
pub const KUBELET: u16 = 10250;
/// Port of the UDP responder of [`services`].
pub const DNS: u16 = 53;
/// Port of the TCP echo service of [`echo_service`].
pub const ECHO: u16 = 7;
/// The relay's CONNECT ingress port (on [`netns::RELAY_LAN_IP`]).
pub const CONNECT_PORT: u16 = 8131;
/// The relay's admin API port (on [`netns::RELAY_LAN_IP`]).
pub const ADMIN_PORT: u16 = 9090;
/// The relay's QUIC port (on every address of the relay node).
pub const QUIC_PORT: u16 = 8443;
/// Where an edge run as a process ([`edge_toml`]) serves its status
/// endpoint, in its own namespace (the address the deployment uses).
pub const EDGE_STATUS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9469);
/// The admin API's bearer token in the lab.
pub const ADMIN_TOKEN: &str = "lab-admin-token-0123456789";
/// How long [`launch`] waits for a task to report readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `ip:port`.
pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A background task in a namespace that runs until told to stop.
/// Dropping it stops it too.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops the task and returns how it ended.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.join().map_err(|_| anyhow!("thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Starts `start` in `ns`; it reports readiness through `ready` once, then
/// runs until stopped. Waits (at most [`READY_TIMEOUT`]) for readiness.
pub fn launch<F, Fut>(lab: &NetnsLab, ns: Role, what: &str, start: F) -> Result<Running>
where
    F: FnOnce(mpsc::Sender<Result<()>>, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let err_tx = ready_tx.clone();
    let join = lab.spawn_in(ns, move || async move {
        let r = start(ready_tx, stop_rx).await;
        if let Err(e) = &r {
            let _ = err_tx.send(Err(anyhow!("{e:#}")));
        }
        r
    });
    let running = Running {
        stop: Some(stop_tx),
        join: Some(join),
    };
    match ready_rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(e.context(format!("starting {what}"))),
        Err(_) => bail!("{what} not ready within {READY_TIMEOUT:?}"),
    }
}

/// HTTP pages on :80 (and :10250, the "kubelet") and a UDP responder on
/// :53 (it answers `name:` followed by the query), all naming `name`.
pub fn services(lab: &NetnsLab, ns: Role, name: &'static str) -> Result<Running> {
    launch(lab, ns, name, move |ready, stop| async move {
        let (_, h1) = crate::spawn_http(sa(Ipv4Addr::UNSPECIFIED, HTTP), name).await?;
        let (_, h2) = crate::spawn_http(
            sa(Ipv4Addr::UNSPECIFIED, KUBELET),
            &format!("{name}-kubelet"),
        )
        .await?;
        let udp = UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, DNS)).await?;
        let h3 = tokio::spawn(async move {
            // Whole datagrams (up to UDP's 65,535 bytes), so an answer to
            // a query too large for a tunnel datagram is as large.
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from).await;
            }
        });
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        for h in [h1, h2, h3] {
            h.abort();
        }
        Ok(())
    })
}

/// A TCP echo service on :[`ECHO`] (see [`crate::spawn_echo`]).
pub fn echo_service(lab: &NetnsLab, ns: Role) -> Result<Running> {
    launch(lab, ns, "echo", move |ready, stop| async move {
        let (_, h) = crate::spawn_echo(sa(Ipv4Addr::UNSPECIFIED, ECHO)).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        h.abort();
        Ok(())
    })
}

/// A development PKI for the lab: relay name `relay.lab`, nodes `edge1`
/// and `edge2`.
pub fn lab_pki() -> Result<DevPki> {
    Ok(DevPki::generate(&["relay.lab"], &["edge1", "edge2"])?)
}

/// How a network-namespace lab test starts: `None` (after saying it is
/// skipped, as `what`) without root, which [`netns::require_root`] turns
/// into a failure under `CI=true` or `REQUIRE_LAB=1`; else the start
/// time, a fresh lab and [`lab_pki`].
pub fn netns_start(what: &str) -> Result<Option<(Instant, NetnsLab, DevPki)>> {
    netns_start_with(what, netns::LabOptions::default())
}

/// [`netns_start`] with a lab built with `options`.
pub fn netns_start_with(
    what: &str,
    options: netns::LabOptions,
) -> Result<Option<(Instant, NetnsLab, DevPki)>> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED {what}: {skip}");
        return Ok(None);
    }
    crate::init();
    let t0 = Instant::now();
    Ok(Some((t0, NetnsLab::with_options(options)?, lab_pki()?)))
}

/// The lab relay's configuration: QUIC on :8443 everywhere, CONNECT and
/// the admin API (with [`ADMIN_TOKEN`]) on the cloud LAN, each edge allowed
/// its pod CIDR and host address, the cloud ranges as tunnel routes, and
/// capture on.
pub fn relay_config(pki: &DevPki) -> Result<RelayConfig> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    cfg.quic_listen = sa(Ipv4Addr::UNSPECIFIED, QUIC_PORT);
    cfg.connect_listen = Some(sa(netns::RELAY_LAN_IP, CONNECT_PORT));
    // On the cloud LAN, with a token: the route agent on cloud2 reads it.
    cfg.admin_listen = Some(sa(netns::RELAY_LAN_IP, ADMIN_PORT));
    cfg.admin_token = Some(relay_server::Secret::new(ADMIN_TOKEN));
    // Plaintext CONNECT and admin API on the LAN: the lab's cloud LAN is a
    // private namespace network, and its tests speak plain HTTP to both.
    // A real deployment uses [connect_tls] and admin TLS (refused otherwise).
    cfg.allow_insecure_connect = true;
    cfg.allow_insecure_admin = true;
    for site in netns::SITES {
        cfg.nodes.insert(
            format!("edge{site}"),
            vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(netns::edge_host_ip(site))),
            ],
        );
    }
    cfg.tunnel_routes = [
        netns::CPOD1_CIDR,
        netns::CPOD2_CIDR,
        netns::SERVICE_CIDR,
        netns::CLOUD_LAN,
    ]
    .iter()
    .map(|c| c.parse::<Cidr>())
    .collect::<Result<_, _>>()?;
    // The seed matrix's edge↔edge cells: both sites in one community
    // (without it the policy isolates edges from each other).
    cfg.communities.insert(
        "sites".into(),
        netns::SITES.iter().map(|s| format!("edge{s}")).collect(),
    );
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

/// [`relay_config`] for the topology `lab` was built with: each edge's
/// `[nodes]` entry names its host address there (with repeated LANs, the
/// same one for both sites, which the relay then treats as ambiguous).
pub fn relay_config_in(lab: &NetnsLab, pki: &DevPki) -> Result<RelayConfig> {
    let mut cfg = relay_config(pki)?;
    for site in lab.sites() {
        cfg.nodes.insert(
            format!("edge{site}"),
            vec![
                netns::edge_pod_cidr(site),
                Cidr::host(IpAddr::V4(lab.edge_host_ip(site))),
            ],
        );
    }
    Ok(cfg)
}

/// Edge `site`'s configuration: dials the relay's WAN address, serves its
/// pod CIDR and host address, capture on (default topology; a lab built
/// with other options: [`edge_config_in`]).
pub fn edge_config(pki: &DevPki, site: u8) -> Result<EdgeConfig> {
    edge_config_host(pki, site, netns::edge_host_ip(site))
}

/// [`edge_config`] for the topology `lab` was built with (its edge host
/// addresses: with repeated LANs, the same one for both sites).
pub fn edge_config_in(lab: &NetnsLab, pki: &DevPki, site: u8) -> Result<EdgeConfig> {
    edge_config_host(pki, site, lab.edge_host_ip(site))
}

fn edge_config_host(pki: &DevPki, site: u8, host: Ipv4Addr) -> Result<EdgeConfig> {
    let node = format!("edge{site}");
    let mut cfg = EdgeConfig::new(
        &node,
        sa(netns::RELAY_WAN_IP, QUIC_PORT).to_string(),
        "relay.lab",
        pki.node_material(&node)?,
    );
    let host = IpAddr::V4(host);
    cfg.routes = vec![netns::edge_pod_cidr(site), Cidr::host(host)];
    cfg.primary_addr = Some(host);
    cfg.capture = Some(CaptureConfig::default());
    Ok(cfg)
}

/// Runs the relay library with `cfg` in the relay node until stopped.
pub fn start_relay(lab: &NetnsLab, cfg: RelayConfig) -> Result<Running> {
    launch(lab, Role::Relay, "relay", move |ready, stop| async move {
        let relay = Relay::spawn(cfg).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        relay.shutdown(Duration::from_secs(2)).await;
        Ok(())
    })
}

/// Runs the edge clients of sites 1 and 2 with their lab configuration
/// ([`edge_config_in`]), each ready once connected ([`start_edge`]).
pub fn start_edges(lab: &NetnsLab, pki: &DevPki) -> Result<[Running; 2]> {
    Ok([
        start_edge(lab, 1, edge_config_in(lab, pki, 1)?)?,
        start_edge(lab, 2, edge_config_in(lab, pki, 2)?)?,
    ])
}

/// Runs the edge client with `cfg` on edge host `site` until stopped;
/// ready once it is connected (at most 15 s).
pub fn start_edge(lab: &NetnsLab, site: u8, cfg: EdgeConfig) -> Result<Running> {
    let role = Role::edge(site)?;
    launch(
        lab,
        role,
        &format!("edge{site}"),
        move |ready, stop| async move {
            let edge = EdgeClient::start(cfg).await?;
            if edge.wait_connected(Duration::from_secs(15)).await.is_none() {
                bail!("edge did not connect: {:?}", edge.state());
            }
            let _ = ready.send(Ok(()));
            let _ = stop.await;
            edge.shutdown().await;
            Ok(())
        },
    )
}

/// Polls `cond` every 50 ms for at most `limit`; returns the time it took.
pub fn within(limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond()? {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}
