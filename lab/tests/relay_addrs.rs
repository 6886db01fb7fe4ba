//! The relay's addresses kept across an edge restart (`relay_addrs_file`),
//! on loopback with a real relay and real edge clients: an edge restarted
//! while DNS is down (a reboot after a site power cut, with the site's or
//! the carrier's resolver still out) dials the addresses its relay's name
//! last resolved to, instead of failing every attempt until DNS returns.
//!
//! The first run resolves `localhost` and must save what it got. The
//! restart is then played with a name under `.invalid` (RFC 6761: it never
//! resolves), the file naming it as the first run would have: with the
//! file the edge connects, without it the edge never does.

use relay_lab::TempDir;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edge_client::{EdgeClient, EdgeState};
use relay_lab::traffic::eventually;
use relay_lab::{edge_config, Lab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_while_dns_is_down_dials_the_saved_addresses() -> Result<()> {
    let mut lab = Lab::start(1, |_| {}).await?;
    for e in std::mem::take(&mut lab.edges) {
        e.shutdown().await;
    }
    let port = lab.relay.quic_addr().port();
    let dir = TempDir::new("relay-addrs")?;
    let file = dir.path().join("relay-addrs.json");
    let mut cfg = edge_config(&lab.pki, 0, lab.relay.quic_addr())?;
    cfg.relay_addrs_file = Some(file.clone());

    // First run: the name resolves; what it resolved to is saved.
    cfg.relay = format!("localhost:{port}");
    let e = EdgeClient::spawn(cfg.clone());
    e.wait_connected(Duration::from_secs(10))
        .await
        .context("first run connects")?;
    let want = format!("127.0.0.1:{port}");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    let name = format!("\"localhost:{port}\"");
    let saved = eventually(Duration::from_secs(5), || {
        let text = read();
        text.contains(&name) && text.contains(&want)
    })
    .await;
    ensure!(saved, "the resolved addresses not saved: {:?}", read());
    let saved = read();
    e.shutdown().await;

    // The restart, the name no longer resolving: the saved addresses
    // stand in.
    cfg.relay = format!("relay.invalid:{port}");
    std::fs::write(
        &file,
        saved.replace(&name, &format!("\"relay.invalid:{port}\"")),
    )?;
    let e = EdgeClient::spawn(cfg.clone());
    e.wait_connected(Duration::from_secs(15))
        .await
        .with_context(|| format!("restart with saved addresses: {:?}", e.state()))?;
    e.shutdown().await;

    // The same restart without the file never connects.
    cfg.relay_addrs_file = None;
    let e = EdgeClient::spawn(cfg);
    let connected = e.wait_connected(Duration::from_secs(6)).await;
    let state = e.state();
    e.shutdown().await;
    ensure!(connected.is_none(), "connected without saved addresses");
    ensure!(
        matches!(state, EdgeState::Connecting { .. }),
        "still trying: {state:?}"
    );
    lab.stop().await;
    Ok(())
}
