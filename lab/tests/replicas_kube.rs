//! Scale-out with Lease membership, end to end on loopback: relay
//! replicas in Kubernetes mode find each other through Leases, edges
//! configured with one replica's address and their node name end up with a
//! session on each, a replica added is joined by every edge within seconds,
//! and a replica stopped gracefully (its Lease deleted) is dropped by the
//! others and by the edges at once.
//!
//! Runs against `relay-kube-standin`, a kube-apiserver stand-in (Nodes,
//! Leases, nodes/status, Events with the apiserver's REST shapes) — NOT a
//! real apiserver; the relays reach it through an ordinary kubeconfig.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, EdgeConfig};
use relay_kube_standin::{kubelet_node, StandIn};
use relay_server::config::KubeSettings;
use relay_server::replicas::{LeaseSettings, ReplicaSettings, ReplicaSource};
use relay_server::{Relay, RelayConfig};
use relay_transport::devcerts::DevPki;

const NS: &str = "edge-relay";

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_replica(standin: &StandIn, pki: &DevPki, id: &str) -> Result<Relay> {
    start_replica_with(standin, pki, id, Duration::from_secs(3)).await
}

/// [`start_replica`], with `api_timeout` bounding each API call.
async fn start_replica_with(
    standin: &StandIn,
    pki: &DevPki,
    id: &str,
    api_timeout: Duration,
) -> Result<Relay> {
    let mut cfg = RelayConfig::loopback(pki.relay_material()?);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    cfg.relay_id = id.into();
    cfg.quic_listen = addr;
    cfg.tcp_fallback = false;
    cfg.quic.keepalive = Duration::from_millis(500);
    cfg.quic.idle_timeout = Duration::from_secs(5);
    cfg.limits.drain_grace = Duration::from_millis(200);
    cfg.kubernetes = Some(KubeSettings {
        edge_address_ranges: relay_lab::loopback_node_ranges(),
        kubeconfig: Some(standin.kubeconfig_path().to_path_buf()),
        api_timeout,
        ..KubeSettings::default()
    });
    cfg.replicas = Some(ReplicaSettings {
        advertise: addr.to_string(),
        source: ReplicaSource::Leases(LeaseSettings {
            namespace: NS.into(),
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(300),
            skew_margin: Duration::from_secs(1),
            gc_after: Duration::from_secs(5),
        }),
    });
    Ok(Relay::spawn(cfg).await?)
}

/// The nodes with a session on `relay`.
async fn nodes_on(relay: &Relay) -> Result<BTreeSet<String>> {
    Ok(relay_lab::sessions(relay.admin_addr().context("admin")?)
        .await?
        .into_iter()
        .map(|s| s.node)
        .collect())
}

