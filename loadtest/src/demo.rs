//! `demo`: a relay and edge clients in this process, an HTTP service on
//! each edge, fetched through the relay's CONNECT port (see the README).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use relay_lab::{admin_get, connect_via, edge_ip, edge_name, http_get, spawn_http, Lab};

/// Runs the complete local demo on loopback with `n` edges.
pub(crate) async fn demo(n: usize) -> Result<()> {
    ensure!(
        (1..=200).contains(&n),
        "--edges must be between 1 and 200 (got {n})"
    );
    let t0 = Instant::now();
    println!(
        "== starting relay and {n} edge clients on loopback (dev certificates generated in memory)"
    );
    let lab = Lab::start(n, |_| {}).await?;
    println!(
        "   relay: QUIC udp/{}  CONNECT tcp/{}  admin http://{}",
        lab.relay.quic_addr(),
        lab.connect_addr(),
        lab.admin_addr()
    );
    let mut services = Vec::new();
    for i in 0..n {
        let (addr, task) = spawn_http(SocketAddr::new(edge_ip(i), 0), &edge_name(i)).await?;
        println!(
            "   {}: HTTP service at {addr} (reachable only through the tunnel's edge)",
            edge_name(i)
        );
        services.push((addr, task));
    }
    println!("   all {n} sessions up in {:?}", t0.elapsed());

    println!("\n== fetching each edge's service through the relay (HTTP CONNECT)");
    for (i, (addr, _)) in services.iter().enumerate() {
        for authority in [
            addr.to_string(),
            format!("{}:{}", edge_name(i), addr.port()),
        ] {
            let t = Instant::now();
            let s = connect_via(lab.connect_addr(), &authority)
                .await
                .with_context(|| format!("CONNECT {authority}"))?;
            let (code, body) = http_get(s, &authority, "/", None).await?;
            let body = body.trim_end();
            println!(
                "   CONNECT {authority:<22} -> HTTP {code} {body:?} in {:?}",
                t.elapsed()
            );
            ensure!(
                code == 200 && body == format!("hello from {}", edge_name(i)),
                "unexpected answer"
            );
        }
    }
    println!("\n== a target no edge serves is refused at once, with a reason");
    match connect_via(lab.connect_addr(), "127.0.0.250:80").await {
        Err(e) => println!("   CONNECT 127.0.0.250:80 -> {e}"),
        Ok(_) => anyhow::bail!("CONNECT to an unserved address succeeded"),
    }

    println!("\n== admin API: GET /v1/sessions");
    let (code, body) = admin_get(lab.admin_addr(), "/v1/sessions", None).await?;
    ensure!(code == 200, "admin API answered {code}");
    let rows: serde_json::Value = serde_json::from_str(&body)?;
    println!("{}", serde_json::to_string_pretty(&rows)?);
    ensure!(
        rows.as_array().map(|a| a.len()) == Some(n),
        "expected {n} sessions"
    );

    println!("\n== admin API: GET /metrics (excerpt)");
    let (_, metrics) = admin_get(lab.admin_addr(), "/metrics", None).await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("relay_sessions ")
            || l.starts_with("relay_streams_total{outcome=\"ok\"}")
            || l.starts_with("relay_bytes_total")
    }) {
        println!("   {line}");
    }
    lab.stop().await;
    for (_, t) in services {
        t.abort();
    }
    println!("\ndemo ok in {:?}", t0.elapsed());
    // Give the close frames a moment to leave before the runtime stops.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
