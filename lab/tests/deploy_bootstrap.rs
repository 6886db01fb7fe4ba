//! The base manifests' own `relay.toml` and `edge.toml`
//! (`deploy/kubernetes/base/config/`) with the PKI of deploy/README.md's
//! walkthrough (`relay-server dev-certs --relay-name relay.example.com
//! --ca-key`: the dev CA is both the relay's CA and the issuing CA) work
//! together: an edge with no certificate, only a projected token, gets one
//! from the relay and connects; a restarted edge reconnects with the
//! certificate kept in its state directory, without a token.
//!
//! `.ci/deploy-check` runs each binary's config check on these files; this
//! runs them against each other. The relay is the real `relay-server`
//! binary; the edge runs in-process from the file (the same
//! `FileConfig::parse` → `into_runtime` as `edge-client`, with `--node`).
//! The Kubernetes API is `relay-kube-standin`, NOT a real apiserver, with
//! the edge's Node, its pod as the edge-client DaemonSet creates it, and a
//! token bound to both.
//!
//! What is rewritten for loopback, and only that: the mount paths
//! (`/etc/edge-relay/{tls,issuer,admin,relay-ca}/`, the token and state
//! paths, `relay_addrs_file`) to files of this test; listen addresses to `127.0.0.1:0` and the
//! socket to a temporary path; `[kubernetes] kubeconfig` added (in a pod
//! it is in-cluster); capture off (it needs root and nftables), and with
//! it `capture_state_file`; the edge's
//! `relay` to the relay's bound address with `server_name` the name the
//! manifests' edges dial. Every `[bootstrap]`, `[tls]` and `[admin]` key
//! is the file's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use edge_client::{EdgeClient, FileConfig};
use relay_kube_standin::{daemonset_pod, kubelet_node, StandIn};
use serde_json::Value;

const RELAY_TOML: &str = include_str!("../../deploy/kubernetes/base/config/relay.toml");
const EDGE_TOML: &str = include_str!("../../deploy/kubernetes/base/config/edge.toml");
const BOUND: Duration = Duration::from_secs(20);

