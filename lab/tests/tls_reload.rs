//! Certificate revocation and reloading, with real QUIC and TLS on
//! loopback: the relay reads `[tls]` from files (certificate, key, client
//! CA, CRL) and reloads them when they change or when asked (SIGHUP calls
//! `Relay::reload_tls`).
//!
//! - A CRL revoking edge-0 is picked up by the file watcher; new
//!   handshakes with edge-0's certificate are refused, the relay closes
//!   edge-0's live session (its certificate verified again with the new
//!   list) and its reconnection is refused at the TLS handshake, while
//!   edge-1 is never disturbed.
//! - A renewed relay certificate (new key) is served to new QUIC and TLS
//!   connections at once, while edge-1's session stays the same one.
//! - The CONNECT listener's `[connect_tls]` and the admin API's
//!   certificates reload the same way, and `connect_tls.crl` refuses
//!   revoked CONNECT clients, also when the list changes while running.

use relay_lab::TempDir;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::{edge_config, init, relay_config};
use relay_server::config::TlsReload;
use relay_server::Relay;
use relay_transport::devcerts::DevPki;
use relay_transport::reload::{crls_from_pem, TlsPaths};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use relay_lab::within_async as within;

/// The generation of `node`'s session on the relay, if it has one.
async fn generation(relay: &Relay, node: &str) -> Result<Option<u64>> {
    let admin = relay.admin_addr().context("admin listener")?;
    relay_lab::session_generation(admin, node).await
}

/// The leaf certificate a new QUIC connection and a new TLS-over-TCP
/// connection are served, as edge-1 sees them.
async fn served_leaves(
    pki: &DevPki,
    relay: &Relay,
) -> Result<(CertificateDer<'static>, CertificateDer<'static>)> {
    let m = pki.node_material("edge-1")?;
    let ep = relay_transport::quic::client_endpoint(
        "127.0.0.1:0".parse()?,
        &m,
        &relay_transport::QuicTuning::default(),
        0,
    )?;
    let conn = ep.connect(relay.quic_addr(), "localhost")?.await?;
    let quic = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned())
        .context("no QUIC peer certificate")?;
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    let cfg = m.client_config(relay_protocol::ALPN)?;
    let tcp = tokio::net::TcpStream::connect(relay.quic_addr()).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let tcp_leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .context("no TLS peer certificate")?;
    Ok((quic, tcp_leaf))
}

/// The relay's files as `DevPki::write_to` names them in `dir`, with `crl`.
fn relay_paths(dir: &std::path::Path, crl: Option<PathBuf>) -> TlsPaths {
    TlsPaths {
        cert: dir.join("relay.pem"),
        key: dir.join("relay-key.pem"),
        client_ca: dir.join("ca.pem"),
        crl,
    }
}

