//! `edge-client`: the edge side of the edge relay.
//!
//! `edge-client --config edge.toml` dials the relay and serves its streams
//! until SIGTERM/SIGINT. It opens no listening socket but the status
//! endpoint, when `status_listen` sets one.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edge_client::{EdgeClient, FileConfig};
use tokio::signal::unix::{signal, SignalKind};

/// Reverse-tunnel relay for Kubernetes edge nodes behind NAT (edge side).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file (see README "Configuration reference").
    #[arg(
        short,
        long,
        env = "EDGE_CONFIG",
        required_unless_present = "probe_ready"
    )]
    config: Option<PathBuf>,
    /// Override `node` from the file (e.g. from the downward API).
    #[arg(long, env = "EDGE_NODE_NAME")]
    node: Option<String>,
    /// Override `relay` (host:port) from the file.
    #[arg(long, env = "EDGE_RELAY")]
    relay: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Ask the running client's status endpoint at this address (its
    /// `status_listen`) whether it is ready, print its answer and exit 0
    /// if ready, 1 if not: kubelet's exec readiness probe, whose Event then
    /// says why (see `edge_client::probe`). Reads no configuration.
    #[arg(long, value_name = "ADDR", conflicts_with = "check")]
    probe_ready: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    if let Some(listen) = cli.probe_ready {
        probe_ready(listen);
    }
    relay_transport::tls::install_default_provider();
    let path = cli.config.context("--config is required")?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut file = FileConfig::parse(&text)?;
    if let Some(n) = cli.node {
        file.node = n;
    }
    if let Some(r) = cli.relay {
        file.relay = r;
    }
    let cfg = file.into_runtime()?;
    if cli.check {
        println!(
            "{}: ok (node {}, relay {}, {} routes)",
            path.display(),
            cfg.node,
            cfg.relay,
            cfg.routes.len()
        );
        return Ok(());
    }
    // One worker by default (`worker_threads`): see
    // `edge_client::config::DEFAULT_WORKER_THREADS`. 0 leaves it to tokio
    // (`TOKIO_WORKER_THREADS`, else one per CPU).
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads);
    }
    // After a trim each worker shrinks its own malloc heap (memory::on_park).
    rt.enable_all()
        .on_thread_park(relay_transport::memory::on_park)
        .build()?
        .block_on(run(cfg))
}

/// `--probe-ready`: prints what `/readyz` says and exits, 0 if ready,
/// else 1.
fn probe_ready(listen: std::net::SocketAddr) -> ! {
    // Under kubelet's probe timeout (the manifest's 5 s), so the answer
    // is ours, not kubelet's "timed out".
    match edge_client::probe::readiness(listen, std::time::Duration::from_secs(3)) {
        Ok(r) => {
            println!("{}", r.text);
            std::process::exit(if r.ready { 0 } else { 1 })
        }
        Err(e) => {
            println!("status endpoint {listen} did not answer: {e}");
            std::process::exit(1)
        }
    }
}

/// Runs the client until SIGTERM or SIGINT.
async fn run(cfg: edge_client::EdgeConfig) -> anyhow::Result<()> {
    relay_transport::fd_limit::raise_and_log("edge-client");
    let client = EdgeClient::start(cfg).await?;
    // Memory of a load peak (thousands of streams) goes back to the
    // system once the peak has passed.
    relay_transport::memory::spawn_trim_after_peaks();
    // Bulk streams free and reallocate 64 KiB chunks all the time; a
    // heap that shrank after each costs page faults (memory::keep_heap_top).
    relay_transport::memory::keep_heap_top();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    client.shutdown().await;
    Ok(())
}
