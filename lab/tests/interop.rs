//! Rolling upgrades: the previous release's binaries against this build's,
//! both ways, on loopback, as real processes.
//!
//! During a rollout old and new edges and relays meet: a new edge behind an
//! old relay, an old edge behind a new relay, old and new edges on one
//! relay while routes change (which is when a relay sends control messages
//! an edge may not know). Each must keep its session and its traffic.
//!
//! The previous release is built from the repository's own history by
//! `.ci/interop` (the release named in `.ci/previous-release`), which runs
//! this test with `PREV_BIN_DIR` pointing at its binaries. Ignored under a
//! plain `cargo test`: it needs that build.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use relay_lab::scenario::{relay_server_binary, relay_toml};
use relay_lab::{connect_via, edge_ip, edge_name, http_get, relay_config, spawn_http};
use relay_transport::devcerts::DevPki;

/// A child process killed (SIGKILL) on drop, so a failing test leaves
/// nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc(child))
}

/// Polls `f` every 100 ms until it yields a value or `limit` passes.
async fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f().await {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what}: not within {limit:?}")
}

/// Node name → session generation, from the relay's admin API (the row
/// shape is the same in both releases).
async fn sessions(admin: SocketAddr) -> Result<Vec<(String, u64)>> {
    let (code, body) = relay_lab::admin_get(admin, "/v1/sessions", None).await?;
    ensure!(code == 200, "admin answered {code}: {body}");
    let rows: serde_json::Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    for r in rows.as_array().context("sessions is not a list")? {
        let node = r["node"].as_str().context("node")?.to_string();
        out.push((node, r["generation"].as_u64().context("generation")?));
    }
    out.sort();
    Ok(out)
}

/// `CONNECT <edge i's address>:<port>` through the relay and a GET.
async fn fetch(connect: SocketAddr, i: usize, port: u16) -> Result<String> {
    let s = connect_via(connect, &SocketAddr::new(edge_ip(i), port).to_string()).await?;
    let (code, body) = http_get(s, &edge_name(i), "/", None).await?;
    ensure!(code == 200, "edge {i}: HTTP {code}");
    Ok(body)
}

fn edge_toml(dir: &Path, i: usize, relay: SocketAddr) -> String {
    let n = edge_name(i);
    let p = |f: String| format!("{:?}", dir.join(f).display().to_string());
    format!(
        "node = {n:?}\nrelay = \"{relay}\"\nserver_name = \"localhost\"\nroutes = [\"{ip}/32\"]\nprimary_addr = \"{ip}\"\n\
         transport = \"quic\"\n\n[tls]\ncert = {}\nkey = {}\nrelay_ca = {}\n\n[backoff]\ninitial = \"100ms\"\nmax = \"1s\"\n\n\
         [quic]\nkeepalive = \"1s\"\nidle_timeout = \"10s\"\n",
        p(format!("{n}.pem")),
        p(format!("{n}-key.pem")),
        p("ca.pem".into()),
        ip = edge_ip(i),
    )
}

/// One relay binary and one binary per edge: sessions come up, traffic
/// flows, and survives the route changes a second edge causes.
async fn scenario(label: &str, relay_bin: &Path, edge_bins: [&Path; 2]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "interop-{}-{}",
        std::process::id(),
        label.replace(' ', "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = DevPki::generate(&["localhost"], &[&edge_name(0), &edge_name(1)])?;
    pki.write_to(&dir)?;
    let mut cfg = relay_config(&pki, 2)?;
    cfg.quic.keepalive = Duration::from_secs(1);
    cfg.quic.idle_timeout = Duration::from_secs(10);
    cfg.limits.drain_grace = Duration::from_secs(1);
    std::fs::write(dir.join("relay.toml"), relay_toml(&cfg, &dir, None))?;
    let ready = dir.join("ready.json");
    let cfg_path = dir.join("relay.toml");
    let _relay = spawn(
        relay_bin,
        &[
            "--config",
            &cfg_path.display().to_string(),
            "--ready-file",
            &ready.display().to_string(),
        ],
        &dir.join("relay.log"),
    )?;
    let addrs: serde_json::Value =
        wait_for(Duration::from_secs(20), "relay ready file", async || {
            std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
        })
        .await
        .with_context(|| {
            format!(
                "{label}: relay log:\n{}",
                std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default()
            )
        })?;
    let addr =
        |k: &str| -> Result<SocketAddr> { Ok(addrs[k].as_str().context("address")?.parse()?) };
    let (quic, connect, admin) = (addr("quic")?, addr("connect")?, addr("admin")?);

    let mut services = Vec::new();
    for i in 0..2 {
        services.push(spawn_http(SocketAddr::new(edge_ip(i), 0), &edge_name(i)).await?);
    }
    let mut edges = Vec::new();
    for (i, bin) in edge_bins.iter().enumerate() {
        let f = dir.join(format!("edge-{i}.toml"));
        std::fs::write(&f, edge_toml(&dir, i, quic))?;
        edges.push(spawn(
            bin,
            &["--config", &f.display().to_string()],
            &dir.join(format!("edge-{i}.log")),
        )?);
        // One edge at a time: the second one's arrival is the route change
        // the first must live through.
        wait_for(Duration::from_secs(20), "edge session", async || {
            sessions(admin).await.ok().filter(|s| s.len() == i + 1)
        })
        .await
        .with_context(|| {
            format!(
                "{label}: edge {i} log:\n{}",
                std::fs::read_to_string(dir.join(format!("edge-{i}.log"))).unwrap_or_default()
            )
        })?;
    }
    let before = sessions(admin).await?;
    for round in 0..3 {
        for (i, (svc, _)) in services.iter().enumerate() {
            let body = fetch(connect, i, svc.port())
                .await
                .with_context(|| format!("{label}: round {round}"))?;
            ensure!(
                body.contains(&edge_name(i)),
                "{label}: edge {i} answered {body:?}"
            );
        }
        // Several keep-alive periods between rounds: pings, pongs and the
        // route updates both edges got must not have cost a session.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let after = sessions(admin).await?;
    ensure!(
        before == after,
        "{label}: sessions changed: {before:?} → {after:?}"
    );
    drop(edges);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn current_bin(name: &str) -> Result<PathBuf> {
    let relay = relay_server_binary()?;
    let bin = relay.with_file_name(name);
    ensure!(
        bin.exists(),
        "{} not built (cargo build -p edge-client)",
        bin.display()
    );
    Ok(bin)
}

#[tokio::test]
#[ignore = "needs the previous release's binaries: run .ci/interop"]
async fn previous_release_and_this_build_interoperate_both_ways() -> Result<()> {
    relay_lab::init();
    let prev = PathBuf::from(std::env::var("PREV_BIN_DIR").context(
        "PREV_BIN_DIR must name the previous release's binary directory (.ci/interop sets it)",
    )?);
    let (old_relay, old_edge) = (prev.join("relay-server"), prev.join("edge-client"));
    ensure!(
        old_relay.exists() && old_edge.exists(),
        "no binaries in {}",
        prev.display()
    );
    let (new_relay, new_edge) = (current_bin("relay-server")?, current_bin("edge-client")?);
    scenario("old relay, new edges", &old_relay, [&new_edge, &new_edge]).await?;
    scenario(
        "new relay, old and new edge",
        &new_relay,
        [&old_edge, &new_edge],
    )
    .await?;
    scenario("new relay, new edges", &new_relay, [&new_edge, &new_edge]).await?;
    Ok(())
}