fn der(pem: &str) -> Result<CertificateDer<'static>> {
    Ok(relay_transport::tls::certs_from_pem(pem.as_bytes(), "cert")?.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_edges_are_refused_and_renewed_certificates_served_without_dropping_sessions(
) -> Result<()> {
    init();
    let dir = TempDir(std::env::temp_dir().join(format!("tls-reload-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0", "edge-1"])?;
    pki.write_to(&dir.0)?;
    let crl = dir.0.join("crl.pem");
    std::fs::write(&crl, pki.crl_revoking(&[])?)?;
    let paths = relay_paths(&dir.0, Some(crl.clone()));
    let mut cfg = relay_config(&pki, 2)?;
    cfg.tls_crls = crls_from_pem(&std::fs::read(&crl)?, "crl")?;
    cfg.tls_reload = Some(TlsReload {
        paths: paths.clone(),
        interval: Duration::from_millis(200),
    });
    let relay = Relay::spawn(cfg).await?;
    let mut edges = Vec::new();
    for i in 0..2 {
        let e = EdgeClient::spawn(edge_config(&pki, i, relay.quic_addr())?);
        e.wait_connected(Duration::from_secs(10))
            .await
            .with_context(|| format!("edge-{i} did not connect"))?;
        edges.push(e);
    }
    let gen0 = generation(&relay, "edge-0")
        .await?
        .context("edge-0 session")?;
    let gen1 = generation(&relay, "edge-1")
        .await?
        .context("edge-1 session")?;

    // Revoke edge-0: a new CRL file, seen by the watcher (its length and
    // change time move, whatever the clock's resolution).
    let edge0_cert = &pki.nodes[0].1.cert;
    std::fs::write(&crl, pki.crl_revoking(&[edge0_cert])?)?;
    // Once reloaded, a handshake with edge-0's certificate fails: probe
    // with a fresh QUIC connection until it does.
    let m0 = pki.node_material("edge-0")?;
    let took = within(Duration::from_secs(5), async || {
        let ep = relay_transport::quic::client_endpoint(
            "127.0.0.1:0".parse()?,
            &m0,
            &relay_transport::QuicTuning::default(),
            0,
        )?;
        let refused = match ep.connect(relay.quic_addr(), "localhost")?.await {
            // TLS 1.3: the client may finish first; the server's verdict
            // then closes the connection.
            Ok(c) => tokio::time::timeout(Duration::from_secs(2), c.closed())
                .await
                .is_ok(),
            Err(_) => true,
        };
        ep.close(0u32.into(), b"");
        Ok(refused)
    })
    .await
    .context("the CRL was not applied to new handshakes")?;
    eprintln!("CRL applied to new handshakes after {took:?}");
    // The relay closed edge-0's live session itself (its certificate
    // verified again with the new list: `session::cert_check`); edge-1's
    // is the same one. Before, edge-0's stayed up until something else
    // closed it.
    let admin = relay.admin_addr().context("admin")?;
    within(Duration::from_secs(5), async || {
        Ok(generation(&relay, "edge-0").await? != Some(gen0))
    })
    .await
    .context("edge-0's live session outlived its revocation")?;
    assert_eq!(generation(&relay, "edge-1").await?, Some(gen1));

    // Its reconnection must be refused at TLS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        generation(&relay, "edge-0").await?,
        None,
        "a revoked edge must not come back"
    );
    assert!(
        !matches!(edges[0].state(), EdgeState::Connected { .. }),
        "edge-0: {:?}",
        edges[0].state()
    );
    // What the edge reports (its `/readyz`, its log): the relay's verdict
    // by name, on QUIC and on the TCP fallback, not a connection lost.
    let says_revoked = |e: &EdgeClient| {
        matches!(e.state(), EdgeState::Connecting { last: Some(l), .. }
            if l.contains("refused this edge's certificate: TLS alert CertificateRevoked"))
    };
    within(Duration::from_secs(10), async || {
        Ok(says_revoked(&edges[0]))
    })
    .await
    .with_context(|| format!("edge-0 over QUIC: {:?}", edges[0].state()))?;
    let mut over_tcp = edge_config(&pki, 0, relay.quic_addr())?;
    over_tcp.transport = edge_client::config::TransportMode::Tcp;
    over_tcp.tcp_fallback_port = Some(relay.tcp_fallback_addr().context("tcp")?.port());
    let tcp_edge = EdgeClient::spawn(over_tcp);
    within(Duration::from_secs(10), async || {
        Ok(says_revoked(&tcp_edge))
    })
    .await
    .with_context(|| format!("edge-0 over TCP: {:?}", tcp_edge.state()))?;
    tcp_edge.shutdown().await;
    let (_, metrics) = relay_lab::admin_get(admin, "/metrics", None).await?;
    let tls_failures = metrics
        .lines()
        .find(|l| l.starts_with("relay_handshake_failures_total{reason=\"revoked\"}"))
        .context("revoked failure metric")?
        .to_string();
    assert!(!tls_failures.ends_with(" 0"), "{tls_failures}");
    assert_eq!(
        generation(&relay, "edge-1").await?,
        Some(gen1),
        "edge-1 undisturbed"
    );

    // Renew the relay's certificate (new key), then reload as SIGHUP does.
    let (old_quic, old_tcp) = served_leaves(&pki, &relay).await?;
    assert_eq!(old_quic, der(&pki.relay.cert)?);
    assert_eq!(old_tcp, old_quic);
    let renewed = pki.issue_relay(&["localhost", "127.0.0.1"])?;
    std::fs::write(&paths.key, &renewed.key)?;
    std::fs::write(&paths.cert, &renewed.cert)?;
    let leaf = relay.reload_tls()?;
    assert_eq!(leaf, der(&renewed.cert)?);
    let (new_quic, new_tcp) = served_leaves(&pki, &relay).await?;
    assert_eq!(
        new_quic, leaf,
        "new QUIC connections get the renewed certificate"
    );
    assert_eq!(
        new_tcp, leaf,
        "new TLS connections get the renewed certificate"
    );
    assert_eq!(
        generation(&relay, "edge-1").await?,
        Some(gen1),
        "edge-1's session stays the same one across the renewal"
    );
    // And it still carries streams: the session is alive, not just listed.
    assert!(matches!(edges[1].state(), EdgeState::Connected { .. }));

    // A broken replacement (a key that does not match) changes nothing.
    std::fs::write(&paths.key, &pki.nodes[1].1.key)?;
    assert!(relay.reload_tls().is_err());
    let (still, _) = served_leaves(&pki, &relay).await?;
    assert_eq!(still, leaf);

    for e in edges {
        e.shutdown().await;
    }
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// A TLS client of a relay listener presenting edge-1's certificate if
/// asked (the CONNECT listener asks, as kube-apiserver presents its egress
/// certificate; the admin API does not); returns the stream and the leaf
/// it was served.
async fn tls_to(
    pki: &DevPki,
    addr: std::net::SocketAddr,
) -> Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    CertificateDer<'static>,
)> {
    tls_as(pki, "edge-1", addr).await
}

/// [`tls_to`] presenting `node`'s certificate.
async fn tls_as(
    pki: &DevPki,
    node: &str,
    addr: std::net::SocketAddr,
) -> Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    CertificateDer<'static>,
)> {
    let cfg = pki.node_material(node)?.client_config(b"http/1.1")?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .context("no peer certificate")?;
    Ok((tls, leaf))
}

