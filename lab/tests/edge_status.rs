//! The edge's status endpoint (`status_listen`) with a real relay and edge
//! client on loopback: readiness follows the session, liveness does not,
//! the metrics count what the tunnel carried (and pass `promtool check
//! metrics`), a request head that never
//! comes is cut off, and the port closes with the client.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_client::EdgeClient;
use relay_lab::metric_sample as sample;
use relay_lab::traffic::{echo_round_trip, random_bytes};
use relay_lab::{admin_request, connect_via, edge_config, edge_ip, edge_name, init, spawn_echo};
use relay_server::Relay;
use relay_transport::devcerts::DevPki;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// `promtool check metrics` (Debian's prometheus package) on `text`: the
/// exposition format and Prometheus' naming rules. Required under CI or
/// `REQUIRE_LAB=1` (CI installs it); skipped loudly elsewhere.
fn promtool_accepts(text: &str) -> Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() && std::env::var_os("REQUIRE_LAB").is_none() => {
            eprintln!("edge_status: promtool not run ({e}); install Debian's prometheus");
            return Ok(());
        }
        Err(e) => return Err(e).context("promtool (Debian's prometheus package)"),
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Polls `path` until its status is `want` (at most `limit`); the body.
async fn until_status(addr: SocketAddr, path: &str, want: u16, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let (code, body) = admin_request(addr, "GET", path).await?;
        if code == want {
            return Ok(body);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{path} still {code} after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_session_and_metrics_count_the_tunnel() -> Result<()> {
    init();
    let name = edge_name(0);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &[name.as_str()])?;
    let relay = Relay::spawn(relay_lab::relay_config(&pki, 1)?).await?;
    let mut cfg = edge_config(&pki, 0, relay.quic_addr())?;
    cfg.status_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let edge = EdgeClient::start(cfg).await?;
    let status = edge.status_addr().context("no status address")?;
    edge.wait_connected(Duration::from_secs(10))
        .await
        .context("edge did not connect")?;

    let body = until_status(status, "/readyz", 200, Duration::from_secs(5)).await?;
    assert!(body.starts_with("connected: session "), "{body}");
    assert_eq!(
        admin_request(status, "GET", "/healthz").await?,
        (200, "ok\n".into())
    );
    assert_eq!(admin_request(status, "GET", "/v1/sessions").await?.0, 404);

    // Traffic through the tunnel shows in the edge's counters.
    let (echo, _t) = spawn_echo(SocketAddr::new(edge_ip(0), 0)).await?;
    let data = random_bytes(100_000);
    let s = connect_via(
        relay.connect_addr().context("no CONNECT")?,
        &echo.to_string(),
    )
    .await?;
    assert_eq!(echo_round_trip(s, &data).await?.len(), data.len());
    let (code, m) = admin_request(status, "GET", "/metrics").await?;
    assert_eq!(code, 200);
    assert_eq!(sample(&m, "edge_session_up"), Some(1.0), "{m}");
    assert!(sample(&m, "edge_streams_total") >= Some(1.0), "{m}");
    assert!(
        sample(&m, "edge_bytes_total{direction=\"up\"}") >= Some(data.len() as f64),
        "{m}"
    );
    assert!(sample(&m, "edge_path_rtt_seconds").is_some(), "{m}");
    promtool_accepts(&m)?;

    // A client that connects and never sends a head is cut off (5 s bound).
    let mut silent = TcpStream::connect(status).await?;
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .context("silent client still held after 10 s")??;
    let held = t0.elapsed();
    assert!(held >= Duration::from_secs(4), "cut after {held:?}");
    // hyper closes the connection, with or without a 408 first.
    assert!(
        n == 0 || buf[..n].starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // The relay goes away: not ready, still alive.
    relay.shutdown(Duration::from_secs(2)).await;
    // The body says what the edge does now and why the session ended.
    let body = until_status(status, "/readyz", 503, Duration::from_secs(30)).await?;
    assert!(
        body.starts_with("refused")
            || (body.starts_with("connecting: attempt") && body.contains("; last: ")),
        "{body}"
    );
    assert_eq!(admin_request(status, "GET", "/healthz").await?.0, 200);
    let m = admin_request(status, "GET", "/metrics").await?.1;
    assert_eq!(sample(&m, "edge_session_up"), Some(0.0), "{m}");

    // The endpoint closes with the client.
    edge.shutdown().await;
    assert!(
        TcpStream::connect(status).await.is_err(),
        "status port still open after shutdown"
    );
    Ok(())
}
