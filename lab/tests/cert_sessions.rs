//! Live sessions are held to their client certificates after the
//! handshake, with real QUIC and TLS/TCP on loopback
//! (`relay-server/src/session/cert_check.rs`):
//!
//! - a CRL reload revoking two edges (one on QUIC, one on the TCP
//!   fallback) closes their live sessions within seconds, and their
//!   reconnections are refused at TLS; a client CA bundle reloaded without
//!   one edge's CA closes that edge's session; the other edges' sessions
//!   stay the same ones through both reloads;
//! - a session whose certificate passes its notAfter is closed by the
//!   relay's liveness sweep, not before, and the edge is refused at its
//!   reconnection (TLS alert CertificateExpired).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use edge_client::config::TransportMode;
use edge_client::{EdgeClient, EdgeConfig, EdgeState};
use relay_lab::{edge_config, edge_ip, init, relay_config, sessions, TempDir};
use relay_protocol::Cidr;
use relay_server::config::TlsReload;
use relay_server::Relay;
use relay_transport::devcerts::DevPki;
use relay_transport::reload::{crls_from_pem, TlsPaths};
use relay_transport::TlsMaterial;

use relay_lab::{session_generation as generation, within_async as within};

/// `relay_sessions_certificate_closed_total{reason=...}` on the relay.
async fn closed_for(admin: SocketAddr, reason: &str) -> Result<u64> {
    let (_, metrics) = relay_lab::admin_get(admin, "/metrics", None).await?;
    let prefix = format!("relay_sessions_certificate_closed_total{{reason=\"{reason}\"}} ");
    let line = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("no {prefix}"))?;
    Ok(line.trim().parse()?)
}

/// Whether `e` reports its certificate refused with TLS alert `alert`.
fn refused_with(e: &EdgeClient, alert: &str) -> bool {
    matches!(e.state(), EdgeState::Connecting { last: Some(l), .. }
        if l.contains(&format!("refused this edge's certificate: TLS alert {alert}")))
}

