//! rathole, the peer users compare with, on the same loopback path in the
//! same invocation (`bulk`, `rr`, `connect` with `--rathole BIN`). Install it
//! with `loadtest/peers/install-rathole.sh` (into `target/peers/`, never
//! committed). Its server plays the relay (the client connects to the
//! service port it exposes), its client plays the edge (it dials the
//! service at the edge's address); keys and configuration files come from
//! [`relay_lab::rathole`], which `lab-bulk` uses too.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Bench, ChildGuard, Via};

/// A running rathole server and client forwarding one service.
pub(crate) struct Rathole {
    /// The server process (the relay's role).
    pub(crate) server: ChildGuard,
    /// The client process (the edge's role).
    pub(crate) client: ChildGuard,
    /// Where clients connect (the server's service port).
    pub(crate) addr: SocketAddr,
}

impl Rathole {
    /// The path through it, labelled `rathole`.
    pub(crate) fn via(&self) -> Via {
        Via::Peer {
            addr: self.addr,
            name: "rathole",
        }
    }
}

/// [`start`] when given a binary (`--rathole BIN`), else nothing.
pub(crate) async fn start_if(
    bench: &Bench,
    bin: Option<&Path>,
    target: SocketAddr,
    probe: fn(TcpStream) -> futures_probe::Probe,
) -> Result<Option<Rathole>> {
    match bin {
        Some(bin) => Ok(Some(start(bench, bin, target, probe).await?)),
        None => Ok(None),
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Starts rathole forwarding to `target` and waits until a connection
/// through it reaches the target. `probe` checks one such connection.
pub(crate) async fn start(
    bench: &Bench,
    bin: &Path,
    target: SocketAddr,
    probe: fn(TcpStream) -> futures_probe::Probe,
) -> Result<Rathole> {
    let control = free_port()?;
    let service = free_port()?;
    let dir = bench.dir.path();
    let cfg = relay_lab::rathole::write_configs(
        bin,
        dir,
        relay_lab::rathole::Service {
            name: "bench",
            token: "loadtest",
            control: ([127, 0, 0, 1], control).into(),
            bind: ([127, 0, 0, 1], service).into(),
            target,
        },
    )?;
    let (server_cfg, client_cfg) = (cfg.server, cfg.client);
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--server").arg(&server_cfg);
    let server = ChildGuard::spawn("rathole server", cmd, &dir.join("rathole-server.log"))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--client").arg(&client_cfg);
    let client = ChildGuard::spawn("rathole client", cmd, &dir.join("rathole-client.log"))?;
    let mut r = Rathole {
        server,
        client,
        addr: SocketAddr::from(([127, 0, 0, 1], service)),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        r.server.check_alive()?;
        r.client.check_alive()?;
        if let Ok(s) = TcpStream::connect(r.addr).await {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), probe(s)).await {
                return Ok(r);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "rathole did not forward to {target} within 20 s (logs in {})",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The probes: one connection through rathole that must reach the service.
pub(crate) mod futures_probe {
    use super::*;

    /// A boxed probe future.
    pub(crate) type Probe = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

    /// For the sink of `bulk`: send nothing, read its 8-byte count.
    pub(crate) fn sink(mut s: TcpStream) -> Probe {
        Box::pin(async move {
            s.shutdown().await?;
            let mut got = [0u8; 8];
            s.read_exact(&mut got).await?;
            Ok(())
        })
    }

    /// For the echo service of `rr`: one byte there and back.
    pub(crate) fn echo(mut s: TcpStream) -> Probe {
        Box::pin(async move {
            s.write_all(b"x").await?;
            let mut got = [0u8; 1];
            s.read_exact(&mut got).await?;
            Ok(())
        })
    }
}
