//! IPv6 uplinks: a relay listening on `[::]` (dual stack) serves edges that
//! reach it over IPv6 and over IPv4, on QUIC and on the TCP fallback, and
//! CONNECT reaches both. Loopback only (`::1`, `127.0.0.1`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use edge_client::{EdgeClient, TransportMode};
use relay_lab::{connect_via, edge_config, edge_ip, http_get, relay_config, sessions, spawn_http};
use relay_server::Relay;
use relay_transport::devcerts::DevPki;

#[tokio::test]
async fn edges_reach_a_dual_stack_relay_over_ipv6_and_ipv4() -> Result<()> {
    relay_lab::init();
    let pki = DevPki::generate(&["localhost"], &["edge-0", "edge-1", "edge-2"])?;
    let mut cfg = relay_config(&pki, 3)?;
    cfg.quic_listen = "[::]:0".parse()?;
    let relay = Relay::spawn(cfg).await?;
    let port = relay.quic_addr().port();
    let (admin, connect) = (
        relay.admin_addr().context("admin")?,
        relay.connect_addr().context("connect")?,
    );
    let over = |i: usize, relay: &str, transport: TransportMode| -> Result<EdgeClient> {
        let mut cfg = edge_config(&pki, i, relay.parse()?)?;
        cfg.transport = transport;
        Ok(EdgeClient::spawn(cfg))
    };
    let v6 = over(0, &format!("[::1]:{port}"), TransportMode::Quic)?;
    let v4 = over(1, &format!("127.0.0.1:{port}"), TransportMode::Quic)?;
    let v6_tcp = over(2, &format!("[::1]:{port}"), TransportMode::Tcp)?;
    for (name, e) in [
        ("IPv6 QUIC", &v6),
        ("IPv4 QUIC", &v4),
        ("IPv6 TCP", &v6_tcp),
    ] {
        e.wait_connected(Duration::from_secs(10))
            .await
            .with_context(|| format!("{name} edge did not connect: {:?}", e.state()))?;
    }
    let rows = sessions(admin).await?;
    let remote = |n: &str| {
        rows.iter()
            .find(|r| r.node == n)
            .map(|r| r.remote_addr.clone())
            .unwrap_or_default()
    };
    assert!(
        remote("edge-0").starts_with("[::1]"),
        "{}",
        remote("edge-0")
    );
    assert!(
        remote("edge-2").starts_with("[::1]"),
        "{}",
        remote("edge-2")
    );
    for i in 0..3 {
        let (web, _t) = spawn_http(SocketAddr::new(edge_ip(i), 0), &format!("edge {i}")).await?;
        let s = connect_via(connect, &web.to_string()).await?;
        let (code, body) = http_get(s, "x", "/", None).await?;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("edge {i}")), "{body}");
    }
    for e in [v6, v4, v6_tcp] {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