fn relay_paths(dir: &Path, crl: &Path) -> TlsPaths {
    TlsPaths {
        cert: dir.join("relay.pem"),
        key: dir.join("relay-key.pem"),
        client_ca: dir.join("ca.pem"),
        crl: Some(crl.to_path_buf()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_distrusted_edges_lose_their_live_sessions_at_the_reload() -> Result<()> {
    init();
    let dir = TempDir(std::env::temp_dir().join(format!("cert-sessions-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0", "edge-1", "edge-2"])?;
    // edge-3's certificate is from a second client CA, trusted beside
    // the first until the bundle is reloaded without it.
    let other = DevPki::generate_with_ca_name("a second client CA", &["localhost"], &["edge-3"])?;
    pki.write_to(&dir.0)?;
    let crl = dir.0.join("crl.pem");
    std::fs::write(&crl, pki.crl_revoking(&[])?)?;
    let paths = relay_paths(&dir.0, &crl);
    std::fs::write(
        &paths.client_ca,
        format!("{}{}", pki.ca_cert, other.ca_cert),
    )?;
    let mut cfg = relay_config(&pki, 4)?;
    cfg.tls = TlsMaterial::from_files(&paths.cert, &paths.key, &paths.client_ca)?;
    cfg.tls_crls = crls_from_pem(&std::fs::read(&crl)?, "crl")?;
    cfg.tls_reload = Some(TlsReload {
        paths: paths.clone(),
        interval: Duration::from_millis(200),
    });
    let relay = Relay::spawn(cfg).await?;
    let admin = relay.admin_addr().context("admin")?;
    let tcp_port = relay.tcp_fallback_addr().context("tcp fallback")?.port();

    // edge-0 and edge-1 over QUIC, edge-2 over the TCP fallback, edge-3
    // (the other CA) over QUIC.
    let mut configs = Vec::new();
    for i in 0..3 {
        let mut c = edge_config(&pki, i, relay.quic_addr())?;
        if i == 2 {
            c.transport = TransportMode::Tcp;
            c.tcp_fallback_port = Some(tcp_port);
        }
        configs.push(c);
    }
    let (_, e3) = &other.nodes[0];
    let mut c3 = EdgeConfig::new(
        "edge-3",
        relay.quic_addr().to_string(),
        "localhost",
        TlsMaterial::from_pem(&e3.cert, &e3.key, &pki.ca_cert)?,
    );
    c3.routes = vec![Cidr::host(edge_ip(3))];
    c3.primary_addr = Some(edge_ip(3));
    configs.push(c3);
    let mut edges = Vec::new();
    let mut gens = Vec::new();
    for (i, c) in configs.into_iter().enumerate() {
        let e = EdgeClient::spawn(c);
        e.wait_connected(Duration::from_secs(10))
            .await
            .with_context(|| format!("edge-{i} did not connect"))?;
        edges.push(e);
    }
    for i in 0..4 {
        let node = format!("edge-{i}");
        gens.push(generation(admin, &node).await?.context(node)?);
    }
    let transport = |rows: &[relay_server::admin::SessionRow], node: &str| {
        rows.iter()
            .find(|r| r.node == node)
            .map(|r| r.transport.clone())
    };
    let rows = sessions(admin).await?;
    assert_eq!(transport(&rows, "edge-0").as_deref(), Some("quic"));
    assert_eq!(transport(&rows, "edge-2").as_deref(), Some("tcp"));

    // Revoke edge-0 and edge-2: the watcher reloads the CRL, and their
    // live sessions end without anyone closing them.
    std::fs::write(
        &crl,
        pki.crl_revoking(&[&pki.nodes[0].1.cert, &pki.nodes[2].1.cert])?,
    )?;
    let took = within(Duration::from_secs(5), async || {
        Ok(generation(admin, "edge-0").await?.is_none()
            && generation(admin, "edge-2").await?.is_none())
    })
    .await
    .context("revoked edges' live sessions were not closed")?;
    eprintln!("revoked edges' sessions closed {took:?} after the CRL was written");
    assert_eq!(closed_for(admin, "revoked").await?, 2);
    // Their reconnections are refused at TLS, on QUIC and on TCP.
    for i in [0, 2] {
        within(Duration::from_secs(10), async || {
            Ok(refused_with(&edges[i], "CertificateRevoked"))
        })
        .await
        .with_context(|| format!("edge-{i}: {:?}", edges[i].state()))?;
    }
    ensure!(generation(admin, "edge-0").await?.is_none(), "edge-0 back");
    ensure!(generation(admin, "edge-2").await?.is_none(), "edge-2 back");
    // The others are the same sessions.
    assert_eq!(generation(admin, "edge-1").await?, Some(gens[1]));
    assert_eq!(generation(admin, "edge-3").await?, Some(gens[3]));

    // The client CA bundle without edge-3's CA.
    std::fs::write(&paths.client_ca, &pki.ca_cert)?;
    let took = within(Duration::from_secs(5), async || {
        Ok(generation(admin, "edge-3").await?.is_none())
    })
    .await
    .context("the session of an edge whose CA left tls.client_ca was not closed")?;
    eprintln!("distrusted edge's session closed {took:?} after the bundle was written");
    assert_eq!(closed_for(admin, "unknown_ca").await?, 1);
    within(Duration::from_secs(10), async || {
        Ok(refused_with(&edges[3], "UnknownCA"))
    })
    .await
    .with_context(|| format!("edge-3: {:?}", edges[3].state()))?;
    assert_eq!(
        generation(admin, "edge-1").await?,
        Some(gens[1]),
        "edge-1 untouched by either reload"
    );
    assert!(matches!(edges[1].state(), EdgeState::Connected { .. }));
    assert_eq!(closed_for(admin, "revoked").await?, 2, "none closed twice");

    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_closed_when_its_certificate_expires() -> Result<()> {
    init();
    let mut pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0"])?;
    // notAfter to the second, 8 s ahead: time to connect on a busy host.
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 8;
    let not_after = UNIX_EPOCH + Duration::from_secs(secs);
    pki.add_node_until("edge-1", not_after)?;
    let relay = Relay::spawn(relay_config(&pki, 2)?).await?;
    let admin = relay.admin_addr().context("admin")?;
    let mut edges = Vec::new();
    for i in 0..2 {
        let e = EdgeClient::spawn(edge_config(&pki, i, relay.quic_addr())?);
        e.wait_connected(Duration::from_secs(5))
            .await
            .with_context(|| format!("edge-{i} did not connect"))?;
        edges.push(e);
    }
    let gen0 = generation(admin, "edge-0").await?.context("edge-0")?;
    let gen1 = generation(admin, "edge-1").await?.context("edge-1")?;
    // Valid through its notAfter second: still up a moment before.
    let before = not_after - Duration::from_millis(500);
    ensure!(
        SystemTime::now() < before,
        "edges connected too late for this test"
    );
    tokio::time::sleep(before.duration_since(SystemTime::now())?).await;
    assert_eq!(
        generation(admin, "edge-1").await?,
        Some(gen1),
        "closed before its certificate expired"
    );
    // Closed by the sweep once past it: within two sweeps (1 s each) of
    // the second after notAfter.
    within(Duration::from_secs(5), async || {
        Ok(generation(admin, "edge-1").await?.is_none())
    })
    .await
    .context("the session outlived its certificate")?;
    let late = SystemTime::now().duration_since(not_after)?;
    eprintln!("expired edge's session gone {late:?} after its notAfter");
    ensure!(
        late < Duration::from_secs(4),
        "closed {late:?} after notAfter"
    );
    assert_eq!(closed_for(admin, "cert_expired").await?, 1);
    within(Duration::from_secs(10), async || {
        Ok(refused_with(&edges[1], "CertificateExpired"))
    })
    .await
    .with_context(|| format!("edge-1: {:?}", edges[1].state()))?;
    ensure!(generation(admin, "edge-1").await?.is_none(), "edge-1 back");
    assert_eq!(generation(admin, "edge-0").await?, Some(gen0));

    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A certificate given by hand (files) and renewed in place, as
/// cert-manager renews one, before it expires: the edge notices the new
/// files (checked every 10 s), moves its session to the new certificate
/// the way a bootstrapped edge moves at a renewal, and is still connected
/// after the old certificate's notAfter; the relay closes no session for
/// an expired certificate. Without the move the session would run on the
/// old certificate until the relay closed it at that notAfter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_on_disk_moves_the_session_before_the_old_one_expires() -> Result<()>
{
    init();
    let mut pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0"])?;
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 20;
    let not_after = UNIX_EPOCH + Duration::from_secs(secs);
    let short = pki.add_node_until("edge-1", not_after)?.clone();
    let dir =
        TempDir(std::env::temp_dir().join(format!("cert-sessions-renewed-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let (cert, key, ca) = (
        dir.0.join("edge-1.pem"),
        dir.0.join("edge-1-key.pem"),
        dir.0.join("ca.pem"),
    );
    std::fs::write(&cert, &short.cert)?;
    std::fs::write(&key, &short.key)?;
    std::fs::write(&ca, &pki.ca_cert)?;
    let relay = Relay::spawn(relay_config(&pki, 2)?).await?;
    let admin = relay.admin_addr().context("admin")?;
    let mut cfg = edge_config(&pki, 1, relay.quic_addr())?;
    cfg.identity =
        edge_client::config::Identity::Static(TlsMaterial::from_files(&cert, &key, &ca)?);
    cfg.tls_files = Some(edge_client::config::EdgeTlsFiles {
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        relay_ca: ca.clone(),
    });
    let edge = EdgeClient::spawn(cfg);
    edge.wait_connected(Duration::from_secs(5))
        .await
        .context("edge-1 did not connect")?;
    let first = generation(admin, "edge-1").await?.context("edge-1")?;
    // Renewed in place: a new certificate and key (a new key, as
    // cert-manager's default), valid for long.
    let renewed = pki.add_node("edge-1")?.clone();
    std::fs::write(&key, &renewed.key)?;
    std::fs::write(&cert, &renewed.cert)?;
    let moved = within(Duration::from_secs(15), async || {
        Ok(generation(admin, "edge-1")
            .await?
            .is_some_and(|g| g != first))
    })
    .await
    .context("the session did not move to the renewed certificate")?;
    eprintln!("session moved {moved:?} after the files were renewed");
    // Past the old certificate's notAfter (and the relay's sweep): the
    // same new session, nothing closed as expired.
    let second = generation(admin, "edge-1").await?.context("edge-1")?;
    let until = not_after + Duration::from_secs(3);
    if let Ok(wait) = until.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert_eq!(
        generation(admin, "edge-1").await?,
        Some(second),
        "the moved session was closed"
    );
    assert!(matches!(edge.state(), EdgeState::Connected { .. }));
    assert_eq!(closed_for(admin, "cert_expired").await?, 0);
    edge.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
