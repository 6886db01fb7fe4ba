//! rathole, the peer the benchmarks compare with (`loadtest bulk|rr
//! --rathole`, `lab-bulk`): its keys and its two configuration files, so
//! both benchmarks run it the same way. Its server plays the relay (clients
//! connect to the service port it exposes), its client plays the edge (it
//! dials the service); the transport between them is noise
//! (Noise_NK_25519_ChaChaPoly_BLAKE2s over TCP, rathole's encrypted
//! transport that needs no certificates), with `nodelay` on both ends as
//! the tunnel's sockets have.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Result};

use crate::bulk::procs;

/// Where one forwarded service runs.
#[derive(Clone, Copy, Debug)]
pub struct Service<'a> {
    /// The service's name in both files (`[server.services.NAME]`).
    pub name: &'a str,
    /// The token both ends share.
    pub token: &'a str,
    /// The server's control address (the client dials it).
    pub control: SocketAddr,
    /// Where the server exposes the service (clients connect here).
    pub bind: SocketAddr,
    /// What the client forwards to.
    pub target: SocketAddr,
}

/// The two configuration files [`write_configs`] wrote.
#[derive(Clone, Debug)]
pub struct Configs {
    /// `rathole --server FILE`.
    pub server: PathBuf,
    /// `rathole --client FILE`.
    pub client: PathBuf,
}

/// `rathole --genkey`: (private, public), base64.
pub fn genkey(bin: &Path) -> Result<(String, String)> {
    ensure!(
        bin.is_file(),
        "{} not found: run loadtest/peers/install-rathole.sh",
        bin.display()
    );
    let out = procs::run_bounded(
        std::process::Command::new(bin).arg("--genkey"),
        "rathole --genkey",
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "rathole --genkey failed: {}",
        out.stderr
    );
    let mut keys = out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .map(String::from);
    match (keys.next(), keys.next()) {
        (Some(private), Some(public)) => Ok((private, public)),
        _ => bail!("unexpected rathole --genkey output: {}", out.stdout),
    }
}

/// Generates a key pair with `bin` and writes `rathole-server.toml` and
/// `rathole-client.toml` into `dir` for `svc`.
pub fn write_configs(bin: &Path, dir: &Path, svc: Service<'_>) -> Result<Configs> {
    let (private, public) = genkey(bin)?;
    let Service {
        name,
        token,
        control,
        bind,
        target,
    } = svc;
    let server = dir.join("rathole-server.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"{control}\"\n\
             [server.transport]\ntype = \"noise\"\n\
             [server.transport.noise]\nlocal_private_key = \"{private}\"\n\
             [server.services.{name}]\ntoken = \"{token}\"\nbind_addr = \"{bind}\"\nnodelay = true\n"
        ),
    )?;
    let client = dir.join("rathole-client.toml");
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"{control}\"\n\
             [client.transport]\ntype = \"noise\"\n\
             [client.transport.noise]\nremote_public_key = \"{public}\"\n\
             [client.services.{name}]\ntoken = \"{token}\"\nlocal_addr = \"{target}\"\nnodelay = true\n"
        ),
    )?;
    Ok(Configs { server, client })
}