/// Replaces `key = ...` in `[section]` of a TOML text with `key = value`,
/// or adds it there; fails if the section is missing.
fn set_in(text: &str, section: &str, key: &str, value: &str) -> Result<String> {
    let header = format!("[{section}]");
    let mut out = Vec::new();
    let (mut inside, mut found, mut done) = (false, false, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if inside && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            inside = trimmed == header;
            found |= inside;
        }
        if inside && !done && trimmed.split('=').next().map(str::trim) == Some(key) {
            out.push(format!("{key} = {value}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    ensure!(found, "no [{section}]");
    if !done {
        out.push(format!("{key} = {value}"));
    }
    Ok(out.join("\n") + "\n")
}

/// Replaces `key = ...` at the top level (before any section).
fn set_top(text: &str, key: &str, value: &str) -> Result<String> {
    let mut done = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().starts_with('[') {
            done = true;
        }
        if !done && line.split('=').next().map(str::trim) == Some(key) {
            out.push(format!("{key} = {value}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    ensure!(done, "no top-level {key}");
    Ok(out.join("\n") + "\n")
}

/// Files and the relay process of one run, removed on drop.
struct Run {
    dir: PathBuf,
    relay: Option<Child>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.relay.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The text without comment lines (paths in comments stay as shipped).
fn values(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Stand-in apiserver, real relay-server binary (see the module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_configs_bootstrap_an_edge_with_the_walkthroughs_pki() -> Result<()> {
    relay_lab::init();
    let relay_bin = relay_lab::scenario::relay_server_binary()?;
    let mut run = Run {
        dir: std::env::temp_dir().join(format!(
            "deploy-bootstrap-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )),
        relay: None,
    };
    let dir = run.dir.clone();
    std::fs::create_dir_all(&dir)?;

    // The walkthrough's PKI, made by the same command.
    let certs = dir.join("certs");
    let out = Command::new(&relay_bin)
        .args(["dev-certs", "--out"])
        .arg(&certs)
        .args(["--relay-name", "relay.example.com", "--ca-key"])
        .output()?;
    ensure!(out.status.success(), "dev-certs: {out:?}");
    std::fs::write(
        dir.join("admin-token"),
        "deploy-bootstrap-token-0123456789\n",
    )?;
    std::fs::write(
        dir.join("admin-read-token"),
        "deploy-bootstrap-read-token-0123456789\n",
    )?;

    // The cluster: edge-1's Node, its edge-client pod, a token bound to both.
    let standin = StandIn::spawn().await?;
    standin.upsert_node(kubelet_node(
        "edge-1",
        &["127.1.7.0/24"],
        &[("InternalIP", "127.0.0.7")],
    ));
    standin.upsert_pod(daemonset_pod(
        "edge-relay",
        "edge-client-x7k2p",
        "uid-edge-1",
        "edge-1",
        "edge-client",
        "edge-client",
    ));
    let token = standin.mint_token(
        "edge-1",
        "edge-client-x7k2p",
        "uid-edge-1",
        "edge-relay",
        SystemTime::now() + Duration::from_secs(3600),
    );
    let token_file = dir.join("token");
    std::fs::write(&token_file, token)?;

    // relay.toml as shipped, paths and listeners rewritten for loopback.
    let mut relay = RELAY_TOML
        .replace("/etc/edge-relay/tls/", &format!("{}/", certs.display()))
        .replace("/etc/edge-relay/issuer/", &format!("{}/", certs.display()))
        .replace(
            "/etc/edge-relay/admin/token",
            &dir.join("admin-token").display().to_string(),
        )
        .replace(
            "/etc/edge-relay/admin-read/token",
            &dir.join("admin-read-token").display().to_string(),
        );
    ensure!(
        !values(&relay).contains("/etc/edge-relay/"),
        "a mount path was not rewritten:\n{relay}"
    );
    for (key, value) in [
        ("quic", "\"127.0.0.1:0\"".to_string()),
        ("connect", "\"127.0.0.1:0\"".to_string()),
        ("admin", "\"127.0.0.1:0\"".to_string()),
        ("health", "\"127.0.0.1:0\"".to_string()),
        ("connect_unix", q(&dir.join("connect.sock"))),
    ] {
        relay = set_in(&relay, "listen", key, &value)?;
    }
    relay = set_in(&relay, "capture", "enabled", "false")?;
    relay = set_in(
        &relay,
        "kubernetes",
        "kubeconfig",
        &q(standin.kubeconfig_path()),
    )?;
    relay = set_in(&relay, "kubernetes", "api_timeout", "\"3s\"")?;
    std::fs::write(dir.join("relay.toml"), &relay)?;
    let ready = dir.join("ready.json");
    let log = std::fs::File::create(dir.join("relay.log"))?;
    run.relay = Some(
        Command::new(&relay_bin)
            .arg("--config")
            .arg(dir.join("relay.toml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let relay_log = || std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default();
    let start = Instant::now();
    let quic: SocketAddr = loop {
        if let Some(v) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            break v["quic"].as_str().context("quic")?.parse()?;
        }
        if start.elapsed() > BOUND {
            bail!("relay not ready:\n{}", relay_log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // edge.toml as shipped, its paths rewritten, its node from --node.
    let state = dir.join("state");
    let edge_text = || -> Result<String> {
        let mut e = EDGE_TOML
            .replace(
                "/etc/edge-relay/relay-ca/",
                &format!("{}/", certs.display()),
            )
            .replace(
                "/var/run/secrets/edge-relay/token",
                &token_file.display().to_string(),
            )
            .replace("\"/var/lib/edge-relay\"", &q(&state))
            .replace(
                "\"/var/lib/edge-relay/relay-addrs.json\"",
                &q(&state.join("relay-addrs.json")),
            )
            // Capture is off here (below), and its state file is refused
            // without it.
            .replace(
                "capture_state_file = \"/var/lib/edge-relay/capture.json\"\n",
                "",
            );
        let v = values(&e);
        ensure!(
            !v.contains("/etc/edge-relay/") && !v.contains("/var/"),
            "a path was not rewritten:\n{e}"
        );
        e = set_top(&e, "relay", &format!("\"{quic}\""))?;
        // The name the manifests' edges dial (relay = "relay.example.com:8443").
        e = format!("server_name = \"relay.example.com\"\n{e}");
        set_in(&e, "capture", "enabled", "false")
    };
    let edge = || -> Result<EdgeClient> {
        let mut file = FileConfig::parse(&edge_text()?)?;
        file.node = "edge-1".into();
        Ok(EdgeClient::spawn(file.into_runtime()?))
    };

    let check = async {
        let e = edge()?;
        e.wait_connected(BOUND)
            .await
            .context("edge with only a token did not connect")?;
        let issued = relay_log()
            .lines()
            .filter(|l| l.contains("node certificate issued") && l.contains("edge-1"))
            .count();
        ensure!(issued == 1, "certificates issued: {issued}");
        let cert = state.join("edge-1.pem");
        let key = state.join("edge-1-key.pem");
        ensure!(
            cert.exists() && key.exists(),
            "state directory: {:?}",
            std::fs::read_dir(&state)?.collect::<Vec<_>>()
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
            ensure!(mode == 0o600, "key mode {mode:o}");
        }
        // The condition the walkthrough's step 5 reads.
        let until = Instant::now() + BOUND;
        loop {
            let status = standin
                .node("edge-1")
                .and_then(|n| n.status?.conditions)
                .and_then(|cs| cs.into_iter().find(|c| c.type_ == "EdgeTunnelReady"))
                .map(|c| c.status);
            if status.as_deref() == Some("True") {
                break;
            }
            ensure!(Instant::now() < until, "EdgeTunnelReady: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        e.shutdown().await;

        // A restarted pod: the token is gone (as when the relay cannot
        // review one), the kept certificate suffices.
        std::fs::remove_file(&token_file)?;
        let e = edge()?;
        e.wait_connected(BOUND)
            .await
            .context("restarted edge did not reconnect with its kept certificate")?;
        let issued_after = relay_log()
            .lines()
            .filter(|l| l.contains("node certificate issued"))
            .count();
        ensure!(
            issued_after == 1,
            "restart asked for a new certificate ({issued_after} issued)"
        );
        e.shutdown().await;
        Ok::<(), anyhow::Error>(())
    };
    if let Err(err) = check.await {
        bail!(
            "{err:#}\n--- relay.toml:\n{relay}\n--- relay log:\n{}",
            relay_log()
        );
    }
    Ok(())
}