/// The replica ids `relay` tells edges about.
async fn set_of(relay: &Relay) -> Result<Vec<String>> {
    let (code, body) =
        relay_lab::admin_get(relay.admin_addr().context("admin")?, "/v1/replicas", None).await?;
    ensure!(code == 200, "{code} {body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    Ok(rows
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

async fn eventually(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Result<bool>,
) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f().await? {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {limit:?}")
}

#[tokio::test]
async fn replicas_from_leases_every_edge_on_each_join_and_leave() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    let names = ["edge-0", "edge-1"];
    for (i, n) in names.iter().enumerate() {
        let ip = IpAddr::from([127, 0, 0, 2 + i as u8]).to_string();
        standin.upsert_node(kubelet_node(
            n,
            &[&format!("127.1.{i}.0/24")],
            &[("InternalIP", &ip)],
        ));
    }
    let pki = DevPki::generate(&["localhost"], &names)?;
    let mut relays = Vec::new();
    for id in ["relay-a", "relay-b", "relay-c"] {
        relays.push(start_replica(&standin, &pki, id).await?);
    }
    eventually(
        "three Leases, one set",
        Duration::from_secs(10),
        async || {
            for r in &relays {
                if set_of(r).await? != ["relay-a", "relay-b", "relay-c"] {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let mut edges = Vec::new();
    for n in names {
        let mut cfg = EdgeConfig::new(
            n,
            relays[0].quic_addr().to_string(),
            "localhost",
            pki.node_material(n)?,
        );
        cfg.transport = edge_client::TransportMode::Quic;
        cfg.quic.keepalive = Duration::from_millis(500);
        cfg.backoff.initial = Duration::from_millis(100);
        cfg.backoff.max = Duration::from_millis(500);
        edges.push(EdgeClient::spawn(cfg));
    }
    let all: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let took = eventually(
        "every edge on every replica",
        Duration::from_secs(15),
        async || {
            for r in &relays {
                if nodes_on(r).await? != all {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    println!("every edge on 3 Lease-discovered replicas {took:?} after the edges started");

    // A fourth replica appears: every edge joins it.
    relays.push(start_replica(&standin, &pki, "relay-d").await?);
    let t = Instant::now();
    let d = relays.last().context("relay-d")?;
    eventually(
        "every edge on relay-d",
        Duration::from_secs(15),
        async || Ok(nodes_on(d).await? == all),
    )
    .await?;
    println!(
        "relay-d joined by every edge {:?} after it started",
        t.elapsed()
    );
    ensure!(
        standin.leases(NS).len() == 4,
        "{:?}",
        standin.leases(NS).keys()
    );

    // relay-a (the address the edges were configured with) stops
    // gracefully: its Lease goes first, the others drop it at once, and
    // the edges close their sessions to it.
    let a = relays.remove(0);
    let t = Instant::now();
    a.shutdown(Duration::from_millis(200)).await;
    eventually(
        "relay-a out of every set",
        Duration::from_secs(3),
        async || {
            for r in &relays {
                if set_of(r).await?.contains(&"relay-a".to_string()) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    println!(
        "relay-a out of every replica's set {:?} after its shutdown began",
        t.elapsed()
    );
    ensure!(
        !standin.leases(NS).contains_key("relay-a"),
        "relay-a's Lease is still there"
    );
    for r in &relays {
        ensure!(
            nodes_on(r).await? == all,
            "an edge lost its session to a surviving replica"
        );
    }
    // The edges' sessions to the others never moved, and the condition
    // says the tunnel is up.
    for n in names {
        let node = standin.node(n).context("node")?;
        let c = node
            .status
            .and_then(|s| s.conditions)
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == "EdgeTunnelReady"))
            .context("no EdgeTunnelReady")?;
        ensure!(c.status == "True", "{n}: {c:?}");
    }
    for e in edges {
        e.shutdown().await;
    }
    for r in relays {
        r.shutdown(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A replica shutting down while the apiserver hangs does not wait for it:
/// the Lease release is bounded (2 s; the Lease then expires on its own),
/// so the drain and capture removal that follow fit the pod's termination
/// grace period (the release's GET and DELETE used to wait 10 s each).
/// Stand-in, not a real apiserver (see the module doc).
#[tokio::test]
async fn a_replica_shuts_down_promptly_while_the_api_hangs() -> Result<()> {
    relay_lab::init();
    let standin = StandIn::spawn().await?;
    let pki = DevPki::generate(&["localhost"], &[])?;
    // The default API timeout, which the release used to wait out twice.
    let relay = start_replica_with(&standin, &pki, "relay-a", Duration::from_secs(10)).await?;
    eventually("relay-a's Lease", Duration::from_secs(10), async || {
        Ok(standin.leases(NS).contains_key("relay-a"))
    })
    .await?;
    standin.set_latency(Duration::from_secs(20), Duration::from_secs(20));
    let t = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        relay.shutdown(Duration::from_millis(200)),
    )
    .await
    .context("shutdown waited for the hanging apiserver")?;
    eprintln!("shut down in {:?} with the API hanging", t.elapsed());
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    Ok(())
}