/// Sends `CONNECT target` on `s` and expects `200`.
async fn connect_on<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: std::net::SocketAddr,
) -> Result<()> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 4096, "endless response head");
        ensure!(
            s.read(&mut b).await? == 1,
            "closed during the response head"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(())
}

/// Writes `msg` and expects it echoed back.
async fn echoes<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
    ensure!(back == msg, "echo differs");
    Ok(())
}

/// A relay from `cfg`, edge-0 connected to it, and an echo service behind
/// edge-0 (its address, and the task to keep while it is used).
async fn relay_and_edge0(
    cfg: relay_server::RelayConfig,
    pki: &DevPki,
) -> Result<(
    Relay,
    EdgeClient,
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
)> {
    let relay = Relay::spawn(cfg).await?;
    let edge = EdgeClient::spawn(edge_config(pki, 0, relay.quic_addr())?);
    edge.wait_connected(Duration::from_secs(10))
        .await
        .context("edge-0 did not connect")?;
    let (echo, task) =
        relay_lab::spawn_echo(std::net::SocketAddr::new(relay_lab::edge_ip(0), 0)).await?;
    Ok((relay, edge, echo, task))
}

/// The CONNECT listener's `[connect_tls]` certificate and the admin API's
/// certificate are reloaded like the relay's own: a renewal is served to
/// new connections at once, tunnels and connections already open carry
/// on, and a broken replacement changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_admin_certificates_reload_without_dropping_connections() -> Result<()> {
    init();
    let dir =
        TempDir(std::env::temp_dir().join(format!("tls-reload-listeners-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0", "edge-1"])?;
    pki.write_to(&dir.0)?;
    let files = |name: &str| -> Result<TlsPaths> {
        let p = TlsPaths {
            cert: dir.0.join(format!("{name}.pem")),
            key: dir.0.join(format!("{name}-key.pem")),
            client_ca: dir.0.join("ca.pem"),
            crl: None,
        };
        std::fs::copy(dir.0.join("relay.pem"), &p.cert)?;
        std::fs::copy(dir.0.join("relay-key.pem"), &p.key)?;
        Ok(p)
    };
    let (connect_files, admin_files) = (files("connect")?, files("admin")?);
    let material =
        |p: &TlsPaths| relay_transport::TlsMaterial::from_files(&p.cert, &p.key, &p.client_ca);
    let mut cfg = relay_config(&pki, 1)?;
    cfg.connect_tls = Some(material(&connect_files)?);
    cfg.connect_tls_files = Some(connect_files.clone());
    cfg.admin_tls = Some(material(&admin_files)?);
    cfg.admin_tls_files = Some(admin_files.clone());
    cfg.tls_reload = Some(TlsReload {
        paths: relay_paths(&dir.0, None),
        interval: Duration::from_millis(200),
    });
    let (relay, edge, echo, _e) = relay_and_edge0(cfg, &pki).await?;
    let (connect, admin) = (
        relay.connect_addr().context("connect listener")?,
        relay.admin_addr().context("admin listener")?,
    );
    let original = der(&pki.relay.cert)?;
    // Before: a tunnel open through CONNECT over TLS, and a TLS connection
    // to the CONNECT listener that has not asked for anything yet.
    let (mut tunnel, leaf) = tls_to(&pki, connect).await?;
    assert_eq!(leaf, original);
    connect_on(&mut tunnel, echo).await?;
    echoes(&mut tunnel, b"before").await?;
    let (mut idle, _) = tls_to(&pki, connect).await?;
    assert_eq!(tls_to(&pki, admin).await?.1, original);

    // Renew both listeners' certificates: the file watcher picks them up.
    let renewed = pki.issue_relay(&["localhost", "127.0.0.1"])?;
    for p in [&connect_files, &admin_files] {
        std::fs::write(&p.key, &renewed.key)?;
        std::fs::write(&p.cert, &renewed.cert)?;
    }
    let new = der(&renewed.cert)?;
    let took = within(Duration::from_secs(5), async || {
        Ok(tls_to(&pki, connect).await?.1 == new && tls_to(&pki, admin).await?.1 == new)
    })
    .await
    .context("the renewed certificates were not served")?;
    eprintln!("connect_tls and admin certificates served {took:?} after the files changed");
    // What was open carries on.
    echoes(&mut tunnel, b"after the renewal").await?;
    connect_on(&mut idle, echo).await?;
    echoes(&mut idle, b"opened before, used after").await?;
    // The relay's own certificate was not touched by these files.
    assert_eq!(served_leaves(&pki, &relay).await?.0, original);

    // A broken replacement (a key that does not match) changes nothing,
    // and an explicit reload (SIGHUP) reports it.
    std::fs::write(&connect_files.key, &pki.nodes[1].1.key)?;
    assert!(
        relay.reload_tls().is_err(),
        "a broken connect_tls key must be reported"
    );
    assert_eq!(tls_to(&pki, connect).await?.1, new);
    assert_eq!(tls_to(&pki, admin).await?.1, new);
    echoes(&mut tunnel, b"still").await?;

    edge.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// `connect_tls.crl`: the CONNECT listener refuses a client whose
/// certificate is revoked (kube-apiserver's egress certificate, leaked),
/// from the list read at start and from a new list the file watcher picks
/// up, while a tunnel opened before the revocation carries on (a reload
/// applies to new handshakes) and other clients are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_connect_clients_are_refused_while_open_tunnels_carry_on() -> Result<()> {
    init();
    let dir = TempDir(
        std::env::temp_dir().join(format!("tls-reload-connect-crl-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&dir.0);
    let pki = DevPki::generate(&["localhost", "127.0.0.1"], &["edge-0", "edge-1", "edge-2"])?;
    pki.write_to(&dir.0)?;
    // edge-2's certificate stands for a leaked client certificate, revoked
    // from the start; edge-1's for kube-apiserver's, revoked later.
    let crl = dir.0.join("connect-crl.pem");
    std::fs::write(&crl, pki.crl_revoking(&[&pki.nodes[2].1.cert])?)?;
    let paths = relay_paths(&dir.0, Some(crl.clone()));
    let mut cfg = relay_config(&pki, 1)?;
    cfg.connect_tls = Some(relay_transport::TlsMaterial::from_files(
        &paths.cert,
        &paths.key,
        &paths.client_ca,
    )?);
    cfg.connect_tls_crls = crls_from_pem(&std::fs::read(&crl)?, "crl")?;
    cfg.connect_tls_files = Some(paths.clone());
    cfg.tls_reload = Some(TlsReload {
        paths: TlsPaths {
            crl: None,
            ..paths.clone()
        },
        interval: Duration::from_millis(200),
    });
    let (relay, edge, echo, _e) = relay_and_edge0(cfg, &pki).await?;
    let connect = relay.connect_addr().context("connect listener")?;

    // A CONNECT through a client presenting `node`'s certificate: whether
    // it got its tunnel. TLS 1.3: the client may finish its handshake
    // before the server's verdict, which then arrives as an alert on the
    // first read, so the refusal shows as an error at any step.
    let tunnel_as = async |node: &str| -> bool {
        let attempt = async {
            let (mut s, _) = tls_as(&pki, node, connect).await?;
            connect_on(&mut s, echo).await?;
            echoes(&mut s, b"through").await
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .is_ok_and(|r| r.is_ok())
    };
    assert!(
        !tunnel_as("edge-2").await,
        "a client certificate revoked by the CRL read at start got a tunnel"
    );
    let (mut open, _) = tls_as(&pki, "edge-1", connect).await?;
    connect_on(&mut open, echo).await?;
    echoes(&mut open, b"before the revocation").await?;

    // Revoke edge-1's certificate too: the watcher picks the new list up.
    std::fs::write(
        &crl,
        pki.crl_revoking(&[&pki.nodes[2].1.cert, &pki.nodes[1].1.cert])?,
    )?;
    let took = within(Duration::from_secs(5), async || {
        Ok(!tunnel_as("edge-1").await)
    })
    .await
    .context("the new connect_tls CRL was not applied to new handshakes")?;
    eprintln!("connect_tls CRL applied to new handshakes after {took:?}");
    assert!(!tunnel_as("edge-2").await, "edge-2 stays revoked");
    // Not revoked: still served.
    assert!(tunnel_as("edge-0").await, "an unrevoked client is refused");
    // The tunnel opened before carries on.
    echoes(&mut open, b"after the revocation").await?;

    edge.shutdown().await;
    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
