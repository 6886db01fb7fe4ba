//! rathole, the peer users compare with, on the same loopback path in the
//! same invocation (`bulk --rathole BIN`, `rr --rathole BIN`). Install it
//! with `loadtest/peers/install-rathole.sh` (into `target/peers/`, never
//! committed). Its server plays the relay (the client connects to the
//! service port it exposes), its client plays the edge (it dials the
//! service at the edge's address); the transport between them is noise
//! (Noise_NK_25519_ChaChaPoly_BLAKE2s over TCP, rathole's encrypted
//! transport that needs no certificates).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Bench, ChildGuard};

/// A running rathole server and client forwarding one service.
pub(crate) struct Rathole {
    /// The server process (the relay's role).
    pub(crate) server: ChildGuard,
    /// The client process (the edge's role).
    pub(crate) client: ChildGuard,
    /// Where clients connect (the server's service port).
    pub(crate) addr: SocketAddr,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `rathole --genkey`: (private, public), base64.
fn genkey(bin: &Path) -> Result<(String, String)> {
    let out = std::process::Command::new(bin)
        .arg("--genkey")
        .output()
        .with_context(|| format!("running {} --genkey", bin.display()))?;
    ensure!(out.status.success(), "rathole --genkey failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(':'));
    match (keys.next(), keys.next()) {
        (Some(private), Some(public)) => Ok((private.to_string(), public.to_string())),
        _ => bail!("unexpected rathole --genkey output: {text}"),
    }
}

/// Starts rathole forwarding to `target` and waits until a connection
/// through it reaches the target. `probe` checks one such connection.
pub(crate) async fn start(
    bench: &Bench,
    bin: &Path,
    target: SocketAddr,
    probe: fn(TcpStream) -> futures_probe::Probe,
) -> Result<Rathole> {
    ensure!(
        bin.is_file(),
        "{} not found: run loadtest/peers/install-rathole.sh",
        bin.display()
    );
    let (private, public) = genkey(bin)?;
    let control = free_port()?;
    let service = free_port()?;
    let dir = bench.dir.path();
    let server_cfg = dir.join("rathole-server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\
             [server.transport]\ntype = \"noise\"\n\
             [server.transport.noise]\nlocal_private_key = \"{private}\"\n\
             [server.services.bench]\ntoken = \"loadtest\"\nbind_addr = \"127.0.0.1:{service}\"\nnodelay = true\n"
        ),
    )?;
    let client_cfg = dir.join("rathole-client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\
             [client.transport]\ntype = \"noise\"\n\
             [client.transport.noise]\nremote_public_key = \"{public}\"\n\
             [client.services.bench]\ntoken = \"loadtest\"\nlocal_addr = \"{target}\"\nnodelay = true\n"
        ),
    )?;
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
