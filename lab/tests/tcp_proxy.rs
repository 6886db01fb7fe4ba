//! A site whose only way out is an HTTP forward proxy: edge1's NAT
//! forwards nothing from the site to the WAN (no UDP, no direct TCP); a
//! CONNECT proxy on the NAT host (its own process, like a corporate
//! Squid at the site's edge) is the only path, and wants credentials.
//!
//! With `tcp_proxy` set, edge1's QUIC attempt gets no answer, it falls
//! back to TLS over TCP through the proxy (the relay's name and port in
//! the proxy's CONNECT, credentials sent), and cloud pods reach edge1's
//! pod. The relay sees the session arrive from the NAT's WAN address, the
//! proxy's own. Wrong credentials: the edge says so in `/readyz` (the
//! proxy's 407), with no session. Then again with no default route on
//! the edge host, only its LAN: the relay's address has no route, and the
//! proxy reaches it all the same.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. About 10 s.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config, edge_readiness, http_from, lab_pki, launch, relay_config, sa, services, session,
    start_edge, start_relay, within, Running, EDGE_STATUS, HTTP,
};
use relay_transport::proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy's port on nat1's LAN address.
const PROXY_PORT: u16 = 3128;
/// `Basic` credentials the proxy wants: base64 of `shop:s3cret`.
const WANTED: &str = "Proxy-Authorization: Basic c2hvcDpzM2NyZXQ=";

/// One proxied connection: reads the CONNECT head, checks the
/// credentials (407 without them), dials the target, answers 200 (counted
/// in `tunnels`) and copies both ways.
async fn serve_one(mut c: TcpStream, tunnels: &AtomicU64) -> Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 8192, "head too long");
        ensure!(c.read(&mut b).await? == 1, "closed mid-head");
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let target = text
        .strip_prefix("CONNECT ")
        .and_then(|r| r.split_whitespace().next())
        .context("not a CONNECT")?
        .to_string();
    if !text.lines().any(|l| l == WANTED) {
        c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"shop\"\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut up = TcpStream::connect(&target).await?;
    c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tunnels.fetch_add(1, Relaxed);
    let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
    Ok(())
}

/// The proxy on nat1, counting the tunnels it opened.
fn proxy_on_nat1(lab: &NetnsLab, tunnels: Arc<AtomicU64>) -> Result<Running> {
    launch(lab, Role::Nat1, "proxy", move |ready, stop| async move {
        let l = TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, PROXY_PORT)).await?;
        let _ = ready.send(Ok(()));
        let serve = async {
            loop {
                let Ok((c, _)) = l.accept().await else { return };
                let tunnels = tunnels.clone();
                tokio::spawn(async move {
                    let _ = serve_one(c, &tunnels).await;
                });
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = serve => {}
        }
        Ok(())
    })
}

/// Edge1 with `cfg`, running until stopped, not waited for (it may never
/// connect).
fn edge_not_waited(lab: &NetnsLab, cfg: edge_client::EdgeConfig) -> Result<Running> {
    launch(lab, Role::Edge1, "edge1", move |ready, stop| async move {
        let edge = edge_client::EdgeClient::start(cfg).await?;
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        edge.shutdown().await;
        Ok(())
    })
}

fn run() -> Result<()> {
    let lab = NetnsLab::new()?;
    let pki = lab_pki()?;
    let _svc = services(&lab, Role::Epod1, "epod1")?;
    // Nothing from the site is forwarded to the WAN: the proxy, a process
    // on the NAT host itself, is the only way out.
    lab.drop_upstream(1)?;
    let tunnels = Arc::new(AtomicU64::new(0));
    let _proxy = proxy_on_nat1(&lab, tunnels.clone())?;
    let _relay = start_relay(&lab, relay_config(&pki)?)?;
    let proxy_url = |creds: &str| {
        HttpProxy::parse(&format!(
            "http://{creds}@{}:{PROXY_PORT}",
            netns::nat_lan_ip(1)
        ))
    };

    // Wrong credentials first: no session, and the edge says why.
    let mut cfg = edge_config(&pki, 1)?;
    cfg.quic_fallback_after = Duration::from_secs(1);
    cfg.tcp_proxy = Some(proxy_url("shop:wrong").map_err(anyhow::Error::msg)?);
    cfg.status_listen = Some(EDGE_STATUS);
    let edge = edge_not_waited(&lab, cfg.clone())?;
    within(Duration::from_secs(10), || {
        let (_, body) = edge_readiness(&lab, 1)?;
        Ok(body.contains("wants credentials other than those given"))
    })
    .with_context(|| format!("/readyz never named the 407: {:?}", edge_readiness(&lab, 1)))?;
    ensure!(
        session(&lab, "edge1")?.is_none(),
        "a session without credentials"
    );
    drop(edge);

    cfg.tcp_proxy = Some(proxy_url("shop:s3cret").map_err(anyhow::Error::msg)?);
    let edge = start_edge(&lab, 1, cfg.clone())?;
    let epod1 = sa(netns::edge_pod_ip(1), HTTP);
    let took = within(Duration::from_secs(10), || {
        Ok(http_from(&lab, Role::Cpod2, epod1).is_ok_and(|b| b.ends_with("epod1")))
    })
    .context("cpod2 never reached epod1 through the proxied fallback")?;
    let row = session(&lab, "edge1")?.context("no session")?;
    ensure!(row.transport == "tcp", "transport {}", row.transport);
    let from: SocketAddr = row.remote_addr.parse()?;
    ensure!(
        from.ip() == std::net::IpAddr::V4(netns::nat_wan_ip(1)),
        "session from {from}, not the proxy host's WAN address"
    );
    ensure!(tunnels.load(Relaxed) >= 1, "the proxy opened no tunnel");
    eprintln!(
        "tcp_proxy: cpod2 → epod1 through the proxied fallback after {took:?}; session from {from}; {} tunnel(s)",
        tunnels.load(Relaxed)
    );

    // Such a site often has no default route at all, only its LAN: the
    // relay's address has no route, and the proxy still reaches it (the
    // edge once refused to dial an address without a route, proxy or not).
    drop(edge);
    lab.exec(Role::Edge1, &["ip", "route", "del", "default"])?;
    let before = tunnels.load(Relaxed);
    let _edge = start_edge(&lab, 1, cfg)?;
    let took = within(Duration::from_secs(10), || {
        Ok(http_from(&lab, Role::Cpod2, epod1).is_ok_and(|b| b.ends_with("epod1")))
    })
    .context("no default route: cpod2 never reached epod1 through the proxy")?;
    ensure!(
        tunnels.load(Relaxed) > before,
        "the proxy opened no new tunnel"
    );
    eprintln!("tcp_proxy, no default route: cpod2 → epod1 after {took:?}");
    Ok(())
}

#[test]
fn a_site_whose_only_way_out_is_an_http_proxy() -> Result<()> {
    if let Some(skip) = netns::require_root() {
        eprintln!("SKIPPED tcp_proxy: {skip}");
        return Ok(());
    }
    relay_lab::init();
    run()
}
