//! Hidden child-process roles. `relay-process` and `edge-process` call the
//! same library entry points as the `relay-server` and `edge-client`
//! binaries (used only when those are not built next to this one);
//! `echo-process` is the idle echo service of `streams`, in its own
//! process so its sockets count against neither the relay nor the edge.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

/// `relay-process --config F --ready-file R`.
#[derive(clap::Args, Debug)]
pub(crate) struct RelayArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    ready_file: PathBuf,
}

/// `edge-process --config F`.
#[derive(clap::Args, Debug)]
pub(crate) struct EdgeArgs {
    #[arg(long)]
    config: PathBuf,
}

/// `echo-process --addr A --ready-file R`.
#[derive(clap::Args, Debug)]
pub(crate) struct EchoArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    ready_file: PathBuf,
}

pub(crate) async fn terminated() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Writes then renames, so a reader never sees half a file.
pub(crate) fn write_ready(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs a relay from a config file until SIGTERM, then drains.
pub(crate) async fn relay(a: RelayArgs) -> Result<()> {
    relay_lab::init();
    let cfg = relay_server::FileConfig::load(&a.config)?;
    let grace = cfg.limits.drain_grace;
    let mut relay = relay_server::Relay::spawn(cfg).await?;
    let ready = serde_json::json!({
        "quic": relay.quic_addr().to_string(),
        "connect": relay.connect_addr().map(|a| a.to_string()),
        "admin": relay.admin_addr().map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    write_ready(&a.ready_file, &ready.to_string())?;
    tokio::select! {
        r = terminated() => r?,
        why = relay.wait() => anyhow::bail!("relay failed: {why}"),
    }
    relay.shutdown(grace).await;
    Ok(())
}

/// Runs an edge client from a config file until SIGTERM.
pub(crate) async fn edge(a: EdgeArgs) -> Result<()> {
    relay_lab::init();
    let cfg = edge_client::FileConfig::load(&a.config)?;
    // `start`, not `spawn`: it binds the status endpoint (`status_listen`).
    let client = edge_client::EdgeClient::start(cfg).await?;
    terminated().await?;
    client.shutdown().await;
    Ok(())
}

/// Runs an echo server until SIGTERM.
pub(crate) async fn echo(a: EchoArgs) -> Result<()> {
    let (addr, _task) = relay_lab::spawn_echo(a.addr).await?;
    write_ready(&a.ready_file, &addr.to_string())?;
    terminated().await
}
