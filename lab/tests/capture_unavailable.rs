//! An edge whose capture cannot be installed, in the network-namespace
//! lab: on a kernel before Linux 5.2 (Debian 10's 4.19, NVIDIA Jetson's
//! L4T 4.9) nftables has no NAT chains in an `inet` table, and capture's
//! install fails. Here a stand-in `nft` placed first in `PATH` fails
//! every call made from edge1's namespace (and only there: the relay
//! node's capture, in the same process, uses the real one) while a flag
//! file exists.
//!
//! What must hold: the edge still registers its session (the cloud
//! reaches its pods: the tunnel is not hostage to capture), reports
//! `edge_capture_installed 0`, and its pods do not reach the cloud; once
//! `nft` works again, within 15 s (retried every 10 s) capture is on the
//! node, the gauge reads 1 and the edge's pod reaches a cloud pod. Before,
//! the failed install ended the edge at start, so a node with an old
//! kernel crash-looped and lost its tunnel altogether.
//!
//! And the cloud is told (`Control::CaptureStatus`): while capture fails,
//! the relay's session row for edge1 says `capture_installed: false` with
//! the `nft` error, and `relay_edges_capture_failing` is 1; once installed,
//! `true` and 0. Before, only the edge's own loopback endpoint said it,
//! and the relay showed the node as fine.
//!
//! Needs root; skips loudly otherwise, and fails instead of skipping under
//! CI=true or REQUIRE_LAB=1. Time budget: about 25 s. The test changes
//! this test process's `PATH`, so it is the only test in its binary.

use relay_lab::TempDir;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use relay_lab::netns::{self, NetnsLab, Role};
use relay_lab::scenario::{
    edge_config_in, http_from, metric, netns_start, relay_config_in, sa, services, session,
    start_edge, start_relay, within, Table, HTTP,
};

const STATUS: &str = "127.0.0.1:9469";

/// `edge_capture_installed` as edge1's status endpoint reports it.
fn installed_gauge(lab: &NetnsLab) -> Result<String> {
    let url = format!("http://{STATUS}/metrics");
    let m = lab.exec(Role::Edge1, &["curl", "-sS", "--max-time", "3", &url])?;
    m.lines()
        .find_map(|l| l.strip_prefix("edge_capture_installed "))
        .map(str::to_string)
        .context("no edge_capture_installed in the edge's metrics")
}

/// What the relay shows of edge1's capture: its session row's
/// `capture_installed` and `capture_error`, and `relay_edges_capture_failing`.
fn relay_view(lab: &NetnsLab) -> Result<(Option<bool>, String, f64)> {
    let row = session(lab, "edge1")?.context("no session of edge1 at the relay")?;
    let failing = metric(lab, "relay_edges_capture_failing")?;
    Ok((row.capture_installed, row.capture_error, failing))
}

#[test]
fn an_edge_whose_capture_cannot_be_installed_keeps_its_tunnel_and_retries() -> Result<()> {
    let Some((t0, lab, pki)) = netns_start("capture unavailable")? else {
        return Ok(());
    };
    let _svcs = [
        services(&lab, Role::Epod1, "epod1")?,
        services(&lab, Role::Cpod2, "cpod2")?,
    ];
    // The stand-in nft, failing in edge1's namespace while `fail` exists.
    let dir = TempDir::new("capture-unavailable")?;
    let flag = dir.path().join("fail");
    std::fs::write(&flag, "")?;
    let real = which("nft")?;
    let stub = dir.path().join("nft");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\n\
             if [ -e '{flag}' ] && [ \"$(ip netns identify)\" = '{ns}' ]; then\n\
             echo 'Error: Could not process rule: Operation not supported (test stand-in: a kernel without NAT in inet tables)' >&2\n\
             exit 1\n\
             fi\n\
             exec '{real}' \"$@\"\n",
            flag = flag.display(),
            ns = lab.ns(Role::Edge1),
            real = real.display(),
        ),
    )?;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))?;
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", dir.path().display()));

    let relay = start_relay(&lab, relay_config_in(&lab, &pki)?)?;
    let mut ecfg = edge_config_in(&lab, &pki, 1)?;
    ensure!(ecfg.capture.is_some(), "the lab's edge captures");
    ecfg.status_listen = Some(STATUS.parse::<SocketAddr>()?);
    let mut m = Table::new(&["case", "path", "result"]);
    // start_edge waits for the session: it fails if capture ends the edge.
    let edge = start_edge(&lab, 1, ecfg);
    m.note(
        &["session up without capture", "edge1 → relay"],
        edge.as_ref()
            .map(|_| "connected".to_string())
            .map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    let (epod1, cpod2) = (sa(netns::edge_pod_ip(1), HTTP), sa(netns::CPOD2_IP, HTTP));
    m.check(
        &["cloud reaches the edge's pod", "cpod1 → 10.244.7.5"],
        "epod1",
        within(Duration::from_secs(15), || {
            Ok(http_from(&lab, Role::Cpod1, epod1).is_ok())
        })
        .and_then(|_| http_from(&lab, Role::Cpod1, epod1)),
    );
    m.note(
        &["capture reported missing", "edge_capture_installed"],
        installed_gauge(&lab).and_then(|g| {
            ensure!(g == "0", "edge_capture_installed {g}");
            Ok(format!("edge_capture_installed {g}"))
        }),
    );
    m.note(
        &["edge pod not captured meanwhile", "epod1 → 10.244.2.2"],
        match http_from(&lab, Role::Epod1, cpod2) {
            Ok(body) => Err(anyhow::anyhow!("reached without capture: {body}")),
            Err(_) => Ok("refused or unreachable, as without capture".to_string()),
        },
    );
    // The cloud's view: the relay's admin row and gauge (the edge tells
    // it after its hello).
    m.note(
        &[
            "relay shows capture failing",
            "admin: edge1 row, relay_edges_capture_failing",
        ],
        within(Duration::from_secs(5), || {
            Ok(
                relay_view(&lab)
                    .is_ok_and(|(installed, _, n)| installed == Some(false) && n == 1.0),
            )
        })
        .and_then(|_| relay_view(&lab))
        .with_context(|| format!("relay's view: {:?}", relay_view(&lab)))
        .and_then(|(_, error, _)| {
            ensure!(
                error.contains("Operation not supported"),
                "capture_error does not name nft's error: {error:?}"
            );
            Ok(format!("capture_installed false: {error}"))
        }),
    );
    std::fs::remove_file(&flag)?;
    m.note(
        &["capture installed once nft works", "edge_capture_installed"],
        within(Duration::from_secs(15), || {
            Ok(installed_gauge(&lab).is_ok_and(|g| g == "1"))
        })
        .map(|d| format!("after {d:?}")),
    );
    m.note(
        &[
            "relay shows capture installed",
            "admin: edge1 row, relay_edges_capture_failing",
        ],
        within(Duration::from_secs(5), || {
            Ok(relay_view(&lab).is_ok_and(|(installed, error, n)| {
                installed == Some(true) && error.is_empty() && n == 0.0
            }))
        })
        .with_context(|| format!("relay's view: {:?}", relay_view(&lab)))
        .map(|d| format!("after {d:?}")),
    );
    m.check(
        &["edge pod → cloud pod", "epod1 → 10.244.2.2"],
        "cpod2",
        within(Duration::from_secs(5), || {
            Ok(http_from(&lab, Role::Epod1, cpod2).is_ok())
        })
        .and_then(|_| http_from(&lab, Role::Epod1, cpod2)),
    );
    drop(edge);
    relay.stop()?;
    m.conclude("lab-capture-unavailable.txt", t0)
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Result<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not on PATH"))
}
